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


def is_packed(batch: dict) -> bool:
    """A packed preference batch (``PreferenceDataset.collate_packed``): ``[R, T]`` rows of
    segments plus per-pair ``chosen_index`` / ``rejected_index`` into ``segment_sums`` tables."""
    return "chosen_index" in batch


def pair_sequences(batch: dict) -> dict:
    """The sequences of a preference batch: the packed rows as they are, or the chosen and
    rejected halves stacked into one ``[2B, T]`` batch."""
    if is_packed(batch):
        return {k: batch[k] for k in SEQ_KEYS if k in batch}
    seq = {}
    for k in SEQ_KEYS:
        if f"chosen_{k}" in batch:
            seq[k] = jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]], axis=0)
    return seq


def segment_sums(values: jax.Array, segment_ids: jax.Array, row_length: int) -> jax.Array:
    """Per-(row, segment) sums of ``values [R, T']`` grouped by ``segment_ids [R, T']`` (0: none).

    Returns ``[R * row_length + 1]`` float32: entry ``r * row_length + s - 1`` holds row ``r``'s
    segment ``s``; the last entry collects positions outside any segment.
    """
    r = values.shape[0]
    rows = jnp.arange(r, dtype=jnp.int32)[:, None] * row_length
    ids = jnp.where(segment_ids > 0, rows + segment_ids - 1, r * row_length)
    flat = values.astype(jnp.float32).reshape(-1)
    return jax.ops.segment_sum(flat, ids.reshape(-1), num_segments=r * row_length + 1)


def split_pairs(per_sequence: jax.Array, batch: dict) -> tuple[jax.Array, jax.Array]:
    """``(chosen [B], rejected [B])`` from per-sequence values: ``[2B]`` halves, or the
    ``segment_sums`` table of a packed batch indexed by ``chosen_index`` / ``rejected_index``."""
    if is_packed(batch):
        return per_sequence[batch["chosen_index"]], per_sequence[batch["rejected_index"]]
    chosen, rejected = jnp.split(per_sequence, 2)
    return chosen, rejected


def last_token_index(attention_mask: jax.Array) -> jax.Array:
    """Index of each row's last real token ``[B]`` (left or right padding)."""
    T = attention_mask.shape[-1]
    return T - 1 - jnp.argmax(attention_mask[:, ::-1] > 0, axis=-1)


def sequence_scores(scores: jax.Array, attention_mask: jax.Array, segment_ids=None) -> jax.Array:
    """The scalar head's output at each sequence's last real token (the EOS).

    ``[B,T] -> [B]``; with ``segment_ids`` (packed rows), the ``segment_sums`` table of each
    segment's last-token score.
    """
    if segment_ids is not None:
        nxt = jnp.concatenate([segment_ids[:, 1:], jnp.zeros_like(segment_ids[:, :1])], axis=1)
        last = (segment_ids != 0) & (nxt != segment_ids)
        return segment_sums(jnp.where(last, scores, 0.0), segment_ids, scores.shape[1])
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
    if is_packed(batch):
        pairs = batch["chosen_index"].shape[0]
        chosen_tokens = jnp.sum(batch["chosen_response_tokens"]).astype(jnp.float32)
    else:
        pairs = batch["chosen_input_ids"].shape[0]
        chosen_tokens = losses.loss_denominator(batch["chosen_loss_mask"][:, 1:], "token_mean")
    return {"pairs": jnp.asarray(pairs, jnp.float32), "chosen_tokens": chosen_tokens}


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


# ----------------------------------------------------------------------------------------------
# DPO (sigmoid / ipo / conservative), optional NLL on the chosen answers ("extra SFT" remedy).
# ----------------------------------------------------------------------------------------------
def sequence_logps(graphdef, params, seq: dict) -> jax.Array:
    """Per-sequence summed response log-probs: ``[B]``, or the ``segment_sums`` table of packed rows."""
    logits = apply_model(graphdef, params, seq)
    logps, mask = losses.shifted_logprobs(logits, seq["input_ids"], seq["loss_mask"])
    logps = jnp.where(mask > 0, logps, 0.0)
    if "segment_ids" in seq:  # the token predicted at t + 1 belongs to segment_ids[:, t + 1]
        return segment_sums(logps, seq["segment_ids"][:, 1:], seq["input_ids"].shape[1])
    return jnp.sum(logps, axis=-1)


def make_dpo_loss(graphdef, *, beta: float, label_smoothing: float, loss_type: str, nll_coef: float):
    def loss_fn(params, ref_params, batch, denoms, rng):
        del rng
        seq = pair_sequences(batch)
        pol_c, pol_r = split_pairs(sequence_logps(graphdef, params, seq), batch)
        if "ref_chosen_logps" in batch:  # precomputed once over the dataset (frozen reference)
            ref_c, ref_r = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        else:
            ref_logps = sequence_logps(graphdef, jax.lax.stop_gradient(ref_params), seq)
            ref_c, ref_r = split_pairs(ref_logps, batch)
        per_pair = losses.dpo_loss(
            pol_c, pol_r, ref_c, ref_r, beta=beta, label_smoothing=label_smoothing, loss_type=loss_type
        )
        n = denoms["pairs"]
        dpo = jnp.sum(per_pair) / n
        chosen_nll = -jnp.sum(pol_c) / denoms["chosen_tokens"]
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
        return split_pairs(sequence_logps(graphdef, ref_params, pair_sequences(batch)), batch)

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
