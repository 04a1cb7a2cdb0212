"""Tests for jaxrlhf.losses: closed forms, loop references, gradients, masks, dtypes, retracing."""

import doctest

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxrlhf import losses

RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _fresh_rng():
    """Each test draws from a fresh ``RNG``: its data never depends on which tests ran before it
    (pytest-xdist gives every worker a different order)."""
    global RNG
    RNG = np.random.default_rng(0)


def np_log_softmax(z):
    z = np.asarray(z, np.float64)
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def np_log_sigmoid(x):
    x = np.asarray(x, np.float64)
    return -np.logaddexp(0.0, -x)


def gae_loop(rewards, values, mask, gamma, lam):
    """Plain Python reference: walk each row's valid tokens backwards."""
    rewards, values, mask = (np.asarray(a, np.float64) for a in (rewards, values, mask))
    adv = np.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        next_value, next_adv = 0.0, 0.0
        for t in reversed(range(rewards.shape[1])):
            if mask[b, t] == 0:
                continue
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            adv[b, t] = delta + gamma * lam * next_adv
            next_value, next_adv = values[b, t], adv[b, t]
    returns = np.where(mask != 0, adv + values, 0.0)
    return adv, returns


# Rows: prompt offset + right padding; full row; a hole inside; single token; all masked.
GAE_MASK = np.array(
    [
        [0, 0, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1, 1, 1],
        [0, 1, 1, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 1, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0],
    ],
    np.int32,
)


def with_garbage(x, mask, value=np.nan):
    """``x`` with ``value`` written into every masked slot."""
    return np.where(np.asarray(mask) != 0, x, value).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Log-probabilities
# ----------------------------------------------------------------------------------------------
def test_token_logprobs_matches_log_softmax():
    logits = RNG.normal(size=(2, 5, 7)).astype(np.float32) * 3
    labels = RNG.integers(0, 7, size=(2, 5))
    out = losses.token_logprobs(logits, labels)
    ref = np.take_along_axis(np_log_softmax(logits), labels[..., None], -1)[..., 0]
    assert out.shape == (2, 5) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_token_logprobs_extreme_logits_are_exact_and_finite():
    logits = jnp.array([[[1e4, -1e4, 0.0], [1e4, 1e4, -1e4]]], jnp.float32)
    out = np.asarray(losses.token_logprobs(logits, jnp.array([[0, 1]])))
    np.testing.assert_allclose(out, [[0.0, -np.log(2.0)]], atol=1e-6)
    out = np.asarray(losses.token_logprobs(logits, jnp.array([[1, 2]])))
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, [[-2e4, -2e4 - np.log(2.0)]], rtol=1e-7)
    # Gradients stay finite too.
    g = jax.grad(lambda z: losses.token_logprobs(z, jnp.array([[1, 2]])).sum())(logits)
    assert np.all(np.isfinite(np.asarray(g)))


def test_token_logprobs_bf16_gives_f32_close_to_reference():
    logits = RNG.normal(size=(2, 3, 11)).astype(np.float32) * 4
    labels = RNG.integers(0, 11, size=(2, 3))
    bf = jnp.asarray(logits, jnp.bfloat16)
    out = losses.token_logprobs(bf, labels)
    assert out.dtype == jnp.float32
    ref = np.take_along_axis(np_log_softmax(np.asarray(bf, np.float32)), labels[..., None], -1)[..., 0]
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_token_logprobs_rejects_bad_shapes_and_clips_out_of_range_labels():
    with pytest.raises(ValueError, match="labels"):
        losses.token_logprobs(jnp.zeros((2, 3, 4)), jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(ValueError, match="integer"):
        losses.token_logprobs(jnp.zeros((2, 3, 4)), jnp.zeros((2, 3)))
    out = losses.token_logprobs(jnp.zeros((1, 2, 4)), jnp.array([[-100, 999]]))
    np.testing.assert_allclose(out, np.full((1, 2), -np.log(4.0)), rtol=1e-6)


def test_shifted_logprobs_follows_the_design_contract():
    logits = RNG.normal(size=(2, 6, 5)).astype(np.float32)
    ids = RNG.integers(0, 5, size=(2, 6))
    ids[1, 4:] = 12345  # pad id outside the vocabulary, masked
    loss_mask = np.array([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 0, 0]], np.int32)
    logps, mask = losses.shifted_logprobs(logits, ids, loss_mask)
    assert logps.shape == (2, 5) and mask.shape == (2, 5)
    np.testing.assert_array_equal(mask, loss_mask[:, 1:])
    ref = losses.token_logprobs(logits[:, :-1], np.clip(ids[:, 1:], 0, 4))
    np.testing.assert_allclose(logps, np.where(loss_mask[:, 1:] == 1, ref, 0.0), rtol=1e-6)
    np.testing.assert_allclose(
        losses.sequence_logps(logps, mask), np.where(loss_mask[:, 1:] == 1, ref, 0.0).sum(-1), rtol=1e-6
    )
    with pytest.raises(ValueError, match="input_ids"):
        losses.shifted_logprobs(logits, ids[:, :-1], loss_mask)


