"""The critic-free family (``algorithm="grpo"``): advantages and the loss against numpy, validation,
and end to end on a tiny model: no critic anywhere, ratio 1 at the first minibatch, the run's
advantages equal to numpy's on its own rewards, invariance to devices and micro-batches, resume."""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrlhf import config_defaults as d
from jaxrlhf import models, registry
from jaxrlhf.algorithms import grpo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tie_reward(prompts, responses, rows=None):
    """Prompts with an even number of words score a constant 0.5 (their group is all-equal);
    the others score 1 when the response has an even number of words, else 0."""
    out = []
    for p, r in zip(prompts, responses, strict=True):
        out.append(0.5 if len(p.split()) % 2 == 0 else float(len(r.split()) % 2 == 0))
    return np.asarray(out, np.float32)


def tiny(**over):
    path = os.path.join(ROOT, "configs", "tiny", "grpo.py")
    spec = importlib.util.spec_from_file_location("tiny_grpo", path)
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
# numpy references (plain loops, float64).
# ----------------------------------------------------------------------------------------------
def np_group_advantages(score, g, method):
    out = np.zeros(len(score))
    for start in range(0, len(score), g):
        r = np.asarray(score[start : start + g], np.float64)
        for i in range(g):
            if np.all(r == r[0]):
                a = 0.0
            elif method == "grpo":
                a = (r[i] - r.mean()) / (r.std(ddof=1) + 1e-6)
            elif method == "dr_grpo":
                a = r[i] - r.mean()
            else:  # rloo: the mean of the other samples as the baseline
                a = r[i] - (r.sum() - r[i]) / (g - 1)
            out[start + i] = a
    return out


def np_reinforce_pp(score, old, ref, mask, keep, kl_coef, gamma):
    """Per-token reward (score at the last response token - kl_coef * k1), reward-to-go over the valid
    tokens, whitened over the valid tokens of kept rows (population variance, eps 1e-8)."""
    B, T = mask.shape
    ret = np.zeros((B, T))
    for b in range(B):
        idx = [t for t in range(T) if mask[b, t]]
        g = 0.0
        for j, t in enumerate(reversed(idx)):
            r = -kl_coef * (old[b, t] - ref[b, t]) + (score[b] if j == 0 else 0.0)
            g = r + gamma * g
            ret[b, t] = g
    sel = (mask > 0) & (keep[:, None] > 0)
    mu, var = ret[sel].mean(), ret[sel].var()
    return np.where(sel, (ret - mu) / np.sqrt(var + 1e-8), 0.0)


def _settings(**over):
    c = tiny(**{f"grpo.{k}": v for k, v in over.items()})
    return grpo.settings(c)


def _fake_rollout(rng, n=12, t=7):
    mask = np.zeros((n, t), np.int32)
    for b in range(n):
        start, length = rng.integers(0, 3), rng.integers(1, t - 2)
        mask[b, start : start + length] = 1
    old = rng.normal(-2, 0.5, (n, t)).astype(np.float32)
    ref = (old + rng.normal(0, 0.3, (n, t))).astype(np.float32)
    score = rng.integers(0, 3, n).astype(np.float32)
    score[4:8] = 1.0  # one tied group of 4
    return {
        "action_mask": jnp.asarray(mask),
        "old_logprobs": jnp.asarray(old),
        "ref_logprobs": jnp.asarray(ref),
    }, score


# ----------------------------------------------------------------------------------------------
# Pure pieces.
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
@pytest.mark.parametrize("filt", [False, True])
def test_group_advantages_phase_matches_numpy(estimator, filt):
    r, score = _fake_rollout(np.random.default_rng(0))
    s = _settings(estimator=estimator, samples_per_prompt=4, filter_equal_groups=filt)
    out = jax.device_get(grpo.advantages(r, jnp.asarray(score), jnp.float32(0.3), s))
    want = np_group_advantages(score, 4, estimator)
    mask = np.asarray(r["action_mask"])
    tied = np.repeat([np.all(score[i : i + 4] == score[i]) for i in range(0, 12, 4)], 4)
    keep = ~tied if filt else np.ones(12, bool)
    np.testing.assert_allclose(
        out["advantages"], np.where((mask > 0) & keep[:, None], want[:, None], 0), atol=1e-5
    )
    np.testing.assert_array_equal(out["keep"], keep.astype(np.float32))
    np.testing.assert_allclose(
        out["group_std"], [np.std(score[i : i + 4], ddof=1) for i in (0, 4, 8)], rtol=1e-5
    )
    # Filtered rows leave the loss through their loss mask (shapes unchanged).
    seq = {"loss_mask": np.ones((12, 8), np.int32), "input_ids": np.zeros((12, 8), np.int32)}
    ub = grpo.update_batch(seq, r, out)
    np.testing.assert_array_equal(
        np.asarray(ub["loss_mask"]), np.repeat(keep[:, None], 8, 1).astype(np.int32)
    )


