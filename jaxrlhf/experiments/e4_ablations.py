r"""E4: PPO ablations of Xu et al. 2024 (their ablation table: large batch, advantage normalisation,
EMA reference), on two tasks and with the factors able to bind.

    python -m jaxrlhf.experiments.e4_ablations --seeds=3 --out=docs/results/e4 [--smoke]

Two tasks, each seed with its own SFT model (independent bases):

  * ``reviews``     dense learned reward: the per-seed ``common.MINI`` base stages in
                    ``workdirs/experiments/mini/seed{N}`` (data, SFT, best/worst pairs, Bradley-Terry
                    reward model; shared with E2/E3), PPO against that seed's reward model, critic
                    from the reward model; judged by the gold scorer (``common.CheckpointEvaluator``:
                    gold, KL per sequence and per token, degeneracy statistics).
  * ``verifiable``  sparse 1/0 checker (``jaxrlhf.tasks.verifiable``, E5's easy tasks): per seed E5's
                    data and an SFT model trained from scratch with that seed (``e5_verifiable.
                    stage_data``) in ``<workdir>/verifiable/seed{N}``; PPO with the checker as reward,
                    critic from SFT; judged by pass@1 (one sample per held-out prompt; held-out
                    prompts are neither SFT nor PPO prompts) and KL to SFT.

Every PPO run takes the same number of optimizer steps (``Schedule.iterations x epochs x rollout /
minibatch`` >= 320) with the same learning rate. Variants (``variants``):

  * ``recipe``            rollout batch R, advantage whitening, EMA reference (decay 0.99 per step);
  * ``no_whiten``         ``ppo.whiten_advantages=False``;
  * ``frozen_ref``        ``ref.ema_decay=1.0`` (the KL penalty is to the SFT model throughout);
  * ``small_eq_samples``  rollout R/d for d x the iterations, same minibatch: same samples and
                          optimizer steps, the policy resampled d x as often;
  * ``small_eq_iters``    rollout R/d for the same iterations, minibatch / d: same iterations and
                          optimizer steps (noisier gradients), 1/d of the samples.

So that whitening and the reference can matter: the reward's running normalisation and clipping are
off in every variant (``reward.normalize=False``, ``reward.clip=0``: the raw score reaches GAE, and
whitening has a scale to remove), and the KL coefficient is chosen so that the per-sequence KL
penalty is a sizeable share of the score (``kl_share`` in results.json: mean over iterations of
``kl_coef * KL(pi || pi_ref)`` per sequence / RMS of the raw score).

Every run saves ``Schedule.checkpoints`` evenly spaced checkpoints; every checkpoint is scored on
held-out prompts (one sampled completion each, the same sampling seed for every checkpoint of a seed).
Reported: the final checkpoints; paired differences vs the recipe by seed; the comparison at matched
KL on measured points (per seed the target is a fraction of the recipe's final KL: the measured upper
envelope, best score among a run's checkpoints with KL <= target, SFT included, and the closest
checkpoint with its KL gap). Statistics over seeds: mean and 95% Student-t half-width (sample std,
n - 1 degrees of freedom).

Writes ``table.md``, ``results.json`` and ``score_vs_kl.png`` to ``--out``; runs live under the
reviews root (``workdirs/experiments/mini``) and ``--workdir`` (default ``workdirs/e4``); finished
runs and scored checkpoints are reused. Expected result and measured wall time: docs/experiments_e4.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from typing import Any

import numpy as np

from jaxrlhf import quickstart as q
from jaxrlhf.experiments import common
from jaxrlhf.experiments.common import CheckpointEvaluator, closest, envelope, fmt, t_interval

TASKS = ("reviews", "verifiable")
VARIANT_NAMES = ("recipe", "no_whiten", "frozen_ref", "small_eq_samples", "small_eq_iters")


# ------------------------------------------------------------------------------------------ sizes
@dataclasses.dataclass(frozen=True)
class Schedule:
    """One task's PPO schedule (every field lands in results.json)."""

    rollout: int  # the recipe's rollout batch (prompts x 1 sample per iteration)
    minibatch: int  # the recipe's minibatch (responses per optimizer step)
    epochs: int  # passes over each rollout
    iterations: int  # the recipe's iterations
    small_div: int  # d: the small batch is rollout / d
    kl_coef: float  # per-token KL penalty in the reward (ppo.kl_mode="reward", k1)
    lr: float  # actor learning rate (constant)
    ema_decay: float  # the recipe's EMA reference decay per optimizer step
    checkpoints: int  # evenly spaced scored checkpoints per run

    def steps(self) -> int:
        return self.iterations * self.epochs * self.rollout // self.minibatch


