"""``ModelConfig``: one frozen dataclass for every decoder family, and its HF ``config.json`` mapping.

A family is a small mapping from HF config keys onto these fields plus the few blocks that differ
(norm kind, MLP kind, position scheme, fused-qkv layout, parallel residual). The dataclass is
hashable (tuples only), so it can sit on an ``nnx.Module`` as static graph data.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox")
HEADS = (None, "scalar")
ACTIVATIONS = ("silu", "gelu", "gelu_new", "relu")
# HF spellings -> ours ("gelu_new" = tanh approximation, "gelu" = exact erf).
_ACT_ALIASES = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_new": "gelu_new",
    "gelu_pytorch_tanh": "gelu_new",
    "gelu_fast": "gelu_new",
    "relu": "relu",
}
ROPE_TYPES = ("default", "linear", "llama3")

_ARCH = {
    "llama": ("LlamaForCausalLM", "LlamaForSequenceClassification"),
    "mistral": ("MistralForCausalLM", "MistralForSequenceClassification"),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2ForSequenceClassification"),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3ForSequenceClassification"),
    "gpt2": ("GPT2LMHeadModel", "GPT2ForSequenceClassification"),
    "gpt_neox": ("GPTNeoXForCausalLM", "GPTNeoXForSequenceClassification"),
}


def _dtype_name(d: Any) -> str:
    return jnp.dtype(d).name


ATTENTION_IMPLS = ("portable", "xla", "cudnn", "splash")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture + numerics of a decoder. All fields hashable.

    Attributes:
      family: one of ``FAMILIES``; selects the HF weight layout.
      vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, head_dim, intermediate_size:
        sizes (``num_heads % num_kv_heads == 0``; GQA when smaller).
      norm: ``"rms"`` or ``"layer"``; ``norm_eps`` its epsilon.
      mlp: ``"gated"`` (``down(act(gate(x)) * up(x))``) or ``"plain"`` (``down(act(up(x)))``).
      activation: ``"silu" | "gelu" | "gelu_new" | "relu"``.
      position: ``"rope"`` or ``"learned"`` (GPT-2; ``max_position_embeddings`` rows).
      rope_theta, rope_type, rope_scaling (tuple of ``(key, value)`` pairs), partial_rotary_factor:
        RoPE settings; ``rope_type`` in ``ROPE_TYPES``; the first
        ``int(head_dim * partial_rotary_factor)`` dims are rotated (HF ``rotate_half`` layout).
      qkv_bias, o_bias, mlp_bias, qk_norm: which projections carry biases; Qwen3's per-head RMSNorm
        on q and k.
      parallel_residual: GPT-NeoX ``x + attn(ln1(x)) + mlp(ln2(x))``.
      tie_word_embeddings: the LM head reuses the input embedding.
      sliding_window, layer_types: Mistral/Qwen sliding-window attention; ``layer_types[i]`` is
        ``"full_attention"`` or ``"sliding_attention"`` (``None``: every layer sliding when
        ``sliding_window`` is set). A query at slot ``q`` sees keys at slots ``k`` with
        ``q - k < sliding_window`` (the HF rule).
      bos_token_id, eos_token_id, pad_token_id: token ids copied from / to ``config.json``
        (``eos_token_id`` may be a tuple).
      head: ``None`` (LM head, logits) or ``"scalar"`` (``score`` head, one float per token).
      dtype, param_dtype: activation and parameter dtype names (``"float32"``, ``"bfloat16"``).
      remat: gradient-checkpoint every block (``nnx.remat``) in the training forward.
      attention: the attention kernel of the full (uncached) forward: ``"portable"`` (ours: causal
        query chunks, FlashAttention-style backward; every platform), ``"xla"`` or ``"cudnn"``
        (``jax.nn.dot_product_attention`` with that implementation; cuDNN's fused kernel needs an
        NVIDIA GPU and bf16/fp16), or ``"splash"`` (Pallas splash attention, ``models.splash``: the
        TPU kernel; run in Pallas's interpreter elsewhere). A runtime choice, not written to
        ``config.json``.
    """

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm: str = "rms"
    norm_eps: float = 1e-6
    mlp: str = "gated"
    activation: str = "silu"
    position: str = "rope"
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_scaling: tuple[tuple[str, Any], ...] = ()
    partial_rotary_factor: float = 1.0
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    parallel_residual: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    head: str | None = None
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False
    attention: str = "portable"

    def __post_init__(self):
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"attention must be one of {ATTENTION_IMPLS}, got {self.attention!r}")
        if self.family not in FAMILIES:
            raise ValueError(f"unsupported model family {self.family!r}; supported: {list(FAMILIES)}")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type {self.rope_type!r} is not supported; supported: {list(ROPE_TYPES)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.norm not in ("rms", "layer") or self.mlp not in ("gated", "plain"):
            raise ValueError(f"norm must be rms|layer and mlp gated|plain, got {self.norm}, {self.mlp}")
        if self.position not in ("rope", "learned"):
            raise ValueError(f"position must be rope|learned, got {self.position!r}")
        if self.layer_types is not None and len(self.layer_types) != self.num_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        object.__setattr__(self, "dtype", _dtype_name(self.dtype))
        object.__setattr__(self, "param_dtype", _dtype_name(self.param_dtype))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if isinstance(self.rope_scaling, Mapping):
            object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))

    # ------------------------------------------------------------------ derived
    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def layer_window(self, i: int) -> int | None:
        """Sliding window of layer ``i`` (``None`` = full causal attention)."""
        if self.sliding_window is None:
            return None
        if self.layer_types is None or self.layer_types[i] == "sliding_attention":
            return int(self.sliding_window)
        return None

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)

    def inv_freq(self) -> np.ndarray:
        """RoPE inverse frequencies ``[rotary_dim // 2]`` float32, scaling applied (as in HF)."""
        dim = self.rotary_dim
        inv = 1.0 / (self.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
        inv = inv.astype(np.float32)
        s = dict(self.rope_scaling)
        if self.rope_type == "linear":
            inv = inv / np.float32(s["factor"])
        elif self.rope_type == "llama3":
            factor = s["factor"]
            low, high = s["low_freq_factor"], s["high_freq_factor"]
            old_len = s["original_max_position_embeddings"]
            low_wavelen, high_wavelen = old_len / low, old_len / high
            wavelen = 2 * math.pi / inv
            inv_l = np.where(wavelen > low_wavelen, inv / factor, inv)
            smooth = (old_len / wavelen - low) / (high - low)
            smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
            medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
            inv = np.where(medium, smoothed, inv_l).astype(np.float32)
        return inv

    # ------------------------------------------------------------------ HF mapping
    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **overrides) -> ModelConfig:
        """Builds a config from an HF ``config.json`` dict (transformers 4.x or 5.x spelling).

        Never executes remote code: ``auto_map`` entries are ignored and an unknown
        ``model_type`` raises, naming the supported ones.
        """
        mt = hf.get("model_type")
        if mt not in FAMILIES:
            raise ValueError(
                f"unsupported model_type {mt!r}; supported model types: {list(FAMILIES)} "
                "(jaxrlhf never runs remote model code)"
            )
        g = hf.get
        act = g("activation_function") if mt == "gpt2" else g("hidden_act", "silu")
        if act not in _ACT_ALIASES:
            raise ValueError(
                f"unsupported activation {act!r} in config.json; supported: {list(_ACT_ALIASES)}"
            )
        kw: dict[str, Any] = dict(
            family=mt,
            bos_token_id=g("bos_token_id"),
            eos_token_id=g("eos_token_id"),
            pad_token_id=g("pad_token_id"),
            activation=_ACT_ALIASES[act],
        )
        if mt == "gpt2":
            kw.update(_gpt2_kwargs(g))
        else:
            kw.update(_rotary_kwargs(g))
            kw.update(_family_kwargs(mt, g, kw["num_layers"]))
        kw.update(overrides)
        return cls(**kw)

    def to_hf(self) -> dict[str, Any]:
        """The HF ``config.json`` dict (with ``architectures``) for this config."""
        causal, seqcls = _ARCH[self.family]
        hf_act = {"silu": "silu", "gelu": "gelu", "gelu_new": "gelu_new", "relu": "relu"}[self.activation]
        out: dict[str, Any] = {
            "model_type": self.family,
            "architectures": [seqcls if self.head == "scalar" else causal],
            "vocab_size": self.vocab_size,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id)
            if isinstance(self.eos_token_id, tuple)
            else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": self.param_dtype,
            "dtype": self.param_dtype,
        }
        if self.head == "scalar":
            out.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
        if self.family == "gpt2":
            out.update(
                n_embd=self.hidden_size,
                n_layer=self.num_layers,
                n_head=self.num_heads,
                n_inner=self.intermediate_size,
                n_positions=self.max_position_embeddings,
                activation_function=hf_act,
                layer_norm_epsilon=self.norm_eps,
            )
            return out
        rope_params: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        rope_params.update(dict(self.rope_scaling))
        out.update(
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            intermediate_size=self.intermediate_size,
            hidden_act=hf_act,
            max_position_embeddings=self.max_position_embeddings,
            rope_theta=self.rope_theta,
            rope_parameters=rope_params,
        )
        if self.rope_type != "default":
            out["rope_scaling"] = {"rope_type": self.rope_type, **dict(self.rope_scaling)}
        if self.family == "gpt_neox":
            rope_params["partial_rotary_factor"] = self.partial_rotary_factor
            out.update(
                rotary_pct=self.partial_rotary_factor,
                rotary_emb_base=self.rope_theta,
                layer_norm_eps=self.norm_eps,
                use_parallel_residual=self.parallel_residual,
                attention_bias=self.qkv_bias,
            )
            return out
        out["rms_norm_eps"] = self.norm_eps
        if self.family in ("llama", "qwen3", "mistral"):
            out["attention_bias"] = self.qkv_bias
        if self.family == "llama":
            out["mlp_bias"] = self.mlp_bias
        if self.family == "mistral":
            out["sliding_window"] = self.sliding_window
        if self.family in ("qwen2", "qwen3"):
            out["use_sliding_window"] = self.sliding_window is not None
            out["sliding_window"] = self.sliding_window
            if self.sliding_window is not None:
                out["layer_types"] = list(self.layer_types or ["sliding_attention"] * self.num_layers)
                out["max_window_layers"] = self.num_layers
        return out