@pytest.mark.parametrize("filt", [False, True])
def test_reinforce_pp_phase_matches_numpy(filt):
    r, score = _fake_rollout(np.random.default_rng(1))
    s = _settings(
        estimator="reinforce_pp", samples_per_prompt=4, filter_equal_groups=filt, gamma=0.9, kl_estimator="k1"
    )
    out = jax.device_get(grpo.advantages(r, jnp.asarray(score), jnp.float32(0.3), s))
    keep = np.asarray(out["keep"])
    assert keep.sum() == (8 if filt else 12)
    host = {k: np.asarray(v, np.float64) for k, v in r.items()}
    want = np_reinforce_pp(
        score, host["old_logprobs"], host["ref_logprobs"], host["action_mask"], keep, 0.3, 0.9
    )
    np.testing.assert_allclose(out["advantages"], want, atol=1e-4)


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean", "seq_sum_norm"])
def test_first_step_loss_is_the_closed_form(agg):
    """At ratio 1 the policy loss is ``-sum_i A_i w_i`` with the aggregation's weights, filtered rows
    (zero loss mask) excluded; computed with numpy from the batch alone."""
    c = tiny(**{"grpo.loss_agg": agg})
    s = grpo.settings(c)
    model = models.init("llama", **c.model.init)
    graphdef, state = nnx.split(model)
    params = {"actor": nnx.to_pure_dict(state)}
    rng = np.random.default_rng(2)
    B, T = 6, 10
    ids = rng.integers(3, 200, (B, T)).astype(np.int32)
    lm = np.zeros((B, T), np.int32)
    for b in range(B):
        lm[b, 3 : 3 + rng.integers(1, T - 3)] = 1
    lm[5] = 0  # a filtered row
    batch = {"input_ids": ids, "attention_mask": np.ones((B, T), np.int32), "loss_mask": lm}
    batch["positions"] = np.tile(np.arange(T, dtype=np.int32), (B, 1))
    logits = nnx.merge(graphdef, params["actor"])(
        ids, attention_mask=batch["attention_mask"], positions=batch["positions"]
    )
    lp = jax.nn.log_softmax(np.asarray(logits, np.float64)[:, :-1] / s.temperature, axis=-1)
    old = np.take_along_axis(lp, ids[:, 1:, None], -1)[..., 0].astype(np.float32)
    adv = rng.normal(size=B)
    batch.update(
        old_logprobs=old, ref_logprobs=old, advantages=np.repeat(adv[:, None], T - 1, 1).astype(np.float32)
    )
    den = grpo.denominators(batch, s=s)
    loss, m = grpo.grpo_loss(params, None, batch, den, None, graphdef=graphdef, s=s, kl_coef=0.0)
    m_ = lm[:, 1:]
    lengths, rows = m_.sum(1), (m_.sum(1) > 0)
    if agg == "token_mean":
        want = -np.sum(adv * lengths) / lengths.sum()
    elif agg == "seq_mean":
        want = -np.sum(np.where(rows, adv, 0)) / rows.sum()
    else:
        want = -np.sum(adv * lengths) / (rows.sum() * c.generation.max_new_tokens)
    np.testing.assert_allclose(float(m["policy_loss"]), want, rtol=1e-4, atol=1e-6)
    assert float(m["ratio_max_dev"]) < 1e-4 and float(m["clipfrac_low"]) == 0.0


