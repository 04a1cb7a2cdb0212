"""Flax NNX decoders (llama, mistral, qwen2, qwen3, gpt2, gpt_neox) with HF import/export.

Public API::

    model = init("llama", seed=0, dtype=jnp.bfloat16, head=None, num_layers=4)
    model = from_pretrained("path/or/hub-id", dtype=..., param_dtype=..., head="scalar", mesh=..., rules=...)
    save_pretrained(model, "out_dir", max_shard_size="5GB")
    logits = model(input_ids, attention_mask)            # [B,T,V] f32 (head="scalar": [B,T] f32)
    cache = model.init_cache(B, S); out, cache = model.decode(ids, positions, cache, cache_mask, index)
    load_config(path, head=None, **overrides) -> ModelConfig   # config.json only, no weights
    partition_rules(model.config); count_params(params); flops_per_token(config, seq_len)
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx

from jaxrlhf.models.config import ATTENTION_IMPLS, FAMILIES, PRESETS, ModelConfig
from jaxrlhf.models.hf_io import from_pretrained, load_config, save_pretrained, weight_groups
from jaxrlhf.models.modeling import Transformer, count_params, flops_per_token
from jaxrlhf.models.sharding_rules import partition_rules

__all__ = [
    "ATTENTION_IMPLS",
    "FAMILIES",
    "ModelConfig",
    "Transformer",
    "count_params",
    "flops_per_token",
    "from_pretrained",
    "init",
    "load_config",
    "partition_rules",
    "save_pretrained",
    "weight_groups",
]


def init(
    config_or_family: ModelConfig | str,
    *,
    seed: int = 0,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    head: str | None = None,
    **overrides: Any,
) -> Transformer:
    """A randomly initialised model (normal(0.02) weights, unit norms, zero biases).

    Args:
      config_or_family: a ``ModelConfig`` or a family name (``FAMILIES``) for a tiny preset
        (2 layers, hidden 64, vocab 256) that ``overrides`` resize.
      seed: ``nnx.Rngs`` seed. dtype, param_dtype: activation and parameter dtypes.
      head: ``None`` (LM) or ``"scalar"``. overrides: any ``ModelConfig`` field.
      ``dtype``, ``param_dtype`` and ``head`` always apply, also over a given ``ModelConfig``'s
      own values (pass ``head=cfg.head, dtype=cfg.dtype, ...`` to keep them).
    Returns:
      A ``Transformer``; ``nnx.split`` gives its ``nnx.Param`` state.
    """
    if isinstance(config_or_family, str):
        if config_or_family not in PRESETS:
            raise ValueError(f"unknown model family {config_or_family!r}; supported: {list(FAMILIES)}")
        cfg = ModelConfig(
            **{**PRESETS[config_or_family], **overrides}, head=head, dtype=dtype, param_dtype=param_dtype
        )
    else:
        cfg = config_or_family.replace(head=head, dtype=dtype, param_dtype=param_dtype, **overrides)
    return Transformer(cfg, rngs=nnx.Rngs(seed))
