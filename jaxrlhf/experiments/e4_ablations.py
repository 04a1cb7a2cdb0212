r"""E4: PPO ablations of Xu et al. 2024 (their Table: batch size, advantage normalisation, EMA reference).

On the quickstart's synthetic-review task (``jaxrlhf.quickstart``): one SFT model and one
Bradley-Terry reward model (quickstart stages a-d, seed 0, shared by every run), then PPO from the
SFT model against the reward model in four variants, each run with ``--seeds`` PPO seeds
(``config.seed``: rollout sampling, minibatch order, critic head):

  * ``recipe``       the study's recipe: rollout batch 512, advantage whitening, EMA reference 0.99;
  * ``small_batch``  rollout batch 64 at EQUAL total rollouts and EQUAL optimizer steps
                     (8x the iterations; minibatch 64, so 2 steps per iteration instead of 16);
  * ``no_whiten``    ``config.ppo.whiten_advantages = False``;
  * ``no_ema``       ``config.ref.ema_decay = 1.0`` (frozen SFT reference).

Every policy is judged on the quickstart's held-out prompts by the gold scorer
(``jaxrlhf.quickstart.compare_policies``): gold reward, KL(policy || SFT) and win rate vs SFT.

Command (2 CPU cores; see docs/experiments_e4_e5.md for the measured wall time):
  python -m jaxrlhf.experiments.e4_ablations --seeds=3 --out=docs/results/e4

Writes ``table.md``, ``results.json`` and ``reward_vs_kl.png`` to ``--out``; intermediate runs live
in ``--workdir`` (default ``workdirs/e4``; finished runs are reused). ``--smoke`` runs toy sizes.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import numpy as np

# Runnable as a plain script from a checkout: the repository root holds the jaxrlhf package.
from jaxrlhf import quickstart as q

# Quickstart sizes, shrunk so that the full experiment (3 seeds x 4 variants) fits ~15 min on 2 cores.
SIZES = {
    "e4": dataclasses.replace(
        q.SIZES["full"], sft_steps=400, rm_steps=100, ppo_iterations=4, ppo_epochs=2, progress_bar=False
    ),
    "e4_smoke": dataclasses.replace(q.SIZES["smoke"], ppo_iterations=2, ppo_rollout_batch=16),
}
# name -> (rollout batch multiplier of the recipe's, whiten advantages, EMA decay or None = size default)
VARIANTS = {
    "recipe": dict(batch_div=1, whiten=True, ema=None),
    "small_batch": dict(batch_div=8, whiten=True, ema=None),
    "no_whiten": dict(batch_div=1, whiten=False, ema=None),
    "no_ema": dict(batch_div=1, whiten=True, ema=1.0),
}
METRICS = ("gold_reward", "kl_to_sft", "win_rate_vs_sft", "response_length")


def register_sizes() -> None:
    """Adds this experiment's sizes to ``quickstart.SIZES`` (read by ``configs/quickstart/*.py``)."""
    q.SIZES.update(SIZES)


def base_stages(size: str, p: q.Paths) -> dict:
    """Quickstart stages a-d (data, SFT, pairs, reward model) in ``p.workdir``; reused when done."""
    s, out = q.SIZES[size], {}
    for stage in ("data", "sft", "pairs", "reward"):
        if q.stage_done(stage, p):
            continue
        t0 = time.perf_counter()
        if stage == "data":
            q.stage_data(s, p)
        elif stage == "pairs":
            out["pairs"] = q.stage_pairs(s, p)
        else:
            out[stage] = q.train_stage(stage, size, p)["last"]
        print(f"[e4] stage {stage}: {time.perf_counter() - t0:.1f}s", flush=True)
    return out


