r"""E2 (Xu et al. 2024, "Is DPO Superior to PPO for LLM Alignment?"): DPO vs PPO vs DPO-Iter on
measured reward-KL trajectories of synthetic reviews.

    python -m jaxrlhf.experiments.e2_frontier --seeds=3 --out=docs/results/e2   # [--smoke]

Per seed (an independent base: its own data, SFT model, best/worst gold-labelled pairs and reward
model; the ``common.MINI`` stages in ``<workdir>/mini/seed<N>``, shared with E3/E4), every run starts
from that seed's SFT model and keeps a checkpoint every ``sweep.dpo_ckpt_every`` DPO steps /
``sweep.ppo_ckpt_every`` PPO iterations / DPO-Iter round (all kept):

  dpo        offline DPO on the seed's pairs, frozen SFT reference, one run per beta in ``dpo_betas``;
  ppo        PPO against the seed's learned reward model with a frozen SFT reference
             (``ref.ema_decay = 1``), one run per KL coefficient in ``ppo_kl_coefs``;
  ppo_ema    the study's recipe: the EMA reference (decay ``ppo_ema_decay``) at ``ppo_ema_kl_coef``;
  dpo_iter   rounds of sampling from the current policy, best/worst labelled by the *learned reward
             model*, DPO steps, reference reset to the policy each round.

Every checkpoint (and the SFT model) is scored on the held-out prompts by ``common.CheckpointEvaluator``:
one sample per prompt (temperature 1, sampling seed 1000 + seed for every checkpoint of a seed), gold
score, KL(policy || SFT) per sequence and per token, length, degeneracy statistics. DPO-Iter's
checkpoints are also scored by the seed's reward model on the *same* samples (a second evaluator
with the same sampling key; the two KLs must agree, ``rm_eval_kl_mismatch``), next to the logged
``round/reward_mean`` (the reward model on that policy's train-prompt samples at the next round's start).

Matched KL uses measured points only: at each target of ``kl_targets`` (nats/seq) a method's value is
its upper envelope (best gold among its checkpoints of all its runs, SFT included, with KL <= target)
and the gold of its checkpoint closest to the target (with the KL gap); DPO - PPO differences are
paired by seed. Statistics: mean and 95% Student-t half-width over seeds (sample std, n - 1 dof).

Writes ``table.md``, ``results.json`` and ``frontier.png`` to ``--out``; ``--restat=results.json``
recomputes the statistics of a stored run without training. Expected result (3 seeds, 527 s wall on
2 CPU cores with a cold compilation cache; docs/experiments_e2.md, docs/results/e2/table.md): SFT gold
0.27; DPO's best checkpoints reach gold ~0.40 at KL ~2.6 nats/seq and fall beyond; PPO (frozen or EMA
reference) keeps rising to ~0.47 at KL 4-6, so DPO - PPO at KL 6 is about -0.07 (paired, CI excluding
0) while they tie at KL <= 2; DPO-Iter's reward-model score rises every round while its gold peaks
(rounds 3-8) and then falls.
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
from jaxrlhf.experiments import common
from jaxrlhf.experiments.common import (
    MINI,
    base_stages,
    closest,
    envelope,
    fmt,
    git_commit,
    seed_paths,
    t_interval,
    uncommitted,
)

SMOKE = dataclasses.replace(q.SIZES["smoke"], n_sft=128, sft_steps=10, rm_steps=2)
BASES = {"mini": MINI, "smoke": SMOKE}  # the base stages' sizes (MINI: shared with E3/E4, unchanged)


@dataclasses.dataclass(frozen=True)
class Sweep:
    """The runs of one seed (every field lands in results.json)."""

    dpo_betas: tuple[float, ...]
    dpo_steps: int
    dpo_lr: float
    dpo_ckpt_every: int  # DPO steps between checkpoints
    ppo_kl_coefs: tuple[float, ...]  # frozen reference
    ppo_ema_kl_coef: float
    ppo_ema_decay: float
    ppo_iterations: int
    ppo_lr: float
    ppo_ckpt_every: int  # PPO iterations between checkpoints
    iter_beta: float
    iter_rounds: int
    iter_prompts_per_round: int
    iter_steps_per_round: int
    iter_lr: float
    kl_targets: tuple[float, ...]  # matched-KL targets, nats per sequence
    kl_token_targets: tuple[float, ...]  # matched-KL targets, nats per response token


SWEEPS = {
    "mini": Sweep(
        dpo_betas=(0.05, 0.2, 1.0),
        dpo_steps=48,
        dpo_lr=2e-4,
        dpo_ckpt_every=6,
        ppo_kl_coefs=(0.02, 0.2),
        ppo_ema_kl_coef=0.05,
        ppo_ema_decay=0.99,
        ppo_iterations=20,
        ppo_lr=3e-4,  # seed 0 pilots: lr 2e-4 x 10 iterations reached KL 3 nats/seq; 3e-4 x 16: 5.3
        ppo_ckpt_every=1,
        iter_beta=0.1,
        iter_rounds=10,
        iter_prompts_per_round=64,
        iter_steps_per_round=8,
        iter_lr=2e-4,
        kl_targets=(1.0, 2.0, 4.0, 6.0),
        kl_token_targets=(0.1, 0.2, 0.4),  # chosen after the run: the range every method covers
    ),
    "smoke": Sweep((0.1,), 4, 1e-3, 2, (0.05,), 0.05, 0.9, 2, 1e-4, 1, 0.1, 2, 8, 2, 1e-3, (0.5,), (0.05,)),
}
METHODS = ("dpo", "ppo", "ppo_ema", "dpo_iter")  # matched-KL groups (a group = all its runs' points)
BASELINE = "dpo"  # paired differences: BASELINE - each other method


def register_size(size: str, seed: int) -> str:
    """Registers ``BASES[size]`` with ``seed`` as ``exp_<size>_s<seed>`` (E3/E4 use the same names)."""
    if size not in BASES:
        raise ValueError(f"--size={size!r}: expected one of {sorted(BASES)}")
    return common.register_size(BASES[size], f"exp_{size}", seed)


def _apply(c, flat: dict[str, Any]):
    for key, value in flat.items():
        c.update_from_flattened_dict({key: value})
    return c


def _ckpt(every: int, total: int) -> dict[str, Any]:
    """Checkpoint keys: one every ``every`` units, all kept, written synchronously."""
    return {"checkpoint.every": every, "checkpoint.keep": total // every + 2, "checkpoint.async_save": False}


def dpo_config(size_name: str, p: q.Paths, beta: float, **overrides):
    """``configs/quickstart/dpo.py`` with ``dpo.beta = beta`` and dotted-key ``overrides``."""
    c = q.load_config("dpo", size_name, p.workdir)
    c.dpo.beta = beta
    return _apply(c, overrides)


def dpo_overrides(sw: Sweep) -> dict[str, Any]:
    return {
        "total_steps": sw.dpo_steps,
        "optim.lr": sw.dpo_lr,
        "log_every": 1,
        **_ckpt(sw.dpo_ckpt_every, sw.dpo_steps),
    }


def ppo_config(size_name: str, p: q.Paths, kl_coef: float, ema_decay: float, sw: Sweep):
    """``configs/quickstart/ppo.py`` with the KL coefficient, the reference's EMA decay (1 = frozen)
    and the sweep's length, learning rate and checkpoints."""
    c = q.load_config("ppo", size_name, p.workdir)
    flat = {
        "ppo.kl_coef": kl_coef,
        "ref.ema_decay": ema_decay,
        "ppo.iterations": sw.ppo_iterations,
        "optim.lr": sw.ppo_lr,
        "log_every": 1,
        **_ckpt(sw.ppo_ckpt_every, sw.ppo_iterations),
    }
    return _apply(c, flat)


