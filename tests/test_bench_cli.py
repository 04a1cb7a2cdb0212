"""The CLI-path benchmark (``jaxrlhf.bench.cli``): end to end with ours only (TRL's venv absent:
skipped with its reason, not an error), the log and window maths against hand-computed values,
and the real-tokenizer workload's token counts against our data pipeline."""

import json
import os
import statistics
from pathlib import Path

import pytest

from jaxrlhf import config_defaults as d
from jaxrlhf import config_validation
from jaxrlhf import data as data_lib
from jaxrlhf.bench import cli, results
from jaxrlhf.bench import workload as wl

REAL = Path(__file__).parents[2] / "shared" / "real"

LOG = """I1130 07:08:30.1 1 offline.py:139] mesh: {'data': 1}
I1130 07:08:38.2 1 logger.py:68] step 5: loss=0.6933, perf/compile_s=49.01, perf/compiles=2, perf/host_fraction=0.712, perf/tokens_per_s=1.9e+04
I1130 07:08:38.3 1 logger.py:68] step 10: loss=0.69, perf/compile_s=50, perf/compiles=3, perf/host_fraction=0.5, perf/tokens_per_s=2000
I1130 07:08:38.3 1 logger.py:68] step 15: loss=0.68, perf/compile_s=50, perf/compiles=3, perf/host_fraction=0.25, perf/tokens_per_s=3000
I1130 07:08:38.3 1 logger.py:68] step 15 eval: loss=0.7
I1130 07:08:38.4 1 logger.py:68] step 20: loss=0.67, perf/compile_s=50, perf/compiles=3, perf/host_fraction=0.75, perf/tokens_per_s=5000
"""  # noqa: E501


def test_our_log_is_read_as_the_user_sees_it():
    win = cli.parse_our_log(LOG)
    assert [w["step"] for w in win] == [5, 10, 15, 20]  # the eval line is not a window
    s = cli.summarize_ours(LOG)
    assert s["steady_tokens_per_s"] == 4000.0  # median of windows 3 and 4 (3000, 5000)
    assert (
        s["host_fraction"] == 0.5 and s["compiles"] == 3 and s["compile_s"] == 50 and s["final_loss"] == 0.67
    )
    with pytest.raises(ValueError, match="no logged window"):
        cli.summarize_ours("nothing logged")


def test_trl_windows_match_a_plain_computation():
    times = [5.0, 1.0, 1.0, 2.0, 2.0, 1.0, 1.0]
    toks = [100, 100, 100, 300, 100, 200, 200]
    res = {
        "framework": "trl",
        "task": "dpo",
        "steps": 7,
        "step_times": times,
        "real_tokens_per_step": toks,
        "padded_tokens_per_step": [t + 1 for t in toks],
        "versions": {"trl": "x"},
    }
    s = cli.summarize_trl("noise\n" + results.format_line(res) + "\n", log_every=2)
    windows = [200 / 6.0, 400 / 3.0, 300 / 3.0, 200 / 1.0]
    assert s["windows_tokens_per_s"] == pytest.approx(windows)
    assert s["steady_tokens_per_s"] == pytest.approx(statistics.median([100.0, 200.0]))


def test_aggregate_ratios_per_round():
    def run(fw, r, speed, wall):
        return {
            "framework": fw,
            "task": "dpo",
            "vocab": "v2k",
            "round": r,
            "steady_tokens_per_s": speed,
            "wall_s": wall,
            "peak_rss_mib": 1.0,
            "compiles": 2.0,
            "compile_s": 1.0,
            "host_fraction": 0.1,
        }

    runs = [
        run("ours", 0, 300, 50),
        run("trl", 0, 100, 100),
        run("ours", 1, 200, 100),
        run("trl", 1, 200, 50),
        {"framework": "ours", "task": "dpo", "vocab": "v2k", "round": 2, "error": "exit 1"},
    ]
    rows = {r["framework"]: r for r in cli.aggregate(runs)}
    ours = rows["ours"]
    assert ours["runs"] == 2 and ours["failed"] == 1
    assert ours["speed_vs_peer"] == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 2}
    assert ours["wall_vs_peer"] == {"median": 1.25, "min": 0.5, "max": 2.0, "n": 2}
    assert rows["trl"]["speed_vs_peer"] is None
    assert "| dpo | v2k | ours | 250 (200–300) |" in cli.markdown_table(cli.aggregate(runs))


