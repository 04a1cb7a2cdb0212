"""E2 (DPO vs PPO vs DPO-Iter, measured reward-KL trajectories): the matched-KL statistics against
plain loops and closed forms, the DPO-Iter alignment of held-out / logged reward-model scores, and a
2-seed smoke run end to end (plumbing only: smoke sizes learn next to nothing).
"""

import importlib
import json
import math
import os

import pytest

e2 = importlib.import_module("jaxrlhf.experiments.e2_frontier")

T_975_DOF2 = 4.302652729911275  # Student-t 97.5% quantile, 2 degrees of freedom (table value)


def _pt(ckpt, kl, gold, **extra):
    return {"checkpoint": ckpt, "step": ckpt, "kl_seq": kl, "kl_token": kl / 10, "gold": gold, **extra}


def _seed(sft_gold, dpo_runs, ppo_runs, ema, it):
    """A per-seed result: lists of (kl, gold) trajectories per method (checkpoints 1..n)."""
    sft = _pt(0, 0.0, sft_gold)
    runs = {}
    for method, trajs in (("dpo", dpo_runs), ("ppo", ppo_runs), ("ppo_ema", [ema]), ("dpo_iter", [it])):
        for i, traj in enumerate(trajs):
            pts = [_pt(k + 1, kl, g) for k, (kl, g) in enumerate(traj)]
            runs[f"{method}_{i}"] = {"method": method, "points": [sft, *pts]}
    return {"sft": sft, "runs": runs}


SEEDS = [
    _seed(0.3, [[(0.5, 0.35), (1.5, 0.50), (3.0, 0.40)], [(0.9, 0.45), (5.0, 0.6)]],
          [[(0.8, 0.32), (1.9, 0.38)], [(0.4, 0.31)]], [(1.1, 0.36)], [(2.5, 0.33)]),
    _seed(0.2, [[(0.7, 0.30), (2.5, 0.55)], [(1.0, 0.25)]],
          [[(0.9, 0.28), (2.2, 0.41)], [(0.2, 0.21)]], [(0.6, 0.24)], [(0.5, 0.22)]),
    _seed(0.25, [[(1.2, 0.40), (1.8, 0.42)], [(0.3, 0.27)]],
          [[(1.0, 0.30), (4.0, 0.5)], [(0.6, 0.26)]], [(3.0, 0.35)], [(1.5, 0.28)]),
]  # fmt: skip


def _ci(values):
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, T_975_DOF2 * std / math.sqrt(n)


def _all_points(seed, method):
    pts = [seed["sft"]]
    for r in seed["runs"].values():
        if r["method"] == method:
            pts += r["points"][1:]
    return pts


@pytest.mark.parametrize("kl,scale", [("kl_seq", 1.0), ("kl_token", 0.1)])
def test_matched_envelope_closest_and_paired_differences_against_loops(kl, scale):
    out = e2.matched(SEEDS, (1.0 * scale, 2.0 * scale), kl)
    for target in (1.0 * scale, 2.0 * scale):
        block = out[f"{target:g}"]
        best = {}
        for m in e2.METHODS:
            env, clo_gold, gap = [], [], []
            for s in SEEDS:
                pts = _all_points(s, m)
                ok = [p for p in pts if p[kl] <= target]  # SFT (KL 0) always qualifies
                env.append(max(p["gold"] for p in ok))
                trained = [p for p in pts if p["checkpoint"] > 0]
                c = sorted(trained, key=lambda p: abs(p[kl] - target))[0]
                clo_gold.append(c["gold"])
                gap.append(c[kl] - target)
            best[m] = env
            r = block["methods"][m]
            assert r["envelope_gold"]["values"] == pytest.approx(env)
            assert (r["envelope_gold"]["mean"], r["envelope_gold"]["ci95"]) == pytest.approx(_ci(env))
            assert r["closest_gold"]["values"] == pytest.approx(clo_gold)
            assert r["closest_kl_gap"]["mean"] == pytest.approx(sum(gap) / 3)
        for m in ("ppo", "ppo_ema", "dpo_iter"):
            d = [a - b for a, b in zip(best["dpo"], best[m], strict=True)]
            got = block["paired"][f"dpo - {m}"]["envelope"]
            assert (got["mean"], got["ci95"]) == pytest.approx(_ci(d))
    k1, k2 = f"{1.0 * scale:g}", f"{2.0 * scale:g}"
    # spot values by hand: seed 0's DPO envelope at KL 1 is its (0.9, 0.45) point, at KL 2 (1.5, 0.50)
    assert out[k1]["methods"]["dpo"]["envelope_gold"]["values"][0] == pytest.approx(0.45)
    assert out[k2]["methods"]["dpo"]["envelope_gold"]["values"][0] == pytest.approx(0.50)
    # seed 1's PPO at KL 1: nothing above SFT below 1 except (0.9, 0.28) and (0.2, 0.21) -> 0.28
    assert out[k1]["methods"]["ppo"]["envelope_gold"]["values"][1] == pytest.approx(0.28)