def dpo_iter_config(size_name: str, p: q.Paths, sw: Sweep):
    """DPO-Iter from the SFT model, labelled by the seed's learned reward model (a missing EOS costs
    1, as in PPO), reference reset each round, a checkpoint every round."""
    from jaxrlhf import config_defaults as d

    s = q.SIZES[size_name]
    c = q.prompt_run_config("dpo_iter", s, p)
    c.reward = d.reward(model_path=p.rm_export, shaping=False, missing_eos_penalty=1.0)
    c.reward.model.dtype = "float32"
    c.ref = d.ref(ema_decay=1.0)
    c.generation = d.generation(max_new_tokens=s.max_new_tokens, temperature=1.0)
    c.dpo = dict(beta=sw.iter_beta, label_smoothing=0.0, loss_type="sigmoid", nll_coef=0.0)
    c.dpo_iter = dict(
        rounds=sw.iter_rounds,
        prompts_per_round=sw.iter_prompts_per_round,
        samples_per_prompt=s.pair_samples,
        steps_per_round=sw.iter_steps_per_round,
        reset_reference=True,
    )
    c.batch_size = min(s.pair_batch, sw.iter_prompts_per_round)
    c.optim = d.optim(lr=sw.iter_lr, warmup_steps=0, schedule="constant")
    c.log_every = 1
    c.progress_bar = False
    c.lock()
    return _apply(c, _ckpt(1, sw.iter_rounds))


