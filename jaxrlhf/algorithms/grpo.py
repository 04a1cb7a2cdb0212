"""Critic-free policy optimisation: GRPO, Dr.GRPO, RLOO and REINFORCE++ (with DAPO's clip-higher and
GSPO's sequence ratio), on the rollout engine PPO uses, without a critic.

One iteration (``config.grpo``, docs/grpo.md):

1. **generate** — ``prompts_per_iteration`` prompts, each repeated ``samples_per_prompt`` (``G``)
   times in a row (``rollout.repeat_prompts``): a prompt's ``G`` samples are contiguous rows of the
   one global rollout batch, on any mesh and any number of processes;
2. **score** — one jitted call: the actor's log-probs (the "old" policy, at the sampling
   temperature), the reference's log-probs; the reward (model or programmatic) minus the
   missing-EOS penalty; a host check stops the iteration on any NaN before the advantages;
3. **advantages** — over the **global** batch, in one jitted call: ``losses.group_advantages``
   (``grpo | dr_grpo | rloo``) per sequence, or REINFORCE++ (per-token reward = score at the last
   action minus ``kl_coef`` x the per-token KL, ``losses.reinforce_pp_returns``, whitened over
   the batch); groups whose rewards are all equal are counted and, with ``filter_equal_groups``,
   masked out of the loss (shapes stay fixed);
4. **update** — one jitted call: ``lax.scan`` over epochs x minibatches of the generic train step
   (``losses.clipped_policy_loss`` with ``clip_eps``/``clip_eps_high`` and ``ratio_level``,
   ``losses.aggregate_loss`` with ``loss_agg`` over the global minibatch denominator, the KL to the
   reference as a loss term (not for ``reinforce_pp``, whose KL is in the reward), an optional
   entropy bonus), the EMA reference (``config.ref``) updated inside the step.

The train state holds ``params = {"actor": ...}`` and the reference copy of the actor; there is
no critic anywhere (not built, trained, sharded or checkpointed).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf import config_sections as sections
from jaxrlhf import data as data_lib
from jaxrlhf import losses, rollout
from jaxrlhf.algorithms.base import Algorithm
from jaxrlhf.algorithms.common import token_logps
from jaxrlhf.algorithms.ppo import actor_of, check_finite, jit_update, make_score_fn, phase_times
from jaxrlhf.analysis import gradients
from jaxrlhf.config_validation import Rule, check_rule
from jaxrlhf.distributed import gather
from jaxrlhf.rollout import score_positions
from jaxrlhf.sharding import activation_mesh, make_mesh
from jaxrlhf.trainer import harness, setup
from jaxrlhf.trainer.optim import make_optimizer

ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_pp")


# ----------------------------------------------------------------------------------------------
# Settings: every key of config.grpo read once, validated with the key named.
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Settings:
    """``config.grpo`` (+ ``generation.max_new_tokens``, ``generation.temperature``) as static values."""

    iterations: int
    prompts_per_iteration: int
    samples_per_prompt: int
    minibatch_size: int
    epochs: int
    shuffle_minibatches: bool
    estimator: str
    clip_eps: float
    clip_eps_high: float | None
    ratio_level: str
    loss_agg: str
    filter_equal_groups: bool
    kl_coef: float
    kl_estimator: str
    entropy_coef: float
    gamma: float
    max_tokens: int
    temperature: float
    vocab_chunk: int = 0  # config.vocab_chunk (algorithms.common.token_logps)

    @property
    def rollout_rows(self) -> int:
        """Sequences per iteration: ``prompts_per_iteration x samples_per_prompt``."""
        return self.prompts_per_iteration * self.samples_per_prompt

    @property
    def minibatches(self) -> int:
        return self.rollout_rows // self.minibatch_size

    @property
    def kl_in_reward(self) -> bool:
        """REINFORCE++ puts the KL penalty in the per-token reward; the others add a loss term."""
        return self.estimator == "reinforce_pp"


def settings(config) -> Settings:
    g, gen = config.grpo, config.generation
    high = g.clip_eps_high
    return Settings(
        iterations=g.iterations,
        prompts_per_iteration=g.prompts_per_iteration,
        samples_per_prompt=g.samples_per_prompt,
        minibatch_size=g.minibatch_size,
        epochs=g.epochs,
        shuffle_minibatches=g.shuffle_minibatches,
        estimator=g.estimator,
        clip_eps=float(g.clip_eps),
        clip_eps_high=None if high is None or high == 0 else float(high),
        ratio_level=g.ratio_level,
        loss_agg=g.loss_agg,
        filter_equal_groups=g.filter_equal_groups,
        kl_coef=float(g.kl_coef),
        kl_estimator=g.kl_estimator,
        entropy_coef=float(g.entropy_coef),
        gamma=float(g.gamma),
        max_tokens=gen.max_new_tokens,
        temperature=float(gen.temperature),
        vocab_chunk=config.vocab_chunk,
    )


RULES = (
    Rule("grpo.iterations", int, "[1, inf)"),
    Rule("grpo.prompts_per_iteration", int, "[1, inf)"),
    Rule("grpo.samples_per_prompt", int, "[2, inf)"),
    Rule("grpo.minibatch_size", int, "[1, inf)"),
    Rule("grpo.epochs", int, "[1, inf)"),
    Rule("grpo.shuffle_minibatches", bool),
    Rule("grpo.clip_eps", float, "(0, 1)"),
    Rule("grpo.clip_eps_high", float, "[0, inf) or None"),  # 0 / None: clip_eps (symmetric)
    Rule("grpo.filter_equal_groups", bool),
    Rule("grpo.kl_coef", float, "[0, inf)"),
    Rule("grpo.entropy_coef", float, "[0, inf)"),
    Rule("grpo.gamma", float, "[0, 1]"),
)
CHOICES = {
    "estimator": ESTIMATORS,
    "ratio_level": losses.RATIO_LEVELS,
    "loss_agg": ("token_mean", "seq_mean", "seq_sum_norm"),
    "kl_estimator": losses.KL_ESTIMATORS,
}


def validate(config) -> None:
    """Every ``config.grpo`` value, naming its key: ranges, choices, and that the rollout batch
    splits into minibatches and each minibatch into ``micro_batches``."""
    for rule in RULES:
        check_rule(config, rule)
    g = config.grpo
    for key, allowed in CHOICES.items():
        if g[key] not in allowed:
            raise ValueError(f"config.grpo.{key}={g[key]!r}; expected one of {', '.join(allowed)}")
    rows = g.prompts_per_iteration * g.samples_per_prompt
    if rows % g.minibatch_size:
        raise ValueError(
            f"config.grpo.minibatch_size={g.minibatch_size} must divide the rollout batch "
            f"grpo.prompts_per_iteration x grpo.samples_per_prompt = {rows}"
        )
    if g.minibatch_size % config.micro_batches:
        raise ValueError(
            f"config.grpo.minibatch_size={g.minibatch_size} must be a multiple of "
            f"config.micro_batches={config.micro_batches}"
        )


# ----------------------------------------------------------------------------------------------
# Pure pieces: advantages and the loss.
# ----------------------------------------------------------------------------------------------
def advantages(r: dict, score: jax.Array, kl_coef: jax.Array, s: Settings) -> dict:
    """Advantages ``[N, T-1]`` (0 where masked), the kept-row weights ``keep [N]`` and group stats.

    ``r`` holds the rollout's ``action_mask``, ``old_logprobs``, ``ref_logprobs`` (``[N, T-1]``)
    and ``score [N]`` the shaped reward, ``N = prompts x G`` with each prompt's ``G`` rows
    contiguous. Group estimators give one advantage per sequence, broadcast over its tokens;
    REINFORCE++ whitens its returns over the kept tokens of the whole batch.
    """
    mask = r["action_mask"]
    g = s.samples_per_prompt
    stats = losses.group_reward_stats(score, g)
    keep = jnp.ones_like(score)
    if s.filter_equal_groups:
        keep = jnp.repeat(1.0 - stats["all_equal"].astype(jnp.float32), g)
    kept_mask = mask * keep[:, None].astype(mask.dtype)
    kl = jnp.where(mask > 0, losses.kl_penalty(r["old_logprobs"], r["ref_logprobs"], s.kl_estimator), 0.0)
    if s.kl_in_reward:
        token_rewards = score[:, None] * score_positions(mask) - kl_coef * kl
        returns = losses.reinforce_pp_returns(token_rewards, mask, gamma=s.gamma)
        adv = losses.masked_whiten(returns, kept_mask)
        extra = {"returns": returns}
    else:
        seq_adv = losses.group_advantages(score, g, s.estimator)
        adv = seq_adv[:, None] * jnp.ones(mask.shape, jnp.float32)
        extra = {"sequence_advantages": seq_adv}
    return {
        "advantages": jnp.where(kept_mask > 0, adv, 0.0),
        "keep": keep,
        "group_std": stats["std"],
        "all_equal": stats["all_equal"],
        **extra,
    }


def denominators(batch: dict, *, s: Settings) -> dict:
    """Global-minibatch denominators: response tokens (metrics) and the ``loss_agg`` normaliser."""
    mask = batch["loss_mask"][:, 1:]
    max_tokens = s.max_tokens if s.loss_agg == "seq_sum_norm" else None
    return {
        "tokens": losses.loss_denominator(mask, "token_mean"),
        "loss": losses.loss_denominator(mask, s.loss_agg, max_tokens=max_tokens),
    }


def grpo_loss(params, ref_params, batch, denoms, rng, *, graphdef, s: Settings, kl_coef):
    """Clipped policy loss (+ KL to the reference, - entropy bonus) as global-minibatch contributions.

    ``batch``: the sequence keys (``loss_mask`` zero on filtered rows), ``old_logprobs``,
    ``ref_logprobs``, ``advantages`` ``[b, T-1]``; ``kl_coef`` a scalar argument of the update.
    """
    del ref_params, rng
    logps, mask, entropy = token_logps(
        graphdef, params["actor"], batch, vocab_chunk=s.vocab_chunk, temperature=s.temperature, entropy=True
    )
    agg = lambda x: losses.aggregate_loss(x, mask, s.loss_agg, global_denominator=denoms["loss"])
    tmean = lambda x: losses.aggregate_loss(x, mask, "token_mean", global_denominator=denoms["tokens"])
    pg, diag = losses.clipped_policy_loss(
        logps,
        batch["old_logprobs"],
        batch["advantages"],
        mask,
        clip_eps_low=s.clip_eps,
        clip_eps_high=s.clip_eps_high,
        ratio_level=s.ratio_level,
    )
    kl_ref = losses.kl_penalty(logps, batch["ref_logprobs"], estimator=s.kl_estimator)
    loss = agg(pg) - s.entropy_coef * agg(entropy)
    if not s.kl_in_reward:
        loss = loss + kl_coef * agg(kl_ref)
    log_ratio = jnp.where(mask > 0, logps - batch["old_logprobs"], 0.0)
    return loss, {
        "policy_loss": agg(pg),
        "kl_ref": tmean(kl_ref),
        "entropy": tmean(entropy),
        "approx_kl": tmean(0.5 * log_ratio**2),
        "clipfrac_low": tmean(diag["clipped_low"].astype(jnp.float32)),
        "clipfrac_high": tmean(diag["clipped_high"].astype(jnp.float32)),
        "ratio_mean": tmean(diag["ratio"]),
        # a max per micro-batch, summed over micro-batches: an upper bound of the minibatch's max
        "ratio_max_dev": jnp.max(jnp.where(mask > 0, jnp.abs(diag["ratio"] - 1.0), 0.0)),
    }


# ----------------------------------------------------------------------------------------------
# Jitted phases.
# ----------------------------------------------------------------------------------------------
def make_update_fn(config, s: Settings, loss_fn, tx):
    """``(state, rollout, rng, kl_coef) -> (state, metrics[epochs * minibatches])``: a ``lax.scan``
    over epochs and (shuffled) minibatches of the generic train step."""
    n, mb = s.rollout_rows, s.minibatch_size
    den = functools.partial(denominators, s=s)

    def update(state, batch, rng, kl_coef):
        step_fn = setup.train_step_fn(
            config, functools.partial(loss_fn, kl_coef=kl_coef), den, tx, ref_of=actor_of
        )

        def epoch(state, key):
            perm = jax.random.permutation(key, n) if s.shuffle_minibatches else jnp.arange(n)

            def minibatch(state, rows):
                return step_fn(state, jax.tree.map(lambda x: x[rows], batch))

            return jax.lax.scan(minibatch, state, perm.reshape(s.minibatches, mb))

        state, metrics = jax.lax.scan(epoch, state, jax.random.split(rng, s.epochs))
        return state, jax.tree.map(lambda m: m.reshape(-1), metrics)

    return update


def make_probe(graphdef, s: Settings, mesh):
    """``probe(actor_params, minibatch) -> metrics``: the clipped policy loss's gradient on one
    minibatch split into tokens with A > 0 / A < 0 and the TOP/MID/BOT thirds of tokens by |A|
    (``jaxrlhf.analysis.gradients``; the KL and entropy terms are not split)."""

    def probe(actor_params, batch):
        with activation_mesh(mesh):
            valid = (batch["loss_mask"][:, 1:] > 0).astype(jnp.float32)
            adv = batch["advantages"]
            adv_t = jnp.broadcast_to(adv[:, None], valid.shape) if adv.ndim == 1 else adv
            n = jnp.maximum(jnp.sum(valid), 1.0)

            def surrogate(p, m):
                logps, mask, _ = token_logps(
                    graphdef, p, batch, vocab_chunk=s.vocab_chunk, temperature=s.temperature
                )
                pg, _ = losses.clipped_policy_loss(
                    logps,
                    batch["old_logprobs"],
                    adv,
                    mask,
                    clip_eps_low=s.clip_eps,
                    clip_eps_high=s.clip_eps_high,
                    ratio_level=s.ratio_level,
                )
                return jnp.sum(m * pg) / n

            out = gradients.decompose_by_advantage(surrogate, actor_params, valid, adv_t, adv_t)
        return out

    return jax.jit(probe)


def probe_iteration(config, s: Settings, ph, view, trainable, batch: dict, it: int) -> dict[str, float]:
    """Every ``config.analysis.every`` iterations: the decomposition on the first minibatch at the
    pre-update actor (``view``; LoRA: the adapters' gradient) and the stability of the trainable actor's
    update direction; ``{}`` otherwise."""
    if ph.probe is None or it % config.analysis.every:
        return {}
    rows = jnp.arange(config.grpo.minibatch_size)
    out = jax.device_get(ph.probe(view.params["actor"], jax.tree.map(lambda x: x[rows], batch)))
    return {**{k: float(v) for k, v in out.items()}, **ph.stability.update(trainable)}


@dataclasses.dataclass
class Phases:
    """The jitted phases of one iteration and the reward source."""

    sampler: Any
    score: Any
    reward: Any
    advantages: Any
    update: Any
    probe: Any = None  # with config.analysis.every > 0: the gradient decomposition (make_probe)
    stability: Any = None


def build(config, s: Settings, mesh, tokenizer, prompts_ds):
    """``(graphdef, state, shardings, phases, schedule)``: the actor (no critic), the sharded train
    state (reference = a copy of the actor) and the jitted phases."""
    graphdef, actor, _ = setup.load_model(config, config.model, mesh)
    params, frozen = setup.lora_split(config, {"actor": actor})  # LoRA: adapters trained, base frozen
    tx, schedule = make_optimizer(config.optim, s.iterations * s.epochs * s.minibatches)
    state, shardings = setup.make_state(
        tx, params, mesh, ref_of=actor_of, seed=config.seed, frozen=frozen,
        follow_reference=setup.reference_follows(config), guard=config.guard,
    )  # fmt: skip
    del params, actor
    loss_fn = functools.partial(grpo_loss, graphdef=graphdef, s=s)
    phases = Phases(
        sampler=rollout.config_sampler(
            graphdef,
            config.generation,
            tokenizer,
            mesh,
            setup.full_params(config, state.params, state.frozen)["actor"],
        ),
        score=make_score_fn(graphdef, None, mesh, s.temperature, s.vocab_chunk),
        reward=rollout.build_reward(config, mesh, tokenizer, prompts_ds),
        advantages=jax.jit(lambda r, score, kl_coef: advantages(r, score, kl_coef, s)),
        update=jit_update(make_update_fn(config, s, loss_fn, tx), shardings, mesh),
    )
    if config.analysis.every > 0:
        phases.probe = make_probe(graphdef, s, mesh)
        phases.stability = gradients.TargetStability(state.params["actor"])
    return graphdef, state, shardings, phases, schedule


def score_phase(ph: Phases, state, out, seq, host_prompts, config, mesh, it: int):
    """Old/reference log-probs, the shaped score (reward minus the missing-EOS penalty) and the
    sampler-vs-recomputed log-prob deviation; stops on any NaN before the advantages."""
    r = ph.score(state.params, state.ref_params, seq)
    sampling_dev = jnp.max(
        jnp.where(r["action_mask"] > 0, jnp.abs(out.shifted(out.logprobs) - r["old_logprobs"]), 0.0)
    )
    index = rollout.global_index(mesh, host_prompts["index"])
    raw = ph.reward(seq, host_prompts["prompt_ids"].shape[1], index)
    score = raw - config.reward.missing_eos_penalty * out.truncated.astype(jnp.float32)
    r["score"] = score
    check_finite({k: r[k] for k in ("score", "old_logprobs", "ref_logprobs")}, it, "before the advantages")
    return r, raw, sampling_dev


def update_batch(seq: dict, r: dict, adv: dict) -> dict:
    """The arrays the minibatches are cut from; filtered rows get a zero ``loss_mask``."""
    keep = adv["keep"][:, None].astype(seq["loss_mask"].dtype)
    return {
        **seq,
        "loss_mask": seq["loss_mask"] * keep,
        "old_logprobs": r["old_logprobs"],
        "ref_logprobs": r["ref_logprobs"],
        "advantages": adv["advantages"],
    }


def iteration(config, s: Settings, ph: Phases, state, host_prompts, mesh, it: int):
    """One iteration: generate -> score -> advantages -> update; returns ``(state, metrics, rollout)``
    with ``rollout`` the host arrays of this iteration (score, advantages, keep, action mask)."""
    gen_rng, train_rng = jax.random.split(jax.random.fold_in(jax.random.key(config.seed + 1), it))
    prompts = rollout.repeat_prompts(host_prompts, s.samples_per_prompt)
    # LoRA: the adapters applied unmerged over the frozen base (``setup.full_params``).
    view = state.replace(
        params=setup.full_params(config, state.params, state.frozen),
        ref_params=setup.reference_params(config, state, actor_of),
    )
    out, seq, t_gen = rollout.generate(ph.sampler, view.params["actor"], prompts, mesh, gen_rng)
    t0 = time.perf_counter()
    r, raw, sampling_dev = score_phase(ph, view, out, seq, prompts, config, mesh, it)
    t_score = time.perf_counter() - t0
    kl_coef = jnp.float32(s.kl_coef)
    t0 = time.perf_counter()
    adv = ph.advantages(r, r["score"], kl_coef)
    check_finite({"advantages": adv["advantages"]}, it, "before the update")
    t_adv = time.perf_counter() - t0
    batch = update_batch(seq, r, adv)
    probed = probe_iteration(config, s, ph, view, state.params["actor"], batch, it)
    del view
    t0 = time.perf_counter()
    state, metrics = ph.update(state, batch, jax.random.key_data(train_rng), kl_coef)
    metrics = jax.device_get(metrics)
    t_train = time.perf_counter() - t0

    m = rollout_metrics(r, adv, out, raw, s)
    m.update({f"train/{k}": float(np.mean(v)) for k, v in metrics.items()})
    m["train/first_minibatch_ratio_max_dev"] = float(metrics["ratio_max_dev"][0])
    m["rollout/sampling_logprob_max_dev"] = float(jax.device_get(sampling_dev))
    n_tokens = float(np.sum(gather(out.response_mask)))
    m.update(phase_times(n_tokens, t_gen, t_score, t_train, s.epochs))
    m["time/advantages"] = t_adv
    m.update(probed)
    host = {k: gather(v) for k, v in {"score": r["score"], "action_mask": r["action_mask"], **adv}.items()}
    return state, m, host


def rollout_metrics(r: dict, adv: dict, out, raw, s: Settings) -> dict[str, float]:
    """Reward (overall and per group), group, KL-to-reference, advantage, length and entropy
    statistics of one rollout (host floats)."""
    mask = r["action_mask"]
    per_seq = lambda x: jnp.mean(jnp.sum(jnp.where(mask > 0, x, 0.0), axis=-1))
    kl = {k: losses.kl_penalty(r["old_logprobs"], r["ref_logprobs"], estimator=k) for k in ("k1", "k3")}
    lengths = jnp.sum(out.response_mask, axis=-1)
    all_equal = adv["all_equal"].astype(jnp.float32)
    m = {
        "reward/raw_mean": jnp.mean(raw),
        "reward/raw_std": jnp.std(raw),
        "reward/mean": jnp.mean(r["score"]),
        "reward/std": jnp.std(r["score"]),
        "reward/group_std_mean": jnp.mean(adv["group_std"]),
        "groups/all_equal_fraction": jnp.mean(all_equal),
        "groups/filtered": jnp.sum(all_equal) if s.filter_equal_groups else jnp.float32(0),
        "kl_ref/k1": per_seq(kl["k1"]),
        "kl_ref/k3": per_seq(kl["k3"]),
        "advantages/mean": losses.masked_mean(adv["advantages"], mask),
        "advantages/abs_mean": losses.masked_mean(jnp.abs(adv["advantages"]), mask),
        "response/length_mean": jnp.mean(lengths),
        "response/eos_rate": 1.0 - jnp.mean(out.truncated.astype(jnp.float32)),
        "policy/entropy": r["entropy"],
    }
    return {k: float(v) for k, v in jax.device_get(m).items()}


# ----------------------------------------------------------------------------------------------
# Driver.
# ----------------------------------------------------------------------------------------------
def run(config, workdir: str, algorithm) -> dict[str, Any]:
    """Runs ``config.grpo.iterations`` iterations in ``workdir`` (resumes from its checkpoint).

    ``result`` holds ``state``, ``graphdef``, ``history`` and ``last_rollout`` (host arrays of the
    last iteration: ``score [N]``, ``advantages [N, T-1]``, ``keep``, ``all_equal``, ...)."""
    harness.start(config, algorithm)
    s = settings(config)
    run_ = harness.Run(config, workdir, algorithm, total=s.iterations)
    mesh = make_mesh(config.mesh)
    tokenizer = data_lib.load_tokenizer(config.tokenizer)
    prompts_ds, prompt_it = rollout.prompt_data(config, tokenizer, s.prompts_per_iteration)
    graphdef, state, shardings, ph, schedule = build(config, s, mesh, tokenizer, prompts_ds)
    host = None
    with run_:
        start, state, side = run_.restore(
            state,
            shardings,
            {"data": prompt_it.get_state()},
            check_side=lambda x: prompt_it.set_state(x["data"]),
        )
        prompt_it.set_state(side["data"])
        for it in range(start + 1, s.iterations + 1):
            state, m, host = iteration(config, s, ph, state, next(prompt_it), mesh, it)
            run_.check_skips(state, it)
            m["lr"] = float(schedule(int(jax.device_get(state.step))))
            run_.logger.count_tokens(m["perf/response_tokens"], m["perf/response_tokens"])
            run_.log(it, m)
            if run_.end_iteration(it, state, {"data": prompt_it.get_state()}):
                break
    run_.result.update(state=state, graphdef=graphdef, last_rollout=host)
    run_.export(graphdef, state.params["actor"], None if state.frozen is None else actor_of(state.frozen))
    return run_.result


ALGORITHM = Algorithm(
    name="grpo",
    data_kind="prompt",
    head=None,
    uses_reference=True,
    run=run,
    unit="iteration",
    sections={"grpo": sections.grpo, "ref": sections.ref, "analysis": sections.analysis},
    resumable_keys=("grpo.iterations",),
    validate=validate,
)
