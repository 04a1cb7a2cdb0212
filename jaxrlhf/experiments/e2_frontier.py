r"""E2: PPO vs DPO vs DPO-Iter on synthetic reviews - gold reward at matched KL, win rate vs SFT.

    python -m jaxrlhf.experiments.e2_frontier --seeds=3 --out=docs/results/e2 [--size=mini|smoke]

Per seed, the quickstart pipeline (``jaxrlhf.quickstart``: data, SFT, best/worst pairs, reward model,
DPO, PPO) runs at a reduced size (``SIZES["mini"]`` below, to fit 3 seeds in ~15 min on 2 CPU cores),
then each method is trained at several strengths to trace its reward-KL frontier:

  DPO       beta in ``dpo_betas`` on the SFT model's best/worst pairs (offline, frozen SFT reference);
  DPO-Iter  ``config.algorithm = "dpo_iter"``: rounds of sampling from the current policy, labelling
            best/worst with the *learned reward model* (the same labeller PPO optimises), DPO steps;
            one run per beta in ``iter_betas``;
  PPO       the study's recipe (whitened advantages, EMA reference) at each ``ppo_kl_coefs``.

Every policy is scored on held-out prompts by the gold scorer (``quickstart.compare_policies``):
gold reward, KL(policy || SFT) in nats per sequence, win rate vs SFT samples. "Gold reward at
matched KL" interpolates each method's frontier (SFT at KL 0 included, points sorted by KL, linear)
at the KL targets ``kl_targets``; a target beyond a method's largest KL is left out (no
extrapolation). Results: ``<out>/table.md``, ``results.json``, ``frontier.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import time
from typing import Any

# Runnable as a plain script from a checkout: the repository root holds the jaxrlhf package.
from jaxrlhf import config_defaults as d
from jaxrlhf import quickstart as q
from jaxrlhf.experiments.common import MINI, base_stages, seed_paths, train

BASES = {"mini": MINI, "smoke": q.SIZES["smoke"]}


@dataclasses.dataclass(frozen=True)
class Sweep:
    """The strengths each method is trained at (one policy = one frontier point)."""

    dpo_betas: tuple[float, ...]
    iter_betas: tuple[float, ...]
    ppo_kl_coefs: tuple[float, ...]
    iter_rounds: int
    iter_prompts_per_round: int
    kl_targets: tuple[float, ...]


SWEEPS = {
    "mini": Sweep((0.1, 0.5), (0.1,), (0.05, 0.2), 4, 64, (1.0, 2.0, 4.0)),
    "smoke": Sweep((0.1,), (0.1,), (0.05,), 2, 8, (0.5,)),
}
METHODS = ("dpo", "dpo_iter", "ppo")


def register_size(size: str, seed: int) -> str:
    """Registers ``BASES[size]`` with ``seed`` in ``quickstart.SIZES`` (the stage configs read it)."""
    if size not in BASES:
        raise ValueError(f"--size={size!r}: expected one of {sorted(BASES)}")
    name = f"exp_{size}_s{seed}"
    q.SIZES[name] = dataclasses.replace(BASES[size], seed=seed)
    return name


def dpo_config(size_name: str, p: q.Paths, beta: float, **overrides):
    """``configs/quickstart/dpo.py`` with ``dpo.beta = beta`` and dotted-key ``overrides``."""
    c = q.load_config("dpo", size_name, p.workdir)
    c.dpo.beta = beta
    for key, value in overrides.items():
        c.update_from_flattened_dict({key: value})
    return c


def dpo_iter_config(size_name: str, p: q.Paths, beta: float, rounds: int, prompts_per_round: int):
    """DPO-Iter from the SFT model, labelled by the learned reward model (keys: configs/tiny/dpo_iter.py)."""
    s = q.SIZES[size_name]
    c = d.base("dpo_iter")
    c.seed = s.seed
    c.model = d.model(p.sft_export)
    c.model.dtype = "float32"
    c.tokenizer = p.tokenizer
    c.data = d.data(
        path=p.train_prompts,
        max_prompt_length=s.max_prompt_length,
        max_length=s.max_prompt_length + s.max_new_tokens,
        bucket=False,
    )
    c.reward = d.reward(model_path=p.rm_export, missing_eos_penalty=1.0)
    c.reward.model.dtype = "float32"
    c.ref = d.ref(ema_decay=1.0)
    c.generation = d.generation(max_new_tokens=s.max_new_tokens, temperature=1.0)
    c.dpo = dict(beta=beta, label_smoothing=0.0, loss_type="sigmoid", nll_coef=0.0)
    steps = max(1, s.dpo_steps // rounds)  # the same number of DPO steps as offline DPO
    c.dpo_iter = dict(
        rounds=rounds,
        prompts_per_round=prompts_per_round,
        samples_per_prompt=s.pair_samples,
        steps_per_round=steps,
        reset_reference=True,
    )
    c.batch_size = min(s.pair_batch, prompts_per_round)
    c.optim = d.optim(lr=s.dpo_lr, warmup_steps=0, schedule="constant")
    c.checkpoint.every = rounds * steps
    c.log_every = max(1, steps)
    c.progress_bar = False
    c.lock()
    return c


def ppo_config(size_name: str, p: q.Paths, kl_coef: float):
    c = q.load_config("ppo", size_name, p.workdir)
    c.ppo.kl_coef = kl_coef
    return c


def interpolate(points: list[tuple[float, float]], x: float) -> float:
    """Piecewise-linear ``y(x)`` through ``points`` (sorted by x); NaN outside their range."""
    pts = sorted(points)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return math.nan


def run_seed(size: str, seed: int, root: str) -> dict[str, Any]:
    """Every E2 policy of one seed, evaluated; returns ``{"rows": name -> metrics, "wall_s"}``."""
    t0 = time.perf_counter()
    name, p, sw = register_size(size, seed), seed_paths(root, seed), SWEEPS[size]
    base_stages(name, p)
    policies = {"sft": p.sft_export}
    for beta in sw.dpo_betas:
        if beta == q.SIZES[name].dpo_beta:  # the quickstart's DPO stage: the same config, trained already
            policies[f"dpo@b={beta:g}"] = p.export("dpo")
        else:
            policies[f"dpo@b={beta:g}"] = train(dpo_config(name, p, beta), p.stage_dir(f"e2_dpo_b{beta:g}"))
    for beta in sw.iter_betas:
        cfg = dpo_iter_config(name, p, beta, sw.iter_rounds, sw.iter_prompts_per_round)
        policies[f"dpo_iter@b={beta:g}"] = train(cfg, p.stage_dir(f"e2_dpo_iter_b{beta:g}"))
    for kl in sw.ppo_kl_coefs:
        policies[f"ppo@kl={kl:g}"] = train(ppo_config(name, p, kl), p.stage_dir(f"e2_ppo_kl{kl:g}"))
    s = q.SIZES[name]
    rows = q.compare_policies(
        q.load_config("evaluate", name, p.workdir),
        policies,
        p.sft_export,
        batch_size=s.eval_batch,
        seed=s.seed + 20,
    )
    return {"rows": rows, "wall_s": round(time.perf_counter() - t0, 1)}


def method_of(policy: str) -> str:
    return policy.split("@", 1)[0]


def summarize(per_seed: list[dict[str, Any]], kl_targets) -> dict[str, Any]:
    """Mean ± std over seeds of every policy's metrics, and each method's gold reward at matched KL."""
    import numpy as np

    names = list(per_seed[0]["rows"])
    policies = {}
    for n in names:
        policies[n] = {}
        for key in ("gold_reward", "kl_to_sft", "win_rate_vs_sft", "response_length"):
            v = np.asarray([r["rows"][n][key] for r in per_seed])
            policies[n][key] = {"mean": float(v.mean()), "std": float(v.std(ddof=1) if len(v) > 1 else 0.0)}
    matched = {}
    for m in METHODS:
        matched[m] = {}
        for target in kl_targets:
            vals = []
            for r in per_seed:
                pts = [(0.0, r["rows"]["sft"]["gold_reward"])]
                pts += [(x["kl_to_sft"], x["gold_reward"]) for n, x in r["rows"].items() if method_of(n) == m]
                vals.append(interpolate(pts, target))
            v = np.asarray(vals)
            ok = v[~np.isnan(v)]
            matched[m][f"{target:g}"] = {
                "mean": float(ok.mean()) if len(ok) else None,
                "std": float(ok.std(ddof=1)) if len(ok) > 1 else None,
                "seeds": int(len(ok)),
            }
    return {"policies": policies, "gold_at_matched_kl": matched}


def _pm(x: dict) -> str:
    if x.get("mean") is None:
        return "-"
    return f"{x['mean']:.3f} ± {x['std']:.3f}" if x.get("std") is not None else f"{x['mean']:.3f}"


def format_tables(summary: dict[str, Any], n_seeds: int) -> str:
    lines = [
        f"Mean ± std over {n_seeds} seeds (held-out prompts, gold scorer).",
        "",
        "| policy | gold reward | KL to SFT (nats/seq) | win rate vs SFT | response length |",
        "|---|---|---|---|---|",
    ]
    for n, r in summary["policies"].items():
        lines.append(
            f"| {n} | {_pm(r['gold_reward'])} | {r['kl_to_sft']['mean']:.2f} ± {r['kl_to_sft']['std']:.2f} "
            f"| {_pm(r['win_rate_vs_sft'])} | {r['response_length']['mean']:.1f} |"
        )
    targets = list(next(iter(summary["gold_at_matched_kl"].values())))
    lines += [
        "",
        "Gold reward at matched KL (each seed's frontier interpolated linearly, SFT = KL 0; '-' = the "
        "method never reached that KL; (n) = seeds that did):",
        "",
        "| method | " + " | ".join(f"KL = {t}" for t in targets) + " |",
        "|---|" + "---|" * len(targets),
    ]
    for m, by_t in summary["gold_at_matched_kl"].items():
        cells = [f"{_pm(by_t[t])} ({by_t[t]['seeds']})" for t in targets]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_frontier(per_seed: list[dict[str, Any]], summary: dict[str, Any], out_path: str) -> str | None:
    """Gold reward vs KL to SFT: every seed's points (faint) and the seed means ± std per policy."""
    plt = q.pyplot(out_path)
    if plt is None:
        return None
    colors = {"sft": "tab:gray", "dpo": "tab:blue", "dpo_iter": "tab:green", "ppo": "tab:orange"}
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    for r in per_seed:
        for n, x in r["rows"].items():
            ax.plot(x["kl_to_sft"], x["gold_reward"], ".", color=colors[method_of(n)], alpha=0.3)
    for m in ("sft", *METHODS):
        pts = [(n, x) for n, x in summary["policies"].items() if method_of(n) == m]
        pts.sort(key=lambda t: t[1]["kl_to_sft"]["mean"])
        xs = [x["kl_to_sft"]["mean"] for _, x in pts]
        ys = [x["gold_reward"]["mean"] for _, x in pts]
        ax.errorbar(
            xs, ys, xerr=[x["kl_to_sft"]["std"] for _, x in pts],
            yerr=[x["gold_reward"]["std"] for _, x in pts],
            fmt="o-", color=colors[m], capsize=3, label=m.upper().replace("_", "-"),
        )  # fmt: skip
        for (n, _), x, y in zip(pts, xs, ys, strict=True):
            if "@" in n:
                ax.annotate(
                    n.split("@", 1)[1], (x, y), fontsize=7, xytext=(3, -9), textcoords="offset points"
                )
    ax.set_xlabel("KL(policy || SFT), nats per sequence")
    ax.set_ylabel("gold reward (held-out prompts)")
    ax.set_title(f"E2: reward-KL frontier, synthetic reviews ({len(per_seed)} seeds)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    return out_path


def main(argv=None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3, help="number of seeds (0 .. seeds-1)")
    ap.add_argument("--out", default="docs/results/e2", help="results directory")
    ap.add_argument("--size", default="mini", choices=sorted(BASES), help="mini: the reported run")
    ap.add_argument("--smoke", action="store_true", help="same as --size=smoke")
    ap.add_argument("--workdir", default="workdirs/experiments", help="stage outputs (shared with E3)")
    args = ap.parse_args(argv)
    size = "smoke" if args.smoke else args.size
    root = os.path.join(args.workdir, size)
    t0 = time.perf_counter()
    per_seed = []
    for seed in range(args.seeds):
        print(f"[e2] seed {seed} ...", flush=True)
        per_seed.append(run_seed(size, seed, root))
    summary = summarize(per_seed, SWEEPS[size].kl_targets)
    results = {
        "experiment": "e2_frontier",
        "size": size,
        "sizes": dataclasses.asdict(BASES[size]),
        "sweep": dataclasses.asdict(SWEEPS[size]),
        "seeds": args.seeds,
        "per_seed": per_seed,
        "summary": summary,
        "wall_s_total": round(time.perf_counter() - t0, 1),
        "hardware": q.hardware(),
    }
    table = format_tables(summary, args.seeds)
    q.write_outputs(
        args.out, table, results, lambda path: plot_frontier(per_seed, summary, path), "frontier.png"
    )
    print("\n" + table + f"\n\n[e2] {results['wall_s_total']:.0f}s; results in {args.out}/", flush=True)
    return results


if __name__ == "__main__":
    main()