# The verifiable task at E5's sizes (copied, not imported, so that E5's retuning does not move E4):
# 2-layer 64-wide Llama from scratch, answers of <= 8 tokens; more held-out prompts than E5 because
# pass@1 is estimated from one sample per prompt at every checkpoint.
VERIFIABLE = dataclasses.replace(
    q.SIZES["full"],
    n_sft=4000,
    n_train_prompts=512,
    n_eval_prompts=1024,
    max_prompt_length=10,
    max_length=18,
    max_new_tokens=8,
    sft_steps=300,
    progress_bar=False,
)
SMOKE_REVIEWS = dataclasses.replace(
    q.SIZES["smoke"], n_sft=128, sft_steps=10, rm_steps=2, n_eval_prompts=16, progress_bar=False
)
SMOKE_VERIFIABLE = dataclasses.replace(
    q.SIZES["smoke"], max_prompt_length=10, max_length=18, max_new_tokens=8, sft_steps=10, n_eval_prompts=16
)
BASES = {
    "e4": {"reviews": common.MINI, "verifiable": VERIFIABLE},
    "smoke": {"reviews": SMOKE_REVIEWS, "verifiable": SMOKE_VERIFIABLE},
}
SCHEDULES = {
    "e4": {
        # rollout 128 vs 16 (d = 8, the study's ratio: 512 vs 64); 20 iterations x 2 epochs x 128 / 16
        # = 320 optimizer steps; a scored checkpoint every 64 steps
        "reviews": Schedule(128, 16, 2, 20, 8, 0.5, 2e-4, 0.99, 5),
        "verifiable": Schedule(128, 16, 2, 20, 8, 1.0, 3e-4, 0.99, 5),
    },
    "smoke": {
        "reviews": Schedule(8, 4, 1, 2, 2, 0.1, 1e-4, 0.9, 2),
        "verifiable": Schedule(8, 4, 1, 2, 2, 0.1, 1e-4, 0.9, 2),
    },
}
REVIEWS_ROOT = os.path.join("workdirs", "experiments", "mini")  # shared with E2/E3 (common.MINI)
KL_FRACTIONS = (0.5, 1.0)  # matched-KL targets: fractions of the recipe's final KL (per seed)


