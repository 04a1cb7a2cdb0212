r"""E3 (Xu et al. 2024, §4): DPO on preference data from another distribution, and the remedies.

    python -m jaxrlhf.experiments.e3_shift --out=docs/results/e3 [--seeds=3] [--smoke]

Per seed, on synthetic reviews (``jaxrlhf.tasks.reviews``):

  model A   the deployed SFT model: ``common.MINI``'s base stages (data, sft, pairs, reward) in
            ``workdirs/experiments/mini/seed<N>`` (shared with E2/E4); its pairs are best/worst of
            4 of its own samples per train prompt, gold-labelled.
  model B   a second SFT model trained on another distribution (``Plan.b_*``: its own data seed
            and init, positive reviews only, and 85 SFT steps instead of A's 150, so that it writes a
            rougher style: one sentiment alone leaves B's answers as likely under A as A's own), with
            its own best/worst gold-labelled pairs on A's train prompts.
            The shift is measured as the **chosen-answer NLL gap**: mean per-token NLL under A of
            B's chosen answers minus that of A's own chosen answers (issue 17 asks >= 0.5).
  policies  all start from A; checkpoints every few steps (``Plan.*ckpt_every``, all kept):
    dpo_own         DPO on A's pairs (on-policy preference data);
    dpo_other       DPO on B's pairs (shifted preference data);
    sft_chosen      A fine-tuned on the chosen answers of B's pairs;
    sft_chosen_dpo  then DPO on B's pairs with that model as start *and* reference (Xu et al.'s
                    remedy); its points are the SFT phase's checkpoints followed by the DPO phase's;
    dpo_other_nll   DPO on B's pairs plus an NLL term on the chosen answers (``dpo.nll_coef``);
    dpo_iter        DPO-Iter (``algorithm="dpo_iter"``): rounds of fresh samples from the policy,
                    best/worst labelled by a reward model trained on B's pairs (the same shifted
                    preference data as dpo_other, used through a learned labeller), DPO steps.

Every checkpoint (and A itself, KL 0) is scored on held-out prompts by ``common.CheckpointEvaluator``
against **A** (the deployed SFT model; sft_chosen_dpo's own reference is not A): gold score of
``Plan.eval_samples`` sampled completions per prompt (fixed sampling keys, averaged), KL(policy || A)
per sequence and per token, length, degeneracy. Methods are compared at matched KL on measured
points only, never interpolated: a method's value at a KL target is its upper envelope (best gold
among its checkpoints with KL <= target, A included) and its checkpoint closest to the target (with
the KL gap). Targets, per seed, are ``Plan.kl_fractions`` x (a) the smallest largest-KL of all
methods (every method reaches them: ``matched``) and (b) the smaller largest-KL of a method and a
baseline, dpo_own or dpo_other (both reach them: ``pairwise``). Differences are paired by seed.
Statistics: mean, sample std (ddof 1), 95% Student-t half-width.

Writes ``table.md``, ``results.json`` (every setting and run config, the code commit, wall time,
hardware) and ``gold_vs_kl.png`` to ``--out``.

Expected result (3 seeds: ~5 min on 2 idle CPU cores when A's base stages exist, ~6 min from scratch;
docs/experiments_e3.md): B's chosen answers ~0.9 nats/token less likely under A than A's own (>= 0.5
in every seed); over the KL both reach, dpo_other's best checkpoint trails dpo_own's by ~0.07 gold;
sft_chosen_dpo and dpo_iter recover it (dpo_iter with much shorter answers).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import time
from typing import Any

import numpy as np

from jaxrlhf import config_defaults as d
from jaxrlhf import quickstart as q
from jaxrlhf.experiments import common
from jaxrlhf.experiments.common import closest, envelope, fmt, t_interval

# ------------------------------------------------------------------------------------------ sizes
SMOKE = dataclasses.replace(
    q.SIZES["smoke"], n_sft=128, sft_steps=10, rm_steps=2, dpo_steps=4, ppo_iterations=2
)
BASES = {"mini": common.MINI, "smoke": SMOKE}


@dataclasses.dataclass(frozen=True)
class Plan:
    """Model B, the policies' schedules and the comparison (every field lands in results.json)."""

    b_seed_offset: int  # B's data / init seed: seed + offset
    b_sentiment: str  # B's SFT reviews: this sentiment only (A: 40/40/20 positive/negative/mixed)
    b_model: dict  # B's architecture (``config_defaults.model(**b_model)``)
    b_sft_steps: int  # fewer than A's: B writes a rougher style (the NLL gap; one sentiment alone gives ~0)
    b_sft_lr: float
    beta: float  # DPO beta of every DPO-family run
    dpo_lr: float
    dpo_steps: int  # optimizer steps of every DPO-family run (DPO-Iter: rounds x steps per round)
    ckpt_every: int  # DPO steps between evaluated checkpoints
    nll_coef: float  # dpo_other_nll's ``dpo.nll_coef``
    sft_chosen_steps: int
    sft_chosen_lr: float
    sft_chosen_ckpt_every: int  # SFT steps between evaluated checkpoints
    iter_rounds: int  # DPO-Iter: rounds of ``dpo_steps / iter_rounds`` DPO steps on fresh pairs
    iter_prompts_per_round: int
    iter_ckpt_every: int  # rounds between evaluated checkpoints
    kl_fractions: tuple[float, ...]  # matched-KL targets: fractions of the smallest largest-KL
    eval_samples: int  # sampled completions per held-out prompt (one sampling key each), averaged
    nll_pairs: int  # pairs whose chosen answers the NLL gap is measured on


