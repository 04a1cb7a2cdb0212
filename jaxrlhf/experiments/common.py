r"""Pieces shared by the experiments (E2-E7): sizes of the synthetic-review pipeline, its per-seed
stages, training a config into a directory, scoring checkpoints, and the statistics over seeds
(mean, sample std, 95% Student-t interval; the measured upper envelope at a KL target).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import time
from typing import Any

import numpy as np

from jaxrlhf import quickstart as q

# The reviews pipeline at reduced size (E2, E3, E6, E7 start from it): "mini" keeps the quickstart's model (64-wide, 2-layer Llama) but trains ~1/4 as long, so
# that E2 and E3 with 3 seeds each fit ~15 min on 2 shared CPU cores (the quickstart's "full" size
# would take ~7 min per seed and method sweep).
MINI = dataclasses.replace(
    q.SIZES["full"],
    n_sft=2000,
    n_train_prompts=256,
    n_eval_prompts=256,
    sft_steps=150,
    rm_steps=40,
    dpo_steps=40,
    rm_eval_fraction=0.2,  # >= one 32-pair eval batch from ~250 pairs
    dpo_lr=5e-4,
    ppo_iterations=5,
    ppo_rollout_batch=128,
    ppo_minibatch=32,
    ppo_epochs=2,
    ppo_lr=2e-4,
    progress_bar=False,
)


def register_size(base: q.Sizes, prefix: str, seed: int) -> str:
    """Registers ``base`` with ``seed`` as ``<prefix>_s<seed>`` in ``quickstart.SIZES`` (the stage
    configs read sizes by name); returns the name."""
    name = f"{prefix}_s{seed}"
    q.SIZES[name] = dataclasses.replace(base, seed=seed)
    return name


def seed_paths(root: str, seed: int) -> q.Paths:
    return q.Paths(os.path.join(root, f"seed{seed}"))


def base_stages(size_name: str, p: q.Paths, stages=("data", "sft", "pairs", "reward", "dpo")) -> dict:
    """Runs the quickstart stages ``stages`` in ``p.workdir`` (a finished stage is skipped)."""
    s = q.SIZES[size_name]
    os.makedirs(p.workdir, exist_ok=True)
    out = {}
    for stage in stages:
        if q.stage_done(stage, p):
            continue
        t0 = time.perf_counter()
        if stage == "data":
            out[stage] = q.stage_data(s, p)
        elif stage == "pairs":
            out[stage] = q.stage_pairs(s, p)
        else:
            out[stage] = q.train_stage(stage, size_name, p)
        print(f"  [{p.workdir}] {stage}: {time.perf_counter() - t0:.1f}s", flush=True)
    return out


def train(config, stage_dir: str) -> str:
    """``registry.run(config, stage_dir)`` unless its HF export exists; returns the export directory."""
    from jaxrlhf import registry

    export = os.path.join(stage_dir, "hf")
    if not os.path.exists(os.path.join(export, "config.json")):
        t0 = time.perf_counter()
        result = registry.run(config, stage_dir)
        if result.get("interrupted"):
            raise KeyboardInterrupt(f"{stage_dir}: stopped by a signal; rerun to resume")
        print(f"  [{stage_dir}]: {time.perf_counter() - t0:.1f}s", flush=True)
    return export


class CheckpointEvaluator:
    """Gold score and KL to SFT of policies given as parameters, on the held-out prompts of
    ``config.data``: one sampled completion per prompt (``config.generation``, the same sampling key
    for every policy), KL = ``sum_t log pi(y_t) - log pi_sft(y_t)`` on those samples; one sampler and
    one log-prob compile for every checkpoint (``quickstart.compare_policies`` with parameters in
    place of directories). When the judge is the reviews gold scorer, each result also carries the
    degeneracy statistics of the samples (``jaxrlhf.tasks.degeneracy.row_fields``)."""

    def __init__(self, config, sft_dir: str, batch_size: int, seed: int):
        import jax

        from jaxrlhf import data as data_lib
        from jaxrlhf import evaluate, rollout
        from jaxrlhf.algorithms.common import response_logps
        from jaxrlhf.sharding import make_mesh
        from jaxrlhf.tasks import degeneracy

        self.mesh = make_mesh(config.mesh)
        tokenizer = data_lib.load_tokenizer(config.tokenizer)
        self.ds, _ = data_lib.build_datasets(config.data, tokenizer, "prompt")
        self.batch = min(batch_size, len(self.ds))
        self.judge = rollout.build_reward(config, self.mesh, tokenizer, self.ds)
        self.tokenizer = tokenizer
        self.reviews_judge = config.reward.fn == degeneracy.REVIEWS_REWARD
        self.graphdef, self.sft_params = evaluate.load_policy(sft_dir, config.model.dtype, self.mesh)
        self.sampler = rollout.config_sampler(
            self.graphdef, config.generation, tokenizer, self.mesh, self.sft_params
        )
        self.logps = jax.jit(lambda params, seq: response_logps(self.graphdef, params, seq))
        self.seed = seed

    def params_from_flat(self, flat: dict[str, np.ndarray]):
        """The SFT parameter tree with every leaf replaced by ``flat[path]`` (same sharding)."""
        import jax

        from jaxrlhf.sharding import path_str

        def leaf(path, x):
            return jax.device_put(np.asarray(flat[path_str(path)], dtype=x.dtype), x.sharding)

        return jax.tree_util.tree_map_with_path(leaf, self.sft_params)

    def __call__(self, params) -> dict[str, float]:
        import jax

        from jaxrlhf import data as data_lib
        from jaxrlhf import evaluate, rollout
        from jaxrlhf.distributed import gather
        from jaxrlhf.sharding import shard_batch
        from jaxrlhf.tasks import degeneracy

        it = data_lib.BatchIterator(
            self.ds, self.batch, shuffle=False, repeat=False, process_index=0, process_count=1
        )
        scores, kls, lengths, prompts_text, responses_text = [], [], [], [], []
        for b, host in enumerate(it):
            prompts = shard_batch(self.mesh, {k: host[k] for k in ("prompt_ids", "prompt_mask")})
            rng = jax.random.fold_in(jax.random.key(self.seed), b)
            gen = self.sampler(params, prompts["prompt_ids"], prompts["prompt_mask"], rng)
            seq = rollout.response_sequences(
                prompts["prompt_ids"], prompts["prompt_mask"], gen.response_ids, gen.response_mask
            )
            scores.append(
                np.asarray(jax.device_get(self.judge(seq, host["prompt_ids"].shape[1], host["index"])))
            )
            kls.append(np.asarray(gather(self.logps(params, seq) - self.logps(self.sft_params, seq))))
            lengths.append(np.asarray(gather(gen.response_mask)).sum(-1))
            if self.reviews_judge:
                texts = evaluate.decode_texts(self.tokenizer, seq, host["prompt_ids"].shape[1])
                prompts_text += texts[0]
                responses_text += texts[1]
        scores, kls, lengths = (np.concatenate(x).astype(np.float64) for x in (scores, kls, lengths))
        out = {
            "gold": float(scores.mean()),
            "gold_sem": float(scores.std(ddof=1) / math.sqrt(len(scores))),
            "kl_seq": float(kls.mean()),
            "kl_token": float(kls.sum() / max(lengths.sum(), 1.0)),
            "response_length": float(lengths.mean()),
            "prompts": len(scores),
        }
        if self.reviews_judge:
            out.update(degeneracy.row_fields(prompts_text, responses_text, scores))
        return out


def run_points(
    ev: CheckpointEvaluator, run_dir: str, cache_name: str = "points.json"
) -> list[dict[str, Any]]:
    """Every checkpoint of a run, evaluated (cached in ``<run_dir>/<cache_name>``)."""
    from jaxrlhf.analysis import divergence

    cache = os.path.join(run_dir, cache_name)
    if os.path.exists(cache):
        with open(cache) as f:
            return json.load(f)
    expected = list(divergence.flat_params(ev.sft_params))
    points = []
    for step, state_dir in divergence.run_checkpoints(os.path.abspath(run_dir)):  # orbax: relative paths
        # lose the item metadata (find_params_key then fails)
        key = _params_key(state_dir, expected)
        flat = divergence.restore_params(state_dir, expected, key)
        points.append({"checkpoint": step, **ev(ev.params_from_flat(flat))})
    with open(cache, "w") as f:
        json.dump(points, f)
    return points


def _params_key(state_dir: str, expected: list[str]) -> str:
    from jaxrlhf.analysis import divergence

    try:
        return divergence.find_params_key(state_dir, expected)
    except ValueError:  # PPO: the critic may hold the same body paths
        return divergence.find_params_key(state_dir, expected, "params/actor")


def t_interval(values) -> dict[str, Any]:
    """Mean, sample std (ddof 1) and the 95% Student-t half-width over seeds (``None`` for n < 2)."""
    from scipy import stats

    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    n = len(v)
    if n == 0:
        return {"mean": None, "std": None, "ci95": None, "n": 0, "values": list(values)}
    std = float(v.std(ddof=1)) if n > 1 else None
    half = float(stats.t.ppf(0.975, n - 1) * std / math.sqrt(n)) if n > 1 else None
    return {"mean": float(v.mean()), "std": std, "ci95": half, "n": n, "values": list(values)}


def envelope(points: list[dict], target: float) -> dict[str, float] | None:
    """The measured upper envelope at ``target``: the best-gold point with ``kl_seq <= target``."""
    ok = [pt for pt in points if pt["kl_seq"] <= target]
    return max(ok, key=lambda pt: pt["gold"]) if ok else None


def closest(points: list[dict], target: float) -> dict[str, float]:
    """The measured point whose ``kl_seq`` is closest to ``target`` (SFT excluded when others exist)."""
    trained = [pt for pt in points if pt["step"] > 0] or points
    return min(trained, key=lambda pt: abs(pt["kl_seq"] - target))


def fmt(x: dict, digits: int = 3) -> str:
    """``mean ± ci95`` (``mean`` alone for one seed, ``-`` when nothing was measured)."""
    if x["mean"] is None:
        return "-"
    if x["ci95"] is None:
        return f"{x['mean']:.{digits}f}"
    return f"{x['mean']:.{digits}f} ± {x['ci95']:.{digits}f}"


def git_commit(path: str = "") -> str | None:
    """The last commit touching ``path`` (the whole repo when empty), or ``None`` outside git."""
    try:
        cmd = ["git", "log", "-1", "--format=%H %cI %s", "--", path] if path else ["git", "rev-parse", "HEAD"]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def uncommitted(path: str) -> list[str] | None:
    """Files under ``path`` that differ from the commit (others' work in progress the run imported)."""
    try:
        cmd = ["git", "status", "--porcelain", "--", path]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return None