def test_sequence_logps_ignores_masked_garbage():
    logps = np.array([[-1.0, -2.0, np.nan], [np.inf, -0.5, -0.25]], np.float32)
    mask = np.array([[1, 1, 0], [0, 1, 1]])
    np.testing.assert_allclose(losses.sequence_logps(logps, mask), [-3.0, -0.75])


def test_entropy_from_logits():
    logits = RNG.normal(size=(2, 3, 6)).astype(np.float32) * 2
    lp = np_log_softmax(logits)
    ref = -(np.exp(lp) * lp).sum(-1)
    out = losses.entropy_from_logits(logits)
    assert out.shape == (2, 3) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(losses.entropy_from_logits(jnp.zeros((1, 1, 8))), [[np.log(8.0)]], rtol=1e-6)
    # Extreme and -inf logits: a near-one-hot has entropy 0; two tied maxima have log 2.
    ext = jnp.array([[[1e4, -1e4, 0.0], [1e4, 1e4, -jnp.inf]]], jnp.bfloat16)
    out = losses.entropy_from_logits(ext)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, [[0.0, np.log(2.0)]], atol=1e-6)
    g = jax.grad(lambda z: losses.entropy_from_logits(z).sum())(ext.astype(jnp.float32))
    assert np.all(np.isfinite(np.asarray(g)))


# ----------------------------------------------------------------------------------------------
# Masked reductions
# ----------------------------------------------------------------------------------------------
def test_masked_mean_closed_form_axis_and_clamp():
    x = np.array([[1.0, 3.0, np.nan], [np.inf, -np.inf, np.nan]], np.float32)
    m = np.array([[1, 1, 0], [0, 0, 0]])
    assert float(losses.masked_mean(x, m)) == 2.0
    np.testing.assert_allclose(losses.masked_mean(x, m, axis=1), [2.0, 0.0])
    np.testing.assert_allclose(losses.masked_mean(x, m, axis=0), [1.0, 3.0, 0.0])
    assert float(losses.masked_mean(x, np.zeros_like(m))) == 0.0
    # The denominator is clamped at 1, also for fractional weights.
    assert float(losses.masked_mean(np.array([4.0]), np.array([0.5]))) == 2.0
    # A broadcastable mask.
    np.testing.assert_allclose(losses.masked_mean(np.ones((2, 3)) * [[1.0], [3.0]], np.array([1, 0, 1])), 2.0)
    assert losses.masked_mean(jnp.ones((2, 2), jnp.bfloat16), np.ones((2, 2))).dtype == jnp.float32
    with pytest.raises(ValueError, match="does not broadcast"):
        losses.masked_mean(jnp.ones((2, 3)), jnp.ones((2, 2)))


