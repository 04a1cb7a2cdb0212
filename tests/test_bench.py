"""Side-by-side benchmark harness: shared workload files, result-line maths, compare plumbing.

Never runs the peers (TRL, Tunix): their runners are exercised by `python -m jaxrlhf.bench.compare`
in their own venvs (docs/benchmarks.md). Runs in the main venv without torch.
"""

import hashlib
import json
import os
import sys

import numpy as np
import pytest

from jaxrlhf.bench import compare, results
from jaxrlhf.bench import workload as wl

TINY = wl.get_workload("tiny")


def _digest(d):
    out = {}
    for root, _, files in os.walk(d):
        for f in files:
            path = os.path.join(root, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, d)] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("bench") / "tiny")
    wl.prepare(d, TINY)
    return d


# ----------------------------------------------------------------------------------------- workload
def test_prepare_is_deterministic_and_skips_when_unchanged(tiny_dir, tmp_path):
    other = str(tmp_path / "again")
    wl.prepare(other, TINY)
    a, b = _digest(tiny_dir), _digest(other)
    a.pop("workload.json"), b.pop("workload.json")  # holds the (different) paths
    assert a == b and len(a) == 8
    stamp = os.path.join(other, "workload.json")
    mtime = os.path.getmtime(stamp)
    wl.prepare(other, TINY)  # same workload: nothing rewritten
    assert os.path.getmtime(stamp) == mtime
    wl.prepare(other, TINY.replace(seed=1))  # another workload: rebuilt
    with open(stamp) as f:
        assert json.load(f)["workload"]["seed"] == 1
    assert _digest(other)["data.jsonl"] != a["data.jsonl"]


def test_rows_have_variable_lengths_within_bounds(tiny_dir):
    w, p, rows = wl.load(tiny_dir)
    assert w == TINY and len(rows) == w.num_pairs
    seq = np.array([[r["n_prompt"] + r["n_chosen"] + 2, r["n_prompt"] + r["n_rejected"] + 2] for r in rows])
    assert seq.min() >= w.min_seq_tokens and seq.max() <= w.max_length
    assert len(np.unique(seq)) > 10  # variable lengths
    assert all(1 + r["n_prompt"] <= w.max_prompt_length for r in rows)
    assert all(r["n_chosen"] + 1 <= w.max_response_length for r in rows)
    assert all(r["chosen"].startswith(" ") and r["rejected"].startswith(" ") for r in rows)
    # the default workload spans 64..512 tokens (lengths only: no files written)
    lens = wl.sample_lengths(wl.DEFAULT, np.random.default_rng(0))
    tot = lens[:, :1] + lens[:, 1:] + 2
    assert tot.min() >= 64 and tot.max() <= 512 and tot.max() > 400


def test_tokenizer_counts_match_rows(tiny_dir):
    from tokenizers import Tokenizer

    _, p, rows = wl.load(tiny_dir)
    tok = Tokenizer.from_file(os.path.join(p["tokenizer"], "tokenizer.json"))
    assert tok.get_vocab_size() == TINY.vocab_size
    for r in rows[:8]:
        # TRL's path: prompt + chosen + "</s>" as one string, <s> added by the post-processor
        ids = tok.encode(r["prompt"] + r["chosen"] + "</s>").ids
        assert ids[0] == wl.BOS_ID and ids[-1] == wl.EOS_ID and wl.UNK_ID not in ids
        assert len(ids) == r["n_prompt"] + r["n_chosen"] + 2
        assert tok.encode(r["prompt"]).ids == ids[: r["n_prompt"] + 1]  # prompt is a token prefix
    batch = wl.step_rows(rows, TINY, 1)
    assert [r["id"] for r in batch] == [2, 3]
    assert wl.real_tokens(batch, "dpo") == sum(
        2 * r["n_prompt"] + r["n_chosen"] + r["n_rejected"] + 4 for r in batch
    )
    with pytest.raises(ValueError, match="step 99"):
        wl.step_rows(rows, TINY, 99)


def test_model_files_match_config_and_our_loader_config(tiny_dir):
    from safetensors.numpy import load_file

    from jaxrlhf.models.config import ModelConfig
    from jaxrlhf.models.modeling import flops_per_token

    _, p, _ = wl.load(tiny_dir)
    for key, reward in (("model", False), ("reward_model", True)):
        with open(os.path.join(p[key], "config.json")) as f:
            cfg = json.load(f)
        t = load_file(os.path.join(p[key], "model.safetensors"))
        assert sum(v.size for v in t.values()) == wl.num_params(TINY, reward=reward)
        assert all(v.dtype == np.float32 for v in t.values())
        assert ("score.weight" in t) == reward and ("lm_head.weight" in t) != reward
        assert t["model.layers.0.self_attn.k_proj.weight"].shape == (TINY.num_kv_heads * TINY.head_dim, 32)
        mc = ModelConfig.from_hf(cfg, head="scalar" if reward else None)
        assert (mc.hidden_size, mc.num_layers, mc.num_kv_heads, mc.vocab_size) == (32, 2, 2, 128)
        for T in (16, 48):
            assert wl.flops_per_token(TINY, T, reward=reward) == pytest.approx(flops_per_token(mc, T))
    a, b = load_file(os.path.join(p["model"], "model.safetensors")), wl.init_weights(TINY)
    np.testing.assert_array_equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])


