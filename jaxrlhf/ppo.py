"""PPO with GAE: the recipe of Xu et al. (ICML 2024) — large batch, advantage normalization, EMA reference.

One iteration:

1. **generate** — sample responses for a global batch of prompts with the jitted KV-cache sampler;
2. **score** — one jitted call: the actor's log-probs (the "old" policy), the reference's log-probs,
   the critic's values and the reward model's score at the last real token (or a programmatic
   reward on the decoded text); rewards normalised by running statistics and clipped;
   a host check stops the iteration on any NaN **before** GAE;
3. **advantages** — per-token KL penalty (k1/k2/k3, fixed or adaptive coefficient) added to the
   rewards, ``losses.gae`` per token, advantages whitened over the **global** rollout batch;
4. **train** — one jitted call: ``lax.scan`` over epochs and minibatches of the generic train step
   (``jaxrlhf.trainer.step``: clipped policy and value losses, entropy bonus, token mean over the
   global minibatch, gradient accumulation, non-finite skip) with the EMA reference updated inside
   the step.

All arrays are ``[B, T-1]`` "action" arrays: position ``t`` is the prediction of token ``t+1`` of the
prompt+response sequence (``losses.shifted_logprobs``), and the value at ``t`` is the critic's output
at token ``t``.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrlhf import data as data_lib
from jaxrlhf import distributed, losses
from jaxrlhf import generation as gen_lib
from jaxrlhf.sharding import activation_mesh, make_mesh, replicated, shard_batch
from jaxrlhf.trainer import checkpoint
from jaxrlhf.trainer import state as state_lib
from jaxrlhf.trainer.algorithms import apply_model, last_token_index
from jaxrlhf.trainer.logger import Logger, quiet_libraries
from jaxrlhf.trainer.loop import (
    TooManySkips,
    check_resume_config,
    export_hf,
    gather,
    load_model,
    state_shardings,
)
from jaxrlhf.trainer.optim import make_optimizer
from jaxrlhf.trainer.step import make_train_step


class RolloutError(RuntimeError):
    """A rollout produced non-finite rewards, values or advantages."""


# ----------------------------------------------------------------------------------------------
# Pure pieces (tested directly).
# ----------------------------------------------------------------------------------------------
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


def score_positions(action_mask: jax.Array) -> jax.Array:
    """One-hot ``[B, T-1]`` of each row's last action (the EOS, or the last token if cut)."""
    idx = last_token_index(action_mask)
    onehot = jax.nn.one_hot(idx, action_mask.shape[-1], dtype=jnp.float32)
    return onehot * (jnp.sum(action_mask, axis=-1, keepdims=True) > 0)


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


def kl_coef_update(coef: float, kl: float, n_samples: int, *, target: float, horizon: int) -> float:
    """Adaptive KL controller of Ziegler et al. (2019): ``β ← β(1 + clip(KL/target − 1, ±0.2)·n/H)``."""
    err = float(np.clip(kl / target - 1.0, -0.2, 0.2))
    return float(coef * (1.0 + err * n_samples / horizon))


