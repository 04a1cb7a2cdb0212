"""E3 (distribution shift): the matched-KL statistics against hand computations, the chosen-answer NLL
against transformers on the same weights, a smoke run end to end, and the tables against results.json.

The smoke run checks plumbing only (A's stages are reused, model B and every policy are trained,
every checkpoint is scored against A, the tables equal the JSON); at smoke size nothing is learned,
so the findings are not asserted (docs/experiments_e3.md).
"""

import importlib
import json
import math
import os
import re

import numpy as np
import pytest
from md_tables import check_cell, parse_tables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
e3 = importlib.import_module("jaxrlhf.experiments.e3_shift")


def _pt(step, kl, gold, run="x"):
    return {"step": step, "kl_seq": kl, "gold": gold, "run": run}


def _seed(points: dict) -> dict:
    sft = _pt(0, 0.0, 0.30, "sft")
    return {"points": {m: [sft, *points.get(m, [_pt(5, 4.0, 0.30)])] for m in e3.METHODS}}


def test_matched_kl_targets_envelope_and_paired_differences():
    plan = e3.dataclasses.replace(e3.PLANS["smoke"], kl_fractions=(0.5, 1.0))
    # seed 0: the smallest largest-KL is dpo_other_nll's 2.0 -> targets 1.0, 2.0.
    s0 = _seed({
        "dpo_own": [_pt(5, 0.8, 0.40), _pt(10, 1.9, 0.55), _pt(15, 6.0, 0.70)],
        "dpo_other": [_pt(5, 1.2, 0.35), _pt(10, 3.0, 0.45)],
        "dpo_other_nll": [_pt(5, 0.5, 0.32), _pt(10, 2.0, 0.50)],
    })  # fmt: skip
    # seed 1: every other method reaches 4.0; dpo_own's largest KL is 3.0 -> targets 1.5, 3.0.
    s1 = _seed(
        {
            "dpo_own": [_pt(5, 1.0, 0.50), _pt(10, 3.0, 0.20)],
            "dpo_other": [_pt(5, 1.6, 0.45), _pt(10, 3.5, 0.50)],
        }
    )
    assert e3.kl_targets(s0, plan) == [1.0, 2.0] and e3.kl_targets(s1, plan) == [1.5, 3.0]
    out = e3.matched([s0, s1], plan)
    assert out["0.5x"]["dpo_own"]["target_kl_seq"]["values"] == [1.0, 1.5]
    # envelope = best gold with KL <= target, A (KL 0, gold 0.30) included.
    assert out["0.5x"]["dpo_own"]["envelope_gold"]["values"] == [0.40, 0.50]
    assert out["0.5x"]["dpo_other"]["envelope_gold"]["values"] == [0.30, 0.30]  # 1.2 > 1.0; 1.6 > 1.5
    assert out["1x"]["dpo_own"]["envelope_gold"]["values"] == [0.55, 0.50]  # seed 1: 0.20 at KL 3 is worse
    # closest trained checkpoint (A excluded) and its KL gap.
    assert out["0.5x"]["dpo_other"]["closest_gold"]["values"] == [0.35, 0.45]
    assert out["0.5x"]["dpo_other"]["closest_kl_gap"]["values"] == pytest.approx([0.2, 0.1])
    # paired differences by seed (method minus baseline at the same seed's target).
    assert out["0.5x"]["dpo_other"]["envelope_diff_vs_dpo_own"]["values"] == pytest.approx([-0.10, -0.20])
    # 1x: seed 0 (target 2.0) 0.50 - 0.35; seed 1 (target 3.0) 0.30 (its only checkpoint is at 4.0) - 0.45.
    assert out["1x"]["dpo_other_nll"]["envelope_diff_vs_dpo_other"]["values"] == pytest.approx([0.15, -0.15])
    assert out["0.5x"]["dpo_other"]["closest_diff_vs_dpo_own"]["values"] == pytest.approx(
        [0.35 - 0.40, -0.05]
    )
    assert out["1x"]["dpo_own"]["envelope_diff_vs_dpo_own"]["values"] == [0.0, 0.0]
    # mean and t-interval over the 2 seeds: t(0.975, 1) = 12.706 (printed t table), std with n - 1.
    r = out["0.5x"]["dpo_other"]["envelope_diff_vs_dpo_own"]
    assert r["mean"] == pytest.approx(-0.15) and r["ci95"] == pytest.approx(
        12.706 * (0.05 * math.sqrt(2)) / math.sqrt(2), rel=1e-4
    )