def variants(sch: Schedule) -> dict[str, dict[str, Any]]:
    """name -> rollout batch, minibatch, iterations, whitening, EMA decay of every trained run."""
    r, m, it, d = sch.rollout, sch.minibatch, sch.iterations, sch.small_div
    base = dict(rollout=r, minibatch=m, iterations=it, whiten=True, ema_decay=sch.ema_decay)
    return {
        "recipe": base,
        "no_whiten": dict(base, whiten=False),
        "frozen_ref": dict(base, ema_decay=1.0),
        "small_eq_samples": dict(base, rollout=r // d, iterations=it * d),
        "small_eq_iters": dict(base, rollout=r // d, minibatch=m // d),
    }


def steps_per_iteration(v: dict, sch: Schedule) -> int:
    return sch.epochs * v["rollout"] // v["minibatch"]


def check_schedule(sch: Schedule) -> None:
    """Every variant takes the recipe's optimizer steps; the small batches divide evenly."""
    for name, v in variants(sch).items():
        if v["rollout"] % v["minibatch"] or v["minibatch"] < 1 or v["iterations"] % sch.checkpoints:
            raise ValueError(f"e4 {name}: rollout {v['rollout']} / minibatch {v['minibatch']} / "
                             f"iterations {v['iterations']} do not divide into {sch.checkpoints} checkpoints")  # fmt: skip
        if v["iterations"] * steps_per_iteration(v, sch) != sch.steps():
            raise ValueError(f"e4 {name}: {v} does not take the recipe's {sch.steps()} optimizer steps")


# ------------------------------------------------------------------------------------ base stages
def register(size: str, task: str, seed: int) -> str:
    """Registers the task's base sizes with ``seed`` in ``quickstart.SIZES``; returns the name (the
    reviews name is E2/E3's, so that the shared base stages are the same runs)."""
    if task == "reviews" and size == "e4":
        return common.register_size(common.MINI, "exp_mini", seed)
    return common.register_size(BASES[size][task], f"e4_{size}_{task}", seed)


def task_paths(size: str, task: str, seed: int, workdir: str) -> q.Paths:
    if task == "reviews":
        root = REVIEWS_ROOT if size == "e4" else os.path.join(workdir, "reviews")
    else:
        root = os.path.join(workdir, "verifiable")
    return common.seed_paths(root, seed)


def base_stages(task: str, size_name: str, p: q.Paths) -> dict[str, Any]:
    """Reviews: ``common.base_stages`` (data, sft, pairs, reward). Verifiable: E5's data with this
    seed and an SFT model from scratch (``quickstart`` sft stage)."""
    if task == "reviews":
        return common.base_stages(size_name, p, ("data", "sft", "pairs", "reward"))
    from jaxrlhf.experiments import e5_verifiable as e5

    out = {}
    os.makedirs(p.workdir, exist_ok=True)
    if not q.stage_done("data", p):
        out["data"] = e5.stage_data(q.SIZES[size_name], p, disjoint_train=True)  # held-out: no SFT/RL prompt
    if not q.stage_done("sft", p):
        t0 = time.perf_counter()
        out["sft"] = q.train_stage("sft", size_name, p)["last"]
        print(f"  [{p.workdir}] sft: {time.perf_counter() - t0:.1f}s", flush=True)
    return out


# ------------------------------------------------------------------------------------------- PPO
def overrides(v: dict, sch: Schedule, seed: int) -> dict[str, Any]:
    """The dotted config keys a variant sets on the task's PPO config (results.json records them)."""
    every = v["iterations"] // sch.checkpoints
    return {
        "seed": seed,
        "ppo.rollout_batch_size": v["rollout"],
        "ppo.minibatch_size": v["minibatch"],
        "ppo.epochs": sch.epochs,
        "ppo.iterations": v["iterations"],
        "ppo.whiten_advantages": v["whiten"],
        "ppo.kl_mode": "reward",
        "ppo.kl_estimator": "k1",
        "ppo.kl_coef": sch.kl_coef,
        "ppo.adaptive_kl": False,
        "ref.ema_decay": v["ema_decay"],
        "ref.reset_every": 0,
        "reward.normalize": False,
        "reward.clip": 0.0,
        "optim.lr": sch.lr,
        "checkpoint.every": every,
        "checkpoint.keep": sch.checkpoints + 2,
        "checkpoint.async_save": False,
        "log_every": 1,
        "progress_bar": False,
    }


def ppo_config(task: str, size_name: str, p: q.Paths, flat: dict[str, Any], cache: str):
    """The quickstart's PPO stage config for the task (verifiable: the checker as reward without
    shaping, critic from SFT) with ``flat`` applied."""
    from jaxrlhf import config_defaults as d

    c = q.load_config("ppo", size_name, p.workdir)
    if task == "verifiable":
        from jaxrlhf.experiments import e5_verifiable as e5

        with c.unlocked():
            c.reward = d.reward(fn=e5.REWARD_FN, missing_eos_penalty=0.0)
            c.critic.model = d.model(p.sft_export)
            c.critic.model.dtype = "float32"
    c.update_from_flattened_dict({**flat, "compilation_cache_dir": cache})
    return c


def train_run(task: str, size_name: str, p: q.Paths, name: str, flat: dict, cache: str) -> dict[str, Any]:
    """Trains (or reuses) one variant of one seed; returns its record (wall time, steps, KL share)."""
    from jaxrlhf import registry

    run_dir = p.stage_dir(f"e4_{name}")
    record_path = os.path.join(run_dir, "e4_run.json")
    if os.path.exists(record_path):
        with open(record_path) as f:
            record = json.load(f)
        if record["overrides"] != flat:
            raise ValueError(
                f"{run_dir} was trained with {record['overrides']}, not {flat}; delete it to rerun"
            )
        return record
    c = ppo_config(task, size_name, p, flat, cache)
    t0 = time.perf_counter()
    result = registry.run(c, run_dir)
    if result.get("interrupted"):
        raise KeyboardInterrupt(f"{run_dir}: stopped by a signal; rerun to resume")
    hist = result["history"]
    record = {
        "overrides": flat,
        "wall_s": round(time.perf_counter() - t0, 1),
        "optimizer_steps": int(result["state"].step),
        "samples": c.ppo.iterations * c.ppo.rollout_batch_size,
        **kl_share(hist, c.ppo.kl_coef),
        "entropy_last": float(hist[-1]["policy/entropy"]),
        "last": q._floats(hist[-1]),
    }
    with open(record_path, "w") as f:
        json.dump(record, f)
    print(f"  [{run_dir}]: {record['wall_s']:.1f}s, {record['optimizer_steps']} steps", flush=True)
    return record


def kl_share(history: list[dict], kl_coef: float) -> dict[str, float]:
    """How much the KL penalty weighs, averaged over a run's iterations:
    ``kl_term = kl_coef * KL_k1(pi || pi_ref)`` summed over a response (the reward's per-sequence
    penalty) and ``score_rms = sqrt(mean^2 + std^2)`` of the raw score (= sqrt(E[score^2])), each
    averaged over iterations; ``kl_share = kl_term / score_rms`` and ``kl_share_of_std = kl_term /
    score_std`` (the score's spread across responses, which is what the advantages see)."""
    term = np.array([kl_coef * h["kl_ref/k1"] for h in history])
    rms = np.array([math.hypot(h["reward/raw_mean"], h["reward/raw_std"]) for h in history])
    std = float(np.mean([h["reward/raw_std"] for h in history]))
    return {
        "kl_term": float(term.mean()),
        "score_rms": float(rms.mean()),
        "score_std": std,
        "kl_share": float(abs(term.mean()) / max(rms.mean(), 1e-8)),
        "kl_share_of_std": float(abs(term.mean()) / max(std, 1e-8)),
        "kl_ref_seq_last": float(history[-1]["kl_ref/k1"]),
    }


# ------------------------------------------------------------------------------------ evaluation
def evaluator(task: str, size_name: str, p: q.Paths, seed: int) -> CheckpointEvaluator:
    """One sampled completion per held-out prompt; reviews: gold scorer; verifiable: the checker."""
    if task == "reviews":
        c = q.load_config("evaluate", size_name, p.workdir)
    else:
        from jaxrlhf.experiments import e5_verifiable as e5

        c = e5.eval_config(size_name, p)
    return CheckpointEvaluator(c, p.sft_export, q.SIZES[size_name].eval_batch, seed=1000 + seed)


def run_task_seed(size: str, task: str, seed: int, workdir: str, names: list[str]) -> dict[str, Any]:
    """One task and seed: base stages, every variant trained, every checkpoint scored."""
    t0 = time.perf_counter()
    size_name, sch = register(size, task, seed), SCHEDULES[size][task]
    p = task_paths(size, task, seed, workdir)
    base = base_stages(task, size_name, p)
    t_base = time.perf_counter() - t0
    cache = os.path.join(workdir, "jax_cache")
    vs = variants(sch)
    runs = {n: train_run(task, size_name, p, n, overrides(vs[n], sch, seed), cache) for n in names}
    t_eval = time.perf_counter()
    ev = evaluator(task, size_name, p, seed)
    sft_point = {"checkpoint": 0, "step": 0, "samples": 0, **ev(ev.sft_params)}
    for n, rec in runs.items():
        pts = common.run_points(ev, p.stage_dir(f"e4_{n}"), "e4_points.json")
        for pt in pts:
            pt["step"] = pt["checkpoint"] * steps_per_iteration(vs[n], sch)
            pt["samples"] = pt["checkpoint"] * vs[n]["rollout"]
        rec["points"] = [sft_point, *pts]
    return {
        "runs": runs,
        "sft": sft_point,
        "base_stages": base,
        "base_s": round(t_base, 1),
        "eval_s": round(time.perf_counter() - t_eval, 1),
        "wall_s": round(time.perf_counter() - t0, 1),
    }


# ------------------------------------------------------------------------------------ statistics
SCORE = {"reviews": "gold", "verifiable": "pass@1"}  # what the ``gold`` field is on each task
DEGENERACY = ("repeat_3gram_frac", "distinct_2", "out_of_grammar_frac", "frac_positive", "response_words")
RUN_STATS = ("kl_share", "kl_share_of_std", "kl_term", "score_std", "entropy_last", "wall_s")


def final_stats(per_seed: list[dict]) -> dict[str, Any]:
    """Per variant (and SFT): the final checkpoint's score, KL per sequence / token, length and
    (reviews) degeneracy statistics; the run's KL share, entropy and wall time; over seeds."""
    out = {}
    keys = ("gold", "kl_seq", "kl_token", "response_length", *DEGENERACY)
    for n in per_seed[0]["runs"]:
        last = [r["runs"][n]["points"][-1] for r in per_seed]
        out[n] = {k: t_interval([pt[k] for pt in last]) for k in keys if k in last[0]}
        out[n].update({k: t_interval([r["runs"][n][k] for r in per_seed]) for k in RUN_STATS})
    out["sft"] = {k: t_interval([r["sft"][k] for r in per_seed]) for k in keys if k in per_seed[0]["sft"]}
    return out


def paired(per_seed: list[dict]) -> dict[str, Any]:
    """Per variant: final score and KL minus the recipe's, seed by seed (same SFT model), over seeds."""
    out = {}
    for n in per_seed[0]["runs"]:
        if n == "recipe":
            continue
        d = {k: [] for k in ("gold", "kl_seq", "kl_token")}
        for r in per_seed:
            a, b = r["runs"][n]["points"][-1], r["runs"]["recipe"]["points"][-1]
            for k in d:
                d[k].append(a[k] - b[k])
        out[n] = {f"d_{k}": t_interval(v) for k, v in d.items()}
    return out


def matched(per_seed: list[dict], fractions=KL_FRACTIONS) -> dict[str, Any]:
    """Per KL target (``fraction x`` the recipe's final KL per sequence, per seed) and variant: the
    measured envelope's score, the closest checkpoint's score and KL gap, and both minus the recipe's."""
    out: dict[str, Any] = {}
    for frac in fractions:
        key = f"{frac:g}x"
        out[key] = {}
        for n in per_seed[0]["runs"]:
            cols = {k: [] for k in ("target", "env", "env_d", "clo", "clo_gap", "clo_d")}
            for r in per_seed:
                plain, pts = r["runs"]["recipe"]["points"], r["runs"][n]["points"]
                target = frac * plain[-1]["kl_seq"]
                e, ep = envelope(pts, target), envelope(plain, target)
                c, cp = closest(pts, target), closest(plain, target)
                cols["target"].append(target)
                cols["env"].append(e["gold"] if e else None)
                cols["env_d"].append(e["gold"] - ep["gold"] if e and ep else None)
                cols["clo"].append(c["gold"])
                cols["clo_gap"].append(c["kl_seq"] - target)
                cols["clo_d"].append(c["gold"] - cp["gold"])
            out[key][n] = {
                "target_kl_seq": t_interval(cols["target"]),
                "envelope_score": t_interval(cols["env"]),
                "envelope_diff_vs_recipe": t_interval(cols["env_d"]),
                "closest_score": t_interval(cols["clo"]),
                "closest_kl_gap": t_interval(cols["clo_gap"]),
                "closest_diff_vs_recipe": t_interval(cols["clo_d"]),
            }
    return out


def task_summary(per_seed: list[dict]) -> dict[str, Any]:
    return {"final": final_stats(per_seed), "paired": paired(per_seed), "matched": matched(per_seed)}


# ---------------------------------------------------------------------------------------- tables
def _setting(v: dict) -> str:
    return (
        f"{v['rollout']} × {v['iterations']} (mb {v['minibatch']}) | {v['rollout'] * v['iterations']} | "
        f"{'on' if v['whiten'] else 'off'} | {v['ema_decay']:g}"
    )


def table_final(res: dict, task: str) -> list[str]:
    t, vs = res["tasks"][task], res["variants"][task]
    score = SCORE[task]
    lines = [
        f"| variant | rollout × iterations | samples | whiten | EMA decay | {score} | KL/seq | KL/token "
        f"| length | KL share (of RMS / of std) | Δ{score} vs recipe | ΔKL/seq vs recipe |",
        "|---" * 12 + "|",
    ]
    for n, r in t["final"].items():
        if n == "sft":
            setting, share, d_s, d_k = "— | 0 | — | —", "-", "-", "-"
        else:
            setting = _setting(vs[n])
            share = f"{fmt(r['kl_share'], 2)} / {fmt(r['kl_share_of_std'], 2)}"
            p = t["paired"].get(n)
            d_s, d_k = (fmt(p["d_gold"]), fmt(p["d_kl_seq"], 2)) if p else ("0", "0")
        lines.append(
            f"| {n} | {setting} | {fmt(r['gold'])} | {fmt(r['kl_seq'], 2)} | {fmt(r['kl_token'])} | "
            f"{fmt(r['response_length'], 1)} | {share} | {d_s} | {d_k} |"
        )
    return lines


def table_degeneracy(res: dict, task: str) -> list[str]:
    lines = ["| variant | " + " | ".join(DEGENERACY) + " |", "|---" * (len(DEGENERACY) + 1) + "|"]
    for n, r in res["tasks"][task]["final"].items():
        lines.append(f"| {n} | " + " | ".join(fmt(r[k]) if k in r else "-" for k in DEGENERACY) + " |")
    return lines


MATCHED_COLS = (
    ("target_kl_seq", 2),
    ("envelope_score", 3),
    ("envelope_diff_vs_recipe", 3),
    ("closest_score", 3),
    ("closest_kl_gap", 2),
    ("closest_diff_vs_recipe", 3),
)


def table_matched(res: dict, task: str, key: str) -> list[str]:
    lines = [
        "| variant | " + " | ".join(c for c, _ in MATCHED_COLS) + " |",
        "|---" * (len(MATCHED_COLS) + 1) + "|",
    ]
    for n, r in res["tasks"][task]["matched"][key].items():
        lines.append(f"| {n} | " + " | ".join(fmt(r[c], dg) for c, dg in MATCHED_COLS) + " |")
    return lines


def table_markdown(res: dict) -> str:
    """Every table of the results (``table.md``; docs/experiments_e4.md carries the same tables)."""
    n = res["seeds"]
    out = [
        f"Mean ± 95% t-interval half-width over {n} seeds (sample std, {n - 1} degrees of freedom), "
        "each seed its own SFT model; held-out prompts, one sampled completion each; KL(policy || SFT) "
        "in nats; Δ = variant − recipe, paired by seed; KL share = kl_coef·KL(π‖π_ref) per sequence / "
        "RMS (or std) of the raw score, mean over iterations.",
    ]
    for task in res["tasks"]:
        sch = res["schedules"][task]
        steps = sch["iterations"] * sch["epochs"] * sch["rollout"] // sch["minibatch"]
        out += [
            "",
            f"### {task}: final checkpoints ({steps} optimizer steps, kl_coef {sch['kl_coef']:g}, "
            f"lr {sch['lr']:g})",
            "",
            *table_final(res, task),
        ]
        if task == "reviews":
            out += ["", f"### {task}: degeneracy of the final checkpoints' samples", ""]
            out += table_degeneracy(res, task)
        for key in res["tasks"][task]["matched"]:
            out += ["", f"### {task}: matched KL, target = {key} the recipe's final KL/seq (per seed)", ""]
            out += table_matched(res, task, key)
    return "\n".join(out)


# ----------------------------------------------------------------------------------------- plots
def plot(res: dict, out_path: str) -> str | None:
    """Score vs KL per sequence along each run's checkpoints (a line joins one run's successive
    checkpoints, SFT first; one line per seed), one panel per task."""
    plt = q.pyplot(out_path)
    if plt is None:
        return None
    tasks = list(res["per_seed"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.5), dpi=110, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for j, task in enumerate(tasks):
        ax = axes[0][j]
        for c, n in enumerate(res["per_seed"][task][0]["runs"]):
            for s, r in enumerate(res["per_seed"][task]):
                pts = r["runs"][n]["points"]
                ax.plot([p["kl_seq"] for p in pts], [p["gold"] for p in pts], ".-", color=colors[c % len(colors)],
                        alpha=0.7, lw=0.8, label=n if s == 0 else None)  # fmt: skip
        ax.set_ylim(bottom=0.0)
        ax.set_xlim(left=0.0)
        ax.set_xlabel("KL(policy || SFT), nats per sequence")
        ax.set_ylabel(f"{SCORE[task]} (held-out prompts)")
        ax.set_title(f"E4 {task}: checkpoints of each run ({len(res['per_seed'][task])} seeds)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    return out_path


# ------------------------------------------------------------------------------------------ main
def run(size: str, seeds: int, workdir: str, out: str, names: list[str], tasks: list[str]) -> dict[str, Any]:
    t0 = time.perf_counter()
    from jaxrlhf.trainer.harness import enable_compilation_cache

    for task in tasks:
        check_schedule(SCHEDULES[size][task])
    enable_compilation_cache(os.path.join(workdir, "jax_cache"))
    per_seed: dict[str, list] = {task: [] for task in tasks}
    for seed in range(seeds):
        for task in tasks:
            print(f"[e4] {task} seed {seed} ...", flush=True)
            per_seed[task].append(run_task_seed(size, task, seed, workdir, names))
            print(f"[e4] {task} seed {seed}: {per_seed[task][-1]['wall_s']:.0f}s", flush=True)
    scheds = {task: SCHEDULES[size][task] for task in tasks}
    res = {
        "experiment": "e4_ablations",
        "size": size,
        "seeds": seeds,
        "sizes": {task: dataclasses.asdict(BASES[size][task]) for task in tasks},
        "schedules": {task: dataclasses.asdict(s) for task, s in scheds.items()},
        "variants": {
            task: {
                n: {**v, "overrides": {k: x for k, x in overrides(v, s, 0).items() if k != "seed"}}
                for n, v in variants(s).items()
                if n in names
            }
            for task, s in scheds.items()
        },
        "score": {task: SCORE[task] for task in tasks},
        "eval": "one sample per held-out prompt at temperature 1, sampling seed 1000 + seed for every checkpoint",
        "statistics": "mean, sample std (ddof 1), 95% Student-t half-width t(0.975, n-1) * std / sqrt(n)",
        "tasks": {task: task_summary(per_seed[task]) for task in tasks},
        "per_seed": per_seed,
        "code_commit": common.git_commit(),
        "gold_score_commit": common.git_commit("jaxrlhf/tasks/reviews.py"),
        "uncommitted_files": common.uncommitted("jaxrlhf"),
        "wall_s_total": round(time.perf_counter() - t0, 1),
        "hardware": q.hardware(),
    }
    q.write_outputs(out, table_markdown(res), res, lambda path: plot(res, path), "score_vs_kl.png")
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default="docs/results/e4")
    ap.add_argument("--workdir", default=os.path.join("workdirs", "e4"))
    ap.add_argument("--smoke", action="store_true", help="toy sizes (seconds; the test uses it)")
    ap.add_argument("--variants", default=",".join(VARIANT_NAMES), help=f"subset of {VARIANT_NAMES}")
    ap.add_argument("--tasks", default=",".join(TASKS), help=f"subset of {TASKS}")
    a = ap.parse_args(argv)
    names = [n for n in a.variants.split(",") if n]
    tasks = [t for t in a.tasks.split(",") if t]
    if a.seeds < 1 or set(names) - set(VARIANT_NAMES) or "recipe" not in names:
        raise ValueError(f"--seeds={a.seeds} --variants={a.variants!r}: need >= 1 seed and variants "
                         f"from {VARIANT_NAMES}, the recipe among them (differences are vs the recipe)")  # fmt: skip
    if not tasks or set(tasks) - set(TASKS):
        raise ValueError(f"--tasks={a.tasks!r}: expected a subset of {TASKS}")
    res = run("smoke" if a.smoke else "e4", a.seeds, a.workdir, a.out, names, tasks)
    print(table_markdown(res), flush=True)
    print(f"[e4] {res['wall_s_total']:.0f}s wall; results in {a.out}", flush=True)
    return res


if __name__ == "__main__":
    main()