def test_masked_whiten_population_statistics_over_the_batch():
    x = RNG.normal(size=(3, 5)).astype(np.float32) * 4 + 2
    m = np.array([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 0, 1, 0, 0]])
    valid = x[m == 1].astype(np.float64)
    mu, var = valid.mean(), valid.var()  # population variance (ddof=0)
    out = np.asarray(losses.masked_whiten(with_garbage(x, m), m))
    np.testing.assert_allclose(out[m == 1], (valid - mu) / np.sqrt(var + 1e-8), rtol=1e-5, atol=1e-5)
    assert np.all(out[m == 0] == 0)
    np.testing.assert_allclose(out[m == 1].mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(out[m == 1].std(), 1.0, rtol=1e-5)
    kept = np.asarray(losses.masked_whiten(with_garbage(x, m, np.inf), m, shift_mean=False))
    np.testing.assert_allclose(kept[m == 1], (valid - mu) / np.sqrt(var + 1e-8) + mu, rtol=1e-5, atol=1e-5)
    eps = np.asarray(losses.masked_whiten(x, m, eps=1.0))
    np.testing.assert_allclose(eps[m == 1], (valid - mu) / np.sqrt(var + 1.0), rtol=1e-5, atol=1e-5)


def test_masked_whiten_degenerate_inputs_give_no_nan():
    x = np.array([[np.nan, 1.0, np.inf]], np.float32)
    out = losses.masked_whiten(x, np.zeros((1, 3)))
    np.testing.assert_array_equal(out, np.zeros((1, 3)))
    out = losses.masked_whiten(x, np.array([[0, 1, 0]]))  # one valid entry: zero variance
    np.testing.assert_array_equal(out, np.zeros((1, 3)))
    assert losses.masked_whiten(jnp.ones((2, 2), jnp.bfloat16), np.ones((2, 2))).dtype == jnp.float32


def test_aggregate_loss_modes_closed_form():
    loss = np.array([[1.0, 3.0, np.nan], [5.0, np.inf, 2.0], [np.nan, np.nan, np.nan]], np.float32)
    m = np.array([[1, 1, 0], [1, 0, 1], [0, 0, 0]])
    assert float(losses.aggregate_loss(loss, m, "token_mean")) == pytest.approx((1 + 3 + 5 + 2) / 4)
    assert float(losses.aggregate_loss(loss, m, "seq_mean")) == pytest.approx((2.0 + 3.5) / 2)
    assert float(losses.aggregate_loss(loss, m, "seq_sum")) == pytest.approx((4.0 + 7.0) / 2)
    for mode in losses.AGGREGATION_MODES:
        assert float(losses.aggregate_loss(loss, np.zeros_like(m), mode)) == 0.0
    assert float(losses.loss_denominator(m, "token_mean")) == 4.0
    assert float(losses.loss_denominator(m, "seq_mean")) == 2.0
    with pytest.raises(ValueError, match="aggregation mode"):
        losses.aggregate_loss(loss, m, "mean")


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean", "seq_sum"])
def test_aggregate_loss_global_denominator_makes_micro_batches_exact(mode):
    rng = np.random.default_rng(7)  # its own draw: the module RNG's state depends on test order
    loss = rng.normal(size=(6, 7)).astype(np.float32)
    m = (rng.random((6, 7)) < 0.6).astype(np.int32)
    m[2] = 0  # a row with no valid token
    full = float(losses.aggregate_loss(loss, m, mode))
    splits = [(0, 2), (2, 6)]
    den = sum(float(losses.loss_denominator(m[a:b], mode)) for a, b in splits)
    assert den == float(losses.loss_denominator(m, mode))
    micro = sum(
        float(losses.aggregate_loss(loss[a:b], m[a:b], mode, global_denominator=den)) for a, b in splits
    )
    # float32 sums in another order: equal up to rounding (the scale of the summands, not of the sum)
    assert micro == pytest.approx(full, rel=1e-6, abs=1e-6)
    # Without the global denominator, averaging micro-batch means is not the full-batch value.
    naive = np.mean([float(losses.aggregate_loss(loss[a:b], m[a:b], mode)) for a, b in splits])
    assert naive != pytest.approx(full, rel=1e-3, abs=1e-3)


# ----------------------------------------------------------------------------------------------
# Preference losses
# ----------------------------------------------------------------------------------------------
def test_bradley_terry_closed_form_margin_and_extremes():
    c = RNG.normal(size=6).astype(np.float32)
    r = RNG.normal(size=6).astype(np.float32)
    np.testing.assert_allclose(losses.bradley_terry_loss(c, r), -np_log_sigmoid(c - r), rtol=1e-5)
    np.testing.assert_allclose(
        losses.bradley_terry_loss(c, r, margin=0.5), -np_log_sigmoid(c - r - 0.5), rtol=1e-5
    )
    margins = np.linspace(0, 1, 6).astype(np.float32)
    np.testing.assert_allclose(
        losses.bradley_terry_loss(c, r, margin=margins), -np_log_sigmoid(c - r - margins), rtol=1e-5
    )
    out = losses.bradley_terry_loss(jnp.array([1e4, -1e4, 0.0]), jnp.array([-1e4, 1e4, 0.0]))
    np.testing.assert_allclose(out, [0.0, 2e4, np.log(2.0)], rtol=1e-6)
    g = jax.grad(lambda c: losses.bradley_terry_loss(c, jnp.array([-1e4, 1e4])).sum())(jnp.array([1e4, -1e4]))
    np.testing.assert_allclose(g, [0.0, -1.0])
    assert losses.bradley_terry_loss(c.astype(jnp.bfloat16), r.astype(jnp.bfloat16)).dtype == jnp.float32


def test_dpo_sigmoid_label_smoothing_and_ipo_closed_forms():
    pc, pr, rc, rr = (RNG.normal(size=5).astype(np.float32) - 20 for _ in range(4))
    h = (pc.astype(np.float64) - rc) - (pr.astype(np.float64) - rr)
    for beta in (0.1, 0.5):
        np.testing.assert_allclose(
            losses.dpo_loss(pc, pr, rc, rr, beta=beta), -np_log_sigmoid(beta * h), rtol=1e-4
        )
        eps = 0.1
        ref = -(1 - eps) * np_log_sigmoid(beta * h) - eps * np_log_sigmoid(-beta * h)
        np.testing.assert_allclose(losses.dpo_loss(pc, pr, rc, rr, beta, label_smoothing=eps), ref, rtol=1e-4)
        ipo = losses.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="ipo")
        np.testing.assert_allclose(ipo, (h - 1 / (2 * beta)) ** 2, rtol=1e-4)
    # Defaults: beta=0.1, sigmoid; h = 0 gives log 2.
    z = np.zeros(3, np.float32)
    np.testing.assert_allclose(losses.dpo_loss(z, z, z, z), np.full(3, np.log(2.0)), rtol=1e-6)
    np.testing.assert_allclose(losses.dpo_implicit_rewards(pc, rc, 0.3), 0.3 * (pc - rc), rtol=1e-5)
    with pytest.raises(ValueError, match="loss_type"):
        losses.dpo_loss(z, z, z, z, loss_type="hinge")
    with pytest.raises(ValueError, match="label_smoothing"):
        losses.dpo_loss(z, z, z, z, label_smoothing=0.1, loss_type="ipo")


