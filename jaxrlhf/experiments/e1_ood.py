r"""E1: the out-of-distribution counter-example of Xu et al. 2024, §4.1 (Theorem 4.1).

A prompt ``x`` has three responses ``y1, y2, y3``; the preference data holds only ``y1 ≻ y2``;
``y3`` is never seen. DPO's loss only looks at ``log π(y1) - log π(y2)``, so it is driven to 0 by
policies that put almost all their mass on ``y3``; RLHF (a Bradley-Terry reward model + the
KL-regularised objective that PPO optimises) has no reason to move mass to ``y3``.

Command (2 CPU cores, about 12 s wall time):
  python -m jaxrlhf.experiments.e1_ood --seeds=5 --out=docs/results/e1

Writes ``table.md``, ``results.json`` and ``pi_y3.png`` to ``--out``. ``--smoke`` runs a tiny size.

Part (a), analytic, against the reference ``π_ref`` (uniform by default):
  * The DPO loss at a policy ``π`` is ``-log σ(β [u - u_ref])`` with ``u = log π(y1) - log π(y2)``;
    it does not depend on ``π(y3)``. The script evaluates ``jaxrlhf.losses.dpo_loss`` on a grid over
    the 2-simplex in coordinates ``(π(y3), u)`` and reports the range of ``π(y3)`` in the
    near-optimal set ``{loss ≤ tol}`` and the loss at ``π = (1e-3, 1e-3·e^{-200}, ≈0.999)``.
  * The reward model is *tabular* (one scalar per response, initialised at 0, trained with
    ``bradley_terry_loss`` + L2): the gradient moves ``r(y1)`` up and ``r(y2)`` down by the same
    amount and never touches ``r(y3)``, so ``r(y3)`` stays at the mean of ``r(y1), r(y2)`` (0).
    The KL-regularised optimum ``π*(y) ∝ π_ref(y) exp(r(y)/β)`` is reported in closed form, also
    for the pessimistic choice ``r(y3) = r(y2)``.

Part (b), trained with gradient descent in JAX (Adam), seeds vary the policy's initialisation (the
reference is the initial policy, as SFT would be):
  * Policies whose parameters are SHARED by the 3 responses, over response features ``φ(y)``:
    ``linear``: ``softmax_y(θ · φ(y))``; ``mlp``: ``softmax_y(tanh(φ(y) W1 + b1) · w2)``.
    Scenario ``extrapolate``: ``φ(y1) = (1, 0)``, ``φ(y2) = (0, 1)``,
    ``φ(y3) = φ(y1) + α (φ(y1) - φ(y2))`` (``α = 1``): the unseen ``y3`` lies further along the
    chosen-minus-rejected direction (as a longer or more extreme answer would). For the linear
    policy ``∇_θ [log π(y1) - log π(y2)] = φ(y1) - φ(y2)`` whatever θ, so every step that widens the
    margin by δ also raises ``logit(y3) - logit(y1)`` by ``α δ``. Scenario ``orthogonal`` (control):
    one-hot features, i.e. a tabular policy in which ``y3`` shares nothing with the pair.
    "rare y3": a fixed logit offset of ``RARE_Y3_OFFSET`` on ``y3`` (the reference seldom says it).
  * DPO: ``dpo_loss`` on the single pair.
  * PPO: a reward model trained with ``bradley_terry_loss`` (tabular, or linear in ``φ`` as an
    ablation, which extrapolates to ``y3`` too); then PPO iterations with the exact expectation
    over the 3 responses instead of sampling: per-response reward
    ``r(y) - β·kl_penalty(log π_old(y), log π_ref(y), "k1")``, advantage = that minus its
    ``π_old`` expectation (no whitening), and ``ppo_policy_loss`` (clip 0.2) weighted by
    ``π_old(y)``, minimised for ``ppo_epochs`` Adam steps per iteration. Its fixed points are the
    KL-regularised optimum in the policy family, which the script also finds by direct ascent on
    the exact objective (column "exact KL-regularised optimum in the family").

Expected (paper): DPO raises ``π(y3)``, PPO keeps it near the reference. Measured (5 seeds): DPO
drives ``π(y3)`` to 1.00 (linear) / 0.70 (mlp) from ≈0.37; PPO with the tabular reward model stops
at the KL-regularised optimum: 0.64 for the linear policy (the family cannot raise ``π(y1)/π(y2)``
without raising ``π(y3)/π(y1)`` as much), 0.00 for the mlp policy; see ``docs/experiments_e1.md``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

# Runnable as a plain script from a checkout: the repository root holds the jaxrlhf package.
from jaxrlhf import losses


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Experiment settings; ``arg="smoke"`` gives the seconds-sized version used by the tests."""
    c = ml_collections.ConfigDict()
    c.seeds = 5
    c.ref_probs = (1 / 3, 1 / 3, 1 / 3)  # reference of the analytic part (a)
    c.beta = 0.1  # DPO β and PPO KL coefficient
    c.alpha = 1.0  # φ(y3) = φ(y1) + α (φ(y1) - φ(y2))
    c.init_scale = 0.3  # θ0 ~ N(0, init_scale²): the reference = initial policy
    c.mlp_hidden = 16  # hidden width of the "mlp" policy
    c.policy_lr = 0.05
    c.steps = 400  # DPO steps; PPO iterations (each of ppo_epochs Adam steps)
    c.ppo_epochs = 4
    c.clip_eps = 0.2
    c.rm_lr = 0.1
    c.rm_steps = 500
    c.rm_l2 = 0.01  # L2 on the reward model's weights keeps the reward gap finite
    c.grid = 200  # analytic grid resolution per axis
    c.near_opt_tol = 1e-3  # near-optimal DPO set: loss ≤ tol
    if arg == "smoke":
        c.seeds, c.steps, c.rm_steps, c.grid = 2, 120, 200, 50
    elif arg not in (None, "", "full"):
        raise ValueError(f"e1_ood.get_config: arg must be 'full' or 'smoke', got {arg!r}")
    return c


