r"""Evaluate a policy on held-out prompts: reward, win rate, KL to a reference, pass@k.

    python -m jaxrlhf.evaluate --config=configs/ppo_hh_qwen.py --policy=/tmp/ppo/hf \
        --baseline=/tmp/sft/hf [--reference=/tmp/sft/hf] [--samples=4] [--out=eval.json]

The config supplies the prompt data (``config.data``, ``config.tokenizer``), the sampler settings
(``config.generation``) and the judge (``config.reward``: a reward model or a programmatic reward).

* **reward**: mean reward of one sampled response per prompt (the first of ``samples``).
* **win rate**: fraction of prompts where the policy's response out-scores the baseline's
  (ties count one half), both judged by the same reward.
* **KL to reference**: mean over prompts of ``Σ_t log π(y_t) − log π_ref(y_t)`` on the policy's own
  samples (a Monte-Carlo estimate of KL(π ‖ π_ref) per sequence).
* **degeneracy** (judge ``jaxrlhf.tasks.reviews:reward``): the statistics of
  ``jaxrlhf.tasks.degeneracy.row_fields`` on the first response per prompt (fraction judged positive,
  repeated 3-grams, distinct-2, out-of-grammar words and bigrams, length in words, score histogram).
* **pass@k** (programmatic 0/1 rewards): the unbiased estimator of Chen et al. (2021) from
  ``samples`` responses per prompt, for every k ≤ samples that is a power of two, and samples.
"""

from __future__ import annotations

import functools
import json
import math
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from jaxrlhf import data as data_lib
from jaxrlhf import models, rollout
from jaxrlhf.algorithms.common import response_logps
from jaxrlhf.distributed import gather
from jaxrlhf.rollout import build_reward, config_sampler
from jaxrlhf.sharding import make_mesh, shard_batch
from jaxrlhf.tasks import degeneracy
from jaxrlhf.tasks.verifiable import pass_at_k_from_scores
from jaxrlhf.trainer.setup import DTYPES


def load_policy(path: str, dtype: str, mesh):
    model = models.from_pretrained(path, dtype=DTYPES[dtype], param_dtype=jnp.float32, mesh=mesh)
    graphdef, state = nnx.split(model)
    return graphdef, nnx.to_pure_dict(state)


def decode_texts(tokenizer, seq: dict, prompt_len: int) -> tuple[list[str], list[str]]:
    """``(prompts [B], responses [B])`` of a ``[B, P+N]`` sequence batch (prompt = its first
    ``prompt_len`` columns), decoded as the programmatic judge (``rollout.build_reward``) decodes them."""
    ids, am = gather(seq["input_ids"]), gather(seq["attention_mask"])
    prompts = rollout.decode_texts(tokenizer, ids[:, :prompt_len], am[:, :prompt_len])
    responses = rollout.decode_texts(tokenizer, ids[:, prompt_len:], am[:, prompt_len:])
    return prompts, responses


