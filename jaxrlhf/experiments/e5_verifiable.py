r"""E5: verifiable answers - pass@1 and pass@k of SFT, DPO, DPO-Iter and PPO with a programmatic checker.

A stand-in for the code-competition experiments of Xu et al. 2024 (APPS / CodeContests) on
``jaxrlhf.tasks.verifiable`` (easy difficulty: 2-operand arithmetic, reverse / sort / max / min of
3 digits; ``fit``, whose checker gives partial credit, is left out so that every score is 1/0):

  a. data     ``make_sft_examples(noise=NOISE)`` (a fraction of the SFT answers are plausible wrong
              answers, so that SFT is mediocre), train prompts and held-out prompts (never an SFT prompt).
  b. sft      the quickstart's tiny Llama (``configs/quickstart/sft.py``) trained from scratch (seed 0,
              shared by every run below).
  c. pairs    per seed: k samples per train prompt from SFT; chosen = a correct sample (score 1),
              rejected = an incorrect one (the worst); prompts without both are skipped.
  d. dpo      per seed: DPO (``configs/quickstart/dpo.py``, frozen SFT reference) on those pairs.
  e. dpo_iter per seed: iterative DPO (``configs/tiny/dpo_iter.py`` keys) from SFT; each round samples
              from the current policy, labels with the checker, best vs worst, reference reset per round.
  f. ppo      per seed: PPO (``configs/quickstart/ppo.py`` keys: whitening, EMA reference) with the
              checker as reward (``config.reward.fn = "jaxrlhf.tasks.verifiable:reward"``), critic
              initialised from SFT.
  g. eval     per seed: ``jaxrlhf.evaluate.evaluate`` with N samples per held-out prompt: pass@1 and
              pass@k (the unbiased estimator of Chen et al. 2021),
              KL to SFT.

Command (2 CPU cores; see docs/experiments_e4_e5.md for the measured wall time):
  python -m jaxrlhf.experiments.e5_verifiable --seeds=3 --out=docs/results/e5

Writes ``table.md``, ``results.json`` and ``pass_at_k.png`` to ``--out``; runs live in ``--workdir``
(default ``workdirs/e5``; finished runs are reused). ``--smoke`` runs toy sizes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import numpy as np

from jaxrlhf import config_defaults as d
from jaxrlhf import quickstart as q

REWARD_FN = "jaxrlhf.tasks.verifiable:reward"
NOISE = 0.3  # fraction of SFT rows with a plausible wrong answer
DIFFICULTY = "easy"
# Single-answer tasks (1/0 checker, so jaxrlhf.evaluate reports pass@k); ``fit`` (fractional credit) is left out.
TASKS = ("arith", "reverse", "sort", "max", "min")
_E5 = dataclasses.replace(
    q.SIZES["full"],
    n_sft=4000,
    n_train_prompts=512,
    n_eval_prompts=256,
    max_prompt_length=10,
    max_length=18,
    max_new_tokens=8,
    sft_steps=300,
    pair_samples=4,
    dpo_steps=60,
    dpo_lr=5e-4,
    ppo_iterations=8,
    ppo_rollout_batch=128,
    ppo_minibatch=64,
    ppo_lr=2e-4,
    progress_bar=False,
)
SIZES = {
    "e5": _E5,
    "e5_smoke": dataclasses.replace(
        q.SIZES["smoke"], max_prompt_length=10, max_length=18, max_new_tokens=8, n_eval_prompts=16
    ),
}
# Per size: DPO-Iter rounds / prompts per round / steps per round, eval samples per prompt (the n of pass@k).
EXTRA = {
    "e5": dict(iter_rounds=3, iter_prompts=128, iter_steps=20, eval_samples=8),
    "e5_smoke": dict(iter_rounds=2, iter_prompts=8, iter_steps=2, eval_samples=4),
}
POLICIES = ("sft", "dpo", "dpo_iter", "ppo")


def stage_data(s: q.Sizes, p: q.Paths) -> dict:
    from jaxrlhf.tasks import common, verifiable

    os.makedirs(os.path.dirname(p.sft_data), exist_ok=True)
    rows = verifiable.make_sft_examples(s.n_sft, seed=s.seed, noise=NOISE, difficulty=DIFFICULTY, tasks=TASKS)
    common.write_jsonl(
        p.sft_data, ({"prompt": r["prompt"], "completion": " " + r["completion"]} for r in rows)
    )
    seen = {r["prompt"] for r in rows}
    verifiable.write_prompts_jsonl(
        p.train_prompts, s.n_train_prompts, seed=s.seed + 1, difficulty=DIFFICULTY, tasks=TASKS
    )
    held = verifiable.make_prompts(
        s.n_eval_prompts, seed=s.seed + 2, difficulty=DIFFICULTY, tasks=TASKS, exclude=seen
    )
    common.write_jsonl(p.eval_prompts, held)
    return {"sft_rows": len(rows), "sft_correct": float(np.mean([r["correct"] for r in rows]))}


def stage_pairs(s: q.Sizes, p: q.Paths, seed: int, out_path: str) -> dict:
    """k SFT samples per train prompt; chosen = a correct one, rejected = the worst-scored one."""
    from jaxrlhf.tasks import common, verifiable

    rows = {r["prompt"]: r for r in common.read_jsonl(p.train_prompts)}
    prompts, samples = q.sample_prompts(p.sft_export, p.train_prompts, s, s.pair_samples, seed, "pairs")
    flat_p = [x for x, row in zip(prompts, samples, strict=True) for _ in row]
    flat_r = [y for row in samples for y in row]
    scores = verifiable.reward(flat_p, flat_r, [rows[x] for x in flat_p]).reshape(len(prompts), -1)
    keep = scores.max(axis=1) >= 1.0  # a correct sample exists
    pairs = common.best_worst_pairs(
        [x for x, k in zip(prompts, keep, strict=True) if k],
        [y for y, k in zip(samples, keep, strict=True) if k],
        scores[keep],
    )
    pairs = [r for r in pairs if r["chosen"] and r["rejected"]]  # an empty side has nothing to learn
    # Too few on-policy pairs (a weak SFT model, e.g. at smoke size): top up with pairs whose chosen
    # side is the reference answer (off-policy), counted in the stats; never used silently.
    topped = 0
    for x, ys, sc in zip(prompts, samples, scores, strict=True):
        if len(pairs) >= 2 * s.pair_batch:
            break
        if sc.max() < 1.0 and ys[int(np.argmin(sc))]:
            pairs.append({"prompt": x, "chosen": rows[x]["answer"], "rejected": ys[int(np.argmin(sc))]})
            topped += 1
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    common.write_preference_jsonl(out_path, pairs)
    return {
        "prompts": len(prompts),
        "pairs": len(pairs),
        "pairs_reference_chosen": topped,
        "sft_train_pass1": float((scores >= 1).mean()),
    }


def dpo_config(size: str, p: q.Paths, seed: int, pairs: str):
    c = q.load_config("dpo", size, p.workdir)
    c.seed = seed
    c.data.path = pairs
    return c


def dpo_iter_config(size: str, p: q.Paths, seed: int):
    s, x = q.SIZES[size], EXTRA[size]
    c = d.base("dpo_iter")
    c.seed = seed
    c.mesh = dict(data=1, fsdp=1, tensor=1)  # one device, whatever the host has
    c.progress_bar = False
    c.model = d.model(p.sft_export)
    c.model.dtype = "float32"
    c.tokenizer = p.tokenizer
    c.data = d.data(
        path=p.train_prompts, max_prompt_length=s.max_prompt_length, max_length=s.max_length, bucket=False
    )
    c.reward = d.reward(fn=REWARD_FN, shaping=False, missing_eos_penalty=0.0)
    c.generation = d.generation(max_new_tokens=s.max_new_tokens, temperature=1.0)
    c.dpo.beta = s.dpo_beta
    c.dpo_iter.rounds = x["iter_rounds"]
    c.dpo_iter.prompts_per_round = x["iter_prompts"]
    c.dpo_iter.samples_per_prompt = s.pair_samples
    c.dpo_iter.steps_per_round = x["iter_steps"]
    c.batch_size = s.pair_batch
    c.optim = d.optim(lr=s.dpo_lr, warmup_steps=0, schedule="constant")
    c.checkpoint.every = x["iter_rounds"] * x["iter_steps"]
    c.log_every = x["iter_steps"]
    return c


def ppo_config(size: str, p: q.Paths, seed: int):
    c = q.load_config("ppo", size, p.workdir)
    c.unlock()
    c.seed = seed
    c.reward = d.reward(fn=REWARD_FN, missing_eos_penalty=0.0)
    c.critic.model = d.model(p.sft_export)
    c.critic.model.dtype = "float32"
    return c


def eval_config(size: str, p: q.Paths):
    c = q.load_config("evaluate", size, p.workdir)
    c.reward.fn = REWARD_FN
    return c


def run(size: str, seeds: int, workdir: str, out: str) -> dict:
    from jaxrlhf import evaluate, registry

    q.SIZES.update(SIZES)
    s, x = q.SIZES[size], EXTRA[size]
    t_start = time.perf_counter()
    p = q.Paths(workdir)
    os.makedirs(workdir, exist_ok=True)
    info: dict = {}
    if not q.stage_done("data", p):
        info["data"] = stage_data(s, p)
    if not q.stage_done("sft", p):
        info["sft"] = q.train_stage("sft", size, p)["last"]
    print(f"[e5] data + sft: {time.perf_counter() - t_start:.1f}s", flush=True)
    per_seed: dict = {}
    for seed in range(seeds):
        sd = os.path.join(workdir, f"seed{seed}")
        pairs = os.path.join(sd, "pairs.jsonl")
        if not os.path.exists(pairs):
            info[f"pairs/s{seed}"] = stage_pairs(s, p, 100 + seed, pairs)
        runs = {
            "dpo": lambda seed=seed, pairs=pairs: dpo_config(size, p, seed, pairs),
            "dpo_iter": lambda seed=seed: dpo_iter_config(size, p, seed),
            "ppo": lambda seed=seed: ppo_config(size, p, seed),
        }
        policies = {"sft": p.sft_export}
        for name, make in runs.items():
            run_dir = os.path.join(sd, name)
            if not os.path.exists(os.path.join(run_dir, "hf", "config.json")):
                t0 = time.perf_counter()
                result = registry.run(make(), run_dir)
                hist = result.get("history") or [result.get("metrics", {})]
                info[f"{name}/s{seed}"] = q._floats(hist[-1])
                print(f"[e5] {name} seed {seed}: {time.perf_counter() - t0:.1f}s", flush=True)
            policies[name] = os.path.join(run_dir, "hf")
        ec = eval_config(size, p)
        per_seed[seed] = {
            name: evaluate.evaluate(
                ec,
                path,
                reference=p.sft_export,
                samples=x["eval_samples"],
                batch_size=s.eval_batch,
                seed=seed,
            )
            for name, path in policies.items()
        }
        print(f"[e5] eval seed {seed}: {json.dumps({k: v['pass@1'] for k, v in per_seed[seed].items()})}")
    ks = [k for k in per_seed[0]["sft"] if k.startswith("pass@")]
    metrics = [*ks, "kl_to_reference", "response_length_mean"]
    table = {
        name: {
            m: {
                "mean": float(np.mean(v := [per_seed[i][name][m] for i in range(seeds)])),
                "std": float(np.std(v)),
                "values": v,
            }
            for m in metrics
        }
        for name in POLICIES
    }
    results = {
        "experiment": "E5 verifiable answers (pass@k)",
        "size": size,
        "seeds": seeds,
        "noise": NOISE,
        "difficulty": DIFFICULTY,
        "tasks": list(TASKS),
        "sizes": dataclasses.asdict(s),
        "extra": x,
        "table": table,
        "per_seed": per_seed,
        "stages": info,
        "wall_s": round(time.perf_counter() - t_start, 1),
        "hardware": q.hardware(),
    }
    write_outputs(results, out)
    return results


def table_markdown(res: dict) -> str:
    metrics = [m for m in next(iter(res["table"].values())) if m.startswith("pass@")] + ["kl_to_reference"]
    head = [m.replace("kl_to_reference", "KL to SFT (nats/seq)") for m in metrics]
    lines = ["| policy | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for name, r in res["table"].items():
        cells = [f"{r[m]['mean']:.3f} ± {r[m]['std']:.3f}" for m in metrics]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(res: dict, path: str, title: str = "E5 verifiable answers") -> None:
    """pass@k against k (log scale) for every policy of ``res["table"]``, mean ± std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=120)
    for name, r in res["table"].items():
        ks = sorted(int(m.split("@")[1]) for m in r if m.startswith("pass@"))
        ax.errorbar(
            ks, [r[f"pass@{k}"]["mean"] for k in ks], yerr=[r[f"pass@{k}"]["std"] for k in ks],
            marker="o", capsize=3, label=name,
        )  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k")
    ax.set_ylabel("pass@k (held-out prompts)")
    ax.set_title(f"{title}, mean ± std over {res['seeds']} seeds")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_outputs(res: dict, out: str) -> None:
    q.write_outputs(out, table_markdown(res), res, lambda path: plot(res, path), "pass_at_k.png")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default="docs/results/e5")
    ap.add_argument("--workdir", default=os.path.join("workdirs", "e5"))
    ap.add_argument("--smoke", action="store_true", help="toy sizes (seconds; the tests use it)")
    a = ap.parse_args(argv)
    if a.seeds < 1:
        raise ValueError(f"--seeds={a.seeds}: need at least 1")
    res = run("e5_smoke" if a.smoke else "e5", a.seeds, a.workdir, a.out)
    print(table_markdown(res), flush=True)
    print(f"[e5] {res['wall_s']:.0f}s wall; results in {a.out}", flush=True)
    return res


if __name__ == "__main__":
    main()
