"""Pieces every algorithm shares: the model applied to a batch, preference-pair layouts (padded
halves or packed segments), per-sequence response log-probs and scalar-head scores."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrlhf import losses
from jaxrlhf.sharding import constrain

SEQ_KEYS = ("input_ids", "attention_mask", "loss_mask", "positions", "segment_ids")


def apply_model(graphdef, params, seq: dict) -> jax.Array:
    """The model's output (logits ``[B,T,V]`` or scalars ``[B,T]``) on a sequence batch."""
    return _outputs(nnx.merge(graphdef, params), seq)


def _outputs(model, seq: dict) -> jax.Array:
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


def output_layer(model) -> tuple[jax.Array, int]:
    """The LM head's weight and its vocabulary axis: the untied ``lm_head`` kernel ``[E, V]`` (axis 1)
    or the tied input embedding ``[V, E]`` (axis 0; Qwen2.5 small models, Llama-3.2, GPT-2's wte)."""
    if model.lm_head is not None:  # effective: an lm_head that LoRA targets carries adapters
        return model.lm_head.effective_kernel(), 1
    return model.embed[...], 0


def uses_vocab_chunks(config, vocab_chunk: int) -> bool:
    """Whether ``token_logps`` takes the chunked path: ``vocab_chunk > 0`` (``config.vocab_chunk``)
    on an LM head whose vocabulary is larger than one chunk."""
    return vocab_chunk > 0 and config.head is None and config.vocab_size > vocab_chunk


def token_logps(
    graphdef, params, seq: dict, *, vocab_chunk: int = 0, temperature: float = 1.0, entropy: bool = False
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Next-token log-probs of a sequence batch, the one place a forward becomes log-probs / entropy.

    ``(logps [B,T-1] float32 (0 where masked), mask [B,T-1] = loss_mask[:, 1:], entropy [B,T-1] or
    None)`` of ``softmax(logits / temperature)``. With ``vocab_chunk > 0`` and a vocabulary larger
    than it, the model's final hidden states go through ``losses.chunked_logprobs_and_entropy`` in
    chunks of ``vocab_chunk`` entries (no ``[B,T,V]`` logits, forward or backward); otherwise the
    logits through ``losses.shifted_logprobs`` / ``losses.entropy_from_logits`` (the same values).
    """
    model = nnx.merge(graphdef, params)
    if not uses_vocab_chunks(model.config, vocab_chunk):
        logits = _outputs(model, seq)
        if temperature != 1.0:
            logits = logits.astype(jnp.float32) / temperature
        logps, mask = losses.shifted_logprobs(logits, seq["input_ids"], seq["loss_mask"])
        ent = losses.entropy_from_logits(logits)[:, :-1] if entropy else None
        return logps, mask, ent
    _, hidden = model(
        seq["input_ids"],
        attention_mask=seq["attention_mask"],
        positions=seq.get("positions"),
        segment_ids=seq.get("segment_ids"),
        return_hidden=True,
    )  # the unused logits are dead code under jit
    h = constrain(model.final_norm(hidden[-1]), ("batch", "length", "embed"))  # [B,T,E]
    weight, axis = output_layer(model)
    ids, mask = seq["input_ids"], seq["loss_mask"][:, 1:]
    labels = jnp.concatenate([ids[:, 1:], jnp.zeros_like(ids[:, :1])], axis=1)  # as shifted_logprobs
    kw = dict(chunk=vocab_chunk, temperature=temperature, vocab_axis=axis)
    if entropy:
        logps, ent = losses.chunked_logprobs_and_entropy(h, weight, labels, **kw)
        ent = ent[:, :-1]
    else:
        logps, ent = losses.chunked_token_logprobs(h, weight, labels, **kw), None
    return jnp.where(mask != 0, logps[:, :-1], 0.0), mask, ent


def response_logps(graphdef, params, seq: dict, *, vocab_chunk: int = 0) -> jax.Array:
    """Per-sequence summed response log-probs: ``[B]``, or the ``segment_sums`` table of packed rows
    (``vocab_chunk``: see ``token_logps``)."""
    logps, mask, _ = token_logps(graphdef, params, seq, vocab_chunk=vocab_chunk)
    logps = jnp.where(mask > 0, logps, 0.0)
    if "segment_ids" in seq:  # the token predicted at t + 1 belongs to segment_ids[:, t + 1]
        return segment_sums(logps, seq["segment_ids"][:, 1:], seq["input_ids"].shape[1])
    return jnp.sum(logps, axis=-1)


def pair_denominators(batch: dict) -> dict:
    """Global counts of a preference batch: pairs, and chosen response tokens (for an NLL term)."""
    if is_packed(batch):
        pairs = batch["chosen_index"].shape[0]
        chosen_tokens = jnp.sum(batch["chosen_response_tokens"]).astype(jnp.float32)
    else:
        pairs = batch["chosen_input_ids"].shape[0]
        chosen_tokens = losses.loss_denominator(batch["chosen_loss_mask"][:, 1:], "token_mean")
    return {"pairs": jnp.asarray(pairs, jnp.float32), "chosen_tokens": chosen_tokens}


def response_token_counts(seq: dict) -> jax.Array:
    """Predicted response tokens per sequence (``[B]``, or the ``segment_sums`` table of packed rows):
    the lengths ``|y|`` of length-normalised losses (SimPO)."""
    mask = seq["loss_mask"][:, 1:].astype(jnp.float32)
    if "segment_ids" in seq:
        return segment_sums(mask, seq["segment_ids"][:, 1:], seq["input_ids"].shape[1])
    return jnp.sum(mask, axis=-1)


def preference_metrics(rc: jax.Array, rr: jax.Array, pol_c: jax.Array, pol_r: jax.Array, n) -> dict:
    """The DPO family's logged contributions (sums / the global pair count ``n``): implicit rewards of
    the chosen and rejected answers ``rc``, ``rr`` [B], their accuracy and margin, and the policy's
    summed log-probs ``pol_c``, ``pol_r`` [B]."""
    return {
        "rewards/chosen": jnp.sum(rc) / n,
        "rewards/rejected": jnp.sum(rr) / n,
        "rewards/accuracy": jnp.sum(rc > rr) / n,
        "rewards/margin": jnp.sum(rc - rr) / n,
        "logps/chosen": jnp.sum(pol_c) / n,
        "logps/rejected": jnp.sum(pol_r) / n,
    }