def test_workload_validation_names_the_field():
    with pytest.raises(ValueError, match="num_kv_heads"):
        wl.get_workload("tiny", num_kv_heads=3)
    with pytest.raises(ValueError, match="num_pairs"):
        wl.get_workload("tiny", num_pairs=4)
    with pytest.raises(ValueError, match="unknown workload"):
        wl.get_workload("huge")
    with pytest.raises(ValueError, match="unknown Workload field"):
        wl.Workload.from_dict({"hidden": 3})


def test_tunix_batch_layout(tiny_dir):
    from transformers import AutoTokenizer

    from jaxrlhf.bench.peer_tunix import make_batch

    _, p, rows = wl.load(tiny_dir)
    tok = AutoTokenizer.from_pretrained(p["tokenizer"])
    b = make_batch(rows[:2], TINY, tok)
    P, R = TINY.max_prompt_length, TINY.max_response_length
    assert b["prompt_ids"].shape == (2, P) and b["chosen_ids"].shape == (2, R)
    n = rows[0]["n_prompt"]
    assert (
        b["prompt_mask"][0, : P - n - 1].sum() == 0 and b["prompt_ids"][0, P - n - 1] == wl.BOS_ID
    )  # left pad
    nc = rows[0]["n_chosen"]
    assert b["chosen_ids"][0, nc] == wl.EOS_ID and b["chosen_mask"][0].sum() == nc + 1  # right pad
    real = 2 * b["prompt_mask"].sum() + b["chosen_mask"].sum() + b["rejected_mask"].sum()
    assert real == wl.real_tokens(rows[:2], "dpo")


# ----------------------------------------------------------------------------------------- maths
def _result(fw, times, real=(100, 200), padded=(150, 250), task="dpo"):
    return {"framework": fw, "task": task, "steps": len(times), "step_times": list(times),
            "real_tokens_per_step": list(real), "padded_tokens_per_step": list(padded),
            "versions": {"x": "1"}}  # fmt: skip


def test_result_line_roundtrip_and_validation():
    r = _result("trl", [1.0, 2.0])
    line = results.format_line({**{"extra": 1}, **r})
    assert line.startswith('{"framework": "trl"')
    assert results.parse_output(f"noise\n{{'a': 1}}\n{line}\nmore noise\n")["step_times"] == [1.0, 2.0]
    with pytest.raises(ValueError, match="no result line"):
        results.parse_output("nothing here")
    with pytest.raises(ValueError, match="'versions'"):
        results.validate({k: v for k, v in r.items() if k != "versions"})
    with pytest.raises(ValueError, match="real_tokens_per_step"):
        results.validate({**r, "real_tokens_per_step": [1]})
    with pytest.raises(ValueError, match="real_tokens <= padded"):
        results.validate({**r, "padded_tokens_per_step": [50, 250]})
    with pytest.raises(ValueError, match="task"):
        results.validate({**r, "task": "ppo"})


def test_summarize_run():
    s = results.summarize_run(_result("x", [1.0, 4.0, 2.0], real=(100, 400, 100), padded=(200, 400, 400)))
    assert s["tokens_per_s"] == 100.0  # median of 100, 100, 50
    assert s["padded_tokens_per_s"] == 200.0  # median of 200, 100, 200
    assert (s["step_time_median"], s["step_time_min"], s["step_time_max"]) == (2.0, 1.0, 4.0)
    assert s["pad_fraction"] == pytest.approx(1 - 600 / 1000)


def test_aggregate_ratios_and_spread():
    runs = []
    # ours at 300, 200, 100 tok/s; trl at 100 every round; tunix fails in round 1
    for r, t in enumerate([1.0, 1.5, 3.0]):
        runs.append(
            {
                "round": r,
                "framework": "ours",
                "result": _result("ours", [t / 3, t / 3], real=(100, 100), padded=(100, 100)),
            }
        )
        runs.append(
            {
                "round": r,
                "framework": "trl",
                "result": _result("trl", [1.0, 1.0], real=(100, 100), padded=(200, 200)),
            }
        )
        if r == 1:
            runs.append({"round": r, "framework": "tunix", "error": "boom"})
        else:
            res = _result("tunix", [0.5, 0.5], real=(100, 100), padded=(400, 400))
            runs.append({"round": r, "framework": "tunix", "result": res})
    agg = results.aggregate(runs)
    assert list(agg["frameworks"]) == ["ours", "trl", "tunix"]
    ours = agg["frameworks"]["ours"]["tokens_per_s"]
    assert (ours["median"], ours["min"], ours["max"], ours["n"]) == pytest.approx((200, 100, 300, 3))
    trl = agg["ratios"]["trl"]
    assert (trl["median"], trl["min"], trl["max"], trl["n"]) == pytest.approx((2.0, 1.0, 3.0, 3))
    tunix = agg["ratios"]["tunix"]  # rounds 0 and 2 only: 300/200, 100/200
    assert (tunix["median"], tunix["min"], tunix["max"], tunix["n"]) == pytest.approx((1.0, 0.5, 1.5, 2))
    assert agg["frameworks"]["tunix"]["errors"] == ["round 1: boom"]
    assert agg["frameworks"]["tunix"]["pad_fraction"] == pytest.approx(0.75)
    md = results.markdown_table(agg, task="dpo")
    rows = md.splitlines()
    assert len(rows) == 5 and rows[0].startswith("| framework")
    assert "| ours | dpo | 3 | 200 (100–300) |" in rows[2] and "1 (baseline)" in rows[2]
    assert rows[3].endswith("| 0.50 | 2.00 (1.00–3.00)× |")
    assert "1.00 (0.50–1.50)×" in rows[4]
    # without the baseline the ratios are n/a, and a framework that never ran is marked failed
    agg2 = results.aggregate(
        [r for r in runs if r["framework"] != "trl"] + [{"round": 0, "framework": "trl", "error": "no venv"}]
    )
    assert "failed: round 0: no venv" in results.markdown_table(agg2, task="dpo")