def test_dpo_extreme_inputs_stay_finite():
    huge = np.array([-1e6, -3e5], np.float32)
    out = losses.dpo_loss(huge, huge - 50, huge + 1, huge - 49, beta=0.1)  # h = 0 exactly
    np.testing.assert_allclose(out, np.full(2, np.log(2.0)), rtol=1e-4)
    gap = np.array([1e4, -1e4], np.float32)
    z = np.zeros(2, np.float32)
    for eps in (0.0, 0.2):
        out = np.asarray(losses.dpo_loss(gap, -gap, z, z, beta=1.0, label_smoothing=eps))
        assert np.all(np.isfinite(out))
        np.testing.assert_allclose(out, [eps * 2e4, (1 - eps) * 2e4], rtol=1e-5)
    g = jax.grad(lambda p: losses.dpo_loss(p, -gap, z, z, beta=1.0).sum())(jnp.asarray(gap))
    assert np.all(np.isfinite(np.asarray(g)))
    assert np.all(np.isfinite(np.asarray(losses.dpo_loss(gap, -gap, z, z, beta=1.0, loss_type="ipo"))))


# ----------------------------------------------------------------------------------------------
# PPO
# ----------------------------------------------------------------------------------------------
_gae_jit = jax.jit(losses.gae)  # gamma and lam traced: one compile for the whole grid


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.95), (0.9, 1.0), (1.0, 0.0), (0.5, 0.7)])
def test_gae_matches_python_loop_with_offsets_padding_and_holes(gamma, lam):
    rewards = RNG.normal(size=GAE_MASK.shape).astype(np.float32)
    values = RNG.normal(size=GAE_MASK.shape).astype(np.float32)
    ref_adv, ref_ret = gae_loop(rewards, values, GAE_MASK, gamma, lam)
    adv, ret = _gae_jit(
        with_garbage(rewards, GAE_MASK), with_garbage(values, GAE_MASK, np.inf), GAE_MASK, gamma, lam
    )
    assert adv.dtype == jnp.float32 and ret.dtype == jnp.float32
    np.testing.assert_allclose(adv, ref_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, ref_ret, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(adv)[GAE_MASK == 0] == 0) and np.all(np.asarray(ret)[GAE_MASK == 0] == 0)


