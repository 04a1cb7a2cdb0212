"""Shared decoder blocks and the ``Transformer`` (Flax NNX) used by every family.

Shapes: ``B`` batch, ``T`` query length, ``S`` key length (cache slots), ``H`` query heads,
``K`` key/value heads (GQA: ``H = K * G``), ``D`` head dim, ``E`` hidden size, ``V`` vocab.
Every state leaf is an ``nnx.Param``; parameter paths read ``layers/0/attn/q_proj/kernel``.
Attention scores, softmax, norms and RoPE run in float32; matmuls in ``config.dtype``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrlhf.models.config import ModelConfig
from jaxrlhf.models.splash import attention as splash_attention
from jaxrlhf.models.splash import segment_ids as splash_segment_ids
from jaxrlhf.sharding import axis_size, constrain

NEG_INF = -1e30  # finite large-negative fill: a fully masked row stays finite (uniform), never NaN


def _act(name: str):
    return {
        "silu": jax.nn.silu,
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
        "relu": jax.nn.relu,
    }[name]


def _normal(std: float):
    return nnx.initializers.normal(stddev=std)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AdaptedKernel:
    """A LoRA-adapted kernel leaf (``jaxrlhf.lora.adapt``), in place of a ``Linear``'s kernel array:
    the layer computes ``x @ w + scale * (dropout(x) @ a) @ b`` (Hu et al. 2021, PEFT's
    ``result + lora_B(lora_A(dropout(x))) * scaling``) without forming ``w + scale * a @ b``.

    ``w [in, out]`` frozen base (no gradient flows into it), ``a [in, r]``, ``b [r, out]``;
    ``scale = alpha / r`` and ``rate`` (dropout probability) are static; ``rng`` is the dropout key
    (``None``: no dropout, as in the reference, the sampler, scoring and evaluation).
    """

    w: jax.Array
    a: jax.Array
    b: jax.Array
    rng: jax.Array | None = None
    scale: float = dataclasses.field(default=1.0, metadata=dict(static=True))
    rate: float = dataclasses.field(default=0.0, metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        return self.w.shape

    def merged(self) -> jax.Array:
        """``w + scale * a @ b`` ``[in, out]`` in ``w``'s dtype (float32 sum at full precision)."""
        ab = jnp.dot(self.a.astype(jnp.float32), self.b.astype(jnp.float32), precision="highest")
        return (self.w.astype(jnp.float32) + self.scale * ab).astype(self.w.dtype)


def _kernel(layer) -> jax.Array | AdaptedKernel:
    value = layer.kernel.get_value()
    return value if isinstance(value, AdaptedKernel) else layer.kernel[...]


def adapter_dropout(x: jax.Array, k: AdaptedKernel) -> jax.Array:
    """Inverted dropout of the adapter input (``torch.nn.Dropout``: kept entries scaled by
    ``1 / (1 - rate)``); ``x`` unchanged when ``k.rate == 0`` or ``k.rng is None``."""
    if k.rate == 0.0 or k.rng is None:
        return x
    keep = jax.random.bernoulli(k.rng, 1.0 - k.rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - k.rate, x.dtype), jnp.zeros((), x.dtype))


def adapter_out(xa: jax.Array, k: AdaptedKernel, dtype, out_dtype=None) -> jax.Array:
    """``scale * xa @ b``: the adapter path's output ``[..., out]`` from ``xa = dropout(x) @ a [..., r]``."""
    return dense(xa, k.b, None, dtype, out_dtype) * jnp.asarray(k.scale, out_dtype or dtype)


