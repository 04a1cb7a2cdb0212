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
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrlhf import config_sections as sections
from jaxrlhf import data as data_lib
from jaxrlhf import losses, rollout
from jaxrlhf.algorithms.base import Algorithm
from jaxrlhf.algorithms.common import apply_model, token_logps
from jaxrlhf.analysis import gradients
from jaxrlhf.distributed import gather
from jaxrlhf.rollout import score_positions
from jaxrlhf.sharding import activation_mesh, make_mesh, replicated
from jaxrlhf.trainer import harness, setup
from jaxrlhf.trainer.optim import make_optimizer


class RolloutError(RuntimeError):
    """A rollout produced non-finite rewards, values or advantages."""


# ----------------------------------------------------------------------------------------------
# Pure pieces (tested directly).
# ----------------------------------------------------------------------------------------------
def kl_coef_update(coef: float, kl: float, n_samples: int, *, target: float, horizon: int) -> float:
    """Adaptive KL controller of Ziegler et al. (2019): ``β ← β(1 + clip(KL/target − 1, ±0.2)·n/H)``."""
    err = float(np.clip(kl / target - 1.0, -0.2, 0.2))
    return float(coef * (1.0 + err * n_samples / horizon))


def ppo_losses(
    params,
    ref_params,
    batch,
    denoms,
    rng,
    *,
    graphdefs,
    cfg,
    kl_coef,
    temperature: float = 1.0,
    vocab_chunk: int = 0,
) -> tuple[jax.Array, dict]:
    """Clipped policy + value loss (+ entropy bonus, + optional KL loss) as global-token-mean contributions.

    ``batch`` holds a minibatch of the rollout: the sequence keys and the action arrays
    ``old_logprobs``, ``old_values``, ``advantages``, ``returns``, ``ref_logprobs`` (``[b, T-1]``);
    ``kl_coef`` is a scalar argument of the update (used when ``cfg.kl_mode == "loss"``); the
    policy is the sampling distribution, logits / ``temperature`` (``generation.temperature``), as
    in the score phase, so the ratio is exactly 1 at the first minibatch; ``vocab_chunk``:
    ``config.vocab_chunk`` (``algorithms.common.token_logps``).
    """
    del ref_params, rng
    actor_gd, critic_gd = graphdefs
    logps, mask, entropy = token_logps(
        actor_gd, params["actor"], batch, vocab_chunk=vocab_chunk, temperature=temperature, entropy=True
    )
    valid = mask > 0
    values = apply_model(critic_gd, params["critic"], batch)[:, :-1].astype(jnp.float32)
    tokens = denoms["tokens"]
    tsum = lambda x: losses.aggregate_loss(x, mask, "token_mean", global_denominator=tokens)

    pg = losses.ppo_policy_loss(logps, batch["old_logprobs"], batch["advantages"], clip_eps=cfg.clip_eps)
    pg = pg * batch["token_coef"]  # the coordinated variants' token weights (1 by default)
    vf = losses.ppo_value_loss(values, batch["old_values"], batch["returns"], clip_eps=cfg.value_clip_eps)
    loss = tsum(pg) + cfg.vf_coef * tsum(vf) - cfg.entropy_coef * tsum(entropy)
    kl_ref = losses.kl_penalty(logps, batch["ref_logprobs"], estimator=cfg.kl_estimator)
    if cfg.kl_mode == "loss":
        loss = loss + kl_coef * tsum(kl_ref)

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


def periodic_coefs(it, period: int, amplitude: float):
    """``(pos_coef, neg_coef)`` of the periodic variant (Wang et al.'s hPPO, whose exact formula the
    paper does not give; ours): ``1 ± amplitude * sin(2 pi it / period)`` for positive / negative
    advantage tokens, so the emphasis swings between positive and negative learning every
    ``period`` iterations; ``period`` 0: both 1."""
    if period <= 0:
        return 1.0, 1.0
    phase = amplitude * jnp.sin(2.0 * jnp.pi * it / period)
    return 1.0 + phase, 1.0 - phase


def sign_coefs(it, cfg):
    """``(pos_coef, neg_coef)`` at iteration ``it``: the fixed weights of positive- and
    negative-advantage tokens (``cfg.pos_coef`` / ``cfg.neg_coef``; 0 drops positive or negative
    learning, Wang et al.'s ablation) times the periodic variant's (``periodic_coefs``)."""
    pos, neg = periodic_coefs(it, cfg.period, cfg.amplitude)
    return cfg.pos_coef * pos, cfg.neg_coef * neg