PLANS = {
    "mini": Plan(
        b_seed_offset=100, b_sentiment="positive", b_model=common.MINI.model, b_sft_steps=85,
        b_sft_lr=common.MINI.sft_lr, beta=0.1, dpo_lr=2e-4, dpo_steps=80, ckpt_every=10, nll_coef=1.0,
        sft_chosen_steps=20, sft_chosen_lr=1e-3, sft_chosen_ckpt_every=4, iter_rounds=16,
        iter_prompts_per_round=64, iter_ckpt_every=2, kl_fractions=(0.5, 1.0), eval_samples=2, nll_pairs=256,
    ),
    "smoke": Plan(
        b_seed_offset=100, b_sentiment="positive", b_model=q._SMOKE_MODEL, b_sft_steps=6, b_sft_lr=1e-2,
        beta=0.1, dpo_lr=1e-3, dpo_steps=4, ckpt_every=2, nll_coef=1.0, sft_chosen_steps=4,
        sft_chosen_lr=1e-3, sft_chosen_ckpt_every=2, iter_rounds=2, iter_prompts_per_round=8,
        iter_ckpt_every=1, kl_fractions=(0.5, 1.0), eval_samples=2, nll_pairs=64,
    ),
}  # fmt: skip
METHODS = ("dpo_own", "dpo_other", "sft_chosen", "sft_chosen_dpo", "dpo_other_nll", "dpo_iter")
BASELINES = ("dpo_own", "dpo_other")


def register(size: str, seed: int) -> str:
    """Model A's size name: ``common.MINI`` as ``exp_mini_s<seed>`` (the shared base stages)."""
    return common.register_size(BASES[size], f"exp_{size}", seed)


# ---------------------------------------------------------------------------------- model B, data
def other_model(size: str, seed: int, a: q.Paths, plan: Plan) -> q.Paths:
    """Model B (``plan.b_*``) in ``<A>/e3_b`` and its best/worst gold pairs on A's train prompts."""
    from jaxrlhf.tasks import reviews

    s_b = dataclasses.replace(
        BASES[size], seed=seed + plan.b_seed_offset, model=plan.b_model, sft_steps=plan.b_sft_steps,
        sft_lr=plan.b_sft_lr,
    )  # fmt: skip
    name_b = f"e3_b_{size}_s{seed}"
    q.SIZES[name_b] = s_b
    b = q.Paths(a.stage_dir("e3_b"))
    if not os.path.exists(b.eval_prompts):
        reviews.write_sft_jsonl(b.sft_data, s_b.n_sft, seed=s_b.seed, sentiment_mix=plan.b_sentiment)
        for src, dst in ((a.train_prompts, b.train_prompts), (a.eval_prompts, b.eval_prompts)):
            shutil.copyfile(src, dst)  # the same prompts: only the sampling model differs
    common.base_stages(name_b, b, ("sft", "pairs"))
    return b


