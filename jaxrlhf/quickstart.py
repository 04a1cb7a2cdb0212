r"""The quickstart: the whole RLHF pipeline on synthetic reviews, from scratch, on a CPU in minutes.

    python -m jaxrlhf.quickstart [--workdir=workdirs/quickstart] [--size=full|smoke] [--force]

A stand-in for the controlled-sentiment task of the DPO paper (IMDb there, ``jaxrlhf.tasks.reviews``
here), run as a pipeline of stages. Each training stage is an ordinary config
(``stage_config``; ``configs/quickstart/<stage>.py`` returns it) run by ``jaxrlhf.registry.run``, exactly as
``python -m jaxrlhf.train --config=configs/quickstart/<stage>.py:full,<workdir>`` would run it:

  a. data    synthetic review SFT data and review-opening prompts (train / held-out) as JSONL.
  b. sft     a tiny Llama trained from scratch on the reviews (mixed-sentiment completions).
  c. pairs   k samples per train prompt from the SFT model; chosen = best gold score,
             rejected = worst (DPO paper, §6.1); written as prompt/chosen/rejected JSONL.
  d. reward  a Bradley-Terry reward model on those pairs (SFT body, fresh scalar head).
  e. dpo     DPO from the SFT model on the pairs (frozen SFT reference).
  f. ppo     PPO from the SFT model against the learned reward model, with the study's recipe
             (advantage whitening, EMA reference, the largest rollout batch the budget allows).
  g. eval    SFT, DPO and PPO on held-out prompts, judged by the gold scorer (the "human"):
             gold reward, KL to SFT, win rate vs SFT -> console table, table.md, results.json and
             reward_vs_kl.png in ``<workdir>/results``.

A stage whose output exists is skipped (rerun to resume after an interruption; a training stage
interrupted mid-way resumes from its checkpoint); ``--force`` reruns every stage from scratch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from typing import Any

import ml_collections
from absl import app, flags, logging

# ----------------------------------------------------------------------------------------------
# Sizes and paths (read by configs/quickstart/*.py through ``parse_config_arg``).
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Every size of one quickstart run (``SIZES["full"]`` is the README's main job)."""

    seed: int
    model: dict  # ``config_defaults.model(**model)``: a randomly initialised Llama
    n_sft: int  # SFT reviews
    n_train_prompts: int  # prompts for pairs and PPO rollouts
    n_eval_prompts: int  # held-out prompts for the final table
    max_prompt_length: int  # tokens (BOS included); openings are 2-5 words
    max_length: int  # prompt + response tokens (reviews are <= 40 words + EOS)
    max_new_tokens: int  # sampled response length bound
    sft_batch: int
    sft_steps: int
    sft_lr: float
    pair_samples: int  # k samples per prompt for best/worst pairs
    sample_batch: int  # prompts per sampler call (times pair_samples rows)
    pair_batch: int  # pairs per step (reward model and DPO)
    rm_steps: int
    rm_lr: float
    rm_eval_fraction: float  # pairs held out for the reward model's accuracy
    dpo_steps: int
    dpo_lr: float
    dpo_beta: float
    ppo_iterations: int
    ppo_rollout_batch: int
    ppo_minibatch: int
    ppo_epochs: int
    ppo_lr: float
    critic_lr: float
    ppo_kl_coef: float
    ppo_ema_decay: float
    eval_batch: int  # held-out prompts per sampler call
    progress_bar: bool


_FULL_MODEL = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=256,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    max_position_embeddings=64,
)
_SMOKE_MODEL = dict(
    vocab_size=512,
    hidden_size=32,
    intermediate_size=64,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    max_position_embeddings=64,
)