# ----------------------------------------------------------------------------------------------
# Part (a): analytic
# ----------------------------------------------------------------------------------------------


def dpo_loss_of_policy(logp: jax.Array, ref_logp: jax.Array, beta: float) -> jax.Array:
    """DPO loss on the single pair ``y1 ≻ y2`` for policies given by log-probabilities.

    Args:
      logp: ``[..., 3]`` policy log-probabilities of ``(y1, y2, y3)``.
      ref_logp: ``[3]`` reference log-probabilities.
      beta: DPO β.

    Returns:
      ``[...]`` losses (``jaxrlhf.losses.dpo_loss``).
    """
    flat = logp.reshape(-1, 3)
    n = flat.shape[0]
    out = losses.dpo_loss(
        flat[:, 0], flat[:, 1], jnp.full((n,), ref_logp[0]), jnp.full((n,), ref_logp[1]), beta=beta
    )
    return out.reshape(logp.shape[:-1])


def closed_form_rlhf(ref_probs: np.ndarray, rewards: np.ndarray, beta: float) -> np.ndarray:
    """KL-regularised optimum ``π*(y) ∝ π_ref(y) exp(r(y)/β)``; ``[3]`` in, ``[3]`` out."""
    logits = np.log(ref_probs) + np.asarray(rewards, np.float64) / beta
    p = np.exp(logits - logits.max())
    return p / p.sum()


def rlhf_objective(probs: np.ndarray, ref_probs: np.ndarray, rewards: np.ndarray, beta: float) -> float:
    """``E_π r - β KL(π ‖ π_ref)`` for a ``[3]`` policy (0·log 0 = 0)."""
    probs = np.asarray(probs, np.float64)
    nz = probs > 0
    kl = float(np.sum(probs[nz] * (np.log(probs[nz]) - np.log(ref_probs[nz]))))
    return float(np.dot(probs, rewards)) - beta * kl


