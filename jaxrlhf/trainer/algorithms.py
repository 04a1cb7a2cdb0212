"""SFT, Bradley-Terry reward model and DPO as (denominators, loss_fn) pairs for ``make_train_step``.

Each ``loss_fn`` returns contributions (sums over the micro-batch divided by global counts); see
``jaxrlhf.trainer.step``. Metric names follow what researchers look at: DPO reward margins and
accuracy, chosen/rejected log-probs; reward-model accuracy and margin.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrlhf import losses
from jaxrlhf.sharding import constrain

SEQ_KEYS = ("input_ids", "attention_mask", "loss_mask", "positions", "segment_ids")


def apply_model(graphdef, params, seq: dict) -> jax.Array:
    """The model's output (logits ``[B,T,V]`` or scalars ``[B,T]``) on a sequence batch."""
    model = nnx.merge(graphdef, params)
    out = model(
        seq["input_ids"],
        attention_mask=seq["attention_mask"],
        positions=seq.get("positions"),
        segment_ids=seq.get("segment_ids"),
    )
    names = ("batch", "length", "vocab")[: out.ndim]
    return constrain(out, names)


def pair_sequences(batch: dict) -> dict:
    """Chosen and rejected halves of a preference batch stacked into one ``[2B, T]`` batch."""
    seq = {}
    for k in SEQ_KEYS:
        if f"chosen_{k}" in batch:
            seq[k] = jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]], axis=0)
    return seq


def last_token_index(attention_mask: jax.Array) -> jax.Array:
    """Index of each row's last real token ``[B]`` (left or right padding)."""
    T = attention_mask.shape[-1]
    return T - 1 - jnp.argmax(attention_mask[:, ::-1] > 0, axis=-1)


def sequence_scores(scores: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """The scalar head's output at each row's last real token (the EOS): ``[B,T] -> [B]``."""
    idx = last_token_index(attention_mask)
    return jnp.take_along_axis(scores, idx[:, None], axis=-1)[:, 0].astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# SFT: token-mean negative log-likelihood of the response tokens over the global batch.
# ----------------------------------------------------------------------------------------------
def sft_denominators(batch: dict) -> dict:
    """Predicted response tokens of the whole global batch (the token-mean denominator)."""
    return {"tokens": losses.loss_denominator(batch["loss_mask"][:, 1:], "token_mean")}


def make_sft_loss(graphdef):
    def loss_fn(params, ref_params, batch, denoms, rng):
        del ref_params, rng
        logits = apply_model(graphdef, params, batch)
        logps, mask = losses.shifted_logprobs(logits, batch["input_ids"], batch["loss_mask"])
        nll = losses.aggregate_loss(-logps, mask, "token_mean", global_denominator=denoms["tokens"])
        return nll, {"nll": nll}

    return loss_fn


# ----------------------------------------------------------------------------------------------
# Reward model: Bradley-Terry on the scalar head at the last real token of each response.
# ----------------------------------------------------------------------------------------------
def pair_denominators(batch: dict) -> dict:
    pairs = batch["chosen_input_ids"].shape[0]
    den = {"pairs": jnp.asarray(pairs, jnp.float32)}
    den["chosen_tokens"] = losses.loss_denominator(batch["chosen_loss_mask"][:, 1:], "token_mean")
    return den


def make_reward_loss(graphdef, *, use_margin: bool):
    def loss_fn(params, ref_params, batch, denoms, rng):
        del ref_params, rng
        seq = pair_sequences(batch)
        scores = sequence_scores(apply_model(graphdef, params, seq), seq["attention_mask"])
        chosen, rejected = jnp.split(scores, 2)
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


# ----------------------------------------------------------------------------------------------
# DPO (sigmoid / ipo / conservative), optional NLL on the chosen answers ("extra SFT" remedy).
# ----------------------------------------------------------------------------------------------
def sequence_logps_and_nll(graphdef, params, seq: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-sequence summed response log-probs ``[B]``, summed NLL ``[B]`` and token counts ``[B]``."""
    logits = apply_model(graphdef, params, seq)
    logps, mask = losses.shifted_logprobs(logits, seq["input_ids"], seq["loss_mask"])
    valid = mask > 0
    seq_logps = jnp.sum(jnp.where(valid, logps, 0.0), axis=-1)
    return seq_logps, -seq_logps, jnp.sum(valid, axis=-1)


def make_dpo_loss(graphdef, *, beta: float, label_smoothing: float, loss_type: str, nll_coef: float):
    def loss_fn(params, ref_params, batch, denoms, rng):
        del rng
        seq = pair_sequences(batch)
        logps, nll, _ = sequence_logps_and_nll(graphdef, params, seq)
        pol_c, pol_r = jnp.split(logps, 2)
        if "ref_chosen_logps" in batch:  # precomputed once over the dataset (frozen reference)
            ref_c, ref_r = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        else:
            ref_logps, _, _ = sequence_logps_and_nll(graphdef, jax.lax.stop_gradient(ref_params), seq)
            ref_c, ref_r = jnp.split(ref_logps, 2)
        per_pair = losses.dpo_loss(
            pol_c, pol_r, ref_c, ref_r, beta=beta, label_smoothing=label_smoothing, loss_type=loss_type
        )
        n = denoms["pairs"]
        dpo = jnp.sum(per_pair) / n
        chosen_nll = jnp.sum(jnp.split(nll, 2)[0]) / denoms["chosen_tokens"]
        loss = dpo + nll_coef * chosen_nll
        rc = losses.dpo_implicit_rewards(pol_c, ref_c, beta)
        rr = losses.dpo_implicit_rewards(pol_r, ref_r, beta)
        return loss, {
            "dpo_loss": dpo,
            "chosen_nll": chosen_nll,
            "rewards/chosen": jnp.sum(rc) / n,
            "rewards/rejected": jnp.sum(rr) / n,
            "rewards/accuracy": jnp.sum(rc > rr) / n,
            "rewards/margin": jnp.sum(rc - rr) / n,
            "logps/chosen": jnp.sum(pol_c) / n,
            "logps/rejected": jnp.sum(pol_r) / n,
        }

    return loss_fn


def make_ref_logps_fn(graphdef):
    """``(ref_params, batch) -> (chosen [B], rejected [B])`` reference log-probs, for precomputing."""

    def fn(ref_params, batch):
        logps, _, _ = sequence_logps_and_nll(graphdef, ref_params, pair_sequences(batch))
        return tuple(jnp.split(logps, 2))

    return fn


def build(config, graphdef, algorithm: str | None = None) -> tuple[Any, Any, bool]:
    """``(loss_fn, denominators, uses_reference)`` for ``algorithm`` (default ``config.algorithm``)."""
    algo = algorithm or config.algorithm
    if algo == "sft":
        return make_sft_loss(graphdef), sft_denominators, False
    if algo == "reward":
        return make_reward_loss(graphdef, use_margin=config.reward.use_margin), pair_denominators, False
    if algo == "dpo":
        d = config.dpo
        fn = make_dpo_loss(
            graphdef,
            beta=d.beta,
            label_smoothing=d.label_smoothing,
            loss_type=d.loss_type,
            nll_coef=d.nll_coef,
        )
        return fn, pair_denominators, True
    raise ValueError(f"config.algorithm={algo!r}; expected one of sft, reward, dpo, ppo, dpo_iter")