# Small default configs per family, for `init("llama")` and tests (override any field).
_TINY = dict(
    vocab_size=256,
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    intermediate_size=128,
)
PRESETS: dict[str, dict[str, Any]] = {
    "llama": dict(family="llama", **_TINY, norm_eps=1e-5),
    "mistral": dict(family="mistral", **_TINY, norm_eps=1e-5, sliding_window=4096),
    "qwen2": dict(family="qwen2", **_TINY, qkv_bias=True, rope_theta=1e6),
    "qwen3": dict(family="qwen3", **_TINY, qk_norm=True, rope_theta=1e6, tie_word_embeddings=True),
    "gpt2": dict(
        family="gpt2",
        **{**_TINY, "num_kv_heads": 4},
        norm="layer",
        norm_eps=1e-5,
        mlp="plain",
        activation="gelu_new",
        position="learned",
        max_position_embeddings=1024,
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        tie_word_embeddings=True,
    ),
    "gpt_neox": dict(
        family="gpt_neox",
        **{**_TINY, "num_kv_heads": 4},
        norm="layer",
        norm_eps=1e-5,
        mlp="plain",
        activation="gelu",
        partial_rotary_factor=0.25,
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        parallel_residual=True,
    ),
}


def _gpt2_kwargs(g) -> dict[str, Any]:
    """``ModelConfig`` fields of a GPT-2 ``config.json`` (``g`` = its ``dict.get``)."""
    h = g("n_embd")
    if g("scale_attn_by_inverse_layer_idx") or g("reorder_and_upcast_attn"):
        raise ValueError(
            "gpt2 options scale_attn_by_inverse_layer_idx/reorder_and_upcast_attn are unsupported"
        )
    if g("scale_attn_weights", True) is False:
        raise ValueError("gpt2 scale_attn_weights=False is unsupported")
    return dict(
        vocab_size=g("vocab_size"),
        hidden_size=h,
        num_layers=g("n_layer"),
        num_heads=g("n_head"),
        num_kv_heads=g("n_head"),
        head_dim=h // g("n_head"),
        intermediate_size=g("n_inner") or 4 * h,
        norm="layer",
        norm_eps=g("layer_norm_epsilon", 1e-5),
        mlp="plain",
        position="learned",
        max_position_embeddings=g("n_positions", 1024),
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        tie_word_embeddings=g("tie_word_embeddings", True),
    )