def analytic(cfg: ml_collections.ConfigDict, rewards: np.ndarray) -> dict:
    """Part (a): the DPO loss over the simplex and the RLHF optimum for a tabular reward.

    Args:
      cfg: experiment config.
      rewards: ``[3]`` tabular Bradley-Terry rewards learned from ``y1 ≻ y2`` (``r(y3)`` untouched).
    """
    ref = np.asarray(cfg.ref_probs, np.float64)
    if ref.shape != (3,) or np.any(ref <= 0) or abs(ref.sum() - 1) > 1e-6:
        raise ValueError(f"e1_ood: ref_probs must be 3 positive numbers summing to 1, got {cfg.ref_probs}")
    ref_logp = jnp.log(jnp.asarray(ref, jnp.float32))
    beta = cfg.beta
    # Grid over the open simplex in coordinates (p3, u = log p1 - log p2): p1 = (1-p3) σ(u), p2 = (1-p3) σ(-u).
    p3 = np.linspace(0.001, 0.999, cfg.grid)
    u = np.linspace(-100.0, 300.0, cfg.grid)
    P3, U = np.meshgrid(p3, u, indexing="ij")  # [G, G]
    logp = np.stack(
        [np.log1p(-P3) + jax.nn.log_sigmoid(U), np.log1p(-P3) + jax.nn.log_sigmoid(-U), np.log(P3)], -1
    )  # [G, G, 3]
    loss = np.asarray(dpo_loss_of_policy(jnp.asarray(logp, jnp.float32), ref_logp, beta))  # [G, G]
    near = loss <= cfg.near_opt_tol
    # The loss is constant along p3 for fixed u: the spread over p3 at each u is rounding only.
    spread_over_p3 = float(np.max(loss.max(0) - loss.min(0)))
    # An explicit near-optimal policy with almost all its mass on y3.
    ood_logp = np.array([np.log(1e-3), np.log(1e-3) - 200.0, np.log1p(-1e-3)])
    ood_probs = np.exp(ood_logp)
    ood_loss = float(dpo_loss_of_policy(jnp.asarray(ood_logp, jnp.float32)[None], ref_logp, beta)[0])
    out = {
        "ref_probs": ref.tolist(),
        "beta": beta,
        "grid": {"p3": [float(p3[0]), float(p3[-1])], "u": [float(u[0]), float(u[-1])], "size": cfg.grid},
        "near_opt_tol": cfg.near_opt_tol,
        "near_opt_fraction_of_grid": float(near.mean()),
        "near_opt_max_pi_y3": float(P3[near].max()) if near.any() else None,
        "near_opt_min_pi_y3": float(P3[near].min()) if near.any() else None,
        "dpo_loss_max_spread_over_pi_y3": spread_over_p3,
        "ood_policy": {
            "probs": ood_probs.tolist(),
            "log_probs": ood_logp.tolist(),
            "dpo_loss": ood_loss,
            "rlhf_objective": rlhf_objective(ood_probs, ref, rewards, beta),
        },
        "tabular_rewards": np.asarray(rewards).tolist(),
    }
    mean_r3 = 0.5 * (rewards[0] + rewards[1])
    for name, r3, b in (
        ("r3_mean", mean_r3, beta),
        ("r3_eq_r2", rewards[1], beta),
        ("r3_mean_beta_x10", mean_r3, 10 * beta),
    ):
        r = np.array([rewards[0], rewards[1], r3])
        opt = closed_form_rlhf(ref, r, b)
        out[f"rlhf_optimum_{name}"] = {
            "beta": b,
            "rewards": r.tolist(),
            "probs": opt.tolist(),
            "rlhf_objective": rlhf_objective(opt, ref, r, b),
            "dpo_loss": float(
                dpo_loss_of_policy(jnp.asarray(np.log(opt), jnp.float32)[None], ref_logp, b)[0]
            ),
        }
    return out


# ----------------------------------------------------------------------------------------------
# Part (b): trained policies with shared parameters
# ----------------------------------------------------------------------------------------------

SCENARIOS = ("extrapolate", "orthogonal")


