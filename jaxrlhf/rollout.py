"""The pieces every rollout algorithm shares (PPO, the critic-free family, DPO-Iter, evaluation):
the prompt batches, the sampler built from ``config.generation``, the reward source
(``config.reward``: a programmatic function on decoded text or a frozen reward model), score
shaping, and decoding.
"""

from __future__ import annotations

import importlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf import data as data_lib
from jaxrlhf import generation as gen_lib
from jaxrlhf.algorithms.common import apply_model, last_token_index
from jaxrlhf.distributed import gather
from jaxrlhf.sharding import activation_mesh, replicated, shard_batch
from jaxrlhf.trainer.setup import load_model


# ----------------------------------------------------------------------------------------------
# Prompts.
# ----------------------------------------------------------------------------------------------
def prompt_data(config, tokenizer, prompts_per_batch: int):
    """``(prompts_ds, iterator)``: the prompt dataset and this process's iterator over global
    batches of ``prompts_per_batch`` prompts (each process reads its own rows)."""
    prompts_ds, _ = data_lib.build_datasets(config.data, tokenizer, "prompt")
    prompt_it = data_lib.BatchIterator.from_config(
        prompts_ds,
        config.data,
        prompts_per_batch,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    return prompts_ds, prompt_it


def repeat_prompts(host: dict, k: int) -> dict:
    """Each prompt of a host batch repeated ``k`` times in a row (a prompt's samples contiguous)."""
    return {key: np.repeat(host[key], k, axis=0) for key in ("prompt_ids", "prompt_mask", "index")}


def global_index(mesh, index: np.ndarray) -> np.ndarray:
    """The prompt-dataset rows of a global batch, on every process (for programmatic rewards)."""
    return gather(shard_batch(mesh, {"i": index})["i"])


# ----------------------------------------------------------------------------------------------
# Sampling.
# ----------------------------------------------------------------------------------------------
def config_sampler(graphdef, gc, tokenizer, mesh, params):
    """The jitted sampler for ``config.generation``, stopping at the tokenizer's EOS.

    With ``gc.reshard`` the actor is resharded inside the call from its training layout into the
    generation layout (``generation.generation_shardings``: FSDP gathered once per rollout instead
    of once per token, tensor parallelism kept).
    """
    eos = tokenizer.eos_token_id
    eos_ids = tuple(eos) if isinstance(eos, list | tuple) else (eos,)
    train_shardings = jax.tree.map(lambda x: x.sharding, params)
    return gen_lib.make_sampler(
        graphdef,
        max_new_tokens=gc.max_new_tokens,
        temperature=gc.temperature,
        top_k=gc.top_k,
        top_p=gc.top_p,
        eos_ids=eos_ids,
        pad_id=tokenizer.pad_token_id,
        mesh=mesh,
        param_shardings=train_shardings if gc.reshard else None,
        gen_param_shardings=gen_lib.generation_shardings(train_shardings) if gc.reshard else None,
    )


def response_sequences(prompt_ids, prompt_mask, response_ids, response_mask) -> dict:
    """Prompt (left-padded) + response (right-padded) as one ``[B, P+N]`` sequence batch."""
    out = gen_lib.GenerationOutput(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=response_ids,
        response_mask=response_mask,
        logprobs=jnp.zeros(response_ids.shape, jnp.float32),
        model_logprobs=jnp.zeros(response_ids.shape, jnp.float32),
        truncated=jnp.zeros(response_ids.shape[:1], bool),
    )
    return out.to_batch()


def generate(sampler, params, host_prompts: dict, mesh, rng):
    """``(GenerationOutput, sequence batch, seconds)`` for one global batch of prompts."""
    prompts = shard_batch(mesh, {k: host_prompts[k] for k in ("prompt_ids", "prompt_mask")})
    t0 = time.perf_counter()
    out = sampler(params, prompts["prompt_ids"], prompts["prompt_mask"], rng)
    seq = out.to_batch()
    jax.block_until_ready(seq)
    return out, seq, time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------
# Rewards.
# ----------------------------------------------------------------------------------------------
def load_reward_fn(spec: str):
    """``"package.module:function"`` -> the function (``fn(prompts, responses, rows) -> [B]``)."""
    if ":" not in spec:
        raise ValueError(f"config.reward.fn={spec!r}: expected 'package.module:function'")
    mod, name = spec.split(":", 1)
    fn = getattr(importlib.import_module(mod), name, None)
    if fn is None:
        raise ValueError(f"config.reward.fn={spec!r}: module {mod!r} has no attribute {name!r}")
    return fn


def build_reward(config, mesh, tokenizer, prompts_ds):
    """``reward(seq, prompt_len, index) -> raw scores [B]`` (replicated), from ``config.reward``.

    ``config.reward.fn`` (``"package.module:function"``) scores decoded prompt/response text with
    the prompt dataset's rows (reference answers, test cases); otherwise the frozen Bradley-Terry
    reward model ``config.reward.model`` scores the sequence at its last real token (the EOS).
    """
    if config.reward.fn:
        fn = load_reward_fn(config.reward.fn)

        def programmatic(seq, prompt_len, index):
            ids, am = gather(seq["input_ids"]), gather(seq["attention_mask"])
            prompts = decode_texts(tokenizer, ids[:, :prompt_len], am[:, :prompt_len])
            responses = decode_texts(tokenizer, ids[:, prompt_len:], am[:, prompt_len:])
            rows = [prompts_ds.row(int(i)) for i in index]
            scores = np.asarray(fn(prompts, responses, rows), np.float32).reshape(-1)
            if scores.shape[0] != ids.shape[0]:
                raise ValueError(
                    f"config.reward.fn returned {scores.shape[0]} scores for {ids.shape[0]} responses"
                )
            return jax.device_put(scores, replicated(mesh))

        return programmatic
    gd, params, _ = load_model(
        config, config.reward.model, mesh, head="scalar", config_key="reward.model.path"
    )

    @jax.jit
    def model_score(params, seq):
        with activation_mesh(mesh):
            scores = apply_model(gd, params, seq)
        idx = last_token_index(seq["attention_mask"])
        return jnp.take_along_axis(scores, idx[:, None], axis=-1)[:, 0].astype(jnp.float32)

    return lambda seq, prompt_len, index: model_score(params, seq)


def decode_texts(tokenizer, ids: np.ndarray, mask: np.ndarray) -> list[str]:
    return [
        tokenizer.decode(row[m > 0].tolist(), skip_special_tokens=True)
        for row, m in zip(ids, mask, strict=True)
    ]


# ----------------------------------------------------------------------------------------------
# Score shaping and where the score lands.
# ----------------------------------------------------------------------------------------------
def update_running_stats(stats: dict, x: jax.Array) -> dict:
    """Parallel (Chan et al.) update of ``{"count", "mean", "var"}`` with a batch ``x [B]``."""
    n = jnp.asarray(x.shape[0], jnp.float32)
    mean_b = jnp.mean(x)
    var_b = jnp.mean((x - mean_b) ** 2)
    count = stats["count"] + n
    delta = mean_b - stats["mean"]
    mean = stats["mean"] + delta * n / count
    m2 = stats["var"] * stats["count"] + var_b * n + delta**2 * stats["count"] * n / count
    return {"count": count, "mean": mean, "var": m2 / count}


def shape_scores(raw, truncated, stats, cfg):
    """Missing-EOS penalty, running-stat normalisation (stats updated first) and clipping."""
    score = raw - cfg.missing_eos_penalty * truncated.astype(jnp.float32)
    stats = update_running_stats(stats, score) if cfg.normalize else stats
    if cfg.normalize:
        score = (score - stats["mean"]) / jnp.sqrt(stats["var"] + 1e-8)
    if cfg.clip > 0:
        score = jnp.clip(score, -cfg.clip, cfg.clip)
    return score, stats


def score_positions(action_mask: jax.Array) -> jax.Array:
    """One-hot ``[B, T-1]`` of each row's last action (the EOS, or the last token if cut)."""
    idx = last_token_index(action_mask)
    onehot = jax.nn.one_hot(idx, action_mask.shape[-1], dtype=jnp.float32)
    return onehot * (jnp.sum(action_mask, axis=-1, keepdims=True) > 0)