def run_configs(size_name: str, p: q.Paths, sw: Sweep) -> dict[str, tuple[str, Any]]:
    """run name -> (method, config) of every run of one seed."""
    runs = {f"dpo_b{b:g}": ("dpo", dpo_config(size_name, p, b, **dpo_overrides(sw))) for b in sw.dpo_betas}
    for k in sw.ppo_kl_coefs:
        runs[f"ppo_kl{k:g}"] = ("ppo", ppo_config(size_name, p, k, 1.0, sw))
    runs[f"ppo_ema_kl{sw.ppo_ema_kl_coef:g}"] = (
        "ppo_ema",
        ppo_config(size_name, p, sw.ppo_ema_kl_coef, sw.ppo_ema_decay, sw),
    )
    runs[f"dpo_iter_b{sw.iter_beta:g}"] = ("dpo_iter", dpo_iter_config(size_name, p, sw))
    return runs


def train_run(config, run_dir: str) -> dict[str, Any]:
    """Trains ``config`` in ``run_dir`` (or reuses its record): wall time and logged history."""
    from jaxrlhf import registry

    record_path = os.path.join(run_dir, "e2_run.json")
    if os.path.exists(record_path):
        with open(record_path) as f:
            record = json.load(f)
        if record["config"] != json.loads(json.dumps(config.to_dict())):
            raise ValueError(f"{run_dir} holds a run of another config: delete it to retrain")
        return record
    t0 = time.perf_counter()
    result = registry.run(config, run_dir)
    if result.get("interrupted"):
        raise KeyboardInterrupt(f"{run_dir}: stopped by a signal; rerun to resume")
    record = {
        "wall_s": round(time.perf_counter() - t0, 1),
        "config": config.to_dict(),
        "history": [q._floats(h) for h in result.get("history", [])],
    }
    with open(record_path, "w") as f:
        json.dump(record, f)
    print(f"  [{run_dir}]: {record['wall_s']:.1f}s", flush=True)
    return record


# ------------------------------------------------------------------------------------ evaluation
def evaluators(size_name: str, p: q.Paths, seed: int):
    """The gold evaluator and the reward-model evaluator (same prompts, sampler and sampling key)."""
    from jaxrlhf import config_defaults as d

    s = q.SIZES[size_name]
    gold = common.CheckpointEvaluator(
        q.load_config("evaluate", size_name, p.workdir), p.sft_export, s.eval_batch, seed=1000 + seed
    )
    c = q.evaluate_config(s, p)
    c.reward = d.reward(model_path=p.rm_export, shaping=False)
    c.reward.model.dtype = "float32"
    c.partition_rules = ()  # the model's default sharding (what the training configs use)
    rm = common.CheckpointEvaluator(c, p.sft_export, s.eval_batch, seed=1000 + seed)
    return gold, rm


def with_rm(points: list[dict], rm_points: list[dict], history: list[dict]) -> list[dict]:
    """DPO-Iter points with the reward model's held-out score of the same samples (``rm_score``),
    the KL mismatch of the two evaluations, and the logged ``round/reward_mean`` of the same policy
    (round ``k + 1`` logs it for the policy after ``k`` rounds; absent for the last)."""
    out = []
    for k, (pt, rp) in enumerate(zip(points, rm_points, strict=True)):
        logged = history[k].get("round/reward_mean") if k < len(history) else None
        out.append(
            dict(
                pt,
                rm_score=rp["gold"],
                rm_eval_kl_mismatch=abs(rp["kl_seq"] - pt["kl_seq"]),
                rm_logged=logged,
            )
        )
    return out


