"""Iterative DPO (DPO-Iter, Xu et al. 2024 §5): sample, label with a reward, train DPO, repeat.

Each round samples ``k`` responses per prompt from the **current** policy with the jitted sampler,
scores them with the reward model or the programmatic reward (the same roles as PPO), keeps the
best and the worst response of each prompt as a (chosen, rejected) pair (prompts whose responses
all score the same are dropped and counted), and runs ``dpo_iter.steps_per_round`` DPO steps on the
fresh pairs with the ordinary DPO train step. The reference is reset to the policy at the start of
each round when ``dpo_iter.reset_reference`` (on-policy DPO-Iter), or follows ``config.ref``.

No round is skipped silently: each pass over a round's pairs reshuffles all of them (the pairs a
pass leaves out fall into later passes); a round with fewer pairs than ``batch_size`` trains on one
smaller batch of what it has (rounded down to a multiple of the mesh's batch rows and
``micro_batches``; one extra compile per such size); every round logs the pairs made, used and
tied; a run that ends without a single DPO step is an error.
"""

from __future__ import annotations

import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxrlhf import config_sections as sections
from jaxrlhf import data as data_lib
from jaxrlhf import rollout
from jaxrlhf.algorithms import dpo
from jaxrlhf.algorithms.base import Algorithm
from jaxrlhf.distributed import gather, local_rows
from jaxrlhf.sharding import make_mesh, shard_batch
from jaxrlhf.trainer import harness, setup
from jaxrlhf.trainer.logger import mean_metrics


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