SIZES = {
    "full": Sizes(
        seed=0,
        model=_FULL_MODEL,
        n_sft=8000,
        n_train_prompts=1024,
        n_eval_prompts=512,
        max_prompt_length=8,
        max_length=48,
        max_new_tokens=40,
        sft_batch=64,
        sft_steps=600,
        sft_lr=3e-3,
        pair_samples=4,
        sample_batch=128,
        pair_batch=32,
        rm_steps=150,
        rm_lr=5e-4,
        rm_eval_fraction=0.1,
        dpo_steps=150,
        dpo_lr=2e-4,
        dpo_beta=0.1,
        ppo_iterations=20,
        ppo_rollout_batch=512,
        ppo_minibatch=64,
        ppo_epochs=2,
        ppo_lr=1e-4,
        critic_lr=3e-4,
        ppo_kl_coef=0.05,
        ppo_ema_decay=0.99,
        eval_batch=128,
        progress_bar=True,
    ),
    "smoke": Sizes(
        seed=0,
        model=_SMOKE_MODEL,
        n_sft=256,
        n_train_prompts=64,
        n_eval_prompts=16,
        max_prompt_length=8,
        max_length=48,
        max_new_tokens=16,
        sft_batch=16,
        sft_steps=30,
        sft_lr=1e-2,
        pair_samples=4,
        sample_batch=16,
        pair_batch=8,
        rm_steps=4,
        rm_lr=1e-3,
        rm_eval_fraction=0.2,
        dpo_steps=4,
        dpo_lr=1e-3,
        dpo_beta=0.1,
        ppo_iterations=2,
        ppo_rollout_batch=16,
        ppo_minibatch=8,
        ppo_epochs=1,
        ppo_lr=1e-4,
        critic_lr=1e-4,
        ppo_kl_coef=0.05,
        ppo_ema_decay=0.9,
        eval_batch=16,
        progress_bar=False,
    ),
}

DEFAULT_WORKDIR = os.path.join("workdirs", "quickstart")
STAGES = ("data", "sft", "pairs", "reward", "dpo", "ppo", "eval")
POLICIES = ("sft", "dpo", "ppo")


@dataclasses.dataclass(frozen=True)
class Paths:
    """Where each stage reads and writes under the quickstart's workdir."""

    workdir: str

    def _p(self, *parts: str) -> str:
        return os.path.join(self.workdir, *parts)

    @property
    def tokenizer(self) -> str:
        from jaxrlhf.tasks import tokenizer

        return tokenizer.tokenizer_path()

    sft_data = property(lambda self: self._p("data", "sft.jsonl"))
    train_prompts = property(lambda self: self._p("data", "prompts_train.jsonl"))
    eval_prompts = property(lambda self: self._p("data", "prompts_eval.jsonl"))
    pairs = property(lambda self: self._p("data", "pairs.jsonl"))
    pairs_stats = property(lambda self: self._p("data", "pairs_stats.json"))
    results = property(lambda self: self._p("results"))
    timings = property(lambda self: self._p("timings.json"))

    def stage_dir(self, stage: str) -> str:
        return self._p(stage)

    def export(self, stage: str) -> str:
        return self._p(stage, "hf")

    sft_export = property(lambda self: self.export("sft"))
    rm_export = property(lambda self: self.export("reward"))


def parse_config_arg(arg: str | None) -> tuple[Sizes, Paths]:
    """``"SIZE[,WORKDIR]"`` (a config file's argument) -> ``(Sizes, Paths)``."""
    size, _, workdir = (arg or "full").partition(",")
    if size not in SIZES:
        raise ValueError(f"quickstart config argument: size {size!r} is not one of {sorted(SIZES)}")
    return SIZES[size], Paths(workdir or DEFAULT_WORKDIR)