def write_chosen_sft(pairs_path: str, out_path: str) -> int:
    """The chosen answers of a pair file as SFT rows ``{"prompt", "completion"}``."""
    from jaxrlhf.tasks import common as tc

    rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in tc.read_jsonl(pairs_path)]
    return tc.write_jsonl(out_path, rows)


def chosen_nll(policy_dir: str, pairs_path: str, size_name: str, p: q.Paths, limit: int) -> float:
    """Mean per-token NLL (nats) of the chosen answers of ``pairs_path`` (first ``limit`` pairs)
    under a policy: ``-sum log pi(y_t | x, y_<t) / #tokens`` over every answer token (EOS included)."""
    import jax

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


# ------------------------------------------------------------------------------------ run configs
def _finish(c, total: int, every: int, cache: str, **flat):
    """Checkpoints every ``every`` units (all kept, synchronous), logging, cache and ``flat`` keys."""
    flat.update({
        "checkpoint.every": every,
        "checkpoint.keep": total // every + 2,
        "checkpoint.async_save": False,
        "log_every": max(1, total // 5),
        "compilation_cache_dir": cache,
        "progress_bar": False,
    })  # fmt: skip
    c.update_from_flattened_dict(flat)
    return c


def dpo_config(size_name: str, a: q.Paths, plan: Plan, cache: str, data: str, start: str, nll: float = 0.0):
    """The quickstart's DPO stage config from ``start`` (also the frozen reference) on ``data``."""
    c = q.load_config("dpo", size_name, a.workdir)
    flat = {"data.path": data, "model.path": start, "dpo.beta": plan.beta, "dpo.nll_coef": nll}
    flat.update({"total_steps": plan.dpo_steps, "optim.lr": plan.dpo_lr})
    flat["optim.warmup_steps"] = plan.dpo_steps // 10
    return _finish(c, plan.dpo_steps, plan.ckpt_every, cache, **flat)


def sft_chosen_config(size_name: str, a: q.Paths, plan: Plan, cache: str, data: str):
    """The quickstart's SFT stage config started from model A on the chosen answers ``data``."""
    c = q.load_config("sft", size_name, a.workdir)
    with c.unlocked():
        c.model = d.model(a.sft_export)
        c.model.dtype = "float32"
    flat = {"data.path": data, "total_steps": plan.sft_chosen_steps, "optim.lr": plan.sft_chosen_lr}
    flat.update(
        {"optim.warmup_steps": 0, "optim.schedule": "constant", "batch_size": q.SIZES[size_name].pair_batch}
    )
    return _finish(c, plan.sft_chosen_steps, plan.sft_chosen_ckpt_every, cache, **flat)


def rm_other_config(size_name: str, a: q.Paths, b: q.Paths, cache: str):
    """The quickstart's reward stage (A's body, a fresh head) trained on B's pairs."""
    c = q.load_config("reward", size_name, a.workdir)
    c.update_from_flattened_dict({"data.path": b.pairs, "compilation_cache_dir": cache})
    return c


def dpo_iter_config(size_name: str, a: q.Paths, plan: Plan, cache: str, rm: str):
    """DPO-Iter from A on A's train prompts, labelled by the reward model ``rm``; as many DPO steps as
    the offline runs (``iter_rounds`` x ``dpo_steps / iter_rounds``), a checkpoint every
    ``iter_ckpt_every`` rounds."""
    s = q.SIZES[size_name]
    c = q.prompt_run_config("dpo_iter", s, a)
    c.reward = d.reward(model_path=rm, missing_eos_penalty=1.0)
    c.reward.model.dtype = "float32"
    c.ref = d.ref(ema_decay=1.0)
    c.generation = d.generation(max_new_tokens=s.max_new_tokens, temperature=1.0)
    c.dpo = dict(beta=plan.beta, label_smoothing=0.0, loss_type="sigmoid", nll_coef=0.0)
    c.dpo_iter = dict(
        rounds=plan.iter_rounds, prompts_per_round=plan.iter_prompts_per_round,
        samples_per_prompt=s.pair_samples, steps_per_round=plan.dpo_steps // plan.iter_rounds,
        reset_reference=True,
    )  # fmt: skip
    c.batch_size = min(s.pair_batch, plan.iter_prompts_per_round)
    c.optim = d.optim(lr=plan.dpo_lr, warmup_steps=0, schedule="constant")
    c = _finish(c, plan.iter_rounds, plan.iter_ckpt_every, cache)
    c.lock()
    return c


def train_run(config, run_dir: str) -> dict[str, Any]:
    """Trains (or reuses) one run; its record: wall time (0 when reused) and the config."""
    record_path = os.path.join(run_dir, "e3_run.json")
    if os.path.exists(record_path):
        with open(record_path) as f:
            return json.load(f)
    t0 = time.perf_counter()
    export = common.train(config, run_dir)
    record = {"wall_s": round(time.perf_counter() - t0, 1), "export": export,
              "config": json.loads(json.dumps(config.to_dict(), default=str))}  # fmt: skip
    with open(record_path, "w") as f:
        json.dump(record, f)
    return record


# ------------------------------------------------------------------------------------------ seed
def train_seed(size: str, seed: int, root: str, plan: Plan, cache: str) -> dict[str, Any]:
    """Base stages of A, model B, and every policy of one seed; returns runs, paths and timings."""
    name = register(size, seed)
    a = common.seed_paths(root, seed)
    t0 = time.perf_counter()
    common.base_stages(name, a, ("data", "sft", "pairs", "reward"))
    t_base = time.perf_counter() - t0
    b = other_model(size, seed, a, plan)
    chosen = os.path.join(a.stage_dir("e3_b"), "data", "chosen_sft.jsonl")
    if not os.path.exists(chosen):
        write_chosen_sft(b.pairs, chosen)
    t_b = time.perf_counter() - t0 - t_base

    def run(config, stage: str) -> dict[str, Any]:
        return train_run(config, a.stage_dir(stage))

    runs = {
        "dpo_own": run(dpo_config(name, a, plan, cache, a.pairs, a.sft_export), "e3_dpo_own"),
        "dpo_other": run(dpo_config(name, a, plan, cache, b.pairs, a.sft_export), "e3_dpo_other"),
        "sft_chosen": run(sft_chosen_config(name, a, plan, cache, chosen), "e3_sft_chosen"),
    }
    start = runs["sft_chosen"]["export"]
    runs["sft_chosen_dpo"] = run(dpo_config(name, a, plan, cache, b.pairs, start), "e3_sft_chosen_dpo")
    nll = dpo_config(name, a, plan, cache, b.pairs, a.sft_export, plan.nll_coef)
    runs["dpo_other_nll"] = run(nll, "e3_dpo_other_nll")
    rm = train_run(rm_other_config(name, a, b, cache), a.stage_dir("e3_rm_other"))
    runs["dpo_iter"] = train_run(
        dpo_iter_config(name, a, plan, cache, rm["export"]), a.stage_dir("e3_dpo_iter")
    )
    walls = {"base_stages_s": round(t_base, 1), "model_b_s": round(t_b, 1), "rm_other_s": rm["wall_s"]}
    return {"name": name, "a": a, "b": b, "runs": runs, "rm_other": rm, "walls": walls}


RUN_DIRS = {m: f"e3_{m}" for m in METHODS}


def evaluate_seed(size: str, seed: int, tr: dict[str, Any], plan: Plan) -> dict[str, Any]:
    """Scores A and every checkpoint against A; the pair data's statistics and chosen-NLL gap."""
    name, a, b = tr["name"], tr["a"], tr["b"]
    s = q.SIZES[name]
    t0 = time.perf_counter()
    ev = common.CheckpointEvaluator(
        q.load_config("evaluate", name, a.workdir), a.sft_export, s.eval_batch, 1000 + seed
    )
    keys = [1000 * (k + 1) + seed for k in range(plan.eval_samples)]  # one sampling key per sample
    sft_point = {"checkpoint": 0, "step": 0, "run": "sft", **mean_points([_eval_sft(ev, k) for k in keys])}
    unit = {m: 1 for m in METHODS} | {"dpo_iter": plan.dpo_steps // plan.iter_rounds}
    run_pts = {}
    for m in METHODS:
        pts = mean_points([_run_points(ev, a.stage_dir(RUN_DIRS[m]), k) for k in keys], per_checkpoint=True)
        offset = plan.sft_chosen_steps if m == "sft_chosen_dpo" else 0  # steps after A
        run_pts[m] = [dict(pt, step=offset + pt["checkpoint"] * unit[m], run=m) for pt in pts]
    points = {m: [sft_point, *run_pts[m]] for m in METHODS}
    points["sft_chosen_dpo"] = [sft_point, *run_pts["sft_chosen"], *run_pts["sft_chosen_dpo"]]
    data = {}
    for tag, pp in (("own", a), ("other", b)):
        with open(pp.pairs_stats) as f:
            st = json.load(f)
        data[tag] = {k: st[k] for k in ("pairs", "sft_gold_mean", "chosen_gold_mean", "rejected_gold_mean")}
        data[tag]["chosen_nll_under_A"] = chosen_nll(a.sft_export, pp.pairs, name, a, plan.nll_pairs)
    data["nll_gap"] = data["other"]["chosen_nll_under_A"] - data["own"]["chosen_nll_under_A"]
    return {"sft": sft_point, "points": points, "data": data, "eval_s": round(time.perf_counter() - t0, 1)}


def _eval_sft(ev, key: int) -> dict[str, float]:
    ev.seed = key
    return ev(ev.sft_params)


def _run_points(ev, run_dir: str, key: int) -> list[dict]:
    ev.seed = key  # CheckpointEvaluator reads its sampling seed at each call
    return common.run_points(ev, run_dir, f"e3_points_key{key}.json")


def mean_points(samples: list, per_checkpoint: bool = False):
    """The mean over sampling keys of the evaluator's numeric fields (``gold_sem`` combined as the
    standard error of the mean of independent means, ``prompts`` summed); with ``per_checkpoint``,
    ``samples`` are lists of points matched by position (the same checkpoints)."""
    if per_checkpoint:
        return [mean_points(list(group)) for group in zip(*samples, strict=True)]
    out = {k: float(np.mean([x[k] for x in samples])) for k in samples[0]}
    out["gold_sem"] = float(np.sqrt(sum(x["gold_sem"] ** 2 for x in samples)) / len(samples))
    out["prompts"] = sum(x["prompts"] for x in samples)
    if "checkpoint" in samples[0]:
        assert len({x["checkpoint"] for x in samples}) == 1, "sampling keys scored different checkpoints"
        out["checkpoint"] = samples[0]["checkpoint"]
    return out


def run_seed(size: str, seed: int, root: str, plan: Plan, cache: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    tr = train_seed(size, seed, root, plan, cache)
    out = evaluate_seed(size, seed, tr, plan)
    out["runs"] = {m: {"wall_s": r["wall_s"], "config": r["config"]} for m, r in tr["runs"].items()}
    out["rm_other_config"] = tr["rm_other"]["config"]
    out["walls"] = dict(tr["walls"], eval_s=out.pop("eval_s"), total_s=round(time.perf_counter() - t0, 1))
    return out


# ------------------------------------------------------------------------------------ statistics
def max_kl(points: list[dict]) -> float:
    return max(pt["kl_seq"] for pt in points)


def kl_targets(seed_res: dict, plan: Plan) -> list[float]:
    """The seed's common matched-KL targets: fractions of the smallest largest-KL over the methods."""
    top = min(max_kl(pts) for pts in seed_res["points"].values())
    return [f * top for f in plan.kl_fractions]


def matched(per_seed: list[dict], plan: Plan) -> dict[str, Any]:
    """Per KL fraction and method, at targets every method reaches (``kl_targets``): envelope gold,
    closest-point gold and KL gap, and the paired (same seed) differences of both vs ``BASELINES``."""
    out: dict[str, Any] = {}
    for i, frac in enumerate(plan.kl_fractions):
        key = f"{frac:g}x"
        out[key] = {}
        for m in METHODS:
            cols: dict[str, list] = {}
            for r in per_seed:
                target = kl_targets(r, plan)[i]
                e, c = envelope(r["points"][m], target), closest(r["points"][m], target)
                cols.setdefault("target_kl_seq", []).append(target)
                cols.setdefault("envelope_gold", []).append(e["gold"])
                cols.setdefault("closest_gold", []).append(c["gold"])
                cols.setdefault("closest_kl_gap", []).append(c["kl_seq"] - target)
                for base in BASELINES:
                    eb, cb = envelope(r["points"][base], target), closest(r["points"][base], target)
                    cols.setdefault(f"envelope_diff_vs_{base}", []).append(e["gold"] - eb["gold"])
                    cols.setdefault(f"closest_diff_vs_{base}", []).append(c["gold"] - cb["gold"])
            out[key][m] = {k: t_interval(v) for k, v in cols.items()}
    return out


def pairwise(per_seed: list[dict], plan: Plan) -> dict[str, Any]:
    """Per baseline, KL fraction and method, at targets both runs reach: per seed ``fraction x
    min(largest KL of the method, largest KL of the baseline)``; envelope gold of both and their
    difference, closest-point KL gaps and gold difference (method minus baseline, same seed)."""
    out: dict[str, Any] = {}
    for base in BASELINES:
        for frac in plan.kl_fractions:
            key = f"vs {base} {frac:g}x"
            out[key] = {}
            for m in (x for x in METHODS if x != base):
                cols: dict[str, list] = {}
                for r in per_seed:
                    pm, pb = r["points"][m], r["points"][base]
                    target = frac * min(max_kl(pm), max_kl(pb))
                    e, eb, c, cb = (
                        envelope(pm, target),
                        envelope(pb, target),
                        closest(pm, target),
                        closest(pb, target),
                    )
                    for k, v in (
                        ("target_kl_seq", target), ("envelope_gold", e["gold"]),
                        ("baseline_envelope_gold", eb["gold"]), ("envelope_diff", e["gold"] - eb["gold"]),
                        ("closest_kl_gap", c["kl_seq"] - target),
                        ("baseline_closest_kl_gap", cb["kl_seq"] - target),
                        ("closest_diff", c["gold"] - cb["gold"]),
                    ):  # fmt: skip
                        cols.setdefault(k, []).append(v)
                out[key][m] = {k: t_interval(v) for k, v in cols.items()}
    return out


FINAL_KEYS = ("gold", "kl_seq", "kl_token", "response_length", "frac_positive", "repeat_3gram_frac",
              "distinct_2", "out_of_grammar_frac")  # fmt: skip


def final_stats(per_seed: list[dict]) -> dict[str, Any]:
    """Per method (and A): the last checkpoint's metrics and the training wall time."""
    out = {"sft": {k: t_interval([r["sft"].get(k) for r in per_seed]) for k in FINAL_KEYS}}
    for m in METHODS:
        last = [r["points"][m][-1] for r in per_seed]
        out[m] = {k: t_interval([pt.get(k) for pt in last]) for k in FINAL_KEYS}
        out[m]["train_wall_s"] = t_interval([r["runs"][m]["wall_s"] for r in per_seed])
    return out


def data_stats(per_seed: list[dict]) -> dict[str, Any]:
    out = {
        tag: {k: t_interval([r["data"][tag][k] for r in per_seed]) for k in per_seed[0]["data"][tag]}
        for tag in ("own", "other")
    }
    out["nll_gap"] = t_interval([r["data"]["nll_gap"] for r in per_seed])
    return out


# ---------------------------------------------------------------------------------------- tables
DATA_COLS = (("pairs", 0), ("sft_gold_mean", 3), ("chosen_gold_mean", 3), ("rejected_gold_mean", 3),
             ("chosen_nll_under_A", 3))  # fmt: skip
FINAL_COLS = (("gold", 3), ("kl_seq", 2), ("kl_token", 3), ("response_length", 1), ("frac_positive", 3),
              ("repeat_3gram_frac", 3), ("distinct_2", 3), ("out_of_grammar_frac", 4),
              ("train_wall_s", 0))  # fmt: skip
PAIR_COLS = (("target_kl_seq", 2), ("envelope_gold", 3), ("baseline_envelope_gold", 3), ("envelope_diff", 3),
             ("closest_kl_gap", 2), ("baseline_closest_kl_gap", 2), ("closest_diff", 3))  # fmt: skip
MATCHED_COLS = (("target_kl_seq", 2), ("envelope_gold", 3), ("envelope_diff_vs_dpo_own", 3),
                ("envelope_diff_vs_dpo_other", 3), ("closest_gold", 3), ("closest_kl_gap", 2),
                ("closest_diff_vs_dpo_own", 3), ("closest_diff_vs_dpo_other", 3))  # fmt: skip


def _table(rows: dict[str, dict], cols, first: str) -> list[str]:
    lines = [f"| {first} | " + " | ".join(c for c, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for n, r in rows.items():
        lines.append(f"| {n} | " + " | ".join(fmt(r[c], dg) if c in r else "-" for c, dg in cols) + " |")
    return lines


def table_markdown(res: dict) -> str:
    """Every table of the results (``table.md``; docs/experiments_e3.md carries the same rows)."""
    n, s = res["seeds"], res["summary"]
    labels = {"own": "A (own samples)", "other": "B (other model)"}
    out = [
        f"Mean ± 95% t-interval half-width over {n} seeds (sample std, {n - 1} degrees of freedom); "
        f"held-out prompts, {res['plan']['eval_samples']} sampled completions each, gold scorer; "
        "KL(policy || A) in nats, A = the deployed SFT model every policy starts from.",
        "",
        "### Preference data (best/worst of 4 samples per train prompt, gold-labelled)",
        "",
        *_table({labels[t]: s["data"][t] for t in ("own", "other")}, DATA_COLS, "pairs from"),
        "",
        f"Chosen-answer NLL gap under A (B's minus A's, nats/token): {fmt(s['data']['nll_gap'])}",
        "",
        "### Final checkpoints",
        "",
        *_table(s["final"], FINAL_COLS, "method"),
    ]
    for key, rows in s["matched"].items():
        out += ["", f"### Matched KL: target = {key} the smallest largest-KL of the methods (per seed)", ""]
        out += _table(rows, MATCHED_COLS, "method")
    for key, rows in s["pairwise"].items():
        base, frac = key.removeprefix("vs ").split(" ")
        out += [
            "",
            f"### Pairwise matched KL vs {base}: target = {frac} the smaller largest-KL of the two "
            "(per seed)",
            "",
        ]
        out += _table(rows, PAIR_COLS, "method")
    return "\n".join(out)


# ----------------------------------------------------------------------------------------- plots
COLORS = {"sft": "black", "dpo_own": "tab:blue", "dpo_other": "tab:red", "sft_chosen": "tab:olive",
          "sft_chosen_dpo": "tab:green", "dpo_other_nll": "tab:purple", "dpo_iter": "tab:orange"}  # fmt: skip


def plot_gold_vs_kl(per_seed: list[dict], out_path: str) -> str | None:
    """One panel per seed: gold vs KL(policy || A) along each run's successive checkpoints (a line
    joins one run's checkpoints, starting from A or, for sft_chosen_dpo, from the SFT phase's end)."""
    plt = q.pyplot(out_path)
    if plt is None:
        return None
    fig, axes = plt.subplots(1, len(per_seed), figsize=(5 * len(per_seed), 4.2), dpi=110, squeeze=False)
    for j, r in enumerate(per_seed):
        ax = axes[0][j]
        ax.plot([r["sft"]["kl_seq"]], [r["sft"]["gold"]], "ks", label="A (SFT)")
        for m in METHODS:
            pts = r["points"][m]
            if m == "sft_chosen_dpo":  # its own run starts at sft_chosen's last checkpoint
                pts = [pt for pt in pts if pt["run"] == "sft_chosen"][-1:] + [
                    pt for pt in pts if pt["run"] == m
                ]
            ax.plot(
                [p["kl_seq"] for p in pts], [p["gold"] for p in pts], ".-", color=COLORS[m], lw=1, label=m
            )
        ax.set_xlabel("KL(policy || A), nats per sequence")
        ax.set_ylabel("gold score (held-out prompts)")
        ax.set_ylim(0, 1)
        ax.set_title(f"E3 seed {j}: checkpoints of each run", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    return out_path


# ------------------------------------------------------------------------------------------ main
def run(size: str, seeds: int, workdir: str, out: str) -> dict[str, Any]:
    from jaxrlhf.trainer.harness import enable_compilation_cache

    t0 = time.perf_counter()
    plan = PLANS[size]
    root = os.path.join(workdir, size)
    cache = os.path.join(root, "jax_cache")
    enable_compilation_cache(cache)  # every stage; seeds > 0 reuse seed 0's compiles
    per_seed = []
    for seed in range(seeds):
        print(f"[e3] seed {seed} ...", flush=True)
        per_seed.append(run_seed(size, seed, root, plan, cache))
        print(f"[e3] seed {seed}: {per_seed[-1]['walls']}", flush=True)
    wall = time.perf_counter() - t0
    base = sum(r["walls"]["base_stages_s"] for r in per_seed)
    res = {
        "experiment": "e3_shift",
        "size": size,
        "seeds": seeds,
        "sizes_A": dataclasses.asdict(BASES[size]),
        "plan": dataclasses.asdict(plan),
        "methods": list(METHODS),
        "eval": f"{plan.eval_samples} samples per held-out prompt at temperature 1 (sampling seeds "
        "1000 k + seed, k = 1.., the same for every checkpoint of a seed), metrics averaged over them; "
        "KL to A (the deployed SFT model)",
        "statistics": "mean, sample std (ddof 1), 95% Student-t half-width t(0.975, n-1) * std / sqrt(n)",
        "summary": {
            "data": data_stats(per_seed), "final": final_stats(per_seed), "matched": matched(per_seed, plan),
            "pairwise": pairwise(per_seed, plan),
        },
        "per_seed": per_seed,
        "code_commit": common.git_commit(),
        "gold_score_commit": common.git_commit("jaxrlhf/tasks/reviews.py"),
        "uncommitted_files": common.uncommitted("jaxrlhf"),
        "wall_s_total": round(wall, 1),
        "wall_s_without_base_stages": round(wall - base, 1),
        "hardware": q.hardware(),
    }  # fmt: skip
    q.write_outputs(
        out, table_markdown(res), res, lambda path: plot_gold_vs_kl(per_seed, path), "gold_vs_kl.png"
    )
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default="docs/results/e3")
    ap.add_argument(
        "--workdir", default=os.path.join("workdirs", "experiments"), help="A's stages are shared"
    )
    ap.add_argument("--smoke", action="store_true", help="toy sizes (seconds; the test uses it)")
    a = ap.parse_args(argv)
    if a.seeds < 1:
        raise ValueError(f"--seeds={a.seeds}: need >= 1")
    res = run("smoke" if a.smoke else "mini", a.seeds, a.workdir, a.out)
    print(table_markdown(res), flush=True)
    print(f"[e3] {res['wall_s_total']:.0f}s wall; results in {a.out}", flush=True)
    return res


if __name__ == "__main__":
    main()
