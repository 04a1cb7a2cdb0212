"""Attention-head ablation: zero one head's output and measure the loss and the reward.

Ablating head ``h`` of layer ``l`` multiplies its attention output (``[B, T, D]``, before the output
projection ``o_proj``) by 0: ``Transformer(..., head_mask=m)`` with ``m[l, h] = 0`` and ones
elsewhere (``single_head_mask``). The same model is ``ablate_params``: the rows
``h*D:(h+1)*D`` of layer ``l``'s ``o_proj`` kernel ``[H*D, E]`` set to zero (the bias, if any,
kept); generation uses that form, so the sampler needs no head mask.

Per head, against the unablated model:

* ``delta_loss``: change in the token-mean negative log-likelihood (nats) of the dataset's
  ``loss_mask`` tokens (``inputs.sequence_batches``);
* ``delta_reward``: change in the mean reward of one generation per prompt, sampled with the same
  random numbers (same seed per batch) for every ablation, so the differences are paired.

References: Michel et al., "Are Sixteen Heads Really Better than One?" (2019); Arike et al., "A
Comparative Analysis of DPO and PPO" (heads carrying sentiment).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrlhf import losses
from jaxrlhf.sharding import path_str


def single_head_mask(num_layers: int, num_heads: int, layer: int | None = None, head: int | None = None):
    """``[L, H]`` float32 ones, with a 0 at ``(layer, head)`` when given."""
    m = np.ones((num_layers, num_heads), np.float32)
    if layer is not None:
        m[layer, head] = 0.0
    return m


def ablate_params(params: Any, head_mask: Any, head_dim: int) -> Any:
    """``params`` with each layer's ``o_proj`` kernel rows scaled by its head's ``head_mask`` entry.

    ``kernel[l] [H*D, E] -> kernel[l] * repeat(head_mask[l], D)[:, None]``; every other parameter
    unchanged. Equals ``Transformer(..., head_mask=head_mask)`` on the original params.
    """
    head_mask = jnp.asarray(head_mask)

    def one(path, x):
        parts = path_str(path).split("/")
        if len(parts) >= 5 and parts[0] == "layers" and parts[2:] == ["attn", "o_proj", "kernel"]:
            rows = jnp.repeat(head_mask[int(parts[1])], head_dim).astype(x.dtype)
            return x * rows[:, None]
        return x

    return jax.tree_util.tree_map_with_path(one, params)


def nll_sums(graphdef, params, seq: dict, head_mask) -> tuple[jax.Array, jax.Array]:
    """``(sum of -log p over loss_mask tokens, their count)`` float32 scalars of one batch."""
    model = nnx.merge(graphdef, params)
    logits = model(seq["input_ids"], seq["attention_mask"], positions=seq["positions"], head_mask=head_mask)
    logps, mask = losses.shifted_logprobs(logits, seq["input_ids"], seq["loss_mask"])
    return -jnp.sum(logps), jnp.sum(mask).astype(jnp.float32)


_NLL = jax.jit(nll_sums, static_argnums=0)
_ABLATE = jax.jit(ablate_params, static_argnums=2)


def dataset_loss(graphdef, params, batches: Sequence[tuple[dict, np.ndarray]], head_mask) -> float:
    """Token-mean NLL over every batch (``nll_sums`` summed, then divided)."""
    total, count = 0.0, 0.0
    for seq, _ in batches:
        s, n = _NLL(graphdef, params, seq, head_mask)
        total, count = total + float(s), count + float(n)
    if count == 0:
        raise ValueError("dataset_loss: no loss tokens in the data")
    return total / count


def mean_reward(
    sampler, params, prompt_batches: Sequence[dict], reward: Callable, seed: int
) -> tuple[float, np.ndarray]:
    """``(mean, per-prompt scores)`` of one sample per real prompt; batch ``b`` uses rng
    ``fold_in(key(seed), b)`` whatever the params, so two calls are paired sample for sample."""
    scores = []
    for b, batch in enumerate(prompt_batches):
        rng = jax.random.fold_in(jax.random.key(seed), b)
        gen = sampler(params, jnp.asarray(batch["prompt_ids"]), jnp.asarray(batch["prompt_mask"]), rng)
        s = np.asarray(reward(gen, batch["index"]), np.float64)
        scores.append(s[np.asarray(batch["index"]) >= 0])
    scores = np.concatenate(scores)
    return float(scores.mean()), scores


def ranking(delta: np.ndarray, *, descending: bool) -> list[dict[str, Any]]:
    """``[{"layer", "head", "delta"}, ...]`` of an ``[L, H]`` array, largest (or smallest) first;
    ties keep (layer, head) order."""
    flat = delta.reshape(-1)
    order = np.argsort(-flat if descending else flat, kind="stable")
    h = delta.shape[1]
    return [{"layer": int(i // h), "head": int(i % h), "delta": float(flat[i])} for i in order]


def head_ablation(
    graphdef,
    params,
    *,
    seq_batches: Sequence[tuple[dict, np.ndarray]] | None = None,
    prompt_batches: Sequence[dict] | None = None,
    sampler=None,
    reward: Callable | None = None,
    seed: int = 0,
    heads: Iterable[tuple[int, int]] | None = None,
) -> dict[str, Any]:
    """Ablates every head (or ``heads``) in turn; see the module doc.

    Args:
      graphdef, params: the model (``nnx.split``).
      seq_batches: ``inputs.sequence_batches`` (a list) for the loss; ``None`` skips it.
      prompt_batches, sampler, reward: ``inputs.prompt_batches`` (a list), a
        ``generation.make_sampler`` for this model, and ``inputs.make_reward``; ``None`` skips it.
      seed: sampling seed (the same for every ablation).
      heads: ``(layer, head)`` pairs to ablate (default: all).
    Returns:
      ``{"num_layers", "num_heads", "base": {"loss", "reward"}, "loss": [L][H], "delta_loss":
      [L][H], "reward": [L][H], "delta_reward": [L][H], "rank_by_loss": [...] (largest loss
      increase first), "rank_by_reward": [...] (largest reward drop first)}``; entries of skipped
      measurements or heads are ``None`` / NaN.
    """
    cfg = nnx.merge(graphdef, params).config
    n_l, n_h = cfg.num_layers, cfg.num_heads
    heads = list(heads) if heads is not None else [(i, j) for i in range(n_l) for j in range(n_h)]
    do_loss = seq_batches is not None
    do_reward = prompt_batches is not None and sampler is not None and reward is not None
    if not (do_loss or do_reward):
        raise ValueError("head_ablation: give seq_batches (loss) and/or prompt_batches + sampler + reward")
    loss = np.full((n_l, n_h), np.nan)
    rew = np.full((n_l, n_h), np.nan)
    base: dict[str, Any] = {"loss": None, "reward": None}
    ones = single_head_mask(n_l, n_h)
    if do_loss:
        base["loss"] = dataset_loss(graphdef, params, seq_batches, ones)
    if do_reward:
        base["reward"] = mean_reward(sampler, params, prompt_batches, reward, seed)[0]
    for layer, head in heads:
        mask = single_head_mask(n_l, n_h, layer, head)
        if do_loss:
            loss[layer, head] = dataset_loss(graphdef, params, seq_batches, mask)
        if do_reward:
            ablated = _ABLATE(params, mask, cfg.head_dim)
            rew[layer, head] = mean_reward(sampler, ablated, prompt_batches, reward, seed)[0]
    out: dict[str, Any] = {"num_layers": n_l, "num_heads": n_h, "base": base}
    for name, arr, b, desc in (("loss", loss, base["loss"], True), ("reward", rew, base["reward"], False)):
        out[name] = _nested(arr)
        delta = arr - (np.nan if b is None else b)
        out[f"delta_{name}"] = _nested(delta)
        valid = ~np.isnan(delta)
        ranked = ranking(np.where(valid, delta, -np.inf if desc else np.inf), descending=desc)
        out[f"rank_by_{name}"] = [r for r in ranked if valid[r["layer"], r["head"]]]
    return out


def _nested(a: np.ndarray) -> list[list[float | None]]:
    return [[None if np.isnan(v) else float(v) for v in row] for row in a]
