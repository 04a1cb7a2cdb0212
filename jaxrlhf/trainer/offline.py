"""The offline driver: SFT, reward models and the DPO family (any algorithm whose record has a
``build_loss`` and ``data_kind`` "sft" or "preference").

Read top to bottom: start -> mesh -> data -> setup (model, loss, optimizer, state, jitted step) ->
resume -> loop (step, log, evaluate, checkpoint) -> export. The loop's batches are prepared
``config.prefetch`` steps ahead in a background thread (``jaxrlhf.data.prefetch``).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np

from jaxrlhf import data as data_lib
from jaxrlhf.analysis import gradients
from jaxrlhf.data.prefetch import Prefetcher
from jaxrlhf.sharding import activation_mesh, make_mesh, replicated, shard_batch
from jaxrlhf.trainer import harness, setup
from jaxrlhf.trainer.logger import mean_metrics
from jaxrlhf.trainer.perf import StepClock


def batch_token_counts(batch: dict) -> tuple[float, float]:
    """(real, padded) token counts of this process's part of a batch."""
    masks = [v for k, v in batch.items() if k.endswith("attention_mask")]
    real = float(sum(np.sum(m) for m in masks))
    padded = float(sum(m.size for m in masks))
    return real, padded


def run(config, workdir: str, algorithm) -> dict[str, Any]:
    """Trains ``algorithm`` (an offline ``Algorithm`` record) in ``workdir``; returns the final
    metrics, history and state."""
    harness.start(config, algorithm)
    run_ = harness.Run(config, workdir, algorithm, total=config.total_steps)

    # ---------------- mesh, data ----------------
    mesh = make_mesh(config.mesh)
    logging_mesh(mesh)
    tokenizer = data_lib.load_tokenizer(config.tokenizer)
    train_it, eval_ds = setup.make_data(config, tokenizer, algorithm.data_kind, mesh)
    eval_every, eval_batches = config.eval_every, config.eval_batches  # 0: no evaluation
    if eval_every > 0 and eval_ds is None:
        raise ValueError("config.eval_every > 0 but config.data has no eval_split or eval_fraction")

    # ---------------- model, loss, optimizer, state, jitted step ----------------
    prepare = None
    if algorithm.prepare is not None:

        def prepare(graphdef, params):
            nonlocal eval_ds
            eval_ds, uses_ref = algorithm.prepare(config, graphdef, params, train_it, eval_ds, mesh)
            return uses_ref

    t = setup.build_offline(config, algorithm, mesh, total_steps=config.total_steps, prepare=prepare)
    eval_step = make_eval_step(t.loss_fn, t.denominators, mesh, t.views) if eval_ds is not None else None
    every, probe = make_probe(config, algorithm, t, mesh)

    # ---------------- resume, loop ----------------
    state = t.state
    with run_:
        start, state, side = run_.restore(
            state,
            t.shardings,
            {"data": train_it.get_state()},
            check_side=lambda s: train_it.set_state(s["data"]),
        )
        train_it.set_state(side["data"])
        evaluate = None
        if eval_step is not None and eval_every > 0:

            def evaluate(st):
                return run_eval(eval_step, st, eval_ds, config.batch_size, eval_batches, mesh)

        place, depth = functools.partial(shard_batch, mesh), int(config.prefetch)
        with Prefetcher(train_it, place, depth, first_step=start + 1) as batches:
            state = train_loop(config, run_, t, batches, start, state, evaluate, (every, probe))
    run_.result.update(memory=t.step.memory, state=state, graphdef=t.graphdef, model_config=t.model_config)
    run_.export(t.graphdef, state.params, state.frozen)
    return run_.result


