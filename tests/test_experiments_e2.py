"""E2 (reward-KL frontier) and E3 (distribution shift): smoke runs chain and write well-formed results.

These check plumbing only (stages chain, E3 reuses E2's stages, tables/JSON/PNG are written, metrics
are finite and in range), never the experiments' findings: smoke sizes learn next to nothing.
"""

import importlib.util
import json
import math
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name: str):
    return importlib.import_module(f"jaxrlhf.experiments.{name}")


e2 = _load("e2_frontier")
e3 = _load("e3_shift")


def test_interpolate_inside_and_outside_range():
    pts = [(2.0, 0.8), (0.0, 0.5), (4.0, 0.6)]
    assert e2.interpolate(pts, 1.0) == pytest.approx(0.65)
    assert e2.interpolate(pts, 3.0) == pytest.approx(0.7)
    assert e2.interpolate(pts, 0.0) == pytest.approx(0.5)
    assert math.isnan(e2.interpolate(pts, 5.0))  # no extrapolation


def _row(gold, kl):
    return {"gold_reward": gold, "kl_to_sft": kl, "win_rate_vs_sft": 0.5, "response_length": 10.0}


def test_e2_summarize_matched_kl():
    seeds = [
        {"rows": {"sft": _row(0.5, 0.0), "dpo@b=0.1": _row(0.7, 2.0), "ppo@kl=0.1": _row(0.9, 4.0)}},
        {"rows": {"sft": _row(0.4, 0.0), "dpo@b=0.1": _row(0.6, 1.0), "ppo@kl=0.1": _row(0.8, 2.0)}},
    ]
    out = e2.summarize(seeds, (1.0, 3.0))
    assert out["policies"]["dpo@b=0.1"]["gold_reward"]["mean"] == pytest.approx(0.65)
    assert out["policies"]["dpo@b=0.1"]["gold_reward"]["std"] == pytest.approx(math.sqrt(0.005))
    # dpo at KL 1: seed 0 -> 0.6, seed 1 -> 0.6; KL 3 only reached by seed 0's PPO (-> 0.8).
    assert out["gold_at_matched_kl"]["dpo"]["1"]["mean"] == pytest.approx(0.6)
    assert out["gold_at_matched_kl"]["dpo"]["3"] == {"mean": None, "std": None, "seeds": 0}
    assert out["gold_at_matched_kl"]["ppo"]["3"]["seeds"] == 1
    assert out["gold_at_matched_kl"]["ppo"]["3"]["mean"] == pytest.approx(0.8)
    assert out["gold_at_matched_kl"]["dpo_iter"]["1"]["seeds"] == 0
    table = e2.format_tables(out, 2)
    assert "| dpo@b=0.1 | 0.650 ±" in table and "KL = 3" in table


def _check_rows(rows: dict, names):
    assert list(rows) == list(names)
    for name, r in rows.items():
        for key in ("gold_reward", "kl_to_sft", "win_rate_vs_sft", "response_length"):
            assert math.isfinite(r[key]), (name, key)
        assert 0.0 <= r["gold_reward"] <= 1.0 and 0.0 <= r["win_rate_vs_sft"] <= 1.0, name
    assert rows["sft"]["kl_to_sft"] == pytest.approx(0.0, abs=1e-4)


@pytest.mark.slow
def test_e2_then_e3_smoke(tmp_path):
    wd, out2, out3 = str(tmp_path / "wd"), str(tmp_path / "e2"), str(tmp_path / "e3")
    r2 = e2.main(["--smoke", "--seeds=1", f"--out={out2}", f"--workdir={wd}"])
    sw = e2.SWEEPS["smoke"]
    names = ["sft"] + [f"dpo@b={b:g}" for b in sw.dpo_betas] + [f"dpo_iter@b={b:g}" for b in sw.iter_betas]
    names += [f"ppo@kl={k:g}" for k in sw.ppo_kl_coefs]
    _check_rows(r2["per_seed"][0]["rows"], names)
    for f in ("table.md", "results.json", "frontier.png"):
        assert os.path.getsize(os.path.join(out2, f)) > 0, f
    with open(os.path.join(out2, "results.json")) as f:
        saved = json.load(f)
    assert saved["summary"]["policies"].keys() == set(names)
    assert set(saved["summary"]["gold_at_matched_kl"]) == set(e2.METHODS)
    with open(os.path.join(out2, "table.md")) as f:
        table = f.read()
    assert all(f"| {n} |" in table for n in names), table

    seed_dir = os.path.join(wd, "smoke", "seed0")
    sft_stamp = os.path.getmtime(os.path.join(seed_dir, "sft", "hf", "config.json"))
    r3 = e3.main(["--smoke", "--seeds=1", f"--out={out3}", f"--workdir={wd}"])
    # E3 reuses E2's model A (no retraining) and trains model B in its own directory.
    assert os.path.getmtime(os.path.join(seed_dir, "sft", "hf", "config.json")) == sft_stamp
    assert os.path.exists(os.path.join(wd, "smoke", "seed0_other", "sft", "hf", "config.json"))
    _check_rows(r3["per_seed"][0]["rows"], e3.POLICIES)
    for tag in ("own", "other"):
        st = r3["per_seed"][0]["pairs"][tag]
        assert st["pairs"] > 0 and st["chosen_nll_under_A"] > 0 and math.isfinite(st["chosen_nll_under_A"])
    assert set(r3["summary"]["gap_to_dpo_own"]) == {"dpo_other", "sft_chosen+dpo", "dpo_other+nll"}
    for f in ("table.md", "results.json", "shift.png"):
        assert os.path.getsize(os.path.join(out3, f)) > 0, f