def ppo_losses(params, ref_params, batch, denoms, rng, *, graphdefs, cfg) -> tuple[jax.Array, dict]:
    """Clipped policy + value loss (+ entropy bonus, + optional KL loss) as global-token-mean contributions.

    ``batch`` holds a minibatch of the rollout: the sequence keys and the action arrays
    ``old_logprobs``, ``old_values``, ``advantages``, ``returns``, ``ref_logprobs`` (``[b, T-1]``).
    """
    del ref_params, rng
    actor_gd, critic_gd = graphdefs
    logits = apply_model(actor_gd, params["actor"], batch)
    logps, mask = losses.shifted_logprobs(logits, batch["input_ids"], batch["loss_mask"])
    valid = mask > 0
    values = apply_model(critic_gd, params["critic"], batch)[:, :-1].astype(jnp.float32)
    tokens = denoms["tokens"]
    tsum = lambda x: losses.aggregate_loss(x, mask, "token_mean", global_denominator=tokens)

    pg = losses.ppo_policy_loss(logps, batch["old_logprobs"], batch["advantages"], clip_eps=cfg.clip_eps)
    vf = losses.ppo_value_loss(values, batch["old_values"], batch["returns"], clip_eps=cfg.value_clip_eps)
    entropy = losses.entropy_from_logits(logits)[:, :-1]
    loss = tsum(pg) + cfg.vf_coef * tsum(vf) - cfg.entropy_coef * tsum(entropy)
    kl_ref = losses.kl_penalty(logps, batch["ref_logprobs"], estimator=cfg.kl_estimator)
    if cfg.kl_mode == "loss":
        loss = loss + batch["kl_coef"][0] * tsum(kl_ref)

    log_ratio = logps - batch["old_logprobs"]
    ratio = jnp.exp(log_ratio)
    v_clipped = jnp.abs(values - batch["old_values"]) > cfg.value_clip_eps
    return loss, {
        "policy_loss": tsum(pg),
        "value_loss": tsum(vf),
        "entropy": tsum(entropy),
        "approx_kl": tsum(0.5 * log_ratio**2),
        "clipfrac": tsum((jnp.abs(ratio - 1.0) > cfg.clip_eps).astype(jnp.float32)),
        "value_clipfrac": tsum(v_clipped.astype(jnp.float32)),
        "ratio_mean": tsum(ratio),
        "ratio_max_dev": jnp.max(jnp.where(valid, jnp.abs(ratio - 1.0), 0.0)),
        "kl_ref_loss_term": tsum(kl_ref),
    }


def token_denominators(batch: dict) -> dict:
    """Response tokens of the whole global minibatch: the token-mean denominator."""
    return {"tokens": losses.loss_denominator(batch["loss_mask"][:, 1:], "token_mean")}


def advantages_and_returns(rollout: dict, kl_coef: jax.Array, cfg) -> dict:
    """Per-token rewards (score at the last action, minus the KL penalty), GAE and whitening."""
    mask = rollout["action_mask"]
    valid = mask > 0
    kl = losses.kl_penalty(rollout["old_logprobs"], rollout["ref_logprobs"], estimator=cfg.kl_estimator)
    kl = jnp.where(valid, kl, 0.0)
    rewards = rollout["score"][:, None] * score_positions(mask)
    if cfg.kl_mode == "reward":
        rewards = rewards - kl_coef * kl
    adv, ret = losses.gae(rewards, rollout["old_values"], mask, gamma=cfg.gamma, lam=cfg.lam)
    raw_adv = adv
    if cfg.whiten_advantages:
        adv = losses.masked_whiten(adv, mask)
    adv = jnp.where(valid, adv, 0.0)
    return {"rewards": rewards, "advantages": adv, "raw_advantages": raw_adv, "returns": ret, "kl": kl}


# ----------------------------------------------------------------------------------------------
# Roles: actor, critic, reward (model or function), EMA reference; all on one mesh.
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Roles:
    actor_gd: Any
    critic_gd: Any
    actor_config: Any


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
    gd, params, _ = load_model(config, config.reward.model, mesh, head="scalar")

    @jax.jit
    def model_score(params, seq):
        with activation_mesh(mesh):
            scores = apply_model(gd, params, seq)
        idx = last_token_index(seq["attention_mask"])
        return jnp.take_along_axis(scores, idx[:, None], axis=-1)[:, 0].astype(jnp.float32)

    return lambda seq, prompt_len, index: model_score(params, seq)


def make_sampler(graphdef, gc, tokenizer, mesh, params):
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


def build_roles(config, mesh):
    actor_gd, actor_params, actor_cfg = load_model(config, config.model, mesh)
    critic_gd, critic_params, _ = load_model(config, config.critic.model, mesh, head="scalar")
    return Roles(actor_gd, critic_gd, actor_cfg), {"actor": actor_params, "critic": critic_params}