def evaluate(
    config,
    policy: str,
    *,
    baseline: str | None = None,
    reference: str | None = None,
    samples: int = 1,
    max_prompts: int = 0,
    batch_size: int = 32,
    seed: int = 0,
) -> dict[str, Any]:
    """Metrics of ``policy`` (an HF-format dir) on ``config.data``'s prompts; see the module doc."""
    mesh = make_mesh(config.mesh)
    tokenizer = data_lib.load_tokenizer(config.tokenizer)
    ds, _ = data_lib.build_datasets(config.data, tokenizer, "prompt")
    n_prompts = len(ds) if max_prompts <= 0 else min(max_prompts, len(ds))
    batch = min(batch_size, n_prompts)
    n_prompts = (n_prompts // batch) * batch
    reward = build_reward(config, mesh, tokenizer, ds)
    gc = config.generation
    dtype = config.model.dtype

    def sample_all(graphdef, params, k: int, salt: int) -> list[dict]:
        sampler = config_sampler(graphdef, gc, tokenizer, mesh, params)
        it = data_lib.BatchIterator(ds, batch, seed=seed, shuffle=False, process_index=0, process_count=1)
        out = []
        for b in range(n_prompts // batch):
            host = next(it)
            rep = {key: np.repeat(host[key], k, axis=0) for key in ("prompt_ids", "prompt_mask", "index")}
            prompts = shard_batch(mesh, {key: rep[key] for key in ("prompt_ids", "prompt_mask")})
            rng = jax.random.fold_in(jax.random.key(seed + salt), b)
            gen = sampler(params, prompts["prompt_ids"], prompts["prompt_mask"], rng)
            seq = gen.to_batch()
            scores = np.asarray(jax.device_get(reward(seq, rep["prompt_ids"].shape[1], rep["index"])))
            out.append(
                {"seq": seq, "scores": scores.reshape(-1, k), "length": gather(gen.response_mask).sum(-1)}
            )
            if config.reward.fn == degeneracy.REVIEWS_REWARD:  # the first sample of each prompt
                out[-1]["texts"] = [t[::k] for t in decode_texts(tokenizer, seq, rep["prompt_ids"].shape[1])]
        return out

    graphdef, params = load_policy(policy, dtype, mesh)
    pol = sample_all(graphdef, params, samples, 1)
    scores = np.concatenate([p["scores"] for p in pol])  # [prompts, samples]
    result: dict[str, Any] = {
        "prompts": int(n_prompts),
        "samples_per_prompt": samples,
        "reward_mean": float(scores[:, 0].mean()),
        "reward_std": float(scores[:, 0].std()),
        "response_length_mean": float(np.concatenate([p["length"] for p in pol]).mean()),
    }
    if "texts" in pol[0]:
        prompts, responses = ([t for p in pol for t in p["texts"][i]] for i in (0, 1))
        result.update(degeneracy.row_fields(prompts, responses, scores[:, 0]))
    binary = np.all(np.isin(scores, (0.0, 1.0)))
    if binary:
        ks = sorted({k for k in (1, 2, 4, 8, 16, 32, 64) if k <= samples} | {samples})
        for k in ks:
            result[f"pass@{k}"] = float(np.mean(pass_at_k_from_scores(scores, k)))
    ref_path = reference or baseline
    if ref_path:
        ref_gd, ref_params = load_policy(ref_path, dtype, mesh)
        chunk = config.get("vocab_chunk", 0)  # 0 for a config without it (a reward-model config)
        lp = jax.jit(functools.partial(response_logps, vocab_chunk=chunk), static_argnums=0)
        kls = [
            gather(lp(graphdef, params, p["seq"]) - lp(ref_gd, ref_params, p["seq"])).reshape(-1, samples)[
                :, 0
            ]
            for p in pol
        ]
        result["kl_to_reference"] = float(np.concatenate(kls).mean())
    if baseline:
        base_gd, base_params = load_policy(baseline, dtype, mesh)
        base = sample_all(base_gd, base_params, 1, 2)
        b_scores = np.concatenate([b["scores"][:, 0] for b in base])
        p_scores = scores[:, 0]
        result["win_rate"] = float(np.mean((p_scores > b_scores) + 0.5 * (p_scores == b_scores)))
        result["baseline_reward_mean"] = float(b_scores.mean())
    return result


_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config (data, generation, reward).")
_POLICY = flags.DEFINE_string("policy", None, "HF-format directory of the policy to evaluate.")
_BASELINE = flags.DEFINE_string("baseline", None, "HF-format directory of the baseline policy (win rate).")
_REFERENCE = flags.DEFINE_string("reference", None, "Reference policy for the KL (default: the baseline).")
_SAMPLES = flags.DEFINE_integer("samples", 1, "Responses per prompt (pass@k uses all of them).")
_MAX_PROMPTS = flags.DEFINE_integer("max_prompts", 0, "Evaluate at most this many prompts (0: all).")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Prompts per sampling batch.")
_OUT = flags.DEFINE_string("out", None, "Write the metrics as JSON here.")


def main(argv):
    del argv
    logging.set_verbosity(logging.INFO)
    res = evaluate(
        _CONFIG.value,
        _POLICY.value,
        baseline=_BASELINE.value,
        reference=_REFERENCE.value,
        samples=_SAMPLES.value,
        max_prompts=_MAX_PROMPTS.value,
        batch_size=_BATCH.value,
    )
    text = json.dumps(res, indent=2)
    print(text)
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            f.write(text)
    return 0 if all(math.isfinite(v) for v in res.values() if isinstance(v, float)) else 1


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "policy"])
    sys.exit(app.run(main))
