"""Golden masks for every schema, written out by hand for character-level tokenizers.

Each tokenizer in tests/fixtures/tokenizers maps one printable character to one token, so an
expected sequence is spelled as a list of characters and special tokens.
"""

import os

import numpy as np
import pytest

from jaxrlhf import data

TOK_DIR = os.path.join(os.path.dirname(__file__), "fixtures", "tokenizers")


@pytest.fixture(scope="module")
def toks():
    return {
        n: data.load_tokenizer(os.path.join(TOK_DIR, n)) for n in ("char_pad_eos", "char_bos", "char_chat")
    }


def cfg(**kw):
    kw.setdefault("max_prompt_length", 16)
    kw.setdefault("max_length", 32)
    return data.default_data_config(**kw)


def spell(tok, *parts):
    """Ids of ``parts``: a special-token name is one token, any other string one token per char."""
    ids = []
    for p in parts:
        if p in tok.all_special_tokens:
            ids.append(tok.convert_tokens_to_ids(p))
        else:
            ids += tok.convert_tokens_to_ids(list(p))
    return ids


def padded(ids, T, pad, left=False):
    fill = [pad] * (T - len(ids))
    return fill + ids if left else ids + fill


def collate(ds, T=None, side="right"):
    T = T or int(-(-ds.lengths.max() // 8) * 8)
    return ds.collate(list(range(len(ds))), T, ds.pad_id, side)


# ---------------------------------------------------------------------------------------------
# Tokenizer facts
# ---------------------------------------------------------------------------------------------


def test_tokenizer_fixtures(toks):
    t = toks["char_pad_eos"]
    assert t.pad_token_id == t.eos_token_id and data.start_ids(t) == []
    t = toks["char_bos"]
    assert data.start_ids(t) == [t.bos_token_id] and t.pad_token_id != t.eos_token_id
    assert toks["char_chat"].chat_template and data.start_ids(toks["char_chat"]) == []


# ---------------------------------------------------------------------------------------------
# SFT
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["right", "left"])
def test_prompt_completion_pad_eq_eos_golden(toks, side):
    tok = toks["char_pad_eos"]
    eos = tok.eos_token_id
    ds = data.tokenize_rows([{"prompt": "Hi", "completion": " yo"}], cfg(), tok, "sft")
    b = collate(ds, T=8, side=side)
    left = side == "left"
    ids = spell(tok, "Hi", " yo", "</s>")
    assert ds.pad_id == eos
    np.testing.assert_array_equal(b["input_ids"][0], padded(ids, 8, eos, left))
    np.testing.assert_array_equal(b["attention_mask"][0], padded([1, 1, 1, 1, 1, 1], 8, 0, left))
    # The EOS (same id as padding) is in the loss mask; the prompt is not.
    np.testing.assert_array_equal(b["loss_mask"][0], padded([0, 0, 1, 1, 1, 1], 8, 0, left))
    np.testing.assert_array_equal(b["positions"][0], padded([0, 1, 2, 3, 4, 5], 8, 0, left))
    assert set(b) == {"input_ids", "attention_mask", "loss_mask", "positions"}
    assert all(v.dtype == np.int32 and v.shape == (1, 8) for v in b.values())


def test_eos_appended_exactly_once(toks):
    tok = toks["char_pad_eos"]
    rows = [{"prompt": "Hi", "completion": " yo</s>"}, {"prompt": "Hi", "completion": " yo"}]
    ds = data.tokenize_rows(rows, cfg(), tok, "sft")
    for ids in ds.ids:
        assert ids.tolist() == spell(tok, "Hi", " yo", "</s>")


def test_bos_added_once(toks):
    tok = toks["char_bos"]
    rows = [{"prompt": "Hi", "completion": "yo"}, {"prompt": "<s>Hi", "completion": "yo"}]
    ds = data.tokenize_rows(rows, cfg(), tok, "sft")
    b = collate(ds, T=8)
    for r in range(2):
        np.testing.assert_array_equal(b["input_ids"][r], padded(spell(tok, "<s>", "Hi", "yo", "</s>"), 8, 1))
        np.testing.assert_array_equal(b["loss_mask"][r], [0, 0, 0, 1, 1, 1, 0, 0])
        np.testing.assert_array_equal(b["positions"][r], [0, 1, 2, 3, 4, 5, 0, 0])
    assert not ds.edit_stats


def test_joint_tokenization_mismatch_counted(toks):
    tok = toks["char_bos"]  # merges "l" + "o": "hel" + "o" jointly is [h, e, lo]
    rows = [{"prompt": "hel", "completion": "o"}, {"prompt": "ab", "completion": "cd"}]
    ds = data.tokenize_rows(rows, cfg(), tok, "sft")
    assert ds.edit_stats["joint_tokenization_mismatch"] == 1
    assert ds.edit_stats.rows("joint_tokenization_mismatch") == [0]
    # The separate tokenization is kept: the tokenized prompt is a prefix of prompt + response.
    assert ds.ids[0].tolist() == spell(tok, "<s>", "hel", "o", "</s>")
    assert ds.prompt_lens[0] == 4


def test_text_schema_golden(toks):
    tok = toks["char_pad_eos"]
    ds = data.tokenize_rows([{"text": "abc"}], cfg(), tok, "sft")
    b = collate(ds, T=8)
    np.testing.assert_array_equal(b["input_ids"][0], padded(spell(tok, "abc", "</s>"), 8, tok.eos_token_id))
    # The first token has no predecessor, so the loss predicts tokens 1.. only.
    np.testing.assert_array_equal(b["loss_mask"][0], [0, 1, 1, 1, 0, 0, 0, 0])
    tok = toks["char_bos"]
    ds = data.tokenize_rows([{"text": "abc"}], cfg(), tok, "sft")
    b = collate(ds, T=8)
    np.testing.assert_array_equal(b["input_ids"][0], padded(spell(tok, "<s>", "abc", "</s>"), 8, 1))
    np.testing.assert_array_equal(b["loss_mask"][0], [0, 1, 1, 1, 1, 0, 0, 0])


@pytest.mark.parametrize("side", ["right", "left"])
def test_messages_chat_template_golden(toks, side):
    tok = toks["char_chat"]
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    ds = data.tokenize_rows([{"messages": msgs}], cfg(max_prompt_length=24, max_length=40), tok, "sft")
    prompt = spell(tok, "<|im_start|>", "user\nhi", "<|im_end|>", "\n", "<|im_start|>", "assistant\n")
    response = spell(tok, "yo", "<|im_end|>")  # EOS once: the template's trailing "\n" is cut
    n = len(prompt) + len(response)
    assert n == 24
    left = side == "left"
    b = collate(ds, T=32, side=side)
    pad = tok.pad_token_id
    np.testing.assert_array_equal(b["input_ids"][0], padded(prompt + response, 32, pad, left))
    np.testing.assert_array_equal(b["loss_mask"][0], padded([0] * 21 + [1, 1, 1], 32, 0, left))
    np.testing.assert_array_equal(b["attention_mask"][0], padded([1] * 24, 32, 0, left))
    np.testing.assert_array_equal(b["positions"][0], padded(list(range(24)), 32, 0, left))


def test_messages_without_template_use_hh_format(toks):
    tok = toks["char_pad_eos"]
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    ds = data.tokenize_rows([{"messages": msgs}], cfg(max_prompt_length=24, max_length=40), tok, "sft")
    prompt = "\n\nHuman: hi\n\nAssistant:"
    assert ds.ids[0].tolist() == spell(tok, prompt, " yo", "</s>")
    assert ds.prompt_lens[0] == len(prompt)
    with pytest.raises(ValueError, match="no chat template"):
        data.tokenize_rows([{"messages": msgs}], cfg(chat_template=True), tok, "sft")
    # chat_template=False ignores a tokenizer's template.
    ds = data.tokenize_rows(
        [{"messages": msgs}],
        cfg(chat_template=False, max_prompt_length=24, max_length=40),
        toks["char_chat"],
        "sft",
    )
    assert ds.ids[0].tolist() == spell(toks["char_chat"], prompt, " yo", "<|im_end|>")


def test_multi_turn_messages_train_on_last_assistant_only(toks):
    tok = toks["char_chat"]
    msgs = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]
    ds = data.tokenize_rows([{"messages": msgs}], cfg(max_prompt_length=60, max_length=64), tok, "sft")
    b = collate(ds)
    n = int(ds.lengths[0])
    np.testing.assert_array_equal(b["loss_mask"][0, :n], [0] * (n - 2) + [1, 1])
    assert b["input_ids"][0, n - 2 : n].tolist() == spell(tok, "d", "<|im_end|>")


