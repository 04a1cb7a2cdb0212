r"""E5: verifiable answers - pass@k of SFT, DPO (tuned to PPO's KL), DPO-Iter, PPO, GRPO and RLOO.

A stand-in for the code-competition experiments of Xu et al. 2024 (APPS / CodeContests) on
``jaxrlhf.tasks.verifiable`` (easy difficulty: 2-operand arithmetic, reverse / sort / max / min of
3 digits; ``fit``, whose checker gives partial credit, is left out so that every score is 1/0).
Every seed has its own base (issue 17): data, SFT model, pairs and every run below.

  a. data     per seed: ``make_sft_examples(noise=NOISE)`` (30 % plausible wrong answers, so that SFT
              is mediocre), 512 train prompts, 512 held-out prompts (neither an SFT nor a train
              prompt), and a validation split (``prompts_val.jsonl``, 256 train-distribution prompts,
              none of them a train or a held-out prompt) used only to tune DPO.
  b. sft      the quickstart's tiny Llama trained from scratch on that seed's data (``config.seed`` = seed).
  c. pairs    4 SFT samples per train prompt; chosen = a correct sample, rejected = the worst.
  d. ppo      ``configs/quickstart/ppo.py`` keys with the checker as reward, critic from SFT
              (16 iterations x 128 rollouts, 64 optimizer steps).
  e. grpo, rloo  the critic-free family at PPO's samples and optimizer steps (``grpo_config``,
              shared with E8; 32 prompts x 4 samples per iteration).
  f. dpo      tuned fairly: a grid of beta x lr, a checkpoint every ``dpo_ckpt_every`` steps; every
              checkpoint is scored on the validation split (pass@1, KL to SFT); the setting chosen is
              the one with the best validation pass@1 among those whose validation KL is within
              ``kl_band`` (relative) of PPO's validation KL, else the closest in KL (``choose``).
              ``--tune=every`` (default) tunes every seed; ``--tune=first`` tunes seed 0 and reuses
              its choice (beta, lr, steps) for the other seeds.
  g. dpo_iter iterative DPO from SFT with the chosen beta and lr, ``iter_rounds`` rounds whose DPO steps
              add up to the chosen DPO step count (rounded up); the run fails if a round took no step.
  h. eval     every policy on the held-out prompts, ``eval_samples`` samples each (temperature 1):
              unbiased pass@k (Chen et al. 2021), KL to SFT per sequence and per token on those
              samples; differences paired by seed (``PAIRS``), mean ± 95 % Student-t interval.

Command (2 CPU cores, about 5 minutes; the measured time is in docs/experiments_e5.md):
  python -m jaxrlhf.experiments.e5_verifiable --seeds=3 --out=docs/results/e5

Expected (docs/results/e5/table.md): PPO, GRPO and RLOO above SFT in pass@1 (+0.06) at a KL of
0.2-0.3 nats; DPO tuned to PPO's validation KL about 0.04 below PPO and not clearly above SFT; DPO-Iter
no better than DPO; DPO checkpoints trained past PPO's KL fall below SFT on the validation split.
Writes ``table.md``, ``results.json`` and ``pass_at_k.png`` to ``--out``; runs live in ``--workdir``
(default ``workdirs/e5``; finished runs are reused). ``--smoke`` runs toy sizes (the tests).
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

from jaxrlhf import config_defaults as d
from jaxrlhf import quickstart as q
from jaxrlhf.experiments import common as ex

REWARD_FN = "jaxrlhf.tasks.verifiable:reward"
NOISE = 0.3  # fraction of SFT rows with a plausible wrong answer
DIFFICULTY = "easy"
# Single-answer tasks (1/0 checker, so pass@k is defined); ``fit`` (fractional credit) is left out.
TASKS = ("arith", "reverse", "sort", "max", "min")
_E5 = dataclasses.replace(
    q.SIZES["full"],
    n_sft=4000,
    n_train_prompts=512,
    n_eval_prompts=512,
    max_prompt_length=10,
    max_length=18,
    max_new_tokens=8,
    sft_steps=300,
    pair_samples=4,
    dpo_steps=64,  # the longest DPO run of the tuning grid
    dpo_lr=5e-4,  # unused: the grid's lrs (EXTRA) replace it
    ppo_iterations=16,
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
# Per size, what E5 adds to the sizes: the validation split (prompts, samples each), the held-out
# samples per prompt (the n of pass@k), the DPO grid (beta x lr, a checkpoint every ``dpo_ckpt_every``
# steps up to the size's ``dpo_steps``), the relative KL band of ``choose``, DPO-Iter's rounds, prompts
# and samples per round (smoke: 8 samples, so that its weak SFT model gives pairs every round), and
# the GRPO-family group size.
EXTRA = {
    "e5": dict(
        n_val_prompts=256, val_samples=8, eval_samples=8, betas=(0.1, 0.5), lrs=(5e-5, 2e-4, 5e-4),
        dpo_ckpt_every=8, kl_band=0.5, iter_rounds=3, iter_prompts=256, iter_samples=4, group=4,
    ),
    "e5_smoke": dict(
        n_val_prompts=16, val_samples=2, eval_samples=4, betas=(0.1,), lrs=(1e-3, 1e-4),
        dpo_ckpt_every=2, kl_band=0.5, iter_rounds=2, iter_prompts=64, iter_samples=8, group=2,
    ),
}  # fmt: skip
POLICIES = ("sft", "dpo", "dpo_iter", "ppo", "grpo", "rloo")
TRAINED = ("ppo", "grpo", "rloo")  # trained from fixed configs; DPO and DPO-Iter depend on the tuning
# The critic-free estimators in their published forms (docs/grpo.md; E8 runs all four).
LOSS_AGG = {"grpo": "seq_mean", "dr_grpo": "seq_sum_norm", "rloo": "token_mean", "reinforce_pp": "token_mean"}


# ------------------------------------------------------------------------------------------- data
def stage_data(s: q.Sizes, p: q.Paths, disjoint_train: bool = False) -> dict:
    """SFT rows (``s.seed``), train prompts (``s.seed + 1``), held-out prompts (``s.seed + 2``): no SFT
    prompt and, with ``disjoint_train`` (E5; E8 ran without), no train prompt either."""
    from jaxrlhf.tasks import common, verifiable

    os.makedirs(os.path.dirname(p.sft_data), exist_ok=True)
    rows = verifiable.make_sft_examples(s.n_sft, seed=s.seed, noise=NOISE, difficulty=DIFFICULTY, tasks=TASKS)
    common.write_jsonl(
        p.sft_data, ({"prompt": r["prompt"], "completion": " " + r["completion"]} for r in rows)
    )
    seen = {r["prompt"] for r in rows}
    train = verifiable.make_prompts(s.n_train_prompts, seed=s.seed + 1, difficulty=DIFFICULTY, tasks=TASKS)
    common.write_jsonl(p.train_prompts, train)
    if disjoint_train:
        seen |= {r["prompt"] for r in train}
    held = verifiable.make_prompts(
        s.n_eval_prompts, seed=s.seed + 2, difficulty=DIFFICULTY, tasks=TASKS, exclude=seen
    )
    common.write_jsonl(p.eval_prompts, held)
    return {"sft_rows": len(rows), "sft_correct": float(np.mean([r["correct"] for r in rows]))}


def val_prompts_path(p: q.Paths) -> str:
    return os.path.join(p.workdir, "data", "prompts_val.jsonl")


def stage_val(s: q.Sizes, p: q.Paths, n: int) -> dict:
    """The validation split (``s.seed + 3``): ``n`` prompts of the train distribution that are
    neither train nor held-out prompts (DPO's tuning never sees the prompts it is judged on)."""
    from jaxrlhf.tasks import common, verifiable

    taken = {r["prompt"] for path in (p.train_prompts, p.eval_prompts) for r in common.read_jsonl(path)}
    rows = verifiable.make_prompts(n, seed=s.seed + 3, difficulty=DIFFICULTY, tasks=TASKS, exclude=taken)
    common.write_jsonl(val_prompts_path(p), rows)
    return {"val_prompts": len(rows)}


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


# ---------------------------------------------------------------------------------------- configs
def dpo_config(size: str, p: q.Paths, seed: int, pairs: str, beta=None, lr=None, steps=None, every=None):
    """The quickstart's DPO stage (frozen SFT reference) on ``pairs``; ``beta``, ``lr``, ``steps`` and the
    checkpoint cadence ``every`` (all checkpoints kept) override the size's values when given."""
    s = q.SIZES[size]
    c = q.load_config("dpo", size, p.workdir)
    c.seed = seed
    c.data.path = pairs
    c.dpo.beta = s.dpo_beta if beta is None else beta
    c.optim.lr = s.dpo_lr if lr is None else lr
    if steps is not None:
        c.total_steps = steps
        c.log_every = max(1, steps // 6)
        c.checkpoint.every = every or steps
        c.checkpoint.keep = steps // c.checkpoint.every + 2
        c.checkpoint.async_save = False
    return c


def dpo_iter_config(size: str, p: q.Paths, seed: int, x: dict, beta: float, lr: float, steps_per_round: int):
    """Iterative DPO from SFT on the train prompts (``x``: ``EXTRA``'s rounds and prompts per round),
    best vs worst of ``iter_samples`` samples per prompt, reference reset every round."""
    s = q.SIZES[size]
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
    c.dpo.beta = beta
    c.dpo_iter.rounds = x["iter_rounds"]
    c.dpo_iter.prompts_per_round = x["iter_prompts"]
    c.dpo_iter.samples_per_prompt = x["iter_samples"]
    c.dpo_iter.steps_per_round = steps_per_round
    c.batch_size = s.pair_batch
    c.optim = d.optim(lr=lr, warmup_steps=0, schedule="constant")
    c.checkpoint.every = x["iter_rounds"]
    c.log_every = 1
    return c


def ppo_config(size: str, p: q.Paths, seed: int):
    """The quickstart's PPO stage with the checker as the reward and the critic from SFT."""
    c = q.load_config("ppo", size, p.workdir)
    c.unlock()
    c.seed = seed
    c.reward = d.reward(fn=REWARD_FN, missing_eos_penalty=0.0)
    c.critic.model = d.model(p.sft_export)
    c.critic.model.dtype = "float32"
    return c


def grpo_config(size: str, p: q.Paths, seed: int, estimator: str, group: int):
    """The critic-free run matching ``ppo_config``'s: same samples (``rollout / group`` prompts x ``group``
    samples per iteration), optimizer steps, lr, EMA reference and KL weight; the estimator in its
    published form (``LOSS_AGG``; KL k3 as a loss term, REINFORCE++: k1 in the per-token reward)."""
    s = q.SIZES[size]
    c = q.prompt_run_config("grpo", s, p)
    c.seed = seed
    c.mesh = dict(data=1, fsdp=1, tensor=1)
    c.progress_bar = False
    c.reward = d.reward(fn=REWARD_FN, missing_eos_penalty=0.0, shaping=False)
    c.ref = d.ref(ema_decay=s.ppo_ema_decay)
    c.generation = d.generation(max_new_tokens=s.max_new_tokens, temperature=1.0)
    c.grpo = d.grpo(
        iterations=s.ppo_iterations,
        prompts_per_iteration=s.ppo_rollout_batch // group,
        samples_per_prompt=group,
        minibatch_size=s.ppo_minibatch,
        epochs=s.ppo_epochs,
        estimator=estimator,
        loss_agg=LOSS_AGG[estimator],
        kl_coef=s.ppo_kl_coef,
        kl_estimator="k1" if estimator == "reinforce_pp" else "k3",
    )
    c.optim = d.optim(lr=s.ppo_lr, warmup_steps=0, schedule="constant")
    c.checkpoint.every = s.ppo_iterations
    c.log_every = max(1, s.ppo_iterations // 4)
    return c


def eval_config(size: str, p: q.Paths):
    """The quickstart's evaluate config (held-out prompts) with the checker as the judge."""
    c = q.load_config("evaluate", size, p.workdir)
    c.reward.fn = REWARD_FN
    return c


def val_config(size: str, p: q.Paths):
    """``eval_config`` on the validation split."""
    c = eval_config(size, p)
    c.data.path = val_prompts_path(p)
    return c


# ------------------------------------------------------------------------------------- evaluation
class PassEvaluator(ex.CheckpointEvaluator):
    """pass@k and KL to SFT of policies given as parameters, on ``config.data``'s prompts with
    ``samples`` samples per prompt (``config.generation``, the same sampling keys for every policy).

    * ``pass@k`` for k = 1, 2, 4, ... <= n and n: the unbiased estimator of Chen et al. (2021),
      ``1 - C(n - c, k) / C(n, k)`` per prompt with ``c`` correct of ``n``, averaged over prompts.
    * ``kl_seq``: mean over every sample of ``sum_t log pi(y_t) - log pi_sft(y_t)`` (a Monte-Carlo
      estimate of KL(pi || pi_sft) per sequence); ``kl_token``: the same sum over all samples divided
      by their response tokens; ``response_length``: mean response tokens.
    """

    def __init__(self, config, sft_dir: str, samples: int, batch_size: int, seed: int):
        super().__init__(config, sft_dir, batch_size, seed)
        self.samples = samples

    def __call__(self, params) -> dict[str, float]:
        import jax

        from jaxrlhf import data as data_lib
        from jaxrlhf import rollout
        from jaxrlhf.distributed import gather
        from jaxrlhf.sharding import shard_batch
        from jaxrlhf.tasks.verifiable import pass_at_k_from_scores

        n = self.samples
        it = data_lib.BatchIterator(
            self.ds, self.batch, shuffle=False, repeat=False, process_index=0, process_count=1
        )
        scores, kls, lengths = [], [], []
        for b, host in enumerate(it):
            rep = {
                k: np.repeat(host[k], n, axis=0) for k in ("prompt_ids", "prompt_mask", "index")
            }  # [B*n, P]
            prompts = shard_batch(self.mesh, {k: rep[k] for k in ("prompt_ids", "prompt_mask")})
            rng = jax.random.fold_in(jax.random.key(self.seed), b)
            gen = self.sampler(params, prompts["prompt_ids"], prompts["prompt_mask"], rng)
            seq = rollout.response_sequences(
                prompts["prompt_ids"], prompts["prompt_mask"], gen.response_ids, gen.response_mask
            )
            judged = self.judge(seq, rep["prompt_ids"].shape[1], rep["index"])
            scores.append(np.asarray(jax.device_get(judged)).reshape(-1, n))  # [B, n]
            kls.append(np.asarray(gather(self.logps(params, seq) - self.logps(self.sft_params, seq))))
            lengths.append(np.asarray(gather(gen.response_mask)).sum(-1))
        scores = np.concatenate(scores)
        if not np.all(np.isin(scores, (0.0, 1.0))):
            raise ValueError(f"pass@k needs 0/1 scores; the judge {REWARD_FN} gave {np.unique(scores)[:8]}")
        kls, lengths = (np.concatenate(v).astype(np.float64) for v in (kls, lengths))
        ks = sorted({2**i for i in range(8) if 2**i <= n} | {n})
        out = {f"pass@{k}": float(np.mean(pass_at_k_from_scores(scores, k))) for k in ks}
        out.update(
            kl_seq=float(kls.mean()),
            kl_token=float(kls.sum() / max(lengths.sum(), 1.0)),
            response_length=float(lengths.mean()),
            prompts=int(scores.shape[0]),
        )
        return out


def export_params(ev: PassEvaluator, hf_dir: str):
    """The parameters of an HF-format export on ``ev``'s mesh (same tree as ``ev.sft_params``)."""
    from jaxrlhf import evaluate

    return evaluate.load_policy(hf_dir, "float32", ev.mesh)[1]


def checkpoint_params(ev: PassEvaluator, run_dir: str, step: int):
    """The policy parameters of ``run_dir``'s orbax checkpoint at ``step``."""
    from jaxrlhf.analysis import divergence

    expected = list(divergence.flat_params(ev.sft_params))
    steps = dict(divergence.run_checkpoints(os.path.abspath(run_dir)))
    if step not in steps:
        raise FileNotFoundError(f"{run_dir}: no checkpoint at step {step} (have {sorted(steps)})")
    key = divergence.find_params_key(steps[step], expected)
    return ev.params_from_flat(divergence.restore_params(steps[step], expected, key))


def choose(points: list[dict], target: float, band: float) -> dict:
    """The DPO setting chosen on validation: among the points whose ``kl_seq`` is within
    ``band * target`` of ``target`` (PPO's validation KL), the best ``pass@1`` (ties: the closer KL);
    when none is in the band, the point closest to ``target`` in KL."""
    if not points:
        raise ValueError("choose: no DPO checkpoint was scored")
    near = [pt for pt in points if abs(pt["kl_seq"] - target) <= band * target]
    if near:
        return max(near, key=lambda pt: (pt["pass@1"], -abs(pt["kl_seq"] - target)))
    return min(points, key=lambda pt: abs(pt["kl_seq"] - target))


# ------------------------------------------------------------------------------------------- runs
def train_run(config, run_dir: str) -> dict[str, Any]:
    """``registry.run`` unless ``run_dir`` holds a finished record; returns the record: wall time,
    the config (``to_dict``), optimizer steps, the last logged metrics and (DPO-Iter) every round's
    pair counts."""
    from jaxrlhf import registry

    path = os.path.join(run_dir, "e5_run.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    t0 = time.perf_counter()
    result = registry.run(config, run_dir)
    if result.get("interrupted"):
        raise KeyboardInterrupt(f"{run_dir}: stopped by a signal; rerun to resume")
    hist = result.get("history") or [result.get("metrics", {})]
    keys = ("round/pairs", "round/pairs_used", "round/batch_size", "round/ties_dropped", "round/reward_mean")
    record = {
        "wall_s": round(time.perf_counter() - t0, 1),
        "config": config.to_dict(),
        "optimizer_steps": int(result["state"].step) if "state" in result else None,
        "last": q._floats(hist[-1]),
        "rounds": [{k: float(h[k]) for k in keys if k in h} for h in hist if "round/pairs" in h],
    }
    with open(path, "w") as f:
        json.dump(record, f, default=str)
    print(f"  [{run_dir}]: {record['wall_s']:.1f}s", flush=True)
    return record


def check_rounds(record: dict, run_dir: str) -> None:
    """Every DPO-Iter round took DPO steps (``round/pairs_used`` > 0), else an error naming the round."""
    if not record["rounds"]:
        raise RuntimeError(f"{run_dir}: DPO-Iter logged no round")
    for i, r in enumerate(record["rounds"], 1):
        if r.get("round/batch_size", 0.0) <= 0 or r.get("round/pairs_used", 0.0) <= 0:
            raise RuntimeError(
                f"{run_dir}: DPO-Iter round {i} took no DPO step ({r}); raise EXTRA['iter_prompts']"
            )


def tune_dpo(name: str, p: q.Paths, seed: int, ev_val, grid: list, steps: int, every: int) -> tuple:
    """Trains DPO at each ``(beta, lr)`` of ``grid`` for ``steps`` steps (a checkpoint every ``every``)
    and scores every checkpoint on the validation split; returns ``(points, run records)``."""
    pairs = os.path.join(p.workdir, "data", "e5_pairs.jsonl")
    points, records = [], {}
    for beta, lr in grid:
        run = f"e5_dpo_b{beta:g}_lr{lr:g}_s{steps}"
        run_dir = p.stage_dir(run)
        records[run] = train_run(dpo_config(name, p, seed, pairs, beta, lr, steps, every), run_dir)
        for pt in ex.run_points(ev_val, run_dir, "val_points.json"):
            points.append({"run": run, "beta": beta, "lr": lr, "steps": pt["checkpoint"], **pt})
    return points, records


def base_stages(size: str, name: str, p: q.Paths, seed: int) -> dict:
    """This seed's data, validation split, SFT model and SFT pairs (finished stages are reused)."""
    s, x, info = q.SIZES[name], EXTRA[size], {}
    if not q.stage_done("data", p):
        info["data"] = stage_data(s, p, disjoint_train=True)
        info["val"] = stage_val(s, p, x["n_val_prompts"])
    if not q.stage_done("sft", p):
        info["sft"] = q.train_stage("sft", name, p)["last"]
    pairs = os.path.join(p.workdir, "data", "e5_pairs.jsonl")
    if not os.path.exists(pairs):
        info["pairs"] = stage_pairs(s, p, 100 + seed, pairs)
    return info


def run_seed(size: str, seed: int, root: str, fixed: dict | None) -> dict[str, Any]:
    """One seed, from its own data and SFT model to the held-out table; ``fixed``: the DPO choice
    ``{beta, lr, steps}`` to reuse (``--tune=first``, seeds > 0), ``None``: tune on this seed."""
    t0 = time.perf_counter()
    name, x = ex.register_size(SIZES[size], size, seed), EXTRA[size]
    s, p = q.SIZES[name], ex.seed_paths(root, seed)
    cached = os.path.join(p.workdir, "e5_seed.json")
    if os.path.exists(cached):
        with open(cached) as f:
            return json.load(f)
    stages = base_stages(size, name, p, seed)
    configs = {
        "ppo": ppo_config(name, p, seed),
        **{est: grpo_config(name, p, seed, est, x["group"]) for est in ("grpo", "rloo")},
    }
    runs = {k: train_run(c, p.stage_dir(f"e5_{k}")) for k, c in configs.items()}
    ev_val = PassEvaluator(val_config(name, p), p.sft_export, x["val_samples"], s.eval_batch, seed)
    params = {"sft": ev_val.sft_params}
    params.update({k: export_params(ev_val, p.export(f"e5_{k}")) for k in TRAINED})
    target = ev_val(params["ppo"])["kl_seq"]
    if fixed is None:
        grid = [(b, lr) for b in x["betas"] for lr in x["lrs"]]
        points, dpo_runs = tune_dpo(name, p, seed, ev_val, grid, s.dpo_steps, x["dpo_ckpt_every"])
        chosen = choose(points, target, x["kl_band"])
    else:
        grid = [(fixed["beta"], fixed["lr"])]
        points, dpo_runs = tune_dpo(name, p, seed, ev_val, grid, fixed["steps"], fixed["steps"])
        chosen = points[-1]
    runs.update(dpo_runs)
    params["dpo"] = checkpoint_params(ev_val, p.stage_dir(chosen["run"]), chosen["steps"])
    per_round = math.ceil(chosen["steps"] / x["iter_rounds"])
    c = dpo_iter_config(name, p, seed, x, chosen["beta"], chosen["lr"], per_round)
    runs["dpo_iter"] = train_run(c, p.stage_dir("e5_dpo_iter"))
    check_rounds(runs["dpo_iter"], p.stage_dir("e5_dpo_iter"))
    params["dpo_iter"] = export_params(ev_val, p.export("e5_dpo_iter"))
    val = {k: ev_val(params[k]) for k in POLICIES}
    ev = PassEvaluator(eval_config(name, p), p.sft_export, x["eval_samples"], s.eval_batch, seed)
    held_out = {k: ev(params[k]) for k in POLICIES}
    out = {
        "seed": seed,
        "tuned_here": fixed is None,
        "ppo_val_kl_seq": target,
        "grid": points,
        "chosen": chosen,
        "dpo_iter_steps_per_round": per_round,
        "val": val,
        "held_out": held_out,
        "stages": stages,
        "runs": runs,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    with open(cached, "w") as f:
        json.dump(out, f, default=str)
    return out


# ---------------------------------------------------------------------------------------- results
# Paired comparisons (a - b on the same seed, hence the same SFT model and data) of the second table.
PAIRS = (
    ("dpo", "ppo"), ("dpo_iter", "ppo"), ("grpo", "ppo"), ("rloo", "ppo"), ("dpo_iter", "dpo"),
    ("dpo", "sft"), ("dpo_iter", "sft"), ("ppo", "sft"), ("grpo", "sft"), ("rloo", "sft"),
)  # fmt: skip


def summarise(per_seed: list[dict]) -> dict[str, dict]:
    """Per policy: every held-out metric and the validation KL / pass@1 as ``t_interval`` over seeds."""
    first = per_seed[0]["held_out"]["sft"]
    metrics = [m for m in first if m != "prompts"]
    table = {}
    for pol in POLICIES:
        row = {m: ex.t_interval([r["held_out"][pol][m] for r in per_seed]) for m in metrics}
        for m in ("kl_seq", "pass@1"):
            row[f"val_{m}"] = ex.t_interval([r["val"][pol][m] for r in per_seed])
        table[pol] = row
    return table


def paired(per_seed: list[dict]) -> dict[str, dict]:
    """``"a - b"`` -> held-out pass@1, pass@n and KL per sequence differences, paired by seed
    (``t_interval`` of the per-seed differences), for every pair of ``PAIRS``."""
    first = per_seed[0]["held_out"]["sft"]
    top = [m for m in first if m.startswith("pass@")][-1]
    return {
        f"{a} - {b}": {
            m: ex.t_interval([r["held_out"][a][m] - r["held_out"][b][m] for r in per_seed])
            for m in ("pass@1", top, "kl_seq")
        }
        for a, b in PAIRS
    }


def _main_table(res: dict) -> list[str]:
    t = res["table"]
    ks = [m for m in t["sft"] if m.startswith("pass@")]
    cols = [*ks, "kl_seq", "kl_token", "response_length", "val_kl_seq", "val_pass@1"]
    head = [*ks, "KL/seq (nats)", "KL/token", "length (tokens)", "val KL/seq", "val pass@1"]
    lines = ["| policy | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for pol, row in t.items():
        cells = [ex.fmt(row[m], 1 if m == "response_length" else 3) for m in cols]
        lines.append(f"| {pol} | " + " | ".join(cells) + " |")
    return lines


def _paired_table(res: dict) -> list[str]:
    metrics = list(next(iter(res["paired"].values())))
    head = ["Δ " + m.replace("kl_seq", "KL/seq") for m in metrics]
    lines = ["| difference (paired by seed) | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for label, row in res["paired"].items():
        lines.append(f"| {label} | " + " | ".join(ex.fmt(row[m]) for m in metrics) + " |")
    return lines


def _grid_table(res: dict) -> list[str]:
    """The DPO grid on validation: ``KL/seq / pass@1`` per (beta, lr) and checkpoint, chosen in bold."""
    lines = []
    for r in (r for r in res["per_seed"] if r["tuned_here"]):
        steps = sorted({pt["steps"] for pt in r["grid"]})
        if not lines:
            head = "| seed (PPO val KL/seq; SFT val pass@1) | beta | lr | "
            lines = [head + " | ".join(f"step {s}" for s in steps) + " |"]
            lines.append("|---" * (len(steps) + 3) + "|")
        for run in dict.fromkeys(pt["run"] for pt in r["grid"]):
            pts = {pt["steps"]: pt for pt in r["grid"] if pt["run"] == run}
            cells = []
            for s in steps:
                pt = pts.get(s)
                cell = "-" if pt is None else f"{pt['kl_seq']:.2f} / {pt['pass@1']:.3f}"
                chosen = pt is not None and (run, s) == (r["chosen"]["run"], r["chosen"]["steps"])
                cells.append(f"**{cell}**" if chosen else cell)
            b, lr = pts[max(pts)]["beta"], pts[max(pts)]["lr"]
            seed = f"{r['seed']} ({r['ppo_val_kl_seq']:.3f}; {r['val']['sft']['pass@1']:.3f})"
            lines.append(f"| {seed} | {b:g} | {lr:g} | " + " | ".join(cells) + " |")
    return lines


def _choice_table(res: dict) -> list[str]:
    """Per seed: the DPO setting used and its validation KL / pass@1 next to PPO's; DPO-Iter's rounds."""
    lines = [
        "| seed | DPO beta | DPO lr | DPO steps | val KL/seq DPO | val KL/seq PPO | val pass@1 DPO | "
        "val pass@1 PPO | DPO-Iter steps/round | DPO-Iter rounds: pairs made / used / batch |",
        "|---" * 10 + "|",
    ]
    for r in res["per_seed"]:
        c, v = r["chosen"], r["val"]
        rounds = r["runs"]["dpo_iter"]["rounds"]
        made = ", ".join(
            f"{x['round/pairs']:.0f}/{x['round/pairs_used']:.0f}/{x['round/batch_size']:.0f}" for x in rounds
        )
        lines.append(
            f"| {r['seed']} | {c['beta']:g} | {c['lr']:g} | {c['steps']} | {v['dpo']['kl_seq']:.3f} | "
            f"{v['ppo']['kl_seq']:.3f} | {v['dpo']['pass@1']:.3f} | {v['ppo']['pass@1']:.3f} | "
            f"{r['dpo_iter_steps_per_round']} | {made} |"
        )
    return lines


def _envelope_table(res: dict) -> list[str]:
    """Per seed, on the validation split and measured checkpoints only: PPO; DPO's upper envelope at
    PPO's KL (the best pass@1 among the grid's checkpoints with KL <= PPO's, SFT included); the best
    DPO checkpoint of the whole grid; how many grid checkpoints fall below SFT's pass@1."""
    lines = [
        "| seed | PPO val KL/seq | PPO val pass@1 | DPO envelope at KL <= PPO's: pass@1 (KL) | best DPO "
        "checkpoint, any KL: pass@1 (KL) | SFT val pass@1 | DPO checkpoints below SFT "
        "| of those with KL > 1 |",
        "|---" * 8 + "|",
    ]
    for r in res["per_seed"]:
        ppo, sft, grid = r["val"]["ppo"], r["val"]["sft"], r["grid"]
        inside = [pt for pt in grid if pt["kl_seq"] <= ppo["kl_seq"]] + [sft]
        env, best = (max(pts, key=lambda pt: pt["pass@1"]) for pts in (inside, grid))
        below = [pt for pt in grid if pt["pass@1"] < sft["pass@1"]]
        far = [pt for pt in grid if pt["kl_seq"] > 1.0]
        lines.append(
            f"| {r['seed']} | {ppo['kl_seq']:.3f} | {ppo['pass@1']:.3f} | {env['pass@1']:.3f} "
            f"({env['kl_seq']:.2f}) | {best['pass@1']:.3f} ({best['kl_seq']:.2f}) | {sft['pass@1']:.3f} | "
            f"{len(below)} of {len(grid)} | {sum(pt['kl_seq'] > 1.0 for pt in below)} of {len(far)} |"
        )
    return lines


def table_markdown(res: dict) -> str:
    """``table.md`` from ``results.json`` alone: held-out table, paired differences, DPO grid,
    per-seed choice, matched-KL envelope."""
    n, x = res["seeds"], res["extra"]
    prompts = res["per_seed"][0]["held_out"]["sft"]["prompts"]
    return "\n".join(
        [
            f"Held-out prompts: {prompts} per seed, n = {x['eval_samples']} samples each (temperature 1). "
            f"Mean ± 95 % Student-t half-width over {n} seeds (sample std, ddof 1; t(0.975, {n - 1})); "
            "Δ = difference paired by seed (same SFT model); KL to the seed's SFT model on the policy's "
            "samples (all n); val = validation split.",
            "",
            *_main_table(res),
            "",
            *_paired_table(res),
            "",
            f"DPO tuning on the validation split ({x['n_val_prompts']} prompts x {x['val_samples']} "
            "samples): "
            "`KL/seq / pass@1` per checkpoint, the chosen one in bold.",
            "",
            *_grid_table(res),
            "",
            "DPO as used per seed (validation split, next to PPO) and DPO-Iter's rounds.",
            "",
            *_choice_table(res),
            "",
            "Matched KL on measured validation points only (no interpolation): DPO's upper envelope at "
            "PPO's KL, and how many DPO checkpoints fall below SFT.",
            "",
            *_envelope_table(res),
        ]
    )


def plot(res: dict, path: str, title: str = "E5 verifiable answers") -> None:
    """pass@k against k (log scale) for every policy of ``res["table"]``, mean ± std over seeds (E8)."""
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


def plot_e5(res: dict, path: str) -> None:
    """Left: held-out pass@k minus SFT's, paired by seed, against k per policy (mean ± 95 %
    t-interval; a line joins one policy's k values). Right: the DPO grid on validation, pass@1
    against KL to SFT (symlog axis), a line per run through its successive checkpoints from SFT
    (seed 0's tuning), with PPO / GRPO / RLOO's validation points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    held = [r["held_out"] for r in res["per_seed"]]
    ks = sorted(int(m.split("@")[1]) for m in held[0]["sft"] if m.startswith("pass@"))
    for i, name in enumerate(p for p in POLICIES if p != "sft"):
        d = [ex.t_interval([h[name][f"pass@{k}"] - h["sft"][f"pass@{k}"] for h in held]) for k in ks]
        xs = [k * (1 + 0.03 * (i - 2)) for k in ks]  # small offsets so that the bars do not overlap
        ax.errorbar(xs, [x["mean"] for x in d], yerr=[x["ci95"] or 0.0 for x in d], marker="o", capsize=3,
                    label=name)  # fmt: skip
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="k", ylabel="pass@k − SFT's pass@k (held-out, paired by seed)",
           title=f"Gain over SFT, mean ± 95% CI over {res['seeds']} seeds")  # fmt: skip
    r0 = res["per_seed"][0]
    sft = r0["val"]["sft"]
    for run in dict.fromkeys(pt["run"] for pt in r0["grid"]):
        pts = sorted((pt for pt in r0["grid"] if pt["run"] == run), key=lambda pt: pt["steps"])
        xs, ys = [0.0] + [pt["kl_seq"] for pt in pts], [sft["pass@1"]] + [pt["pass@1"] for pt in pts]
        bx.plot(xs, ys, marker=".", label=f"DPO β={pts[0]['beta']:g} lr={pts[0]['lr']:g}")
    c = r0["chosen"]
    bx.plot([c["kl_seq"]], [c["pass@1"]], "k*", ms=12, label="DPO chosen")
    for name, mark in (("ppo", "s"), ("grpo", "^"), ("rloo", "v"), ("sft", "o")):
        v = r0["val"][name]
        bx.plot([v["kl_seq"]], [v["pass@1"]], mark, color="k", mfc="none", ms=8, label=name)
    bx.set_xscale("symlog", linthresh=0.1)
    bx.set_ylim(0, max(0.5, max(pt["pass@1"] for pt in r0["grid"]) + 0.05))
    bx.set(xlabel="KL to SFT (nats/seq, validation; symlog)", ylabel="pass@1 (validation)",
           title="DPO grid, seed 0 (lines: one run's checkpoints)")  # fmt: skip
    for a in (ax, bx):
        a.grid(alpha=0.3)
        a.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_outputs(res: dict, out: str) -> None:
    q.write_outputs(out, table_markdown(res), res, lambda path: plot_e5(res, path), "pass_at_k.png")


def run(size: str, seeds: int, workdir: str, out: str, tune: str = "every") -> dict[str, Any]:
    """Every seed (``run_seed``), then the tables over seeds; writes ``out``."""
    from jaxrlhf.trainer.harness import enable_compilation_cache

    t0 = time.perf_counter()
    q.SIZES.update(SIZES)
    enable_compilation_cache(os.path.join(workdir, "jax_cache"))  # seeds > 0 reuse seed 0's compiles
    per_seed, fixed = [], None
    for seed in range(seeds):
        per_seed.append(run_seed(size, seed, workdir, fixed))
        if tune == "first" and seed == 0:
            fixed = {k: per_seed[0]["chosen"][k] for k in ("beta", "lr", "steps")}
        held = {k: round(v["pass@1"], 3) for k, v in per_seed[-1]["held_out"].items()}
        print(f"[e5] seed {seed}: {per_seed[-1]['wall_s']:.0f}s, held-out pass@1 {held}", flush=True)
    res = {
        "experiment": "E5 verifiable answers: SFT, DPO tuned to PPO's KL, DPO-Iter, PPO, GRPO, RLOO",
        "size": size,
        "seeds": seeds,
        "tune": tune,
        "noise": NOISE,
        "difficulty": DIFFICULTY,
        "tasks": list(TASKS),
        "sizes": dataclasses.asdict(SIZES[size]) | {"seed": "per seed (0 .. seeds-1)"},
        "extra": EXTRA[size],
        "table": summarise(per_seed),
        "paired": paired(per_seed),
        "per_seed": per_seed,
        "code_commit": ex.git_commit(),
        "uncommitted_files": ex.uncommitted("jaxrlhf"),
        "wall_s_total": round(time.perf_counter() - t0, 1),
        "hardware": q.hardware(),
    }
    write_outputs(res, out)
    return res


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default="docs/results/e5")
    ap.add_argument("--workdir", default=os.path.join("workdirs", "e5"))
    ap.add_argument("--smoke", action="store_true", help="toy sizes (seconds; the tests use it)")
    ap.add_argument(
        "--tune", choices=("first", "every"), default="every",
        help="tune DPO on seed 0 and reuse its choice (first), or on every seed (every)",
    )  # fmt: skip
    a = ap.parse_args(argv)
    if a.seeds < 1:
        raise ValueError(f"--seeds={a.seeds}: need at least 1")
    res = run("e5_smoke" if a.smoke else "e5", a.seeds, a.workdir, a.out, a.tune)
    print(table_markdown(res), flush=True)
    print(f"[e5] {res['wall_s_total']:.0f}s wall; results in {a.out}", flush=True)
    return res


if __name__ == "__main__":
    main()