def ppo_config(size: str, p: q.Paths, variant: str, seed: int):
    """``configs/quickstart/ppo.py`` with the variant's batch / whitening / EMA and the seed."""
    s, v = q.SIZES[size], VARIANTS[variant]
    c = q.load_config("ppo", size, p.workdir)
    c.seed = seed
    batch = s.ppo_rollout_batch // v["batch_div"]
    c.ppo.rollout_batch_size = batch
    c.ppo.minibatch_size = min(s.ppo_minibatch, batch)
    c.ppo.iterations = s.ppo_iterations * v["batch_div"]  # equal total rollouts
    c.ppo.whiten_advantages = v["whiten"]
    if v["ema"] is not None:
        c.ref.ema_decay = v["ema"]
    c.checkpoint.every = c.ppo.iterations
    c.log_every = max(1, c.ppo.iterations // 4)
    return c


def run(
    size: str,
    seeds: int,
    workdir: str,
    out: str,
    variants: tuple[str, ...] = tuple(VARIANTS),
    train_only: bool = False,
) -> dict:
    from jaxrlhf import registry

    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ValueError(f"e4: unknown variants {unknown}; expected some of {list(VARIANTS)}")
    register_sizes()
    t_start = time.perf_counter()
    p = q.Paths(workdir)
    os.makedirs(workdir, exist_ok=True)
    base = base_stages(size, p)
    policies, train_last, settings = {}, {}, {}
    for variant in variants:
        for seed in range(seeds):
            name = f"{variant}/s{seed}"
            run_dir = os.path.join(workdir, "ppo_" + variant, f"seed{seed}")
            c = ppo_config(size, p, variant, seed)
            settings[variant] = {
                "rollout_batch_size": c.ppo.rollout_batch_size,
                "iterations": c.ppo.iterations,
                "minibatch_size": c.ppo.minibatch_size,
                "epochs": c.ppo.epochs,
                "whiten_advantages": c.ppo.whiten_advantages,
                "ema_decay": c.ref.ema_decay,
            }
            if not os.path.exists(os.path.join(run_dir, "hf", "config.json")):
                t0 = time.perf_counter()
                result = registry.run(c, run_dir)
                hist = result.get("history") or [result.get("metrics", {})]
                train_last[name] = q._floats(hist[-1])
                print(f"[e4] ppo {name}: {time.perf_counter() - t0:.1f}s", flush=True)
            policies[name] = os.path.join(run_dir, "hf")
    if train_only:
        return {"policies": policies, "ppo_train_last": train_last}
    s = q.SIZES[size]
    eval_cfg = q.load_config("evaluate", size, workdir)
    rows = q.compare_policies(
        eval_cfg, {"sft": p.sft_export, **policies}, p.sft_export, batch_size=s.eval_batch, seed=s.seed + 20
    )
    table = {"sft": {m: [rows["sft"][m]] for m in METRICS}}
    for variant in variants:
        table[variant] = {m: [rows[f"{variant}/s{i}"][m] for i in range(seeds)] for m in METRICS}
    summary = {
        name: {m: {"mean": float(np.mean(v)), "std": float(np.std(v)), "values": v} for m, v in r.items()}
        for name, r in table.items()
    }
    results = {
        "experiment": "E4 PPO ablations (synthetic reviews)",
        "size": size,
        "seeds": seeds,
        "sizes": dataclasses.asdict(s),
        "variants": settings,
        "table": summary,
        "per_run": rows,
        "base_stages": base,
        "ppo_train_last": train_last,
        "eval_prompts": rows["sft"]["prompts"],
        "wall_s": round(time.perf_counter() - t_start, 1),
        "hardware": q.hardware(),
    }
    write_outputs(results, out)
    return results


def _pm(d: dict, fmt: str) -> str:
    return f"{d['mean']:{fmt}} ± {d['std']:{fmt}}"


def table_markdown(res: dict) -> str:
    lines = [
        "| variant | rollout batch × iterations | whiten adv. | EMA decay | gold reward | KL to SFT (nats/seq) "
        "| win rate vs SFT | response length |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in res["table"].items():
        v = res["variants"].get(name)
        setting = (
            f"{v['rollout_batch_size']} × {v['iterations']} | {'on' if v['whiten_advantages'] else 'off'} | "
            f"{v['ema_decay']:g}"
            if v
            else "— | — | —"
        )
        lines.append(
            f"| {name} | {setting} | {_pm(r['gold_reward'], '.3f')} | {_pm(r['kl_to_sft'], '.2f')} | "
            f"{_pm(r['win_rate_vs_sft'], '.3f')} | {_pm(r['response_length'], '.1f')} |"
        )
    return "\n".join(lines)


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=120)
    for name, r in res["table"].items():
        ax.errorbar(
            r["kl_to_sft"]["mean"], r["gold_reward"]["mean"], xerr=r["kl_to_sft"]["std"],
            yerr=r["gold_reward"]["std"], fmt="o", ms=7, capsize=3,
            label=f"{name} (win {r['win_rate_vs_sft']['mean']:.2f})",
        )  # fmt: skip
    ax.set_xlabel("KL(policy || SFT), nats per sequence")
    ax.set_ylabel("gold reward (held-out prompts)")
    ax.set_title(f"E4 PPO ablations, mean ± std over {res['seeds']} seeds")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_outputs(res: dict, out: str) -> None:
    q.write_outputs(out, table_markdown(res), res, lambda path: plot(res, path), "reward_vs_kl.png")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default="docs/results/e4")
    ap.add_argument("--workdir", default=os.path.join("workdirs", "e4"))
    ap.add_argument("--smoke", action="store_true", help="toy sizes (seconds; the tests use it)")
    ap.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {list(VARIANTS)}"
    )
    ap.add_argument("--train_only", action="store_true", help="train the PPO runs, skip evaluation")
    a = ap.parse_args(argv)
    if a.seeds < 1:
        raise ValueError(f"--seeds={a.seeds}: need at least 1")
    res = run(
        "e4_smoke" if a.smoke else "e4", a.seeds, a.workdir, a.out, tuple(a.variants.split(",")), a.train_only
    )
    if a.train_only:
        return res
    print(table_markdown(res), flush=True)
    print(f"[e4] {res['wall_s']:.0f}s wall; results in {a.out}", flush=True)
    return res


if __name__ == "__main__":
    main()
