"""Packed preference batches with bucketed row counts (``config.data.packed_row_buckets``): a small
fixed set of shapes over whole epochs of a real length distribution, the same content as exact
packing plus empty rows, and the same losses as padded batches through the driver."""

import importlib.util
import math
import os
from pathlib import Path

import numpy as np
import pytest

from jaxrlhf import config_defaults as d
from jaxrlhf import data as data_lib
from jaxrlhf import registry
from jaxrlhf.data.packing import bucket_rows, row_buckets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL = Path(__file__).parents[2] / "shared" / "real"


def load_config(relpath):
    spec = importlib.util.spec_from_file_location("cfg_buckets", os.path.join(ROOT, relpath))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


@pytest.mark.parametrize(
    "max_rows,unit,count", [(16, 1, 4), (16, 2, 4), (128, 8, 4), (10, 4, 3), (4, 1, 8), (7, 1, 0)]
)
def test_row_buckets_by_definition(max_rows, unit, count):
    """Against the definition written as a loop: the smallest step ``g`` (a multiple of ``unit``)
    with ``count * g >= max_rows``; buckets ``g, 2g, ...`` up to the first that holds ``max_rows``."""
    got = row_buckets(max_rows, unit, count)
    if count == 0:
        assert got == [r for r in range(1, max_rows + unit) if r % unit == 0 and r - unit < max_rows]
        return
    g = unit
    while count * g < max_rows:
        g += unit
    want, b = [], g
    while True:
        want.append(b)
        if b >= max_rows:
            break
        b += g
    assert got == want and len(got) <= count
    for needed in range(1, max_rows + 1):
        r = bucket_rows(needed, got)
        assert r >= needed and r % unit == 0 and (r == got[0] or r - g < needed)
    with pytest.raises(ValueError, match="largest row bucket"):
        bucket_rows(got[-1] + 1, got)


def _ultrafeedback(max_length):
    path = REAL / "ultrafeedback_binarized_subset" / "train_clean.jsonl"
    tok_dir = REAL / "tokenizer_qwen2_5_instruct"
    if not path.exists() or not tok_dir.exists():
        pytest.skip(f"UltraFeedback / Qwen2.5 tokenizer not found: {REAL} absent")
    cfg = d.data(
        path=str(path), schema="preference", max_prompt_length=max_length // 2, max_length=max_length
    )
    return data_lib.build_dataset(cfg, data_lib.load_tokenizer(str(tok_dir)), "preference", "train")


@pytest.fixture(scope="module")
def uf512():
    return _ultrafeedback(512)


@pytest.mark.parametrize("batch,micro,bucket", [(8, 1, False), (8, 2, True), (32, 1, True)])
def test_a_few_shapes_over_real_epochs(uf512, batch, micro, bucket):
    """994 UltraFeedback pairs (Qwen2.5 tokens, rows of 512), 2 shuffled epochs: exact packing uses
    many row counts, the default 4 buckets at most 4; every batch holds the rows it needs and the
    same content as exact packing, the added rows empty."""
    kw = dict(
        shuffle=True,
        bucket=bucket,
        packing=True,
        seed=1,
        micro_batches=micro,
        process_index=0,
        process_count=1,
    )
    exact = data_lib.BatchIterator(uf512, batch, packed_row_buckets=0, **kw)
    bucketed = data_lib.BatchIterator(uf512, batch, **kw)
    shapes_exact, shapes = set(), set()
    for _ in range(2 * exact.steps_per_epoch):
        a, b = next(exact), next(bucketed)
        R, T = a["input_ids"].shape
        shapes_exact.add(R)
        shapes.add(b["input_ids"].shape)
        assert b["input_ids"].shape[0] >= R and b["input_ids"].shape[0] % micro == 0
        for k in ("input_ids", "attention_mask", "loss_mask", "positions", "segment_ids"):
            np.testing.assert_array_equal(b[k][:R], a[k])
            fill = uf512.pad_id if k == "input_ids" else 0
            assert (b[k][R:] == fill).all(), k
        for k in ("chosen_response_tokens", "margin", "chosen_index", "rejected_index"):
            np.testing.assert_array_equal(b[k], a[k])  # no padding pair here: indices unchanged
    assert len(shapes) <= 4 < len(shapes_exact), (shapes, shapes_exact)


def test_padding_pair_index_follows_the_new_rows():
    """A last partial batch (``drop_remainder=False``) has padding pairs whose index is the slot
    after every row (``segment_sums``' catch-all); with added rows it moves to the new end."""
    c = load_config("configs/tiny/dpo.py")
    ds = data_lib.build_dataset(c.data, data_lib.load_tokenizer(c.tokenizer), "preference", "train")
    B = len(ds) // 2 + 1  # the second batch is partial
    it = data_lib.BatchIterator(
        ds,
        B,
        shuffle=False,
        packing=True,
        repeat=False,
        drop_remainder=False,
        packed_row_buckets=1,
        process_index=0,
        process_count=1,
    )
    batches = list(it)
    last = batches[-1]
    R, T = last["input_ids"].shape
    assert R == 2 * B
    pad = np.asarray([i < 0 for i in it._epoch_plan(0)[-1]])
    assert pad.any()
    np.testing.assert_array_equal(last["chosen_index"][pad], R * T)
    assert (last["chosen_index"][~pad] < R * T).all()


@pytest.mark.parametrize("name", ["dpo", "reward"])
def test_bucketed_packed_run_matches_padded(name, tmp_path, monkeypatch):
    """One bucket (every batch grown to its most rows, ``2 B``: the most padding rows possible)
    with 2 micro-batches through ``registry.run``: the loss history of padded batches."""
    monkeypatch.chdir(ROOT)

    def cfg(packing):
        c = load_config(f"configs/tiny/{name}.py")
        with c.unlocked():
            c.total_steps, c.log_every, c.export_hf, c.micro_batches, c.eval_every = 3, 1, False, 2, 0
            c.data.packing = packing
            c.data.packed_row_buckets = 1
        return c

    padded = registry.run(cfg(False), str(tmp_path / "padded"))
    packed = registry.run(cfg(True), str(tmp_path / "packed"))
    np.testing.assert_allclose(
        [h["loss"] for h in packed["history"]], [h["loss"] for h in padded["history"]], rtol=2e-4, atol=1e-5
    )
    assert packed["history"][-1]["perf/compiles"] == 1  # one row count for every batch
    assert math.isfinite(packed["history"][-1]["loss"])
