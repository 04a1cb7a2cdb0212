r"""E6 (Arike et al., "A Comparative Analysis of DPO and PPO"): what DPO and PPO change inside a model.

    python -m jaxrlhf.experiments.e6_arike --seeds=3 --out=docs/results/e6 [--size=e6|smoke]

Per seed (independent data, SFT initialisation and training: ``quickstart.Sizes.seed``), on the
synthetic-review sentiment task (``jaxrlhf.tasks.reviews``) with a **GPT-NeoX** decoder (biases on
every projection, LayerNorm, parallel residual: the Pythia architecture of the paper, at a tiny size):

  a. data, sft, pairs  the quickstart's stages (``quickstart.stage_data``, ``train_stage("sft")``,
                       ``stage_pairs``: best/worst gold score of 4 SFT samples per train prompt).
  b. dpo               the quickstart's DPO config (frozen SFT reference) with the shared settings.
  c. ppo               the quickstart's PPO config with the gold scorer as the reward (the paper's
                       sentiment classifier; the DPO pairs are labelled by the same scorer), a frozen
                       SFT reference and a critic started from the SFT model.
     Matched where shared: learning rate, optimizer, constant schedule, optimizer steps, batch
     (DPO: pairs per step; PPO: responses per minibatch) and samples (DPO pairs seen = PPO
     responses sampled); ``beta`` and ``kl_coef`` are set so that the final KL to SFT is comparable.
  d. measurements      against the SFT model:
     (a) weight / bias / norm divergence (``analysis.divergence.divergence_run``: per-tensor MSE
         to the SFT export over each run's checkpoints; ``*_mean`` = unweighted mean over tensors),
         and per layer at the end;
     (b) residual cosine and logit-lens KL per layer (``analysis.activations``) on held-out review
         openings labelled positive / negative (openings whose own gold score agrees with the
         sentiment of the review they were cut from; neutral openings are left out);
     (c) head ablation (``analysis.heads``: each head's output zeroed; greedy generations on the
         same labelled openings, gold score): the change in mean gold score (the heads each model
         relies on) and, for the SFT model, the change on positive minus negative openings (the
         heads that carry the opening's sentiment into the completion);
     (d) polarisation: gold score of sampled completions of held-out prompts: fraction positive
         (> 0.5), fraction extreme (< 0.1 or > 0.9), mean ``|2 s - 1|``, histogram; with
         ``quickstart.compare_policies`` (gold reward, KL to SFT, win rate).

Statistics: mean over seeds and a 95% t-interval ``mean ± t_{0.975, n-1} * sd / sqrt(n)`` (sample
sd, ``ddof=1``). Writes ``<out>/results.json`` (every setting), ``table.md`` and PNGs; stage outputs
live in ``--workdir`` (default ``workdirs/e6``; finished stages are reused).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import subprocess
import time
from typing import Any

import numpy as np

from jaxrlhf import config_defaults as d
from jaxrlhf import quickstart as q

REWARD_FN = "jaxrlhf.tasks.reviews:reward"
POLICIES = ("sft", "dpo", "ppo")
TUNED = ("dpo", "ppo")
GROUPS = ("positive", "negative")

# A tiny Pythia-style decoder (GPT-NeoX: biases everywhere, LayerNorm, parallel residual, partial RoPE).
_NEOX = dict(
    family="gpt_neox",
    vocab_size=512,  # the shared word-level review tokenizer
    hidden_size=64,
    intermediate_size=256,
    num_layers=3,
    num_heads=4,
    num_kv_heads=4,
    head_dim=16,
    max_position_embeddings=64,
)
_NEOX_SMOKE = dict(_NEOX, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=2)


@dataclasses.dataclass(frozen=True)
class Extra:
    """E6's own settings (the stage sizes are a ``quickstart.Sizes``)."""

    lr: float  # shared by DPO and PPO (Adam, constant, no warmup)
    steps: int  # optimizer steps of each tuned run
    batch: int  # DPO pairs per step = PPO responses per minibatch
    ppo_epochs: int
    dpo_beta: float
    ppo_kl_coef: float
    checkpoints: int  # per run, evenly spaced (the divergence curve)
    probe_prompts: int  # labelled openings per sentiment (activations, heads)
    eval_samples: int  # completions per held-out prompt for the score distribution
    head_max_new_tokens: int


SIZES = {
    "e6": dataclasses.replace(
        q.SIZES["full"],
        model=_NEOX,
        n_sft=4000,
        n_train_prompts=512,
        n_eval_prompts=256,
        sft_steps=300,
        progress_bar=False,
    ),
    "smoke": dataclasses.replace(q.SIZES["smoke"], model=_NEOX_SMOKE, n_eval_prompts=16),
}
EXTRA = {
    # beta 1.0 / kl_coef 0.05: final KL to SFT 3.1 vs 2.5 nats/seq in a one-seed calibration (beta 0.5: 5.0;
    # beta 0.1: 16.6); the shared lr 3e-4 is the larger of the quickstart's DPO and E2's PPO rates
    "e6": Extra(3e-4, 80, 32, 1, 1.0, 0.05, 5, 64, 2, 40),
    "smoke": Extra(1e-3, 4, 8, 1, 0.1, 0.05, 2, 8, 1, 12),
}