def test_validation_names_the_key():
    from jaxrlhf.trainer import harness

    for key, value, match in [
        ("grpo.estimator", "ppo", "grpo.estimator"),
        ("grpo.ratio_level", "seq", "grpo.ratio_level"),
        ("grpo.loss_agg", "seq_sum", "grpo.loss_agg"),
        ("grpo.kl_estimator", "k4", "grpo.kl_estimator"),
        ("grpo.samples_per_prompt", 1, "grpo.samples_per_prompt"),
        ("grpo.minibatch_size", 5, "grpo.minibatch_size"),
        ("grpo.clip_eps", 1.5, "grpo.clip_eps"),
        ("grpo.kl_coef", -0.1, "grpo.kl_coef"),
        ("grpo.gamma", 2.0, "grpo.gamma"),
        ("micro_batches", 3, "micro_batches"),
    ]:
        with pytest.raises(ValueError, match=match):
            harness.start(tiny(**{key: value}), registry.get("grpo"))
    grpo.validate(tiny())  # the shipped tiny config passes
    assert "critic" not in d.base("grpo") and d.base("grpo").grpo.clip_eps_high == 0.2


# ----------------------------------------------------------------------------------------------
# End to end on a tiny model.
# ----------------------------------------------------------------------------------------------
def _checkpoint_keys(workdir):
    steps = sorted(int(p) for p in os.listdir(os.path.join(workdir, "checkpoints")) if p.isdigit())
    with open(os.path.join(workdir, "checkpoints", str(steps[-1]), "state", "_METADATA")) as f:
        return list(json.load(f)["tree_metadata"])