def test_with_rm_aligns_each_checkpoint_with_the_same_policys_logged_score():
    # checkpoint k (after k rounds) is the policy round k + 1 samples from at its start
    pts = [_pt(1, 1.0, 0.3), _pt(2, 2.0, 0.2)]
    rm_pts = [_pt(1, 1.0, 5.0), _pt(2, 2.5, 7.0)]
    history = [{"round/reward_mean": 0.0}, {"round/reward_mean": 1.5}, {"round/reward_mean": 2.5}]
    out = e2.with_rm(pts, rm_pts, history[1:])
    assert [p["rm_score"] for p in out] == [5.0, 7.0]
    assert [p["rm_logged"] for p in out] == [1.5, 2.5]
    assert [p["rm_eval_kl_mismatch"] for p in out] == [0.0, 0.5]
    assert e2.with_rm(pts, rm_pts, history[2:])[1]["rm_logged"] is None  # the last round logs no successor


def test_iter_stats_over_optimisation_deltas():
    per_seed = []
    for golds, rms in (([0.3, 0.5, 0.2], [0.0, 1.0, 3.0]), ([0.2, 0.25, 0.3], [0.0, 0.5, 0.4])):
        pts = [_pt(k, float(k), g, rm_score=r, rm_logged=None, rm_eval_kl_mismatch=0.0)
               for k, (g, r) in enumerate(zip(golds, rms, strict=True))]  # fmt: skip
        per_seed.append({"runs": {"it": {"method": "dpo_iter", "points": pts}}})
    st = e2.iter_stats(per_seed)
    ch = st["change"]
    assert ch["gold_final_minus_sft"]["values"] == pytest.approx([-0.1, 0.1])
    assert ch["rm_final_minus_sft"]["values"] == pytest.approx([3.0, 0.4])
    assert ch["gold_final_minus_best"]["values"] == pytest.approx([-0.3, 0.0])
    assert ch["rm_final_minus_best_gold_round"]["values"] == pytest.approx([2.0, 0.0])
    assert ch["best_gold_round"] == [1, 2]
    assert [x for pair in ch["gold_best_final"] for x in pair] == pytest.approx([0.5, 0.2, 0.3, 0.3])
    assert [x for pair in ch["rm_best_final"] for x in pair] == pytest.approx([1.0, 3.0, 0.4, 0.4])
    assert st["rounds"][1]["gold"]["mean"] == pytest.approx(0.375)
    assert st["rounds"][0]["rm_logged"]["n"] == 0


@pytest.mark.slow
def test_e2_smoke_two_seeds(tmp_path):
    """Two seeds (the pairing and the t-intervals need n >= 2) of the smoke sweep, end to end."""
    wd, out = str(tmp_path / "wd"), str(tmp_path / "e2")
    res = e2.main(["--smoke", "--seeds=2", f"--out={out}", f"--workdir={wd}"])
    sw = e2.SWEEPS["smoke"]
    every = {"dpo": sw.dpo_ckpt_every, "ppo": sw.ppo_ckpt_every, "ppo_ema": sw.ppo_ckpt_every, "dpo_iter": 1}
    total = {
        "dpo": sw.dpo_steps,
        "ppo": sw.ppo_iterations,
        "ppo_ema": sw.ppo_iterations,
        "dpo_iter": sw.iter_rounds,
    }
    for r in res["per_seed"]:
        assert r["sft"]["kl_seq"] == pytest.approx(0.0, abs=1e-5)
        assert {run["method"] for run in r["runs"].values()} == set(e2.METHODS)
        for name, run in r["runs"].items():
            m = run["method"]  # SFT, then every checkpoint (all kept)
            assert [p["checkpoint"] for p in run["points"]] == list(range(0, total[m] + 1, every[m])), name
            for p in run["points"]:
                assert 0.0 <= p["gold"] <= 1.0 and math.isfinite(p["kl_seq"]), name
            assert run["config"]["checkpoint"]["every"] >= 1
        it = next(run for run in r["runs"].values() if run["method"] == "dpo_iter")
        # the reward-model evaluator scores the very samples the gold evaluator scored: same KL
        assert max(p["rm_eval_kl_mismatch"] for p in it["points"]) < 1e-5
        assert it["points"][0]["rm_logged"] == it["history"][0]["round/reward_mean"]
    for f in ("table.md", "results.json", "frontier.png"):
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    with open(os.path.join(out, "results.json")) as f:
        saved = json.load(f)
    with open(os.path.join(out, "table.md")) as f:
        assert f.read() == e2.table_markdown(saved) + "\n"
    assert saved["sweep"]["dpo_betas"] == list(sw.dpo_betas) and saved["seeds"] == 2
    assert set(saved["matched"]["kl_seq"][f"{sw.kl_targets[0]:g}"]["methods"]) == set(e2.METHODS)
    assert set(saved["matched"]["kl_token"]) == {f"{t:g}" for t in sw.kl_token_targets}
    # --restat recomputes the same tables from the stored per-seed scores alone
    again = e2.main(["--restat", os.path.join(out, "results.json"), f"--out={tmp_path / 'restat'}"])
    assert e2.table_markdown(again) == e2.table_markdown(saved)
    assert again["wall_s_total"] == saved["wall_s_total"]
