"""DPO (sigmoid / IPO / conservative DPO) with an optional NLL term on the chosen answers (the
study's "extra SFT" remedy), a frozen or EMA reference, or a reference precomputed once over the
dataset (``config.ref.precompute``)."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxrlhf import config_sections as sections
from jaxrlhf import losses
from jaxrlhf.algorithms.base import Algorithm
from jaxrlhf.algorithms.common import (
    pair_denominators,
    pair_sequences,
    preference_metrics,
    response_logps,
    split_pairs,
)
from jaxrlhf.analysis import gradients
from jaxrlhf.distributed import gather
from jaxrlhf.sharding import shard_batch
from jaxrlhf.trainer import offline

COORDINATION_DEFAULTS = dict(early_neg_coef=1.0, early_until=0, late_pos_coef=1.0, late_from=0)


def coordination(step, *, early_neg_coef: float, early_until: int, late_pos_coef: float, late_from: int):
    """``(pos_coef, neg_coef)`` of the coordinated DPO of Wang et al. 2025 at optimizer step ``step``:
    negative learning (the rejected term's gradient) scaled by ``early_neg_coef`` before step
    ``early_until`` (t1), positive learning (the chosen term's) by ``late_pos_coef`` from step
    ``late_from`` (t2; 0 = never). Defaults (1, 0, 1, 0): plain DPO. Not conservative DPO
    (``label_smoothing``)."""
    neg = jnp.where(step < early_until, early_neg_coef, 1.0)
    pos = jnp.where((late_from > 0) & (step >= late_from), late_pos_coef, 1.0)
    return pos, neg


def make_dpo_loss(
    graphdef,
    *,
    beta: float,
    label_smoothing: float,
    loss_type: str,
    nll_coef: float,
    coord: dict | None = None,
    vocab_chunk: int = 0,
):
    """``vocab_chunk``: ``config.vocab_chunk`` (``algorithms.common.token_logps``)."""
    coord = coord or COORDINATION_DEFAULTS
    logps_of = functools.partial(response_logps, graphdef, vocab_chunk=vocab_chunk)

    def loss_fn(params, ref_params, batch, denoms, rng):
        del rng
        seq = pair_sequences(batch)
        pol_c, pol_r = split_pairs(logps_of(params, seq), batch)
        pos, neg = coordination(denoms.get("step", 0), **coord)
        # the loss value and every metric are unchanged; only the gradients of the two terms scale
        pol_c, pol_r = losses.gradient_scale(pol_c, pos), losses.gradient_scale(pol_r, neg)
        if "ref_chosen_logps" in batch:  # precomputed once over the dataset (frozen reference)
            ref_c, ref_r = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        else:
            ref_logps = logps_of(jax.lax.stop_gradient(ref_params), seq)
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
            **preference_metrics(rc, rr, pol_c, pol_r, n),
        }

    return loss_fn


def make_probe(config, graphdef):
    """``probe(params, ref_params, batch) -> metrics``: the DPO term's gradient split into positive
    (chosen) and negative (rejected) learning and the TOP/MID/BOT thirds of pairs by loss weight
    (``jaxrlhf.analysis.gradients``; the NLL term is not part of the split)."""
    d = config.dpo
    kw = dict(beta=d.beta, label_smoothing=d.label_smoothing, loss_type=d.loss_type)
    logps_of = functools.partial(response_logps, graphdef, vocab_chunk=config.vocab_chunk)

    def probe(params, ref_params, batch):
        seq = pair_sequences(batch)
        if "ref_chosen_logps" in batch:
            ref_c, ref_r = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        else:
            ref_c, ref_r = split_pairs(logps_of(ref_params, seq), batch)
        pol_c, pol_r = split_pairs(logps_of(params, seq), batch)
        # the per-pair loss weight w_i = d loss_i / d log pi(y_w); d loss_i / d log pi(y_l) = -w_i
        w = jax.grad(lambda c: jnp.sum(losses.dpo_loss(c, pol_r, ref_c, ref_r, **kw)))(pol_c)
        w = jax.lax.stop_gradient(w) / w.shape[0]

        def surrogate(p, masks):
            c, r = split_pairs(logps_of(p, seq), batch)
            return jnp.sum(w * (masks[0] * c - masks[1] * r))

        return gradients.decompose_by_pair_weight(surrogate, params, w * w.shape[0])

    return probe


def build_loss(config, graphdef):
    d = config.dpo
    coord = {k: d.get(k, v) for k, v in COORDINATION_DEFAULTS.items()}  # absent: plain DPO
    fn = make_dpo_loss(
        graphdef,
        beta=d.beta,
        label_smoothing=d.label_smoothing,
        loss_type=d.loss_type,
        nll_coef=d.nll_coef,
        coord=coord,
        vocab_chunk=config.vocab_chunk,
    )
    return fn, pair_denominators


# ----------------------------------------------------------------------------------------------
# A frozen reference precomputed once over the dataset (``config.ref.precompute``).
# ----------------------------------------------------------------------------------------------
def make_ref_logps_fn(graphdef, vocab_chunk: int = 0):
    """``(ref_params, batch) -> (chosen [B], rejected [B])`` reference log-probs, for precomputing."""

    def fn(ref_params, batch):
        seq = pair_sequences(batch)
        return split_pairs(response_logps(graphdef, ref_params, seq, vocab_chunk=vocab_chunk), batch)

    return fn


class WithReferenceLogps:
    """A preference dataset whose batches also carry precomputed ``ref_chosen_logps`` /
    ``ref_rejected_logps`` ``[B]`` (the frozen reference's summed response log-probs)."""

    def __init__(self, dataset, chosen: np.ndarray, rejected: np.ndarray):
        self.dataset, self.chosen, self.rejected = dataset, chosen, rejected

    def __getattr__(self, name):
        return getattr(self.dataset, name)

    def __len__(self):
        return len(self.dataset)

    def collate(self, indices, *args, **kwargs):
        return self._with_ref(self.dataset.collate(indices, *args, **kwargs), indices)

    def collate_packed(self, indices, *args, **kwargs):
        return self._with_ref(self.dataset.collate_packed(indices, *args, **kwargs), indices)

    def _with_ref(self, out: dict, indices) -> dict:
        idx = np.asarray(indices)
        safe = np.maximum(idx, 0)
        out["ref_chosen_logps"] = np.where(idx >= 0, self.chosen[safe], 0.0).astype(np.float32)
        out["ref_rejected_logps"] = np.where(idx >= 0, self.rejected[safe], 0.0).astype(np.float32)
        return out

    @classmethod
    def compute(cls, dataset, ref_logps_fn, ref_params, config, mesh) -> WithReferenceLogps:
        """One pass over ``dataset`` in order (global batches of ``config.batch_size``, every
        process taking part); every process ends with the whole table."""
        n, B = len(dataset), config.batch_size
        chosen, rejected = np.zeros(n, np.float32), np.zeros(n, np.float32)
        per = B // jax.process_count()
        lo = jax.process_index() * per
        t0 = time.perf_counter()
        for start in range(0, n, B):
            idx = np.arange(start, start + B)
            idx = np.where(idx < n, idx, -1)
            host = dataset.collate(idx[lo : lo + per].tolist(), dataset.max_length, dataset.pad_id)
            c, r = ref_logps_fn(ref_params, shard_batch(mesh, host))
            c, r = gather(c), gather(r)
            valid = idx >= 0
            chosen[idx[valid]], rejected[idx[valid]] = c[valid], r[valid]
        logging.info("reference log-probs precomputed for %d pairs in %.1fs", n, time.perf_counter() - t0)
        return cls(dataset, chosen, rejected)


def prepare(config, graphdef, params, train_it, eval_ds, mesh):
    """With ``config.ref.precompute``, the frozen reference's log-probs go into the datasets and the
    train state keeps no reference; returns ``(eval_ds, uses_reference)``."""
    if not config.ref.get("precompute", False):
        return eval_ds, True
    if config.ref.ema_decay != 1.0 or config.ref.reset_every:
        raise ValueError("config.ref.precompute needs a frozen reference (ema_decay=1.0, reset_every=0)")
    ref_logps = jax.jit(make_ref_logps_fn(graphdef, config.vocab_chunk))
    train_it.dataset = WithReferenceLogps.compute(train_it.dataset, ref_logps, params, config, mesh)
    if eval_ds is not None:
        eval_ds = WithReferenceLogps.compute(eval_ds, ref_logps, params, config, mesh)
    return eval_ds, False


def validate(config) -> None:
    d = config.dpo
    if d.loss_type not in losses.DPO_LOSS_TYPES:
        raise ValueError(f"config.dpo.loss_type={d.loss_type!r}; expected one of {losses.DPO_LOSS_TYPES}")


ALGORITHM = Algorithm(
    name="dpo",
    data_kind="preference",
    head=None,
    uses_reference=True,
    run=offline.run,
    build_loss=build_loss,
    prepare=prepare,
    probe=make_probe,
    sections={"dpo": sections.dpo, "ref": sections.dpo_ref, "analysis": sections.analysis},
    run_keys=sections.offline_run_keys,
    resumable_keys=("total_steps", "eval_every", "eval_batches"),
    validate=validate,
)
