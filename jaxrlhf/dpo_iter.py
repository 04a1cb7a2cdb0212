"""Iterative DPO (DPO-Iter, Xu et al. 2024 §5): sample, label with a reward, train DPO, repeat.

Each round samples ``k`` responses per prompt from the **current** policy with the jitted sampler,
scores them with the reward model or the programmatic reward (the same roles as PPO), keeps the
best and the worst response of each prompt as a (chosen, rejected) pair (prompts whose responses
all score the same are dropped and counted), and runs ``dpo_iter.steps_per_round`` DPO steps on the
fresh pairs with the ordinary DPO train step. The reference is reset to the policy at the start of
each round when ``dpo_iter.reset_reference`` (on-policy DPO-Iter), or follows ``config.ref``.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxrlhf.ppo import build_reward, gather, make_sampler, start_rollout_run
from jaxrlhf.sharding import shard_batch
from jaxrlhf.trainer import algorithms, checkpoint
from jaxrlhf.trainer.logger import Logger, mean_metrics
from jaxrlhf.trainer.loop import (
    TooManySkips,
    create_state,
    export_hf,
    jit_step,
    load_model,
    state_shardings,
)
from jaxrlhf.trainer.optim import make_optimizer
from jaxrlhf.trainer.step import make_train_step


def best_worst_pairs(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For ``scores [P*k]`` (prompt-major), indices of each prompt's best and worst sample.

    Returns ``(chosen_idx, rejected_idx, keep)``; ``keep`` is False where best == worst (a tie
    gives no preference). Ties in argmax/argmin resolve to the first sample.
    """
    s = scores.reshape(-1, k)
    best, worst = np.argmax(s, axis=1), np.argmin(s, axis=1)
    base = np.arange(s.shape[0]) * k
    keep = s[np.arange(s.shape[0]), best] > s[np.arange(s.shape[0]), worst]
    return base + best, base + worst, keep


def pairs_batch(
    seq: dict[str, np.ndarray], chosen: np.ndarray, rejected: np.ndarray
) -> dict[str, np.ndarray]:
    """A preference batch (``chosen_*``/``rejected_*`` keys) from rows of a sampled sequence batch."""
    out = {}
    for k, v in seq.items():
        out[f"chosen_{k}"] = v[chosen]
        out[f"rejected_{k}"] = v[rejected]
    out["margin"] = np.zeros(len(chosen), np.float32)
    return out


def validate(config) -> None:
    """Checks ``config.dpo_iter`` and the run-length keys up front, naming the key."""
    ic = config.dpo_iter
    for key in ("rounds", "prompts_per_round", "steps_per_round"):
        if ic[key] < 1:
            raise ValueError(f"config.dpo_iter.{key} must be >= 1, got {ic[key]}")
    if ic.samples_per_prompt < 2:
        raise ValueError(
            f"config.dpo_iter.samples_per_prompt must be >= 2 (best vs worst), got {ic.samples_per_prompt}"
        )
    if config.max_consecutive_skips < 1:
        raise ValueError(f"config.max_consecutive_skips must be >= 1, got {config.max_consecutive_skips}")


