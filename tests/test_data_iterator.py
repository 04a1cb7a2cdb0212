"""BatchIterator: determinism, resume, multi-host shards, bucketing, packing, padding options."""

import json
import os

import numpy as np
import pytest

from jaxrlhf import data

HERE = os.path.dirname(__file__)
TOK = os.path.join(HERE, "fixtures", "tokenizers", "char_bos")
FIX = os.path.join(HERE, "fixtures", "data")


@pytest.fixture(scope="module")
def tok():
    return data.load_tokenizer(TOK)


def _rows(n, seed=0):
    rng = np.random.default_rng(seed)
    return [
        {
            "prompt": f"{i}:" + "p" * int(rng.integers(1, 10)),
            "completion": "c" * int(rng.integers(1, 30)),
            "id": i,
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def sft(tok):
    return data.tokenize_rows(
        _rows(43), data.default_data_config(max_prompt_length=16, max_length=48), tok, "sft"
    )


@pytest.fixture(scope="module")
def pref(tok):
    cfg = data.default_data_config(
        path=os.path.join(FIX, "pref_prompt_chosen_rejected.jsonl"), max_prompt_length=64, max_length=96
    )
    return data.build_dataset(cfg, tok, "preference")


@pytest.fixture(scope="module")
def prompts(tok):
    cfg = data.default_data_config(
        path=os.path.join(FIX, "prompts.jsonl"), max_prompt_length=48, max_length=64
    )
    return data.build_dataset(cfg, tok, "prompt")


def _it(ds, B=8, **kw):
    kw.setdefault("process_index", 0)
    kw.setdefault("process_count", 1)
    kw.setdefault("seed", 3)
    return data.BatchIterator(ds, B, **kw)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _row_ids(sft, batch):
    """Example index of each row, recovered from its tokens (every example is unique here)."""
    lookup = {tuple(ids.tolist()): i for i, ids in enumerate(sft.ids)}
    out = []
    for ids, am in zip(batch["input_ids"], batch["attention_mask"], strict=True):
        out.append(lookup[tuple(ids[am > 0].tolist())] if am.any() else -1)
    return out


@pytest.mark.parametrize("mode", [{"bucket": False}, {"bucket": True}, {"packing": True}, {"shuffle": False}])
def test_state_round_trip(sft, mode):
    it = _it(sft, **mode)
    _take(it, 7)  # 43 // 8 = 5 steps per epoch: crosses an epoch
    state = json.loads(json.dumps(it.get_state()))  # JSON-able
    expected = _take(it, 9)
    fresh = _it(sft, **mode)
    fresh.set_state(state)
    _same(_take(fresh, 9), expected)


def test_state_mismatch_is_an_error(sft):
    state = _it(sft).get_state()
    with pytest.raises(ValueError, match="'global_batch_size'"):
        _it(sft, B=4).set_state(state)
    with pytest.raises(ValueError, match="'seed'"):
        _it(sft, seed=4).set_state(state)


def test_deterministic_and_epochs_reshuffle(sft):
    a, b = _take(_it(sft), 10), _take(_it(sft), 10)
    _same(a, b)
    e0 = [r for x in a[:5] for r in _row_ids(sft, x)]
    e1 = [r for x in a[5:] for r in _row_ids(sft, x)]
    assert len(set(e0)) == 40 and len(set(e1)) == 40  # each epoch: distinct rows, remainder of 3 left out
    assert e0 != e1
    other = [r for x in _take(_it(sft, seed=4), 5) for r in _row_ids(sft, x)]
    assert other != e0


@pytest.mark.parametrize("count", [2, 4])
@pytest.mark.parametrize("mode", [{"bucket": False}, {"bucket": True}, {"packing": True}])
def test_process_shards_disjoint_and_complete(sft, count, mode):
    whole = _take(_it(sft, **mode), 7)
    parts = [_take(_it(sft, process_index=p, process_count=count, **mode), 7) for p in range(count)]
    for step, full in enumerate(whole):
        for k in full:
            # Concatenating the processes' contiguous blocks gives the global batch: the shards are
            # disjoint (rows of a global batch are distinct examples) and cover it.
            np.testing.assert_array_equal(np.concatenate([p[step][k] for p in parts]), full[k], err_msg=k)
            assert all(p[step][k].shape[0] == 8 // count for p in parts)
        if "segment_ids" not in full:
            ids = _row_ids(sft, full)
            assert len(set(ids)) == len(ids)


def test_preference_shards_disjoint_and_complete(pref):
    whole = _take(_it(pref, B=4, bucket=True), 12)
    parts = [_take(_it(pref, B=4, bucket=True, process_index=p, process_count=2), 12) for p in range(2)]
    for step, full in enumerate(whole):
        for k in full:
            np.testing.assert_array_equal(np.concatenate([p[step][k] for p in parts]), full[k], err_msg=k)


def test_prompt_shards_and_index(prompts):
    it = [_it(prompts, B=8, process_index=p, process_count=2) for p in range(2)]
    for _ in range(3):
        a, b = next(it[0]), next(it[1])
        idx = np.concatenate([a["index"], b["index"]])
        assert len(set(idx.tolist())) == 8
        assert a["prompt_ids"].shape == b["prompt_ids"].shape  # T from the global batch
        for batch in (a, b):
            for ids, m, i in zip(batch["prompt_ids"], batch["prompt_mask"], batch["index"], strict=True):
                assert m[-1] == 1  # left-padded
                np.testing.assert_array_equal(ids[m > 0], prompts.prompt_ids[i])
                assert prompts.row(int(i))["answer"].isdigit()


def test_bucketing_reduces_padding(sft):
    def mean_pad(**kw):
        it = _it(sft, **kw)
        fr = []
        for _ in range(10):
            next(it)
            fr.append(it.padding_fraction)
        return float(np.mean(fr))

    plain, bucketed = (
        mean_pad(bucket=False, pad_to_multiple_of=1),
        mean_pad(bucket=True, pad_to_multiple_of=1),
    )
    assert bucketed < plain


def test_padding_fraction_exact(sft):
    it = _it(sft, pad_to_multiple_of=8)
    b = next(it)
    T = b["input_ids"].shape[1]
    assert it.last_padding_fraction == pytest.approx(1 - b["attention_mask"].sum() / (8 * T))


def test_sequence_lengths_limit_recompiles(sft, prompts):
    shapes = {next(it)["input_ids"].shape[1] for it in [_it(sft, pad_to_multiple_of=16)] for _ in range(12)}
    assert all(t % 16 == 0 or t == sft.max_length for t in shapes) and max(shapes) <= sft.max_length
    it = _it(sft, fixed_length=True)
    assert {next(it)["input_ids"].shape for _ in range(6)} == {(8, sft.max_length)}
    it = _it(prompts, fixed_length=True)
    assert next(it)["prompt_ids"].shape == (8, prompts.max_prompt_length)


def test_left_padding_batches(sft):
    b = next(_it(sft, padding_side="left"))
    r = next(_it(sft, padding_side="right"))
    for k in b:
        for lb, rb, am_l, am_r in zip(b[k], r[k], b["attention_mask"], r["attention_mask"], strict=True):
            np.testing.assert_array_equal(lb[am_l > 0], rb[am_r > 0])
    assert (b["attention_mask"][:, -1] == 1).all()


def test_preference_batches_keep_pairs_together(pref):
    it = _it(pref, B=4, bucket=True)
    for _ in range(4):
        b = next(it)
        T = b["chosen_input_ids"].shape[1]
        assert b["rejected_input_ids"].shape == (4, T) and b["margin"].shape == (4,)
        for r in range(4):
            c = b["chosen_input_ids"][r][b["chosen_attention_mask"][r] > 0]
            j = next(
                i
                for i in range(len(pref))
                if np.array_equal(np.concatenate([pref.prompt_ids[i], pref.chosen_ids[i]]), c)
            )
            rej = b["rejected_input_ids"][r][b["rejected_attention_mask"][r] > 0]
            np.testing.assert_array_equal(rej, np.concatenate([pref.prompt_ids[j], pref.rejected_ids[j]]))
            assert b["margin"][r] == pytest.approx(pref.margin[j])
            P = len(pref.prompt_ids[j])
            assert b["chosen_loss_mask"][r, :P].sum() == 0 and b["rejected_loss_mask"][r, :P].sum() == 0
            assert b["rejected_loss_mask"][r].sum() == len(pref.rejected_ids[j])
    packed = next(_it(pref, B=4, packing=True))  # packed pairs: see tests/test_train_step.py
    assert packed["segment_ids"].shape[1] == pref.max_length and packed["chosen_index"].shape == (4,)


def test_packing_prompt_datasets_is_an_error(prompts):
    with pytest.raises(
        ValueError, match="packing is supported for SFT and preference datasets, not 'prompt'"
    ):
        _it(prompts, packing=True)


def test_packing_segments_and_positions(sft):
    it = _it(sft, packing=True)
    seen = []
    for _ in range(it.steps_per_epoch):
        b = next(it)
        assert set(b) == {"input_ids", "attention_mask", "loss_mask", "positions", "segment_ids"}
        assert b["input_ids"].shape == (8, sft.max_length)
        np.testing.assert_array_equal(b["attention_mask"], b["segment_ids"] > 0)
        for r in range(8):
            seg = b["segment_ids"][r]
            n_seg = int(seg.max())
            assert (
                n_seg >= 1
                and (seg[seg > 0] == np.repeat(np.arange(1, n_seg + 1), np.bincount(seg)[1:])).all()
            )
            for s in range(1, n_seg + 1):
                where = np.flatnonzero(seg == s)
                ids = b["input_ids"][r, where]
                i = next(j for j in range(len(sft)) if np.array_equal(sft.ids[j], ids))
                seen.append(i)
                np.testing.assert_array_equal(b["positions"][r, where], np.arange(len(where)))
                lm = b["loss_mask"][r, where]
                np.testing.assert_array_equal(lm, np.arange(len(where)) >= sft.prompt_lens[i])
                assert lm[0] == 0  # never predicted across a segment boundary
            assert (b["positions"][r][seg == 0] == 0).all() and (b["loss_mask"][r][seg == 0] == 0).all()
    assert len(seen) == len(set(seen))
    assert it.padding_fraction < 0.5


def test_pack_first_fit():
    lengths = np.array([5, 3, 8, 2, 6, 1])
    bins = data.pack_first_fit(lengths, np.arange(6), 8)
    assert sorted(i for b in bins for i in b) == list(range(6))
    assert all(lengths[b].sum() <= 8 for b in bins) and len(bins) == 4
    with pytest.raises(ValueError, match="packing capacity"):
        data.pack_first_fit(np.array([9]), np.arange(1), 8)


def test_one_pass_without_drop_remainder(sft):
    it = _it(sft, repeat=False, drop_remainder=False, shuffle=False, bucket=False)
    batches = list(it)
    assert len(batches) == 6
    last = batches[-1]
    assert (
        it.last_num_rows == 3
        and (last["attention_mask"][3:] == 0).all()
        and (last["loss_mask"][3:] == 0).all()
    )
    ids = [i for b in batches for i in _row_ids(sft, b) if i >= 0]
    assert ids == list(range(43))


def test_iterator_defaults_come_from_config(tok):
    cfg = data.default_data_config(
        path=os.path.join(FIX, "sft_prompt_completion.jsonl"),
        max_prompt_length=32,
        max_length=96,
        packing=True,
        seed=7,
    )
    ds = data.build_dataset(cfg, tok, "sft")
    it = data.BatchIterator(ds, 4, process_index=0, process_count=1)
    assert it.packing and it.seed == 7 and it.bucket and it.shuffle
    assert "segment_ids" in next(it)
    it = data.BatchIterator.from_config(ds, cfg, 4, packing=False, process_index=0, process_count=1)
    assert not it.packing


def test_bad_arguments(sft):
    with pytest.raises(ValueError, match="divisible by process_count"):
        _it(sft, B=6, process_count=4)
    with pytest.raises(ValueError, match="no full global batch"):
        _it(sft, B=64)
