"""PPO and DPO-Iter: the checks that catch silent RLHF bugs, on a tiny model end to end."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf import registry
from jaxrlhf import rollout as rollout_lib
from jaxrlhf.algorithms import dpo_iter, ppo
from jaxrlhf.tasks import reviews

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def word_reward(prompts, responses, rows=None):
    """A dense programmatic reward a tiny random policy learns fast: the share of response words
    with an even number of letters (about half the vocabulary)."""
    out = []
    for r in responses:
        w = r.split()
        out.append(sum(len(x) % 2 == 0 for x in w) / max(len(w), 1))
    return np.asarray(out, np.float32)


def nan_reward(prompts, responses, rows=None):
    return np.full(len(responses), np.nan, np.float32)


RECORDED: list[np.ndarray] = []  # every score batch ``recorded_*`` returned, in call order


def recorded_parity(prompts, responses, rows=None):
    """A binary reward that varies between samples of one prompt (odd word count -> 1), recorded
    so a test can recompute pass@k from the very scores the evaluation saw."""
    out = np.asarray([len(r.split()) % 2 for r in responses], np.float32)
    RECORDED.append(out)
    return out


def recorded_share(prompts, responses, rows=None):
    """``word_reward``, recorded (a graded reward: ties are rare, the win rate is informative)."""
    out = word_reward(prompts, responses, rows)
    RECORDED.append(out)
    return out


def pass_at_k_by_enumeration(row: np.ndarray, k: int) -> float:
    """P(at least one success among k of the n samples drawn without replacement), by listing every
    k-subset (independent of the closed form the code uses)."""
    import itertools

    subsets = list(itertools.combinations(range(len(row)), k))
    return sum(any(row[i] for i in s) for s in subsets) / len(subsets)


def tiny(name="ppo", **over):
    path = os.path.join(ROOT, "configs", "tiny", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"tiny_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    with c.unlocked():
        c.checkpoint.async_save = False
        c.export_hf = False
        for k, v in over.items():
            node = c
            *parents, leaf = k.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = v
    return c


# ----------------------------------------------------------------------------------------------
# Pure pieces.
# ----------------------------------------------------------------------------------------------
def test_reward_lands_on_the_eos_not_on_padding():
    # prompt left-padded (P=4), response right-padded (N=4): row 0 stops at its 2nd token (EOS).
    prompt_mask = jnp.array([[0, 0, 1, 1], [1, 1, 1, 1]])
    response_mask = jnp.array([[1, 1, 0, 0], [1, 1, 1, 1]])
    seq = rollout_lib.response_sequences(
        jnp.ones((2, 4), jnp.int32), prompt_mask, jnp.ones((2, 4), jnp.int32), response_mask
    )
    action_mask = seq["loss_mask"][:, 1:]
    onehot = rollout_lib.score_positions(action_mask)
    # Action t predicts token t+1; row 0's EOS is token 5 (P + 1) -> action index 4.
    np.testing.assert_array_equal(np.argmax(onehot, -1), [4, 6])
    assert float(onehot.sum()) == 2.0
    assert np.all(np.asarray(onehot) <= np.asarray(action_mask))
    # The rewards built for GAE put the score there and nowhere else.
    cfg = tiny().ppo
    rollout = {
        "action_mask": action_mask,
        "old_logprobs": jnp.zeros(action_mask.shape),
        "ref_logprobs": jnp.zeros(action_mask.shape),
        "old_values": jnp.zeros(action_mask.shape),
        "score": jnp.array([2.0, -1.0]),
    }
    out = ppo.advantages_and_returns(rollout, jnp.float32(0.1), cfg)
    np.testing.assert_allclose(np.asarray(out["rewards"]), np.asarray(onehot * rollout["score"][:, None]))
    assert np.all(np.asarray(out["advantages"])[np.asarray(action_mask) == 0] == 0)


def test_kl_penalty_enters_the_reward_per_token():
    cfg = tiny().ppo
    mask = jnp.array([[0, 1, 1, 1]])
    rollout = {
        "action_mask": mask,
        "old_logprobs": jnp.array([[0.0, -1.0, -2.0, -0.5]]),
        "ref_logprobs": jnp.array([[0.0, -1.5, -1.0, -0.5]]),
        "old_values": jnp.zeros((1, 4)),
        "score": jnp.array([1.0]),
    }
    out = ppo.advantages_and_returns(rollout, jnp.float32(0.5), cfg)
    np.testing.assert_allclose(np.asarray(out["rewards"])[0], [0.0, -0.25, 0.5, 1.0], rtol=1e-6)


def test_running_stats_match_numpy():
    rng = np.random.default_rng(0)
    batches = [rng.normal(3.0, 2.0, size=n).astype(np.float32) for n in (5, 17, 8)]
    stats = {"count": jnp.float32(0), "mean": jnp.float32(0), "var": jnp.float32(1)}
    for b in batches:
        stats = rollout_lib.update_running_stats(stats, jnp.asarray(b))
    allx = np.concatenate(batches)
    np.testing.assert_allclose(float(stats["mean"]), allx.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(stats["var"]), allx.var(), rtol=1e-4)
    assert float(stats["count"]) == allx.size


def test_adaptive_kl_controller():
    assert ppo.kl_coef_update(0.1, 12.0, 512, target=6.0, horizon=10000) == pytest.approx(
        0.1 * (1 + 0.2 * 512 / 1e4)
    )
    assert ppo.kl_coef_update(0.1, 3.0, 512, target=6.0, horizon=10000) == pytest.approx(
        0.1 * (1 - 0.2 * 512 / 1e4)
    )
    assert ppo.kl_coef_update(0.1, 6.0, 512, target=6.0, horizon=10000) == pytest.approx(0.1)


def test_best_worst_pairs_skip_ties():
    scores = np.array([0.1, 0.9, 0.5, 0.3, 0.3, 0.3])
    c, r, keep = dpo_iter.best_worst_pairs(scores, 3)
    np.testing.assert_array_equal(c, [1, 3])
    np.testing.assert_array_equal(r, [0, 3])
    np.testing.assert_array_equal(keep, [True, False])


def test_validation_names_the_key():
    from jaxrlhf import config_validation

    c = tiny(**{"ppo.minibatch_size": 5})
    with pytest.raises(ValueError, match="rollout_batch_size"):
        config_validation.validate_config(c)
    c = tiny(**{"ppo.kl_estimator": "k4"})
    with pytest.raises(ValueError, match="kl_estimator"):
        ppo.validate(c)


# ----------------------------------------------------------------------------------------------
# End to end on a tiny model.
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ppo_checks_and_reward_rises(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    c = tiny(
        **{
            "reward.fn": "test_ppo:word_reward",
            "ppo.iterations": 20,
            "ppo.rollout_batch_size": 32,
            "ppo.minibatch_size": 16,
            "ppo.epochs": 4,
            "optim.lr": 1e-2,
            "ref.ema_decay": 0.95,
        }
    )
    res = registry.run(c, str(tmp_path / "ppo"))
    hist = res["history"]
    for h in hist:
        # Ratio exactly 1 at the first minibatch of each iteration's first epoch (f32 noise only),
        # and the sampler's log-probs equal the recomputed ones with left-padded prompts.
        assert h["train/first_minibatch_ratio_max_dev"] < 1e-5
        assert h["train/first_minibatch_clipfrac"] == 0.0
        assert h["rollout/sampling_logprob_max_dev"] < 1e-4
    for key in (
        "reward/raw_mean", "reward/normalized_mean", "kl_ref/k1", "kl_ref/k3", "train/approx_kl",
        "train/clipfrac", "train/value_clipfrac", "value/explained_variance", "train/entropy",
        "advantages/mean", "returns/std",
        "response/length_mean", "response/eos_rate", "time/generate", "time/score", "time/train",
        "perf/generate_tokens_per_s", "perf/train_tokens_per_s",
    ):  # fmt: skip
        assert key in hist[-1] and np.isfinite(hist[-1][key]), key
    early = np.mean([h["reward/raw_mean"] for h in hist[:3]])
    late = np.mean([h["reward/raw_mean"] for h in hist[-3:]])
    assert late > early + 0.05, (early, late)
    assert hist[0]["kl_ref/k1"] == pytest.approx(0.0, abs=1e-5)  # reference starts at the actor


@pytest.mark.slow
def test_ppo_nan_reward_stops_before_gae(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    c = tiny(**{"reward.fn": "test_ppo:nan_reward", "ppo.iterations": 1})
    called = []
    real = ppo.advantages_and_returns
    monkeypatch.setattr(ppo, "advantages_and_returns", lambda *a: called.append(1) or real(*a))
    with pytest.raises(ppo.RolloutError, match="non-finite score.*before GAE"):
        registry.run(c, str(tmp_path / "nan"))
    assert not called


def _final_actor(res):
    return jax.device_get(res["state"].params["actor"])


@pytest.mark.slow
def test_ppo_update_independent_of_micro_batching_and_sharding(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    over = {
        "ppo.iterations": 1,
        "optim.name": "sgd",
        "optim.b1": 0.0,
        "critic.optim.name": "sgd",
        "critic.optim.b1": 0.0,
    }
    base = registry.run(tiny(**over), str(tmp_path / "a"))
    micro = registry.run(tiny(**over, micro_batches=4), str(tmp_path / "b"))
    sharded = registry.run(tiny(**over, mesh=dict(data=2, fsdp=2, tensor=2)), str(tmp_path / "c"))
    for other in (micro, sharded):
        for x, y in zip(
            jax.tree.leaves(_final_actor(base)), jax.tree.leaves(_final_actor(other)), strict=True
        ):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_ppo_resume_is_bit_exact(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    straight = registry.run(tiny(**{"ppo.iterations": 3, "checkpoint.every": 1}), str(tmp_path / "s"))
    registry.run(tiny(**{"ppo.iterations": 2, "checkpoint.every": 1}), str(tmp_path / "r"))
    resumed = registry.run(tiny(**{"ppo.iterations": 3, "checkpoint.every": 1}), str(tmp_path / "r"))
    assert len(resumed["history"]) == 1
    for x, y in zip(
        jax.tree.leaves(jax.device_get(straight["state"])),
        jax.tree.leaves(jax.device_get(resumed["state"])),
        strict=True,
    ):
        np.testing.assert_array_equal(x, y)
    assert straight["side"] == resumed["side"]  # reward statistics and KL coefficient restored
    assert straight["history"][-1]["reward/raw_mean"] == resumed["history"][-1]["reward/raw_mean"]


@pytest.mark.slow
def test_dpo_iter_rounds_and_evaluation(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    c = tiny("dpo_iter", **{"dpo_iter.rounds": 2, "export_hf": True})
    res = registry.run(c, str(tmp_path / "di"))
    assert len(res["history"]) == 2
    assert all(h["round/pairs"] > 0 for h in res["history"])
    assert "train/rewards/accuracy" in res["history"][-1]
    from jaxrlhf import evaluate

    out = evaluate.evaluate(
        tiny("dpo_iter"),
        res["export_dir"],
        baseline=res["export_dir"],
        samples=2,
        max_prompts=16,
        batch_size=8,
    )
    assert out["prompts"] == 16
    assert 0.0 <= out["win_rate"] <= 1.0
    assert abs(out["kl_to_reference"]) < 1e-4  # the policy against itself
    assert np.isfinite(out["reward_mean"])
    # Gold sentiment rewards are not 0/1, so no pass@k; the verifiable reward is.
    assert "pass@1" not in out
    assert reviews.gold_scores(["great"]).dtype == np.float32


@pytest.mark.slow
def test_evaluate_pass_at_k_with_a_verifiable_reward(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    from jaxrlhf import evaluate, models
    from jaxrlhf.tasks import verifiable

    prompts = tmp_path / "prompts.jsonl"
    verifiable.write_prompts_jsonl(str(prompts), 8, 0)
    policy = tmp_path / "policy"
    models.save_pretrained(models.init("llama", **{**tiny().model.init}), str(policy))
    c = tiny("dpo_iter", **{"data.path": str(prompts), "data.max_prompt_length": 24, "data.max_length": 40})
    with c.unlocked():
        c.reward.fn = "jaxrlhf.tasks.verifiable:reward"
    out = evaluate.evaluate(c, str(policy), samples=4, batch_size=4)
    assert out["prompts"] == 8
    # A random policy never answers exactly: every pass@k is 0.
    assert out["pass@1"] == out["pass@2"] == out["pass@4"] == 0.0

    # A binary reward that does vary between samples: pass@k from the recorded scores, by
    # enumerating k-subsets, must equal the evaluation's numbers.
    RECORDED.clear()
    with c.unlocked():
        c.reward.fn = "test_ppo:recorded_parity"
    out = evaluate.evaluate(c, str(policy), samples=4, batch_size=4)
    scores = np.concatenate(RECORDED).reshape(8, 4)  # 2 batches of 4 prompts x 4 samples
    assert 0 < scores.sum() < scores.size, "the check needs both outcomes"
    for k in (1, 2, 4):
        expect = np.mean([pass_at_k_by_enumeration(row, k) for row in scores])
        assert out[f"pass@{k}"] == pytest.approx(expect, abs=1e-12), k
    assert out["reward_mean"] == pytest.approx(scores[:, 0].mean(), abs=1e-7)


@pytest.mark.slow
def test_evaluate_cli_writes_metrics(tmp_path, monkeypatch):
    import json
    import subprocess
    import sys

    from jaxrlhf import models

    policy = tmp_path / "policy"
    models.save_pretrained(models.init("llama", **{**tiny().model.init}), str(policy))
    out = tmp_path / "eval.json"
    cmd = [
        sys.executable, "-m", "jaxrlhf.evaluate", "--config=configs/tiny/dpo_iter.py", f"--policy={policy}",
        f"--baseline={policy}", "--max_prompts=8", "--batch_size=8", f"--out={out}",
    ]  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    # The CLI writes exactly what the function returns for the same arguments.
    monkeypatch.chdir(ROOT)
    from jaxrlhf import evaluate

    direct = evaluate.evaluate(
        tiny("dpo_iter"), str(policy), baseline=str(policy), max_prompts=8, batch_size=8
    )
    assert res == pytest.approx(direct, abs=1e-6)
    assert abs(res["kl_to_reference"]) < 1e-4


@pytest.mark.slow
def test_evaluate_win_rate_from_the_scores_it_saw(tmp_path, monkeypatch):
    """Win rate = mean over prompts of [policy > baseline] + 0.5 [tie], recomputed by a plain loop
    from the recorded scores of two different random policies."""
    monkeypatch.chdir(ROOT)
    from jaxrlhf import evaluate, models

    a, b = tmp_path / "a", tmp_path / "b"
    init = {**tiny().model.init}
    models.save_pretrained(models.init("llama", seed=1, **init), str(a))
    models.save_pretrained(models.init("llama", seed=2, **init), str(b))
    c = tiny("dpo_iter")
    with c.unlocked():
        c.reward.fn = "test_ppo:recorded_share"
    RECORDED.clear()
    out = evaluate.evaluate(c, str(a), baseline=str(b), max_prompts=16, batch_size=8)
    pol, base = np.concatenate(RECORDED[:2]), np.concatenate(RECORDED[2:])
    assert len(pol) == len(base) == 16
    wins = 0.0
    for p, q in zip(pol, base, strict=True):
        wins += 1.0 if p > q else 0.5 if p == q else 0.0
    assert out["win_rate"] == pytest.approx(wins / 16, abs=1e-12)
    assert 0.0 < out["win_rate"] < 1.0, "two random policies: the check needs wins and losses"
    assert out["reward_mean"] == pytest.approx(pol.mean(), abs=1e-6)
    assert out["baseline_reward_mean"] == pytest.approx(base.mean(), abs=1e-6)


@pytest.mark.slow
def test_ratio_is_one_at_the_first_minibatch_with_a_sampling_temperature(tmp_path, monkeypatch):
    """The update's policy is the sampling distribution (logits / temperature), as in the score
    phase: with temperature 0.7 the first minibatch's ratio is still exactly 1."""
    monkeypatch.chdir(ROOT)
    c = tiny(**{"ppo.iterations": 1, "generation.temperature": 0.7, "export_hf": False})
    res = registry.run(c, str(tmp_path / "t"))
    h = res["history"][0]
    assert h["rollout/sampling_logprob_max_dev"] < 1e-4
    assert h["train/first_minibatch_ratio_max_dev"] < 1e-4
