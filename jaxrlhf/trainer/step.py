"""A generic pure train step: micro-batch accumulation, non-finite skip, in-step EMA reference.

Every algorithm supplies two pure functions:

* ``denominators(batch) -> dict`` of global counts (tokens, pairs, ...) computed on the **whole**
  global batch before it is split, and
* ``loss_fn(params, ref_params, micro_batch, denoms, rng) -> (loss, metrics)`` whose loss and
  metrics are *contributions*: sums over the micro-batch divided by the global denominators.

Summing contributions over micro-batches therefore gives exactly the full-batch token (or pair)
mean, however the batch is split into micro-batches or sharded over devices and processes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxrlhf import losses
from jaxrlhf.trainer.guard import Guard, spikes, update_stats
from jaxrlhf.trainer.state import TrainState

LossFn = Callable[[Any, Any, dict, dict, jax.Array], tuple[jax.Array, dict]]


def split_micro_batches(batch: dict, num: int) -> dict:
    """``[B, ...] -> [num, B/num, ...]``; micro-batch ``m`` holds rows ``i`` with ``i % num == m``.

    Interleaving keeps each micro-batch spread over every device of a batch-sharded array, so the
    split moves no data between devices.
    """

    def one(x):
        if x.shape[0] % num:
            raise ValueError(f"batch of {x.shape[0]} rows is not divisible into {num} micro-batches")
        x = x.reshape(x.shape[0] // num, num, *x.shape[1:])
        return jnp.moveaxis(x, 1, 0)

    return jax.tree.map(one, batch)


def tree_all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def accumulate_gradients(loss_fn: LossFn, params, ref_params, batch, denoms, rng, num_micro_batches):
    """Summed loss contributions, metrics and gradients over ``num_micro_batches`` (a ``lax.scan``)."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if num_micro_batches == 1:
        (loss, metrics), grads = grad_fn(params, ref_params, batch, denoms, rng)
        return loss, metrics, grads
    micro = split_micro_batches(batch, num_micro_batches)
    rngs = jax.random.split(rng, num_micro_batches)
    mb0 = jax.tree.map(lambda x: x[0], micro)
    (_, metrics_shape), _ = jax.eval_shape(grad_fn, params, ref_params, mb0, denoms, rngs[0])
    zeros = lambda t: jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), t)
    init = (jnp.zeros((), jnp.float32), zeros(metrics_shape), zeros(jax.eval_shape(lambda: params)))

    def body(carry, xs):
        loss_acc, metrics_acc, grads_acc = carry
        mb, r = xs
        (loss, metrics), grads = grad_fn(params, ref_params, mb, denoms, r)
        add = lambda a, b: jax.tree.map(lambda x, y: x + y.astype(jnp.float32), a, b)
        return (loss_acc + loss, add(metrics_acc, metrics), add(grads_acc, grads)), None

    (loss, metrics, grads), _ = jax.lax.scan(body, init, (micro, rngs))
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    return loss, metrics, grads


def follow(ref_params, followed, applied: jax.Array, step: jax.Array, ema_decay: float, reset_every: int):
    """The reference after a step: an EMA of ``followed`` (``ema_decay`` < 1) when the update was
    applied, and reset to it every ``reset_every`` steps (> 0)."""
    if ema_decay < 1.0:
        ema = losses.ema_update(ref_params, followed, ema_decay)
        ref_params = jax.tree.map(lambda n, o: jnp.where(applied, n, o), ema, ref_params)
    if reset_every > 0:
        reset = (step + 1) % reset_every == 0
        ref_params = jax.tree.map(lambda p, r: jnp.where(reset, p.astype(r.dtype), r), followed, ref_params)
    return ref_params


