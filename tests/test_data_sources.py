"""Sources: local files in every format and schema, save_to_disk dirs, splits, sub-sampling, config."""

import os

import datasets
import numpy as np
import pytest

from jaxrlhf import data

HERE = os.path.dirname(__file__)
FIX = os.path.join(HERE, "fixtures", "data")
TOKS = os.path.join(HERE, "fixtures", "tokenizers")


@pytest.fixture(scope="module")
def tok():
    return data.load_tokenizer(os.path.join(TOKS, "char_chat"))


def cfg(name, **kw):
    kw.setdefault("max_prompt_length", 96)
    kw.setdefault("max_length", 160)
    return data.default_data_config(path=os.path.join(FIX, name), **kw)


@pytest.mark.parametrize(
    "name,kind,schema,n,drops",
    [
        ("sft_prompt_completion.jsonl", "sft", "prompt_completion", 40, {}),
        ("sft_prompt_completion.parquet", "sft", "prompt_completion", 24, {}),
        ("sft_messages.jsonl", "sft", "messages", 30, {}),
        ("sft_text.jsonl", "sft", "text", 30, {}),
        ("pref_prompt_chosen_rejected.jsonl", "preference", "preference", 38,
         {"schema_error": 1, "identical_after_truncation": 1}),
        ("pref_prompt_chosen_rejected.csv", "preference", "preference", 23,
         {"identical_after_truncation": 1}),
        ("hh_rlhf.jsonl", "preference", "hh_rlhf", 30, {}),
        ("ultrafeedback.jsonl", "preference", "ultrafeedback", 30, {}),
        ("prompts.jsonl", "prompt", "prompt", 30, {}),
        ("hh_rlhf.jsonl", "prompt", "hh_rlhf", 30, {}),
    ],
)  # fmt: skip
def test_every_fixture_loads(tok, name, kind, schema, n, drops):
    ds = data.build_dataset(cfg(name), tok, kind)
    assert (ds.kind, ds.schema, len(ds), dict(ds.drop_stats)) == (kind, schema, n, drops)
    T = int(ds.lengths.max())
    b = ds.collate(list(range(min(4, len(ds)))), T, ds.pad_id, "left" if kind == "prompt" else "right")
    for k, v in b.items():
        assert v.dtype == (np.float32 if k == "margin" else np.int32), k
    if kind != "prompt":
        for k in [k for k in b if k.endswith("loss_mask")]:
            last = b[k.replace("loss_mask", "attention_mask")].sum(1) - 1
            assert (b[k].sum(1) > 0).all()
            # The final token of every untruncated sequence is the EOS, inside the loss mask.
            ids = b[k.replace("loss_mask", "input_ids")]
            for r in range(len(last)):
                if ids[r, last[r]] == ds.eos_id:
                    assert b[k][r, last[r]] == 1


def test_pref_fixture_drop_rows_named(tok):
    ds = data.build_dataset(cfg("pref_prompt_chosen_rejected.jsonl"), tok, "preference")
    assert ds.drop_stats.examples == {"identical_after_truncation": [(7, "chosen/rejected")],
                                      "schema_error": [(11, "rejected")]}  # fmt: skip
    assert ds.margin.dtype == np.float32 and ds.margin.max() > 0


def test_save_to_disk_and_named_splits(tok, tmp_path):
    rows = datasets.load_dataset(
        "json", data_files=os.path.join(FIX, "sft_prompt_completion.jsonl"), split="train"
    )
    single = str(tmp_path / "single")
    rows.save_to_disk(single)
    ds = data.build_dataset(
        data.default_data_config(path=single, max_length=160, max_prompt_length=96), tok, "sft"
    )
    assert len(ds) == 40
    dd = datasets.DatasetDict({"train": rows.select(range(30)), "test": rows.select(range(30, 40))})
    both = str(tmp_path / "dict")
    dd.save_to_disk(both)
    c = data.default_data_config(path=both, eval_split="test", max_length=160, max_prompt_length=96)
    train, ev = data.build_datasets(c, tok, "sft")
    assert (len(train), len(ev)) == (30, 10)
    with pytest.raises(ValueError, match="split 'nope' not in"):
        data.load_rows(data.default_data_config(path=both, split="nope"), "train")
    # eval_split may also be a path to another file.
    c = cfg("sft_prompt_completion.jsonl", eval_split=os.path.join(FIX, "sft_prompt_completion.parquet"))
    assert len(data.build_dataset(c, tok, "sft", "eval")) == 24