def test_chat_template_false_passes_validation():
    """A bool key whose rule also allows None (data.chat_template) accepts True/False."""
    c = d.base("dpo")
    c.data = d.data(path="x.jsonl", chat_template=False)
    config_validation.validate_config(c)


def test_cli_mode_end_to_end_ours_only(tmp_path):
    """``jaxrlhf.bench.compare --mode cli`` on the tiny workload: ``python -m jaxrlhf.train`` in a
    fresh process, every field of the JSON filled; TRL's venv absent: skipped, named, no error."""
    from jaxrlhf.bench import compare

    argv = [
        "--mode",
        "cli",
        "--task",
        "dpo",
        "--vocab",
        "tiny",
        "--frameworks",
        "ours,trl",
        "--rounds",
        "1",
        "--steps",
        "4",
        "--log_every",
        "1",
        "--root",
        str(tmp_path / "root"),
        "--out",
        str(tmp_path / "out"),
        "--trl-python",
        str(tmp_path / "no-venv" / "python"),
    ]
    compare.main(argv)
    with open(tmp_path / "out" / "bench_cli.json") as f:
        report = json.load(f)
    runs = {r["framework"]: r for r in report["runs"]}
    assert "trl venv not found" in runs["trl"]["skipped"]
    ours = runs["ours"]
    assert "error" not in ours, ours.get("error")
    for key in ("wall_s", "peak_rss_mib", "steady_tokens_per_s", "compiles", "compile_s", "host_fraction"):
        assert isinstance(ours[key], float) and ours[key] >= 0, key
    assert len(ours["windows_tokens_per_s"]) == 4 and ours["compiles"] >= 1 and ours["peak_rss_mib"] > 50
    assert "jaxrlhf.train" in ours["cmd"] and "configs/bench/dpo_v2k.py" in ours["cmd"]
    (row,) = [r for r in report["aggregate"] if r["framework"] == "ours"]
    assert row["runs"] == 1 and row["speed_vs_peer"] is None
    md = (tmp_path / "out" / "bench_cli.md").read_text()
    assert "| dpo | tiny | ours |" in md and "trl venv not found" in md


def test_real_tokenizer_workload_counts_one_token_per_word(tmp_path):
    """The Qwen2.5 workload's rows through our data pipeline: each sequence is its words + EOS
    (no BOS), i.e. what ``real_tokens(..., bos=False)`` counts for both frameworks."""
    tok_dir = REAL / "tokenizer_qwen2_5_instruct"
    if not tok_dir.exists():
        pytest.skip(f"Qwen2.5 tokenizer not found: {REAL} absent")
    w = wl.get_workload("cli-qwen").replace(
        hidden_size=16,
        num_heads=2,
        num_kv_heads=1,
        intermediate_size=16,
        num_layers=1,
        num_pairs=32,
        batch_size=2,
        steps=16,
    )
    p = wl.prepare(str(tmp_path / "q"), w)
    assert p["tokenizer"] == os.path.normpath(str(tok_dir))
    _, _, rows = wl.load(str(tmp_path / "q"))
    cfg = d.data(
        path=p["data"],
        schema="preference",
        max_prompt_length=w.max_prompt_length,
        max_length=w.max_length,
        shuffle=False,
        bucket=False,
        strict=True,
        chat_template=False,
    )
    ds = data_lib.build_dataset(cfg, data_lib.load_tokenizer(p["tokenizer"]), "preference", "train")
    assert len(ds) == len(rows)
    for i, r in enumerate(rows):
        assert ds.chosen_lengths[i] == r["n_prompt"] + r["n_chosen"] + 1
        assert ds.rejected_lengths[i] == r["n_prompt"] + r["n_rejected"] + 1
    total = int(ds.chosen_lengths.sum() + ds.rejected_lengths.sum())
    assert total == wl.real_tokens(rows, "dpo", bos=False)
    with open(os.path.join(p["model"], "config.json")) as f:
        assert json.load(f)["vocab_size"] == 151665


