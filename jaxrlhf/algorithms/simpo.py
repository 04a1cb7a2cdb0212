"""SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward"):
the DPO family's reference-free member. Per pair

    L = -log σ( β/|y_w| · log π(y_w|x)  -  β/|y_l| · log π(y_l|x)  -  γ )

(``losses.simpo_loss``), optionally plus the chosen answers' NLL per chosen token (``nll_coef``).
No reference is kept in the train state.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxrlhf import config_sections as sections
from jaxrlhf import losses
from jaxrlhf.algorithms.base import Algorithm
from jaxrlhf.algorithms.common import (
    pair_denominators,
    pair_sequences,
    preference_metrics,
    response_logps,
    response_token_counts,
    split_pairs,
)
from jaxrlhf.analysis import gradients
from jaxrlhf.trainer import offline


def make_simpo_loss(graphdef, *, beta: float, gamma: float, nll_coef: float, vocab_chunk: int = 0):
    def loss_fn(params, ref_params, batch, denoms, rng):
        del ref_params, rng
        seq = pair_sequences(batch)
        pol_c, pol_r = split_pairs(response_logps(graphdef, params, seq, vocab_chunk=vocab_chunk), batch)
        len_c, len_r = split_pairs(response_token_counts(seq), batch)
        per_pair = losses.simpo_loss(pol_c, pol_r, len_c, len_r, beta=beta, gamma=gamma)
        n = denoms["pairs"]
        simpo = jnp.sum(per_pair) / n
        chosen_nll = -jnp.sum(pol_c) / denoms["chosen_tokens"]
        rc = losses.simpo_implicit_rewards(pol_c, len_c, beta)
        rr = losses.simpo_implicit_rewards(pol_r, len_r, beta)
        return simpo + nll_coef * chosen_nll, {
            "simpo_loss": simpo,
            "chosen_nll": chosen_nll,
            **preference_metrics(rc, rr, pol_c, pol_r, n),
        }

    return loss_fn


def make_probe(config, graphdef):
    """``probe(params, ref_params, batch) -> metrics``: the SimPO term's gradient split into positive
    (chosen) and negative (rejected) learning and TOP/MID/BOT thirds of pairs by the loss weight
    ``σ(-z)``, ``z = β/|y_w| log π(y_w) - β/|y_l| log π(y_l) - γ`` (``jaxrlhf.analysis.gradients``;
    the NLL term is not part of the split)."""
    s = config.simpo
    logps_of = functools.partial(response_logps, graphdef, vocab_chunk=config.vocab_chunk)

    def probe(params, ref_params, batch):
        del ref_params
        seq = pair_sequences(batch)
        pol_c, pol_r = split_pairs(logps_of(params, seq), batch)
        len_c, len_r = split_pairs(response_token_counts(seq), batch)

        def loss(c, r):
            return jnp.mean(losses.simpo_loss(c, r, len_c, len_r, beta=s.beta, gamma=s.gamma))

        # d loss / d log pi(y_w) = -σ(-z) β / (P |y_w|), d loss / d log pi(y_l) = +σ(-z) β / (P |y_l|)
        g_c, g_r = jax.lax.stop_gradient(jax.grad(loss, (0, 1))(pol_c, pol_r))
        weight = -g_c * g_c.shape[0] * jnp.maximum(len_c, 1) / s.beta  # σ(-z) per pair

        def surrogate(p, masks):
            c, r = split_pairs(logps_of(p, seq), batch)
            return jnp.sum(masks[0] * g_c * c + masks[1] * g_r * r)

        return gradients.decompose_by_pair_weight(surrogate, params, weight)

    return probe


def build_loss(config, graphdef):
    s = config.simpo
    loss = make_simpo_loss(
        graphdef, beta=s.beta, gamma=s.gamma, nll_coef=s.nll_coef, vocab_chunk=config.vocab_chunk
    )
    return loss, pair_denominators


ALGORITHM = Algorithm(
    name="simpo",
    data_kind="preference",
    head=None,
    uses_reference=False,
    run=offline.run,
    build_loss=build_loss,
    probe=make_probe,
    sections={"simpo": sections.simpo, "analysis": sections.analysis},
    run_keys=sections.offline_run_keys,
    resumable_keys=("total_steps", "eval_every", "eval_batches"),
)
