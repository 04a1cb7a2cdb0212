"""Bradley-Terry reward model: the scalar head at the last real token (the EOS) of each response,
``-log σ(r_chosen - r_rejected [- margin])`` per pair, mean over the global batch of pairs."""

from __future__ import annotations

import jax.numpy as jnp

from jaxrlhf import config_sections as sections
from jaxrlhf import losses
from jaxrlhf.algorithms.base import Algorithm
from jaxrlhf.algorithms.common import (
    apply_model,
    pair_denominators,
    pair_sequences,
    sequence_scores,
    split_pairs,
)
from jaxrlhf.trainer import offline


def make_reward_loss(graphdef, *, use_margin: bool):
    def loss_fn(params, ref_params, batch, denoms, rng):
        del ref_params, rng
        seq = pair_sequences(batch)
        scores = apply_model(graphdef, params, seq)
        scores = sequence_scores(scores, seq["attention_mask"], seq.get("segment_ids"))
        chosen, rejected = split_pairs(scores, batch)
        margin = batch["margin"] if use_margin else 0.0
        per_pair = losses.bradley_terry_loss(chosen, rejected, margin=margin)
        n = denoms["pairs"]
        loss = jnp.sum(per_pair) / n
        return loss, {
            "bt_loss": loss,
            "accuracy": jnp.sum(chosen > rejected) / n,
            "margin": jnp.sum(chosen - rejected) / n,
            "reward_chosen": jnp.sum(chosen) / n,
            "reward_rejected": jnp.sum(rejected) / n,
        }

    return loss_fn


def build_loss(config, graphdef):
    return make_reward_loss(graphdef, use_margin=config.bradley_terry.use_margin), pair_denominators


ALGORITHM = Algorithm(
    name="reward",
    data_kind="preference",
    head="scalar",
    uses_reference=False,
    run=offline.run,
    build_loss=build_loss,
    sections={"bradley_terry": sections.bradley_terry},
    run_keys=sections.offline_run_keys,
    resumable_keys=("total_steps", "eval_every", "eval_batches"),
    renamed_keys={"reward.use_margin": "bradley_terry.use_margin"},
)