def test_eval_fraction_holds_out_disjoint_rows():
    c = cfg("sft_prompt_completion.jsonl", eval_fraction=0.25, seed=5)
    (train, ti), (ev, ei) = data.load_rows(c, "train"), data.load_rows(c, "eval")
    assert (len(train), len(ev)) == (30, 10)
    assert not set(ti) & set(ei) and sorted(set(ti) | set(ei)) == list(range(40))
    assert train[0] == datasets.load_dataset("json", data_files=c.path, split="train")[int(ti[0])]
    with pytest.raises(ValueError, match="no eval rows"):
        data.load_rows(cfg("sft_prompt_completion.jsonl"), "eval")


def test_max_samples_seeded_subset(tok):
    a = data.load_rows(cfg("sft_prompt_completion.jsonl", max_samples=7, seed=1), "train")[1]
    b = data.load_rows(cfg("sft_prompt_completion.jsonl", max_samples=7, seed=1), "train")[1]
    c = data.load_rows(cfg("sft_prompt_completion.jsonl", max_samples=7, seed=2), "train")[1]
    assert len(a) == 7 and list(a) == sorted(a) and list(a) == list(b) and list(a) != list(c)
    # Drop reports name rows of the source file, not of the subset.
    ds = data.build_dataset(
        cfg("pref_prompt_chosen_rejected.jsonl", max_samples=39, seed=0), tok, "preference"
    )
    kept = data.load_rows(cfg("pref_prompt_chosen_rejected.jsonl", max_samples=39, seed=0), "train")[1]
    assert set(ds.source_index) <= set(kept)
    for reason in ds.drop_stats:
        assert set(ds.drop_stats.rows(reason)) <= {7, 11}


def test_config_errors():
    with pytest.raises(ValueError, match=r"unknown keys \['max_len'\]"):
        data.check_data_config({"max_len": 5})
    with pytest.raises(ValueError, match="truncation must be 'left' or 'drop'"):
        data.default_data_config(truncation="right")
    with pytest.raises(ValueError, match="response_truncation"):
        data.default_data_config(response_truncation="left")
    with pytest.raises(ValueError, match="max_prompt_length < max_length"):
        data.default_data_config(max_prompt_length=64, max_length=64)
    with pytest.raises(ValueError, match="unsupported data file"):
        data.load_rows(data.default_data_config(path=os.path.join(TOKS, "build.py")), "train")


class _Recorder(dict):
    """A config section that records which keys the code reads."""

    def __init__(self, values):
        super().__init__(values)
        self.read = set()

    def __getattr__(self, key):
        self.read.add(key)
        return self[key]

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)


def test_every_config_key_is_read(tok):
    values = dict(data.DATA_DEFAULTS, path=os.path.join(FIX, "sft_messages.jsonl"), max_prompt_length=96,
                  max_length=160, eval_fraction=0.2)  # fmt: skip
    rec = _Recorder(values)
    train, _ = data.build_datasets(rec, tok, "sft")
    data.BatchIterator.from_config(train, rec, 4, process_index=0, process_count=1)
    assert rec.read == set(data.DATA_CONFIG_KEYS)


def test_trainer_config_section_is_accepted(tok):
    # The trainer's section may omit keys (defaults apply) and use "" for "no eval split".
    section = {k: v for k, v in data.DATA_DEFAULTS.items() if k != "chat_template"}
    section.update(
        path=os.path.join(FIX, "prompts.jsonl"), eval_split="", max_prompt_length=32, max_length=64
    )
    import ml_collections

    train, ev = data.build_datasets(ml_collections.ConfigDict(section), tok, "prompt")
    assert len(train) == 30 and ev is None