# ----------------------------------------------------------------------------------------- compare
def _fake_runner(fw, t):
    line = results.format_line(_result(fw, [t, t], real=(100, 100), padded=(120, 120)))
    return [sys.executable, "-c", f"print('log line'); print({line!r})"]


def test_compare_end_to_end_with_fake_runners(tmp_path, monkeypatch):
    speeds = {"ours": 0.5, "trl": 1.0, "tunix": 2.0}

    def fake_command(fw, **kw):
        assert kw["task"] == "dpo" and kw["steps"] == 2 and kw["warmup"] == 1
        if fw == "tunix":
            return [sys.executable, "-c", "import sys; sys.exit('tunix exploded')"]
        return _fake_runner(fw, speeds[fw])

    monkeypatch.setattr(compare, "command_for", fake_command)
    out = tmp_path / "results"
    args = ["--task", "dpo", "--rounds", "2", "--steps", "2", "--warmup", "1", "--workload", "tiny"]
    report = compare.main(args + ["--workdir", str(tmp_path / "wd"), "--out", str(out)])
    assert [r["framework"] for r in report["runs"]] == ["ours", "trl", "tunix"] * 2  # alternation
    assert report["aggregate"]["ratios"]["trl"]["median"] == pytest.approx(2.0)
    assert report["aggregate"]["ratios"]["tunix"] is None
    assert "tunix exploded" in report["runs"][2]["error"]
    md = (out / "bench_compare_dpo.md").read_text()
    assert "2.00 (2.00–2.00)×" in md and "failed" in md
    assert json.loads((out / "bench_compare_dpo.json").read_text())["rounds"] == 2
    assert os.path.exists(tmp_path / "wd" / "tiny" / "data.jsonl")


def test_compare_commands_and_task_support(tmp_path):
    py = {"ours": "/o/python", "trl": "/t/python", "tunix": "/x/python"}
    cmd = compare.command_for("trl-bf16", task="reward", workdir="W", steps=4, warmup=2, pythons=py)
    assert cmd == ["/t/python", "-m", "jaxrlhf.bench.peer_trl", "--task", "reward", "--workdir", "W",
                   "--steps", "4", "--warmup", "2", "--bf16"]  # fmt: skip
    assert compare.command_for("ours", task="dpo", workdir="W", steps=1, warmup=0, pythons=py)[:3] == [
        "/o/python", "-m", "jaxrlhf.bench.ours"]  # fmt: skip
    missing = compare.run_one([str(tmp_path / "nope" / "python"), "-c", "1"], timeout=5)
    assert "not found" in missing["error"]
    assert compare.SUPPORTED_TASKS["tunix"] == ("dpo",)


# ----------------------------------------------------------------------------- our runner, profile
def test_ours_runner_packed_equals_padded(tiny_dir):
    """The benchmark's jaxrlhf runner: packing (its default) trains on the same real tokens and
    reaches the same loss as padding, step for step."""
    from jaxrlhf.bench import ours

    packed = ours.run("dpo", tiny_dir, steps=2, warmup=1, pad_multiple=16, packing=True)
    padded = ours.run("dpo", tiny_dir, steps=2, warmup=1, pad_multiple=16, packing=False)
    assert packed["config"]["packing"] and not padded["config"]["packing"]
    assert packed["real_tokens_per_step"] == padded["real_tokens_per_step"]
    np.testing.assert_allclose(packed["config"]["final_loss"], padded["config"]["final_loss"], rtol=1e-5)
    results.validate(packed)


def test_profile_reports_kernel_categories(tiny_dir):
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    cmd = [
        sys.executable,
        "-m",
        "jaxrlhf.bench.profile",
        "--task",
        "reward",
        "--workdir",
        tiny_dir,
        "--steps",
        "1",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "matmul: projections/MLP/head" in out.stdout and "elementwise/copy/reduce" in out.stdout
    kernel_ms = float(out.stdout.split("packing=True: ")[1].split(" kernel-ms")[0])
    assert kernel_ms > 0