# ----------------------------------------------------------------------------------------------
# Stage configs: ordinary jaxrlhf configs (``configs/quickstart/<stage>.py`` return these).
# ----------------------------------------------------------------------------------------------
def sft_config(s: Sizes, paths: Paths):
    """The quickstart's sft stage config (``configs/quickstart/sft.py``)."""
    from jaxrlhf import config_defaults as d

    c = d.base("sft")
    c.seed = s.seed
    c.model = d.model(**s.model)
    c.model.dtype = "float32"
    c.tokenizer = paths.tokenizer
    c.data = d.data(path=paths.sft_data, max_prompt_length=s.max_prompt_length, max_length=s.max_length)
    c.batch_size = s.sft_batch
    c.total_steps = s.sft_steps
    c.pad_to_multiple_of = s.max_length  # one batch shape, one compile
    c.optim = d.optim(lr=s.sft_lr, warmup_steps=s.sft_steps // 20, weight_decay=0.01)
    c.checkpoint.every = s.sft_steps
    c.log_every = max(1, s.sft_steps // 10)
    c.progress_bar = s.progress_bar
    return c


def reward_config(s: Sizes, paths: Paths):
    """The quickstart's reward stage config (``configs/quickstart/reward.py``)."""
    from jaxrlhf import config_defaults as d

    c = d.base("reward")
    c.seed = s.seed
    c.model = d.model(paths.sft_export)
    c.model.dtype = "float32"
    c.tokenizer = paths.tokenizer
    c.data = d.data(
        path=paths.pairs,
        eval_fraction=s.rm_eval_fraction,
        max_prompt_length=s.max_prompt_length,
        max_length=s.max_length,
    )
    c.batch_size = s.pair_batch
    c.total_steps = s.rm_steps
    c.pad_to_multiple_of = s.max_length
    c.eval_every = s.rm_steps
    c.eval_batches = 4
    c.optim = d.optim(lr=s.rm_lr, warmup_steps=s.rm_steps // 10)
    c.bradley_terry = d.bradley_terry(use_margin=False)
    c.checkpoint.every = s.rm_steps
    c.log_every = max(1, s.rm_steps // 5)
    c.progress_bar = s.progress_bar
    return c


def dpo_config(s: Sizes, paths: Paths):
    """The quickstart's dpo stage config (``configs/quickstart/dpo.py``)."""
    from jaxrlhf import config_defaults as d

    c = d.base("dpo")
    c.seed = s.seed
    c.model = d.model(paths.sft_export)
    c.model.dtype = "float32"
    c.tokenizer = paths.tokenizer
    c.data = d.data(path=paths.pairs, max_prompt_length=s.max_prompt_length, max_length=s.max_length)
    c.batch_size = s.pair_batch
    c.total_steps = s.dpo_steps
    c.pad_to_multiple_of = s.max_length
    c.optim = d.optim(lr=s.dpo_lr, warmup_steps=s.dpo_steps // 10, schedule="constant")
    c.ref = d.ref(ema_decay=1.0)
    c.dpo = dict(beta=s.dpo_beta, label_smoothing=0.0, loss_type="sigmoid", nll_coef=0.0)
    c.checkpoint.every = s.dpo_steps
    c.log_every = max(1, s.dpo_steps // 5)
    c.progress_bar = s.progress_bar
    return c


def prompt_run_config(algorithm: str, s: Sizes, paths: Paths):
    """``config_defaults.base(algorithm)`` for a run that samples from the SFT model (float32) on the
    train prompts: seed, model, tokenizer and prompt data set from ``s`` / ``paths`` (PPO here, and
    the experiments' DPO-Iter and GRPO runs)."""
    from jaxrlhf import config_defaults as d

    c = d.base(algorithm)
    c.seed = s.seed
    c.model = d.model(paths.sft_export)
    c.model.dtype = "float32"
    c.tokenizer = paths.tokenizer
    c.data = d.data(
        path=paths.train_prompts,
        max_prompt_length=s.max_prompt_length,
        max_length=s.max_prompt_length + s.max_new_tokens,
        bucket=False,
    )
    return c


def ppo_config(s: Sizes, paths: Paths):
    """The quickstart's ppo stage config (``configs/quickstart/ppo.py``)."""
    from jaxrlhf import config_defaults as d

    c = prompt_run_config("ppo", s, paths)
    c.critic = dict(
        model=d.model(paths.rm_export), optim=d.optim(lr=s.critic_lr, warmup_steps=0, schedule="constant")
    )
    c.critic.model.dtype = "float32"
    c.reward = d.reward(model_path=paths.rm_export, missing_eos_penalty=1.0)
    c.reward.model.dtype = "float32"
    c.ref = d.ref(ema_decay=s.ppo_ema_decay)
    c.generation = d.generation(max_new_tokens=s.max_new_tokens, temperature=1.0)
    c.ppo = d.ppo(
        iterations=s.ppo_iterations,
        rollout_batch_size=s.ppo_rollout_batch,
        minibatch_size=s.ppo_minibatch,
        epochs=s.ppo_epochs,
        whiten_advantages=True,
        kl_coef=s.ppo_kl_coef,
    )
    c.optim = d.optim(lr=s.ppo_lr, warmup_steps=0, schedule="constant")
    c.checkpoint.every = s.ppo_iterations
    c.log_every = max(1, s.ppo_iterations // 10)
    c.progress_bar = s.progress_bar
    return c


def evaluate_config(s: Sizes, paths: Paths):
    """The quickstart's evaluate stage config (``configs/quickstart/evaluate.py``)."""
    from jaxrlhf import config_defaults as d

    c = ml_collections.ConfigDict()
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    c.tokenizer = paths.tokenizer
    c.model = dict(dtype="float32")
    c.data = d.data(
        path=paths.eval_prompts,
        max_prompt_length=s.max_prompt_length,
        max_length=s.max_prompt_length + s.max_new_tokens,
        bucket=False,
        shuffle=False,
    )
    c.reward = dict(fn="jaxrlhf.tasks.reviews:reward")
    c.generation = d.generation(max_new_tokens=s.max_new_tokens, temperature=1.0)
    return c


STAGE_CONFIGS = {
    "sft": sft_config,
    "reward": reward_config,
    "dpo": dpo_config,
    "ppo": ppo_config,
    "evaluate": evaluate_config,
}


def stage_config(stage: str, arg: str | None = None):
    """The config of quickstart stage ``stage`` for the argument ``"SIZE[,WORKDIR]"``."""
    if stage not in STAGE_CONFIGS:
        raise ValueError(
            f"quickstart: no config for stage {stage!r}; expected one of {sorted(STAGE_CONFIGS)}"
        )
    return STAGE_CONFIGS[stage](*parse_config_arg(arg))


def load_config(stage: str, size: str, workdir: str):
    """``stage_config(stage, "<size>,<workdir>")``, locked as ``--config=`` would load it."""
    config = stage_config(stage, f"{size},{workdir}")
    config.lock()
    return config


# ----------------------------------------------------------------------------------------------
# Stages.
# ----------------------------------------------------------------------------------------------
def stage_data(s: Sizes, p: Paths) -> dict[str, Any]:
    """(a) SFT reviews and train / held-out prompts (held-out openings never appear in the others)."""
    from jaxrlhf.tasks import common, reviews

    n = reviews.write_sft_jsonl(p.sft_data, s.n_sft, seed=s.seed)
    sft_prompts = [r["prompt"] for r in common.read_jsonl(p.sft_data)]
    train = reviews.review_prompts(s.n_train_prompts, seed=s.seed + 1)
    held_out = reviews.review_prompts(
        s.n_eval_prompts, seed=s.seed + 2, exclude=set(sft_prompts) | set(train)
    )
    common.write_jsonl(p.train_prompts, ({"prompt": t} for t in train))
    common.write_jsonl(p.eval_prompts, ({"prompt": t} for t in held_out))
    return {"sft_rows": n, "train_prompts": len(train), "eval_prompts": len(held_out)}


def train_stage(stage: str, size: str, p: Paths) -> dict[str, Any]:
    """(b, d, e, f) ``registry.run`` of the stage's config; returns its last logged metrics.

    The config is read through ``config_utils.ReadTracker``; keys the run never read (dead keys)
    are returned under ``unread_keys`` (tests/test_quickstart.py requires none).
    """
    from jaxrlhf import config_utils, registry

    config = load_config(stage, size, p.workdir)
    tracked = config_utils.ReadTracker(config)
    result = registry.run(tracked, p.stage_dir(stage))
    if result.get("interrupted"):
        raise KeyboardInterrupt(f"stage {stage} stopped by a signal; rerun to resume from its checkpoint")
    history = result.get("history") or [result.get("metrics", {})]
    metrics = {"first": _floats(history[0]), "last": _floats(history[-1])}
    if "eval" in result:
        metrics["eval"] = _floats(result["eval"])
    metrics["unread_keys"] = config_utils.unread_keys(config, tracked.reads)
    if metrics["unread_keys"]:
        logging.warning("stage %s: config keys never read: %s", stage, metrics["unread_keys"])
    return metrics


def _floats(d: dict) -> dict[str, float]:
    return {k: float(v) for k, v in d.items() if isinstance(v, int | float) or getattr(v, "ndim", 1) == 0}


def sample_prompts(policy_dir: str, prompts_path: str, s: Sizes, k: int, seed: int, desc: str):
    """``k`` samples per prompt of ``prompts_path`` from the HF-format policy at ``policy_dir``.

    Returns ``(prompts [P], responses [P][k])`` as text (responses cut at EOS, special tokens dropped);
    ``P`` is the number of prompts rounded down to a multiple of ``s.sample_batch``.
    """
    import jax
    import numpy as np
    from tqdm import tqdm

    from jaxrlhf import data as data_lib
    from jaxrlhf import evaluate, rollout
    from jaxrlhf.config_sections import generation
    from jaxrlhf.distributed import gather
    from jaxrlhf.sharding import make_mesh, shard_batch
    from jaxrlhf.tasks import common

    mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    tokenizer = data_lib.load_tokenizer(Paths("").tokenizer)
    dcfg = data_lib.default_data_config(
        path=prompts_path,
        max_prompt_length=s.max_prompt_length,
        max_length=s.max_prompt_length + s.max_new_tokens,
        bucket=False,
        shuffle=False,
    )
    ds, _ = data_lib.build_datasets(dcfg, tokenizer, "prompt")
    source = common.read_jsonl(prompts_path)
    graphdef, params = evaluate.load_policy(policy_dir, "float32", mesh)
    sampler = rollout.config_sampler(
        graphdef, generation(max_new_tokens=s.max_new_tokens), tokenizer, mesh, params
    )
    batch = min(s.sample_batch, len(ds))
    it = data_lib.BatchIterator(ds, batch, shuffle=False, repeat=False, process_index=0, process_count=1)
    prompts, responses = [], []
    for b, host in enumerate(tqdm(it, total=len(ds) // batch, desc=desc, unit="batch")):
        rep = {key: np.repeat(host[key], k, axis=0) for key in ("prompt_ids", "prompt_mask")}
        dev = shard_batch(mesh, rep)
        out = sampler(
            params, dev["prompt_ids"], dev["prompt_mask"], jax.random.fold_in(jax.random.key(seed), b)
        )
        ids, mask = np.asarray(gather(out.response_ids)), np.asarray(gather(out.response_mask))
        texts = [common.clean_response(t) for t in rollout.decode_texts(tokenizer, ids, mask)]
        for r, i in enumerate(host["index"]):
            prompts.append(source[ds.row(int(i))["source_index"]]["prompt"])
            responses.append(texts[r * k : (r + 1) * k])
    return prompts, responses


def stage_pairs(s: Sizes, p: Paths) -> dict[str, Any]:
    """(c) DPO-paper pairs: ``k`` SFT samples per train prompt, best vs worst gold score."""
    import numpy as np

    from jaxrlhf.tasks import common, reviews

    prompts, samples = sample_prompts(
        p.sft_export, p.train_prompts, s, s.pair_samples, seed=s.seed + 10, desc="sampling pairs"
    )
    flat_p = [q for q, row in zip(prompts, samples, strict=True) for _ in row]
    flat_r = [r for row in samples for r in row]
    scores = reviews.reward(flat_p, flat_r).reshape(len(prompts), s.pair_samples)
    # An empty side (EOS sampled first) has no response token to score or to learn from.
    pairs = [r for r in common.best_worst_pairs(prompts, samples, scores) if r["chosen"] and r["rejected"]]
    if len(pairs) < 2 * s.pair_batch:
        raise RuntimeError(
            f"stage pairs: only {len(pairs)} usable pairs from {len(prompts)} prompts (need >= "
            f"{2 * s.pair_batch}); the SFT model's samples are too uniform - train SFT longer"
        )
    common.write_preference_jsonl(p.pairs, pairs)
    chosen = np.asarray([scores[i].max() for i in range(len(prompts))])
    stats = {
        "prompts": len(prompts),
        "samples_per_prompt": s.pair_samples,
        "pairs": len(pairs),
        "sft_gold_mean": float(scores.mean()),
        "sft_frac_positive": float(np.mean(scores > 0.5)),
        "sft_frac_negative": float(np.mean(scores < 0.5)),
        "chosen_gold_mean": float(chosen.mean()),
        "rejected_gold_mean": float(scores.min(axis=1).mean()),
        "example": {"prompt": prompts[0], "samples": samples[0], "gold": [float(x) for x in scores[0]]},
    }
    with open(p.pairs_stats, "w") as f:
        json.dump(stats, f, indent=2)
    return stats


def compare_policies(
    config, policies: dict[str, str], baseline: str, *, batch_size: int = 32, seed: int = 0
) -> dict[str, dict]:
    """Gold reward, KL to ``baseline`` and win rate vs ``baseline`` of each policy on ``config.data``.

    Same metrics as ``jaxrlhf.evaluate.evaluate`` (one sample per prompt; KL = mean over prompts of
    ``sum_t log pi(y_t) - log pi_base(y_t)`` on the policy's own samples; win rate = fraction of
    prompts where the policy's sample out-scores an independent baseline sample, ties one half),
    but with one sampler and one log-prob compile shared by all policies (they share an
    architecture) and the baseline's samples drawn once.

    Args:
      config: ``configs/quickstart/evaluate.py`` (prompts, tokenizer, sampler, judge).
      policies: name -> HF-format directory.
      baseline: HF-format directory of the reference policy (the SFT model).
      batch_size: prompts per sampler call (the last partial batch is left out).
      seed: sampling seed (policies use ``seed + 1``, the baseline ``seed + 2``).

    Returns:
      name -> ``{gold_reward, gold_reward_sem, kl_to_sft, win_rate_vs_sft, response_length, prompts}``,
      plus, when the judge is the reviews gold scorer, the degeneracy statistics of the policy's
      responses (``jaxrlhf.tasks.degeneracy.row_fields``): ``frac_positive``, ``repeat_3gram_frac``,
      ``distinct_2``, ``out_of_grammar_frac``, ``off_grammar_bigram_frac``, ``off_grammar_trigram_frac``,
      ``response_words`` (mean length in words) and the score histogram ``score_hist_0`` ..
      ``score_hist_9`` (counts, 10 bins on [0, 1]).
    """
    import jax
    import numpy as np
    from tqdm import tqdm

    from jaxrlhf import data as data_lib
    from jaxrlhf import evaluate, rollout
    from jaxrlhf.algorithms.common import response_logps
    from jaxrlhf.distributed import gather
    from jaxrlhf.sharding import make_mesh, shard_batch
    from jaxrlhf.tasks import degeneracy

    mesh = make_mesh(config.mesh)
    tokenizer = data_lib.load_tokenizer(config.tokenizer)
    ds, _ = data_lib.build_datasets(config.data, tokenizer, "prompt")
    batch = min(batch_size, len(ds))
    n_batches = len(ds) // batch
    judge = rollout.build_reward(config, mesh, tokenizer, ds)
    reviews_judge = config.reward.fn == degeneracy.REVIEWS_REWARD
    graphdef, base_params = evaluate.load_policy(baseline, config.model.dtype, mesh)
    sampler = rollout.config_sampler(graphdef, config.generation, tokenizer, mesh, base_params)
    logps = jax.jit(lambda params, seq: response_logps(graphdef, params, seq))
    structure = jax.tree.structure(base_params)

    def sample(params, salt: int, desc: str) -> list[dict]:
        it = data_lib.BatchIterator(ds, batch, shuffle=False, repeat=False, process_index=0, process_count=1)
        out = []
        for b, host in enumerate(tqdm(it, total=n_batches, desc=desc, unit="batch", leave=False)):
            prompts = shard_batch(mesh, {k: host[k] for k in ("prompt_ids", "prompt_mask")})
            rng = jax.random.fold_in(jax.random.key(seed + salt), b)
            gen = sampler(params, prompts["prompt_ids"], prompts["prompt_mask"], rng)
            seq = rollout.response_sequences(
                prompts["prompt_ids"], prompts["prompt_mask"], gen.response_ids, gen.response_mask
            )
            scores = np.asarray(jax.device_get(judge(seq, host["prompt_ids"].shape[1], host["index"])))
            length = np.asarray(gather(gen.response_mask)).sum(-1)
            out.append({"seq": seq, "scores": scores, "length": length})
            if reviews_judge:
                out[-1]["texts"] = evaluate.decode_texts(tokenizer, seq, host["prompt_ids"].shape[1])
        return out

    base_scores = np.concatenate([o["scores"] for o in sample(base_params, 2, "baseline samples")])
    rows = {}
    for name, path in tqdm(policies.items(), desc="evaluating", unit="policy"):
        params = base_params if path == baseline else evaluate.load_policy(path, config.model.dtype, mesh)[1]
        if jax.tree.structure(params) != structure:
            raise ValueError(f"compare_policies: {path} has a different architecture than {baseline}")
        pol = sample(params, 1, f"{name} samples")
        scores = np.concatenate([o["scores"] for o in pol])
        kl = np.concatenate(
            [np.asarray(gather(logps(params, o["seq"]) - logps(base_params, o["seq"]))) for o in pol]
        )
        rows[name] = {
            "gold_reward": float(scores.mean()),
            "gold_reward_sem": float(scores.std() / math.sqrt(len(scores))),
            "kl_to_sft": float(kl.mean()),
            "win_rate_vs_sft": float(np.mean((scores > base_scores) + 0.5 * (scores == base_scores))),
            "response_length": float(np.concatenate([o["length"] for o in pol]).mean()),
            "prompts": len(scores),
        }
        if reviews_judge:
            prompts, responses = ([t for o in pol for t in o["texts"][i]] for i in (0, 1))
            rows[name].update(degeneracy.row_fields(prompts, responses, scores))
    return rows


def stage_eval(s: Sizes, size: str, p: Paths, stage_metrics: dict[str, Any]) -> dict[str, Any]:
    """(g) SFT, DPO and PPO on held-out prompts, judged by the gold scorer; writes the results."""
    from jaxrlhf import config_utils

    config = load_config("evaluate", size, p.workdir)
    tracked = config_utils.ReadTracker(config)
    policies = {n: p.export(n) for n in POLICIES}
    rows = compare_policies(tracked, policies, p.sft_export, batch_size=s.eval_batch, seed=s.seed + 20)
    stage_metrics["eval"] = {"unread_keys": config_utils.unread_keys(config, tracked.reads)}
    os.makedirs(p.results, exist_ok=True)
    results = {"size": size, "sizes": dataclasses.asdict(s), "table": rows, "stages": stage_metrics}
    write_results(results, p.results)
    return results


# ----------------------------------------------------------------------------------------------
# Results: console / markdown table, JSON, reward-vs-KL plot.
# ----------------------------------------------------------------------------------------------
def format_table(rows: dict[str, dict[str, float]]) -> str:
    """A markdown table, one row per policy (gold reward ± s.e.m., KL to SFT, win rate vs SFT), with the
    degeneracy statistics as further columns when every row has them (results since issue 17)."""
    header = (
        "| policy | gold reward (mean ± s.e.m.) | KL to SFT (nats/seq) | win rate vs SFT | response length |"
    )
    degenerate = bool(rows) and all("distinct_2" in r for r in rows.values())
    if degenerate:
        header += " words | gold > 0.5 | repeated 3-grams | distinct-2 | out-of-grammar words |"
    lines = [header, "|---" * header.count(" | ") + "|---|"]
    for name, r in rows.items():
        line = (
            f"| {name.upper()} | {r['gold_reward']:.3f} ± {r['gold_reward_sem']:.3f} | {r['kl_to_sft']:.2f} "
            f"| {r['win_rate_vs_sft']:.3f} | {r['response_length']:.1f} |"
        )
        if degenerate:
            line += (
                f" {r['response_words']:.1f} | {r['frac_positive']:.3f} | {r['repeat_3gram_frac']:.3f} "
                f"| {r['distinct_2']:.3f} | {r['out_of_grammar_frac']:.3f} |"
            )
        lines.append(line)
    return "\n".join(lines)


def pyplot(out_path: str):
    """``matplotlib.pyplot`` on the Agg backend, or ``None`` (with a warning) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logging.warning("matplotlib is not installed; skipping %s (pip install matplotlib)", out_path)
        return None
    return plt


def plot_reward_vs_kl(rows: dict[str, dict[str, float]], out_path: str) -> str | None:
    """Gold reward against KL to SFT, one point per policy (PNG); ``None`` without matplotlib."""
    plt = pyplot(out_path)
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    colors = {"sft": "tab:gray", "dpo": "tab:blue", "ppo": "tab:orange"}
    for name, r in rows.items():
        ax.errorbar(
            r["kl_to_sft"], r["gold_reward"], yerr=r["gold_reward_sem"], fmt="o", ms=8,
            color=colors.get(name), capsize=3, label=f"{name.upper()} (win {r['win_rate_vs_sft']:.2f})",
        )  # fmt: skip
    ax.set_xlabel("KL(policy || SFT), nats per sequence")
    ax.set_ylabel("gold reward (held-out prompts)")
    ax.set_title("Synthetic reviews: gold reward vs KL")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    return out_path


def write_outputs(
    out_dir: str, table_md: str, results: dict[str, Any], plot_fn=None, png_name: str = ""
) -> None:
    """Writes ``table.md``, ``results.json`` and (``plot_fn(path)``) a PNG: the quickstart's and the
    experiments' result files."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(table_md + "\n")
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    if plot_fn is not None:
        plot_fn(os.path.join(out_dir, png_name))


def write_results(results: dict[str, Any], out_dir: str) -> None:
    write_outputs(
        out_dir,
        format_table(results["table"]),
        results,
        lambda path: plot_reward_vs_kl(results["table"], path),
        "reward_vs_kl.png",
    )


# ----------------------------------------------------------------------------------------------
# The pipeline.
# ----------------------------------------------------------------------------------------------
def stage_done(stage: str, p: Paths) -> bool:
    """Whether ``stage``'s final output exists (then the stage is skipped)."""
    outputs = {
        "data": [p.sft_data, p.train_prompts, p.eval_prompts],
        "pairs": [p.pairs, p.pairs_stats],
        "eval": [os.path.join(p.results, "results.json")],
    }.get(stage, [os.path.join(p.export(stage), "config.json")])
    return all(os.path.exists(o) for o in outputs)


def run_pipeline(workdir: str = DEFAULT_WORKDIR, size: str = "full", force: bool = False) -> dict[str, Any]:
    """Runs (or resumes) every stage in ``workdir``; returns ``results.json``'s content."""
    if size not in SIZES:
        raise ValueError(f"--size={size!r}: expected one of {sorted(SIZES)}")
    s, p = SIZES[size], Paths(workdir)
    if force and os.path.isdir(workdir) and os.listdir(workdir):
        known = {*STAGES, "results", "timings.json"}
        strangers = sorted(set(os.listdir(workdir)) - known)
        if strangers:  # never delete a directory the quickstart did not make
            raise ValueError(
                f"--force: {workdir} holds files the quickstart did not write ({strangers[:5]}); "
                "pick another --workdir or delete it yourself"
            )
        shutil.rmtree(workdir)
    os.makedirs(workdir, exist_ok=True)
    timings = {}
    if os.path.exists(p.timings):
        with open(p.timings) as f:
            timings = json.load(f)
    metrics: dict[str, Any] = timings.pop("_metrics", {})
    cpu: dict[str, float] = timings.pop("_cpu", {})
    for stage in STAGES:
        if stage_done(stage, p):
            print(f"[quickstart] stage {stage}: done already (in {workdir}), skipping", flush=True)
            continue
        print(f"[quickstart] stage {stage} ...", flush=True)
        t0, c0 = time.perf_counter(), _cpu_seconds()
        if stage == "data":
            out = stage_data(s, p)
        elif stage == "pairs":
            out = stage_pairs(s, p)
        elif stage == "eval":
            metrics["wall_s"] = {k: round(v, 1) for k, v in timings.items()}
            out = None
            stage_eval(s, size, p, metrics)
        else:
            out = train_stage(stage, size, p)
        timings[stage] = time.perf_counter() - t0
        cpu[stage] = _cpu_seconds() - c0
        if out is not None:
            metrics[stage] = out
        print(f"[quickstart] stage {stage}: {timings[stage]:.1f}s {_summary(stage, out)}", flush=True)
        with open(p.timings, "w") as f:
            json.dump({**timings, "_cpu": cpu, "_metrics": metrics}, f, indent=2)
    with open(os.path.join(p.results, "results.json")) as f:
        results = json.load(f)
    results["stages"]["wall_s"] = {k: round(v, 1) for k, v in timings.items()}
    results["stages"]["cpu_s"] = {k: round(v, 1) for k, v in cpu.items()}
    results["wall_s_total"] = round(sum(timings.values()), 1)
    results["cpu_s_total"] = round(sum(cpu.values()), 1)
    results["hardware"] = hardware()
    write_results(results, p.results)
    print("\n" + format_table(results["table"]), flush=True)
    print(
        f"\n[quickstart] total {results['wall_s_total']:.0f}s of stage time; results in {p.results}/"
        " (table.md, results.json, reward_vs_kl.png)",
        flush=True,
    )
    return results


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def hardware() -> dict[str, Any]:
    """CPU model, usable cores and the JAX backend (for the results' wall times)."""
    import platform

    import jax

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": model, "cores": cores, "backend": jax.default_backend(), "jax": jax.__version__}


def _summary(stage: str, out: dict | None) -> str:
    if not out:
        return ""
    if stage == "pairs":
        return (
            f"{out['pairs']} pairs; SFT samples gold mean {out['sft_gold_mean']:.3f}, "
            f"{out['sft_frac_positive']:.0%} positive / {out['sft_frac_negative']:.0%} negative"
        )
    if stage == "data":
        return json.dumps(out)
    last = out.get("last", {})
    keys = {
        "sft": ["nll"],
        "reward": ["bt_loss", "accuracy"],
        "dpo": ["dpo_loss", "rewards/accuracy", "rewards/margin"],
        "ppo": ["reward/raw_mean", "kl_ref/k1"],
    }.get(stage, [])
    shown = {k: last[k] for k in keys if k in last}
    if "eval" in out:
        shown.update({f"eval/{k}": v for k, v in out["eval"].items() if "acc" in k})
    return ", ".join(f"{k}={v:.4g}" for k, v in shown.items())


def define_flags() -> dict[str, Any]:
    """The CLI's flags (defined only when run as a script: configs import this module)."""
    return dict(
        workdir=flags.DEFINE_string("workdir", DEFAULT_WORKDIR, "Directory of every stage's outputs."),
        size=flags.DEFINE_enum("size", "full", sorted(SIZES), "full: the README's main job; smoke: seconds."),
        force=flags.DEFINE_bool("force", False, "Delete the workdir and rerun every stage."),
        verbose=flags.DEFINE_bool(
            "verbose", False, "Log the trainers' INFO lines (metrics every log_every)."
        ),
    )


def main(argv, f: dict[str, Any]):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO if f["verbose"].value else logging.WARNING)
    run_pipeline(f["workdir"].value, f["size"].value, f["force"].value)
    return 0


if __name__ == "__main__":
    _flags = define_flags()
    sys.exit(app.run(lambda argv: main(argv, _flags)))
