"""SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward"):
the DPO family's reference-free member. Per pair

    L = -log σ( β/|y_w| · log π(y_w|x)  -  β/|y_l| · log π(y_l|x)  -  γ )

(``losses.simpo_loss``), optionally plus the chosen answers' NLL per chosen token (``nll_coef``).
No reference is kept in the train state.
"""

from __future__ import annotations

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
    sections={"simpo": sections.simpo},
    run_keys=sections.offline_run_keys,
    resumable_keys=("total_steps", "eval_every", "eval_batches"),
)
