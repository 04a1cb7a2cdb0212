r"""E7 (Wang et al., "What Is Preference Optimization Doing, How and Why?"): inside DPO and PPO.

    python -m jaxrlhf.experiments.e7_wang --out=docs/results/e7 [--seeds=3] [--smoke]

On the synthetic-review task, per seed (an independent quickstart pipeline: data, SFT, best/worst
pairs, reward model; ``common.base_stages``), every variant of ``variants(plan)`` is trained
from that seed's SFT model with ``config.analysis.every`` on (the gradient decomposition of
``jaxrlhf.analysis.gradients``) and a checkpoint every ``plan.dpo_ckpt_every`` DPO steps /
``plan.ppo_ckpt_every`` PPO iterations:

  (a) dynamics   the logged ``analysis/*`` metrics of plain DPO and PPO over optimizer steps:
                 gradient norms of the positive / negative parts and of the TOP/MID/BOT thirds,
                 cos(pos, neg), each part's cosine with the total, and target stability (the
                 update over a probing window vs the previous window and vs the displacement from
                 the start). DPO probes every ``plan.dpo_probe_every`` steps and PPO every iteration
                 (``plan.ppo_steps_per_iteration`` optimizer steps), so both windows hold the same
                 number of optimizer steps.
  (b) ablations  DPO without negative learning early / without positive learning late, the
                 coordinated DPO (negative learning damped early, positive learning damped late),
                 PPO without TOP / without MID, cPPO (TOP x lambda) and the periodic hPPO; every
                 checkpoint (and the SFT model, KL 0) is scored on held-out prompts: gold score of one
                 sampled completion per prompt (temperature 1, the same sampling seed for every
                 checkpoint of a seed) and KL(policy || SFT) on those samples, per sequence and per
                 token. Methods are compared at matched KL on measured points only (``matched``):
                 per seed the target is a fraction of the plain method's final KL; a method's value
                 there is its measured upper envelope (best gold among its checkpoints, SFT included,
                 with KL <= target) and the gold of the checkpoint whose KL is closest to the target
                 (with the KL difference). Statistics over seeds: mean and a 95% Student-t interval
                 (sample std, n - 1 degrees of freedom); paired differences vs the plain method.

Writes ``table.md``, ``results.json`` (every setting), ``dynamics.png`` and ``gold_vs_kl.png`` to
``--out``; runs live in ``--workdir`` (default ``workdirs/e7``; finished runs and evaluations are
reused).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from typing import Any

import numpy as np

from jaxrlhf import quickstart as q
from jaxrlhf.experiments import common
from jaxrlhf.experiments.common import (
    CheckpointEvaluator,
    closest,
    envelope,
    fmt,
    git_commit,
    t_interval,
    uncommitted,
)

# ------------------------------------------------------------------------------------------ sizes
E7 = dataclasses.replace(
    common.MINI,
    n_train_prompts=512,  # pairs for 64 DPO steps of 32 pairs without many repeats
    n_eval_prompts=256,
    dpo_steps=64,
    dpo_lr=2e-4,  # the quickstart's (5e-4, E2's, overshot: KL 20 nats/seq after 16 steps)
    ppo_iterations=8,
    ppo_rollout_batch=128,
    ppo_minibatch=32,
    ppo_epochs=2,
    ppo_lr=2e-4,
)
SMOKE = dataclasses.replace(
    q.SIZES["smoke"], n_sft=128, sft_steps=10, rm_steps=2, dpo_steps=4, ppo_iterations=2
)
BASES = {"e7": E7, "smoke": SMOKE}


@dataclasses.dataclass(frozen=True)
class Plan:
    """Schedules, knobs and probing of the variants (every field lands in results.json)."""

    dpo_t1: int  # coordinated DPO: negative learning scaled before optimizer step t1
    dpo_t2: int  # ... and positive learning scaled from step t2
    coord_early_neg_coef: float  # the coordinated DPO's damping (the ablations use 0)
    coord_late_pos_coef: float
    cppo_lambda: float  # cPPO: TOP tokens' weight
    hppo_period: int  # hPPO: iterations per cycle (t3)
    hppo_amplitude: float  # hPPO: tau
    dpo_probe_every: int  # optimizer steps per DPO probing window
    dpo_ckpt_every: int  # DPO steps between evaluated checkpoints
    ppo_ckpt_every: int  # PPO iterations between evaluated checkpoints
    kl_fractions: tuple[float, ...]  # matched-KL targets: fractions of the plain method's final KL


PLANS = {
    "e7": Plan(21, 43, 0.5, 0.5, 0.5, 4, 0.5, 8, 16, 2, (0.5, 1.0)),
    "smoke": Plan(2, 3, 0.5, 0.5, 0.5, 2, 0.5, 2, 2, 1, (0.5, 1.0)),
}
PLAIN = {"dpo": "dpo", "ppo": "ppo"}


def variants(plan: Plan) -> dict[str, tuple[str, dict[str, Any]]]:
    """name -> (algorithm, dotted config overrides) of every trained policy."""
    t1, t2 = plan.dpo_t1, plan.dpo_t2
    return {
        "dpo": ("dpo", {}),
        "dpo_no_neg_early": ("dpo", {"dpo.early_neg_coef": 0.0, "dpo.early_until": t1}),
        "dpo_no_pos_late": ("dpo", {"dpo.late_pos_coef": 0.0, "dpo.late_from": t2}),
        "dpo_coordinated": (
            "dpo",
            {
                "dpo.early_neg_coef": plan.coord_early_neg_coef,
                "dpo.early_until": t1,
                "dpo.late_pos_coef": plan.coord_late_pos_coef,
                "dpo.late_from": t2,
            },
        ),
        "ppo": ("ppo", {}),
        "ppo_no_top": ("ppo", {"ppo.coef_top": 0.0}),
        "ppo_no_mid": ("ppo", {"ppo.coef_mid": 0.0}),
        "ppo_no_neg": ("ppo", {"ppo.neg_coef": 0.0}),
        "cppo_top": ("ppo", {"ppo.coef_top": plan.cppo_lambda}),
        "hppo": ("ppo", {"ppo.period": plan.hppo_period, "ppo.amplitude": plan.hppo_amplitude}),
    }


def register_size(size: str, seed: int) -> str:
    """Registers ``BASES[size]`` with ``seed`` in ``quickstart.SIZES`` (the stage configs read it)."""
    name = f"e7_{size}_s{seed}"
    q.SIZES[name] = dataclasses.replace(BASES[size], seed=seed)
    return name


def ppo_steps_per_iteration(s: q.Sizes) -> int:
    return s.ppo_epochs * s.ppo_rollout_batch // s.ppo_minibatch


def run_config(size_name: str, p: q.Paths, algo: str, overrides: dict, plan: Plan, cache: str):
    """The quickstart's DPO / PPO stage config with the variant's ``overrides``, probing on and a
    checkpoint every ``plan.*_ckpt_every`` (all kept)."""
    c = q.load_config(algo, size_name, p.workdir)
    s = q.SIZES[size_name]
    arm = {  # the two arms: probe / checkpoint / log cadence in each driver's unit
        "dpo": dict(every=plan.dpo_ckpt_every, total=s.dpo_steps, probe=plan.dpo_probe_every,
                    log=max(1, s.dpo_steps // 8)),
        "ppo": dict(every=plan.ppo_ckpt_every, total=s.ppo_iterations, probe=1, log=1),
    }[algo]  # fmt: skip
    flat = {
        "analysis.every": arm["probe"],
        "checkpoint.every": arm["every"],
        "checkpoint.keep": arm["total"] // arm["every"] + 2,
        "checkpoint.async_save": False,
        "log_every": arm["log"],
        "compilation_cache_dir": cache,
    }
    with c.unlocked():  # the quickstart's dpo section lists no coordination keys (absent: plain DPO)
        for key, value in overrides.items():
            section, _, leaf = key.rpartition(".")
            c[section][leaf] = value
    c.update_from_flattened_dict(flat)
    return c


def train_variant(size_name: str, p: q.Paths, name: str, plan: Plan, cache: str) -> dict[str, Any]:
    """Trains (or reuses) one variant of one seed; returns its record (wall time, probes, metrics)."""
    from jaxrlhf import registry

    algo, overrides = variants(plan)[name]
    run_dir = p.stage_dir(f"e7_{name}")
    record_path = os.path.join(run_dir, "e7_run.json")
    if os.path.exists(record_path):
        with open(record_path) as f:
            return json.load(f)
    t0 = time.perf_counter()
    result = registry.run(run_config(size_name, p, algo, overrides, plan, cache), run_dir)
    if result.get("interrupted"):
        raise KeyboardInterrupt(f"{run_dir}: stopped by a signal; rerun to resume")
    record = {
        "wall_s": round(time.perf_counter() - t0, 1),
        "algorithm": algo,
        "overrides": overrides,
        "probes": probes_of(result, algo, q.SIZES[size_name]),
        "last": q._floats(result["history"][-1]),
        "entropy": [float(h["policy/entropy"]) for h in result["history"] if "policy/entropy" in h],
    }
    with open(record_path, "w") as f:
        json.dump(record, f)
    print(f"  [{run_dir}]: {record['wall_s']:.1f}s", flush=True)
    return record


def probes_of(result: dict, algo: str, s: q.Sizes) -> list[dict[str, float]]:
    """The ``analysis/*`` records of a run as ``{"step": optimizer steps before the probe, ...}``.

    DPO probes the state that step ``i`` updates (``i - 1`` steps done); PPO probes iteration ``i``'s
    pre-update actor (``(i - 1) * steps_per_iteration`` steps done)."""
    from jaxrlhf import registry

    out = []
    if registry.get(algo).unit == "step":  # the offline driver logs probes apart from its history
        for rec in result.get("analysis", []):
            m = {k.removeprefix("analysis/"): float(v) for k, v in rec.items() if k.startswith("analysis/")}
            out.append({"step": int(rec["step"]) - 1, **m})
    else:
        for i, h in enumerate(result["history"], start=1):
            m = {k.removeprefix("analysis/"): float(v) for k, v in h.items() if k.startswith("analysis/")}
            if m:
                out.append({"step": (i - 1) * ppo_steps_per_iteration(s), **m})
    return clean_probes(out)


def clean_probes(probes: list[dict[str, float]]) -> list[dict[str, float]]:
    """Drops the target-stability cosines that are trivial by construction: ``update_cos_from_start``
    of a window that starts at step 0 (the window is the displacement: 1, or 0 when empty, as for
    PPO's first probe, taken before any update) and ``update_cos_prev_window`` when the previous window
    is empty or absent. ``TargetStability`` no longer logs a cosine for an empty window (results
    committed before logged 0 there); the filter keeps both kinds of history alike."""
    out, prev_end, prev_len = [], 0, 0
    for i, pr in enumerate(probes):
        pr = dict(pr)
        if prev_end == 0:
            pr.pop("update_cos_from_start", None)
        if i == 0 or prev_len == 0:
            pr.pop("update_cos_prev_window", None)
        prev_len, prev_end = pr["step"] - prev_end, pr["step"]
        out.append(pr)
    return out


# ------------------------------------------------------------------------------------ evaluation
def run_seed(size: str, seed: int, root: str, names: list[str]) -> dict[str, Any]:
    """One seed: base stages, every variant trained and its checkpoints scored."""
    t0 = time.perf_counter()
    size_name, plan = register_size(size, seed), PLANS[size]
    p = common.seed_paths(root, seed)
    common.base_stages(size_name, p, ("data", "sft", "pairs", "reward"))
    cache = os.path.join(root, "jax_cache")
    runs = {n: train_variant(size_name, p, n, plan, cache) for n in names}
    for rec in runs.values():
        rec["probes"] = clean_probes(rec["probes"])
    s = q.SIZES[size_name]
    ev = CheckpointEvaluator(
        q.load_config("evaluate", size_name, p.workdir), p.sft_export, s.eval_batch, seed=1000 + seed
    )
    sft_point = {"checkpoint": 0, "step": 0, **ev(ev.sft_params)}
    steps = {"dpo": 1, "ppo": ppo_steps_per_iteration(s)}
    for n, rec in runs.items():
        t_eval = time.perf_counter()
        pts = common.run_points(ev, p.stage_dir(f"e7_{n}"), "e7_points.json")
        rec["eval_s"] = round(time.perf_counter() - t_eval, 1)  # 0 when the scores were cached
        for pt in pts:
            pt["step"] = pt["checkpoint"] * steps[rec["algorithm"]]
        rec["points"] = [sft_point, *pts]
    with open(p.pairs_stats) as f:
        pairs = json.load(f)
    return {"runs": runs, "sft": sft_point, "pairs": pairs, "wall_s": round(time.perf_counter() - t0, 1)}


# ------------------------------------------------------------------------------------ statistics
def matched(per_seed: list[dict], plan: Plan) -> dict[str, Any]:
    """Per method and KL target (``plan.kl_fractions`` x the plain method's final KL, per seed):
    envelope gold, closest-point gold and its KL gap, paired differences vs the plain method."""
    out: dict[str, Any] = {}
    names = list(per_seed[0]["runs"])
    for frac in plan.kl_fractions:
        key = f"{frac:g}x"
        out[key] = {}
        for n in names:
            algo = per_seed[0]["runs"][n]["algorithm"]
            env, clo, gap, d_env, d_clo, targets = [], [], [], [], [], []
            for r in per_seed:
                plain = r["runs"][PLAIN[algo]]["points"]
                target = frac * plain[-1]["kl_seq"]
                pts = r["runs"][n]["points"]
                e, ep = envelope(pts, target), envelope(plain, target)
                c, cp = closest(pts, target), closest(plain, target)
                targets.append(target)
                env.append(e["gold"] if e else None)
                clo.append(c["gold"])
                gap.append(c["kl_seq"] - target)
                d_env.append(e["gold"] - ep["gold"] if e and ep else None)
                d_clo.append(c["gold"] - cp["gold"])
            out[key][n] = {
                "target_kl_seq": t_interval(targets),
                "envelope_gold": t_interval(env),
                "closest_gold": t_interval(clo),
                "closest_kl_gap": t_interval(gap),
                "envelope_diff_vs_plain": t_interval(d_env),
                "closest_diff_vs_plain": t_interval(d_clo),
            }
    return out


def final_stats(per_seed: list[dict]) -> dict[str, Any]:
    """Per method: the final checkpoint's gold, KL per sequence / token, length; train wall time."""
    out = {}
    for n in per_seed[0]["runs"]:
        last = [r["runs"][n]["points"][-1] for r in per_seed]
        out[n] = {
            k: t_interval([pt[k] for pt in last]) for k in ("gold", "kl_seq", "kl_token", "response_length")
        }
        out[n]["train_wall_s"] = t_interval([r["runs"][n]["wall_s"] for r in per_seed])
        if per_seed[0]["runs"][n].get("entropy"):  # PPO: the policy's entropy on its last rollout
            out[n]["rollout_entropy_last"] = t_interval([r["runs"][n]["entropy"][-1] for r in per_seed])
    out["sft"] = {
        k: t_interval([r["sft"][k] for r in per_seed])
        for k in ("gold", "kl_seq", "kl_token", "response_length")
    }
    return out


DYN_KEYS = (
    "grad_norm_pos",
    "grad_norm_neg",
    "grad_cos_pos_neg",
    "grad_cos_pos_total",
    "grad_cos_neg_total",
    "grad_cos_top_total",
    "grad_cos_mid_total",
    "grad_cos_bot_total",
    "update_cos_prev_window",
    "update_cos_from_start",
)


def dynamics(per_seed: list[dict], names=("dpo", "ppo")) -> dict[str, Any]:
    """Per method, the probe metrics averaged over the first and the second half of the probes
    (each seed's halves, then mean and CI over seeds), plus ``neg_over_pos`` = |g_neg| / |g_pos|."""
    out = {}
    for n in names:
        out[n] = {}
        for half in ("early", "late"):
            per = {k: [] for k in (*DYN_KEYS, "neg_over_pos")}
            for r in per_seed:
                probes = r["runs"][n]["probes"]
                mid = len(probes) // 2
                sel = probes[:mid] if half == "early" else probes[mid:]
                for k in DYN_KEYS:
                    vals = [pr[k] for pr in sel if k in pr]
                    per[k].append(float(np.mean(vals)) if vals else None)
                per["neg_over_pos"].append(
                    float(np.mean([pr["grad_norm_neg"] / pr["grad_norm_pos"] for pr in sel])) if sel else None
                )
            out[n][half] = {k: t_interval(v) for k, v in per.items()}
    return out


# ---------------------------------------------------------------------------------------- tables
FINAL_COLS = (
    ("gold", 3),
    ("kl_seq", 2),
    ("kl_token", 3),
    ("response_length", 1),
    ("rollout_entropy_last", 3),
    ("train_wall_s", 0),
)
MATCHED_COLS = (
    ("target_kl_seq", 2),
    ("envelope_gold", 3),
    ("envelope_diff_vs_plain", 3),
    ("closest_gold", 3),
    ("closest_kl_gap", 2),
    ("closest_diff_vs_plain", 3),
)


def table_final(res: dict) -> list[str]:
    lines = [
        "| method | " + " | ".join(c for c, _ in FINAL_COLS) + " |",
        "|---" * (len(FINAL_COLS) + 1) + "|",
    ]
    for n, r in res["final"].items():
        cells = [fmt(r[c], dg) if c in r else "-" for c, dg in FINAL_COLS]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return lines


def table_matched(res: dict, key: str) -> list[str]:
    lines = [
        "| method | " + " | ".join(c for c, _ in MATCHED_COLS) + " |",
        "|---" * (len(MATCHED_COLS) + 1) + "|",
    ]
    for n, r in res["matched"][key].items():
        lines.append(f"| {n} | " + " | ".join(fmt(r[c], dg) for c, dg in MATCHED_COLS) + " |")
    return lines


def table_dynamics(res: dict) -> list[str]:
    cols = [(n, h) for n in res["dynamics"] for h in ("early", "late")]
    lines = [
        "| metric | " + " | ".join(f"{n} {h}" for n, h in cols) + " |",
        "|---" * (len(cols) + 1) + "|",
    ]
    for k in (*DYN_KEYS, "neg_over_pos"):
        lines.append(f"| {k} | " + " | ".join(fmt(res["dynamics"][n][h][k]) for n, h in cols) + " |")
    return lines


def table_markdown(res: dict) -> str:
    """Every table of the results (``table.md``; docs/experiments_e7.md carries the same tables)."""
    n = res["seeds"]
    out = [
        f"Mean ± 95% t-interval half-width over {n} seeds (sample std, {n - 1} degrees of freedom); "
        "held-out prompts, one sampled completion each, gold scorer; KL(policy || SFT) in nats.",
        "",
        "### Final checkpoints",
        "",
        *table_final(res),
    ]
    for key in res["matched"]:
        out += [
            "",
            f"### Matched KL: target = {key} the plain method's final KL (per seed)",
            "",
            *table_matched(res, key),
        ]
    out += ["", "### Dynamics of plain DPO and PPO (probe means, first / second half of training)", ""]
    out += table_dynamics(res)
    return "\n".join(out)


# ----------------------------------------------------------------------------------------- plots
DYN_PANELS = (
    ("gradient norms", ("grad_norm_total", "grad_norm_pos", "grad_norm_neg")),
    ("TOP/MID/BOT norms", ("grad_norm_top", "grad_norm_mid", "grad_norm_bot")),
    ("cos(pos, neg)", ("grad_cos_pos_neg",)),
    ("cos(part, total)", ("grad_cos_pos_total", "grad_cos_neg_total", "grad_cos_top_total",
                          "grad_cos_mid_total", "grad_cos_bot_total")),
    ("target stability", ("update_cos_prev_window", "update_cos_from_start")),
)  # fmt: skip


def plot_dynamics(per_seed: list[dict], out_path: str, names=("dpo", "ppo")) -> str | None:
    """One column per method, one row per panel: each seed's probe curve (a line through one run's
    successive probes), the seed mean thick where every seed has the step."""
    plt = q.pyplot(out_path)
    if plt is None:
        return None
    fig, axes = plt.subplots(
        len(DYN_PANELS), len(names), figsize=(5 * len(names), 2.6 * len(DYN_PANELS)), dpi=110, squeeze=False
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for j, n in enumerate(names):
        for i, (title, keys) in enumerate(DYN_PANELS):
            ax = axes[i][j]
            for c, k in enumerate(keys):
                for r in per_seed:
                    pr = [p for p in r["runs"][n]["probes"] if k in p]
                    ax.plot(
                        [p["step"] for p in pr], [p[k] for p in pr], "-", color=colors[c], alpha=0.25, lw=0.8
                    )
                steps = sorted(
                    set.intersection(
                        *[{p["step"] for p in r["runs"][n]["probes"] if k in p} for r in per_seed]
                    )
                )
                mean = [
                    np.mean([next(p[k] for p in r["runs"][n]["probes"] if p["step"] == s) for r in per_seed])
                    for s in steps
                ]
                ax.plot(
                    steps,
                    mean,
                    "o-",
                    color=colors[c],
                    ms=3,
                    lw=1.8,
                    label=k.replace("grad_", "").replace("update_", ""),
                )
            ax.set_title(f"{n.upper()}: {title}", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6, loc="best")
            if i == len(DYN_PANELS) - 1:
                ax.set_xlabel("optimizer steps")
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    return out_path


def plot_gold_vs_kl(per_seed: list[dict], out_path: str) -> str | None:
    """Gold vs KL per sequence along each run's checkpoints (lines join one run's successive
    checkpoints, SFT first); one panel per algorithm."""
    plt = q.pyplot(out_path)
    if plt is None:
        return None
    runs = per_seed[0]["runs"]
    algos = [a for a in ("dpo", "ppo") if any(r["algorithm"] == a for r in runs.values())]
    fig, axes = plt.subplots(1, len(algos), figsize=(6 * len(algos), 4.5), dpi=110, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for j, a in enumerate(algos):
        ax = axes[0][j]
        for c, n in enumerate(m for m in runs if runs[m]["algorithm"] == a):
            for s, r in enumerate(per_seed):
                pts = r["runs"][n]["points"]
                ax.plot([p["kl_seq"] for p in pts], [p["gold"] for p in pts], ".-", color=colors[c % len(colors)],
                        alpha=0.7, lw=0.8, label=n if s == 0 else None)  # fmt: skip
        ax.set_xlabel("KL(policy || SFT), nats per sequence")
        ax.set_ylabel("gold score (held-out prompts)")
        ax.set_title(f"E7 {a.upper()} variants: checkpoints of each run ({len(per_seed)} seeds)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    return out_path


# ------------------------------------------------------------------------------------------ main
def run(size: str, seeds: int, workdir: str, out: str, names: list[str]) -> dict[str, Any]:
    t0 = time.perf_counter()
    from jaxrlhf.trainer.harness import enable_compilation_cache

    root = os.path.join(workdir, size)
    enable_compilation_cache(os.path.join(root, "jax_cache"))  # every stage; seeds > 0 reuse seed 0's
    per_seed = []
    for seed in range(seeds):
        print(f"[e7] seed {seed} ...", flush=True)
        per_seed.append(run_seed(size, seed, root, names))
        print(f"[e7] seed {seed}: {per_seed[-1]['wall_s']:.0f}s", flush=True)
    plan = PLANS[size]
    res = {
        "experiment": "e7_wang",
        "size": size,
        "seeds": seeds,
        "sizes": dataclasses.asdict(BASES[size]),
        "plan": dataclasses.asdict(plan),
        "variants": {
            n: {"algorithm": a, "overrides": o} for n, (a, o) in variants(plan).items() if n in names
        },
        "ppo_steps_per_iteration": ppo_steps_per_iteration(BASES[size]),
        "eval": "one sample per held-out prompt at temperature 1, sampling seed 1000 + seed for every checkpoint",
        "statistics": "mean, sample std (ddof 1), 95% Student-t half-width t(0.975, n-1) * std / sqrt(n)",
        "final": final_stats(per_seed),
        "matched": matched(per_seed, plan),
        "dynamics": dynamics(per_seed, [n for n in ("dpo", "ppo") if n in names]),
        "per_seed": per_seed,
        "code_commit": git_commit(),
        "gold_score_commit": git_commit("jaxrlhf/tasks/reviews.py"),
        "uncommitted_files": uncommitted("jaxrlhf"),
        "wall_s_total": round(time.perf_counter() - t0, 1),
        "hardware": q.hardware(),
    }
    q.write_outputs(
        out,
        table_markdown(res),
        res,
        lambda path: plot_dynamics(per_seed, path, [n for n in ("dpo", "ppo") if n in names]),
        "dynamics.png",
    )
    plot_gold_vs_kl(per_seed, os.path.join(out, "gold_vs_kl.png"))
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default="docs/results/e7")
    ap.add_argument("--workdir", default=os.path.join("workdirs", "e7"))
    ap.add_argument("--smoke", action="store_true", help="toy sizes (seconds; the test uses it)")
    ap.add_argument("--methods", default="", help="comma-separated subset of the variants (default: all)")
    a = ap.parse_args(argv)
    size = "smoke" if a.smoke else "e7"
    every = list(variants(PLANS[size]))
    names = [m for m in a.methods.split(",") if m] or every
    if a.seeds < 1 or set(names) - set(every) or not {"dpo", "ppo"} & set(names):
        raise ValueError(
            f"--seeds={a.seeds} --methods={a.methods!r}: need >= 1 seed and variants from {every}"
        )
    missing_plain = {PLAIN[variants(PLANS[size])[n][0]] for n in names} - set(names)
    if missing_plain:
        raise ValueError(f"--methods: the matched-KL comparison needs the plain {sorted(missing_plain)} too")
    res = run(size, a.seeds, a.workdir, a.out, names)
    print(table_markdown(res), flush=True)
    print(f"[e7] {res['wall_s_total']:.0f}s wall; results in {a.out}", flush=True)
    return res


if __name__ == "__main__":
    main()