class Linear(nnx.Module):
    """``y = x @ kernel (+ bias)``; ``kernel [in, out]`` (HF torch ``Linear`` weight transposed).

    The kernel may be an ``AdaptedKernel`` (LoRA): ``y = x @ w (+ bias) + scale * (dropout(x) @ a) @ b``.
    """

    def __init__(self, din: int, dout: int, *, bias: bool, cfg: ModelConfig, rngs: nnx.Rngs, std=0.02):
        pd = jnp.dtype(cfg.param_dtype)
        self.kernel = nnx.Param(_normal(std)(rngs.params(), (din, dout), pd))
        self.bias = nnx.Param(jnp.zeros((dout,), pd)) if bias else None
        self.dtype = cfg.dtype

    def __call__(self, x: jax.Array, out_dtype=None) -> jax.Array:
        bias = None if self.bias is None else self.bias[...]
        k = _kernel(self)
        if not isinstance(k, AdaptedKernel):
            return dense(x, k, bias, self.dtype, out_dtype)
        y = dense(x, jax.lax.stop_gradient(k.w), bias, self.dtype, out_dtype)
        xa = dense(adapter_dropout(x, k), k.a, None, self.dtype)  # [..., r]
        return y + adapter_out(xa, k, self.dtype, out_dtype or self.dtype)

    def effective_kernel(self) -> jax.Array:
        """The kernel ``[in, out]`` the layer applies (an adapted one merged, ``AdaptedKernel.merged``)."""
        k = _kernel(self)
        return k.merged() if isinstance(k, AdaptedKernel) else k


def dense(x: jax.Array, kernel: jax.Array, bias, dtype, out_dtype=None) -> jax.Array:
    """``x [..., in] @ kernel [in, out] (+ bias)`` in ``dtype``, output in ``out_dtype or dtype``."""
    dt = jnp.dtype(dtype)
    # A 2-D dot: its transpose (the kernel gradient) is then one [in, N] x [N, out] contraction.
    # Left 3-D, XLA:CPU wrote the activation gradient in a transposed layout first (measured:
    # SwiGLU MLP forward + backward 186 -> 106 ms at [16, 448, 256] -> 688, see docs/benchmarks.md).
    y = jnp.dot(x.reshape(-1, x.shape[-1]).astype(dt), kernel.astype(dt), preferred_element_type=out_dtype)
    y = y.reshape(*x.shape[:-1], kernel.shape[-1])
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y.astype(out_dtype or dt)


def fused_dense(x: jax.Array, layers) -> list[jax.Array]:
    """``[layer(x) for layer in layers]`` as one dot on the concatenated kernels, split back.

    One matmul instead of several, and in the backward one activation-gradient matmul instead of a
    sum of several (measured on CPU: see docs/benchmarks.md). Only without tensor parallelism: with a
    ``tensor`` axis > 1 the kernels are column-sharded and concatenating them would move data.
    """
    if len(layers) == 1 or axis_size("tensor") > 1:
        return [layer(x) for layer in layers]
    adapted = [_kernel(layer) for layer in layers]
    kernels = [jax.lax.stop_gradient(k.w) if isinstance(k, AdaptedKernel) else k for k in adapted]
    bias = None
    if any(layer.bias is not None for layer in layers):
        bias = jnp.concatenate([
            layer.bias[...] if layer.bias is not None else jnp.zeros(k.shape[-1], k.dtype)
            for layer, k in zip(layers, kernels, strict=True)
        ])  # fmt: skip
    y = dense(x, jnp.concatenate(kernels, axis=1), bias, layers[0].dtype)
    ys = jnp.split(y, np.cumsum([k.shape[-1] for k in kernels])[:-1].tolist(), axis=-1)
    return fused_adapters(x, ys, adapted, layers[0].dtype)


def fused_adapters(x: jax.Array, ys: list[jax.Array], kernels: list, dtype) -> list[jax.Array]:
    """Adds each ``AdaptedKernel``'s adapter output to its slice of a fused projection ``ys``.

    Without dropout the ``A``s share one ``x @ [A_1 | A_2 | ...]`` dot (the input is the same);
    with dropout each adapter draws its own mask, as PEFT's per-module ``lora_dropout``.
    """
    idx = [i for i, k in enumerate(kernels) if isinstance(k, AdaptedKernel)]
    if not idx:
        return ys
    ks = [kernels[i] for i in idx]
    if all(k.rate == 0.0 or k.rng is None for k in ks):
        xa = dense(x, jnp.concatenate([k.a for k in ks], axis=1), None, dtype)  # [..., sum r]
        xas = jnp.split(xa, np.cumsum([k.a.shape[1] for k in ks])[:-1].tolist(), axis=-1)
    else:
        xas = [dense(adapter_dropout(x, k), k.a, None, dtype) for k in ks]
    out = list(ys)
    for i, k, xa in zip(idx, ks, xas, strict=True):
        out[i] = ys[i] + adapter_out(xa, k, dtype)
    return out