def features(scenario: str, alpha: float) -> np.ndarray:
    """Response features ``φ`` ``[3, d]`` (rows y1, y2, y3) of the policy ``softmax(φ θ)``."""
    if scenario == "extrapolate":
        f1, f2 = np.array([1.0, 0.0]), np.array([0.0, 1.0])
        return np.stack([f1, f2, f1 + alpha * (f1 - f2)]).astype(np.float32)
    if scenario == "orthogonal":
        return np.eye(3, dtype=np.float32)
    raise ValueError(f"e1_ood: scenario must be one of {SCENARIOS}, got {scenario!r}")


POLICIES = ("linear", "mlp")


def policy_logits(theta: dict, phi: jax.Array, bias: jax.Array) -> jax.Array:
    """Logits ``[3]`` of the 3 responses; every parameter is shared by all of them.

    Args:
      theta: ``{"w": [d]}`` (linear, ``φ θ``) or ``{"W1": [d, H], "b1": [H], "w2": [H]}``
        (one hidden tanh layer, ``tanh(φ W1 + b1) w2``).
      phi: ``[3, d]`` response features.
      bias: ``[3]`` fixed (untrained) logit offsets.
    """
    if "W1" in theta:
        hidden = jnp.tanh(phi @ theta["W1"] + theta["b1"])  # [3, H]
        return hidden @ theta["w2"] + bias
    return phi @ theta["w"] + bias


def init_policy(kind: str, dim: int, seed: int, cfg: ml_collections.ConfigDict) -> dict:
    """Random initial parameters (= the reference policy) for ``kind`` in :data:`POLICIES`."""
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    if kind == "linear":
        return {"w": cfg.init_scale * jax.random.normal(k1, (dim,))}
    if kind == "mlp":
        h = cfg.mlp_hidden
        return {
            "W1": jax.random.normal(k1, (dim, h)),
            "b1": 0.5 * jax.random.normal(k2, (h,)),
            "w2": cfg.init_scale * jax.random.normal(k3, (h,)) / np.sqrt(h),
        }
    raise ValueError(f"e1_ood: policy must be one of {POLICIES}, got {kind!r}")


def train_reward_model(psi: jax.Array, cfg: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array]:
    """Linear reward ``r = ψ w`` trained with ``bradley_terry_loss`` on ``y1 ≻ y2`` (+ L2 on ``w``).

    Args:
      psi: ``[3, d]`` reward features (identity = tabular reward).
      cfg: experiment config.

    Returns:
      ``([3] rewards, [rm_steps] BT losses)``; ``w`` starts at 0.
    """
    opt = optax.adam(cfg.rm_lr)

    def loss_fn(w):
        r = psi @ w  # [3]
        bt = losses.bradley_terry_loss(r[:1], r[1:2])[0]
        return bt + 0.5 * cfg.rm_l2 * jnp.sum(w**2), bt

    def step(carry, _):
        w, s = carry
        (_, bt), g = jax.value_and_grad(loss_fn, has_aux=True)(w)
        upd, s = opt.update(g, s, w)
        return (optax.apply_updates(w, upd), s), bt

    w0 = jnp.zeros((psi.shape[1],), jnp.float32)
    (w, _), hist = jax.lax.scan(step, (w0, opt.init(w0)), None, length=cfg.rm_steps)
    return psi @ w, hist


def train_dpo(
    theta0: jax.Array, phi: jax.Array, bias: jax.Array, cfg: ml_collections.ConfigDict
) -> tuple[jax.Array, jax.Array]:
    """DPO on the single pair from ``θ0`` (also the reference).

    Returns:
      ``([steps + 1, 3] policy probabilities, [steps] DPO losses)``.
    """
    ref_logp = jax.nn.log_softmax(policy_logits(theta0, phi, bias))  # [3]
    opt = optax.adam(cfg.policy_lr)

    def loss_fn(theta):
        logp = jax.nn.log_softmax(policy_logits(theta, phi, bias))  # [3]
        return losses.dpo_loss(logp[:1], logp[1:2], ref_logp[:1], ref_logp[1:2], beta=cfg.beta)[0]

    def step(carry, _):
        theta, s = carry
        loss, g = jax.value_and_grad(loss_fn)(theta)
        upd, s = opt.update(g, s, theta)
        theta = optax.apply_updates(theta, upd)
        return (theta, s), (jax.nn.softmax(policy_logits(theta, phi, bias)), loss)

    _, (probs, hist) = jax.lax.scan(step, (theta0, opt.init(theta0)), None, length=cfg.steps)
    return jnp.concatenate([jnp.exp(ref_logp)[None], probs]), hist


