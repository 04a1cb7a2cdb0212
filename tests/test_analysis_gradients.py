"""The gradient decomposition (Wang et al.) logged during training: parts that add up to the total,
the total equal to the training loss's own gradient, thirds and target stability vs numpy."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf import registry
from jaxrlhf.analysis import gradients

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny(name, **over):
    spec = importlib.util.spec_from_file_location(
        f"tiny_{name}", os.path.join(ROOT, "configs", "tiny", f"{name}.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    with c.unlocked():
        for k, v in over.items():
            node = c
            *parents, leaf = k.split(".")
            for part in parents:
                node = node[part]
            node[leaf] = v
    return c


def test_thirds_match_a_numpy_ranking():
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 7, 10):
        score = rng.normal(size=12)
        valid = np.zeros(12, bool)
        valid[rng.choice(12, n, replace=False)] = True
        m = {k: np.asarray(v) for k, v in gradients.thirds(jnp.asarray(score), jnp.asarray(valid)).items()}
        order = [i for i in np.argsort(-score, kind="stable") if valid[i]]
        c1, c2 = -(-n // 3), -(-2 * n // 3)
        for name, idx in (("top", order[:c1]), ("mid", order[c1:c2]), ("bot", order[c2:])):
            expect = np.zeros(12)
            expect[idx] = 1
            np.testing.assert_array_equal(m[name], expect, err_msg=f"{name} n={n}")
        assert sum(v.sum() for v in m.values()) == n


def test_target_stability_matches_numpy_cosines():
    p0 = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}
    ts = gradients.TargetStability(p0)
    p1 = {"a": jnp.array([1.0, 0, 0]), "b": jnp.zeros((2, 2))}
    p2 = {"a": jnp.array([1.0, 1.0, 0]), "b": jnp.ones((2, 2))}
    first = ts.update(p1)
    assert "analysis/update_cos_prev_window" not in first
    assert first["analysis/update_cos_from_start"] == pytest.approx(1.0)
    second = ts.update(p2)
    d1, d2, total = (
        np.array([1, 0, 0, 0, 0, 0, 0]),
        np.array([0, 1, 0, 1, 1, 1, 1]),
        np.array([1, 1, 0, 1, 1, 1, 1]),
    )
    cos = lambda a, b: a @ b / np.linalg.norm(a) / np.linalg.norm(b)
    assert second["analysis/update_cos_prev_window"] == pytest.approx(cos(d2, d1), abs=1e-7)
    assert second["analysis/update_cos_from_start"] == pytest.approx(cos(d2, total), abs=1e-6)
    # A window without an update logs nothing; the next one is compared with the last real update.
    assert ts.update({k: v + 0 for k, v in p2.items()}) == {}
    p3 = {"a": jnp.array([1.0, 1.0, 2.0]), "b": jnp.ones((2, 2))}
    third = ts.update(p3)
    d3, total3 = np.array([0, 0, 2, 0, 0, 0, 0]), np.array([1, 1, 2, 1, 1, 1, 1])
    assert third["analysis/update_cos_prev_window"] == pytest.approx(cos(d3, d2), abs=1e-7)
    assert third["analysis/update_cos_from_start"] == pytest.approx(cos(d3, total3), abs=1e-6)


def test_target_stability_logs_nothing_before_the_first_update():
    p0 = {"a": jnp.ones(3)}
    ts = gradients.TargetStability(p0)
    assert ts.update(p0) == {}
    first = ts.update({"a": jnp.array([2.0, 1.0, 1.0])})
    assert first == {"analysis/update_cos_from_start": pytest.approx(1.0)}


@pytest.mark.slow
def test_dpo_run_logs_a_decomposition_whose_parts_add_up(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    c = _tiny(
        "dpo", **{"analysis.every": 1, "total_steps": 4, "checkpoint.every": 4, "dpo.label_smoothing": 0.1}
    )
    res = registry.run(c, str(tmp_path / "dpo"))
    logged = res["analysis"]
    assert [m["step"] for m in logged] == [1, 2, 3, 4]
    for m in logged:
        tot, pos, neg = (m[f"analysis/grad_norm_{k}"] for k in ("total", "pos", "neg"))
        cos = m["analysis/grad_cos_pos_neg"]
        # the identity of the issue: |total|^2 = |pos|^2 + |neg|^2 + 2 |pos||neg| cos(pos, neg)
        assert tot**2 == pytest.approx(pos**2 + neg**2 + 2 * pos * neg * cos, rel=1e-4)
        assert tot > 0 and pos > 0 and neg > 0
        parts = [m[f"analysis/grad_norm_{k}"] for k in ("top", "mid", "bot")]
        assert all(p >= 0 for p in parts) and m["analysis/weight_mean_top"] >= m["analysis/weight_mean_bot"]
    # step 1's probe sees the initial parameters (its batch is the one about to be trained on): no
    # update in that window, so no cosine there (in this tiny run the second window is empty too:
    # the parameters at step 2 equal the initial ones); the last probe compares two updates
    assert not any(k.startswith("analysis/update_cos") for k in logged[0])
    assert 0 < abs(logged[-1]["analysis/update_cos_prev_window"]) <= 1 + 1e-6


def test_dpo_decomposition_total_is_the_loss_gradient():
    """The fixed-weight surrogate's total gradient equals autodiff through the DPO loss (conservative
    DPO, a reference that differs from the policy)."""
    from jaxrlhf import config_defaults as d
    from jaxrlhf.algorithms import dpo
    from jaxrlhf.analysis.trees import tree_norm
    from jaxrlhf.sharding import make_mesh
    from jaxrlhf.trainer import setup

    c = d.base("dpo")
    c.model = d.model(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2
    )
    c.model.dtype = "float32"
    c.mesh = dict(data=1, fsdp=1, tensor=1)
    c.dpo = d.dpo(beta=0.3, label_smoothing=0.2)
    graphdef, params, _ = setup.load_model(c, c.model, make_mesh(c.mesh))
    ref = jax.tree.map(lambda x: x * 0.9, params)
    rng = np.random.default_rng(1)
    B, T = 4, 10

    def half():
        ids = rng.integers(3, 64, size=(B, T)).astype(np.int32)
        am, lm = np.ones((B, T), np.int32), np.zeros((B, T), np.int32)
        lm[:, 4:] = 1
        return {"input_ids": ids, "attention_mask": am, "loss_mask": lm}

    ch, rj = half(), half()
    batch = {**{f"chosen_{k}": v for k, v in ch.items()}, **{f"rejected_{k}": v for k, v in rj.items()}}
    batch["margin"] = np.zeros(B, np.float32)
    loss_fn, denoms = dpo.build_loss(c, graphdef)
    g = jax.grad(lambda p: loss_fn(p, ref, batch, denoms(batch), jax.random.key(0))[0])(params)
    out = dpo.make_probe(c, graphdef)(params, ref, batch)
    np.testing.assert_allclose(float(out["analysis/grad_norm_total"]), float(tree_norm(g)), rtol=1e-5)


@pytest.mark.slow
def test_ppo_run_logs_a_decomposition_whose_parts_add_up(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    over = {"analysis.every": 1, "ppo.iterations": 3, "checkpoint.every": 3, "export_hf": False}
    res = registry.run(_tiny("ppo", **over), str(tmp_path / "ppo"))
    for m in res["history"]:
        tot, pos, neg = (m[f"analysis/grad_norm_{k}"] for k in ("total", "pos", "neg"))
        cos = m["analysis/grad_cos_pos_neg"]
        assert tot**2 == pytest.approx(pos**2 + neg**2 + 2 * pos * neg * cos, rel=1e-4)
        # whitened advantages: both signs present; the top third by |A| has the largest |raw A|
        assert pos > 0 and neg > 0
        assert m["analysis/grad_norm_top"] > 0
    # the first probe precedes any update: no cosine there, none against it; the third compares
    assert not any(k.startswith("analysis/update_cos") for k in res["history"][0])
    assert "analysis/update_cos_prev_window" not in res["history"][1]
    assert "analysis/update_cos_prev_window" in res["history"][2]


def test_coordinated_token_weights_match_a_numpy_loop():
    rng = np.random.default_rng(3)
    adv = rng.normal(size=(3, 7)).astype(np.float32)
    adv[0, 2] = 0.0
    mask = (rng.random((3, 7)) > 0.3).astype(np.float32)
    kw = dict(coef_top=0.2, coef_mid=0.5, coef_bot=1.5, pos_coef=1.3, neg_coef=0.7)
    from jaxrlhf import losses

    got = np.asarray(losses.coordinated_token_weights(jnp.asarray(adv), jnp.asarray(mask), **kw))
    idx = [(b, t) for b in range(3) for t in range(7) if mask[b, t]]
    order = sorted(range(len(idx)), key=lambda i: (-abs(adv[idx[i]]), i))
    n = len(idx)
    expect = np.zeros((3, 7), np.float32)
    for rank, i in enumerate(order):
        third = (
            kw["coef_top"]
            if rank < -(-n // 3)
            else kw["coef_mid"]
            if rank < -(-2 * n // 3)
            else kw["coef_bot"]
        )
        a = adv[idx[i]]
        sign = kw["pos_coef"] if a > 0 else kw["neg_coef"] if a < 0 else 1.0
        expect[idx[i]] = third * sign
    np.testing.assert_allclose(got, expect, rtol=1e-6)


def test_coordinated_dpo_early_phase_drops_negative_learning():
    """Before ``early_until`` with ``early_neg_coef=0`` the DPO gradient is that of the loss with the
    rejected log-probs held fixed; the loss value is unchanged; after the switch it is plain DPO."""
    from jaxrlhf import config_defaults as d
    from jaxrlhf.algorithms import common, dpo
    from jaxrlhf.analysis.trees import tree_norm
    from jaxrlhf.sharding import make_mesh
    from jaxrlhf.trainer import setup

    c = d.base("dpo")
    c.model = d.model(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2
    )
    c.model.dtype = "float32"
    c.mesh = dict(data=1, fsdp=1, tensor=1)
    c.dpo = d.dpo(beta=0.5, early_neg_coef=0.0, early_until=5)
    graphdef, params, _ = setup.load_model(c, c.model, make_mesh(c.mesh))
    ref = jax.tree.map(lambda x: x * 0.95, params)
    rng = np.random.default_rng(2)
    ids = lambda: rng.integers(3, 64, size=(4, 9)).astype(np.int32)
    lm = np.zeros((4, 9), np.int32)
    lm[:, 3:] = 1
    batch = {"chosen_input_ids": ids(), "rejected_input_ids": ids(), "margin": np.zeros(4, np.float32)}
    for h in ("chosen", "rejected"):
        batch[f"{h}_attention_mask"], batch[f"{h}_loss_mask"] = np.ones((4, 9), np.int32), lm
    loss_fn, denoms = dpo.build_loss(c, graphdef)
    seq = common.pair_sequences(batch)

    def held(p):  # the DPO loss with the rejected log-probs held fixed (computed independently)
        pc, _ = common.split_pairs(common.response_logps(graphdef, p, seq), batch)
        _, pr = common.split_pairs(common.response_logps(graphdef, params, seq), batch)
        rc, rr = common.split_pairs(common.response_logps(graphdef, ref, seq), batch)
        return jnp.mean(jnp.logaddexp(0.0, -0.5 * ((pc - rc) - (pr - rr))))

    def at(step):
        den = {**denoms(batch), "step": jnp.int32(step)}
        return jax.value_and_grad(lambda p: loss_fn(p, ref, batch, den, jax.random.key(0))[0])(params)

    (v_early, g_early), (v_late, g_late) = at(0), at(5)
    v_held, g_held = jax.value_and_grad(held)(params)
    assert float(v_early) == pytest.approx(float(v_late), rel=1e-6) == pytest.approx(float(v_held), rel=1e-5)
    diff = jax.tree.map(lambda a, b: a - b, g_early, g_held)
    assert float(tree_norm(diff)) <= 1e-5 * float(tree_norm(g_held))
    assert float(tree_norm(jax.tree.map(lambda a, b: a - b, g_late, g_early))) > 1e-3 * float(
        tree_norm(g_late)
    )


def test_periodic_coefficients_closed_form():
    from jaxrlhf.algorithms import ppo

    assert ppo.periodic_coefs(7, 0, 0.5) == (1.0, 1.0)
    for it in (0, 1, 3, 6):
        pos, neg = ppo.periodic_coefs(it, 12, 0.4)
        s = 0.4 * np.sin(2 * np.pi * it / 12)
        assert float(pos) == pytest.approx(1 + s, abs=1e-6) and float(neg) == pytest.approx(1 - s, abs=1e-6)


def test_sign_coefficients_weigh_positive_and_negative_advantage_tokens():
    """``ppo.pos_coef`` / ``neg_coef`` (times the periodic swing) reach the per-token loss weights of
    ``advantages_and_returns``: checked against numpy on the whitened advantages it returns."""
    import ml_collections

    from jaxrlhf import config_defaults as d
    from jaxrlhf.algorithms import ppo

    rng = np.random.default_rng(4)
    B, T = 4, 7
    mask = (rng.random((B, T)) < 0.8).astype(np.float32)
    rollout = {
        "action_mask": jnp.asarray(mask),
        "old_logprobs": jnp.asarray(rng.normal(size=(B, T)), jnp.float32),
        "ref_logprobs": jnp.asarray(rng.normal(size=(B, T)), jnp.float32),
        "old_values": jnp.asarray(rng.normal(size=(B, T)), jnp.float32),
        "score": jnp.asarray(rng.normal(size=B), jnp.float32),
    }
    for pos_coef, neg_coef, period, amp, it in (
        (0.0, 1.0, 0, 0.0, 0),
        (1.0, 0.0, 0, 0.0, 0),
        (0.5, 2.0, 8, 0.5, 3),
    ):
        cfg = ml_collections.ConfigDict(
            d.ppo(pos_coef=pos_coef, neg_coef=neg_coef, period=period, amplitude=amp)
        )
        out = ppo.advantages_and_returns(rollout, jnp.float32(0.1), cfg, it=it)
        adv = np.asarray(out["advantages"])
        s = amp * np.sin(2 * np.pi * it / period) if period else 0.0
        want = np.where(adv > 0, pos_coef * (1 + s), np.where(adv < 0, neg_coef * (1 - s), 1.0))
        np.testing.assert_allclose(np.asarray(out["token_coef"]), np.where(mask > 0, want, 0.0), atol=1e-6)


@pytest.mark.slow
def test_grpo_run_logs_a_decomposition_whose_parts_add_up(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    over = {"analysis.every": 1, "grpo.iterations": 3, "checkpoint.every": 3, "export_hf": False}
    res = registry.run(_tiny("grpo", **over), str(tmp_path / "grpo"))
    for m in res["history"]:
        tot, pos, neg = (m[f"analysis/grad_norm_{k}"] for k in ("total", "pos", "neg"))
        cos = m["analysis/grad_cos_pos_neg"]
        assert tot**2 == pytest.approx(pos**2 + neg**2 + 2 * pos * neg * cos, rel=1e-4)
    # the first probe precedes any update: no cosine there, none against it; the third compares
    assert not any(k.startswith("analysis/update_cos") for k in res["history"][0])
    assert "analysis/update_cos_prev_window" not in res["history"][1]
    assert "analysis/update_cos_prev_window" in res["history"][2]


def test_simpo_decomposition_total_is_the_loss_gradient_and_weights_are_sigmoid():
    """SimPO's probe: the total gradient equals autodiff through the SimPO loss, positive + negative
    add up to it, and the pair weights are sigma(-z) by a numpy formula on the policy's log-probs."""
    from jaxrlhf import config_defaults as d
    from jaxrlhf.algorithms import common, simpo
    from jaxrlhf.analysis.trees import tree_norm
    from jaxrlhf.sharding import make_mesh
    from jaxrlhf.trainer import setup

    c = d.base("simpo")
    c.model = d.model(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2
    )
    c.model.dtype = "float32"
    c.mesh = dict(data=1, fsdp=1, tensor=1)
    c.simpo = d.simpo(beta=2.0, gamma=0.5, nll_coef=0.0)
    graphdef, params, _ = setup.load_model(c, c.model, make_mesh(c.mesh))
    rng = np.random.default_rng(2)
    B, T = 6, 12

    def half():
        ids = rng.integers(3, 64, size=(B, T)).astype(np.int32)
        am, lm = np.ones((B, T), np.int32), np.zeros((B, T), np.int32)
        for i in range(B):  # responses of different lengths: the length normalisation matters
            lm[i, 4 : 5 + int(rng.integers(1, T - 5))] = 1
        return {"input_ids": ids, "attention_mask": am, "loss_mask": lm}

    ch, rj = half(), half()
    batch = {**{f"chosen_{k}": v for k, v in ch.items()}, **{f"rejected_{k}": v for k, v in rj.items()}}
    loss_fn, denoms = simpo.build_loss(c, graphdef)
    g = jax.grad(lambda p: loss_fn(p, None, batch, denoms(batch), jax.random.key(0))[0])(params)
    out = simpo.make_probe(c, graphdef)(params, None, batch)
    keys = ("grad_norm_total", "grad_norm_pos", "grad_norm_neg", "grad_cos_pos_neg")
    tot, pos, neg, cos = (float(out[f"analysis/{k}"]) for k in keys)
    np.testing.assert_allclose(tot, float(tree_norm(g)), rtol=1e-5)
    assert tot**2 == pytest.approx(pos**2 + neg**2 + 2 * pos * neg * cos, rel=1e-4)
    # sigma(-z), z = beta (lp_c / |y_c| - lp_r / |y_r|) - gamma, from the per-sequence log-probs
    seq = common.pair_sequences(batch)
    lp = np.asarray(common.response_logps(graphdef, params, seq), np.float64)
    n = np.concatenate([ch["loss_mask"][:, 1:].sum(1), rj["loss_mask"][:, 1:].sum(1)]).astype(np.float64)
    z = 2.0 * (lp[:B] / n[:B] - lp[B:] / n[B:]) - 0.5
    w = np.sort(1.0 / (1.0 + np.exp(z)))
    thirds = {"bot": w[:2].mean(), "mid": w[2:4].mean(), "top": w[4:].mean()}
    for k, v in thirds.items():
        assert float(out[f"analysis/weight_mean_{k}"]) == pytest.approx(v, rel=1e-4), k