class Norm(nnx.Module):
    """RMSNorm (``scale``) or LayerNorm (``scale``, ``bias``) over the last axis, computed in f32."""

    def __init__(self, dim: int, cfg: ModelConfig, kind: str | None = None):
        pd = jnp.dtype(cfg.param_dtype)
        self.kind = kind or cfg.norm
        self.eps = cfg.norm_eps
        self.scale = nnx.Param(jnp.ones((dim,), pd))
        self.bias = nnx.Param(jnp.zeros((dim,), pd)) if self.kind == "layer" else None

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = x.dtype
        h = x.astype(jnp.float32)
        if self.kind == "rms":
            h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
            # HF Llama: weight * normed.to(input_dtype)
            return (self.scale[...].astype(jnp.float32) * h.astype(dt).astype(jnp.float32)).astype(dt)
        mu = jnp.mean(h, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(h - mu), axis=-1, keepdims=True)
        h = (h - mu) * jax.lax.rsqrt(var + self.eps)
        return (h * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(dt)


def rope_cos_sin(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``cos, sin [B, T, rotary_dim]`` float32 for integer ``positions [B, T]``."""
    inv = jnp.asarray(cfg.inv_freq())  # [R/2]
    freqs = positions.astype(jnp.float32)[..., None] * inv  # [B,T,R/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B,T,R]
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates the first ``R`` dims of ``x [B,T,H,D]`` (HF ``rotate_half`` layout)."""
    r = cos.shape[-1]
    xr, xp = x[..., :r].astype(jnp.float32), x[..., r:]
    x1, x2 = xr[..., : r // 2], xr[..., r // 2 :]
    rot = jnp.concatenate([-x2, x1], axis=-1)
    out = xr * cos[:, :, None, :] + rot * sin[:, :, None, :]
    return jnp.concatenate([out.astype(x.dtype), xp], axis=-1)


def attention_chunks(t: int, max_chunks: int = 8, min_chunk: int = 64) -> list[tuple[int, int]]:
    """Query chunks ``[(start, stop), ...]`` covering ``[0, t)`` for causal attention.

    At most ``max_chunks`` chunks of at least ``min_chunk`` queries (one chunk when ``t`` is short):
    with ``n`` chunks, causal attention computes ``(n + 1) / (2 n)`` of the full ``T x T`` scores.
    """
    n = max(1, min(max_chunks, t // min_chunk))
    size = -(-t // n)
    return [(s, min(s + size, t)) for s in range(0, t, size)]


def _scaled_scores(q, k, allowed):
    s = jnp.einsum("bkgtd,bksd->bkgts", q, k, preferred_element_type=jnp.float32)
    return jnp.where(allowed[:, None, None], s * (1.0 / math.sqrt(q.shape[-1])), NEG_INF)


@jax.custom_vjp
def softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array) -> jax.Array:
    """``softmax(q k^T / sqrt(D), masked) v`` per KV head: ``q [B,K,G,T,D]``, ``k, v [B,K,S,D]``,
    ``allowed [B,T,S]`` bool -> ``[B,K,G,T,D]`` in ``q.dtype`` (scores and softmax in float32).

    The backward is FlashAttention's: it keeps the output and the row log-sum-exp instead of the
    ``[B,K,G,T,S]`` probabilities, recomputes them, and uses ``rowsum(dO * O)`` in place of the
    softmax's ``rowsum(P * dP)`` (Dao et al., 2022): less memory and fewer passes over ``T x S``.
    """
    return _softmax_attention_fwd(q, k, v, allowed)[0]


def _softmax_attention_fwd(q, k, v, allowed):
    s = _scaled_scores(q, k, allowed)
    m = jnp.max(s, axis=-1, keepdims=True)
    e = jnp.exp(s - m)
    denom = jnp.sum(e, axis=-1, keepdims=True)
    o = jnp.einsum("bkgts,bksd->bkgtd", e.astype(q.dtype), v, preferred_element_type=jnp.float32) / denom
    o = o.astype(q.dtype)
    return o, (q, k, v, allowed, o, m + jnp.log(denom))


def _softmax_attention_bwd(res, do):
    q, k, v, allowed, o, lse = res
    dt, f32 = q.dtype, jnp.float32
    p = jnp.exp(_scaled_scores(q, k, allowed) - lse)
    # A row with no allowed key was the mean of the values (uniform p); its lse = NEG_INF + log S
    # rounds to NEG_INF in float32, so recompute that p exactly.
    none = ~jnp.any(allowed, axis=-1)[:, None, None, :, None]  # [B,1,1,T,1]
    p = jnp.where(none, 1.0 / k.shape[2], p)
    dv = jnp.einsum("bkgts,bkgtd->bksd", p.astype(dt), do, preferred_element_type=f32)
    dp = jnp.einsum("bkgtd,bksd->bkgts", do, v, preferred_element_type=f32)
    delta = jnp.sum(do.astype(f32) * o.astype(f32), axis=-1, keepdims=True)
    # Masked scores are constants: no gradient to q or k through them. (Only a row with no allowed
    # key has p > 0 there: its output is the mean of the values, whatever q and k.)
    ds = jnp.where(allowed[:, None, None], p * (dp - delta) * (1.0 / math.sqrt(q.shape[-1])), 0.0).astype(dt)
    dq = jnp.einsum("bkgts,bksd->bkgtd", ds, k, preferred_element_type=f32)
    dk = jnp.einsum("bkgts,bkgtd->bksd", ds, q, preferred_element_type=f32)
    return dq.astype(dt), dk.astype(k.dtype), dv.astype(v.dtype), None


softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


def attend(
    q, k, v, allowed: jax.Array, *, causal: bool = False, impl: str = "portable", window: int | None = None
) -> jax.Array:
    """Masked softmax attention with GQA.

    Args:
      q: ``[B, T, H, D]`` queries.  k, v: ``[B, S, K, D]`` keys/values, ``H % K == 0``.
      allowed: ``[B, T, S]`` bool, True where query ``t`` may attend key ``s``; with
        ``impl="splash"`` instead the ``[B, T]`` int32 ids of ``splash.segment_ids`` (the causal,
        ``window`` mask is the kernel's).
      causal: the caller guarantees ``T == S`` and ``allowed[:, t, s]`` is False for ``s > t`` (the
        full forward). Queries are then processed in chunks (``attention_chunks``), each against the
        keys up to its last query only, so the masked upper triangle is mostly never computed.
      impl: ``"portable"`` (the above) or ``"xla"`` / ``"cudnn"``: ``jax.nn.dot_product_attention``
        with that implementation, the same masked softmax (tested equal to the portable path); or
        ``"splash"``: Pallas splash attention (``models.splash``; TPU, interpreted elsewhere; only
        the full causal forward), equal on real tokens.
      window: the sliding window (``"splash"`` only; the other kernels read it from ``allowed``).
    Returns:
      ``[B, T, H, D]`` in ``q.dtype`` (``softmax_attention``). A query with no allowed key gets the
      mean of the values it was scored against (finite, never NaN).
    """
    if impl == "splash":
        if not causal:
            raise ValueError("splash attention serves the full causal forward only")
        return splash_attention(q, k, v, allowed, window=window)
    if impl != "portable":
        return fused_attention(q, k, v, allowed, impl)
    b, t, h, d = q.shape
    s, kh = k.shape[1], k.shape[2]
    qh = q.reshape(b, t, kh, h // kh, d).transpose(0, 2, 3, 1, 4)  # [B,K,G,T,D]
    kt = k.astype(q.dtype).transpose(0, 2, 1, 3)  # [B,K,S,D]
    vt = v.astype(q.dtype).transpose(0, 2, 1, 3)
    chunked = causal and t == s
    chunks = attention_chunks(t) if chunked else [(0, t)]
    outs = []
    for t0, t1 in chunks:
        s1 = t1 if chunked else s
        outs.append(
            softmax_attention(qh[:, :, :, t0:t1], kt[:, :, :s1], vt[:, :, :s1], allowed[:, t0:t1, :s1])
        )
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array, impl: str) -> jax.Array:
    """``attend`` through ``jax.nn.dot_product_attention(implementation=impl)`` (``"xla"`` or
    ``"cudnn"``: the platform's fused kernel). Same shapes and mask; a query with no allowed key gets
    the mean of the values, as in the portable path."""
    kt, vt = k.astype(q.dtype), v.astype(q.dtype)
    none = ~jnp.any(allowed, axis=-1)  # [B,T] queries with no allowed key (padding)
    mask = (allowed | none[:, :, None])[:, None]  # [B,1,T,S]: such a row attends everything...
    out = jax.nn.dot_product_attention(q, kt, vt, mask=mask, implementation=impl)
    h, kh = q.shape[2], k.shape[2]
    mean_v = jnp.repeat(jnp.mean(vt.astype(jnp.float32), axis=1), h // kh, axis=1)  # [B,H,D]
    out = jnp.where(none[:, :, None, None], mean_v[:, None].astype(out.dtype), out)  # ...uniformly
    return out.astype(q.dtype)


def window_mask(q_slots: jax.Array, k_slots: jax.Array, window: int | None) -> jax.Array:
    """``[..., T, S]`` causal (+ sliding window) mask from query slots ``[..., T]`` and key slots ``[S]``."""
    diff = q_slots[..., :, None] - k_slots[None, :]
    m = diff >= 0
    if window is not None:
        m = m & (diff < window)
    return m


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        e, h, k, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = Linear(e, h * d, bias=cfg.qkv_bias, cfg=cfg, rngs=rngs)
        self.k_proj = Linear(e, k * d, bias=cfg.qkv_bias, cfg=cfg, rngs=rngs)
        self.v_proj = Linear(e, k * d, bias=cfg.qkv_bias, cfg=cfg, rngs=rngs)
        self.o_proj = Linear(h * d, e, bias=cfg.o_bias, cfg=cfg, rngs=rngs)
        if cfg.qk_norm:
            self.q_norm = Norm(d, cfg, "rms")
            self.k_norm = Norm(d, cfg, "rms")
        else:
            self.q_norm = self.k_norm = None
        self.cfg = cfg

    def qkv(self, x, cos, sin):
        """Projects ``x [B,T,E]`` to rotated ``q [B,T,H,D]`` and ``k, v [B,T,K,D]``."""
        c = self.cfg
        b, t, _ = x.shape
        q, k, v = fused_dense(x, [self.q_proj, self.k_proj, self.v_proj])
        q = q.reshape(b, t, c.num_heads, c.head_dim)
        k = k.reshape(b, t, c.num_kv_heads, c.head_dim)
        v = v.reshape(b, t, c.num_kv_heads, c.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if cos is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q = constrain(q, ("batch", "length", "heads", None))
        k = constrain(k, ("batch", "length", "kv_heads", None))
        return q, k, v

    def out(self, o):
        b, t = o.shape[:2]
        return self.o_proj(o.reshape(b, t, -1))


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        e, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(e, f, bias=cfg.mlp_bias, cfg=cfg, rngs=rngs) if cfg.mlp == "gated" else None
        self.up_proj = Linear(e, f, bias=cfg.mlp_bias, cfg=cfg, rngs=rngs)
        self.down_proj = Linear(f, e, bias=cfg.mlp_bias, cfg=cfg, rngs=rngs)
        self.activation = cfg.activation

    def __call__(self, x):
        act = _act(self.activation)
        if self.gate_proj is not None:
            gate, up = fused_dense(x, [self.gate_proj, self.up_proj])
            h = act(gate) * up
        else:
            h = act(self.up_proj(x))
        h = constrain(h, ("batch", "length", "mlp"))
        return self.down_proj(h)


class Block(nnx.Module):
    """Pre-norm decoder block; sequential or parallel (GPT-NeoX) residual."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, rngs: nnx.Rngs):
        self.input_norm = Norm(cfg.hidden_size, cfg)
        self.attn = Attention(cfg, rngs)
        self.post_attn_norm = Norm(cfg.hidden_size, cfg)
        self.mlp = MLP(cfg, rngs)
        self.parallel = cfg.parallel_residual
        self.window = cfg.layer_window(layer_idx)
        self.attention_impl = cfg.attention

    def __call__(self, x, cos, sin, allowed, kv_fn=None, head_mask=None):
        """``x [B,T,E]``; ``allowed [B,T,S]`` (``[B,T]`` segment ids with the splash kernel and no
        cache); ``kv_fn(k, v) -> (k_all, v_all)`` merges a cache;
        ``head_mask [H]`` (optional) multiplies each head's attention output before ``o_proj``."""
        q, k, v = self.attn.qkv(self.input_norm(x), cos, sin)
        new_kv = (k, v)
        if kv_fn is not None:
            k, v, new_kv = kv_fn(k, v)
        # No cache: the full forward, whose mask is causal by construction (``Transformer.__call__``).
        # The KV-cache forward (decoding) keeps the portable kernel; the full forward can use a fused one.
        impl = self.attention_impl if kv_fn is None else "portable"
        o = attend(q, k, v, allowed, causal=kv_fn is None, impl=impl, window=self.window)  # [B,T,H,D]
        if head_mask is not None:
            o = o * head_mask.astype(o.dtype)[None, None, :, None]
        a = self.attn.out(o)
        if self.parallel:
            x = x + a + self.mlp(self.post_attn_norm(x))
        else:
            x = x + a
            x = x + self.mlp(self.post_attn_norm(x))
        return constrain(x, ("batch", "length", "embed")), new_kv


def positions_from_mask(attention_mask: jax.Array | None, segment_ids: jax.Array | None, shape) -> jax.Array:
    """``[B,T]`` int32 positions: per segment when packed, ``cumsum(mask) - 1`` (>= 0) otherwise."""
    b, t = shape
    if segment_ids is not None:
        seg = segment_ids
        idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        start = jnp.concatenate([jnp.ones((b, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
        start_idx = jax.lax.cummax(jnp.where(start, idx, 0), axis=1)
        return jnp.where(seg != 0, idx - start_idx, 0).astype(jnp.int32)
    if attention_mask is not None:
        return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1, 0)
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


class Transformer(nnx.Module):
    """A decoder-only LM (``head=None``) or scalar-head model (``head="scalar"``).

    Build with ``jaxrlhf.models.init`` / ``from_pretrained``; the ``config`` attribute is the
    frozen ``ModelConfig``.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c = self.config = config
        pd = jnp.dtype(c.param_dtype)
        self.embed = nnx.Param(_normal(0.02)(rngs.params(), (c.vocab_size, c.hidden_size), pd))
        if c.position == "learned":
            self.pos_embed = nnx.Param(
                _normal(0.01)(rngs.params(), (c.max_position_embeddings, c.hidden_size), pd)
            )
        else:
            self.pos_embed = None
        self.layers = nnx.List([Block(c, i, rngs) for i in range(c.num_layers)])
        self.final_norm = Norm(c.hidden_size, c)
        # Fresh reward/value head: normal(std=1/sqrt(E+1)) as TRL's value head; no bias (HF `score`).
        std = 1.0 / math.sqrt(c.hidden_size + 1)
        scalar = c.head == "scalar"
        self.score = Linear(c.hidden_size, 1, bias=False, cfg=c, rngs=rngs, std=std) if scalar else None
        untied = not scalar and not c.tie_word_embeddings
        self.lm_head = Linear(c.hidden_size, c.vocab_size, bias=False, cfg=c, rngs=rngs) if untied else None

    # ------------------------------------------------------------------ pieces
    def _embed(self, input_ids, positions):
        dt = jnp.dtype(self.config.dtype)
        # Gather the (vocab x fsdp sharded) table before the lookup, as FSDP does for every weight:
        # a lookup into the sharded table makes XLA replicate and re-partition its output.
        table = constrain(self.embed[...], (None, None))
        x = jnp.take(table, input_ids, axis=0).astype(dt)
        if self.pos_embed is not None:
            pos_table = constrain(self.pos_embed[...], (None, None))
            x = x + jnp.take(pos_table, positions, axis=0).astype(dt)
        return constrain(x, ("batch", "length", "embed"))

    def _rope(self, positions):
        if self.config.position != "rope":
            return None, None
        return rope_cos_sin(self.config, positions)

    def unembed(self, x: jax.Array) -> jax.Array:
        """Final norm + output head on a residual stream ``x [B,T,E]``: logits ``[B,T,V]`` (or
        scalars ``[B,T]``) float32. On an intermediate layer's residual this is the logit lens."""
        x = self.final_norm(x)
        if self.score is not None:
            return self.score(x, out_dtype=jnp.float32)[..., 0]  # [B,T] f32
        dt = jnp.dtype(self.config.dtype)
        if self.lm_head is not None:
            logits = self.lm_head(x, out_dtype=jnp.float32)
        else:
            logits = jnp.dot(x.astype(dt), self.embed[...].astype(dt).T, preferred_element_type=jnp.float32)
        return constrain(logits, ("batch", "length", "vocab"))

    # ------------------------------------------------------------------ full forward
    def __call__(
        self,
        input_ids,
        attention_mask=None,
        positions=None,
        segment_ids=None,
        *,
        head_mask=None,
        return_hidden: bool = False,
    ):
        """Full forward.

        Args:
          input_ids: ``[B, T]`` int token ids.
          attention_mask: ``[B, T]`` 1 real / 0 padding (left or right), optional.
          positions: ``[B, T]`` int positions; default from ``segment_ids`` / ``attention_mask``.
          segment_ids: ``[B, T]`` packed-example ids (0 = padding); attention never crosses them.
          head_mask: ``[L, H]`` float, optional: head ``h`` of layer ``l``'s attention output
            (``[B,T,D]``, before ``o_proj``) is multiplied by ``head_mask[l, h]``; 0 ablates the
            head, 1 keeps it. ``None`` (default) adds nothing to the trace.
          return_hidden: a Python bool (static): also return the residual streams.
        Returns:
          float32 logits ``[B, T, V]``, or float32 scalars ``[B, T]`` when ``head == "scalar"``.
          With ``return_hidden``: ``(out, hidden)``, ``hidden`` a tuple of ``L + 1`` arrays
          ``[B, T, E]`` in ``config.dtype``: the embedding output (positions included), then the
          residual stream after each block, all *before* the final norm (HF's
          ``output_hidden_states`` equal these except its last entry, which is after the final
          norm). ``unembed(hidden[l])`` is the logit lens; ``unembed(hidden[L]) == out``.
        """
        b, t = input_ids.shape
        if positions is None:
            positions = positions_from_mask(attention_mask, segment_ids, (b, t))
        key_ok = jnp.ones((b, t), bool)
        if attention_mask is not None:
            key_ok = key_ok & (attention_mask != 0)
        if segment_ids is not None:
            key_ok = key_ok & (segment_ids != 0)
        base = key_ok[:, None, :]
        if segment_ids is not None:
            base = base & (segment_ids[:, :, None] == segment_ids[:, None, :])
        slots = jnp.arange(t)
        x = self._embed(input_ids, positions)
        cos, sin = self._rope(positions)
        masks: dict[int | None, jax.Array] = {}
        hidden = [x]
        for i, layer in enumerate(self.layers):
            w = layer.window
            if w not in masks:  # splash: segment ids (the kernel applies its own causal/window mask)
                splash = layer.attention_impl == "splash"
                masks[w] = (
                    splash_segment_ids(key_ok, segment_ids)
                    if splash
                    else base & window_mask(slots, slots, w)[None]
                )
            hm = None if head_mask is None else head_mask[i]
            if self.config.remat:
                x, _ = nnx.remat(lambda blk, x, cos, sin, m, hm: blk(x, cos, sin, m, head_mask=hm))(
                    layer, x, cos, sin, masks[w], hm
                )
            else:
                x, _ = layer(x, cos, sin, masks[w], head_mask=hm)
            if return_hidden:
                hidden.append(x)
        out = self.unembed(x)
        return (out, tuple(hidden)) if return_hidden else out

    # ------------------------------------------------------------------ KV cache
    def init_cache(self, batch: int, max_len: int, dtype=None) -> list[dict[str, jax.Array]]:
        """Zeroed cache: one ``{"k", "v"}`` dict of ``[batch, max_len, K, D]`` per layer."""
        c = self.config
        dt = jnp.dtype(dtype or c.dtype)
        shape = (batch, max_len, c.num_kv_heads, c.head_dim)
        return [{"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt)} for _ in range(c.num_layers)]

    def decode(self, input_ids, positions, cache, cache_mask, index, *, head_mask=None):
        """Runs ``t`` new tokens against the cache (prefill when ``index == 0``).

        Args:
          input_ids: ``[B, t]`` new tokens, written at cache slots ``[index, index + t)``.
          positions: ``[B, t]`` their positions (``cumsum(mask) - 1`` of the whole row).
          cache: from ``init_cache``; ``S`` slots.
          cache_mask: ``[B, S]`` 1 on slots holding real tokens (the new slots included).
          index: int scalar (may be traced): first slot written.
          head_mask: ``[L, H]`` optional per-head multipliers, as in ``__call__``.
        Returns:
          ``(out, cache)``: logits ``[B, t, V]`` (or scalars ``[B, t]``) and the updated cache.
          Query at slot ``index + i`` attends slots ``s <= index + i`` with ``cache_mask[s] == 1``.
        """
        b, t = input_ids.shape
        s = cache[0]["k"].shape[1]
        index = jnp.asarray(index, jnp.int32)
        x = self._embed(input_ids, positions)
        cos, sin = self._rope(positions)
        q_slots = index + jnp.arange(t)
        k_slots = jnp.arange(s)
        base = (cache_mask != 0)[:, None, :]
        new_cache = []
        masks: dict[int | None, jax.Array] = {}
        for i, (layer, lc) in enumerate(zip(self.layers, cache, strict=True)):
            w = layer.window
            if w not in masks:
                masks[w] = base & window_mask(q_slots, k_slots, w)[None]

            def kv_fn(k, v, lc=lc):
                ck = jax.lax.dynamic_update_slice(lc["k"], k.astype(lc["k"].dtype), (0, index, 0, 0))
                cv = jax.lax.dynamic_update_slice(lc["v"], v.astype(lc["v"].dtype), (0, index, 0, 0))
                return ck, cv, {"k": ck, "v": cv}

            hm = None if head_mask is None else head_mask[i]
            x, lc_new = layer(x, cos, sin, masks[w], kv_fn, head_mask=hm)
            new_cache.append(lc_new)
        return self.unembed(x), new_cache


def count_params(params) -> int:
    """Total number of scalars in a pytree of arrays / ``nnx.State`` / module."""
    if isinstance(params, nnx.Module):
        params = nnx.state(params, nnx.Param)
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params) if hasattr(x, "shape")))


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) for a sequence of ``seq_len`` tokens.

    ``6 * N + 6 * L * T * H * D``: ``N`` = non-embedding matmul parameters (input embedding lookup
    excluded, the LM head / score matmul included) and the attention score + value matmuls
    (``2 * 2 * L * T * H * D`` forward per token, counted without causal halving, as in PaLM).
    Forward-only (generation) FLOPs are one third of this.
    """
    c = config
    e, h, k, d, f = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size
    attn = e * h * d + 2 * e * k * d + h * d * e
    mlp = (3 if c.mlp == "gated" else 2) * e * f
    head = e * (1 if c.head == "scalar" else c.vocab_size)
    n = c.num_layers * (attn + mlp) + head
    return float(6 * n + 6 * c.num_layers * seq_len * h * d)