def train_ppo(
    theta0: jax.Array, phi: jax.Array, bias: jax.Array, rewards: jax.Array, cfg: ml_collections.ConfigDict
) -> tuple[jax.Array, jax.Array]:
    """PPO with a KL-in-reward penalty and the exact expectation over the 3 responses.

    Each iteration: ``π_old = π_θ``; per-response reward ``r(y) - β k1(y)`` with
    ``k1 = kl_penalty(log π_old, log π_ref, "k1")``; advantage = that minus its ``π_old``
    expectation (the exact value); then ``ppo_epochs`` Adam steps on
    ``Σ_y π_old(y) ppo_policy_loss(log π_θ(y), log π_old(y), A(y))``.

    Args:
      theta0: initial parameters (the reference policy), see :func:`policy_logits`.
      phi: ``[3, d]`` policy features.
      rewards: ``[3]`` reward-model scores.
      cfg: experiment config.

    Returns:
      ``([steps + 1, 3] policy probabilities, [steps] KL(π ‖ π_ref))``.
    """
    ref_logp = jax.nn.log_softmax(policy_logits(theta0, phi, bias))  # [3]
    opt = optax.adam(cfg.policy_lr)

    def surrogate(theta, old_logp, adv, w_old):
        logp = jax.nn.log_softmax(policy_logits(theta, phi, bias))  # [3]
        per = losses.ppo_policy_loss(logp[None], old_logp[None], adv[None], clip_eps=cfg.clip_eps)[0]  # [3]
        return jnp.sum(w_old * per)

    def iteration(carry, _):
        theta, s = carry
        old_logp = jax.nn.log_softmax(policy_logits(theta, phi, bias))  # [3]
        w_old = jnp.exp(old_logp)
        kl = losses.kl_penalty(old_logp[None], ref_logp[None], "k1")[0]  # [3]
        shaped = rewards - cfg.beta * kl
        adv = shaped - jnp.sum(w_old * shaped)  # [3], exact baseline

        def epoch(c, _):
            th, st = c
            g = jax.grad(surrogate)(th, old_logp, adv, w_old)
            upd, st = opt.update(g, st, th)
            return (optax.apply_updates(th, upd), st), None

        (theta, s), _ = jax.lax.scan(epoch, (theta, s), None, length=cfg.ppo_epochs)
        logp = jax.nn.log_softmax(policy_logits(theta, phi, bias))
        return (theta, s), (jnp.exp(logp), jnp.sum(jnp.exp(logp) * (logp - ref_logp)))

    _, (probs, kls) = jax.lax.scan(iteration, (theta0, opt.init(theta0)), None, length=cfg.steps)
    return jnp.concatenate([jnp.exp(ref_logp)[None], probs]), kls


RARE_Y3_OFFSET = -3.0  # fixed logit offset of y3: the reference (SFT) policy rarely says y3

METHODS = (
    # (row name, scenario, policy, method, reward-model features, β multiplier of cfg.beta, y3 logit offset)
    ("DPO", "extrapolate", "linear", "dpo", None, 1.0, 0.0),
    ("PPO (tabular RM)", "extrapolate", "linear", "ppo", "tabular", 1.0, 0.0),
    ("PPO (RM linear in φ)", "extrapolate", "linear", "ppo", "shared", 1.0, 0.0),
    ("DPO", "extrapolate", "linear", "dpo", None, 10.0, 0.0),
    ("PPO (tabular RM)", "extrapolate", "linear", "ppo", "tabular", 10.0, 0.0),
    ("DPO", "extrapolate", "linear", "dpo", None, 1.0, RARE_Y3_OFFSET),
    ("PPO (tabular RM)", "extrapolate", "linear", "ppo", "tabular", 1.0, RARE_Y3_OFFSET),
    ("DPO", "extrapolate", "mlp", "dpo", None, 1.0, 0.0),
    ("PPO (tabular RM)", "extrapolate", "mlp", "ppo", "tabular", 1.0, 0.0),
    ("DPO", "orthogonal", "linear", "dpo", None, 1.0, 0.0),
    ("PPO (tabular RM)", "orthogonal", "linear", "ppo", "tabular", 1.0, 0.0),
)


