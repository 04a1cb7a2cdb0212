"""E7 (Wang et al.): statistics and matched-KL selection against hand computations, a smoke run of the
pipeline end to end, and the docs' tables against the committed results.json (parsed markdown).

The smoke run checks plumbing only (stages chain, variants get their knobs, probes and checkpoint
scores land in the results, tables equal the JSON); at smoke size nothing is learned, so the
findings are not asserted (docs/experiments_e7.md).
"""

import importlib
import json
import math
import os

import pytest
from md_tables import check_cell, parse_tables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
e7 = importlib.import_module("jaxrlhf.experiments.e7_wang")


def test_t_interval_against_the_t_table():
    # t(0.975, 2) = 4.3027, t(0.975, 4) = 2.7764 (printed t tables); std with n - 1.
    r = e7.t_interval([1.0, 2.0, 3.0])
    assert r["mean"] == pytest.approx(2.0) and r["std"] == pytest.approx(1.0)
    assert r["ci95"] == pytest.approx(4.3027 / math.sqrt(3), rel=1e-4)
    v = [0.1, 0.4, 0.2, 0.9, 0.5]
    m = sum(v) / 5
    s = math.sqrt(sum((x - m) ** 2 for x in v) / 4)
    r = e7.t_interval(v)
    assert r["std"] == pytest.approx(s) and r["ci95"] == pytest.approx(2.7764 * s / math.sqrt(5), rel=1e-4)
    assert e7.t_interval([0.3])["ci95"] is None and e7.t_interval([None])["n"] == 0


def _pt(step, kl, gold):
    return {"step": step, "kl_seq": kl, "gold": gold}


def test_matched_kl_uses_measured_points_only():
    sft = _pt(0, 0.0, 0.40)
    seeds = [
        {
            "runs": {
                "dpo": {"algorithm": "dpo", "points": [sft, _pt(8, 1.0, 0.50), _pt(16, 2.0, 0.60)]},
                "dpo_x": {"algorithm": "dpo", "points": [sft, _pt(8, 0.8, 0.55), _pt(16, 3.0, 0.70)]},
            }
        },
        {
            "runs": {
                "dpo": {"algorithm": "dpo", "points": [sft, _pt(8, 2.0, 0.45), _pt(16, 4.0, 0.65)]},
                "dpo_x": {"algorithm": "dpo", "points": [sft, _pt(8, 1.5, 0.60), _pt(16, 2.5, 0.62)]},
            }
        },
    ]
    plan = e7.dataclasses.replace(e7.PLANS["smoke"], kl_fractions=(0.5, 1.0))
    out = e7.matched(seeds, plan)
    # seed 0: targets 1.0 / 2.0; seed 1: 2.0 / 4.0 (fractions of plain DPO's final KL).
    assert out["0.5x"]["dpo"]["target_kl_seq"]["values"] == [1.0, 2.0]
    # envelope (best gold with KL <= target): dpo_x seed 0 @1.0 -> 0.55; seed 1 @2.0 -> 0.60.
    assert out["0.5x"]["dpo_x"]["envelope_gold"]["values"] == [0.55, 0.60]
    assert out["0.5x"]["dpo"]["envelope_gold"]["values"] == [0.50, 0.45]
    assert out["0.5x"]["dpo_x"]["envelope_diff_vs_plain"]["values"] == pytest.approx([0.05, 0.15])
    # closest point: seed 0 @1.0 -> KL 0.8 (gap -0.2); seed 1 @2.0 -> KL 1.5 and 2.5 tie at 0.5: first wins.
    assert out["0.5x"]["dpo_x"]["closest_gold"]["values"] == [0.55, 0.60]
    assert out["0.5x"]["dpo_x"]["closest_kl_gap"]["values"] == pytest.approx([-0.2, -0.5])
    # at 1x: seed 0 target 2.0 -> envelope 0.55 (KL 3.0 excluded), closest KL 3.0 (0.70).
    assert out["1x"]["dpo_x"]["envelope_gold"]["values"][0] == 0.55
    assert out["1x"]["dpo_x"]["closest_gold"]["values"][0] == 0.70
    assert out["1x"]["dpo"]["closest_diff_vs_plain"]["values"] == [0.0, 0.0]
    # nothing measured below the target -> None (SFT at KL 0 is always there, so only a negative target)
    assert e7.envelope([_pt(8, 1.0, 0.5)], 0.5) is None


# ------------------------------------------------------------------------ markdown tables vs JSON
def check_tables_against_results(md: str, res: dict) -> int:
    """Every number of the final / matched / dynamics tables equals results.json; returns the count."""
    tables = parse_tables(md)
    n = 0
    final = tables["Final checkpoints"]
    assert [r["method"] for r in final] == list(res["final"])
    for row in final:
        for col, cell in row.items():
            if col != "method" and col in res["final"][row["method"]]:
                check_cell(cell, res["final"][row["method"]][col], f"final {row['method']} {col}")
                n += 1
    for key, by_method in res["matched"].items():
        rows = tables[f"Matched KL: target = {key} the plain method's final KL (per seed)"]
        assert [r["method"] for r in rows] == list(by_method)
        for row in rows:
            for col, cell in row.items():
                if col != "method":
                    check_cell(cell, by_method[row["method"]][col], f"matched {key} {row['method']} {col}")
                    n += 1
    dyn = next(v for k, v in tables.items() if k.startswith("Dynamics"))
    for row in dyn:
        for col, cell in row.items():
            if col != "metric":
                method, half = col.split(" ")
                check_cell(
                    cell, res["dynamics"][method][half][row["metric"]], f"dynamics {col} {row['metric']}"
                )
                n += 1
    return n