def _rotary_kwargs(g) -> dict[str, Any]:
    """Sizes and rotary-embedding fields of a Llama-style / GPT-NeoX ``config.json``."""
    rope = dict(g("rope_parameters") or {})
    legacy = dict(g("rope_scaling") or {})
    theta = rope.get("rope_theta", g("rope_theta", g("rotary_emb_base", 10000.0)))
    rope_type = rope.get(
        "rope_type", rope.get("type", legacy.get("rope_type", legacy.get("type", "default")))
    )
    scaling = {
        k: v
        for k, v in ({**legacy, **rope}).items()
        if k not in ("rope_type", "type", "rope_theta", "partial_rotary_factor")
    }
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_type {rope_type!r} is not supported; supported: {list(ROPE_TYPES)}")
    partial = rope.get("partial_rotary_factor", g("partial_rotary_factor", g("rotary_pct", 1.0)))
    nh = g("num_attention_heads")
    return dict(
        vocab_size=g("vocab_size"),
        hidden_size=g("hidden_size"),
        num_layers=g("num_hidden_layers"),
        num_heads=nh,
        num_kv_heads=g("num_key_value_heads") or nh,
        head_dim=g("head_dim") or g("hidden_size") // nh,
        intermediate_size=g("intermediate_size"),
        max_position_embeddings=g("max_position_embeddings", 2048),
        rope_theta=float(theta),
        rope_type=rope_type,
        rope_scaling=tuple(sorted(scaling.items())) if rope_type != "default" else (),
        partial_rotary_factor=float(partial),
        tie_word_embeddings=bool(g("tie_word_embeddings", False)),
    )