def test_pairwise_targets_are_reached_by_both_runs():
    plan = e3.dataclasses.replace(e3.PLANS["smoke"], kl_fractions=(0.5, 1.0))
    s0 = _seed({
        "dpo_own": [_pt(10, 2.0, 0.45), _pt(20, 6.0, 0.60)],
        "dpo_other": [_pt(10, 3.0, 0.40), _pt(20, 8.0, 0.35)],
        "dpo_iter": [_pt(10, 5.0, 0.50), _pt(20, 12.0, 0.55)],
    })  # fmt: skip
    out = e3.pairwise([s0], plan)
    assert "dpo_own" not in out["vs dpo_own 1x"] and "dpo_other" in out["vs dpo_own 1x"]
    # dpo_other vs dpo_own: min(8, 6) = 6 -> envelopes 0.40 (KL 3), 0.60 (KL 6); at 0.5x (3.0): 0.40 vs 0.45.
    r = out["vs dpo_own 1x"]["dpo_other"]
    assert r["target_kl_seq"]["values"] == [6.0] and r["envelope_diff"]["values"] == [pytest.approx(-0.20)]
    assert r["baseline_envelope_gold"]["values"] == [0.60] and r["envelope_gold"]["values"] == [0.40]
    assert out["vs dpo_own 0.5x"]["dpo_other"]["envelope_diff"]["values"] == [pytest.approx(-0.05)]
    # dpo_iter vs dpo_other: min(12, 8) = 8 -> 0.50 (KL 5) vs 0.40 (KL 3); closest: KL 5 (gap -3) vs KL 8.
    r = out["vs dpo_other 1x"]["dpo_iter"]
    assert r["envelope_diff"]["values"] == [pytest.approx(0.10)]
    assert r["closest_kl_gap"]["values"] == [-3.0] and r["baseline_closest_kl_gap"]["values"] == [0.0]
    assert r["closest_diff"]["values"] == [pytest.approx(0.50 - 0.35)]
    # a method whose only checkpoint lies above the baseline's range: envelope = A (gold 0.30, KL 0).
    assert out["vs dpo_own 0.5x"]["sft_chosen"]["envelope_gold"]["values"] == [0.30]


def test_mean_points_over_sampling_keys():
    k1 = [{"checkpoint": 5, "gold": 0.2, "gold_sem": 0.03, "kl_seq": 1.0, "prompts": 256}]
    k2 = [{"checkpoint": 5, "gold": 0.4, "gold_sem": 0.04, "kl_seq": 3.0, "prompts": 256}]
    (m,) = e3.mean_points([k1, k2], per_checkpoint=True)
    assert m == {"checkpoint": 5, "gold": pytest.approx(0.3), "gold_sem": pytest.approx(0.025), "kl_seq": 2.0,
                 "prompts": 512}  # fmt: skip
    with pytest.raises(AssertionError, match="different checkpoints"):
        e3.mean_points([k1, [dict(k2[0], checkpoint=10)]], per_checkpoint=True)


def test_write_chosen_sft(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "the movie was", "chosen": " great .", "rejected": " bad ."},
            {"prompt": "i", "chosen": " liked it .", "rejected": " hated it ."}]  # fmt: skip
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert e3.write_chosen_sft(str(pairs), str(tmp_path / "sft.jsonl")) == 2
    got = [json.loads(line) for line in (tmp_path / "sft.jsonl").read_text().splitlines()]
    assert got == [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows]


