"""``TrainState``: the whole mutable state of a run as one explicit pytree."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class TrainState:
    """Everything a train step reads and writes.

    Attributes:
      step: int32 scalar, number of steps taken (skipped non-finite steps included).
      params: the trained parameters (pure dict, float32 master copy).
      opt_state: the optax state of ``params``.
      ref_params: the reference policy (EMA of ``params`` or frozen), or ``None`` when the
        algorithm has no reference (SFT, reward model).
      rng: a PRNG key, split inside the step.
      skipped: int32 scalar, number of steps skipped for a non-finite loss or gradient.
      consecutive_skips: int32 scalar, skips in a row (reset by a finite step).
      guard: the divergence guard's running statistics (``{"count", "grad_norm"}``, float32
        scalars) when ``config.guard.factor > 0``, else ``None``.
      frozen: parameters the step reads but never updates (LoRA: the base model; ``jaxrlhf.lora``),
        or ``None``. Not in the optimizer, not checkpointed (the harness reloads it from the base).
    """

    step: jax.Array
    params: Any
    opt_state: Any
    ref_params: Any
    rng: jax.Array
    skipped: jax.Array
    consecutive_skips: jax.Array
    frozen: Any = None
    guard: Any = None


def create(params: Any, tx, *, ref_params: Any = None, rng: jax.Array) -> TrainState:
    """A fresh state at step 0 (jit this with ``out_shardings`` to create it sharded)."""
    # One zero per field: called outside jit, a shared buffer could not be donated to a step.
    zero = lambda: jnp.zeros((), jnp.int32)
    return TrainState(
        step=zero(),
        params=params,
        opt_state=tx.init(params),
        ref_params=ref_params,
        rng=rng,
        skipped=zero(),
        consecutive_skips=zero(),
    )