def test_variant_configs_carry_their_knobs(tmp_path):
    plan = e7.PLANS["e7"]
    name = e7.register_size("e7", 0)
    p = e7.q.Paths(str(tmp_path))
    expect = {
        "dpo": {},
        "dpo_no_neg_early": {"dpo.early_neg_coef": 0.0, "dpo.early_until": plan.dpo_t1},
        "dpo_no_pos_late": {"dpo.late_pos_coef": 0.0, "dpo.late_from": plan.dpo_t2},
        "dpo_coordinated": {
            "dpo.early_neg_coef": plan.coord_early_neg_coef,
            "dpo.early_until": plan.dpo_t1,
            "dpo.late_pos_coef": plan.coord_late_pos_coef,
            "dpo.late_from": plan.dpo_t2,
        },
        "ppo": {"ppo.coef_top": 1.0, "ppo.coef_mid": 1.0, "ppo.period": 0},
        "ppo_no_top": {"ppo.coef_top": 0.0, "ppo.coef_mid": 1.0},
        "ppo_no_mid": {"ppo.coef_top": 1.0, "ppo.coef_mid": 0.0},
        "ppo_no_neg": {"ppo.neg_coef": 0.0, "ppo.pos_coef": 1.0},
        "cppo_top": {"ppo.coef_top": plan.cppo_lambda},
        "hppo": {"ppo.period": plan.hppo_period, "ppo.amplitude": plan.hppo_amplitude},
    }
    assert set(expect) == set(e7.variants(plan))
    s = e7.q.SIZES[name]
    for variant, (algo, overrides) in e7.variants(plan).items():
        c = e7.run_config(name, p, algo, overrides, plan, str(tmp_path / "cache"))
        for key, value in expect[variant].items():
            section, leaf = key.split(".")
            assert c[section][leaf] == value, (variant, key)
        if algo == "dpo":
            assert c.analysis.every == plan.dpo_probe_every and c.total_steps == s.dpo_steps
            assert c.checkpoint.keep >= s.dpo_steps // c.checkpoint.every  # every checkpoint kept
        else:
            assert c.analysis.every == 1 and c.ppo.iterations == s.ppo_iterations
            assert c.checkpoint.keep >= s.ppo_iterations // c.checkpoint.every
    # the probing windows of DPO and PPO hold the same number of optimizer steps
    assert plan.dpo_probe_every == e7.ppo_steps_per_iteration(s)


@pytest.fixture
def one_device_mesh(monkeypatch):
    """One device for the smoke run (chaining, not sharding; as tests/test_experiments_e4.py)."""
    from jaxrlhf import sharding

    monkeypatch.setattr(sharding, "mesh_shape", lambda axes, n: {"data": 1, "fsdp": 1, "tensor": 1})


@pytest.mark.slow
def test_e7_smoke_end_to_end(tmp_path, one_device_mesh):
    out = tmp_path / "out"
    methods = "dpo,ppo"
    e7.main(["--smoke", "--seeds=1", f"--out={out}", f"--workdir={tmp_path / 'wd'}", f"--methods={methods}"])
    for f in ("table.md", "results.json", "dynamics.png", "gold_vs_kl.png"):
        assert (out / f).stat().st_size > 0, f
    res = json.loads((out / "results.json").read_text())
    assert list(res["final"]) == [*methods.split(","), "sft"]
    seed = res["per_seed"][0]
    assert seed["sft"]["kl_seq"] == pytest.approx(0.0, abs=1e-5)  # SFT scored against itself
    sizes, plan = e7.BASES["smoke"], e7.PLANS["smoke"]
    dpo_ckpts = sizes.dpo_steps // plan.dpo_ckpt_every
    assert [p["step"] for p in seed["runs"]["dpo"]["points"]] == [
        plan.dpo_ckpt_every * i for i in range(dpo_ckpts + 1)
    ]
    assert len(seed["runs"]["ppo"]["points"]) == sizes.ppo_iterations // plan.ppo_ckpt_every + 1
    for name in methods.split(","):
        probes = seed["runs"][name]["probes"]
        assert probes, name
        for p in probes:  # the logged parts add up: |t|^2 = |p|^2 + |n|^2 + 2|p||n|cos
            t, a, b, c = p["grad_norm_total"], p["grad_norm_pos"], p["grad_norm_neg"], p["grad_cos_pos_neg"]
            assert t**2 == pytest.approx(a**2 + b**2 + 2 * a * b * c, rel=1e-3), name
    assert seed["runs"]["dpo"]["points"][-1]["kl_seq"] > 0  # DPO moved the policy
    assert res["final"]["ppo"]["rollout_entropy_last"]["mean"] > 0  # PPO's entropy recorded
    assert check_tables_against_results((out / "table.md").read_text(), res) > 20


def test_docs_tables_equal_committed_results():
    results = os.path.join(ROOT, "docs", "results", "e7", "results.json")
    docs = os.path.join(ROOT, "docs", "experiments_e7.md")
    if not (os.path.exists(results) and os.path.exists(docs)):
        pytest.skip("docs/results/e7/results.json or docs/experiments_e7.md not written yet")
    with open(results) as f:
        res = json.load(f)
    with open(docs) as f:
        md = f.read()
    assert res["seeds"] >= 3 and res["size"] == "e7"
    assert check_tables_against_results(md, res) > 100
    with open(os.path.join(ROOT, "docs", "results", "e7", "table.md")) as f:
        assert check_tables_against_results(f.read(), res) > 100