def run_seed(size: str, seed: int, root: str) -> dict[str, Any]:
    """One seed: base stages, every run trained, every checkpoint scored."""
    t0 = time.perf_counter()
    size_name, sw = register_size(size, seed), SWEEPS[size]
    p = seed_paths(root, seed)
    base_stages(size_name, p, ("data", "sft", "pairs", "reward"))
    t_base = time.perf_counter() - t0
    configs = run_configs(size_name, p, sw)
    runs = {}
    for name, (method, config) in configs.items():
        runs[name] = {"method": method, **train_run(config, p.stage_dir(f"e2_{name}"))}
    t_eval = time.perf_counter()
    gold, rm = evaluators(size_name, p, seed)
    sft = {"checkpoint": 0, "step": 0, **gold(gold.sft_params)}
    sft_rm = rm(rm.sft_params)
    for name, r in runs.items():
        pts = [
            dict(pt, step=pt["checkpoint"])
            for pt in common.run_points(gold, p.stage_dir(f"e2_{name}"), "e2_points.json")
        ]
        r["points"] = [sft, *pts]
        if r["method"] == "dpo_iter":
            rm_pts = common.run_points(rm, p.stage_dir(f"e2_{name}"), "e2_rm_points.json")
            sft_pt = dict(sft, rm_score=sft_rm["gold"], rm_eval_kl_mismatch=abs(sft_rm["kl_seq"]))
            r["points"] = [sft_pt, *with_rm(pts, rm_pts, r["history"][1:])]
            r["points"][0]["rm_logged"] = r["history"][0].get("round/reward_mean") if r["history"] else None
    with open(p.pairs_stats) as f:
        pairs = json.load(f)
    return {
        "runs": runs,
        "sft": sft,
        "pairs": pairs,
        "base_s": round(t_base, 1),
        "eval_s": round(time.perf_counter() - t_eval, 1),
        "wall_s": round(time.perf_counter() - t0, 1),
    }


# ------------------------------------------------------------------------------------ statistics
def method_points(seed_res: dict, method: str) -> list[dict]:
    """Every measured point of ``method``'s runs in one seed (the SFT point once, first)."""
    runs = [r for r in seed_res["runs"].values() if r["method"] == method]
    return [seed_res["sft"], *(pt for r in runs for pt in r["points"][1:])]


def envelope_by(points: list[dict], target: float, kl: str) -> dict:
    """``common.envelope`` on the KL ``kl`` ("kl_seq" or "kl_token"): the best-gold point with KL <= target."""
    if kl == "kl_seq":
        return envelope(points, target)
    return max((pt for pt in points if pt[kl] <= target), key=lambda pt: pt["gold"])


def closest_by(points: list[dict], target: float, kl: str) -> dict:
    """``common.closest`` on the KL ``kl``: the trained point whose KL is nearest the target."""
    if kl == "kl_seq":
        return closest(points, target)
    trained = [pt for pt in points if pt["step"] > 0] or points
    return min(trained, key=lambda pt: abs(pt[kl] - target))


def matched(per_seed: list[dict], targets, kl: str = "kl_seq") -> dict[str, Any]:
    """Per KL target (on ``kl``) and method: the envelope's gold and KLs, the closest point's gold
    and KL gap; per target, ``BASELINE - method`` paired by seed for the envelope and the closest."""
    out: dict[str, Any] = {}
    for target in targets:
        key = f"{target:g}"
        rows, env, clo = {}, {}, {}
        for m in METHODS:
            env[m] = [envelope_by(method_points(r, m), target, kl) for r in per_seed]
            clo[m] = [closest_by(method_points(r, m), target, kl) for r in per_seed]
            rows[m] = {
                "envelope_gold": t_interval([e["gold"] for e in env[m]]),
                "envelope_kl_seq": t_interval([e["kl_seq"] for e in env[m]]),
                "envelope_kl_token": t_interval([e["kl_token"] for e in env[m]]),
                "closest_gold": t_interval([c["gold"] for c in clo[m]]),
                "closest_kl_gap": t_interval([c[kl] - target for c in clo[m]]),
            }
        diffs = {}
        for m in METHODS:
            if m == BASELINE:
                continue
            diffs[f"{BASELINE} - {m}"] = {
                "envelope": t_interval(
                    [a["gold"] - b["gold"] for a, b in zip(env[BASELINE], env[m], strict=True)]
                ),
                "closest": t_interval(
                    [a["gold"] - b["gold"] for a, b in zip(clo[BASELINE], clo[m], strict=True)]
                ),
            }
        out[key] = {"methods": rows, "paired": diffs}
    return out


