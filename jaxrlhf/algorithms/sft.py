"""SFT: token-mean negative log-likelihood of the response tokens over the global batch."""

from __future__ import annotations

from jaxrlhf import config_sections as sections
from jaxrlhf import losses
from jaxrlhf.algorithms.base import Algorithm
from jaxrlhf.algorithms.common import token_logps
from jaxrlhf.trainer import offline


def sft_denominators(batch: dict) -> dict:
    """Predicted response tokens of the whole global batch (the token-mean denominator)."""
    return {"tokens": losses.loss_denominator(batch["loss_mask"][:, 1:], "token_mean")}


def make_sft_loss(graphdef, *, vocab_chunk: int = 0):
    """``vocab_chunk``: ``config.vocab_chunk`` (``algorithms.common.token_logps``)."""

    def loss_fn(params, ref_params, batch, denoms, rng):
        del ref_params, rng
        logps, mask, _ = token_logps(graphdef, params, batch, vocab_chunk=vocab_chunk)
        nll = losses.aggregate_loss(-logps, mask, "token_mean", global_denominator=denoms["tokens"])
        return nll, {"nll": nll}

    return loss_fn


def build_loss(config, graphdef):
    return make_sft_loss(graphdef, vocab_chunk=config.vocab_chunk), sft_denominators


ALGORITHM = Algorithm(
    name="sft",
    data_kind="sft",
    head=None,
    uses_reference=False,
    run=offline.run,
    build_loss=build_loss,
    run_keys=sections.offline_run_keys,
    resumable_keys=("total_steps", "eval_every", "eval_batches"),
)