def make_tx(config, params):
    """AdamW for the actor (``config.optim``) and the critic (``config.critic.optim``)."""
    total = (
        config.ppo.iterations
        * config.ppo.epochs
        * (config.ppo.rollout_batch_size // config.ppo.minibatch_size)
    )
    actor_tx, actor_sched = make_optimizer(config.optim, total)
    critic_tx, _ = make_optimizer(config.critic.optim, total)
    labels = {k: jax.tree.map(lambda _, k=k: k, v) for k, v in params.items()}
    return optax.multi_transform({"actor": actor_tx, "critic": critic_tx}, labels), actor_sched


# ----------------------------------------------------------------------------------------------
# Jitted phases.
# ----------------------------------------------------------------------------------------------
def make_score_fn(roles: Roles, mesh, temperature: float):
    """``(params, ref_params, seq) -> rollout arrays``: old/ref log-probs, values (no GAE yet)."""

    def fn(params, ref_params, seq):
        with activation_mesh(mesh):
            logits = apply_model(roles.actor_gd, params["actor"], seq).astype(jnp.float32) / temperature
            old_lp, mask = losses.shifted_logprobs(logits, seq["input_ids"], seq["loss_mask"])
            ref_logits = apply_model(roles.actor_gd, ref_params, seq).astype(jnp.float32) / temperature
            ref_lp, _ = losses.shifted_logprobs(ref_logits, seq["input_ids"], seq["loss_mask"])
            values = apply_model(roles.critic_gd, params["critic"], seq)[:, :-1].astype(jnp.float32)
            entropy = losses.masked_mean(losses.entropy_from_logits(logits)[:, :-1], mask)
        return {
            "old_logprobs": old_lp,
            "ref_logprobs": ref_lp,
            "old_values": values,
            "action_mask": mask,
            "entropy": entropy,
        }

    return jax.jit(fn)


def shape_scores(raw, truncated, stats, cfg):
    """Missing-EOS penalty, running-stat normalisation (stats updated first) and clipping."""
    score = raw - cfg.missing_eos_penalty * truncated.astype(jnp.float32)
    stats = update_running_stats(stats, score) if cfg.normalize else stats
    if cfg.normalize:
        score = (score - stats["mean"]) / jnp.sqrt(stats["var"] + 1e-8)
    if cfg.clip > 0:
        score = jnp.clip(score, -cfg.clip, cfg.clip)
    return score, stats


def make_update_fn(step_fn, cfg, mesh):
    """``(state, rollout, rng) -> (state, metrics[epochs * minibatches])``: scans epochs, minibatches."""
    n_mb = cfg.rollout_batch_size // cfg.minibatch_size

    def update(state, rollout, rng):
        def epoch(state, key):
            perm = jax.random.permutation(key, cfg.rollout_batch_size) if cfg.shuffle_minibatches else None
            if perm is None:
                perm = jnp.arange(cfg.rollout_batch_size)
            idx = perm.reshape(n_mb, cfg.minibatch_size)

            def minibatch(state, rows):
                mb = jax.tree.map(lambda x: x[rows], rollout)
                return step_fn(state, mb)

            return jax.lax.scan(minibatch, state, idx)

        state, metrics = jax.lax.scan(epoch, state, jax.random.split(rng, cfg.epochs))
        return state, jax.tree.map(lambda m: m.reshape(-1), metrics)

    return update


def validate(config) -> None:
    """Checks every ``config.ppo`` setting up front, with messages naming the key."""
    pc = config.ppo
    for key in ("iterations", "rollout_batch_size", "minibatch_size", "epochs", "kl_horizon"):
        if pc[key] < 1:
            raise ValueError(f"config.ppo.{key} must be >= 1, got {pc[key]}")
    if pc.rollout_batch_size % pc.minibatch_size:
        raise ValueError(
            f"config.ppo.rollout_batch_size={pc.rollout_batch_size} must be a multiple of "
            f"config.ppo.minibatch_size={pc.minibatch_size}"
        )
    if pc.minibatch_size % config.micro_batches:
        raise ValueError(
            f"config.ppo.minibatch_size must be divisible by config.micro_batches={config.micro_batches}"
        )
    for key in ("clip_eps", "value_clip_eps", "kl_target"):
        if not pc[key] > 0:
            raise ValueError(f"config.ppo.{key} must be > 0, got {pc[key]}")
    for key in ("vf_coef", "entropy_coef", "kl_coef"):
        if pc[key] < 0:
            raise ValueError(f"config.ppo.{key} must be >= 0, got {pc[key]}")
    if not (0 <= pc.gamma <= 1 and 0 <= pc.lam <= 1):
        raise ValueError(f"config.ppo.gamma and lam must be in [0, 1], got {pc.gamma}, {pc.lam}")
    if pc.kl_mode not in ("reward", "loss"):
        raise ValueError(f"config.ppo.kl_mode={pc.kl_mode!r}; expected 'reward' or 'loss'")
    if pc.kl_estimator not in ("k1", "k2", "k3"):
        raise ValueError(f"config.ppo.kl_estimator={pc.kl_estimator!r}; expected k1, k2 or k3")
    for key in ("whiten_advantages", "adaptive_kl", "shuffle_minibatches"):
        if not isinstance(pc[key], bool):
            raise ValueError(f"config.ppo.{key} must be a bool, got {pc[key]!r}")
    if config.max_consecutive_skips < 1:
        raise ValueError(f"config.max_consecutive_skips must be >= 1, got {config.max_consecutive_skips}")


def jit_update(update, shardings, mesh):
    """Jits ``update(state, rollout, rng_data)`` with the state's shardings and a donated state."""

    def fn(state, rollout, rng):
        with activation_mesh(mesh):
            key = jax.random.wrap_key_data(state.rng)
            new_state, metrics = update(state.replace(rng=key), rollout, jax.random.wrap_key_data(rng))
        return new_state.replace(rng=jax.random.key_data(new_state.rng)), metrics

    return jax.jit(
        fn,
        in_shardings=(shardings, None, None),
        out_shardings=(shardings, replicated(mesh)),
        donate_argnums=(0,),
    )


# ----------------------------------------------------------------------------------------------
# Driver.
# ----------------------------------------------------------------------------------------------
def start_rollout_run(config, workdir: str, validate_fn, prompts_per_batch: int):
    """The common start of the rollout drivers (PPO, DPO-Iter): distributed init, config checks,
    mesh, tokenizer, the prompt dataset and this process's iterator over global prompt batches."""
    distributed.maybe_initialize()
    quiet_libraries()
    check_resume_config(workdir, config)
    validate_fn(config)
    mesh = make_mesh(config.mesh)
    tokenizer = data_lib.load_tokenizer(config.tokenizer)
    prompts_ds, _ = data_lib.build_datasets(config.data, tokenizer, "prompt")
    prompt_it = data_lib.BatchIterator(
        prompts_ds,
        prompts_per_batch,
        seed=config.data.seed,
        shuffle=config.data.shuffle,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    return mesh, tokenizer, prompts_ds, prompt_it


def decode_texts(tokenizer, ids: np.ndarray, mask: np.ndarray) -> list[str]:
    return [
        tokenizer.decode(row[m > 0].tolist(), skip_special_tokens=True)
        for row, m in zip(ids, mask, strict=True)
    ]


def run(config, workdir: str) -> dict[str, Any]:
    """Runs ``config.ppo.iterations`` PPO iterations in ``workdir`` (resumes from its checkpoint)."""
    pc, gc, rc = config.ppo, config.generation, config.reward

    # ---------------- mesh, data ----------------
    mesh, tokenizer, prompts_ds, prompt_it = start_rollout_run(
        config, workdir, validate, pc.rollout_batch_size
    )

    # ---------------- roles and state ----------------
    roles, params = build_roles(config, mesh)
    reward = build_reward(config, mesh, tokenizer, prompts_ds)
    tx, schedule = make_tx(config, params)
    ema = config.ref.ema_decay
    step_fn = make_train_step(
        lambda p, r, b, d, k: ppo_losses(p, r, b, d, k, graphdefs=(roles.actor_gd, roles.critic_gd), cfg=pc),
        token_denominators,
        tx,
        num_micro_batches=config.micro_batches,
        ema_decay=ema,
        ref_reset_every=config.ref.reset_every,
        ref_of=lambda p: p["actor"],
    )
    shardings = state_shardings(tx, params, mesh, with_ref=False)
    shardings = shardings.replace(ref_params=shardings.params["actor"])
    state = jax.jit(
        lambda p: state_lib.create(
            p,
            tx,
            ref_params=jax.tree.map(jnp.copy, p["actor"]),
            rng=jax.random.key_data(jax.random.key(config.seed)),
        ),
        out_shardings=shardings,
    )(params)
    del params
    train = jit_update(make_update_fn(step_fn, pc, mesh), shardings, mesh)

    sampler = make_sampler(roles.actor_gd, gc, tokenizer, mesh, state.params["actor"])
    score_fn = make_score_fn(roles, mesh, gc.temperature)
    adv_fn = jax.jit(lambda rollout, kl_coef: advantages_and_returns(rollout, kl_coef, pc))
    shape_fn = jax.jit(lambda raw, truncated, stats: shape_scores(raw, truncated, stats, rc))

    # ---------------- resume ----------------
    side = {"reward_stats": {"count": 0.0, "mean": 0.0, "var": 1.0}, "kl_coef": float(pc.kl_coef)}
    manager = checkpoint.make_manager(workdir, config.checkpoint)
    restored = checkpoint.restore(manager, checkpoint.abstract_like(state, shardings))
    start = 0
    if restored is not None:
        start, state, saved = restored
        prompt_it.set_state(saved["data"])
        side = {k: saved[k] for k in side}
    stop = checkpoint.StopSignal()
    log = Logger(workdir, pc.iterations, start, progress_bar=config.progress_bar)
    result: dict[str, Any] = {"interrupted": False, "history": []}
    it = start
    try:
        for it in range(start + 1, pc.iterations + 1):
            rng = jax.random.fold_in(jax.random.key(config.seed + 1), it)
            gen_rng, train_rng = jax.random.split(rng)
            host_prompts = next(prompt_it)
            prompts = shard_batch(mesh, {k: host_prompts[k] for k in ("prompt_ids", "prompt_mask")})

            # ---------------- generate ----------------
            t0 = time.perf_counter()
            out = sampler(state.params["actor"], prompts["prompt_ids"], prompts["prompt_mask"], gen_rng)
            seq = out.to_batch()
            jax.block_until_ready(seq)
            t_gen = time.perf_counter() - t0

            # ---------------- score ----------------
            t0 = time.perf_counter()
            rollout = score_fn(state.params, state.ref_params, seq)
            # The sampler's log-probs must equal the recomputed ones (same temperature): PPO's ratio
            # is then exactly 1 at the first minibatch, whatever the padding.
            sampling_dev = jnp.max(
                jnp.where(
                    rollout["action_mask"] > 0,
                    jnp.abs(out.shifted(out.logprobs) - rollout["old_logprobs"]),
                    0.0,
                )
            )
            index = gather(shard_batch(mesh, {"i": host_prompts["index"]})["i"])
            raw = reward(seq, prompts["prompt_ids"].shape[1], index)
            stats = jax.tree.map(jnp.float32, side["reward_stats"])
            score, stats = shape_fn(raw, out.truncated, stats)
            rollout["score"] = score
            # NaN guard: stop before GAE with a message naming what went wrong.
            finite = jax.device_get(
                {
                    k: jnp.all(jnp.isfinite(rollout[k]))
                    for k in ("score", "old_values", "old_logprobs", "ref_logprobs")
                }
            )
            bad = [k for k, ok in finite.items() if not ok]
            if bad:
                raise RolloutError(
                    f"PPO iteration {it}: non-finite {', '.join(bad)} in the rollout; stopping before GAE"
                )
            t_score = time.perf_counter() - t0

            # ---------------- advantages ----------------
            adv = adv_fn(rollout, jnp.float32(side["kl_coef"]))
            if not bool(
                jax.device_get(
                    jnp.all(jnp.isfinite(adv["advantages"])) & jnp.all(jnp.isfinite(adv["returns"]))
                )
            ):
                raise RolloutError(
                    f"PPO iteration {it}: non-finite advantages or returns; stopping before the update"
                )

            # ---------------- train ----------------
            t0 = time.perf_counter()
            kl_coef_arr = jnp.full((pc.rollout_batch_size,), side["kl_coef"], jnp.float32)
            batch_rollout = {
                **seq,
                "old_logprobs": rollout["old_logprobs"],
                "ref_logprobs": rollout["ref_logprobs"],
                "old_values": rollout["old_values"],
                "advantages": adv["advantages"],
                "returns": adv["returns"],
                "kl_coef": kl_coef_arr,
            }
            state, metrics = train(state, batch_rollout, jax.random.key_data(train_rng))
            metrics = jax.device_get(metrics)
            t_train = time.perf_counter() - t0
            consecutive = int(jax.device_get(state.consecutive_skips))
            if consecutive >= config.max_consecutive_skips:
                raise TooManySkips(
                    f"PPO iteration {it}: {consecutive} consecutive minibatch steps had a non-finite loss "
                    "or gradient; stopping without applying them"
                )

            # ---------------- metrics, controllers ----------------
            m = rollout_metrics(rollout, adv, out, seq, raw, score)
            kl_mean = m["kl_ref/k1"]
            if pc.adaptive_kl:
                side["kl_coef"] = kl_coef_update(
                    side["kl_coef"],
                    kl_mean,
                    pc.rollout_batch_size,
                    target=pc.kl_target,
                    horizon=pc.kl_horizon,
                )
            side["reward_stats"] = {k: float(v) for k, v in jax.device_get(stats).items()}
            m.update({f"train/{k}": float(np.mean(v)) for k, v in metrics.items()})
            m["train/first_minibatch_ratio_max_dev"] = float(metrics["ratio_max_dev"][0])
            m["train/first_minibatch_clipfrac"] = float(metrics["clipfrac"][0])
            m["rollout/sampling_logprob_max_dev"] = float(jax.device_get(sampling_dev))
            m["kl_coef"] = side["kl_coef"]
            m["lr"] = float(schedule(int(jax.device_get(state.step))))
            n_tokens = float(np.sum(gather(out.response_mask)))
            m.update({"time/generate": t_gen, "time/score": t_score, "time/train": t_train})
            m.update(
                {
                    "perf/generate_tokens_per_s": n_tokens / t_gen,
                    "perf/train_tokens_per_s": n_tokens * pc.epochs / t_train,
                    "perf/score_tokens_per_s": n_tokens / t_score,
                }
            )
            log.count_tokens(n_tokens, n_tokens)
            m = log.write(it, m, console=it % config.log_every == 0 or it == pc.iterations)
            result["history"].append(m)
            if it % config.checkpoint.every == 0 or stop.requested or it == pc.iterations:
                checkpoint.save(manager, it, state, {"data": prompt_it.get_state(), **side}, force=True)
            if stop.requested:
                result["interrupted"] = True
                break
    finally:
        manager.wait_until_finished()
        stop.restore_handlers()
        log.close()
    result.update(step=it, state=state, side=side, roles=roles)
    if config.export_hf and not result["interrupted"]:
        result["export_dir"] = export_hf(roles.actor_gd, state.params["actor"], os.path.join(workdir, "hf"))
    return result


def rollout_metrics(rollout, adv, out, seq, raw, score) -> dict[str, float]:
    """Reward, KL, value, advantage and length statistics of one rollout (host floats)."""
    mask = rollout["action_mask"]
    k3 = losses.kl_penalty(rollout["old_logprobs"], rollout["ref_logprobs"], estimator="k3")
    k1 = losses.kl_penalty(rollout["old_logprobs"], rollout["ref_logprobs"], estimator="k1")
    per_seq = lambda x: jnp.mean(jnp.sum(jnp.where(mask > 0, x, 0.0), axis=-1))
    values, returns = rollout["old_values"], adv["returns"]
    resid = jnp.where(mask > 0, returns - values, 0.0)
    var_ret = jnp.maximum(losses.masked_mean((returns - losses.masked_mean(returns, mask)) ** 2, mask), 1e-8)
    explained = 1.0 - losses.masked_mean((resid - losses.masked_mean(resid, mask)) ** 2, mask) / var_ret
    lengths = jnp.sum(out.response_mask, axis=-1)
    m = {
        "reward/raw_mean": jnp.mean(raw),
        "reward/raw_std": jnp.std(raw),
        "reward/normalized_mean": jnp.mean(score),
        "kl_ref/k1": per_seq(k1),
        "kl_ref/k3": per_seq(k3),
        "value/mean": losses.masked_mean(values, mask),
        "value/explained_variance": explained,
        "advantages/mean": losses.masked_mean(adv["raw_advantages"], mask),
        "advantages/std": jnp.sqrt(
            losses.masked_mean(
                (adv["raw_advantages"] - losses.masked_mean(adv["raw_advantages"], mask)) ** 2, mask
            )
        ),
        "returns/mean": losses.masked_mean(returns, mask),
        "returns/std": jnp.sqrt(losses.masked_mean((returns - losses.masked_mean(returns, mask)) ** 2, mask)),
        "response/length_mean": jnp.mean(lengths),
        "response/eos_rate": 1.0 - jnp.mean(out.truncated.astype(jnp.float32)),
        "policy/entropy": rollout["entropy"],
    }
    return {k: float(v) for k, v in jax.device_get(m).items()}
