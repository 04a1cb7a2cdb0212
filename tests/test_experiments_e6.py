"""E6 (Arike et al.): the pipeline end to end at toy size, its statistics, and the committed docs tables.

The smoke run checks the pipeline against independent computations: the final weight/bias
divergence against numpy on the two HF exports' safetensors, the polarisation numbers against a
plain loop over the stored scores, the probe openings against the gold scorer. The docs test parses
every markdown table of docs/experiments_e6.md and compares its numbers with docs/results/e6/results.json.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest

from jaxrlhf.experiments import e6_arike as e6

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "experiments_e6.md"
RESULTS = ROOT / "docs" / "results" / "e6" / "results.json"


# ----------------------------------------------------------------------------- statistics
def test_t_interval_matches_the_t_table():
    # t_{0.975, 2} = 4.302652729911275 (tables); values 1, 2, 3: mean 2, sample sd 1.
    r = e6.t_interval([1.0, 2.0, 3.0])
    assert r["mean"] == pytest.approx(2.0)
    assert r["sd"] == pytest.approx(1.0)
    assert r["ci95"] == pytest.approx(4.302652729911275 / math.sqrt(3), rel=1e-9)
    # t_{0.975, 4} = 2.776445105197793; sd of 0, 1, 2, 3, 4 = sqrt(2.5).
    r = e6.t_interval([0, 1, 2, 3, 4])
    assert r["ci95"] == pytest.approx(2.776445105197793 * math.sqrt(2.5) / math.sqrt(5), rel=1e-9)
    assert e6.t_interval([0.5])["ci95"] is None


def test_polarisation_against_a_loop():
    rng = np.random.default_rng(0)
    s = np.concatenate([rng.uniform(0, 1, 97), [0.5, 0.1, 0.9, 0.0, 1.0]])
    r = e6.polarisation(s)
    pos = sum(1 for v in s if v > 0.5) / len(s)
    ext = sum(1 for v in s if v < 0.1 or v > 0.9) / len(s)
    pol = sum(abs(2 * v - 1) for v in s) / len(s)
    hist = [0] * 10
    for v in s:
        hist[min(int(v * 10), 9)] += 1
    assert r["frac_positive"] == pytest.approx(pos)
    assert r["frac_extreme"] == pytest.approx(ext)
    assert r["polarity"] == pytest.approx(pol)
    assert np.allclose(r["histogram"], np.asarray(hist) / len(s))


def test_probe_prompts_are_labelled_by_their_own_sentiment(tmp_path):
    from jaxrlhf.tasks import common, reviews

    exclude = set(reviews.review_prompts(200, seed=5))
    path = tmp_path / "probe.jsonl"
    info = e6.write_probe_prompts(str(path), 12, seed=3, exclude=exclude)
    rows = common.read_jsonl(str(path))
    assert [r["label"] for r in rows] == ["positive"] * 12 + ["negative"] * 12
    assert info["per_label"] == 12
    for r in rows:
        score = reviews.gold_score(r["prompt"])
        assert (score > 0.5) if r["label"] == "positive" else (score < 0.5), r
        assert r["prompt"] not in exclude


# ----------------------------------------------------------------------------- end to end
def _numpy_divergence(base_dir: str, model_dir: str) -> dict[str, float]:
    """Unweighted means over tensors of mean((b - a)^2), biases (1-D, not LayerNorm) vs weights (>= 2-D)."""
    from safetensors.numpy import load_file

    a, b = (
        load_file(os.path.join(base_dir, "model.safetensors")),
        load_file(os.path.join(model_dir, "model.safetensors")),
    )
    bias, weight = [], []
    for name in a:
        if "masked_bias" in name or name.endswith("attention.bias") or "inv_freq" in name or "norm" in name:
            continue
        mse = float(np.mean((b[name].astype(np.float64) - a[name].astype(np.float64)) ** 2))
        (bias if a[name].ndim == 1 else weight).append(mse)
    return {"biases_mean": float(np.mean(bias)), "weights_mean": float(np.mean(weight))}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("e6")
    out = root / "out"
    res = e6.main(["--size=smoke", "--seeds=1", f"--workdir={root / 'work'}", f"--out={out}"])
    return res, out, root / "work" / "smoke" / "seed0"


@pytest.mark.slow  # ~120 CPU-seconds, nearly all compiles (SFT, DPO, PPO, samplers, analyses)
def test_smoke_pipeline_end_to_end(smoke):
    res, out, seed_dir = smoke
    for name in ("results.json", "table.md", *e6.PLOTS):
        assert (out / name).exists(), name
    saved = json.loads((out / "results.json").read_text())
    assert (
        saved["extra"]["steps"] == e6.EXTRA["smoke"].steps and saved["sizes"]["model"]["family"] == "gpt_neox"
    )
    r = saved["per_seed"][0]
    # matched optimizer steps
    assert (
        r["runs"]["dpo"]["optimizer_steps"] == r["runs"]["ppo"]["optimizer_steps"] == e6.EXTRA["smoke"].steps
    )
    # (a) the last point of each divergence curve is the HF export's divergence, recomputed with numpy
    sft = str(seed_dir / "sft" / "hf")
    for name in e6.TUNED:
        curve = r["divergence"][name]
        assert curve["x"][0] == 0.0 and curve["biases_mean"][0] == 0.0 and curve["x"][-1] == 1.0
        ref = _numpy_divergence(sft, str(seed_dir / name / "hf"))
        assert curve["biases_mean"][-1] == pytest.approx(ref["biases_mean"], rel=1e-5)
        assert curve["weights_mean"][-1] == pytest.approx(ref["weights_mean"], rel=1e-5)
        assert ref["biases_mean"] > 0  # training moved the biases
    # (b) per-layer activations for both labels, cosine in [-1, 1], KL >= 0
    act = r["activations"]["dpo"]["groups"]
    assert set(act) == {"all", "positive", "negative"}
    assert all(-1.0001 <= c <= 1.0001 for c in act["positive"]["cosine"])
    assert all(k >= -1e-6 for k in act["negative"]["kl"])
    # (c) one reliance value per head
    cfg = e6.SIZES["smoke"].model
    assert np.asarray(r["heads"]["ppo"]["delta"]).shape == (cfg["num_layers"], cfg["num_heads"])
    # (d) the polarisation numbers are those of the stored scores (all of them at this size)
    for name in e6.POLICIES:
        sc = r["scores"][name]
        s = np.asarray(sc["scores"])
        assert sc["n"] == len(s)
        assert sc["frac_positive"] == pytest.approx(np.mean(s > 0.5), abs=1e-9)


# ----------------------------------------------------------------------------- docs vs JSON
def _md_tables(text: str) -> list[list[list[str]]]:
    """Every markdown table of ``text`` as rows of stripped cells (the separator row dropped)."""
    tables, cur = [], []
    for line in text.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                cur.append(cells)
        elif cur:
            tables.append(cur)
            cur = []
    if cur:
        tables.append(cur)
    return tables


def _tol(printed: str) -> float:
    """Half a unit of the last printed digit of a number (``0.123``, ``4.5e-06``)."""
    mant, _, exp = printed.strip().partition("e")
    decimals = len(mant.split(".")[1]) if "." in mant else 0
    return 0.5 * 10.0**-decimals * 10.0 ** int(exp or 0) * 1.01


def _close(cell: str, stat: dict) -> None:
    parts = [p.strip() for p in cell.split("±")]
    assert abs(float(parts[0]) - stat["mean"]) <= _tol(parts[0]), (cell, stat["mean"])
    if len(parts) > 1:
        assert abs(float(parts[1]) - stat["ci95"]) <= _tol(parts[1]), (cell, stat["ci95"])


def _head_cell(cell: str, top: dict) -> None:
    m = re.fullmatch(r"L(\d+)H(\d+) \(([-+.\d]+)\)", cell)
    assert m, cell
    assert (int(m[1]), int(m[2])) == (top["layer"], top["head"]), (cell, top)
    assert abs(float(m[3]) - top["delta"]) <= _tol(m[3]), (cell, top)


def test_docs_tables_equal_results_json():
    if not DOC.exists() or not RESULTS.exists():
        pytest.skip("docs/experiments_e6.md or docs/results/e6/results.json not written yet")
    res = json.loads(RESULTS.read_text())
    sm = res["summary"]
    tables = _md_tables(DOC.read_text())
    checked = 0
    for t in tables:
        head = t[0]
        if head[0] == "policy" and "kl_to_sft" in head:  # policies
            for row in t[1:]:
                for col, cell in zip(head[1:], row[1:], strict=True):
                    _close(cell, sm["policies"][row[0]][col])
                    checked += 1
        elif head[0] == "run" and "biases_mean" in head:  # final divergence
            for row in t[1:]:
                for col, cell in zip(head[1:], row[1:], strict=True):
                    if cell != "-":
                        _close(cell, sm["divergence"][row[0]][col])
                        checked += 1
        elif head[:2] == ["run", "kind"]:  # per layer
            for row in t[1:]:
                for col, cell in zip(head[2:], row[2:], strict=True):
                    _close(cell, sm["divergence"][row[0]]["layers"][col.split()[1]][row[1]])
                    checked += 1
        elif head[:3] == ["run", "prompts", "metric"]:  # activations
            for row in t[1:]:
                for col, cell in zip(head[3:], row[3:], strict=True):
                    _close(cell, sm["activations"][row[0]][row[1]][row[2]][int(col.split()[1])])
                    checked += 1
        elif head[0] == "seed":  # per-seed heads
            keys = ("sft_sentiment", "sft", "dpo", "ppo")
            for row in t[1:]:
                seed = sm["heads"]["per_seed"][int(row[0])]
                for key, cell in zip(keys, row[1:5], strict=True):
                    _head_cell(cell, seed[key])
                assert abs(float(row[5]) - seed["spearman_dpo_ppo"]) <= _tol(row[5])
                checked += 5
        elif head == ["statistic", "value"]:  # head-ablation statistics
            for name, cell in t[1:]:
                if name.startswith("spearman"):
                    _close(cell, sm["heads"][name])
                elif name.startswith("top_drop_"):
                    _close(cell, sm["heads"]["top_drop"][name.removeprefix("top_drop_")])
                else:
                    assert cell.startswith(f"{sm['heads']['same_top_dpo_ppo']} of ")
                checked += 1
    assert checked > 50, f"only {checked} table cells compared; are the tables in the page?"