# ------------------------------------------------------------------------ markdown tables vs JSON
def check_tables_against_results(md: str, res: dict) -> int:
    """Every number of the data / final / matched tables equals results.json; returns the count."""
    tables, s, n = parse_tables(md), res["summary"], 0
    sections = [("Final checkpoints", s["final"], "method")]
    sections += [(f"Matched KL: target = {k} the smallest largest-KL of the methods (per seed)", v, "method")
                 for k, v in s["matched"].items()]  # fmt: skip
    for key, v in s["pairwise"].items():
        base, frac = key.removeprefix("vs ").split(" ")
        heading = (
            f"Pairwise matched KL vs {base}: target = {frac} the smaller largest-KL of the two (per seed)"
        )
        sections.append((heading, v, "method"))
    labels = {"A (own samples)": "own", "B (other model)": "other"}
    data_rows = tables[next(h for h in tables if h.startswith("Preference data"))]
    assert [labels[r["pairs from"]] for r in data_rows] == ["own", "other"]
    for row in data_rows:
        for col, cell in row.items():
            if col != "pairs from":
                check_cell(cell, s["data"][labels[row["pairs from"]]][col], f"data {col}")
                n += 1
    for heading, by_name, first in sections:
        rows = tables[heading]
        assert [r[first] for r in rows] == list(by_name), heading
        for row in rows:
            for col, cell in row.items():
                if col == first:
                    continue
                if col not in by_name[row[first]]:  # A has no training wall time
                    assert cell == "-", (heading, row[first], col)
                    continue
                check_cell(cell, by_name[row[first]][col], f"{heading} {row[first]} {col}")
                n += 1
    gap = re.search(r"NLL gap under A \(B's minus A's, nats/token\): (\S+ ± \S+|\S+)", md)
    check_cell(gap.group(1), s["data"]["nll_gap"], "nll gap")
    return n + 1