@pytest.mark.slow
def test_tiny_grpo_trains_without_a_critic(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    c = tiny(**{"reward.fn": "test_grpo:tie_reward", "grpo.iterations": 2, "grpo.filter_equal_groups": True})
    res = registry.run(c, str(tmp_path / "g"))
    assert set(res["state"].params) == {"actor"}
    keys = _checkpoint_keys(str(tmp_path / "g"))
    assert any("actor" in k for k in keys) and not any("critic" in k for k in keys)
    hist = res["history"]
    for h in hist:
        assert h["train/first_minibatch_ratio_max_dev"] < 1e-5  # ratio 1 at the first minibatch
        assert h["rollout/sampling_logprob_max_dev"] < 1e-4
        assert all(np.isfinite(v) for v in h.values())
    assert hist[0]["kl_ref/k1"] == pytest.approx(0.0, abs=1e-6)  # the reference starts at the actor
    for key in (
        "reward/mean", "reward/std", "reward/group_std_mean", "groups/all_equal_fraction", "groups/filtered",
        "train/clipfrac_low", "train/clipfrac_high", "train/approx_kl", "train/kl_ref", "kl_ref/k3",
        "train/entropy", "response/length_mean", "perf/generate_tokens_per_s", "perf/train_tokens_per_s",
    ):  # fmt: skip
        assert key in hist[-1], key
    # The run's advantages are numpy's group advantages of the run's own rewards.
    last = res["last_rollout"]
    score, mask = last["score"], last["action_mask"]
    g = c.grpo.samples_per_prompt
    tied = np.repeat([np.all(score[i : i + g] == score[i]) for i in range(0, len(score), g)], g)
    assert tied.any() and not tied.all()
    assert hist[-1]["groups/filtered"] == tied.sum() / g
    assert hist[-1]["groups/all_equal_fraction"] == pytest.approx(tied.mean())
    want = np.where((mask > 0) & ~tied[:, None], np_group_advantages(score, g, "grpo")[:, None], 0)
    np.testing.assert_allclose(last["advantages"], want, atol=1e-5)


def _actor(res):
    return jax.tree.leaves(jax.device_get(res["state"].params["actor"]))


@pytest.mark.slow
def test_update_independent_of_devices_and_micro_batches(tmp_path, monkeypatch):
    """REINFORCE++ (whitened over the global batch), GSPO sequence ratio, Dr.GRPO's constant
    normaliser and an EMA reference: 1 device == 8 devices (data 2, fsdp 2, tensor 2) ==
    4 micro-batches."""
    monkeypatch.chdir(ROOT)
    over = {
        "grpo.iterations": 1,
        "grpo.prompts_per_iteration": 4,
        "grpo.estimator": "reinforce_pp",
        "grpo.ratio_level": "sequence",
        "grpo.loss_agg": "seq_sum_norm",
        "ref.ema_decay": 0.9,
        "optim.name": "sgd",
        "optim.b1": 0.0,
        "optim.lr": 0.1,
    }
    base = registry.run(tiny(**over), str(tmp_path / "a"))
    micro = registry.run(tiny(**over, micro_batches=4), str(tmp_path / "b"))
    sharded = registry.run(tiny(**over, mesh=dict(data=2, fsdp=2, tensor=2)), str(tmp_path / "c"))
    for other in (micro, sharded):
        np.testing.assert_array_equal(other["last_rollout"]["score"], base["last_rollout"]["score"])
        for x, y in zip(_actor(base), _actor(other), strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
    fresh = jax.tree.leaves(nnx.to_pure_dict(nnx.split(models.init("llama", seed=0, **tiny().model.init))[1]))
    assert (
        max(float(np.max(np.abs(x - y))) for x, y in zip(_actor(base), fresh, strict=True)) > 1e-3
    )  # it trained


@pytest.mark.slow
def test_resume_is_bit_exact(tmp_path, monkeypatch):
    """A run resumed from its iteration-1 checkpoint (the iteration-2 one removed) ends bit-identical."""
    import shutil

    monkeypatch.chdir(ROOT)
    over = {
        "grpo.estimator": "rloo",
        "grpo.prompts_per_iteration": 4,
        "grpo.iterations": 2,
        "checkpoint.every": 1,
    }
    straight = registry.run(tiny(**over), str(tmp_path / "r"))
    shutil.rmtree(tmp_path / "r" / "checkpoints" / "2")
    resumed = registry.run(tiny(**over), str(tmp_path / "r"))
    assert resumed["history"] and len(resumed["history"]) == 1  # iteration 2 only
    for x, y in zip(
        jax.tree.leaves(jax.device_get(straight["state"])),
        jax.tree.leaves(jax.device_get(resumed["state"])),
        strict=True,
    ):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(straight["last_rollout"]["score"], resumed["last_rollout"]["score"])
    assert straight["history"][-1]["train/loss"] == resumed["history"][-1]["train/loss"]


# ----------------------------------------------------------------------------------------------
# E8 (critic-free vs PPO) smoke run: the stages chain and the comparison is at equal work.
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_e8_smoke_equal_samples_and_steps(tmp_path, monkeypatch):
    """At smoke size nothing is learned: only the chaining, the output files and the equal-work
    accounting (optimizer steps counted by the trained states, responses from the configs) are checked."""
    from jaxrlhf import sharding
    from jaxrlhf.experiments import e8_critic_free as e8

    monkeypatch.setattr(sharding, "mesh_shape", lambda axes, n: {"data": 1, "fsdp": 1, "tensor": 1})
    out = tmp_path / "out"
    e8.main(["--smoke", "--seeds=1", f"--out={out}", f"--workdir={tmp_path / 'wd'}", "--methods=ppo,rloo"])
    for f in ("table.md", "results.json", "pass_at_k.png"):
        assert (out / f).stat().st_size > 0, f
    saved = json.loads((out / "results.json").read_text())
    assert list(saved["table"]) == ["sft", "ppo", "rloo"]
    ppo, rloo = saved["table"]["ppo"], saved["table"]["rloo"]
    assert ppo["optimizer_steps"]["values"] == rloo["optimizer_steps"]["values"]
    assert ppo["samples"]["values"] == rloo["samples"]["values"]
    s = saved["sizes"]
    assert ppo["optimizer_steps"]["values"][0] == s["ppo_iterations"] * s["ppo_epochs"] * (
        s["ppo_rollout_batch"] // s["ppo_minibatch"]
    )
    n = e8.EVAL_SAMPLES["e8_smoke"]
    for name, row in saved["table"].items():
        vals = [row[f"pass@{k}"]["mean"] for k in (1, 2, 4) if k <= n]
        assert all(0.0 <= v <= 1.0 for v in vals) and vals == sorted(vals), (name, vals)
    assert abs(saved["table"]["sft"]["kl_to_reference"]["mean"]) < 1e-4