def advantages_and_returns(rollout: dict, kl_coef: jax.Array, cfg, it=0) -> dict:
    """Per-token rewards (score at the last action, minus the KL penalty), GAE, whitening, and the
    coordinated variants' token weights (``cfg.coef_top/mid/bot``: cPPO; ``cfg.pos_coef`` /
    ``cfg.neg_coef``, times ``cfg.period`` / ``cfg.amplitude`` at iteration ``it``: positive and
    negative learning weighed, the periodic variant; ``losses.coordinated_token_weights``)."""
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
    pos, neg = sign_coefs(it, cfg)
    coef = losses.coordinated_token_weights(
        adv,
        mask,
        coef_top=cfg.coef_top,
        coef_mid=cfg.coef_mid,
        coef_bot=cfg.coef_bot,
        pos_coef=pos,
        neg_coef=neg,
    )
    return {
        "rewards": rewards,
        "advantages": adv,
        "raw_advantages": raw_adv,
        "returns": ret,
        "kl": kl,
        "token_coef": coef,
    }


# ----------------------------------------------------------------------------------------------
# Roles: actor, critic, reward (model or function), EMA reference; all on one mesh.
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Roles:
    actor_gd: Any
    critic_gd: Any
    actor_config: Any


def build_roles(config, mesh):
    actor_gd, actor_params, actor_cfg = setup.load_model(config, config.model, mesh)
    critic_gd, critic_params, _ = setup.load_model(
        config, config.critic.model, mesh, head="scalar", config_key="critic.model.path"
    )
    return Roles(actor_gd, critic_gd, actor_cfg), {"actor": actor_params, "critic": critic_params}