def exact_rlhf_optimum(
    theta0: jax.Array, phi: jax.Array, bias: jax.Array, rewards: jax.Array, beta: float, steps: int = 3000
) -> jax.Array:
    """Maximises the exact ``E_π r - β KL(π ‖ π_ref)`` over ``θ`` (Adam): the optimum in the family.

    Returns:
      ``[3]`` probabilities of the best policy ``softmax(φ θ)`` found from ``θ0``.
    """
    ref_logp = jax.nn.log_softmax(policy_logits(theta0, phi, bias))
    opt = optax.adam(0.05)

    def neg_j(theta):
        logp = jax.nn.log_softmax(policy_logits(theta, phi, bias))
        p = jnp.exp(logp)
        return -(jnp.sum(p * rewards) - beta * jnp.sum(p * (logp - ref_logp)))

    def step(carry, _):
        theta, s = carry
        g = jax.grad(neg_j)(theta)
        upd, s = opt.update(g, s, theta)
        return (optax.apply_updates(theta, upd), s), None

    (theta, _), _ = jax.lax.scan(step, (theta0, opt.init(theta0)), None, length=steps)
    return jax.nn.softmax(policy_logits(theta, phi, bias))


def run(cfg: ml_collections.ConfigDict) -> dict:
    """Runs parts (a) and (b); returns the results dict written to ``results.json``."""
    t0 = time.time()
    rm_tab, rm_tab_hist = train_reward_model(jnp.eye(3), cfg)
    rm_tab = np.asarray(rm_tab, np.float64)
    res = {"config": cfg.to_dict(), "analytic": analytic(cfg, rm_tab), "runs": []}
    res["analytic"]["tabular_rm_final_bt_loss"] = float(rm_tab_hist[-1])
    jitted = {}
    for name, scenario, policy, method, rm_kind, beta_mult, y3_offset in METHODS:
        if beta_mult not in jitted:  # one set of jitted functions per β (they retrace per shape only)
            rcfg = ml_collections.ConfigDict(cfg.to_dict())
            rcfg.beta = cfg.beta * beta_mult
            jitted[beta_mult] = (
                rcfg,
                jax.jit(functools.partial(train_dpo, cfg=rcfg)),
                jax.jit(functools.partial(train_ppo, cfg=rcfg)),
                jax.jit(functools.partial(exact_rlhf_optimum, beta=rcfg.beta)),
            )
        rcfg, dpo_j, ppo_j, opt_j = jitted[beta_mult]
        phi = jnp.asarray(features(scenario, cfg.alpha))
        bias = jnp.array([0.0, 0.0, y3_offset], jnp.float32)  # fixed, not trained
        rewards = None
        if method == "ppo":
            psi = jnp.eye(3) if rm_kind == "tabular" else phi
            rewards, _ = train_reward_model(psi, cfg)
        curves, extras, optima = [], [], []
        for seed in range(cfg.seeds):
            theta0 = init_policy(policy, phi.shape[1], seed, cfg)
            if method == "dpo":
                probs, hist = dpo_j(theta0, phi, bias)
            else:
                probs, hist = ppo_j(theta0, phi, bias, rewards)
                optima.append(np.asarray(opt_j(theta0, phi, bias, rewards), np.float64))
            curves.append(np.asarray(probs, np.float64))
            extras.append(float(hist[-1]))
        curves = np.stack(curves)  # [S, steps + 1, 3]
        final, ref = curves[:, -1], curves[:, 0]
        res["runs"].append(
            {
                "name": name,
                "scenario": scenario,
                "method": method,
                "policy": policy,
                "reward_model": rm_kind,
                "beta": rcfg.beta,
                "y3_logit_offset": y3_offset,
                "family_rlhf_optimum_probs_mean": np.mean(optima, 0).tolist() if optima else None,
                "rewards": None if rewards is None else np.asarray(rewards).tolist(),
                "final_probs_mean": final.mean(0).tolist(),
                "final_probs_std": final.std(0, ddof=1).tolist(),
                "ref_probs_mean": ref.mean(0).tolist(),
                "ref_probs_std": ref.std(0, ddof=1).tolist(),
                "final_pi_y3_minus_ref_mean": float((final[:, 2] - ref[:, 2]).mean()),
                "final_pi_y3_minus_ref_std": float((final[:, 2] - ref[:, 2]).std(ddof=1)),
                "final_dpo_loss" if method == "dpo" else "final_kl_to_ref": extras,
                "pi_y3_curve_mean": curves[:, :, 2].mean(0).tolist(),
                "pi_y3_curve_std": curves[:, :, 2].std(0, ddof=1).tolist(),
            }
        )
    res["wall_time_s"] = time.time() - t0
    res["hardware"] = (
        f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), jax {jax.__version__}"
    )
    return res


