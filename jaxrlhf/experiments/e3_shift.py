r"""E3: distribution shift - DPO on another model's samples vs on its own, and the remedies.

    python -m jaxrlhf.experiments.e3_shift --seeds=3 --out=docs/results/e3 [--size=mini|smoke]

Per seed (sizes and stage outputs shared with E2, ``jaxrlhf.experiments.e2_frontier``):

  model A   the quickstart SFT model (the policy's starting point and the DPO reference);
  model B   a second SFT model, another seed (``seed + 100``) and another data mix
            (``OTHER_MIX`` positive/negative/mixed reviews instead of 40/40/20);
  pairs     best/worst of k samples per train prompt, gold-labelled (DPO paper), drawn from A
            ("own") or from B ("other"); the same prompts;
  policies  (all start from A)
    dpo_own           DPO on A's pairs (the quickstart's DPO stage);
    dpo_other         DPO on B's pairs (preferences from a different distribution);
    sft_chosen        A fine-tuned on the chosen answers of B's pairs (no DPO);
    sft_chosen+dpo    then DPO on B's pairs with that model as start *and* reference
                      (the remedy: SFT on the preferred answers first, as in the DPO paper);
    dpo_other+nll     DPO on B's pairs with an NLL term on chosen (``dpo.nll_coef = NLL_COEF``).

All are judged on held-out prompts by the gold scorer against A's samples
(``quickstart.compare_policies``: gold reward, KL to A, win rate vs A), mean ± std over seeds;
also the log-likelihood gap: the mean per-token NLL of each pair set's chosen answers under A
(how far the preference data is from the policy). Results: ``<out>/table.md``, ``results.json``,
``shift.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import time
from typing import Any

from jaxrlhf import quickstart as q
from jaxrlhf.experiments import e2_frontier as e2

OTHER_MIX = (0.2, 0.2, 0.6)  # model B: mostly mixed reviews (A: 0.4, 0.4, 0.2)
OTHER_SEED_OFFSET = 100
NLL_COEF = 1.0
BETA = 0.1
POLICIES = ("sft", "dpo_own", "dpo_other", "sft_chosen", "sft_chosen+dpo", "dpo_other+nll")


def other_model(size: str, seed: int, root: str, a: q.Paths) -> q.Paths:
    """Model B (another seed and data mix) and its best/worst pairs on A's train prompts."""
    from jaxrlhf.tasks import reviews

    name_b = e2.register_size(size, seed + OTHER_SEED_OFFSET)
    b = q.Paths(os.path.join(root, f"seed{seed}_other"))
    os.makedirs(os.path.dirname(b.sft_data), exist_ok=True)
    if not os.path.exists(b.sft_data):
        s = q.SIZES[name_b]
        reviews.write_sft_jsonl(b.sft_data, s.n_sft, seed=s.seed, sentiment_mix=OTHER_MIX)
        for src, dst in ((a.train_prompts, b.train_prompts), (a.eval_prompts, b.eval_prompts)):
            shutil.copyfile(src, dst)  # the same prompts: only the sampling model differs
    e2.base_stages(name_b, b, stages=("sft", "pairs"))
    return b


def write_chosen_sft(pairs_path: str, out_path: str) -> int:
    """The chosen answers of a pair file as SFT rows ``{"prompt", "completion"}``."""
    from jaxrlhf.tasks import common

    rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in common.read_jsonl(pairs_path)]
    return common.write_jsonl(out_path, rows)