def _family_kwargs(mt: str, g, num_layers: int) -> dict[str, Any]:
    """Norm, MLP, bias and attention-window fields of the rotary families."""
    kw: dict[str, Any] = {}
    if mt == "gpt_neox":
        kw.update(
            norm="layer",
            norm_eps=g("layer_norm_eps", 1e-5),
            mlp="plain",
            qkv_bias=g("attention_bias", True),
            o_bias=g("attention_bias", True),
            mlp_bias=True,
            parallel_residual=g("use_parallel_residual", True),
        )
    else:
        kw.update(norm="rms", norm_eps=g("rms_norm_eps", 1e-6), mlp="gated")
        if mt == "qwen2":
            kw.update(qkv_bias=True)
        else:
            kw.update(qkv_bias=bool(g("attention_bias", False)), o_bias=bool(g("attention_bias", False)))
        if mt == "llama":
            kw.update(mlp_bias=bool(g("mlp_bias", False)))
        if mt == "qwen3":
            kw.update(qk_norm=True)
        if mt == "mistral" and g("sliding_window") is not None:
            kw.update(sliding_window=int(g("sliding_window")))
        if mt in ("qwen2", "qwen3") and g("use_sliding_window") and g("sliding_window"):
            n = num_layers
            types = g("layer_types") or [
                "sliding_attention" if i >= g("max_window_layers", n) else "full_attention" for i in range(n)
            ]
            kw.update(sliding_window=int(g("sliding_window")), layer_types=tuple(types))
    return kw