FINAL_KEYS = (
    "gold",
    "kl_seq",
    "kl_token",
    "response_length",
    "frac_positive",
    "repeat_3gram_frac",
    "distinct_2",
    "out_of_grammar_frac",
)


def final_stats(per_seed: list[dict]) -> dict[str, Any]:
    """Per run (and SFT): the final checkpoint's gold, KL, length and degeneracy; train wall time."""
    out = {"sft": {k: t_interval([r["sft"][k] for r in per_seed]) for k in FINAL_KEYS}}
    for n in per_seed[0]["runs"]:
        last = [r["runs"][n]["points"][-1] for r in per_seed]
        out[n] = {k: t_interval([pt[k] for pt in last]) for k in FINAL_KEYS}
        out[n]["train_wall_s"] = t_interval([r["runs"][n]["wall_s"] for r in per_seed])
    return out


def iter_stats(per_seed: list[dict]) -> dict[str, Any]:
    """DPO-Iter per round (0 = SFT): gold, held-out reward-model score, logged reward_mean, KL; and,
    paired by seed, the final round minus SFT and minus the round of best gold."""
    name = next(n for n, r in per_seed[0]["runs"].items() if r["method"] == "dpo_iter")
    pts = [r["runs"][name]["points"] for r in per_seed]
    rounds = []
    for k in range(len(pts[0])):
        rounds.append(
            {
                c: t_interval([p[k][c] for p in pts])
                for c in ("gold", "rm_score", "rm_logged", "kl_seq", "kl_token")
            }
        )
    best = [max(p, key=lambda pt: pt["gold"]) for p in pts]
    change = {
        "gold_final_minus_sft": t_interval([p[-1]["gold"] - p[0]["gold"] for p in pts]),
        "rm_final_minus_sft": t_interval([p[-1]["rm_score"] - p[0]["rm_score"] for p in pts]),
        "gold_final_minus_best": t_interval(
            [p[-1]["gold"] - b["gold"] for p, b in zip(pts, best, strict=True)]
        ),
        "rm_final_minus_best_gold_round": t_interval(
            [p[-1]["rm_score"] - b["rm_score"] for p, b in zip(pts, best, strict=True)]
        ),
        "best_gold_round": [b["checkpoint"] for b in best],
        "gold_best_final": [(b["gold"], p[-1]["gold"]) for p, b in zip(pts, best, strict=True)],
        "rm_best_final": [(b["rm_score"], p[-1]["rm_score"]) for p, b in zip(pts, best, strict=True)],
        "rm_eval_kl_mismatch_max": max(pt["rm_eval_kl_mismatch"] for p in pts for pt in p),
    }
    return {"run": name, "rounds": rounds, "change": change}


# ---------------------------------------------------------------------------------------- tables
def _row(label: str, cells) -> str:
    return f"| {label} | " + " | ".join(cells) + " |"


KL_UNITS = {"kl_seq": "KL/seq target", "kl_token": "KL/token target"}