def sft_chosen_config(size_name: str, a: q.Paths, data_path: str):
    """``configs/quickstart/sft.py`` started from model A on ``data_path``, as long as DPO trains."""
    from jaxrlhf import config_defaults as d

    s = q.SIZES[size_name]
    c = q.load_config("sft", size_name, a.workdir)
    c.model = d.model(a.sft_export)
    c.model.dtype = "float32"
    c.data.path = data_path
    c.total_steps = s.dpo_steps
    c.batch_size = s.pair_batch
    c.optim = d.optim(lr=s.dpo_lr * 5, warmup_steps=s.dpo_steps // 10, schedule="constant")
    c.checkpoint.every = s.dpo_steps
    c.log_every = max(1, s.dpo_steps // 5)
    return c


def chosen_nll(policy_dir: str, pairs_path: str, size_name: str, p: q.Paths, limit: int = 256) -> float:
    """Mean per-token NLL of the chosen answers of ``pairs_path`` (first ``limit`` pairs) under a policy."""
    import jax
    import numpy as np

    from jaxrlhf import data as data_lib
    from jaxrlhf import evaluate
    from jaxrlhf.algorithms.common import response_logps
    from jaxrlhf.sharding import make_mesh, shard_batch

    s = q.SIZES[size_name]
    mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    tokenizer = data_lib.load_tokenizer(p.tokenizer)
    dcfg = data_lib.default_data_config(
        path=pairs_path, max_prompt_length=s.max_prompt_length, max_length=s.max_length, bucket=False,
        shuffle=False, max_samples=limit,
    )  # fmt: skip
    ds, _ = data_lib.build_datasets(dcfg, tokenizer, "preference")
    graphdef, params = evaluate.load_policy(policy_dir, "float32", mesh)
    n_dev = mesh.devices.size
    batch = max(n_dev, min(64, len(ds)) // n_dev * n_dev)  # shards evenly over the data axis
    it = data_lib.BatchIterator(ds, batch, shuffle=False, repeat=False, process_index=0, process_count=1)
    fn = jax.jit(lambda prm, seq: response_logps(graphdef, prm, seq))
    total, tokens = 0.0, 0.0
    for host in it:
        seq = {k[len("chosen_") :]: v for k, v in host.items() if k.startswith("chosen_")}
        lp = np.asarray(jax.device_get(fn(params, shard_batch(mesh, seq))))
        total += float(-lp.sum())
        tokens += float(np.asarray(seq["loss_mask"]).sum())
    return total / max(tokens, 1.0)


def run_seed(size: str, seed: int, root: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    name = e2.register_size(size, seed)
    a = e2.seed_paths(root, seed)
    e2.base_stages(name, a, stages=("data", "sft", "pairs", "dpo"))
    b = other_model(size, seed, root, a)
    chosen_path = os.path.join(a.workdir, "data", "e3_chosen_other.jsonl")
    if not os.path.exists(chosen_path):
        write_chosen_sft(b.pairs, chosen_path)
    policies = {"sft": a.sft_export, "dpo_own": a.export("dpo")}
    policies["dpo_other"] = e2.train(
        e2.dpo_config(name, a, BETA, **{"data.path": b.pairs}), a.stage_dir("e3_dpo_other")
    )
    policies["sft_chosen"] = e2.train(sft_chosen_config(name, a, chosen_path), a.stage_dir("e3_sft_chosen"))
    policies["sft_chosen+dpo"] = e2.train(
        e2.dpo_config(name, a, BETA, **{"data.path": b.pairs, "model.path": policies["sft_chosen"]}),
        a.stage_dir("e3_sft_chosen_dpo"),
    )
    policies["dpo_other+nll"] = e2.train(
        e2.dpo_config(name, a, BETA, **{"data.path": b.pairs, "dpo.nll_coef": NLL_COEF}),
        a.stage_dir("e3_dpo_other_nll"),
    )
    s = q.SIZES[name]
    rows = q.compare_policies(
        q.load_config("evaluate", name, a.workdir), policies, a.sft_export, batch_size=s.eval_batch,
        seed=s.seed + 20,
    )  # fmt: skip
    data_stats = {}
    for tag, pp in (("own", a), ("other", b)):
        with open(pp.pairs_stats) as f:
            st = json.load(f)
        data_stats[tag] = {
            "pairs": st["pairs"],
            "sampler_gold_mean": st["sft_gold_mean"],
            "chosen_gold_mean": st["chosen_gold_mean"],
            "rejected_gold_mean": st["rejected_gold_mean"],
            "chosen_nll_under_A": chosen_nll(a.sft_export, pp.pairs, name, a),
        }
    return {"rows": rows, "pairs": data_stats, "wall_s": round(time.perf_counter() - t0, 1)}


def summarize(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    import numpy as np

    def ms(values) -> dict[str, float]:
        v = np.asarray(values, dtype=float)
        return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}

    keys = ("gold_reward", "kl_to_sft", "win_rate_vs_sft", "response_length")
    out = {"policies": {n: {k: ms([r["rows"][n][k] for r in per_seed]) for k in keys} for n in POLICIES}}
    out["pairs"] = {
        tag: {k: ms([r["pairs"][tag][k] for r in per_seed]) for k in per_seed[0]["pairs"][tag]}
        for tag in ("own", "other")
    }
    gaps = {
        "dpo_other": [
            r["rows"]["dpo_own"]["gold_reward"] - r["rows"]["dpo_other"]["gold_reward"] for r in per_seed
        ],
        "sft_chosen+dpo": [
            r["rows"]["dpo_own"]["gold_reward"] - r["rows"]["sft_chosen+dpo"]["gold_reward"] for r in per_seed
        ],
        "dpo_other+nll": [
            r["rows"]["dpo_own"]["gold_reward"] - r["rows"]["dpo_other+nll"]["gold_reward"] for r in per_seed
        ],
    }
    out["gap_to_dpo_own"] = {k: ms(v) for k, v in gaps.items()}
    return out


def format_tables(summary: dict[str, Any], n_seeds: int) -> str:
    pm = e2._pm
    lines = [
        f"Mean ± std over {n_seeds} seeds; all policies start from SFT model A and are judged on held-out "
        "prompts by the gold scorer against A's samples.",
        "",
        "| policy | gold reward | KL to A (nats/seq) | win rate vs A | response length |",
        "|---|---|---|---|---|",
    ]
    for n, r in summary["policies"].items():
        lines.append(
            f"| {n} | {pm(r['gold_reward'])} | {r['kl_to_sft']['mean']:.2f} ± {r['kl_to_sft']['std']:.2f} "
            f"| {pm(r['win_rate_vs_sft'])} | {r['response_length']['mean']:.1f} |"
        )
    lines += [
        "",
        "Gap to DPO on its own samples (gold reward of dpo_own minus the policy's, per seed):",
        "",
        "| policy | gold-reward gap |",
        "|---|---|",
    ]
    lines += [f"| {n} | {pm(g)} |" for n, g in summary["gap_to_dpo_own"].items()]
    lines += [
        "",
        "The preference data (best/worst of k samples per prompt, gold-labelled):",
        "",
        "| pairs sampled from | pairs | sampler gold mean | chosen gold | rejected gold | chosen NLL under A "
        "(nats/token) |",
        "|---|---|---|---|---|---|",
    ]
    for tag, st in summary["pairs"].items():
        label = {"own": "A (own)", "other": "B (other)"}[tag]
        lines.append(
            f"| {label} | {st['pairs']['mean']:.0f} | {pm(st['sampler_gold_mean'])} "
            f"| {pm(st['chosen_gold_mean'])} "
            f"| {pm(st['rejected_gold_mean'])} | {pm(st['chosen_nll_under_A'])} |"
        )
    return "\n".join(lines)


def plot(per_seed: list[dict[str, Any]], summary: dict[str, Any], out_path: str) -> str | None:
    """Gold reward per policy (bars: mean ± std; dots: seeds) and gold reward vs KL to A."""
    plt = q.pyplot(out_path)
    if plt is None:
        return None
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    names = list(summary["policies"])
    colors = ["tab:gray", "tab:blue", "tab:red", "tab:olive", "tab:green", "tab:purple"]
    means = [summary["policies"][n]["gold_reward"]["mean"] for n in names]
    stds = [summary["policies"][n]["gold_reward"]["std"] for n in names]
    ax0.bar(range(len(names)), means, yerr=stds, color=colors, capsize=3, alpha=0.8)
    for i, n in enumerate(names):
        ax0.plot([i] * len(per_seed), [r["rows"][n]["gold_reward"] for r in per_seed], "k.", ms=4)
    ax0.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax0.set_ylabel("gold reward (held-out prompts)")
    ax0.set_title("E3: preferences from another model")
    for n, c in zip(names, colors, strict=True):
        r = summary["policies"][n]
        ax1.errorbar(
            r["kl_to_sft"]["mean"], r["gold_reward"]["mean"], xerr=r["kl_to_sft"]["std"],
            yerr=r["gold_reward"]["std"], fmt="o", color=c, capsize=3, label=n,
        )  # fmt: skip
    ax1.set_xlabel("KL(policy || A), nats per sequence")
    ax1.set_ylabel("gold reward")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    return out_path


def main(argv=None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3, help="number of seeds (0 .. seeds-1)")
    ap.add_argument("--out", default="docs/results/e3", help="results directory")
    ap.add_argument("--size", default="mini", choices=sorted(e2.BASES), help="mini: the reported run")
    ap.add_argument("--smoke", action="store_true", help="same as --size=smoke")
    ap.add_argument("--workdir", default="workdirs/experiments", help="stage outputs (shared with E2)")
    args = ap.parse_args(argv)
    size = "smoke" if args.smoke else args.size
    root = os.path.join(args.workdir, size)
    t0 = time.perf_counter()
    per_seed = []
    for seed in range(args.seeds):
        print(f"[e3] seed {seed} ...", flush=True)
        per_seed.append(run_seed(size, seed, root))
    summary = summarize(per_seed)
    results = {
        "experiment": "e3_shift",
        "size": size,
        "sizes": dataclasses.asdict(e2.BASES[size]),
        "other_mix": OTHER_MIX,
        "other_seed_offset": OTHER_SEED_OFFSET,
        "beta": BETA,
        "nll_coef": NLL_COEF,
        "seeds": args.seeds,
        "per_seed": per_seed,
        "summary": summary,
        "wall_s_total": round(time.perf_counter() - t0, 1),
        "hardware": q.hardware(),
    }
    table = format_tables(summary, args.seeds)
    q.write_outputs(args.out, table, results, lambda path: plot(per_seed, summary, path), "shift.png")
    print("\n" + table + f"\n\n[e3] {results['wall_s_total']:.0f}s; results in {args.out}/", flush=True)
    return results


if __name__ == "__main__":
    main()