def optimizer_steps(pc) -> int:
    """Optimizer steps of a whole run: iterations x epochs x minibatches per rollout."""
    return pc.iterations * pc.epochs * (pc.rollout_batch_size // pc.minibatch_size)


def make_tx(config, params):
    """AdamW for the actor (``config.optim``) and the critic (``config.critic.optim``)."""
    total = optimizer_steps(config.ppo)
    actor_tx, actor_sched = make_optimizer(config.optim, total)
    critic_tx, _ = make_optimizer(config.critic.optim, total)
    labels = {k: jax.tree.map(lambda _, k=k: k, v) for k, v in params.items()}
    return optax.multi_transform({"actor": actor_tx, "critic": critic_tx}, labels), actor_sched


def actor_of(params):
    """``ref_of``: the reference mirrors the actor only."""
    return params["actor"]


# ----------------------------------------------------------------------------------------------
# Jitted phases.
# ----------------------------------------------------------------------------------------------
def kl_controller(pc):
    """``(coef, kl) -> next coef``: Ziegler et al.'s adaptive controller (``kl_target``,
    ``kl_horizon``) when ``adaptive_kl``, else the coefficient unchanged."""
    adaptive, target, horizon, n = pc.adaptive_kl, pc.kl_target, pc.kl_horizon, pc.rollout_batch_size
    if not adaptive:
        return lambda coef, kl: coef
    return lambda coef, kl: kl_coef_update(coef, kl, n, target=target, horizon=horizon)


def make_probe(actor_gd, cfg, mesh, temperature: float = 1.0, vocab_chunk: int = 0):
    """``probe(actor_params, minibatch, raw_advantages) -> metrics``: the clipped policy loss's
    gradient on one minibatch split into positive (A > 0) and negative (A < 0) tokens and the
    TOP/MID/BOT thirds of tokens by |A| with their mean raw advantage (``jaxrlhf.analysis.gradients``;
    the value loss is not part of the split)."""
    kw = dict(vocab_chunk=vocab_chunk, temperature=temperature)

    def probe(actor_params, batch, raw_adv):
        with activation_mesh(mesh):
            valid = (batch["loss_mask"][:, 1:] > 0).astype(jnp.float32)
            adv, n = batch["advantages"], jnp.maximum(jnp.sum(valid), 1.0)

            def surrogate(p, m):
                logps, _, _ = token_logps(actor_gd, p, batch, **kw)
                pg = losses.ppo_policy_loss(logps, batch["old_logprobs"], adv, clip_eps=cfg.clip_eps)
                return jnp.sum(m * pg * batch["token_coef"]) / n

            out = gradients.decompose_by_advantage(surrogate, actor_params, valid, adv, raw_adv)
        return out

    return jax.jit(probe)


def make_score_fn(actor_gd, critic_gd, mesh, temperature: float, vocab_chunk: int = 0):
    """``(params, ref_params, seq) -> rollout arrays``: old/ref log-probs ``[B, T-1]``, the action mask,
    the mean entropy and, with a critic (``critic_gd`` not None), its values (no GAE yet)."""
    kw = dict(vocab_chunk=vocab_chunk, temperature=temperature)

    def fn(params, ref_params, seq):
        with activation_mesh(mesh):
            old_lp, mask, entropy = token_logps(actor_gd, params["actor"], seq, entropy=True, **kw)
            ref_lp, _, _ = token_logps(actor_gd, ref_params, seq, **kw)
            out = {
                "old_logprobs": old_lp,
                "ref_logprobs": ref_lp,
                "action_mask": mask,
                "entropy": losses.masked_mean(entropy, mask),
            }
            if critic_gd is not None:
                values = apply_model(critic_gd, params["critic"], seq)[:, :-1].astype(jnp.float32)
                out["old_values"] = values
        return out

    return jax.jit(fn)


def make_update_fn(config, loss_fn, denominators, tx):
    """``(state, rollout, rng, kl_coef) -> (state, metrics[epochs * minibatches])``: a ``lax.scan``
    over epochs and shuffled minibatches of the generic train step; ``kl_coef`` is a scalar
    argument bound into the loss (never a batch column)."""
    pc = config.ppo
    n_mb = pc.rollout_batch_size // pc.minibatch_size

    def update(state, rollout_batch, rng, kl_coef):
        step_fn = setup.train_step_fn(
            config, functools.partial(loss_fn, kl_coef=kl_coef), denominators, tx, ref_of=actor_of
        )

        def epoch(state, key):
            if pc.shuffle_minibatches:
                perm = jax.random.permutation(key, pc.rollout_batch_size)
            else:
                perm = jnp.arange(pc.rollout_batch_size)
            idx = perm.reshape(n_mb, pc.minibatch_size)

            def minibatch(state, rows):
                return step_fn(state, jax.tree.map(lambda x: x[rows], rollout_batch))

            return jax.lax.scan(minibatch, state, idx)

        state, metrics = jax.lax.scan(epoch, state, jax.random.split(rng, pc.epochs))
        return state, jax.tree.map(lambda m: m.reshape(-1), metrics)

    return update


def jit_update(update, shardings, mesh):
    """Jits ``update(state, rollout, rng_data, kl_coef)`` with the state's shardings, donated state."""

    def fn(state, rollout_batch, rng, kl_coef):
        with activation_mesh(mesh):
            key = jax.random.wrap_key_data(state.rng)
            new_state, metrics = update(
                state.replace(rng=key), rollout_batch, jax.random.wrap_key_data(rng), kl_coef
            )
        return new_state.replace(rng=jax.random.key_data(new_state.rng)), metrics

    return jax.jit(
        fn,
        in_shardings=(shardings, None, None, None),
        out_shardings=(shardings, replicated(mesh)),
        donate_argnums=(0,),
    )


def validate(config) -> None:
    """The string choices of ``config.ppo`` (numeric ranges and divisibility: ``config_validation``)."""
    pc = config.ppo
    if pc.kl_mode not in ("reward", "loss"):
        raise ValueError(f"config.ppo.kl_mode={pc.kl_mode!r}; expected 'reward' or 'loss'")
    if pc.kl_estimator not in ("k1", "k2", "k3"):
        raise ValueError(f"config.ppo.kl_estimator={pc.kl_estimator!r}; expected k1, k2 or k3")


# ----------------------------------------------------------------------------------------------
# Driver: setup, then per iteration generate -> score -> advantages -> update.
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Phases:
    """The jitted phases of one PPO iteration and the reward source."""

    sampler: Any
    score: Any
    reward: Any
    shape: Any
    advantages: Any
    update: Any
    kl_control: Any
    probe: Any = None  # with config.analysis.every > 0: the gradient decomposition (make_probe)
    stability: Any = None


def build(config, mesh, tokenizer, prompts_ds):
    """``(roles, state, shardings, phases, schedule)``: every model, the sharded train state
    (actor + critic, reference = a copy of the actor) and the jitted phases."""
    pc, gc = config.ppo, config.generation
    roles, params = build_roles(config, mesh)
    params, frozen = setup.lora_split(config, params)  # LoRA: adapters trained, base frozen
    tx, schedule = make_tx(config, params)
    state, shardings = setup.make_state(
        tx, params, mesh, ref_of=actor_of, seed=config.seed, frozen=frozen,
        follow_reference=setup.reference_follows(config), guard=config.guard,
    )  # fmt: skip
    del params
    chunk = config.vocab_chunk
    loss_fn = functools.partial(
        ppo_losses,
        graphdefs=(roles.actor_gd, roles.critic_gd),
        cfg=pc,
        temperature=gc.temperature,
        vocab_chunk=chunk,
    )
    phases = Phases(
        sampler=rollout.config_sampler(
            roles.actor_gd,
            gc,
            tokenizer,
            mesh,
            setup.full_params(config, state.params, state.frozen)["actor"],
        ),
        score=make_score_fn(roles.actor_gd, roles.critic_gd, mesh, gc.temperature, chunk),
        reward=rollout.build_reward(config, mesh, tokenizer, prompts_ds),
        shape=jax.jit(
            lambda raw, truncated, stats: rollout.shape_scores(raw, truncated, stats, config.reward)
        ),
        advantages=jax.jit(lambda r, kl_coef, it: advantages_and_returns(r, kl_coef, pc, it)),
        update=jit_update(make_update_fn(config, loss_fn, token_denominators, tx), shardings, mesh),
        kl_control=kl_controller(pc),
    )
    if config.analysis.every > 0:
        phases.probe = make_probe(roles.actor_gd, pc, mesh, gc.temperature, chunk)
        phases.stability = gradients.TargetStability(state.params["actor"])
    return roles, state, shardings, phases, schedule


def check_finite(arrays: dict, it: int, then: str) -> None:
    """Raises ``RolloutError`` naming every non-finite array of ``arrays`` and what was not done."""
    finite = jax.device_get({k: jnp.all(jnp.isfinite(v)) for k, v in arrays.items()})
    bad = [k for k, ok in finite.items() if not ok]
    if bad:
        raise RolloutError(f"iteration {it}: non-finite {', '.join(bad)} in the rollout; stopping {then}")


def score_phase(ph: Phases, state, out, seq, host_prompts, side, mesh, it: int):
    """The actor/reference log-probs, values and the shaped score of one rollout; stops before GAE
    on any NaN. Returns ``(rollout, raw, new_reward_stats, sampling_dev)``."""
    r = ph.score(state.params, state.ref_params, seq)
    # The sampler's log-probs must equal the recomputed ones (same temperature): PPO's ratio is
    # then exactly 1 at the first minibatch, whatever the padding.
    sampling_dev = jnp.max(
        jnp.where(r["action_mask"] > 0, jnp.abs(out.shifted(out.logprobs) - r["old_logprobs"]), 0.0)
    )
    index = rollout.global_index(mesh, host_prompts["index"])
    raw = ph.reward(seq, host_prompts["prompt_ids"].shape[1], index)
    score, stats = ph.shape(raw, out.truncated, jax.tree.map(jnp.float32, side["reward_stats"]))
    r["score"] = score
    keys = [k for k in ("score", "old_values", "old_logprobs", "ref_logprobs") if k in r]
    check_finite({k: r[k] for k in keys}, it, "before GAE")
    return r, raw, stats, sampling_dev


def update_batch(seq, r, adv) -> dict:
    """The rollout arrays the update's minibatches are cut from."""
    keys = ("old_logprobs", "ref_logprobs", "old_values")
    return {
        **seq,
        **{k: r[k] for k in keys if k in r},
        "advantages": adv["advantages"],
        "returns": adv["returns"],
        "token_coef": adv["token_coef"],
    }


def iteration(config, ph: Phases, state, side: dict, host_prompts, mesh, it: int):
    """One PPO iteration: generate -> score -> advantages -> update; returns ``(state, side, metrics)``."""
    pc = config.ppo
    gen_rng, train_rng = jax.random.split(jax.random.fold_in(jax.random.key(config.seed + 1), it))
    # LoRA: the adapters applied unmerged over the frozen base (``setup.full_params``).
    view = state.replace(
        params=setup.full_params(config, state.params, state.frozen),
        ref_params=setup.reference_params(config, state, actor_of),
    )
    out, seq, t_gen = rollout.generate(ph.sampler, view.params["actor"], host_prompts, mesh, gen_rng)
    t0 = time.perf_counter()
    r, raw, stats, sampling_dev = score_phase(ph, view, out, seq, host_prompts, side, mesh, it)
    del view
    t_score = time.perf_counter() - t0
    kl_coef = jnp.float32(side["kl_coef"])
    adv = ph.advantages(r, kl_coef, jnp.float32(it))
    check_finite({k: adv[k] for k in ("advantages", "returns")}, it, "before the update")
    batch = update_batch(seq, r, adv)
    probed = probe_iteration(config, ph, state, batch, adv, it)
    t0 = time.perf_counter()
    state, metrics = ph.update(state, batch, jax.random.key_data(train_rng), kl_coef)
    metrics = jax.device_get(metrics)
    t_train = time.perf_counter() - t0

    m = rollout_metrics(r, adv, out, seq, raw, r["score"])
    m.update({f"train/{k}": float(np.mean(v)) for k, v in metrics.items()})
    m["train/first_minibatch_ratio_max_dev"] = float(metrics["ratio_max_dev"][0])
    m["train/first_minibatch_clipfrac"] = float(metrics["clipfrac"][0])
    m["rollout/sampling_logprob_max_dev"] = float(jax.device_get(sampling_dev))
    m["kl_coef"] = side["kl_coef"]
    n_tokens = float(np.sum(gather(out.response_mask)))
    m.update(phase_times(n_tokens, t_gen, t_score, t_train, pc.epochs))
    side = dict(side, reward_stats={k: float(v) for k, v in jax.device_get(stats).items()})
    side["kl_coef"] = ph.kl_control(side["kl_coef"], m["kl_ref/k1"])
    m.update(probed)
    return state, side, m


def probe_iteration(config, ph: Phases, state, batch: dict, adv: dict, it: int) -> dict[str, float]:
    """Every ``config.analysis.every`` iterations: the decomposition on the rollout's first
    ``minibatch_size`` rows at the pre-update actor (LoRA: the adapters' gradient) and the stability of the
    actor's update direction; ``{}`` otherwise."""
    if ph.probe is None or it % config.analysis.every:
        return {}
    rows = jnp.arange(config.ppo.minibatch_size)
    first = jax.tree.map(lambda x: x[rows], batch)
    actor = setup.full_params(config, state.params, state.frozen)["actor"]
    out = jax.device_get(ph.probe(actor, first, adv["raw_advantages"][rows]))
    return {**{k: float(v) for k, v in out.items()}, **ph.stability.update(state.params["actor"])}


def phase_times(n_tokens: float, t_gen: float, t_score: float, t_train: float, epochs: int) -> dict:
    """Seconds and tokens/s of the generate / score / train phases of one iteration."""
    return {
        "time/generate": t_gen,
        "time/score": t_score,
        "time/train": t_train,
        "perf/generate_tokens_per_s": n_tokens / t_gen,
        "perf/score_tokens_per_s": n_tokens / t_score,
        "perf/train_tokens_per_s": n_tokens * epochs / t_train,
        "perf/response_tokens": n_tokens,
    }


def run(config, workdir: str, algorithm) -> dict[str, Any]:
    """Runs ``config.ppo.iterations`` PPO iterations in ``workdir`` (resumes from its checkpoint)."""
    harness.start(config, algorithm)
    pc = config.ppo
    run_ = harness.Run(config, workdir, algorithm, total=pc.iterations)
    mesh = make_mesh(config.mesh)
    tokenizer = data_lib.load_tokenizer(config.tokenizer)
    prompts_ds, prompt_it = rollout.prompt_data(config, tokenizer, pc.rollout_batch_size)
    roles, state, shardings, ph, schedule = build(config, mesh, tokenizer, prompts_ds)
    side = {"reward_stats": {"count": 0.0, "mean": 0.0, "var": 1.0}, "kl_coef": float(pc.kl_coef)}
    with run_:
        side = {"data": prompt_it.get_state(), **side}
        start, state, side = run_.restore(
            state, shardings, side, required=tuple(side), check_side=lambda s: prompt_it.set_state(s["data"])
        )
        prompt_it.set_state(side.pop("data"))
        for it in range(start + 1, pc.iterations + 1):
            state, side, m = iteration(config, ph, state, side, next(prompt_it), mesh, it)
            run_.check_skips(state, it)
            m["lr"] = float(schedule(int(jax.device_get(state.step))))
            run_.logger.count_tokens(m["perf/response_tokens"], m["perf/response_tokens"])
            run_.log(it, m)
            if run_.end_iteration(it, state, dict(side, data=prompt_it.get_state())):
                break
    run_.result.update(state=state, side=side, roles=roles)
    run_.export(
        roles.actor_gd, state.params["actor"], None if state.frozen is None else actor_of(state.frozen)
    )
    return run_.result


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


ALGORITHM = Algorithm(
    name="ppo",
    data_kind="prompt",
    head=None,
    uses_reference=True,
    run=run,
    unit="iteration",
    sections={"ppo": sections.ppo, "ref": sections.ppo_ref, "analysis": sections.analysis},
    resumable_keys=("ppo.iterations",),
    validate=validate,
)