def run(config, workdir: str) -> dict[str, Any]:
    ic, gc = config.dpo_iter, config.generation
    mesh, tokenizer, prompts_ds, prompt_it = start_rollout_run(
        config, workdir, validate, ic.prompts_per_round
    )

    graphdef, params, _ = load_model(config, config.model, mesh)
    reward = build_reward(config, mesh, tokenizer, prompts_ds)
    loss_fn, denominators, _ = algorithms.build(config, graphdef, algorithm="dpo")
    total = ic.rounds * ic.steps_per_round
    tx, schedule = make_optimizer(config.optim, total)
    step_fn = make_train_step(
        loss_fn,
        denominators,
        tx,
        num_micro_batches=config.micro_batches,
        ema_decay=config.ref.ema_decay,
        ref_reset_every=config.ref.reset_every,
    )
    shardings = state_shardings(tx, params, mesh, with_ref=True)
    state = create_state(tx, params, shardings, with_ref=True, seed=config.seed)
    del params
    train_step = jit_step(step_fn, shardings, mesh)
    reset_ref = jax.jit(
        lambda s: s.replace(ref_params=jax.tree.map(jnp.copy, s.params)), out_shardings=shardings
    )
    sampler = make_sampler(graphdef, gc, tokenizer, mesh, state.params)

    manager = checkpoint.make_manager(workdir, config.checkpoint)
    restored = checkpoint.restore(manager, checkpoint.abstract_like(state, shardings))
    start = 0
    if restored is not None:
        start, state, saved = restored
        prompt_it.set_state(saved["data"])
    stop = checkpoint.StopSignal()
    log = Logger(workdir, ic.rounds, start, progress_bar=config.progress_bar)
    result: dict[str, Any] = {"interrupted": False, "history": []}
    rnd = start
    try:
        for rnd in range(start + 1, ic.rounds + 1):
            if ic.reset_reference:
                state = reset_ref(state)
            host = next(prompt_it)
            rep = {
                k: np.repeat(host[k], ic.samples_per_prompt, axis=0)
                for k in ("prompt_ids", "prompt_mask", "index")
            }
            prompts = shard_batch(mesh, {k: rep[k] for k in ("prompt_ids", "prompt_mask")})
            t0 = time.perf_counter()
            rng = jax.random.fold_in(jax.random.key(config.seed + 1), rnd)
            out = sampler(state.params, prompts["prompt_ids"], prompts["prompt_mask"], rng)
            seq = out.to_batch()
            jax.block_until_ready(seq)
            t_gen = time.perf_counter() - t0
            scores = np.asarray(
                jax.device_get(reward(seq, prompts["prompt_ids"].shape[1], gather_index(mesh, rep["index"])))
            )
            scores = scores - config.reward.missing_eos_penalty * gather(out.truncated).astype(np.float32)
            host_seq = {k: gather(v) for k, v in seq.items()}
            chosen, rejected, keep = best_worst_pairs(scores, ic.samples_per_prompt)
            n_pairs = int(keep.sum())
            usable = (n_pairs // config.batch_size) * config.batch_size
            metrics: dict[str, float] = {
                "round/reward_mean": float(scores.mean()),
                "round/pairs": float(n_pairs),
                "round/ties_dropped": float((~keep).sum()),
                "time/generate": t_gen,
            }
            if usable == 0:
                logging.warning("round %d: only %d pairs with distinct scores; no DPO step", rnd, n_pairs)
            else:
                pairs = pairs_batch(host_seq, chosen[keep][:usable], rejected[keep][:usable])
                rng_np = np.random.default_rng([config.seed, rnd])
                history = []
                t0 = time.perf_counter()
                n_batches = usable // config.batch_size
                for s in range(ic.steps_per_round):
                    if s % n_batches == 0:  # a fresh pass over the round's pairs
                        order = rng_np.permutation(usable)
                    j = s % n_batches
                    rows = order[j * config.batch_size : (j + 1) * config.batch_size]
                    local = local_rows(rows)
                    batch = shard_batch(mesh, {k: v[local] for k, v in pairs.items()})
                    state, m = train_step(state, batch)
                    history.append(m)
                consecutive = int(jax.device_get(state.consecutive_skips))
                if consecutive >= config.max_consecutive_skips:
                    raise TooManySkips(
                        f"DPO-Iter round {rnd}: {consecutive} consecutive steps had a non-finite loss"
                    )
                metrics.update({f"train/{k}": v for k, v in mean_metrics(history).items()})
                metrics["time/train"] = time.perf_counter() - t0
            metrics["lr"] = float(schedule(int(jax.device_get(state.step))))
            log.count_tokens(float(host_seq["loss_mask"].sum()), float(host_seq["attention_mask"].size))
            metrics = log.write(rnd, metrics, console=rnd % config.log_every == 0 or rnd == ic.rounds)
            result["history"].append(metrics)
            if rnd % config.checkpoint.every == 0 or stop.requested or rnd == ic.rounds:
                checkpoint.save(manager, rnd, state, {"data": prompt_it.get_state()}, force=True)
            if stop.requested:
                result["interrupted"] = True
                break
    finally:
        manager.wait_until_finished()
        stop.restore_handlers()
        log.close()
    result.update(step=rnd, state=state, graphdef=graphdef)
    if config.export_hf and not result["interrupted"]:
        result["export_dir"] = export_hf(graphdef, state.params, os.path.join(workdir, "hf"))
    return result


def local_rows(rows: np.ndarray) -> np.ndarray:
    """This process's contiguous part of a global list of rows."""
    n, p = len(rows), jax.process_count()
    per = n // p
    return rows[jax.process_index() * per : (jax.process_index() + 1) * per]


def gather_index(mesh, index: np.ndarray) -> np.ndarray:
    return gather(shard_batch(mesh, {"i": index})["i"])
