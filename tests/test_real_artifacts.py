"""Real third-party artifacts (../shared/real) through the data pipeline, the models and the CLI.

* HH-RLHF harmless test split with the Qwen2.5, Llama-3, Mistral and GPT-2 tokenizers: every kept
  pair's ids and masks, and every drop, equal an independent per-row computation with the
  tokenizer itself (the documented contract: BOS once, prompt and response tokenized separately,
  EOS once, the length policy).
* ``messages`` (multi-turn HH transcripts) and ``ultrafeedback`` (message lists) through the Qwen2.5
  and Qwen3 chat templates: the sequence is the template's own rendering of the conversation, the
  prompt (generation prompt) is a prefix of it, also with Qwen3's empty think block in the last
  assistant turn.
* The tiny trained Llama (aidreams260K): logits equal transformers' (<= 1e-4), greedy generation
  equals ``transformers.generate``, and an SFT -> DPO run from it through ``python -m jaxrlhf.train``.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxrlhf import data

ROOT = Path(__file__).resolve().parents[1]
REAL = Path(__file__).resolve().parents[2] / "shared" / "real"
MODEL = "model_llama_aidreams260k_hf"
HH_ASSISTANT = "\n\nAssistant:"

# Facts about the real tokenizers (their configs and PROVENANCE.md), written down independently of
# jaxrlhf: the id each one puts before a text (None: nothing) and its end-of-sequence token.
TOKENIZERS = {
    "tokenizer_qwen2_5_instruct": (None, "<|im_end|>"),
    "tokenizer_llama3_8b_instruct": (128000, "<|eot_id|>"),
    "tokenizer_mistral_7b_v0_1": (1, "</s>"),
    "tokenizer_gpt2": (None, "<|endoftext|>"),
}


def real(name: str) -> Path:
    path = REAL / name
    if not path.exists():
        pytest.skip(f"real artifact {name} absent: {REAL} (../shared/real) absent")
    return path


@pytest.fixture(scope="module")
def hh_rows():
    with gzip.open(real("hh_rlhf_harmless_test") / "test.jsonl.gz", "rt") as f:
        return [json.loads(line) for line in f][:600]


def _split_hh(row: dict) -> tuple[str, str, str] | None:
    """(prompt, chosen response, rejected response) cut after the chosen transcript's last
    Assistant tag, when the rejected transcript shares that prompt; None otherwise."""
    cut = row["chosen"].rfind(HH_ASSISTANT) + len(HH_ASSISTANT)
    prompt = row["chosen"][:cut]
    if cut < len(HH_ASSISTANT) or not row["rejected"].startswith(prompt):
        return None
    return prompt, row["chosen"][cut:], row["rejected"][cut:]


def _expected_pairs(rows, tok, bos, P, T, truncation, response_truncation):
    """Per source row: ("drop", reason) or ("keep", prompt_ids, chosen_ids, rejected_ids)."""
    start = [] if bos is None else [bos]
    out = {}
    for i, row in enumerate(rows):
        split = _split_hh(row)
        if split is None:
            continue
        prompt, chosen, rejected = split
        if not chosen.strip() or not rejected.strip():
            out[i] = ("drop", "empty_response")
            continue
        p = start + tok(prompt, add_special_tokens=False)["input_ids"]
        if len(p) > P:
            if truncation == "drop":
                out[i] = ("drop", "prompt_too_long")
                continue
            p = start + p[len(p) - (P - len(start)) :]
        halves = []
        for text in (chosen, rejected):
            ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            if len(p) + len(ids) > T:
                if response_truncation == "drop":
                    break
                ids = ids[: T - len(p)]
            halves.append(ids)
        if len(halves) < 2:
            out[i] = ("drop", "response_too_long")
        elif halves[0] == halves[1]:
            out[i] = ("drop", "identical_after_truncation")
        else:
            out[i] = ("keep", p, *halves)
    return out


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
@pytest.mark.parametrize("policy", [("drop", "drop"), ("left", "truncate")])
def test_hh_rlhf_pairs_masks_and_drops_with_real_tokenizers(hh_rows, name, policy):
    bos, eos_token = TOKENIZERS[name]
    tok = data.load_tokenizer(str(real(name)))
    assert tok.eos_token == eos_token
    P, T = 96, 192
    cfg = data.default_data_config(
        path="hh", schema="hh_rlhf", max_prompt_length=P, max_length=T, truncation=policy[0],
        response_truncation=policy[1],
    )  # fmt: skip
    ds = data.tokenize_rows(hh_rows, cfg, tok, "preference")
    expected = _expected_pairs(hh_rows, tok, bos, P, T, *policy)
    assert len(expected) >= 0.95 * len(hh_rows)  # rows the independent split understands

    drops = {}
    for kind, *rest in expected.values():
        if kind == "drop":
            drops[rest[0]] = drops.get(rest[0], 0) + 1
    assert dict(ds.drop_stats) == drops
    assert ds.edit_stats.get("joint_tokenization_mismatch", 0) == 0

    batch = ds.collate(list(range(len(ds))), T, ds.pad_id)
    checked = 0
    for b, src in enumerate(ds.source_index):
        if int(src) not in expected:
            continue
        kind, p, c, r = expected[int(src)]
        assert kind == "keep"
        for half, resp in (("chosen", c), ("rejected", r)):
            n = len(p) + len(resp)
            np.testing.assert_array_equal(batch[f"{half}_input_ids"][b, :n], p + resp)
            np.testing.assert_array_equal(batch[f"{half}_attention_mask"][b], np.arange(T) < n)
            np.testing.assert_array_equal(
                batch[f"{half}_loss_mask"][b], (np.arange(T) >= len(p)) & (np.arange(T) < n)
            )
        seq = batch["chosen_input_ids"][b, : len(p) + len(c)]
        assert (seq[0] == bos) == (bos is not None) and list(seq).count(bos) <= 1
        checked += 1
    assert checked >= 0.9 * len(ds)


def _hh_messages(transcript: str) -> list[dict]:
    parts = re.split(r"\n\n(Human|Assistant): ?", transcript)
    return [
        {"role": "user" if parts[i] == "Human" else "assistant", "content": parts[i + 1]}
        for i in range(1, len(parts) - 1, 2)
    ]


@pytest.mark.parametrize("name", ["tokenizer_qwen2_5_instruct", "tokenizer_qwen3"])
def test_chat_templates_messages_and_ultrafeedback(hh_rows, name):
    tok = data.load_tokenizer(str(real(name)))
    convs = [_hh_messages(r["chosen"]) for r in hh_rows[:150]]
    convs = [m for m in convs if len(m) >= 2 and m[-1]["role"] == "assistant" and m[-1]["content"].strip()]
    assert sum(len(m) > 2 for m in convs) > 50  # multi-turn conversations
    with open(real("ultrafeedback_binarized_subset") / "train_clean.jsonl") as f:
        uf = [json.loads(line) for line in f][:100]
    uf_rows = [
        {h: [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r[h]}]
         for h in ("chosen", "rejected")} for r in uf
    ]  # fmt: skip
    cfg = data.default_data_config(path="x", max_prompt_length=4096, max_length=8192)
    sft = data.tokenize_rows([{"messages": m} for m in convs], cfg, tok, "sft")
    # The hub's implicit-prompt layout (trl-lib/ultrafeedback_binarized: no prompt column); its
    # auto-detection is test_ultrafeedback_without_prompt_column_is_detected below.
    cfg_uf = data.default_data_config(
        path="x", schema="ultrafeedback", max_prompt_length=4096, max_length=8192
    )
    pref = data.tokenize_rows(uf_rows, cfg_uf, tok, "preference")
    assert (sft.schema, pref.schema) == ("messages", "ultrafeedback")
    assert len(sft) == len(convs) and len(pref) == len(uf_rows)
    assert not sft.edit_stats and not pref.edit_stats  # no template_prefix_mismatch, no tokenization mismatch
    eos = tok.convert_tokens_to_ids("<|im_end|>")

    def check(context, answer, prompt_ids, seq):
        prompt_text = tok.apply_chat_template(context, add_generation_prompt=True, tokenize=False)
        full_text = tok.apply_chat_template(
            context + [{"role": "assistant", "content": answer}], tokenize=False
        )
        assert full_text.startswith(prompt_text)
        assert list(prompt_ids) == tok(prompt_text, add_special_tokens=False)["input_ids"]
        assert list(seq[: len(prompt_ids)]) == list(prompt_ids)  # the prompt is a prefix of the sequence
        assert tok.decode(seq) == full_text.rstrip("\n")  # ... which is the template's own rendering
        assert seq[-1] == eos and list(seq[len(prompt_ids) :]).count(eos) == 1
        response = tok.decode(seq[len(prompt_ids) :])
        if "qwen3" in name:  # Qwen3 renders an empty think block into the final assistant turn
            assert response.startswith("<think>\n\n</think>\n\n")
        assert response.endswith(answer.strip() + "<|im_end|>")

    for i, conv in enumerate(convs):
        check(conv[:-1], conv[-1]["content"], sft.ids[i][: sft.prompt_lens[i]], sft.ids[i])
    for i, row in enumerate(uf_rows):
        for half in ("chosen", "rejected"):
            seq, plen = pref.sequence(i, half)
            check(row[half][:1], row[half][1]["content"], pref.prompt_ids[i], seq)


def test_ultrafeedback_without_prompt_column_is_detected():
    with open(real("ultrafeedback_binarized_subset") / "eval_clean.jsonl") as f:
        r = json.loads(f.readline())
    row = {h: [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r[h]}]
           for h in ("chosen", "rejected")}  # fmt: skip
    assert data.detect_schema(list(row), row) == "ultrafeedback"


# ---------------------------------------------------------------------------------------------
# The tiny real Llama
# ---------------------------------------------------------------------------------------------

TEXTS = [
    "Echoes of vectors unfold, a gentle hum",
    "I dream of circuits and of quiet light,",
    "The network sleeps",
]


@pytest.fixture(scope="module")
def llama():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import jax.numpy as jnp

    from jaxrlhf import models

    path = str(real(MODEL))
    ours = models.from_pretrained(path, dtype=jnp.float32, param_dtype=jnp.float32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    return ours, hf, tok


def test_tiny_llama_logits_equal_transformers(llama):
    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx

    ours, hf, tok = llama
    ids = [tok(t)["input_ids"] for t in TEXTS]
    assert all(x[0] == 1 for x in ids)  # BOS
    T = max(map(len, ids))
    batch = np.zeros((len(ids), T), np.int32)
    mask = np.zeros((len(ids), T), np.int32)
    for b, x in enumerate(ids):
        batch[b, : len(x)], mask[b, : len(x)] = x, 1
    positions = np.where(mask > 0, np.arange(T), 0).astype(np.int32)
    graphdef, params = nnx.split(ours)
    forward = jax.jit(lambda p, *a: nnx.merge(graphdef, p)(a[0], attention_mask=a[1], positions=a[2]))
    logits = np.asarray(forward(params, *map(jnp.asarray, (batch, mask, positions))))
    for b, x in enumerate(ids):
        with torch.no_grad():
            ref = hf(torch.tensor([x])).logits[0].numpy()
        np.testing.assert_allclose(logits[b, : len(x)], ref, atol=1e-4, rtol=0)
        assert np.abs(ref).max() > 1.0  # real, non-trivial logits


def test_tiny_llama_greedy_generation_equals_transformers(llama):
    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx

    from jaxrlhf import generation

    ours, hf, tok = llama
    prompts = [[1]] + [tok(t)["input_ids"] for t in TEXTS[:2]]  # BOS alone, then real text
    P, N = max(map(len, prompts)), 32
    ids = np.zeros((len(prompts), P), np.int32)
    mask = np.zeros((len(prompts), P), np.int32)
    for b, x in enumerate(prompts):  # left padding
        ids[b, P - len(x) :], mask[b, P - len(x) :] = x, 1
    graphdef, params = nnx.split(ours)
    sample = jax.jit(
        lambda p, i, m: generation.generate(
            graphdef, p, i, m, jax.random.key(0), max_new_tokens=N, pad_id=0, eos_ids=(tok.eos_token_id,),
            greedy=True,
        )
    )  # fmt: skip
    out = sample(params, jnp.asarray(ids), jnp.asarray(mask))
    got_ids, got_mask = np.asarray(out.response_ids), np.asarray(out.response_mask)
    for b, x in enumerate(prompts):
        with torch.no_grad():
            ref = hf.generate(
                torch.tensor([x]), max_new_tokens=N, do_sample=False, pad_token_id=tok.eos_token_id,
                eos_token_id=tok.eos_token_id,
            )[0, len(x) :].tolist()  # fmt: skip
        got = got_ids[b][got_mask[b] > 0].tolist()
        assert got == ref, (b, tok.decode(got), tok.decode(ref))
    assert len(set(map(tuple, got_ids.tolist()))) == len(prompts)  # three different continuations


def _nll(hf, tok, rows) -> float:
    """Mean NLL (transformers) of the completion tokens + EOS given BOS + prompt, over ``rows``."""
    import torch

    total, count = 0.0, 0
    for r in rows:
        p = tok(r["prompt"])["input_ids"]
        c = tok(r["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        x = torch.tensor([p + c])
        with torch.no_grad():
            logp = torch.log_softmax(hf(x).logits[0, :-1].float(), -1)
        tgt = x[0, 1:]
        lp = logp[torch.arange(len(tgt)), tgt][len(p) - 1 :]
        total, count = total - float(lp.sum()), count + len(lp)
    return total / count


def _run_cli(args, log):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [sys.executable, "-m", "jaxrlhf.train", *args], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    log.write_text(proc.stderr)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def _metric(log: str, step: int, key: str) -> float:
    m = re.search(rf"step {step}: .*?\b{re.escape(key)}=([-+0-9.e]+|nan|inf)", log)
    assert m, f"no {key} at step {step} in the log"
    return float(m.group(1))


@pytest.mark.slow
def test_sft_then_dpo_from_the_tiny_real_llama_through_the_cli(tmp_path):
    """SFT (6 steps) then DPO (3 steps) from the real checkpoint with its own tokenizer, through
    ``python -m jaxrlhf.train``; the exported SFT policy has a lower NLL on the SFT data than the
    original when measured by transformers, and DPO's first loss is ln 2 (policy == reference)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path = str(real(MODEL))
    common = ["--config.data.max_length=128", "--config.pad_to_multiple_of=128", "--config.log_every=1",
              f"--config.tokenizer={path}", "--config.checkpoint.async_save=False"]  # fmt: skip
    sft_dir, dpo_dir = tmp_path / "sft", tmp_path / "dpo"
    _run_cli(
        ["--config=configs/tiny/sft.py", f"--workdir={sft_dir}", f"--config.model.path={path}",
         "--config.total_steps=6", "--config.checkpoint.every=6", *common],
        tmp_path / "sft.log",
    )  # fmt: skip
    log = _run_cli(
        ["--config=configs/tiny/dpo.py", f"--workdir={dpo_dir}", f"--config.model.path={sft_dir / 'hf'}",
         "--config.total_steps=3", "--config.checkpoint.every=3", *common],
        tmp_path / "dpo.log",
    )  # fmt: skip
    assert _metric(log, 1, "dpo_loss") == pytest.approx(math.log(2), abs=1e-4)
    assert all(math.isfinite(_metric(log, s, "loss")) for s in (1, 2, 3))

    tok = transformers.AutoTokenizer.from_pretrained(path)
    with open(ROOT / "tests" / "fixtures" / "data" / "sft_prompt_completion.jsonl") as f:
        rows = [json.loads(line) for line in f]
    load = lambda p: transformers.AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32).eval()  # noqa: E731
    before, after = _nll(load(path), tok, rows), _nll(load(sft_dir / "hf"), tok, rows)
    assert after < before - 0.3, (before, after)
    with torch.no_grad():
        assert torch.isfinite(load(dpo_dir / "hf")(torch.tensor([[1, 303, 281]])).logits).all()