# ----------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------


def _pm(m: float, s: float) -> str:
    return f"{m:.3f} ± {s:.3f}"


def table_markdown(res: dict) -> str:
    """The results table (markdown)."""
    a = res["analytic"]
    lines = [
        f"E1 (Xu et al. 2024 §4.1): final policy after {res['config']['steps']} steps, mean ± sample std (ddof 1) over "
        f"{res['config']['seeds']} seeds (seeds vary θ0; the reference is the initial policy). "
        f"β = {res['config']['beta']} unless stated, α = {res['config']['alpha']}. Wall time {res['wall_time_s']:.1f} s "
        f"on {res['hardware']}.",
        "",
        "| scenario | method | β | rewards r(y1), r(y2), r(y3) | final π(y1) | final π(y2) | final π(y3) "
        "| reference π(y3) | π(y3) − ref | π(y3) at the exact KL-regularised optimum in the family |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["runs"]:
        m, s = r["final_probs_mean"], r["final_probs_std"]
        fo = (
            "—"
            if r["family_rlhf_optimum_probs_mean"] is None
            else f"{r['family_rlhf_optimum_probs_mean'][2]:.3f}"
        )
        rw = "—" if r["rewards"] is None else ", ".join(f"{x:+.2f}" for x in r["rewards"])
        lines.append(
            f"| {_panel(r)} | {r['name']} | {r['beta']:g} | {rw} | {_pm(m[0], s[0])} | {_pm(m[1], s[1])} | "
            f"{_pm(m[2], s[2])} | {_pm(r['ref_probs_mean'][2], r['ref_probs_std'][2])} | "
            f"{r['final_pi_y3_minus_ref_mean']:+.3f} ± {r['final_pi_y3_minus_ref_std']:.3f} | {fo} |"
        )
    o = a["ood_policy"]
    lines += [
        "",
        f"Analytic part, reference π_ref = ({', '.join(f'{x:.3f}' for x in a['ref_probs'])}), β = {a['beta']}:",
        "",
        "| policy | π(y1) | π(y2) | π(y3) | DPO loss | E r − β KL (tabular RM, r(y3) = mean) |",
        "|---|---|---|---|---|---|",
        f"| OOD: log π(y2) = log π(y1) − 200 | {o['probs'][0]:.3g} | {o['probs'][1]:.3g} | "
        f"{o['probs'][2]:.4f} | {o['dpo_loss']:.3g} | {o['rlhf_objective']:.4f} |",
    ]
    for key, label in (
        ("rlhf_optimum_r3_mean", "RLHF optimum, r(y3) = mean(r1, r2)"),
        ("rlhf_optimum_r3_eq_r2", "RLHF optimum, r(y3) = r(y2)"),
        (
            "rlhf_optimum_r3_mean_beta_x10",
            "RLHF optimum, r(y3) = mean(r1, r2), β×10 (loss and objective at β×10)",
        ),
    ):
        q = a[key]
        obj = rlhf_objective(
            np.array(q["probs"]),
            np.array(a["ref_probs"]),
            np.array(a["rlhf_optimum_r3_mean"]["rewards"]),
            q["beta"],
        )
        lines.append(
            f"| {label} | {q['probs'][0]:.4f} | {q['probs'][1]:.3g} | {q['probs'][2]:.3g} | "
            f"{q['dpo_loss']:.3g} | {obj:.4f} |"
        )
    lines += [
        "",
        f"Tabular Bradley-Terry rewards (L2 {res['config']['rm_l2']}): "
        f"{', '.join(f'{x:+.3f}' for x in a['tabular_rewards'])}. On a {a['grid']['size']}² grid over "
        f"(π(y3) ∈ [{a['grid']['p3'][0]}, {a['grid']['p3'][1]}], log π(y1)/π(y2) ∈ [{a['grid']['u'][0]:g}, "
        f"{a['grid']['u'][1]:g}]), the near-optimal DPO set (loss ≤ {a['near_opt_tol']:g}) is "
        f"{100 * a['near_opt_fraction_of_grid']:.1f}% of the grid and spans π(y3) ∈ "
        f"[{a['near_opt_min_pi_y3']:.3f}, {a['near_opt_max_pi_y3']:.3f}]; at fixed log π(y1)/π(y2) the loss "
        f"varies by at most {a['dpo_loss_max_spread_over_pi_y3']:.2g} across π(y3).",
    ]
    return "\n".join(lines) + "\n"


def _panel(run: dict) -> str:
    return f"{run['scenario']}, {run['policy']} policy" + (
        ", rare y3 in the reference" if run["y3_logit_offset"] else ""
    )


def plot(res: dict, path: str) -> None:
    """PNG of π(y3) against step (mean ± std band), one panel per scenario/reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys(_panel(r) for r in res["runs"]))
    ncol = min(2, len(panels))
    nrow = -(-len(panels) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(6 * ncol, 4 * nrow), sharey=True, squeeze=False)
    axes = axes.reshape(-1)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    for ax, panel in zip(axes[: len(panels)], panels, strict=True):
        runs = [r for r in res["runs"] if _panel(r) == panel]
        for r in runs:
            m, s = np.array(r["pi_y3_curve_mean"]), np.array(r["pi_y3_curve_std"])
            x = np.arange(len(m))
            ax.plot(x, m, ls="-" if r["method"] == "dpo" else "-.", label=f"{r['name']} (β={r['beta']:g})")
            ax.fill_between(x, m - s, m + s, alpha=0.25)
        ax.axhline(runs[0]["ref_probs_mean"][2], color="k", ls="--", lw=1, label="reference π(y3)")
        ax.set_title(panel)
        ax.set_xlabel("step (DPO) / iteration (PPO)")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=7)
    for ax in axes[::ncol]:
        ax.set_ylabel("π(y3)  (y3 never in the data)")
    fig.suptitle(
        f"E1: probability of the unseen response y3, mean ± sample std over {res['config']['seeds']} seeds"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(res: dict, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table_markdown(res))
    plot(res, os.path.join(out, "pi_y3.png"))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default: config's)")
    p.add_argument("--steps", type=int, default=None, help="DPO steps / PPO iterations")
    p.add_argument("--out", default="docs/results/e1", help="output folder")
    p.add_argument("--smoke", action="store_true", help="tiny size (tests)")
    args = p.parse_args(argv)
    cfg = get_config("smoke" if args.smoke else None)
    if args.seeds is not None:
        if args.seeds < 2:
            raise ValueError(f"e1_ood: --seeds must be >= 2 (the tables give a sample std), got {args.seeds}")
        cfg.seeds = args.seeds
    if args.steps is not None:
        cfg.steps = args.steps
    res = run(cfg)
    write_outputs(res, args.out)
    print(table_markdown(res))
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
