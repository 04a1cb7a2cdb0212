"""Gradient decomposition during training (Wang et al., "What Is Preference Optimization Doing, How
and Why?"): positive vs negative learning and the TOP / MID / BOT thirds of the data by loss weight.

A DPO or PPO update is a weighted sum over units (DPO: the chosen and rejected term of each pair;
PPO/GRPO: response tokens) with weights held fixed at the current parameters::

    g_total = sum_u c_u grad f_u(theta)          (c_u = stop_gradient(weight), f_u the unit's term)

so the gradient of a *part* P (a 0/1 mask over the units) is ``grad sum_u m_u c_u f_u`` and the
parts of a partition add up to the total exactly: ``g_pos + g_neg = g_total``. An algorithm gives
``surrogate(params, mask) -> scalar`` (linear in ``mask``) and the masks; ``decompose`` returns the
logged norms and cosines. ``TargetStability`` tracks how the update direction moves between
probing windows.

- DPO (and variants): units = (pair, side); ``c = w_i`` with ``w_i = d loss_i / d h_i`` the
  per-pair loss weight (sigmoid DPO: ``-beta * sigmoid(-beta h_i)``); positive = chosen terms,
  negative = rejected terms; thirds = pairs ranked by ``|w_i|``.
- PPO / GRPO: units = valid response tokens of the clipped policy loss; positive = tokens with
  ``A > 0``, negative = ``A < 0`` (``A = 0`` tokens carry no gradient); thirds = tokens ranked by
  ``|A|``, logged with their mean raw advantage.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxrlhf import losses
from jaxrlhf.analysis.trees import tree_cosine, tree_norm

PARTS = ("pos", "neg", "top", "mid", "bot")


def thirds(score: jax.Array, valid: jax.Array) -> dict[str, jax.Array]:
    """The TOP/MID/BOT masks of ``losses.rank_thirds`` (the same ranking the coordination knobs use)."""
    return losses.rank_thirds(score, valid)


def decompose(surrogate: Callable[[Any, Any], jax.Array], params: Any, masks: dict[str, Any]) -> dict:
    """Norms and cosines of the part gradients ``grad surrogate(params, masks[part])``.

    ``masks`` holds ``"total"`` (every unit) and any of ``PARTS``; returns
    ``analysis/grad_norm_<part>``, ``analysis/grad_cos_<part>_total`` and, with both ``pos`` and
    ``neg``, ``analysis/grad_cos_pos_neg`` (float32 scalars).
    """
    grads = {k: jax.grad(surrogate)(params, m) for k, m in masks.items()}
    out = {f"analysis/grad_norm_{k}": tree_norm(g) for k, g in grads.items()}
    for k, g in grads.items():
        if k != "total":
            out[f"analysis/grad_cos_{k}_total"] = tree_cosine(g, grads["total"])
    if "pos" in grads and "neg" in grads:
        out["analysis/grad_cos_pos_neg"] = tree_cosine(grads["pos"], grads["neg"])
    return out


def decompose_by_advantage(surrogate, params, valid: jax.Array, adv: jax.Array, raw_adv: jax.Array) -> dict:
    """PPO/GRPO: ``decompose`` over response tokens, positive / negative by the sign of ``adv``
    ``[B, T]`` and TOP/MID/BOT by ``|adv|``, plus each third's mean ``raw_adv``
    (``analysis/adv_mean_<third>``)."""
    masks = {"total": valid, "pos": valid * (adv > 0), "neg": valid * (adv < 0)}
    masks.update(thirds(jnp.abs(adv), valid))
    out = decompose(surrogate, params, masks)
    for k in ("top", "mid", "bot"):
        out[f"analysis/adv_mean_{k}"] = jnp.sum(masks[k] * raw_adv) / jnp.maximum(jnp.sum(masks[k]), 1.0)
    return out


def decompose_by_pair_weight(surrogate, params, weight: jax.Array) -> dict:
    """The DPO family: ``decompose`` over pairs, positive (chosen terms) / negative (rejected terms)
    and TOP/MID/BOT pairs by ``|weight|`` ``[P]`` (the per-pair loss weight), plus each third's mean
    ``|weight|`` (``analysis/weight_mean_<third>``). ``surrogate(params, (chosen_mask, rejected_mask))``."""
    one, zero = jnp.ones_like(weight), jnp.zeros_like(weight)
    masks = {"total": (one, one), "pos": (one, zero), "neg": (zero, one)}
    masks.update({k: (m, m) for k, m in thirds(jnp.abs(weight), one).items()})
    out = decompose(surrogate, params, masks)
    for k in ("top", "mid", "bot"):
        m = masks[k][0]
        out[f"analysis/weight_mean_{k}"] = jnp.sum(m * jnp.abs(weight)) / jnp.maximum(m.sum(), 1)
    return out


class TargetStability:
    """Cosines of the update over each probing window with the previous window's update
    (``analysis/update_cos_prev_window``) and with the displacement from the start of training
    (``analysis/update_cos_from_start``): stable targets keep both near 1.

    A window with no update (parameters unchanged, e.g. a probe before the first step) logs neither
    cosine (a cosine with a zero vector is undefined) and is skipped: the next window is compared
    with the last window that had an update.

    Holds three parameter-sized copies (start, window anchor, previous update) while probing.
    """

    def __init__(self, params):
        copy = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(jnp.float32), p))
        self._copy = copy
        self.start = copy(params)
        self.anchor = self.start
        self.prev = None
        self._delta = jax.jit(lambda a, b: jax.tree.map(lambda x, y: x.astype(jnp.float32) - y, a, b))

    def update(self, params) -> dict[str, float]:
        delta = self._delta(params, self.anchor)
        self.anchor = self._copy(params)
        if float(tree_norm(delta)) == 0.0:
            return {}
        out = {"analysis/update_cos_from_start": float(tree_cosine(delta, self._delta(params, self.start)))}
        if self.prev is not None:
            out["analysis/update_cos_prev_window"] = float(tree_cosine(delta, self.prev))
        self.prev = delta
        return out