# ---------------------------------------------------------------------------------------------
# Preference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["right", "left"])
def test_preference_pair_golden(toks, side):
    tok = toks["char_pad_eos"]
    eos, left = tok.eos_token_id, side == "left"
    row = {"prompt": "Q", "chosen": " ab", "rejected": " c", "margin": 1.5}
    ds = data.tokenize_rows([row], cfg(), tok, "preference")
    b = collate(ds, T=8, side=side)
    np.testing.assert_array_equal(
        b["chosen_input_ids"][0], padded(spell(tok, "Q", " ab", "</s>"), 8, eos, left)
    )
    np.testing.assert_array_equal(b["chosen_attention_mask"][0], padded([1] * 5, 8, 0, left))
    np.testing.assert_array_equal(b["chosen_loss_mask"][0], padded([0, 1, 1, 1, 1], 8, 0, left))
    np.testing.assert_array_equal(b["chosen_positions"][0], padded([0, 1, 2, 3, 4], 8, 0, left))
    np.testing.assert_array_equal(
        b["rejected_input_ids"][0], padded(spell(tok, "Q", " c", "</s>"), 8, eos, left)
    )
    np.testing.assert_array_equal(b["rejected_attention_mask"][0], padded([1] * 4, 8, 0, left))
    np.testing.assert_array_equal(b["rejected_loss_mask"][0], padded([0, 1, 1, 1], 8, 0, left))
    np.testing.assert_array_equal(b["rejected_positions"][0], padded([0, 1, 2, 3], 8, 0, left))
    assert b["margin"].dtype == np.float32 and b["margin"].tolist() == [1.5]
    halves = {"input_ids", "attention_mask", "loss_mask", "positions"}
    assert set(b) == {f"{h}_{k}" for h in ("chosen", "rejected") for k in halves} | {"margin"}