def register_size(size: str, seed: int, extra: Extra) -> str:
    """Registers ``SIZES[size]`` with ``seed`` and E6's shared settings in ``quickstart.SIZES``."""
    x = extra
    rollout = x.steps * x.batch // x.ppo_epochs // _ppo_iterations(x)
    name = f"e6_{size}_s{seed}"
    q.SIZES[name] = dataclasses.replace(
        SIZES[size],
        seed=seed,
        pair_batch=x.batch,
        dpo_steps=x.steps,
        dpo_lr=x.lr,
        dpo_beta=x.dpo_beta,
        ppo_iterations=_ppo_iterations(x),
        ppo_rollout_batch=rollout,
        ppo_minibatch=x.batch,
        ppo_epochs=x.ppo_epochs,
        ppo_lr=x.lr,
        ppo_kl_coef=x.ppo_kl_coef,
    )
    return name


def _ppo_iterations(x: Extra) -> int:
    """PPO iterations: one checkpoint every ``iterations / checkpoints`` (at least 2 per checkpoint)."""
    return 2 * x.checkpoints


# ------------------------------------------------------------------------------ training runs
def dpo_config(name: str, p: q.Paths, x: Extra):
    """``configs/quickstart/dpo.py`` with E6's shared optimizer settings and evenly spaced checkpoints."""
    c = q.load_config("dpo", name, p.workdir)
    c.unlock()
    c.optim = d.optim(lr=x.lr, warmup_steps=0, schedule="constant")
    c.checkpoint.every = max(1, x.steps // x.checkpoints)
    c.checkpoint.keep = x.checkpoints
    c.checkpoint.async_save = False
    c.lock()
    return c


def ppo_config(name: str, p: q.Paths, x: Extra):
    """``configs/quickstart/ppo.py`` against the gold scorer, frozen SFT reference, critic from SFT."""
    c = q.load_config("ppo", name, p.workdir)
    c.unlock()
    c.reward = d.reward(fn=REWARD_FN, missing_eos_penalty=c.reward.missing_eos_penalty)
    c.critic.model = d.model(p.sft_export)
    c.critic.model.dtype = "float32"
    c.ref = d.ref(ema_decay=1.0)
    c.optim = d.optim(lr=x.lr, warmup_steps=0, schedule="constant")
    c.checkpoint.every = max(1, c.ppo.iterations // x.checkpoints)
    c.checkpoint.keep = x.checkpoints
    c.checkpoint.async_save = False
    c.lock()
    return c


def train(config, run_dir: str) -> dict[str, Any]:
    """``registry.run`` unless the run finished already; returns its stats (wall time, steps, metrics)."""
    from jaxrlhf import registry

    stats_path = os.path.join(run_dir, "e6_run.json")
    if not os.path.exists(stats_path):
        t0 = time.perf_counter()
        result = registry.run(config, run_dir)
        if result.get("interrupted"):
            raise KeyboardInterrupt(f"{run_dir}: stopped by a signal; rerun to resume")
        hist = result.get("history") or [{}]
        stats = {
            "wall_s": round(time.perf_counter() - t0, 1),
            "optimizer_steps": int(result["state"].step),
            "last": q._floats(hist[-1]),
        }
        with open(stats_path, "w") as f:
            json.dump(stats, f)
        print(f"  [{run_dir}] {stats['wall_s']:.1f}s", flush=True)
    with open(stats_path) as f:
        return json.load(f)


# ------------------------------------------------------------------------------ probe prompts
def write_probe_prompts(path: str, n: int, seed: int, exclude: set[str]) -> dict[str, int]:
    """``n`` positive and ``n`` negative held-out openings as ``{"prompt", "label"}`` JSONL.

    An opening is drawn from a review of that sentiment (``review_prompts(sentiment_mix=...)``) and
    kept only when its own gold score agrees (> 0.5 positive, < 0.5 negative): an opening such as
    "i thought the" carries no sentiment and is left out. Returns how many were drawn and kept.
    """
    from jaxrlhf.tasks import common, reviews

    rows, drawn = [], {}
    for g in GROUPS:
        kept: list[str] = []
        pool = 0
        for attempt in range(20):
            cand = reviews.review_prompts(
                8 * n, seed=seed * 100 + attempt, min_words=3, max_words=5, sentiment_mix=g, exclude=exclude
            )
            pool += len(cand)
            s = reviews.gold_scores(cand)
            kept += [t for t, v in zip(cand, s, strict=True) if (v > 0.5 if g == "positive" else v < 0.5)]
            if len(kept) >= n:
                break
        if len(kept) < n:
            raise RuntimeError(f"write_probe_prompts: only {len(kept)} {g} openings of {pool}")
        drawn[g] = pool
        rows += [{"prompt": t, "label": g} for t in kept[:n]]
    common.write_jsonl(path, rows)
    return {"per_label": n, "drawn": drawn}


# ------------------------------------------------------------------------------ measurements
def divergence_curves(p: q.Paths, runs: dict[str, str]) -> dict[str, Any]:
    """Per run: the divergence summary at step 0 (zero) and at each checkpoint; x = fraction of training."""
    from jaxrlhf.analysis import divergence

    out = {}
    for name, run_dir in runs.items():
        # absolute paths: orbax's metadata() of a relative checkpoint path has no item metadata
        points = divergence.divergence_run(os.path.abspath(p.sft_export), os.path.abspath(run_dir))
        last = points[-1]["step"]
        curve = {
            "x": [0.0] + [pt["step"] / last for pt in points],
            "steps": [0] + [pt["step"] for pt in points],
        }
        for k in divergence.CURVE_KEYS:
            curve[k] = [0.0] + [pt[k] for pt in points]
        final = points[-1]
        curve["final"] = {k: final[k] for k in (*divergence.CURVE_KEYS, "layers", "non_layer", "tensors")}
        out[name] = curve
    return out


def activation_stats(p: q.Paths, probe_path: str, s) -> dict[str, Any]:
    """Per tuned model: per-layer cosine and logit-lens KL to SFT on the probe openings, by label."""
    from jaxrlhf import data as data_lib
    from jaxrlhf.analysis import activations, inputs

    tok = data_lib.load_tokenizer(p.tokenizer)
    cfg = inputs.data_config(probe_path, max_prompt_length=s.max_prompt_length, max_length=s.max_length)
    ex = inputs.load_examples(cfg, tok, kind="prompt", label="label")
    batches = list(inputs.sequence_batches(ex.dataset, 64))
    base = inputs.load_model(p.sft_export)
    return {
        name: activations.activation_divergence(
            inputs.load_model(p.export(name)), base, batches, labels=ex.labels, tokens="all"
        )
        for name in TUNED
    }


def head_stats(p: q.Paths, probe_path: str, s, x: Extra) -> dict[str, Any]:
    """Each head of each policy zeroed in turn: greedy completions of the probe openings, gold score.

    Per policy: ``base`` (intact mean score), ``delta [L][H]`` (mean over all openings, ablated minus
    intact), ``delta_positive`` / ``delta_negative`` (over each label's openings) and
    ``sentiment = delta_positive - delta_negative`` (negative: the head carries the opening's sentiment
    into the completion). Every measurement is paired: greedy decoding of the same prompts.
    """
    from jaxrlhf import data as data_lib
    from jaxrlhf import generation
    from jaxrlhf.analysis import heads, inputs

    tok = data_lib.load_tokenizer(p.tokenizer)
    cfg = inputs.data_config(
        probe_path,
        max_prompt_length=s.max_prompt_length,
        max_length=s.max_prompt_length + x.head_max_new_tokens,
    )
    ex = inputs.load_examples(cfg, tok, kind="prompt", label="label")
    batches = list(inputs.prompt_batches(ex.dataset, 64))
    index = np.concatenate([np.asarray(b["index"]) for b in batches])
    labels = np.asarray([ex.labels[i] for i in index[index >= 0]])
    reward = inputs.make_reward(tok, ex.dataset, fn=REWARD_FN)
    out, sampler = {}, None
    for name in POLICIES:
        graphdef, params = inputs.load_model(p.export(name))
        cfg_m = _model_config(graphdef, params)
        if sampler is None:  # one architecture: one compiled sampler
            sampler = generation.make_sampler(
                graphdef, max_new_tokens=x.head_max_new_tokens, pad_id=tok.pad_token_id,
                eos_ids=inputs.eos_ids(tok), greedy=True,
            )  # fmt: skip
        out[name] = _ablate_all(heads, sampler, params, batches, reward, labels, cfg_m)
    return out


def _model_config(graphdef, params):
    from flax import nnx

    return nnx.merge(graphdef, params).config


def _ablate_all(heads, sampler, params, batches, reward, labels, cfg) -> dict[str, Any]:
    """``heads.mean_reward`` of the intact model and of each single-head ablation, split by label."""
    base = heads.mean_reward(sampler, params, batches, reward, seed=0)[1]
    shape = (cfg.num_layers, cfg.num_heads)
    delta = {g: np.zeros(shape) for g in ("all", *GROUPS)}
    for layer in range(cfg.num_layers):
        for h in range(cfg.num_heads):
            mask = heads.single_head_mask(*shape, layer, h)
            ablated = heads.ablate_params(params, mask, cfg.head_dim)
            diff = heads.mean_reward(sampler, ablated, batches, reward, seed=0)[1] - base
            delta["all"][layer, h] = diff.mean()
            for g in GROUPS:
                delta[g][layer, h] = diff[labels == g].mean()
    sentiment = delta["positive"] - delta["negative"]
    return {
        "base": float(base.mean()),
        "base_positive": float(base[labels == "positive"].mean()),
        "base_negative": float(base[labels == "negative"].mean()),
        "delta": delta["all"].tolist(),
        "delta_positive": delta["positive"].tolist(),
        "delta_negative": delta["negative"].tolist(),
        "sentiment": sentiment.tolist(),
        "rank_by_reliance": heads.ranking(delta["all"], descending=False),  # largest drop first
        "rank_by_sentiment": heads.ranking(sentiment, descending=False),
    }


def score_distribution(p: q.Paths, s, x: Extra, seed: int) -> dict[str, Any]:
    """Gold scores of ``eval_samples`` sampled completions per held-out prompt, per policy."""
    from jaxrlhf.tasks import reviews

    out = {}
    for name in POLICIES:
        prompts, samples = q.sample_prompts(
            p.export(name), p.eval_prompts, s, x.eval_samples, seed=seed + 40, desc=f"{name} eval samples"
        )
        flat_p = [t for t, row in zip(prompts, samples, strict=True) for _ in row]
        flat_r = [r for row in samples for r in row]
        scores = reviews.reward(flat_p, flat_r)
        out[name] = {**polarisation(scores), "scores": [round(float(v), 5) for v in scores]}
        out[name]["degeneracy"] = degeneracy(flat_p, flat_r, scores)
    return out


HIST_BINS = np.linspace(0.0, 1.0, 11)


def polarisation(scores: np.ndarray) -> dict[str, Any]:
    """Fraction positive (> 0.5), negative (< 0.5), extreme (< 0.1 or > 0.9), mean ``|2s - 1|`` and
    the 10-bin histogram (fractions) of gold scores in (0, 1)."""
    s = np.asarray(scores, np.float64)
    hist = np.histogram(s, bins=HIST_BINS)[0] / max(len(s), 1)
    return {
        "n": int(len(s)),
        "gold_mean": float(s.mean()),
        "frac_positive": float(np.mean(s > 0.5)),
        "frac_negative": float(np.mean(s < 0.5)),
        "frac_extreme": float(np.mean((s < 0.1) | (s > 0.9))),
        "polarity": float(np.mean(np.abs(2 * s - 1))),
        "histogram": hist.tolist(),
    }


def degeneracy(prompts: list[str], responses: list[str], scores) -> dict[str, Any] | None:
    """``tasks.degeneracy.degeneracy_stats`` of the completions (repetition, distinct-2, off-grammar
    fractions, length), or ``None`` where that module is absent."""
    try:
        from jaxrlhf.tasks import degeneracy as deg  # optional: added by issue 17
    except ImportError:
        return None
    try:
        return deg.degeneracy_stats(responses, prompts, scores)
    except Exception as e:  # another issue's module: its failure must not lose the experiment
        logging.warning("degeneracy_stats failed (%r); left out", e)
        return {"error": repr(e)}


# ------------------------------------------------------------------------------ one seed
def run_seed(size: str, seed: int, root: str, x: Extra) -> dict[str, Any]:
    """Every stage and measurement of one seed; returns its raw results."""
    from jaxrlhf.tasks import common

    t0, c0 = time.perf_counter(), q._cpu_seconds()
    name = register_size(size, seed, x)
    s, p = q.SIZES[name], q.Paths(os.path.join(root, f"seed{seed}"))
    os.makedirs(p.workdir, exist_ok=True)
    stages: dict[str, Any] = {}
    if not q.stage_done("data", p):
        stages["data"] = q.stage_data(s, p)
    if not q.stage_done("sft", p):
        stages["sft"] = q.train_stage("sft", name, p)["last"]
    if not q.stage_done("pairs", p):
        stages["pairs"] = q.stage_pairs(s, p)
    with open(p.pairs_stats) as f:
        stages["pairs_stats"] = {k: v for k, v in json.load(f).items() if k != "example"}
    runs = {"dpo": train(dpo_config(name, p, x), p.stage_dir("dpo"))}
    runs["ppo"] = train(ppo_config(name, p, x), p.stage_dir("ppo"))
    probe = os.path.join(p.workdir, "data", "probe_prompts.jsonl")
    if not os.path.exists(probe + ".json"):
        seen = {r["prompt"] for path in (p.sft_data, p.train_prompts) for r in common.read_jsonl(path)}
        with open(probe + ".json", "w") as f:
            json.dump(write_probe_prompts(probe, x.probe_prompts, seed + 30, seen), f)
    with open(probe + ".json") as f:
        stages["probe"] = json.load(f)
    t1 = time.perf_counter()
    rows = q.compare_policies(
        q.load_config("evaluate", name, p.workdir),
        {n: p.export(n) for n in POLICIES},
        p.sft_export,
        batch_size=s.eval_batch,
        seed=seed + 20,
    )
    out = {
        "seed": seed,
        "stages": stages,
        "runs": runs,
        "eval": rows,
        "scores": score_distribution(p, s, x, seed),
        "divergence": divergence_curves(p, {n: p.stage_dir(n) for n in TUNED}),
        "activations": activation_stats(p, probe, s),
        "heads": head_stats(p, probe, s, x),
    }
    out["measure_wall_s"] = round(time.perf_counter() - t1, 1)
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    out["cpu_s"] = round(q._cpu_seconds() - c0, 1)
    print(f"[e6] seed {seed}: {out['wall_s']:.0f}s wall, {out['cpu_s']:.0f}s CPU", flush=True)
    return out


# ------------------------------------------------------------------------------ statistics
def t_interval(values) -> dict[str, Any]:
    """Mean and 95% t-interval half-width over seeds (sample sd, ``ddof=1``) of the finite values
    (a Spearman correlation of a constant profile is NaN); ``ci95 = None`` below two values."""
    from scipy import stats

    v = np.asarray(values, np.float64)
    ok = v[np.isfinite(v)]
    n = len(ok)
    out = {
        "mean": float(ok.mean()) if n else math.nan,
        "ci95": None,
        "sd": None,
        "n": n,
        "values": v.tolist(),
    }
    if n >= 2:
        out["sd"] = float(ok.std(ddof=1))
        out["ci95"] = float(stats.t.ppf(0.975, n - 1) * out["sd"] / math.sqrt(n))
    return out


EVAL_KEYS = ("gold_reward", "kl_to_sft", "win_rate_vs_sft", "response_length")
POLAR_KEYS = ("frac_positive", "frac_negative", "frac_extreme", "polarity", "gold_mean")
DIV_KEYS = ("weights_mean", "biases_mean", "norms_mean")


def summarise(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Seed means and 95% t-intervals of every reported number (``t_interval``)."""
    over = lambda f: t_interval([f(r) for r in per_seed])  # noqa: E731
    policies = {}
    for n in POLICIES:
        row = {k: over(lambda r, n=n, k=k: r["eval"][n][k]) for k in EVAL_KEYS}
        row.update({k: over(lambda r, n=n, k=k: r["scores"][n][k]) for k in POLAR_KEYS})
        row["histogram"] = np.mean([r["scores"][n]["histogram"] for r in per_seed], axis=0).tolist()
        policies[n] = row
    div: dict[str, Any] = {}
    for n in TUNED:
        div[n] = {k: over(lambda r, n=n, k=k: r["divergence"][n]["final"][k]) for k in DIV_KEYS}
        div[n]["biases_over_weights"] = over(
            lambda r, n=n: (
                r["divergence"][n]["final"]["biases_mean"] / r["divergence"][n]["final"]["weights_mean"]
            )
        )
        layers = per_seed[0]["divergence"][n]["final"]["layers"]
        div[n]["layers"] = {
            i: {
                k: over(lambda r, n=n, i=i, k=k: r["divergence"][n]["final"]["layers"][i][k])
                for k in DIV_KEYS[:2]
            }
            for i in layers
        }
    div["ppo_over_dpo"] = {
        k: over(lambda r, k=k: r["divergence"]["ppo"]["final"][k] / r["divergence"]["dpo"]["final"][k])
        for k in DIV_KEYS
    }
    return {
        "policies": policies,
        "divergence": div,
        "activations": _act_summary(per_seed),
        "heads": _head_summary(per_seed),
    }


def _act_summary(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    n_layers = per_seed[0]["activations"]["dpo"]["layers"]
    for n in TUNED:
        out[n] = {}
        for g in GROUPS:
            out[n][g] = {
                m: [
                    t_interval([r["activations"][n]["groups"][g][m][layer] for r in per_seed])
                    for layer in range(n_layers)
                ]
                for m in ("cosine", "kl")
            }
        out[n]["neg_minus_pos_kl_last"] = t_interval(
            [
                r["activations"][n]["groups"]["negative"]["kl"][-1]
                - r["activations"][n]["groups"]["positive"]["kl"][-1]
                for r in per_seed
            ]
        )
    return out


def _spearman(a, b) -> float:
    """Spearman rank correlation of two head profiles; NaN when either is constant."""
    from scipy import stats

    a, b = np.ravel(a), np.ravel(b)
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    return float(stats.spearmanr(a, b).statistic)


def _head_summary(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Per seed: each policy's most relied-on head and the SFT's strongest sentiment head; across
    heads, rank correlations between the policies' reliance (delta) profiles."""
    seeds = []
    for r in per_seed:
        h = r["heads"]
        row = {n: dict(h[n]["rank_by_reliance"][0]) for n in POLICIES}
        row["sft_sentiment"] = dict(h["sft"]["rank_by_sentiment"][0])
        row["spearman_dpo_ppo"] = _spearman(h["dpo"]["delta"], h["ppo"]["delta"])
        row["spearman_sft_dpo"] = _spearman(h["sft"]["delta"], h["dpo"]["delta"])
        row["spearman_sft_ppo"] = _spearman(h["sft"]["delta"], h["ppo"]["delta"])
        row["same_top_dpo_ppo"] = _same(row["dpo"], row["ppo"])
        for n in TUNED:
            row[f"{n}_top_is_sft_sentiment"] = _same(row[n], row["sft_sentiment"])
        seeds.append(row)
    keys = ("spearman_dpo_ppo", "spearman_sft_dpo", "spearman_sft_ppo")
    return {
        "per_seed": seeds,
        **{k: t_interval([s[k] for s in seeds]) for k in keys},
        "same_top_dpo_ppo": int(sum(s["same_top_dpo_ppo"] for s in seeds)),
        "top_drop": {n: t_interval([s[n]["delta"] for s in seeds]) for n in POLICIES},
    }


def _same(a: dict, b: dict) -> bool:
    return (a["layer"], a["head"]) == (b["layer"], b["head"])


# ------------------------------------------------------------------------------ tables
def _ci(x: dict, fmt: str = ".3f") -> str:
    if x["ci95"] is None:
        return f"{x['mean']:{fmt}}"
    return f"{x['mean']:{fmt}} ± {x['ci95']:{fmt}}"


def tables_markdown(res: dict[str, Any]) -> str:
    """Every table of the results as markdown (mean ± 95% t-interval half-width over seeds)."""
    sm, n = res["summary"], res["seeds"]
    out = [f"Mean ± 95% t-interval half-width over {n} seeds (t with n-1 dof, sample sd).", ""]
    out += ["### Policies (held-out prompts, gold scorer)", ""]
    cols = (
        "gold_reward",
        "kl_to_sft",
        "win_rate_vs_sft",
        "frac_positive",
        "frac_extreme",
        "polarity",
        "response_length",
    )
    out += ["| policy | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, row in sm["policies"].items():
        out.append(f"| {name} | " + " | ".join(_ci(row[c]) for c in cols) + " |")
    out += [
        "",
        "### Weight divergence from SFT at the end of training (per-tensor MSE, mean over tensors)",
        "",
    ]
    cols = ("weights_mean", "biases_mean", "norms_mean", "biases_over_weights")
    out += ["| run | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name in (*TUNED, "ppo_over_dpo"):
        row = sm["divergence"][name]
        out.append(f"| {name} | " + " | ".join(_ci(row[c], ".3e") if c in row else "-" for c in cols) + " |")
    out += ["", "### Divergence per layer at the end (mean over the layer's tensors)", ""]
    layers = list(sm["divergence"]["dpo"]["layers"])
    out += [
        "| run | kind | " + " | ".join(f"layer {i}" for i in layers) + " |",
        "|---" * (len(layers) + 2) + "|",
    ]
    for name in TUNED:
        for k in DIV_KEYS[:2]:
            cells = [_ci(sm["divergence"][name]["layers"][i][k], ".3e") for i in layers]
            out.append(f"| {name} | {k} | " + " | ".join(cells) + " |")
    out += _act_table(sm)
    out += _heads_table(sm)
    return "\n".join(out)


def _act_table(sm: dict[str, Any]) -> list[str]:
    act = sm["activations"]
    n_layers = len(act["dpo"]["positive"]["cosine"])
    out = [
        "",
        "### Activations vs SFT per layer on labelled openings (residual cosine, logit-lens KL in nats)",
        "",
    ]
    out += ["| run | prompts | metric | " + " | ".join(f"layer {i}" for i in range(n_layers)) + " |"]
    out += ["|---" * (n_layers + 3) + "|"]
    for name in TUNED:
        for g in GROUPS:
            for m, fmt in (("cosine", ".4f"), ("kl", ".4f")):
                out.append(
                    f"| {name} | {g} | {m} | " + " | ".join(_ci(v, fmt) for v in act[name][g][m]) + " |"
                )
    return out


def _heads_table(sm: dict[str, Any]) -> list[str]:
    h = sm["heads"]
    out = ["", "### Head ablation (greedy completions of the labelled openings, gold score)", ""]
    out += [
        "| seed | SFT top sentiment head (pos-neg delta) | SFT most relied-on | DPO most relied-on | PPO most relied-on | Spearman DPO vs PPO |"
    ]
    out += ["|---|---|---|---|---|---|"]
    for i, s in enumerate(h["per_seed"]):
        cell = lambda t: f"L{t['layer']}H{t['head']} ({t['delta']:+.3f})"  # noqa: E731
        out.append(
            f"| {i} | {cell(s['sft_sentiment'])} | {cell(s['sft'])} | {cell(s['dpo'])} | {cell(s['ppo'])} "
            f"| {s['spearman_dpo_ppo']:.3f} |"
        )
    out += ["", "| statistic | value |", "|---|---|"]
    for k in ("spearman_dpo_ppo", "spearman_sft_dpo", "spearman_sft_ppo"):
        out.append(f"| {k} | {_ci(h[k])} |")
    for n in POLICIES:
        out.append(f"| top_drop_{n} | {_ci(h['top_drop'][n])} |")
    out.append(f"| same_top_dpo_ppo (seeds) | {h['same_top_dpo_ppo']} of {len(h['per_seed'])} |")
    return out


# ------------------------------------------------------------------------------ plots
COLORS = {"sft": "tab:gray", "dpo": "tab:blue", "ppo": "tab:orange"}


def plot_divergence(res: dict[str, Any], path: str) -> None:
    """Weight and bias divergence vs fraction of training: each run's curve (thin) and the seed mean."""
    plt = q.pyplot(path)
    if plt is None:
        return
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), dpi=110)
    for ax, k in zip(axes, DIV_KEYS, strict=True):
        for n in TUNED:
            curves = [r["divergence"][n] for r in res["per_seed"]]
            for c in curves:
                ax.plot(c["x"], c[k], "-", color=COLORS[n], alpha=0.3, lw=1)
            ax.plot(
                curves[0]["x"],
                np.mean([c[k] for c in curves], axis=0),
                "o-",
                color=COLORS[n],
                label=n.upper(),
            )
        ax.set_ylim(bottom=0)
        ax.set_xlim(0, 1.02)
        ax.set_xlabel("fraction of training")
        ax.set_ylabel(f"{k} (MSE to SFT)")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"E6: divergence from the SFT model over training ({res['seeds']} seeds; thin: one seed)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_layers(res: dict[str, Any], path: str) -> None:
    """Final weight and bias divergence per layer, DPO vs PPO (bars: seed mean, whiskers: 95% CI)."""
    plt = q.pyplot(path)
    if plt is None:
        return
    div = res["summary"]["divergence"]
    layers = list(div["dpo"]["layers"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    xs = np.arange(len(layers))
    for ax, k in zip(axes, DIV_KEYS[:2], strict=True):
        for j, n in enumerate(TUNED):
            vals = [div[n]["layers"][i][k] for i in layers]
            ax.bar(
                xs + (j - 0.5) * 0.38, [v["mean"] for v in vals], 0.36, yerr=[v["ci95"] or 0 for v in vals],
                color=COLORS[n], capsize=3, label=n.upper(),
            )  # fmt: skip
        ax.set_xticks(xs, [f"layer {i}" for i in layers])
        ax.set_ylabel(f"{k} (MSE to SFT)")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        ax.grid(alpha=0.3, axis="y")
        ax.legend()
    fig.suptitle("E6: divergence per layer at the end of training (95% t-interval)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_activations(res: dict[str, Any], path: str) -> None:
    """``1 - cosine`` and logit-lens KL to SFT per layer, positive vs negative openings."""
    plt = q.pyplot(path)
    if plt is None:
        return
    act = res["summary"]["activations"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    for ax, m in zip(axes, ("cosine", "kl"), strict=True):
        for n in TUNED:
            for g, style, dx in (("positive", "o-", -0.06), ("negative", "s--", 0.06)):
                vals = act[n][g][m]
                xs = np.arange(len(vals)) + dx + (0.02 if n == "ppo" else -0.02)
                ys = [1 - v["mean"] if m == "cosine" else v["mean"] for v in vals]
                ax.errorbar(
                    xs, ys, yerr=[v["ci95"] or 0 for v in vals], fmt=style, color=COLORS[n], capsize=2,
                    label=f"{n.upper()} {g}",
                )  # fmt: skip
        ax.set_ylim(bottom=0)
        ax.set_xticks(range(len(act["dpo"]["positive"][m])))
        ax.set_xlabel("layer (0 = embeddings)")
        ax.set_ylabel(
            "1 - cosine(residual, SFT residual)" if m == "cosine" else "logit-lens KL to SFT (nats)"
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("E6: activation divergence per layer (labelled openings; 95% t-interval)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_heads(res: dict[str, Any], path: str) -> None:
    """Per seed: each policy's reliance heatmap (mean gold change when a head is zeroed) and the SFT's
    sentiment map (change on positive minus negative openings)."""
    plt = q.pyplot(path)
    if plt is None:
        return
    seeds = res["per_seed"]
    cols = [(n, "delta") for n in POLICIES] + [("sft", "sentiment")]
    fig, axes = plt.subplots(
        len(seeds), len(cols), figsize=(3.2 * len(cols), 2.2 * len(seeds) + 0.6), dpi=110, squeeze=False
    )
    for i, r in enumerate(seeds):
        for j, (n, k) in enumerate(cols):
            a = np.asarray(r["heads"][n][k])
            lim = max(float(np.abs(a).max()), 1e-6)
            im = axes[i, j].imshow(a, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
            axes[i, j].set_title(
                f"seed {r['seed']}: {n.upper()} {'reliance' if k == 'delta' else 'sentiment'}", fontsize=8
            )
            axes[i, j].set_xticks(range(a.shape[1]))
            axes[i, j].set_yticks(range(a.shape[0]))
            axes[i, j].set_xlabel("head", fontsize=7)
            axes[i, j].set_ylabel("layer", fontsize=7)
            fig.colorbar(im, ax=axes[i, j])
    fig.suptitle("E6: head ablation, change in gold score (blue: ablation raises it)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_polarisation(res: dict[str, Any], path: str) -> None:
    """Gold-score histograms of sampled completions (seed-mean fractions per bin) and fraction positive."""
    plt = q.pyplot(path)
    if plt is None:
        return
    pol = res["summary"]["policies"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3.8), dpi=110, gridspec_kw={"width_ratios": [3, 1]})
    centers = (HIST_BINS[:-1] + HIST_BINS[1:]) / 2
    for j, n in enumerate(POLICIES):
        ax.bar(centers + (j - 1) * 0.03, pol[n]["histogram"], 0.03, color=COLORS[n], label=n.upper())
    ax.set_xticks(HIST_BINS)
    ax.set_xlabel("gold score of a sampled completion")
    ax.set_ylabel("fraction of completions")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    for j, n in enumerate(POLICIES):
        v = pol[n]["frac_positive"]
        ax2.bar(j, v["mean"], yerr=v["ci95"] or 0, color=COLORS[n], capsize=4)
    ax2.set_xticks(range(len(POLICIES)), [n.upper() for n in POLICIES])
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("fraction positive (> 0.5)")
    ax2.grid(alpha=0.3, axis="y")
    fig.suptitle("E6: polarisation of completions (held-out prompts; 95% t-interval)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


PLOTS = {
    "divergence.png": plot_divergence,
    "divergence_layers.png": plot_layers,
    "activations.png": plot_activations,
    "heads.png": plot_heads,
    "polarisation.png": plot_polarisation,
}


# ------------------------------------------------------------------------------ main
def git_commit(path: str | None = None) -> str | None:
    """The checkout's HEAD (or the last commit touching ``path``), ``None`` outside git."""
    cmd = ["git", "log", "-1", "--format=%H"] + (["--", path] if path else [])
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return (
            subprocess.run(cmd, capture_output=True, text=True, cwd=here, check=True).stdout.strip() or None
        )
    except (OSError, subprocess.CalledProcessError):
        return None


def scorer_fingerprint() -> dict[str, Any]:
    """What judged this run: the commit of ``tasks/reviews.py``, whether the file differs from it, and
    the sha256 of the scorer's source and assets as this process imported them."""
    import glob
    import hashlib

    from jaxrlhf.tasks import reviews

    files = [
        reviews.__file__,
        *sorted(glob.glob(os.path.join(os.path.dirname(reviews.__file__), "assets", "review*.txt"))),
    ]
    sha = {}
    for f in files:
        with open(f, "rb") as fh:
            sha[os.path.relpath(f, os.path.dirname(reviews.__file__))] = hashlib.sha256(fh.read()).hexdigest()
    try:
        dirty = (
            subprocess.run(
                ["git", "diff", "--quiet", "HEAD", "--", reviews.__file__],
                cwd=os.path.dirname(reviews.__file__),
            ).returncode
            != 0
        )
    except OSError:
        dirty = None
    return {"commit": git_commit(reviews.__file__), "uncommitted_changes": dirty, "sha256": sha}


def run(size: str, seeds: int, workdir: str, out: str, x: Extra) -> dict[str, Any]:
    from jaxrlhf.trainer.harness import enable_compilation_cache

    t0, c0 = time.perf_counter(), q._cpu_seconds()
    root = os.path.join(workdir, size)
    enable_compilation_cache(os.path.join(root, "jax_cache"))  # seeds 1.. reuse seed 0's compiles
    scorer = scorer_fingerprint()  # before any scoring: the source this process imports
    per_seed = [run_seed(size, seed, root, x) for seed in range(seeds)]
    for r in per_seed:  # the per-sample scores stay in results.json only for the histograms' record
        for n in POLICIES:
            r["scores"][n]["scores"] = r["scores"][n]["scores"][:64]
    res = {
        "experiment": "e6_arike",
        "command": f"python -m jaxrlhf.experiments.e6_arike --seeds={seeds} --size={size} --out={out}",
        "size": size,
        "seeds": seeds,
        "sizes": dataclasses.asdict(SIZES[size]),
        "registered_sizes": dataclasses.asdict(q.SIZES[register_size(size, 0, x)]),
        "extra": dataclasses.asdict(x),
        "reward_fn": REWARD_FN,
        "reference": {"dpo": "frozen SFT", "ppo": "frozen SFT (ref.ema_decay=1.0)"},
        "statistics": "mean over seeds; ci95 = t_{0.975,n-1} * sd(ddof=1) / sqrt(n)",
        "commit": git_commit(),
        "scorer": scorer,
        "per_seed": per_seed,
    }
    res["summary"] = summarise(per_seed)
    res["wall_s_total"] = round(time.perf_counter() - t0, 1)
    res["cpu_s_total"] = round(q._cpu_seconds() - c0, 1)  # user + system, all threads
    res["load_average_at_end"] = list(os.getloadavg())
    res["hardware"] = q.hardware()
    table = tables_markdown(res)
    q.write_outputs(out, table, res)
    for name, fn in PLOTS.items():
        fn(res, os.path.join(out, name))
    print("\n" + table + f"\n\n[e6] {res['wall_s_total']:.0f}s; results in {out}/", flush=True)
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3, help="number of seeds (0 .. seeds-1)")
    ap.add_argument("--out", default="docs/results/e6", help="results directory")
    ap.add_argument(
        "--size", default="e6", choices=sorted(SIZES), help="e6: the reported run; smoke: seconds"
    )
    ap.add_argument("--workdir", default=os.path.join("workdirs", "e6"), help="stage outputs")
    ap.add_argument("--beta", type=float, default=None, help="DPO beta (default: the size's)")
    ap.add_argument("--kl_coef", type=float, default=None, help="PPO KL coefficient (default: the size's)")
    a = ap.parse_args(argv)
    if a.seeds < 1:
        raise ValueError(f"--seeds={a.seeds}: need at least 1")
    x = EXTRA[a.size]
    if a.beta is not None:
        x = dataclasses.replace(x, dpo_beta=a.beta)
    if a.kl_coef is not None:
        x = dataclasses.replace(x, ppo_kl_coef=a.kl_coef)
    return run(a.size, a.seeds, a.workdir, a.out, x)


if __name__ == "__main__":
    main()