def test_gae_closed_form_and_hole_equals_compacted_row():
    # gamma = lam = 1: A_t = sum of future rewards - V_t (terminal value 0).
    r = np.array([[0.0, 1.0, 2.0, 3.0]], np.float32)
    v = np.array([[0.5, 0.25, 1.0, 2.0]], np.float32)
    adv, ret = losses.gae(r, v, np.ones((1, 4)), gamma=1.0, lam=1.0)
    np.testing.assert_allclose(adv, [[6.0 - 0.5, 6.0 - 0.25, 5.0 - 1.0, 3.0 - 2.0]])
    np.testing.assert_allclose(ret, [[6.0, 6.0, 5.0, 3.0]])
    # lam = 0: one-step TD errors.
    adv, _ = losses.gae(r, v, np.ones((1, 4)), gamma=0.9, lam=0.0)
    np.testing.assert_allclose(
        adv, [[0.9 * 0.25 - 0.5, 1 + 0.9 * 1.0 - 0.25, 2 + 0.9 * 2.0 - 1.0, 3 - 2.0]], rtol=1e-6
    )
    # A row with a hole equals the same row with the hole removed.
    holed_mask = np.array([[1, 0, 0, 1, 1, 0]])
    holed_r = np.array([[1.0, 7.0, 7.0, 2.0, 3.0, 7.0]], np.float32)
    holed_v = np.array([[0.1, 7.0, 7.0, 0.2, 0.3, 7.0]], np.float32)
    adv_h, ret_h = losses.gae(holed_r, holed_v, holed_mask, gamma=0.9, lam=0.8)
    adv_c, ret_c = losses.gae(
        holed_r[:, [0, 3, 4]], holed_v[:, [0, 3, 4]], np.ones((1, 3)), gamma=0.9, lam=0.8
    )
    np.testing.assert_allclose(np.asarray(adv_h)[:, [0, 3, 4]], adv_c, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(ret_h)[:, [0, 3, 4]], ret_c, rtol=1e-6)
    with pytest.raises(ValueError, match="share one shape"):
        losses.gae(r, v, np.ones((1, 3)))


def test_gae_masked_garbage_does_not_leak_into_values_or_grads():
    rewards = RNG.normal(size=GAE_MASK.shape).astype(np.float32)
    values = RNG.normal(size=GAE_MASK.shape).astype(np.float32)

    def total(r, v):
        adv, ret = losses.gae(r, v, GAE_MASK, 0.99, 0.95)
        return jnp.sum(adv) + jnp.sum(ret)

    clean = total(np.where(GAE_MASK != 0, rewards, 0), np.where(GAE_MASK != 0, values, 0))
    dirty_r, dirty_v = with_garbage(rewards, GAE_MASK), with_garbage(values, GAE_MASK, -np.inf)
    assert float(total(dirty_r, dirty_v)) == pytest.approx(float(clean), rel=1e-6)
    gr, gv = jax.grad(total, argnums=(0, 1))(dirty_r, dirty_v)
    for g in (gr, gv):
        g = np.asarray(g)
        assert np.all(np.isfinite(g)) and np.all(g[GAE_MASK == 0] == 0)