def test_preference_margin_defaults_to_zero(toks):
    rows = [{"prompt": "Q", "chosen": " a", "rejected": " b"}]
    ds = data.tokenize_rows(rows, cfg(), toks["char_pad_eos"], "preference")
    assert collate(ds)["margin"].tolist() == [0.0]


def test_hh_rlhf_split_and_golden(toks):
    chosen = "\n\nHuman: hi\n\nAssistant: yo\n\nHuman: ok?\n\nAssistant: I can"
    rejected = "\n\nHuman: hi\n\nAssistant: yo\n\nHuman: ok?\n\nAssistant: I cannot"
    prompt, c, r = data.split_hh(chosen, rejected)
    # The shared " I can" is not part of the prompt: the prompt ends at the last Assistant tag.
    assert prompt == "\n\nHuman: hi\n\nAssistant: yo\n\nHuman: ok?\n\nAssistant:"
    assert (c, r) == (" I can", " I cannot")
    tok = toks["char_bos"]
    ds = data.tokenize_rows(
        [{"chosen": chosen, "rejected": rejected}],
        cfg(max_prompt_length=60, max_length=80),
        tok,
        "preference",
    )
    assert ds.schema == "hh_rlhf"
    b = collate(ds)
    P = 1 + len(prompt)
    nc, nr = P + len(c) + 1, P + len(r) + 1
    np.testing.assert_array_equal(b["chosen_loss_mask"][0, : nc + 1], [0] * P + [1] * (nc - P) + [0])
    np.testing.assert_array_equal(b["rejected_loss_mask"][0, : nr + 1], [0] * P + [1] * (nr - P) + [0])
    assert b["chosen_input_ids"][0, :nc].tolist() == spell(tok, "<s>", prompt, c, "</s>")
    assert b["rejected_input_ids"][0, :nr].tolist() == spell(tok, "<s>", prompt, r, "</s>")


def test_ultrafeedback_golden(toks):
    tok = toks["char_chat"]
    row = {
        "prompt": "hi",
        "chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
        "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "no!"}],
        "score_chosen": 8.0,
    }
    ds = data.tokenize_rows([row], cfg(max_prompt_length=24, max_length=40), tok, "preference")
    assert ds.schema == "ultrafeedback"
    prompt = spell(tok, "<|im_start|>", "user\nhi", "<|im_end|>", "\n", "<|im_start|>", "assistant\n")
    b = collate(ds, T=32)
    assert b["chosen_input_ids"][0, :24].tolist() == prompt + spell(tok, "yo", "<|im_end|>")
    assert b["rejected_input_ids"][0, :25].tolist() == prompt + spell(tok, "no!", "<|im_end|>")
    np.testing.assert_array_equal(b["chosen_loss_mask"][0], [0] * 21 + [1] * 3 + [0] * 8)
    np.testing.assert_array_equal(b["rejected_loss_mask"][0], [0] * 21 + [1] * 4 + [0] * 7)
    # Without a template the conversation uses the HH format.
    ds = data.tokenize_rows(
        [row], cfg(max_prompt_length=24, max_length=40), toks["char_pad_eos"], "preference"
    )
    assert ds.chosen_ids[0].tolist() == spell(toks["char_pad_eos"], " yo", "</s>")


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------