def make_train_step(
    loss_fn: LossFn,
    denominators: Callable[[dict], dict],
    tx: optax.GradientTransformation,
    *,
    num_micro_batches: int = 1,
    ema_decay: float = 1.0,
    ref_reset_every: int = 0,
    ref_of: Callable[[Any], Any] = lambda params: params,
    views: Callable[[Any, Any, Any], tuple[Any, Any]] | None = None,
    guard_factor: float = 0.0,
    guard_warmup: int = 10,
    guard_decay: float = 0.9,
    guard_loss_factor: float = 0.0,
):
    """A pure ``step(state, batch) -> (state, metrics)``; jit it with shardings and donation.

    A non-finite loss or gradient leaves ``params``, ``opt_state`` and ``ref_params`` unchanged
    (``jnp.where``), increments ``skipped`` and ``consecutive_skips``; the caller stops the run
    after too many skips in a row. The reference follows ``losses.ema_update`` with ``ema_decay``
    (1.0: frozen) after each finite update, and is reset to the policy every ``ref_reset_every``
    steps when that is positive. ``ref_of(params)`` selects the subtree the reference mirrors
    (PPO trains ``{"actor", "critic"}`` and keeps a reference of the actor only).

    ``views(params, ref_params, frozen) -> (params, ref_params)`` gives what the loss sees when the
    state has a frozen part (LoRA: the base, with the adapters applied over it, ``lora.adapt``);
    gradients, the optimizer and the reference then cover the trainable ``params`` only.

    Divergence guard (``jaxrlhf.trainer.guard``; ``guard_factor > 0`` or ``guard_loss_factor > 0``,
    the state then has ``guard`` statistics, ``guard.init_stats``): once ``guard_warmup`` updates
    have been applied, a step whose gradient norm exceeds ``guard_factor`` times the running mean of
    the applied steps' gradient norms, or whose loss deviates from their running mean by more than
    ``guard_loss_factor`` times their running mean absolute deviation (EMAs, ``guard_decay``), is
    skipped like a non-finite one (state untouched, counted in ``skipped`` / ``consecutive_skips``,
    ``guard_spike`` logged; ``guard_loss_spike`` too with the loss criterion on).
    """
    guard = Guard(guard_factor, guard_warmup, guard_decay, guard_loss_factor)

    def step(state: TrainState, batch: dict):
        rng, step_rng = jax.random.split(state.rng)
        # the global counts of the batch, and the step counter (for losses with step schedules)
        denoms = {**denominators(batch), "step": state.step}
        fn = loss_fn
        if views is not None:
            if state.frozen is None:
                raise ValueError(
                    "config.lora.rank > 0 but the train state has no frozen base: the driver must split "
                    "its parameters with setup.lora_split and pass frozen= to setup.make_state"
                )
            frozen = jax.lax.stop_gradient(state.frozen)

            def fn(params, ref_params, mb, denoms, r):
                return loss_fn(*views(params, ref_params, frozen), mb, denoms, r)

        loss, metrics, grads = accumulate_gradients(
            fn, state.params, state.ref_params, batch, denoms, step_rng, num_micro_batches
        )
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & tree_all_finite(grads)
        grad_spike, loss_spike = spikes(state.guard, grad_norm, loss, guard)
        spike = grad_spike | loss_spike
        finite = finite & ~spike
        updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        params = keep(new_params, state.params)
        opt_state = keep(new_opt_state, state.opt_state)
        ref_params = state.ref_params
        if ref_params is not None:
            ref_params = follow(ref_params, ref_of(params), finite, state.step, ema_decay, ref_reset_every)
        skipped = (~finite).astype(jnp.int32)
        stats = state.guard
        if guard.enabled:
            stats = keep(update_stats(stats, grad_norm, loss, guard.decay), stats)
        new_state = state.replace(
            guard=stats,
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            ref_params=ref_params,
            rng=rng,
            skipped=state.skipped + skipped,
            consecutive_skips=jnp.where(finite, 0, state.consecutive_skips + 1),
        )
        metrics = dict(metrics)
        metrics.update(
            loss=loss,
            grad_norm=grad_norm,
            guard_spike=spike.astype(jnp.int32),
            param_norm=optax.global_norm(params),
            skipped=skipped,
        )
        if guard.loss_factor > 0:
            metrics["guard_loss_spike"] = loss_spike.astype(jnp.int32)
        return new_state, metrics

    return step
