"""Smoke runs of experiments E4 (PPO ablations) and E5 (verifiable answers, pass@k).

They check that every stage chains (quickstart stages -> PPO variants -> gold evaluation; SFT ->
pairs -> DPO / DPO-Iter / PPO -> pass@k) and that the outputs are well-formed. At smoke size the
models learn next to nothing, so the study's findings are NOT asserted here (docs/experiments_e4_e5.md).
"""

import importlib.util
import json
import math
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name: str):
    return importlib.import_module(f"jaxrlhf.experiments.{name}")


def _is_prob(x: float) -> bool:
    return 0.0 <= x <= 1.0


@pytest.fixture
def one_device_mesh(monkeypatch):
    """Every mesh of the run on one device: these smoke runs check the chaining, not sharding, and
    8 fake devices' collectives on 2 shared cores stalled (and aborted) PPO here under xdist."""
    from jaxrlhf import sharding

    monkeypatch.setattr(sharding, "mesh_shape", lambda axes, n: {"data": 1, "fsdp": 1, "tensor": 1})


@pytest.mark.slow
def test_e4_smoke_chains_and_writes_outputs(tmp_path, one_device_mesh):
    e4 = _load("e4_ablations")
    out = tmp_path / "out"
    res = e4.main(
        ["--smoke", "--seeds=1", f"--out={out}", f"--workdir={tmp_path / 'wd'}", "--variants=recipe,no_ema"]
    )
    for f in ("table.md", "results.json", "reward_vs_kl.png"):
        assert (out / f).stat().st_size > 0, f
    saved = json.loads((out / "results.json").read_text())
    assert list(saved["table"]) == ["sft", "recipe", "no_ema"]
    assert saved["variants"]["no_ema"]["ema_decay"] == 1.0
    assert saved["variants"]["recipe"]["ema_decay"] < 1.0
    for name, row in saved["table"].items():
        assert _is_prob(row["gold_reward"]["mean"]) and _is_prob(row["win_rate_vs_sft"]["mean"]), name
        assert all(math.isfinite(row[m]["mean"]) for m in e4.METRICS), name
    # The SFT row is SFT against itself: zero KL; the PPO runs moved the policy.
    assert abs(saved["table"]["sft"]["kl_to_sft"]["mean"]) < 1e-4
    assert res["ppo_train_last"]["recipe/s0"]  # PPO logged metrics
    assert "| recipe |" in (out / "table.md").read_text()
    with pytest.raises(ValueError, match="unknown variants"):
        e4.run("e4_smoke", 1, str(tmp_path / "wd"), str(out), ("bigger_batch",))


def test_e4_small_batch_keeps_total_rollouts_and_steps():
    e4 = _load("e4_ablations")
    e4.register_sizes()
    s = e4.SIZES["e4"]
    big, small = e4.VARIANTS["recipe"], e4.VARIANTS["small_batch"]
    n_big = s.ppo_rollout_batch // big["batch_div"] * s.ppo_iterations * big["batch_div"]
    n_small = s.ppo_rollout_batch // small["batch_div"] * s.ppo_iterations * small["batch_div"]
    assert n_big == n_small and s.ppo_rollout_batch == 512
    steps = lambda v: (  # noqa: E731 - optimizer steps = iterations x epochs x minibatches per batch
        s.ppo_iterations
        * v["batch_div"]
        * s.ppo_epochs
        * (s.ppo_rollout_batch // v["batch_div"] // s.ppo_minibatch)
    )
    assert steps(big) == steps(small)


@pytest.mark.slow
def test_e5_smoke_chains_and_writes_outputs(tmp_path, one_device_mesh):
    e5 = _load("e5_verifiable")
    out = tmp_path / "out"
    res = e5.main(["--smoke", "--seeds=1", f"--out={out}", f"--workdir={tmp_path / 'wd'}"])
    for f in ("table.md", "results.json", "pass_at_k.png"):
        assert (out / f).stat().st_size > 0, f
    saved = json.loads((out / "results.json").read_text())
    assert list(saved["table"]) == list(e5.POLICIES)
    n = e5.EXTRA["e5_smoke"]["eval_samples"]
    for name, row in saved["table"].items():
        ks = sorted(int(m.split("@")[1]) for m in row if m.startswith("pass@"))
        assert ks[0] == 1 and ks[-1] == n, (name, ks)
        vals = [row[f"pass@{k}"]["mean"] for k in ks]
        assert all(_is_prob(v) for v in vals), (name, vals)
        assert vals == sorted(vals), f"{name}: pass@k must not fall with k: {vals}"
    assert abs(saved["table"]["sft"]["kl_to_reference"]["mean"]) < 1e-4
    pairs = res["stages"]["pairs/s0"]
    assert pairs["pairs"] >= 2 * e5.SIZES["e5_smoke"].pair_batch
    # Chosen = a correct answer: every pair's chosen side passes the checker.
    from jaxrlhf.tasks import common, verifiable

    rows = {r["prompt"]: r for r in common.read_jsonl(tmp_path / "wd" / "data" / "prompts_train.jsonl")}
    for r in common.read_jsonl(tmp_path / "wd" / "seed0" / "pairs.jsonl"):
        assert verifiable.check(rows[r["prompt"]], r["chosen"]) == 1.0
        assert verifiable.check(rows[r["prompt"]], r["rejected"]) < 1.0