def test_prompt_dataset_left_padded_with_extras(toks):
    tok = toks["char_bos"]
    rows = [
        {"prompt": "ab", "answer": "1", "test_cases": ["x"]},
        {"prompt": "abcd", "answer": "2", "test_cases": []},
    ]
    ds = data.tokenize_rows(rows, cfg(), tok, "prompt")
    b = ds.collate([1, 0], 8, ds.pad_id)
    pad = tok.pad_token_id
    np.testing.assert_array_equal(b["prompt_ids"][0], padded(spell(tok, "<s>", "abcd"), 8, pad, left=True))
    np.testing.assert_array_equal(b["prompt_ids"][1], padded(spell(tok, "<s>", "ab"), 8, pad, left=True))
    np.testing.assert_array_equal(b["prompt_mask"], [[0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1, 1, 1]])
    assert b["index"].tolist() == [1, 0] and set(b) == {"prompt_ids", "prompt_mask", "index"}
    assert ds.row(int(b["index"][0])) == {
        "answer": "2",
        "test_cases": [],
        "prompt": "abcd",
        "source_index": 1,
    }
    with pytest.raises(ValueError, match="left-padded"):
        ds.collate([0], 8, ds.pad_id, "right")


def test_prompt_dataset_chat_generation_prompt(toks):
    tok = toks["char_chat"]
    ds = data.tokenize_rows(
        [{"prompt": [{"role": "user", "content": "hi"}]}], cfg(max_prompt_length=24), tok, "prompt"
    )
    assert ds.prompt_ids[0].tolist() == spell(
        tok, "<|im_start|>", "user\nhi", "<|im_end|>", "\n", "<|im_start|>", "assistant\n"
    )


# ---------------------------------------------------------------------------------------------
# Length policy and drops
# ---------------------------------------------------------------------------------------------


def test_prompt_left_truncation_keeps_bos_and_end(toks):
    tok = toks["char_bos"]
    ds = data.tokenize_rows(
        [{"prompt": "abcdefgh", "completion": "z"}], cfg(max_prompt_length=5, max_length=8), tok, "sft"
    )
    assert ds.ids[0].tolist() == spell(tok, "<s>", "efgh", "z", "</s>")
    assert ds.edit_stats["prompt_truncated"] == 1 and not ds.drop_stats


def test_response_truncation_cuts_eos(toks):
    tok = toks["char_pad_eos"]
    ds = data.tokenize_rows(
        [{"prompt": "ab", "completion": "cdefgh"}], cfg(max_prompt_length=4, max_length=6), tok, "sft"
    )
    assert ds.ids[0].tolist() == spell(tok, "ab", "cdef")  # no EOS: the model must not learn to stop here
    b = collate(ds, T=8)
    np.testing.assert_array_equal(b["loss_mask"][0], [0, 0, 1, 1, 1, 1, 0, 0])
    assert ds.edit_stats["response_truncated"] == 1


def test_each_drop_reason_counted(toks):
    tok = toks["char_pad_eos"]
    c = cfg(max_prompt_length=4, max_length=8, truncation="drop", response_truncation="drop")
    sft = [
        {"prompt": "ab", "completion": "cd"},  # kept
        {"prompt": "abcdefg", "completion": "x"},  # prompt_too_long
        {"prompt": "ab", "completion": "cdefghij"},  # response_too_long
        {"prompt": "ab", "completion": "   "},  # empty_response
        {"prompt": "ab", "completion": None},  # schema_error
        {"prompt": None, "completion": "x"},  # schema_error
    ]
    ds = data.tokenize_rows(sft, c, tok, "sft")
    assert len(ds) == 1 and ds.source_index.tolist() == [0]
    assert dict(ds.drop_stats) == {
        "prompt_too_long": 1,
        "response_too_long": 1,
        "empty_response": 1,
        "schema_error": 2,
    }
    assert ds.drop_stats.examples["schema_error"] == [(4, "completion"), (5, "prompt")]
    assert ds.drop_stats.rows("prompt_too_long") == [1]
    # Pairs identical after truncation (and pairs identical to begin with) are dropped.
    c = cfg(max_prompt_length=4, max_length=6)
    pref = [
        {"prompt": "ab", "chosen": "cdef1", "rejected": "cdef2"},  # identical once cut to 4 tokens
        {"prompt": "ab", "chosen": "x", "rejected": "x"},
        {"prompt": "ab", "chosen": "x", "rejected": "y"},
        {"prompt": "ab", "chosen": "x", "rejected": ""},
    ]
    ds = data.tokenize_rows(pref, c, tok, "preference")
    assert len(ds) == 1 and ds.source_index.tolist() == [2]
    assert dict(ds.drop_stats) == {"identical_after_truncation": 2, "empty_response": 1}
    assert ds.drop_stats.examples["empty_response"] == [(3, "rejected")]
    ds = data.tokenize_rows([{"prompt": "ab"}, {"prompt": " "}], c, tok, "prompt")
    assert dict(ds.drop_stats) == {"empty_prompt": 1}
    # A prompt-only conversation cannot train SFT.
    ds = data.tokenize_rows(
        [
            {"messages": [{"role": "user", "content": "a"}]},
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        ],
        cfg(max_prompt_length=30, max_length=40),
        tok,
        "sft",
    )
    assert ds.drop_stats.examples["schema_error"] == [(0, "messages")]


