"""Activation divergence per layer: residual-stream cosine similarity and logit-lens KL.

For a model ``M`` and a base ``B`` run on the same tokens, at every layer ``l = 0 .. L`` (``0``:
the embedding output, ``l``: the residual stream after block ``l``, all before the final norm;
``Transformer(..., return_hidden=True)``) and every real token ``t``::

    cos_l(t) = <h^M_l(t), h^B_l(t)> / (|h^M_l(t)| |h^B_l(t)|)
    kl_l(t)  = KL(p^M_l(t) || p^B_l(t)),   p^X_l(t) = softmax(unembed_X(h^X_l(t)))

where ``unembed_X`` is model ``X``'s own final norm and LM head (the logit lens, nostalgebraist
2020); at ``l = L`` the lens is the model's real next-token distribution. Both are averaged over the
real tokens (``attention_mask``, or the response tokens ``loss_mask``) of all rows, and of each
label group's rows. References: Arike et al., "A Comparative Analysis of DPO and PPO" (activation
distance per layer, positive vs negative prompts).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def cosine_similarity(a: jax.Array, b: jax.Array, eps: float = 1e-12) -> jax.Array:
    """``<a, b> / (|a| |b|)`` over the last axis in float32: ``[..., E], [..., E] -> [...]``.

    0 where either vector is (numerically) zero.
    """
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    dot = jnp.sum(a * b, axis=-1)
    norms = jnp.sqrt(jnp.sum(a * a, axis=-1) * jnp.sum(b * b, axis=-1))
    return jnp.where(norms > eps, dot / jnp.maximum(norms, eps), 0.0)


def kl_from_logits(logits_p: jax.Array, logits_q: jax.Array) -> jax.Array:
    """``KL(softmax(logits_p) || softmax(logits_q)) = sum_v p_v (log p_v - log q_v)`` in float32:
    ``[..., V], [..., V] -> [...]`` (nats, >= 0)."""
    lp = jax.nn.log_softmax(logits_p.astype(jnp.float32), axis=-1)
    lq = jax.nn.log_softmax(logits_q.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1)


def _forward(graphdef, params, seq: dict):
    model = nnx.merge(graphdef, params)
    out, hidden = model(
        seq["input_ids"], seq["attention_mask"], positions=seq.get("positions"), return_hidden=True
    )
    return model, out, jnp.stack(hidden)  # [L+1, B, T, E]


def layer_token_stats(graphdef_m, params_m, graphdef_b, params_b, seq: dict) -> dict[str, jax.Array]:
    """Per-layer, per-token ``cos`` and ``kl`` (module doc) of model ``m`` against base ``b``.

    Args:
      graphdef_m, params_m, graphdef_b, params_b: two decoders (``nnx.split``) with the same number
        of layers and hidden size (their vocabularies must match for the KL).
      seq: ``input_ids``, ``attention_mask`` ``[B, T]`` (``positions`` optional).
    Returns:
      ``{"cos": [L+1, B, T], "kl": [L+1, B, T]}`` float32 (padding positions hold finite junk;
      mask them). The lens is applied one layer at a time (``lax.map``): memory ``O(B T V)``.
    """
    model_m, _, hm = _forward(graphdef_m, params_m, seq)
    model_b, _, hb = _forward(graphdef_b, params_b, seq)
    if hm.shape != hb.shape:
        raise ValueError(f"residual streams differ in shape: model {hm.shape}, base {hb.shape}")
    cos = cosine_similarity(hm, hb)
    kl = jax.lax.map(lambda h: kl_from_logits(model_m.unembed(h[0]), model_b.unembed(h[1])), (hm, hb))
    return {"cos": cos, "kl": kl}


_STATS = jax.jit(layer_token_stats, static_argnums=(0, 2))


def accumulate(
    sums: dict[str, dict[str, np.ndarray]],
    stats: dict[str, np.ndarray],
    mask: np.ndarray,
    groups: Sequence[str | None],
) -> None:
    """Adds one batch's masked per-layer sums to ``sums[group]`` (``"all"`` and each label).

    ``stats[k]``: ``[L+1, B, T]``; ``mask``: ``[B, T]`` 0/1; ``groups[b]``: row ``b``'s label
    (``None``: only ``"all"``). ``sums[g]`` holds ``tokens`` and ``{k}`` sums ``[L+1]`` float64.
    """
    mask = np.asarray(mask, np.float64)
    per_row = {k: np.einsum("lbt,bt->lb", np.asarray(v, np.float64), mask) for k, v in stats.items()}
    count = mask.sum(-1)
    for b, g in enumerate(groups):
        if count[b] == 0:
            continue
        for name in ("all",) if g is None else ("all", g):
            acc = sums.setdefault(name, {"tokens": np.zeros(()), **{k: 0.0 for k in per_row}})
            acc["tokens"] = acc["tokens"] + count[b]
            for k, v in per_row.items():
                acc[k] = acc[k] + v[:, b]


def finalize(sums: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{group: {"tokens": n, "cosine": [L+1], "kl": [L+1]}}`` means from ``accumulate``'s sums."""
    out = {}
    for g in sorted(sums, key=lambda s: (s != "all", s)):
        n = float(sums[g]["tokens"])
        out[g] = {
            "tokens": int(n),
            "cosine": (np.asarray(sums[g]["cos"]) / n).tolist(),
            "kl": (np.asarray(sums[g]["kl"]) / n).tolist(),
        }
    return out


def activation_divergence(
    model: tuple[Any, Any],
    base: tuple[Any, Any],
    batches: Iterable[tuple[dict[str, np.ndarray], np.ndarray]],
    *,
    labels: Sequence[str] | None = None,
    tokens: str = "all",
) -> dict[str, Any]:
    """Per-layer mean cosine similarity and logit-lens KL of ``model`` against ``base``.

    Args:
      model, base: ``(graphdef, params)`` pairs.
      batches: ``(seq, index)`` pairs (``inputs.sequence_batches``): ``seq`` holds ``input_ids``,
        ``attention_mask``, ``loss_mask``, ``positions`` ``[B, T]``; ``index [B]`` the dataset
        example of each row (-1: a padding row).
      labels: per dataset example, its group (``None``: no split).
      tokens: ``"all"`` (every real token) or ``"response"`` (``loss_mask`` tokens).
    Returns:
      ``{"layers": L + 1, "groups": {"all": {"tokens", "cosine": [L+1], "kl": [L+1]}, label: ...}}``.
    """
    if tokens not in ("all", "response"):
        raise ValueError(f"tokens must be 'all' or 'response', got {tokens!r}")
    sums: dict[str, dict[str, Any]] = {}
    n_layers = None
    for seq, index in batches:
        stats = jax.device_get(_STATS(model[0], model[1], base[0], base[1], seq))
        n_layers = stats["cos"].shape[0]
        mask = seq["attention_mask"] if tokens == "all" else seq["loss_mask"]
        mask = np.asarray(mask) * (np.asarray(index) >= 0)[:, None]
        groups = [None if (labels is None or i < 0) else str(labels[i]) for i in np.asarray(index)]
        accumulate(sums, stats, mask, groups)
    if not sums:
        raise ValueError("activation_divergence: no real tokens in the data")
    return {"layers": n_layers, "groups": finalize(sums)}