SPLIT_LOG = """I1130 23:59:58.0 1 harness.py:263] algorithm: reward
I1130 23:59:59.5 1 setup.py:428] model: llama, 1M parameters
I1201 00:00:09.5 1 setup.py:360] compiled step for batch {...}
I1201 00:00:19.5 1 logger.py:68] step 10: loss=0.7, perf/compile_s=10, perf/compiles=1, perf/tokens_per_s=100
I1201 00:00:29.5 1 logger.py:68] step 20: loss=0.6, perf/compile_s=10, perf/compiles=1, perf/tokens_per_s=200
I1201 00:00:31.0 1 logger.py:68] step 20 eval: loss=0.7
I1201 00:00:39.5 1 logger.py:68] step 30: loss=0.5, perf/compile_s=10, perf/compiles=1, perf/tokens_per_s=300
I1201 00:00:43.0 1 checkpoint.py:184] checkpoint: saving step 30
"""


def test_wall_split_of_our_run_across_midnight():
    # loop starts at the model line (-0.5 s from midnight), last window at 39.5 s, last line at 43 s
    split = cli.split_ours(SPLIT_LOG, wall_s=50.0, compile_s=10.0)
    assert split == pytest.approx(
        {"startup": 50.0 - 43.5, "compile": 10.0, "steps": 40.0 - 10.0, "final_save": 3.5}
    )
    assert sum(split.values()) == pytest.approx(50.0)


def test_resummarize_rewrites_the_report_from_the_logs(tmp_path):
    ours_log, trl_log = tmp_path / "ours.log", tmp_path / "trl.log"
    ours_log.write_text(SPLIT_LOG)
    res = {"framework": "trl", "task": "reward", "steps": 3, "step_times": [1.0, 2.0, 3.0],
           "real_tokens_per_step": [10, 20, 30], "padded_tokens_per_step": [11, 21, 31],
           "versions": {}}  # fmt: skip
    trl_log.write_text("tokenizing\n" + results.format_line(res) + "\n")
    base = {"task": "reward", "vocab": "v2k", "round": 0, "peak_rss_mib": 1.0}
    report = {
        "command": "c", "date": "d", "rounds": 1, "steps": 3, "log_every": 1, "frameworks": ["ours", "trl"],
        "machine": {"cpu": "x", "cores": 2, "mem_gib": 1, "os": "y"}, "notes": [], "aggregate": [],
        "runs": [{**base, "framework": "ours", "wall_s": 50.0, "log": str(ours_log)},
                 {**base, "framework": "trl", "wall_s": 10.0, "log": str(trl_log)}],
    }  # fmt: skip
    path = tmp_path / "bench_cli_x.json"
    path.write_text(json.dumps(report))
    cli.main(["--resummarize", str(path)])
    got = json.loads(path.read_text())
    ours, trl = got["runs"]
    assert ours["split_s"]["steps"] == pytest.approx(30.0) and ours["steady_tokens_per_s"] == 300.0
    assert trl["split_s"] == pytest.approx({"steps": 6.0, "other": 4.0})
    assert ours["wall_s"] == 50.0 and got["command"] == "c"  # measured values and the header are kept
    md = (tmp_path / "bench_cli_x.md").read_text()
    assert "| reward | v2k | ours | 50 | 6.5 | 10.0 | 30.0 | 3.5 | – |" in md
    assert "| reward | v2k | trl | 10 | – | – | 6.0 | – | 4.0 |" in md
