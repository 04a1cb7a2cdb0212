"""Default parameter partition rules over mesh axes ``fsdp`` and ``tensor``.

Megatron-style tensor parallelism (column-parallel q/k/v/gate/up, row-parallel o/down, vocab-
parallel embedding and LM head) with the other weight dimension sharded over ``fsdp``. Norm scales
and row-parallel biases are replicated. ``jaxrlhf.sharding.fit_spec`` drops an axis that does not
divide a dimension (tiny test models).
"""

from __future__ import annotations

from jax.sharding import PartitionSpec as P

from jaxrlhf.models.config import ModelConfig


def partition_rules(config: ModelConfig) -> list[tuple[str, P]]:
    """``(regex, PartitionSpec)`` rules for every parameter of a ``config`` model (first match wins)."""
    del config  # every family uses the same parameter names
    return [
        (r"^embed$", P("tensor", "fsdp")),  # [V, E]
        (r"^pos_embed$", P(None, "fsdp")),  # [P, E]
        (r"attn/(q|k|v)_proj/kernel$", P("fsdp", "tensor")),  # [E, H*D]
        (r"attn/(q|k|v)_proj/bias$", P("tensor")),
        (r"attn/o_proj/kernel$", P("tensor", "fsdp")),  # [H*D, E]
        (r"mlp/(gate|up)_proj/kernel$", P("fsdp", "tensor")),  # [E, F]
        (r"mlp/up_proj/bias$", P("tensor")),
        (r"mlp/down_proj/kernel$", P("tensor", "fsdp")),  # [F, E]
        (r"(o_proj|down_proj)/bias$", P()),
        (r"^lm_head/kernel$", P("fsdp", "tensor")),  # [E, V]
        (r"^score/kernel$", P("fsdp", None)),  # [E, 1]
        (r"norm/(scale|bias)$", P()),
    ]