# ------------------------------------------------------------------------------ smoke end to end
def _torch_chosen_nll(model_dir: str, tok_dir: str, pairs_path: str) -> float:
    """The mean per-token NLL of the chosen answers (+ EOS) by transformers on the exported weights."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with open(pairs_path) as f:
        rows = [json.loads(line) for line in f]
    for r in rows:
        p = tok(r["prompt"])["input_ids"]
        y = tok(r["chosen"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.tensor([p + y])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
        total -= float(logp[len(p) - 1 : -1].gather(-1, ids[0, len(p) :, None]).sum())
        count += len(y)
    return total / count


@pytest.mark.slow
def test_e3_smoke_end_to_end(tmp_path):
    wd, out = str(tmp_path / "wd"), str(tmp_path / "out")
    res = e3.main(["--smoke", "--seeds=1", f"--out={out}", f"--workdir={wd}"])
    for f in ("table.md", "results.json", "gold_vs_kl.png"):
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    r = res["per_seed"][0]
    seed_dir = os.path.join(wd, "smoke", "seed0")
    # every policy starts from A: the first point of each method is A itself at KL 0 ...
    for m in e3.METHODS:
        pts = r["points"][m]
        assert pts[0]["run"] == "sft" and abs(pts[0]["kl_seq"]) < 1e-4, m
        assert len(pts) >= 2 and all(math.isfinite(p["gold"]) and 0 <= p["gold"] <= 1 for p in pts), m
        assert all(p["prompts"] == 2 * 16 for p in pts), m  # 2 sampling keys x the 16 smoke eval prompts
    # ... the DPO-family runs from A (model.path) and sft_chosen_dpo from sft_chosen's export, which is
    # also its reference; the shifted runs read B's pairs.
    cfg = {m: r["runs"][m]["config"] for m in e3.METHODS}
    a_sft = os.path.join(seed_dir, "sft", "hf")
    assert cfg["dpo_own"]["model"]["path"] == a_sft and cfg["dpo_own"]["data"]["path"].endswith(
        "seed0/data/pairs.jsonl"
    )
    b_pairs = os.path.join(seed_dir, "e3_b", "data", "pairs.jsonl")
    assert cfg["dpo_other"]["data"]["path"] == b_pairs == cfg["dpo_other_nll"]["data"]["path"]
    assert (
        cfg["dpo_other_nll"]["dpo"]["nll_coef"]
        == e3.PLANS["smoke"].nll_coef
        > 0
        == cfg["dpo_other"]["dpo"]["nll_coef"]
    )
    assert cfg["sft_chosen_dpo"]["model"]["path"] == os.path.join(seed_dir, "e3_sft_chosen", "hf")
    assert cfg["dpo_iter"]["reward"]["model"]["path"] == os.path.join(seed_dir, "e3_rm_other", "hf")
    assert r["rm_other_config"]["data"]["path"] == b_pairs
    # sft_chosen_dpo's points: the SFT phase's checkpoints, then the DPO phase's, steps counted from A.
    runs = [p["run"] for p in r["points"]["sft_chosen_dpo"]]
    assert runs == ["sft"] + ["sft_chosen"] * (runs.count("sft_chosen")) + ["sft_chosen_dpo"] * runs.count(
        "sft_chosen_dpo"
    )
    steps = [p["step"] for p in r["points"]["sft_chosen_dpo"]]
    assert (
        steps == sorted(steps)
        and steps[-1] == e3.PLANS["smoke"].sft_chosen_steps + e3.PLANS["smoke"].dpo_steps
    )
    # model B is another architecture trained on one sentiment, in the experiment's own stage dir.
    with open(os.path.join(seed_dir, "e3_b", "sft", "hf", "config.json")) as f:
        assert json.load(f)["hidden_size"] == e3.PLANS["smoke"].b_model["hidden_size"]
    # the chosen-answer NLL under A equals transformers' on the same weights (first nll_pairs pairs).
    pairs = os.path.join(seed_dir, "data", "pairs.jsonl")
    ref = _torch_chosen_nll(a_sft, res["per_seed"][0]["runs"]["dpo_own"]["config"]["tokenizer"], pairs)
    assert r["data"]["own"]["chosen_nll_under_A"] == pytest.approx(ref, rel=1e-4)
    assert r["data"]["nll_gap"] == pytest.approx(
        r["data"]["other"]["chosen_nll_under_A"] - r["data"]["own"]["chosen_nll_under_A"]
    )
    # the tables are the JSON; settings and provenance recorded.
    with open(os.path.join(out, "results.json")) as f:
        saved = json.load(f)
    with open(os.path.join(out, "table.md")) as f:
        md = f.read()
    assert md == e3.table_markdown(saved) + "\n"  # write_outputs ends the file with a newline
    assert check_tables_against_results(md, saved) > 50
    assert saved["plan"] == json.loads(json.dumps(e3.dataclasses.asdict(e3.PLANS["smoke"])))
    for key in ("code_commit", "hardware", "wall_s_total", "wall_s_without_base_stages", "sizes_A"):
        assert saved[key] is not None, key
    # a rerun reuses every run and every score (nothing is retrained).
    again = e3.main(["--smoke", "--seeds=1", f"--out={out}", f"--workdir={wd}"])
    assert all(again["per_seed"][0]["runs"][m]["wall_s"] == r["runs"][m]["wall_s"] for m in e3.METHODS)
    assert again["summary"]["matched"] == res["summary"]["matched"]


def test_committed_results_match_the_tables_and_the_docs():
    path = os.path.join(ROOT, "docs", "results", "e3", "results.json")
    if not os.path.exists(path):
        pytest.skip("docs/results/e3/results.json not committed yet")
    with open(path) as f:
        res = json.load(f)
    if res.get("experiment") != "e3_shift" or "plan" not in res:
        pytest.skip("docs/results/e3 holds the old design's results (no plan)")
    with open(os.path.join(ROOT, "docs", "results", "e3", "table.md")) as f:
        md = f.read()
    assert md == e3.table_markdown(res) + "\n"
    assert check_tables_against_results(md, res) > 100
    with open(os.path.join(ROOT, "docs", "experiments_e3.md")) as f:
        page = f.read()
    missing = [row for row in md.splitlines() if row.startswith("|") and row not in page]
    assert not missing, missing[:3]
    # the design's premise, measured: B's chosen answers are >= 0.5 nats/token less likely under A.
    assert all(r["data"]["nll_gap"] >= 0.5 for r in res["per_seed"])
    assert len(res["per_seed"]) == 3 and np.isfinite(res["wall_s_total"])