def table_matched(res: dict, kl: str) -> list[str]:
    cols = (
        KL_UNITS[kl],
        "method",
        "envelope gold",
        "envelope KL/seq",
        "envelope KL/token",
        "closest gold",
        "closest KL gap",
    )
    lines = ["| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
    for key, block in res["matched"][kl].items():
        for m, r in block["methods"].items():
            cells = [key, m, fmt(r["envelope_gold"]), fmt(r["envelope_kl_seq"], 2), fmt(r["envelope_kl_token"]),
                     fmt(r["closest_gold"]), fmt(r["closest_kl_gap"], 2)]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def table_paired(res: dict, kl: str) -> list[str]:
    block = res["matched"][kl]
    unit = {"kl_seq": "KL/seq", "kl_token": "KL/token"}[kl]
    cols = [f"{kind} @ {unit} {k}" for k in block for kind in ("envelope", "closest")]
    lines = ["| difference (gold) | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for d in next(iter(block.values()))["paired"]:
        cells = [fmt(block[k]["paired"][d][kind]) for k in block for kind in ("envelope", "closest")]
        lines.append(_row(d, cells))
    return lines


def table_final(res: dict) -> list[str]:
    digits = {"kl_seq": 2, "response_length": 1}
    lines = ["| run | " + " | ".join(FINAL_KEYS) + " | train wall s |", "|---" * (len(FINAL_KEYS) + 2) + "|"]
    for n, r in res["final"].items():
        cells = [fmt(r[k], digits.get(k, 3)) for k in FINAL_KEYS]
        cells.append(fmt(r["train_wall_s"], 0) if "train_wall_s" in r else "-")
        lines.append(_row(n, cells))
    return lines


def table_iter(res: dict) -> list[str]:
    it = res["dpo_iter"]
    cols = ("gold", "RM score (held-out)", "RM score logged (train prompts)", "KL/seq", "KL/token")
    lines = ["| round | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for k, r in enumerate(it["rounds"]):
        cells = [
            fmt(r["gold"]),
            fmt(r["rm_score"]),
            fmt(r["rm_logged"]),
            fmt(r["kl_seq"], 2),
            fmt(r["kl_token"]),
        ]
        lines.append(_row(f"{k}" + (" (SFT)" if k == 0 else ""), cells))
    ch = it["change"]
    lines += ["", "| DPO-Iter change (paired by seed) | value |", "|---|---|"]
    for key in (
        "gold_final_minus_sft",
        "rm_final_minus_sft",
        "gold_final_minus_best",
        "rm_final_minus_best_gold_round",
    ):
        lines.append(_row(key, [fmt(ch[key])]))
    lines.append(_row("round of best gold, per seed", [", ".join(str(b) for b in ch["best_gold_round"])]))
    for key, label in (("gold_best_final", "gold at best round -> final, per seed"),
                       ("rm_best_final", "RM score at best-gold round -> final, per seed")):  # fmt: skip
        lines.append(_row(label, [", ".join(f"{a:.3f} -> {b:.3f}" for a, b in ch[key])]))
    return lines


def table_markdown(res: dict) -> str:
    """Every table of E2 (``table.md``; docs/experiments_e2.md carries the same rows)."""
    n = res["seeds"]
    return "\n".join(
        [
            f"Mean ± 95% Student-t half-width over {n} seeds (sample std, ddof 1, {n - 1} degrees of freedom); "
            "held-out prompts, one sampled completion each; gold = the reviews gold scorer in [0, 1]; "
            "KL(policy || SFT) in nats on the policy's samples. Measured checkpoints only.",
            "",
            "### Matched KL per sequence: measured upper envelope (best gold with KL/seq <= target, SFT "
            "included) and the checkpoint closest to the target (gap in nats/seq)",
            "",
            *table_matched(res, "kl_seq"),
            "",
            f"### Paired by seed: {BASELINE} minus each method, gold at matched KL per sequence",
            "",
            *table_paired(res, "kl_seq"),
            "",
            "### Matched KL per token: the same with KL/token (nats per response token; gap in nats/token)",
            "",
            *table_matched(res, "kl_token"),
            "",
            f"### Paired by seed: {BASELINE} minus each method, gold at matched KL per token",
            "",
            *table_paired(res, "kl_token"),
            "",
            "### Final checkpoint of each run (degeneracy statistics of its held-out samples)",
            "",
            *table_final(res),
            "",
            "### DPO-Iter per round: gold vs the reward model it optimises",
            "",
            *table_iter(res),
        ]
    )


# ----------------------------------------------------------------------------------------- plots
COLORS = {"dpo": "Blues", "ppo": "Oranges", "ppo_ema": "Reds", "dpo_iter": "Greens"}


def run_colors(names_methods: list[tuple[str, str]], plt) -> dict[str, Any]:
    """One colour per run, shades of its method's colour map."""
    out = {}
    for m, cmap in COLORS.items():
        names = [n for n, mm in names_methods if mm == m]
        for i, n in enumerate(names):
            out[n] = plt.get_cmap(cmap)(0.55 + 0.4 * i / max(1, len(names) - 1))
    return out


PANELS = (("offline DPO (one line per beta and seed)", ("dpo",)),
          ("PPO and DPO-Iter (one line per run and seed)", ("ppo", "ppo_ema", "dpo_iter")))  # fmt: skip
MARKERS = {"dpo": "s", "ppo": "D", "ppo_ema": "^", "dpo_iter": "v"}


def _trajectories(ax, per_seed: list[dict], methods, colors) -> None:
    """Gold vs KL/seq: one line per run and seed through its successive checkpoints (SFT first)."""
    for n, run in per_seed[0]["runs"].items():
        if run["method"] not in methods:
            continue
        for s, r in enumerate(per_seed):
            pts = r["runs"][n]["points"]
            ax.plot([p["kl_seq"] for p in pts], [p["gold"] for p in pts], ".-", color=colors[n], lw=0.9,
                    ms=4, alpha=0.75, label=n if s == 0 else None)  # fmt: skip


def _envelopes(ax, res: dict, plt) -> None:
    """Each method's envelope (best gold with KL <= target; mean ± CI over seeds) drawn at x =
    target, unjoined, slightly offset per method."""
    block = res["matched"]["kl_seq"]
    for j, m in enumerate(METHODS):
        xs = [float(k) * (1 + 0.05 * (j - 1.5)) for k in block]
        ys = [block[k]["methods"][m]["envelope_gold"] for k in block]
        ax.errorbar(xs, [y["mean"] for y in ys], yerr=[y["ci95"] or 0 for y in ys], fmt=MARKERS[m], ls="none",
                    color=plt.get_cmap(COLORS[m])(0.95), mec="k", ms=6, capsize=3,
                    label=f"{m}: envelope at target KL")  # fmt: skip


def _iter_panel(ax, per_seed: list[dict], res: dict) -> None:
    """DPO-Iter: gold (left axis) and the reward model's held-out score (right axis) per round."""
    it = res["dpo_iter"]["run"]
    twin = ax.twinx()
    for s, r in enumerate(per_seed):
        pts = r["runs"][it]["points"]
        k = list(range(len(pts)))
        ax.plot(
            k, [p["gold"] for p in pts], "o-", color="tab:green", alpha=0.8, label="gold" if s == 0 else None
        )
        twin.plot(k, [p["rm_score"] for p in pts], "s--", color="tab:purple", alpha=0.8,
                  label="reward model, same samples" if s == 0 else None)  # fmt: skip
    ax.set_xlabel("DPO-Iter round (0 = SFT)")
    ax.set_ylabel("gold score, held-out prompts", color="tab:green")
    twin.set_ylabel("reward-model score (raw logit), held-out prompts", color="tab:purple")
    ax.set_title("DPO-Iter: gold vs the learned reward model it optimises", fontsize=9)
    ax.grid(alpha=0.3)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = twin.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="lower right")


def plot_frontier(per_seed: list[dict], res: dict, out_path: str) -> str | None:
    """Gold vs KL/seq along each run's checkpoints (offline DPO; PPO and DPO-Iter), every method's
    measured envelope at the KL targets on both; DPO-Iter's gold and reward-model score per round."""
    plt = q.pyplot(out_path)
    if plt is None:
        return None
    runs = per_seed[0]["runs"]
    colors = run_colors([(n, r["method"]) for n, r in runs.items()], plt)
    fig, axes = plt.subplots(1, 3, figsize=(17, 5), dpi=110)
    top = max(p["gold"] for r in per_seed for run in r["runs"].values() for p in run["points"])
    right = 1.3 * max(p["kl_seq"] for r in per_seed for run in r["runs"].values() for p in run["points"])
    for ax, (title, methods) in zip(axes, PANELS, strict=False):
        _trajectories(ax, per_seed, methods, colors)
        _envelopes(ax, res, plt)
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlim(0, right)  # the same KL axis on both panels
        ax.set_xlabel("KL(policy || SFT), nats per sequence (symlog: linear below 1)")
        ax.set_ylabel("gold score, held-out prompts (0 = floor of the scorer)")
        ax.set_ylim(0, min(1.0, top + 0.1))
        ax.set_title(f"E2 {title}, {len(per_seed)} seeds", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="lower left")
    _iter_panel(axes[2], per_seed, res)
    axes[2].set_ylim(0, min(1.0, top + 0.1))
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    return out_path


# ------------------------------------------------------------------------------------------ main
def statistics(size: str, per_seed: list[dict]) -> dict[str, Any]:
    """The settings of ``size`` and every statistic of the tables, from the per-seed scores alone."""
    sw = SWEEPS[size]
    return {
        "experiment": "e2_frontier",
        "size": size,
        "seeds": len(per_seed),
        "base_sizes": dataclasses.asdict(BASES[size]),
        "sweep": dataclasses.asdict(sw),
        "eval": "one sample per held-out prompt at temperature 1, sampling seed 1000 + seed for every "
        "checkpoint; DPO-Iter's reward-model score on the same samples",
        "statistics": "mean, sample std (ddof 1), 95% Student-t half-width t(0.975, n-1) * std / sqrt(n)",
        "matched": {
            "kl_seq": matched(per_seed, sw.kl_targets, "kl_seq"),
            "kl_token": matched(per_seed, sw.kl_token_targets, "kl_token"),
        },
        "final": final_stats(per_seed),
        "dpo_iter": iter_stats(per_seed),
    }


def results(size: str, per_seed: list[dict], t0: float) -> dict[str, Any]:
    """The statistics plus the per-seed scores, the commits, the wall time and the hardware."""
    res = statistics(size, per_seed)
    res["per_seed"] = per_seed
    res.update(
        code_commit=git_commit(),
        gold_score_commit=git_commit("jaxrlhf/tasks/reviews.py"),
        uncommitted_files=uncommitted("jaxrlhf"),
        wall_s_total=round(time.perf_counter() - t0, 1),
        hardware=q.hardware(),
    )
    return res


def restat(path: str, out: str) -> dict[str, Any]:
    """Recomputes the statistics, tables and plot of a stored ``results.json`` from its per-seed
    scores (no training, no evaluation); the run's commit, wall time and hardware are kept, and
    ``statistics_commit`` records the code that recomputed them. The stored run's training sweep
    must equal the current one."""
    with open(path) as f:
        old = json.load(f)
    new = statistics(old["size"], old["per_seed"])
    stale = {k for k, v in old["sweep"].items() if json.loads(json.dumps(new["sweep"].get(k))) != v}
    if stale:
        raise ValueError(f"{path}: its sweep differs from SWEEPS[{old['size']!r}] in {sorted(stale)}")
    res = {**old, **new, "statistics_commit": git_commit(), "per_seed": old["per_seed"]}
    q.write_outputs(
        out, table_markdown(res), res, lambda p: plot_frontier(res["per_seed"], res, p), "frontier.png"
    )
    return res


def run(size: str, seeds: int, workdir: str, out: str, cold_cache: bool = False) -> dict[str, Any]:
    from jaxrlhf.trainer.harness import enable_compilation_cache

    t0 = time.perf_counter()
    root = os.path.join(workdir, size)
    cache = os.path.join(root, "jax_cache_e2")
    if cold_cache:
        shutil.rmtree(cache, ignore_errors=True)
    enable_compilation_cache(cache)  # seeds > 0 reuse seed 0's compiled steps
    per_seed = []
    for seed in range(seeds):
        print(f"[e2] seed {seed} ...", flush=True)
        per_seed.append(run_seed(size, seed, root))
        print(f"[e2] seed {seed}: {per_seed[-1]['wall_s']:.0f}s", flush=True)
    res = results(size, per_seed, t0)
    res["cold_compilation_cache"] = cold_cache
    q.write_outputs(
        out, table_markdown(res), res, lambda path: plot_frontier(per_seed, res, path), "frontier.png"
    )
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3, help="number of seeds (0 .. seeds-1), each its own base")
    ap.add_argument("--out", default="docs/results/e2", help="results directory")
    ap.add_argument("--workdir", default="workdirs/experiments", help="root of the per-seed stages (shared)")
    ap.add_argument("--smoke", action="store_true", help="toy sizes (the test uses it)")
    ap.add_argument("--cold-cache", action="store_true", help="empty E2's compilation cache first (timing)")
    ap.add_argument(
        "--restat", default="", help="a results.json: recompute its statistics into --out, no runs"
    )
    a = ap.parse_args(argv)
    if a.restat:
        res = restat(a.restat, a.out)
        print(table_markdown(res), flush=True)
        return res
    if a.seeds < 1:
        raise ValueError(f"--seeds={a.seeds}: need at least 1")
    res = run("smoke" if a.smoke else "mini", a.seeds, a.workdir, a.out, a.cold_cache)
    print(table_markdown(res), flush=True)
    print(f"[e2] {res['wall_s_total']:.0f}s wall; results in {a.out}", flush=True)
    return res


if __name__ == "__main__":
    main()
