"""The divergence guard (``config.guard``): skip a step whose gradient norm or loss is far from the
running statistics of the updates applied so far, like a non-finite one (docs/reliability.md).

Statistics (``TrainState.guard``: float32 scalars, replicated; ``None`` when the guard is off, so
runs and checkpoints without it are unchanged):

* ``count``: updates applied so far; the guard judges nothing before ``warmup`` of them;
* ``grad_norm``: EMA (``decay``) of the applied updates' gradient norms ``g``;
* with ``loss_factor > 0`` also ``loss``: EMA of the applied losses ``L``, and ``loss_dev``: EMA of
  their absolute deviations ``|L - loss|`` from the mean before them (a mean absolute deviation).

Verdicts for a step with gradient norm ``g`` and loss ``L``, once ``count >= warmup``:

* gradient spike (``factor > 0``):  ``g > factor * grad_norm``;
* loss spike (``loss_factor > 0``): ``|L - loss| > loss_factor * max(loss_dev, 1e-6 |loss|)``.

The loss criterion is scale- and sign-free (PPO and GRPO losses are negative or near zero, so a
multiple of the mean would mean nothing); it is a robust z-score, as in median/MAD outlier tests.
The ``1e-6 |loss|`` floor keeps a constant loss (deviation 0) from flagging rounding noise.
Skipped steps do not enter the statistics.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

DEV_FLOOR = 1e-6  # relative floor of the loss deviation (a constant loss has deviation 0)


@dataclasses.dataclass(frozen=True)
class Guard:
    """``config.guard``: ``factor`` (gradient norm, 0 = off), ``warmup``, ``decay``, ``loss_factor``
    (loss, 0 = off)."""

    factor: float = 0.0
    warmup: int = 10
    decay: float = 0.9
    loss_factor: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.factor > 0 or self.loss_factor > 0

    @classmethod
    def from_config(cls, section) -> Guard:
        """From ``config.guard`` (a section without ``loss_factor``, from an older config, has it 0)."""
        loss_factor = section.get("loss_factor", 0.0) if hasattr(section, "get") else 0.0
        return cls(float(section.factor), int(section.warmup), float(section.decay), float(loss_factor))


def init_stats(guard: Guard) -> dict | None:
    """The statistics a fresh state carries (``None`` when the guard is off)."""
    if not guard.enabled:
        return None
    keys = ("count", "grad_norm") + (("loss", "loss_dev") if guard.loss_factor > 0 else ())
    return {k: jnp.zeros((), jnp.float32) for k in keys}


def spikes(stats, grad_norm: jax.Array, loss: jax.Array, guard: Guard) -> tuple[jax.Array, jax.Array]:
    """``(gradient spike, loss spike)``: boolean scalars (both False while warming up or when off)."""
    no = jnp.zeros((), bool)
    if not guard.enabled:
        return no, no
    warm = stats["count"] >= guard.warmup
    grad = warm & (grad_norm > guard.factor * stats["grad_norm"]) if guard.factor > 0 else no
    if guard.loss_factor <= 0:
        return grad, no
    if "loss" not in stats:
        raise ValueError(
            "config.guard.loss_factor > 0 but the train state has no loss statistics: create it with "
            "setup.make_state(guard=config.guard) (checkpoints saved without them cannot turn it on)"
        )
    dev = jnp.maximum(stats["loss_dev"], DEV_FLOOR * jnp.abs(stats["loss"]))
    return grad, warm & (jnp.abs(loss - stats["loss"]) > guard.loss_factor * dev)


def update_stats(stats, grad_norm: jax.Array, loss: jax.Array, decay: float):
    """The statistics after an applied update: ``count + 1`` and the EMAs (the first value starts
    each EMA; the first deviation is measured at the second update)."""
    count = stats["count"]
    ema = lambda old, new, start: jnp.where(count > start, decay * old + (1 - decay) * new, new)  # noqa: E731
    out = {"count": count + 1, "grad_norm": ema(stats["grad_norm"], grad_norm, 0)}
    if "loss" in stats:
        dev = jnp.where(count > 0, jnp.abs(loss - stats["loss"]), 0.0)
        out["loss"] = ema(stats["loss"], loss, 0)
        out["loss_dev"] = ema(stats["loss_dev"], dev, 1)
    return out


def describe(stats) -> str:
    """The statistics in words, for the message that stops a run."""
    if stats is None:
        return "divergence guard off"
    s = {k: float(v) for k, v in jax.device_get(stats).items()}
    text = f"guard statistics over {s['count']:.0f} applied updates: gradient norm mean {s['grad_norm']:.4g}"
    if "loss" in s:
        text += f", loss mean {s['loss']:.4g} (mean absolute deviation {s['loss_dev']:.4g})"
    return text
