r"""E8: critic-free policy optimisation vs PPO with a critic on verifiable answers (pass@1 / pass@k).

PPO with GAE and a critic (the study's recipe, E5's PPO) against GRPO, Dr.GRPO, RLOO and REINFORCE++
(``algorithm="grpo"``) on E5's task (``jaxrlhf.tasks.verifiable``, easy arithmetic / list tasks, a
1/0 checker as the reward), from one shared SFT model, at **equal samples and equal optimizer
steps**: every method sees ``iterations x rollout`` sampled responses (PPO: ``rollout_batch``
prompts x 1; the critic-free family: ``rollout_batch / G`` prompts x ``G`` samples) and takes
``iterations x epochs x rollout / minibatch`` optimizer steps with the same learning rate, the same
EMA reference (0.99) and the same KL coefficient (0.05).

  a. data + sft  E5's stages (``e5_verifiable.stage_data``, the quickstart SFT model, seed 0).
  b. ppo         per seed: ``e5_verifiable.ppo_config`` (critic from SFT, KL k1 in the reward,
                 whitened GAE advantages, running reward normalisation).
  c. grpo ...    per seed and estimator (``ESTIMATORS``), each in its published form:
                 grpo (seq_mean, KL k3 loss), dr_grpo (seq_sum_norm, KL k3 loss), rloo (token_mean,
                 KL k3 loss), reinforce_pp (token_mean, KL k1 in the per-token reward, as PPO).
  d. eval        per seed: ``jaxrlhf.evaluate.evaluate`` on held-out prompts with ``n`` samples each:
                 unbiased pass@1 ... pass@n (Chen et al. 2021), KL to SFT; plus each run's wall time.

Command (2 CPU cores):
  python -m jaxrlhf.experiments.e8_critic_free --seeds=3 --out=docs/results/e8

Writes ``table.md``, ``results.json`` and ``pass_at_k.png`` to ``--out``; runs live in ``--workdir``
(default ``workdirs/e8``; finished runs are reused). ``--smoke`` runs toy sizes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import numpy as np

from jaxrlhf import quickstart as q
from jaxrlhf.experiments import e5_verifiable as e5

ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_pp")
POLICIES = ("sft", "ppo", *ESTIMATORS)
LOSS_AGG = e5.LOSS_AGG  # each estimator's published loss aggregation
# E8's sizes: E5's sizes as E8 ran them (E5 has since grown: longer PPO, more held-out prompts),
# registered in ``quickstart.SIZES`` under these names by ``run``.
BASE_SIZES = {
    "e8_base": dataclasses.replace(
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
    ),
    "e8_base_smoke": e5.SIZES["e5_smoke"],
}
SIZES = {"e8": "e8_base", "e8_smoke": "e8_base_smoke"}  # E8's size -> its base sizes (data, SFT, PPO)
GROUP = {"e8": 4, "e8_smoke": 2}  # samples per prompt of the critic-free runs
EVAL_SAMPLES = {"e8": 8, "e8_smoke": 4}


def grpo_config(size: str, p: q.Paths, seed: int, estimator: str):
    """The critic-free run matching E5's PPO run: same samples, steps, lr, reference and KL weight
    (``e5_verifiable.grpo_config``, shared with E5, at E8's group size)."""
    return e5.grpo_config(SIZES[size], p, seed, estimator, GROUP[size])


def train_runs(size: str, p: q.Paths, seed: int, info: dict, methods=POLICIES[1:]) -> dict[str, str]:
    """Trains (or reuses) PPO and the critic-free runs (``methods``) of one seed; returns the HF exports."""
    from jaxrlhf import registry

    sd = os.path.join(p.workdir, f"seed{seed}")
    runs = {"ppo": lambda: e5.ppo_config(SIZES[size], p, seed)}
    runs.update({name: (lambda name=name: grpo_config(size, p, seed, name)) for name in ESTIMATORS})
    exports = {"sft": p.sft_export}
    for name, make in runs.items():
        if name not in methods:
            continue
        run_dir = os.path.join(sd, name)
        stats_path = os.path.join(run_dir, "e8_run.json")
        if not os.path.exists(stats_path):
            t0 = time.perf_counter()
            result = registry.run(make(), run_dir)
            hist = result["history"]
            stats = {
                "wall_s": round(time.perf_counter() - t0, 1),
                "optimizer_steps": int(result["state"].step),
                "samples": _samples(make()),
                "first": q._floats(hist[0]),
                "last": q._floats(hist[-1]),
            }
            with open(stats_path, "w") as f:
                json.dump(stats, f)
            print(f"[e8] {name} seed {seed}: {stats['wall_s']:.1f}s", flush=True)
        with open(stats_path) as f:
            info[f"{name}/s{seed}"] = json.load(f)
        exports[name] = os.path.join(run_dir, "hf")
    return exports


def _samples(c) -> int:
    """Responses sampled over a whole run (the 'equal samples' of the comparison)."""
    if "grpo" in c:
        return c.grpo.iterations * c.grpo.prompts_per_iteration * c.grpo.samples_per_prompt
    return c.ppo.iterations * c.ppo.rollout_batch_size


def run(size: str, seeds: int, workdir: str, out: str, methods=POLICIES[1:]) -> dict:
    from jaxrlhf import evaluate

    q.SIZES.update(BASE_SIZES)
    s = q.SIZES[SIZES[size]]
    t_start = time.perf_counter()
    p = q.Paths(workdir)
    os.makedirs(workdir, exist_ok=True)
    info: dict = {}
    if not q.stage_done("data", p):
        info["data"] = e5.stage_data(s, p)
    if not q.stage_done("sft", p):
        info["sft"] = q.train_stage("sft", SIZES[size], p)["last"]
    print(f"[e8] data + sft: {time.perf_counter() - t_start:.1f}s", flush=True)
    ec = e5.eval_config(SIZES[size], p)
    per_seed: dict = {}
    for seed in range(seeds):
        exports = train_runs(size, p, seed, info, methods)
        per_seed[seed] = {
            name: evaluate.evaluate(
                ec,
                path,
                reference=p.sft_export,
                samples=EVAL_SAMPLES[size],
                batch_size=s.eval_batch,
                seed=seed,
            )
            for name, path in exports.items()
        }
        print(f"[e8] eval seed {seed}: {json.dumps({k: v['pass@1'] for k, v in per_seed[seed].items()})}")
    results = {
        "experiment": "E8 critic-free (GRPO, Dr.GRPO, RLOO, REINFORCE++) vs PPO with a critic",
        "size": size,
        "seeds": seeds,
        "group_size": GROUP[size],
        "loss_agg": LOSS_AGG,
        "sizes": dataclasses.asdict(s),
        "table": summarise(per_seed, info, seeds, ("sft", *methods)),
        "per_seed": per_seed,
        "runs": info,
        "wall_s": round(time.perf_counter() - t_start, 1),
        "hardware": q.hardware(),
    }
    write_outputs(results, out)
    return results


def summarise(per_seed: dict, info: dict, seeds: int, policies=POLICIES) -> dict:
    """Mean, sample std (ddof 1) and values over seeds of pass@k, KL to SFT, and (trained runs) wall
    time and steps."""
    ks = [k for k in per_seed[0]["sft"] if k.startswith("pass@")]
    table = {}
    for name in policies:
        vals = {m: [per_seed[i][name][m] for i in range(seeds)] for m in [*ks, "kl_to_reference"]}
        if name != "sft":
            vals["train_wall_s"] = [info[f"{name}/s{i}"]["wall_s"] for i in range(seeds)]
            vals["optimizer_steps"] = [info[f"{name}/s{i}"]["optimizer_steps"] for i in range(seeds)]
            vals["samples"] = [info[f"{name}/s{i}"]["samples"] for i in range(seeds)]
        table[name] = {
            m: {
                "mean": float(np.mean(v)),
                "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
                "values": v,
            }
            for m, v in vals.items()
        }
    return table


def table_markdown(res: dict) -> str:
    first = res["table"][list(res["table"])[-1]]
    ks = [m for m in first if m.startswith("pass@")]
    cols = [*ks, "kl_to_reference", "train_wall_s", "optimizer_steps", "samples"]
    head = ["KL to SFT (nats/seq)" if m == "kl_to_reference" else m for m in cols]
    lines = [
        f"Mean ± sample std (ddof 1) over {res['seeds']} seeds.",
        "",
        "| policy | " + " | ".join(head) + " |",
        "|---" * (len(head) + 1) + "|",
    ]
    for name, r in res["table"].items():
        cells = []
        for m in cols:
            if m not in r:
                cells.append("-")
            elif m in ("optimizer_steps", "samples"):
                cells.append(f"{r[m]['mean']:.0f}")
            elif m == "train_wall_s":
                cells.append(f"{r[m]['mean']:.0f} ± {r[m]['std']:.0f}")
            else:
                cells.append(f"{r[m]['mean']:.3f} ± {r[m]['std']:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(res: dict, out: str) -> None:
    q.write_outputs(
        out,
        table_markdown(res),
        res,
        lambda path: e5.plot(res, path, "E8 critic-free vs PPO"),
        "pass_at_k.png",
    )


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default="docs/results/e8")
    ap.add_argument("--workdir", default=os.path.join("workdirs", "e8"))
    ap.add_argument("--smoke", action="store_true", help="toy sizes (seconds; the tests use it)")
    ap.add_argument("--methods", default=",".join(POLICIES[1:]), help="trained policies (comma-separated)")
    a = ap.parse_args(argv)
    if a.seeds < 1:
        raise ValueError(f"--seeds={a.seeds}: need at least 1")
    methods = tuple(m for m in a.methods.split(",") if m)
    if not methods or set(methods) - set(POLICIES[1:]):
        raise ValueError(f"--methods={a.methods!r}: expected a subset of {', '.join(POLICIES[1:])}")
    res = run("e8_smoke" if a.smoke else "e8", a.seeds, a.workdir, a.out, methods)
    print(table_markdown(res), flush=True)
    print(f"[e8] {res['wall_s']:.0f}s wall; results in {a.out}", flush=True)
    return res


if __name__ == "__main__":
    main()
