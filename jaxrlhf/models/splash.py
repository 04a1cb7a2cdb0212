"""Pallas splash attention (TPU) for the full causal forward: ``config.model.attention="splash"``.

The kernel is JAX's ``jax.experimental.pallas.ops.tpu.splash_attention`` (the block-sparse
FlashAttention that MaxText and Tunix use on TPU). Here the attention mask is not a ``[B, T, S]``
bool array but what the kernel takes: a static causal (or causal sliding-window) mask and per-token
segment ids, a query attending a key only when both carry the same id. ``segment_ids`` builds those
ids so that real tokens see exactly what the portable kernel lets them see; each padding token gets
an id of its own, so it attends only itself (the portable kernel lets a padding query see other
keys or none: padding rows differ, real rows are equal — tested in ``tests/test_attention_impl.py``).

Off TPU the same kernel runs in Pallas's interpreter (plain JAX ops: slow, for tests on CPU). Under
a device mesh (``sharding.activation_mesh``) the kernel runs per batch shard in a ``shard_map``
(a Pallas call cannot be partitioned by XLA); heads are gathered within a shard.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jaxrlhf import sharding

BLOCK = 128  # the kernel's default block sizes: the length is padded up to a multiple of this


def segment_ids(key_ok: jax.Array, segments: jax.Array | None) -> jax.Array:
    """``[B, T]`` int32 ids for the kernel: a real token's packed-example id (1 when not packed),
    a padding token (``key_ok`` False) ``-(1 + t)``, an id no other token has."""
    b, t = key_ok.shape
    real = jnp.ones((b, t), jnp.int32) if segments is None else segments.astype(jnp.int32)
    pad = -(1 + jnp.arange(t, dtype=jnp.int32))[None]
    return jnp.where(key_ok, real, pad)


def _kernel(t: int, groups: int, window: int | None, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    if window is None:
        mask = sm.CausalMask((t, t))
    else:  # key s allowed for query q when q - window < s <= q (``modeling.window_mask``)
        mask = sm.LocalMask((t, t), window_size=(window - 1, 0), offset=0)
    return sk.make_splash_mqa_single_device(sm.MultiHeadMask([mask] * groups), interpret=interpret)


def _attend_local(q, k, v, seg, *, window: int | None, interpret: bool):
    """Per shard: ``q [B,T,H,D]``, ``k, v [B,T,K,D]``, ``seg [B,T]`` -> ``[B,T,H,D]``."""
    from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import SegmentIds

    b, t, h, d = q.shape
    kh = k.shape[2]
    tp = -(-t // BLOCK) * BLOCK
    if tp != t:  # padded positions: ids of their own, outputs dropped below
        widths = ((0, 0), (0, tp - t), (0, 0), (0, 0))
        q, k, v = (jnp.pad(x, widths) for x in (q, k, v))
        extra = -(1 + jnp.arange(t, tp, dtype=jnp.int32))
        seg = jnp.concatenate([seg, jnp.broadcast_to(extra, (b, tp - t))], axis=1)
    kernel = _kernel(tp, h // kh, window, interpret)
    scale = jnp.asarray(1.0 / math.sqrt(d), q.dtype)
    qh = (q * scale).reshape(b, tp, kh, h // kh, d).transpose(0, 2, 3, 1, 4)  # [B,K,G,T,D]
    kt, vt = (x.transpose(0, 2, 1, 3) for x in (k, v))  # [B,K,T,D]
    per_head = jax.vmap(kernel, in_axes=(0, 0, 0, None))  # over K: MQA kernel per KV head
    per_row = jax.vmap(lambda q, k, v, s: per_head(q, k, v, SegmentIds(q=s, kv=s)))
    out = per_row(qh, kt, vt, seg)  # [B,K,G,T,D]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, tp, h, d)[:, :t]


def attention(q, k, v, seg, *, window: int | None = None, interpret: bool | None = None) -> jax.Array:
    """Causal splash attention with GQA.

    Args:
      q: ``[B, T, H, D]`` queries; k, v: ``[B, T, K, D]``, ``H % K == 0`` (the full forward: keys
        are the same positions as queries).
      seg: ``[B, T]`` int32 ids (``segment_ids``): query ``t`` attends key ``s <= t`` (and
        ``s > t - window`` with a sliding window) when ``seg[t] == seg[s]``.
      window: sliding-window size, or None.
      interpret: run the Pallas kernel in the interpreter; default: on every backend but TPU.
    Returns:
      ``[B, T, H, D]`` in ``q.dtype``: ``softmax(q k^T / sqrt(D), masked) v``.
    """
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    f = functools.partial(_attend_local, window=window, interpret=interpret)
    mesh = sharding.active_mesh()
    if mesh is None or mesh.size == 1:
        return f(q, k, v, seg)
    rows = sharding.fit_spec(sharding.logical_spec(("batch",)), q.shape[:1], mesh)[0]
    p4, p2 = jax.sharding.PartitionSpec(rows, None, None, None), jax.sharding.PartitionSpec(rows, None)
    return jax.shard_map(f, mesh=mesh, in_specs=(p4, p4, p4, p2), out_specs=p4, check_vma=False)(q, k, v, seg)