def test_drop_stats_logged_once(toks, caplog):
    rows = [{"prompt": "ab", "completion": "cd"}, {"prompt": "ab", "completion": None}]
    with caplog.at_level("INFO", logger="jaxrlhf.data"):
        data.tokenize_rows(rows, cfg(), toks["char_pad_eos"], "sft")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "schema_error=1" in warnings[0] and "1[completion]" in warnings[0]


def test_strict_mode_errors_name_row_reason_key(toks):
    tok = toks["char_pad_eos"]
    rows = [{"prompt": "ab", "completion": "cd"}, {"prompt": "ab", "completion": None}]
    with pytest.raises(data.DataError, match=r"row 1 dropped \(schema_error\) at key 'completion'"):
        data.tokenize_rows(rows, cfg(strict=True), tok, "sft")
    rows = [{"prompt": "abcdefg", "completion": "x"}]
    with pytest.raises(data.DataError, match=r"row 0 dropped \(prompt_too_long\) at key 'prompt'"):
        data.tokenize_rows(
            rows, cfg(max_prompt_length=4, max_length=8, truncation="drop", strict=True), tok, "sft"
        )
    # Truncation is an alteration, not a drop: strict mode allows it (and counts it).
    ds = data.tokenize_rows(rows, cfg(max_prompt_length=4, max_length=8, strict=True), tok, "sft")
    assert ds.edit_stats["prompt_truncated"] == 1


def test_schema_detection_and_errors(toks):
    tok = toks["char_pad_eos"]
    with pytest.raises(ValueError, match=r"columns \['foo', 'text2'\].*accepted schemas"):
        data.tokenize_rows([{"foo": 1, "text2": "a"}], cfg(), tok, "sft")
    with pytest.raises(ValueError, match="cannot feed a 'preference' dataset"):
        data.tokenize_rows([{"text": "a"}], cfg(), tok, "preference")
    with pytest.raises(ValueError, match="unknown config.data.schema"):
        data.tokenize_rows([{"text": "a"}], cfg(schema="nope"), tok, "sft")
    # SFT on a preference dataset trains on the chosen response.
    ds = data.tokenize_rows([{"prompt": "Q", "chosen": " a", "rejected": " b"}], cfg(), tok, "sft")
    assert ds.ids[0].tolist() == spell(tok, "Q", " a", "</s>")


def test_template_with_bos_text_gives_one_bos():
    # Llama-3 style: the template writes the BOS text and the tokenizer also adds BOS.
    tok = data.load_tokenizer(os.path.join(TOK_DIR, "char_bos"))
    tok.chat_template = (
        "<s>{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% if m['role'] == 'assistant' %}</s>"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    ds = data.tokenize_rows([{"messages": msgs}], cfg(max_prompt_length=24, max_length=40), tok, "sft")
    assert ds.ids[0].tolist() == spell(tok, "<s>", "[user]hi[assistant]", "yo", "</s>")
    assert ds.prompt_lens[0] == 20 and not ds.edit_stats


def test_template_prefix_mismatch_counted():
    # A template whose prompt rendering is not a prefix of the full conversation's rendering.
    tok = data.load_tokenizer(os.path.join(TOK_DIR, "char_chat"))
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}:{{ m['content'] }};{% endfor %}"
        "{% if add_generation_prompt %}NEXT:{% endif %}"
    )
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    ds = data.tokenize_rows([{"messages": msgs}], cfg(), tok, "sft")
    assert ds.edit_stats.examples["template_prefix_mismatch"] == [(0, "response")]
    assert ds.ids[0].tolist() == spell(tok, "user:hi;NEXT:", "yo", "<|im_end|>")
