"""Packed, right-padded and left-padded batches give the same per-token log-probs on a tiny model."""

import os

import jax
import numpy as np
import pytest
from flax import nnx

from jaxrlhf import data, losses, models

TOK = os.path.join(os.path.dirname(__file__), "fixtures", "tokenizers", "char_bos")


def _logprob_fn(model):
    """``batch -> (logps [B, T-1], mask [B, T-1])`` as numpy; one jit per batch layout."""
    graphdef, params = nnx.split(model)

    @jax.jit
    def f(params, batch):
        logits = nnx.merge(graphdef, params)(
            batch["input_ids"],
            attention_mask=batch["attention_mask"],
            positions=batch["positions"],
            segment_ids=batch.get("segment_ids"),
        )
        return losses.shifted_logprobs(logits, batch["input_ids"], batch["loss_mask"])

    def run(batch):
        logps, mask = f(params, batch)
        return np.asarray(jax.device_get(logps)), np.asarray(mask)

    return run


def _masked(logps, mask, rows_cols):
    return [logps[r, c][mask[r, c] > 0] for r, c in rows_cols]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_packed_and_padded_logprobs_match(family):
    tok = data.load_tokenizer(TOK)
    rng = np.random.default_rng(0)
    rows = [{"prompt": f"{i}:" + "p" * int(rng.integers(1, 8)), "completion": "ab" * int(rng.integers(1, 9))}
            for i in range(12)]  # fmt: skip
    ds = data.tokenize_rows(rows, data.default_data_config(max_prompt_length=12, max_length=32), tok, "sft")
    model = models.init(family, vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2,
                        num_heads=4, num_kv_heads=4 if family == "gpt2" else 2)  # fmt: skip
    it = data.BatchIterator(ds, 4, seed=1, packing=True, process_index=0, process_count=1)
    packed = next(it)
    seg = packed["segment_ids"]
    members = [
        (r, s, np.flatnonzero(seg[r] == s))
        for r in range(seg.shape[0])
        for s in range(1, int(seg[r].max()) + 1)
    ]
    lookup = {tuple(x.tolist()): i for i, x in enumerate(ds.ids)}
    order = [lookup[tuple(packed["input_ids"][r, where].tolist())] for r, _, where in members]
    assert len(order) > packed["input_ids"].shape[0]  # really packed: more examples than rows

    logprobs = _logprob_fn(model)
    p_logps, p_mask = logprobs(packed)
    # Column c of the shifted arrays predicts token c + 1: a segment's predictions sit at where[:-1].
    packed_vals = _masked(p_logps, p_mask, [(r, where[:-1]) for r, _, where in members])
    for side in ("right", "left"):
        padded = ds.collate(
            order + [-1] * (packed["input_ids"].shape[0] * 4 - len(order)), 32, ds.pad_id, side
        )
        logps, mask = logprobs(padded)
        n = ds.lengths[order]
        cols = [
            np.arange(n[k] - 1) if side == "right" else np.arange(32 - n[k], 31) for k in range(len(order))
        ]
        vals = _masked(logps, mask, list(enumerate(cols)))
        for k, (a, b) in enumerate(zip(packed_vals, vals, strict=True)):
            assert len(a) == len(b) == int(n[k] - ds.prompt_lens[order[k]])
            np.testing.assert_allclose(a, b, atol=2e-5, err_msg=f"{side} example {order[k]}")
