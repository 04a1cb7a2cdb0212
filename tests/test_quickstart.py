"""The quickstart pipeline: configs, results formatting, and the smoke-size run chaining every stage."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxrlhf import quickstart as q
from jaxrlhf.tasks import common, reviews, tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("stage", ["sft", "reward", "dpo", "ppo", "evaluate"])
@pytest.mark.parametrize("size", ["full", "smoke"])
def test_stage_configs_point_at_the_workdir(stage, size):
    config = q.load_config(stage, size, "/tmp/qs_wd")
    s = q.SIZES[size]
    assert config.data.path.startswith("/tmp/qs_wd/data/")
    assert config.tokenizer == tokenizer.tokenizer_path()
    if stage in ("reward", "dpo", "ppo"):
        assert config.model.path == "/tmp/qs_wd/sft/hf"  # every later stage starts from the SFT export
    if stage == "ppo":
        assert config.reward.model.path == "/tmp/qs_wd/reward/hf"  # the learned RM, not the gold scorer
        assert config.ppo.whiten_advantages and config.ref.ema_decay < 1.0  # the study's recipe
        assert config.ppo.rollout_batch_size == s.ppo_rollout_batch
    if stage == "evaluate":
        assert config.reward.fn == "jaxrlhf.tasks.reviews:reward"  # the gold scorer judges


def test_config_arg_errors_name_the_size():
    with pytest.raises(ValueError, match="'huge'"):
        q.parse_config_arg("huge,/tmp/x")
    s, p = q.parse_config_arg("smoke")
    assert s is q.SIZES["smoke"] and p.workdir == q.DEFAULT_WORKDIR


def test_table_and_plot(tmp_path):
    rows = {
        n: dict(
            gold_reward=g,
            gold_reward_sem=0.01,
            kl_to_sft=kl,
            win_rate_vs_sft=w,
            response_length=20.0,
            prompts=8,
        )
        for n, g, kl, w in (("sft", 0.5, 0.0, 0.5), ("dpo", 0.7, 3.0, 0.7), ("ppo", 0.8, 5.0, 0.8))
    }
    table = q.format_table(rows)
    lines = table.splitlines()
    assert len(lines) == 5 and lines[3].startswith("| DPO | 0.700 ± 0.010 | 3.00 | 0.700 |")
    q.write_results({"table": rows}, str(tmp_path))
    assert json.loads((tmp_path / "results.json").read_text())["table"]["ppo"]["kl_to_sft"] == 5.0
    assert (tmp_path / "reward_vs_kl.png").read_bytes()[:4] == b"\x89PNG"


def test_force_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="notes.txt"):
        q.run_pipeline(str(tmp_path), "smoke", force=True)
    assert (tmp_path / "notes.txt").exists()


@pytest.mark.slow
def test_smoke_pipeline_chains_every_stage(tmp_path):
    wd = tmp_path / "qs"
    env = dict(os.environ)
    env["XLA_FLAGS"] = ""  # the CLI as `make demo` runs it: one CPU device
    cmd = [sys.executable, "-m", "jaxrlhf.quickstart", "--size=smoke", f"--workdir={wd}"]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    s, p = q.SIZES["smoke"], q.Paths(str(wd))

    # (a) data
    assert len(common.read_jsonl(p.sft_data)) == s.n_sft
    held_out = {r["prompt"] for r in common.read_jsonl(p.eval_prompts)}
    assert not held_out & {r["prompt"] for r in common.read_jsonl(p.train_prompts)}
    # (b) SFT writes mixed-sentiment completions
    stats = json.loads(Path(p.pairs_stats).read_text())
    # The smoke SFT trains for seconds and writes mostly off-grammar text, which the issue-17 gold scorer
    # scores low (under 2 % of its samples score > 0.5); its pairs still separate best from worst.
    assert stats["sft_frac_negative"] > 0.05 and stats["sft_frac_positive"] > 0.0, stats
    assert stats["chosen_gold_mean"] > stats["rejected_gold_mean"] + 0.05, stats
    # (c) pairs: chosen has the better gold score
    pairs = common.read_jsonl(p.pairs)
    assert len(pairs) == stats["pairs"] >= 2 * s.pair_batch
    chosen = reviews.reward([r["prompt"] for r in pairs], [r["chosen"] for r in pairs])
    rejected = reviews.reward([r["prompt"] for r in pairs], [r["rejected"] for r in pairs])
    assert np.all(chosen > rejected)
    # (b, d, e, f) each training stage exported an HF checkpoint the next one loaded
    for stage in ("sft", "reward", "dpo", "ppo"):
        assert os.path.exists(os.path.join(p.export(stage), "config.json")), stage
    # (g) the table: three rows, finite numbers, SFT is its own reference
    res = json.loads(Path(p.results, "results.json").read_text())
    assert list(res["table"]) == ["sft", "dpo", "ppo"]
    for name, row in res["table"].items():
        assert all(math.isfinite(v) for v in row.values()), (name, row)
        assert 0.0 <= row["win_rate_vs_sft"] <= 1.0 and 0.0 < row["gold_reward"] < 1.0
        assert row["prompts"] == s.n_eval_prompts
        # Degeneracy statistics of each policy's responses (issue 17): a histogram of every prompt's score.
        assert sum(row[f"score_hist_{b}"] for b in range(10)) == row["prompts"], row
        for key in ("frac_positive", "repeat_3gram_frac", "distinct_2", "out_of_grammar_frac"):
            assert 0.0 <= row[key] <= 1.0, (name, key, row[key])
        assert 0.0 < row["response_words"] <= row["response_length"]  # words = tokens less EOS, <unk>
    assert abs(res["table"]["sft"]["kl_to_sft"]) < 1e-4
    assert set(res["stages"]["wall_s"]) == set(q.STAGES)
    for stage in ("sft", "reward", "dpo", "ppo", "eval"):  # every key of every stage config was read
        assert res["stages"][stage]["unread_keys"] == [], (stage, res["stages"][stage]["unread_keys"])
    for stage in ("sft", "reward", "dpo", "ppo"):
        assert all(math.isfinite(v) for v in res["stages"][stage]["last"].values()), stage
    assert 0.0 <= res["stages"]["reward"]["eval"]["accuracy"] <= 1.0
    table = Path(p.results, "table.md").read_text().splitlines()
    assert [line.split("|")[1].strip() for line in table[2:]] == ["SFT", "DPO", "PPO"]
    assert "| SFT |" in out.stdout  # printed to the console too
    assert Path(p.results, "reward_vs_kl.png").read_bytes()[:4] == b"\x89PNG"

    # Resumable: a second run skips every stage and keeps the results.
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-4000:]
    assert again.stdout.count("skipping") == len(q.STAGES)
    assert json.loads(Path(p.results, "results.json").read_text())["table"] == res["table"]