def train_loop(config, run_, t, batches, start: int, state, evaluate, probe_at):
    """Steps ``start + 1 .. config.total_steps`` on the prepared batches (a ``Prefetcher``); logs
    every ``config.log_every`` steps, evaluates every ``config.eval_every`` (``evaluate(state)``),
    checkpoints with the iterator state of the last batch consumed. Returns the last state.

    The loop never waits for the device except at a logging point (one ``device_get`` of the
    window's metrics) and where a checkpoint, evaluation or probe needs values.
    """
    every, probe = probe_at
    clock = StepClock()
    history: list[dict] = []
    try:
        for step in range(start + 1, config.total_steps + 1):
            item = next(batches)
            if probe is not None and step % every == 0:  # the gradient at the state this step updates
                run_.log_analysis(step, probe(state, item.batch))
            state, metrics = t.step(state, item.batch)
            clock.dispatched(next(iter(metrics.values())))
            history.append(metrics)
            run_.logger.count_tokens(*batch_token_counts(item.host))
            if step % config.log_every == 0 or step == config.total_steps:
                log_window(run_, t, step, state, history, item, clock, batches)
                history = []
            if evaluate is not None and step % config.eval_every == 0:
                run_.result["eval"] = evaluate(state)
                run_.logger.write_prefixed(step, "eval", run_.result["eval"])
            if run_.end_iteration(step, state, {"data": item.state}):
                break
    finally:
        clock.close()
    return state


def log_window(run_, t, step: int, state, history: list, item, clock, batches) -> None:
    """One logging point: the window's mean metrics, learning rate, padding, compiles and
    ``perf/host_fraction`` (``jaxrlhf.trainer.perf``); ``perf/data_wait_s``: seconds the loop
    waited for prepared batches in the window."""
    host = mean_metrics(history)  # the one device sync of the window
    applied = int(jax.device_get(state.step)) - int(jax.device_get(state.skipped))
    host["lr"] = float(t.schedule(applied))
    host["data/padding_fraction"] = item.padding_fraction
    host["skipped_total"] = float(jax.device_get(state.skipped))
    host["perf/compiles"], host["perf/compile_s"] = float(t.step.compiles), t.step.compile_s
    host["perf/host_fraction"] = clock.host_fraction()
    host["perf/data_wait_s"], batches.wait_s = batches.wait_s, 0.0
    run_.log(step, host, console=True)
    run_.check_skips(state, step)


def logging_mesh(mesh) -> None:
    from absl import logging

    logging.info("mesh: %s over %d devices (%d processes)", dict(mesh.shape), mesh.size, jax.process_count())


def make_probe(config, algorithm, t, mesh):
    """``(every, probe)``: with ``config.analysis.every > 0`` and an algorithm that has a probe,
    ``probe(state, batch) -> metrics`` (the gradient decomposition of ``algorithm.probe`` plus the
    target stability of the trainable parameters); else ``(0, None)``: no cost."""
    every = config.analysis.every if algorithm.probe is not None else 0
    if every <= 0:
        return 0, None
    decompose = algorithm.probe(config, t.graphdef)

    def fn(params, ref_params, frozen, batch):
        if t.views is not None and frozen is not None:  # LoRA: the adapters' gradient
            params, ref_params = t.views(params, ref_params, frozen)
        with activation_mesh(mesh):
            return decompose(params, ref_params, batch)

    jitted = jax.jit(fn, out_shardings=replicated(mesh))
    stability = gradients.TargetStability(t.state.params)

    def probe(state, batch) -> dict[str, float]:
        out = {
            k: float(v)
            for k, v in jax.device_get(jitted(state.params, state.ref_params, state.frozen, batch)).items()
        }
        return {**out, **stability.update(state.params)}

    return every, probe


def make_eval_step(loss_fn, denominators, mesh, views=None):
    """The loss and metrics on an evaluation batch (no update); ``views``: LoRA (``setup.lora_views``)."""

    def eval_fn(params, ref_params, frozen, batch):
        if views is not None and frozen is not None:
            params, ref_params = views(params, ref_params, frozen)
        with activation_mesh(mesh):
            loss, metrics = loss_fn(params, ref_params, batch, denominators(batch), jax.random.key(0))
        return {**metrics, "loss": loss}

    return jax.jit(eval_fn, out_shardings=replicated(mesh))


def run_eval(eval_step, state, eval_ds, batch_size: int, eval_batches: int, mesh) -> dict[str, float]:
    """Mean metrics over the first ``eval_batches`` batches of the eval split (in order)."""
    it = data_lib.BatchIterator(eval_ds, batch_size, shuffle=False, repeat=False, packing=False)
    history = []
    for i, host in enumerate(it):
        if i >= eval_batches:
            break
        history.append(eval_step(state.params, state.ref_params, state.frozen, shard_batch(mesh, host)))
    return mean_metrics(history)