def round_batch_size(n_pairs: int, config, mesh) -> int:
    """Pairs per DPO step in a round with ``n_pairs`` pairs: ``config.batch_size``, or, when the
    round has fewer, the most pairs that split evenly over the mesh's batch rows, the processes
    and the micro-batches (0 when even that is more than the round has)."""
    if n_pairs >= config.batch_size:
        return config.batch_size
    rows = int(mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1))
    multiple = math.lcm(rows, jax.process_count(), config.micro_batches)
    return (n_pairs // multiple) * multiple


def train_round(trainable, state, pairs: dict, n_pairs: int, batch: int, config, rnd: int):
    """``steps_per_round`` DPO steps over the round's pairs; returns ``(state, metrics, pairs_used)``.

    Each pass over the pairs draws a fresh permutation of all of them and takes ``n_pairs // batch``
    batches, so the pairs one pass leaves out are drawn in the next."""
    rng = np.random.default_rng([config.seed, rnd])
    per_pass = n_pairs // batch
    used = np.zeros(n_pairs, bool)
    history = []
    for s in range(config.dpo_iter.steps_per_round):
        if s % per_pass == 0:
            order = rng.permutation(n_pairs)
        rows = order[(s % per_pass) * batch : (s % per_pass + 1) * batch]
        used[rows] = True
        host = {k: v[local_rows(rows)] for k, v in pairs.items()}
        state, m = trainable.step(state, shard_batch(trainable.mesh, host))
        history.append(m)
    return state, mean_metrics(history), int(used.sum())


def make_pairs(ph, state, host, config, mesh, rnd: int):
    """Sample, score and pair one round: ``(pairs, n_pairs, round metrics, host sequences)``."""
    ic = config.dpo_iter
    rep = rollout.repeat_prompts(host, ic.samples_per_prompt)
    rng = jax.random.fold_in(jax.random.key(config.seed + 1), rnd)
    full = setup.full_params(config, state.params, state.frozen)  # LoRA: adapters applied unmerged
    out, seq, t_gen = rollout.generate(ph["sampler"], full, rep, mesh, rng)
    del full
    index = rollout.global_index(mesh, rep["index"])
    scores = np.asarray(jax.device_get(ph["reward"](seq, rep["prompt_ids"].shape[1], index)))
    scores = scores - config.reward.missing_eos_penalty * gather(out.truncated).astype(np.float32)
    host_seq = {k: gather(v) for k, v in seq.items()}
    chosen, rejected, keep = best_worst_pairs(scores, ic.samples_per_prompt)
    pairs = pairs_batch(host_seq, chosen[keep], rejected[keep])
    metrics = {
        "round/reward_mean": float(scores.mean()),
        "round/pairs": float(keep.sum()),
        "round/ties_dropped": float((~keep).sum()),
        "time/generate": t_gen,
    }
    return pairs, int(keep.sum()), metrics, host_seq


def run(config, workdir: str, algorithm) -> dict[str, Any]:
    """Runs ``config.dpo_iter.rounds`` rounds of sample -> pair -> DPO in ``workdir``."""
    harness.start(config, algorithm)
    ic = config.dpo_iter
    run_ = harness.Run(config, workdir, algorithm, total=ic.rounds)
    mesh = make_mesh(config.mesh)
    tokenizer = data_lib.load_tokenizer(config.tokenizer)
    prompts_ds, prompt_it = rollout.prompt_data(config, tokenizer, ic.prompts_per_round)
    t = setup.build_offline(
        config, dpo.ALGORITHM, mesh, total_steps=ic.rounds * ic.steps_per_round,
        follow_reference=ic.reset_reference or None,  # LoRA: a reset reference keeps adapters
    )  # fmt: skip
    reset_ref = jax.jit(
        lambda s: s.replace(ref_params=jax.tree.map(jnp.copy, s.params)),
        out_shardings=t.shardings,
        donate_argnums=(0,),  # the state (and a LoRA run's frozen base) is not copied
    )
    full = setup.full_params(config, t.state.params, t.state.frozen)
    ph = {
        "sampler": rollout.config_sampler(t.graphdef, config.generation, tokenizer, mesh, full),
        "reward": rollout.build_reward(config, mesh, tokenizer, prompts_ds),
    }
    del full
    state = t.state
    with run_:
        start, state, side = run_.restore(
            state,
            t.shardings,
            {"data": prompt_it.get_state(), "dpo_steps": 0},
            check_side=lambda s: prompt_it.set_state(s["data"]),
        )
        prompt_it.set_state(side.pop("data"))
        for rnd in range(start + 1, ic.rounds + 1):
            if ic.reset_reference:
                state = reset_ref(state)
            pairs, n_pairs, metrics, host_seq = make_pairs(ph, state, next(prompt_it), config, mesh, rnd)
            batch = round_batch_size(n_pairs, config, mesh)
            metrics["round/batch_size"] = float(batch)
            metrics["round/pairs_used"] = 0.0
            if batch == 0:
                logging.warning("round %d: %d pairs with distinct scores, too few for one step", rnd, n_pairs)
            else:
                t0 = time.perf_counter()
                state, train_metrics, used = train_round(t, state, pairs, n_pairs, batch, config, rnd)
                metrics.update({f"train/{k}": v for k, v in train_metrics.items()})
                metrics.update({"round/pairs_used": float(used), "time/train": time.perf_counter() - t0})
                side["dpo_steps"] = int(side["dpo_steps"]) + ic.steps_per_round
            run_.check_skips(state, rnd)
            metrics["lr"] = float(t.schedule(int(jax.device_get(state.step))))
            run_.logger.count_tokens(
                float(host_seq["loss_mask"].sum()), float(host_seq["attention_mask"].size)
            )
            run_.log(rnd, metrics)
            if run_.end_iteration(rnd, state, dict(side, data=prompt_it.get_state())):
                break
    if not run_.result["interrupted"] and int(side["dpo_steps"]) == 0:
        raise RuntimeError(
            f"DPO-Iter took no DPO step in {ic.rounds} rounds: every round had fewer distinct-score pairs "
            "than one batch; raise dpo_iter.prompts_per_round or samples_per_prompt, or lower batch_size"
        )
    run_.result.update(state=state, graphdef=t.graphdef)
    run_.export(t.graphdef, state.params, state.frozen)
    return run_.result


ALGORITHM = Algorithm(
    name="dpo_iter",
    data_kind="prompt",
    head=None,
    uses_reference=True,
    run=run,
    unit="round",
    build_loss=dpo.build_loss,
    sections={"dpo": sections.dpo, "dpo_iter": sections.dpo_iter, "ref": sections.ref},
    run_keys=sections.batch_size_key,
    resumable_keys=("dpo_iter.rounds",),
)