def test_kl_penalty_closed_forms():
    lp = RNG.normal(size=(3, 4)).astype(np.float32) - 2
    ref = RNG.normal(size=(3, 4)).astype(np.float32) - 2
    d = ref.astype(np.float64) - lp
    np.testing.assert_allclose(losses.kl_penalty(lp, ref), -d, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(losses.kl_penalty(lp, ref, "k2"), 0.5 * d**2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(losses.kl_penalty(lp, ref, "k3"), np.exp(d) - 1 - d, rtol=1e-5, atol=1e-6)
    # k3 >= 0 everywhere, including tiny and large log-ratios.
    gaps = np.concatenate([RNG.normal(size=200) * s for s in (1e-7, 1e-3, 1.0, 10.0)]).astype(np.float32)
    k3 = np.asarray(losses.kl_penalty(np.zeros_like(gaps), gaps, "k3"))
    assert np.all(k3 >= 0) and np.all(np.isfinite(k3))
    assert float(losses.kl_penalty(jnp.array(-1.0), jnp.array(-1.0), "k3")) == 0.0
    with pytest.raises(ValueError, match="estimator"):
        losses.kl_penalty(lp, ref, "k4")


def test_ppo_policy_loss_closed_form_and_clipping():
    # Ratios 1.5 / 0.5 / 1.1 with positive and negative advantages.
    ratio = np.array([[1.5, 0.5, 1.1], [1.5, 0.5, 1.1]], np.float32)
    adv = np.array([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]], np.float32)
    old = RNG.normal(size=(2, 3)).astype(np.float32)
    lp = old + np.log(ratio)
    out = losses.ppo_policy_loss(lp, old, adv, clip_eps=0.2)
    expected = np.array([[-1.2, -0.5, -1.1], [1.5, 0.8, 1.1]])
    np.testing.assert_allclose(out, expected, rtol=1e-5)
    np.testing.assert_allclose(out, np.maximum(-adv * ratio, -adv * np.clip(ratio, 0.8, 1.2)), rtol=1e-5)
    # Clipped tokens get no gradient; unclipped ones get -A * rho.
    g = jax.grad(lambda lp: losses.ppo_policy_loss(lp, old, adv).sum())(jnp.asarray(lp))
    np.testing.assert_allclose(g, [[0.0, -0.5, -1.1], [1.5, 0.0, 1.1]], rtol=1e-5)


def test_ppo_value_loss_closed_form():
    v = np.array([[1.0, 0.1, -0.5, 0.3]], np.float32)
    old = np.array([[0.0, 0.0, 0.0, 0.0]], np.float32)
    ret = np.array([[1.0, 0.0, 0.5, -1.0]], np.float32)
    out = losses.ppo_value_loss(v, old, ret, clip_eps=0.2)
    vc = old + np.clip(v - old, -0.2, 0.2)
    np.testing.assert_allclose(out, 0.5 * np.maximum((v - ret) ** 2, (vc - ret) ** 2), rtol=1e-6)
    np.testing.assert_allclose(out, [[0.32, 0.005, 0.5, 0.845]], rtol=1e-5)


def test_ema_update_decay_limits_nested_pytrees_and_dtypes():
    ref = {"a": jnp.arange(3, dtype=jnp.float32), "b": [jnp.ones((2, 2), jnp.bfloat16)], "step": jnp.array(3)}
    new = {"a": jnp.full(3, 10.0), "b": [jnp.full((2, 2), 3.0, jnp.bfloat16)], "step": jnp.array(9)}
    frozen = losses.ema_update(ref, new, 1.0)
    copied = losses.ema_update(ref, new, 0.0)
    mid = losses.ema_update(ref, new, 0.75)
    for out in (frozen, copied, mid):
        assert jax.tree.structure(out) == jax.tree.structure(ref)
        assert jax.tree.map(lambda x: x.dtype, out) == jax.tree.map(lambda x: x.dtype, ref)
    chex.assert_trees_all_equal(frozen, ref)
    chex.assert_trees_all_equal(copied, {**new, "step": ref["step"]})
    np.testing.assert_allclose(mid["a"], 0.75 * np.arange(3) + 2.5, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(mid["b"][0], np.float32), np.full((2, 2), 1.5))
    # Traced decay, as inside a jitted train step.
    out = jax.jit(losses.ema_update)(ref, new, jnp.float32(0.5))
    np.testing.assert_allclose(out["a"], (np.arange(3) + 10) / 2)
    with pytest.raises(ValueError, match="differ"):
        losses.ema_update({"a": jnp.zeros(2)}, {"a": jnp.zeros(3)}, 0.5)


# ----------------------------------------------------------------------------------------------
# Cross-cutting: gradients in float64, dtypes, no retrace, doctests
# ----------------------------------------------------------------------------------------------
def _grad_cases():
    """(name, fn, args) with float64 args, each at a point away from any kink."""
    rng = np.random.default_rng(1)
    n = lambda *s: rng.normal(size=s)
    m = np.array([[0, 1, 1, 1], [1, 1, 0, 1]])
    labels = rng.integers(0, 5, size=(2, 4))
    ratio_lp = np.log(np.array([[1.05, 0.9, 1.5, 0.5], [1.1, 0.95, 1.3, 0.7]]))
    v_new = np.array([[0.1, -0.1, 1.0, -1.0], [0.05, 0.3, -0.3, 0.0]])
    return [
        ("token_logprobs", lambda z: losses.token_logprobs(z, labels), (n(2, 4, 5) * 3,)),
        ("entropy_from_logits", losses.entropy_from_logits, (n(2, 4, 5) * 3,)),
        ("sequence_logps", lambda x: losses.sequence_logps(x, m), (n(2, 4),)),
        ("masked_mean", lambda x: losses.masked_mean(x, m, axis=1), (n(2, 4),)),
        ("masked_whiten", lambda x: losses.masked_whiten(x, m), (n(2, 4),)),
        ("masked_whiten_keep", lambda x: losses.masked_whiten(x, m, shift_mean=False), (n(2, 4),)),
        ("aggregate_token", lambda x: losses.aggregate_loss(x, m, "token_mean"), (n(2, 4),)),
        ("aggregate_seq", lambda x: losses.aggregate_loss(x, m, "seq_mean"), (n(2, 4),)),
        ("bradley_terry", lambda c, r: losses.bradley_terry_loss(c, r, 0.3), (n(4), n(4))),
        (
            "dpo_sigmoid",
            lambda *a: losses.dpo_loss(*a, beta=0.5, label_smoothing=0.1),
            (n(3), n(3), n(3), n(3)),
        ),
        ("dpo_ipo", lambda *a: losses.dpo_loss(*a, beta=0.5, loss_type="ipo"), (n(3), n(3), n(3), n(3))),
        ("dpo_implicit_rewards", lambda p, r: losses.dpo_implicit_rewards(p, r, 0.1), (n(3), n(3))),
        ("gae", lambda r, v: losses.gae(r, v, GAE_MASK, 0.9, 0.8), (n(*GAE_MASK.shape), n(*GAE_MASK.shape))),
        ("kl_k1", lambda a, b: losses.kl_penalty(a, b, "k1"), (n(2, 3), n(2, 3))),
        ("kl_k2", lambda a, b: losses.kl_penalty(a, b, "k2"), (n(2, 3), n(2, 3))),
        ("kl_k3", lambda a, b: losses.kl_penalty(a, b, "k3"), (n(2, 3), n(2, 3))),
        ("ppo_policy", lambda lp, a: losses.ppo_policy_loss(lp, np.zeros((2, 4)), a), (ratio_lp, n(2, 4))),
        ("ppo_value", lambda v, r: losses.ppo_value_loss(v, np.zeros((2, 4)), r), (v_new, n(2, 4) + 2)),
        ("ema_update", lambda a, b: losses.ema_update({"w": a}, {"w": b}, 0.3), (n(3), n(3))),
    ]


@pytest.mark.parametrize("case", range(len(_grad_cases())), ids=[c[0] for c in _grad_cases()])
def test_check_grads_float64(case):
    with jax.enable_x64(True):
        name, fn, args = _grad_cases()[case]
        args = tuple(jnp.asarray(a, jnp.float64) for a in args)
        out = fn(*args)
        assert all(x.dtype == jnp.float64 for x in jax.tree.leaves(out)), name
        check_grads(jax.jit(fn), args, order=1, modes=("rev",), atol=1e-5, rtol=1e-5)


def test_token_logprobs_second_order_and_forward_mode():
    """The rematerialised kernel stays differentiable in every mode (Hessian = -(diag p - p p^T))."""
    with jax.enable_x64(True):
        z = jnp.asarray([0.3, -1.2, 2.0, 0.1], jnp.float64)
        p = jax.nn.softmax(z)
        hess = jax.hessian(lambda z: losses.token_logprobs(z[None], jnp.array([2]))[0])(z)
        np.testing.assert_allclose(hess, -(np.diag(p) - np.outer(p, p)), rtol=1e-10, atol=1e-12)
        tangent = jnp.asarray([1.0, 0.0, -1.0, 0.5], jnp.float64)
        _, jvp = jax.jvp(lambda z: losses.token_logprobs(z[None], jnp.array([2]))[0], (z,), (tangent,))
        np.testing.assert_allclose(jvp, tangent[2] - np.dot(p, tangent), rtol=1e-10)


def test_bf16_inputs_give_f32_outputs():
    bf = lambda *s: jnp.asarray(RNG.normal(size=s), jnp.bfloat16)
    m = jnp.ones((2, 3), jnp.int32)
    outs = {
        "token_logprobs": losses.token_logprobs(bf(2, 3, 5), jnp.zeros((2, 3), jnp.int32)),
        "shifted_logprobs": losses.shifted_logprobs(bf(2, 3, 5), jnp.zeros((2, 3), jnp.int32), m)[0],
        "entropy": losses.entropy_from_logits(bf(2, 3, 5)),
        "sequence_logps": losses.sequence_logps(bf(2, 3), m),
        "masked_mean": losses.masked_mean(bf(2, 3), m),
        "masked_whiten": losses.masked_whiten(bf(2, 3), m),
        "aggregate_loss": losses.aggregate_loss(bf(2, 3), m),
        "bradley_terry": losses.bradley_terry_loss(bf(3), bf(3)),
        "dpo": losses.dpo_loss(bf(3), bf(3), bf(3), bf(3)),
        "dpo_ipo": losses.dpo_loss(bf(3), bf(3), bf(3), bf(3), loss_type="ipo"),
        "implicit": losses.dpo_implicit_rewards(bf(3), bf(3), 0.1),
        "gae_adv": losses.gae(bf(2, 3), bf(2, 3), m)[0],
        "gae_ret": losses.gae(bf(2, 3), bf(2, 3), m)[1],
        "kl": losses.kl_penalty(bf(2, 3), bf(2, 3), "k3"),
        "ppo_policy": losses.ppo_policy_loss(bf(2, 3), bf(2, 3), bf(2, 3)),
        "ppo_value": losses.ppo_value_loss(bf(2, 3), bf(2, 3), bf(2, 3)),
    }
    for name, out in outs.items():
        assert out.dtype == jnp.float32, name


def test_no_retrace_on_repeated_calls():
    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(logits, ids, mask, values, rewards, old_lp, ref_lp, gamma, decay, params):
        logps, tmask = losses.shifted_logprobs(logits, ids, mask)
        adv, ret = losses.gae(rewards, values, tmask, gamma, 0.95)
        adv = losses.masked_whiten(adv, tmask)
        pg = losses.aggregate_loss(losses.ppo_policy_loss(logps, old_lp, adv), tmask)
        vf = losses.aggregate_loss(losses.ppo_value_loss(values, values, ret), tmask, "seq_mean")
        kl = losses.aggregate_loss(losses.kl_penalty(logps, ref_lp, "k3"), tmask, "seq_sum")
        ent = losses.masked_mean(losses.entropy_from_logits(logits[:, :-1]), tmask)
        seq = losses.sequence_logps(logps, tmask)
        dpo = losses.dpo_loss(seq, seq[::-1], seq * 0.5, seq[::-1] * 0.5).mean()
        bt = losses.bradley_terry_loss(seq, seq[::-1]).mean()
        return pg + vf + kl + ent + dpo + bt, losses.ema_update(params, {"w": logits}, decay)

    for i in range(3):
        rng = np.random.default_rng(10 + i)
        f = lambda *s, rng=rng: jnp.asarray(rng.normal(size=s), jnp.float32)
        mask = jnp.asarray(rng.random((2, 6)) < 0.7, jnp.int32)
        out, _ = step(
            f(2, 6, 5),
            jnp.asarray(rng.integers(0, 5, (2, 6))),
            mask,
            f(2, 5),
            f(2, 5),
            f(2, 5),
            f(2, 5),
            jnp.float32(0.9 + 0.01 * i),
            jnp.float32(0.5 + 0.1 * i),
            {"w": f(2, 6, 5)},
        )
        assert np.isfinite(float(out))


def test_gae_no_retrace_for_new_gamma_lam_and_any_leading_dims():
    fn = jax.jit(chex.assert_max_traces(losses.gae, n=1))
    r = jnp.asarray(RNG.normal(size=GAE_MASK.shape), jnp.float32)
    for gamma, lam in [(1.0, 0.95), (0.9, 0.5), (0.5, 0.0)]:
        adv, _ = fn(r, r * 0.5, GAE_MASK, gamma, lam)
        np.testing.assert_allclose(adv, gae_loop(r, r * 0.5, GAE_MASK, gamma, lam)[0], rtol=1e-5, atol=1e-6)
    # Time is the last axis; leading dimensions are free ([T] and [B, T] agree).
    adv_1d, ret_1d = losses.gae(r[0], r[0] * 0.5, GAE_MASK[0], 0.9, 0.8)
    adv_2d, ret_2d = losses.gae(r, r * 0.5, GAE_MASK, 0.9, 0.8)
    np.testing.assert_allclose(adv_1d, adv_2d[0], rtol=1e-6)
    np.testing.assert_allclose(ret_1d, ret_2d[0], rtol=1e-6)


def test_ppo_pipeline_grads_finite_with_garbage_padding():
    """logits -> shifted_logprobs -> PPO loss -> token-mean: padding ids and slots never poison grads."""
    logits = jnp.asarray(RNG.normal(size=(2, 6, 5)), jnp.float32)
    ids = jnp.array([[0, 1, 2, 3, 99999, 99999], [-1, 4, 4, 0, 1, 2]])
    loss_mask = jnp.array([[0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]])
    old = losses.shifted_logprobs(logits, ids, loss_mask)[0]  # ratio 1: nothing clipped
    adv = jnp.asarray(RNG.normal(size=(2, 5)), jnp.float32)

    def loss(z):
        logps, mask = losses.shifted_logprobs(z, ids, loss_mask)
        return losses.aggregate_loss(losses.ppo_policy_loss(logps, old, adv), mask)

    g = np.asarray(jax.grad(loss)(logits))
    assert np.all(np.isfinite(g))
    # Position t gets gradient only when token t+1 is in the loss.
    predicts = np.asarray(loss_mask)[:, 1:] != 0
    assert np.all(g[:, :-1][~predicts] == 0) and np.all(g[:, -1] == 0)
    assert np.all(np.abs(g[:, :-1][predicts]).sum(-1) > 0)


def test_docstring_examples_run():
    result = doctest.testmod(losses, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 16 and result.failed == 0
