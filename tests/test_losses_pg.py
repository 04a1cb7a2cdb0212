"""Tests for the critic-free kernels of jaxrlhf.losses (GRPO, Dr.GRPO, RLOO, REINFORCE++, DAPO, GSPO,
Dr.GRPO aggregation, SimPO): plain Python loops, closed forms, ties, extremes, masks, gradients."""

import math
import statistics

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jax.test_util import check_grads

from jaxrlhf import losses

RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _fresh_rng():
    """Each test draws from a fresh ``RNG``: its data never depends on which tests ran before it
    (pytest-xdist gives every worker a different order)."""
    global RNG
    RNG = np.random.default_rng(0)


# Rows: prompt offset + right padding; full row; holes inside; single token; all masked.
MASK = np.array(
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


def np_log_sigmoid(x):
    return -np.logaddexp(0.0, -np.asarray(x, np.float64))


# ----------------------------------------------------------------------------------------------
# Group advantages
# ----------------------------------------------------------------------------------------------
def group_advantages_loop(rewards, group_size, method, eps=1e-6):
    """Independent reference: Python floats, ``statistics`` (ddof=1 stdev), literal leave-one-out."""
    rewards = [float(r) for r in rewards]
    out = []
    for start in range(0, len(rewards), group_size):
        group = rewards[start : start + group_size]
        if len(set(group)) == 1:
            out += [0.0] * group_size
            continue
        mean = statistics.fmean(group)
        for i, r in enumerate(group):
            if method == "grpo":
                out.append((r - mean) / (statistics.stdev(group) + eps))
            elif method == "dr_grpo":
                out.append(r - mean)
            else:
                others = group[:i] + group[i + 1 :]
                out.append(r - sum(others) / (group_size - 1))
    return np.array(out)


_group_adv_jit = jax.jit(losses.group_advantages, static_argnames=("group_size", "method"))
_group_stats_jit = jax.jit(losses.group_reward_stats, static_argnames="group_size")


@pytest.mark.parametrize("method", losses.GROUP_ADVANTAGE_METHODS)
@pytest.mark.parametrize("group_size", [2, 3, 8])
def test_group_advantages_match_python_loop(method, group_size):
    rewards = RNG.normal(size=4 * group_size).astype(np.float32) * 3 + 1
    rewards[:group_size] = 0.7  # a tied group
    rewards[group_size : group_size + 2] = -1.0  # a partial tie
    out = _group_adv_jit(rewards, group_size=group_size, method=method)
    assert out.shape == rewards.shape and out.dtype == jnp.float32
    ref = group_advantages_loop(rewards, group_size, method)
    # float32 rewards: a near-tie (e.g. -1, -1, -1.004) divides a float32-rounded deviation by a tiny
    # std, so relative errors up to ~5e-5 are the input precision, not a bug (ddof or baseline errors
    # are > 10%).
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_group_advantages_binary_rewards_group_of_two_closed_form():
    # Pass/fail rewards, the verifiable-reward case: [1, 0] has mean 1/2 and ddof=1 std sqrt(1/2).
    r = np.array([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0], np.float32)
    s = 1 / math.sqrt(2)
    np.testing.assert_allclose(
        losses.group_advantages(r, 2, "grpo", eps=0.0), [s, -s, -s, s, 0, 0, 0, 0], rtol=1e-6
    )
    np.testing.assert_allclose(losses.group_advantages(r, 2, "dr_grpo"), [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    np.testing.assert_allclose(losses.group_advantages(r, 2, "rloo"), [1, -1, -1, 1, 0, 0, 0, 0])
    # The default eps = 1e-6 is added to the std, not to the variance.
    np.testing.assert_allclose(losses.group_advantages(r, 2)[0], 0.5 / (s + 1e-6), rtol=1e-6)
    # Integer rewards are promoted to float32.
    out = losses.group_advantages(np.array([1, 0, 2, 2]), 2)
    assert out.dtype == jnp.float32 and float(out[2]) == 0.0


@pytest.mark.parametrize("method", losses.GROUP_ADVANTAGE_METHODS)
def test_group_advantages_ties_are_exactly_zero_and_finite(method):
    # 0.1 * 3 / 3 != 0.1 in floating point, and 1e30 or tiny values: still exactly 0.
    for value, g in [(0.1, 3), (1e30, 4), (-3e38, 2), (1e-30, 3), (0.0, 2), (7.0, 4)]:
        r = np.full(2 * g, value, np.float32)
        out = np.asarray(_group_adv_jit(r, group_size=g, method=method))
        assert np.all(out == 0.0), (value, g, out)
        stats = _group_stats_jit(r, group_size=g)
        assert np.all(np.asarray(stats["all_equal"])) and np.all(np.asarray(stats["std"]) == 0)
        np.testing.assert_array_equal(stats["mean"], np.full(2, value, np.float32))
    # A tied group next to an untied one keeps its zeros; the gradient through it is finite.
    r = jnp.array([0.1, 0.1, 0.1, 0.0, 1.0, 3.0])
    g = jax.grad(lambda r: jnp.sum(losses.group_advantages(r, 3, method) * jnp.arange(6.0)))(r)
    assert np.all(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize("method", losses.GROUP_ADVANTAGE_METHODS)
def test_group_advantages_extreme_rewards_match_float64_reference(method):
    # Squares of 1e30 overflow float32; the rescaled std does not.
    r = np.array([1e30, -1e30, 3e30, 0.0, 1e-20, 2e-20, -1e-20, 5e-20], np.float32)
    out = np.asarray(losses.group_advantages(r, 4, method, eps=0.0))
    assert np.all(np.isfinite(out))
    ref = group_advantages_loop(r.astype(np.float64), 4, method, eps=0.0)
    np.testing.assert_allclose(out, ref, rtol=1e-5)


def test_group_reward_stats_match_statistics_module():
    r = RNG.normal(size=12).astype(np.float32) * 5
    r[8:] = 2.5
    s = losses.group_reward_stats(r, 4)
    groups = [list(map(float, r[i : i + 4])) for i in range(0, 12, 4)]
    np.testing.assert_allclose(s["mean"], [statistics.fmean(g) for g in groups], rtol=1e-6)
    np.testing.assert_allclose(s["std"], [statistics.stdev(g) for g in groups], rtol=1e-5)
    np.testing.assert_array_equal(s["all_equal"], [False, False, True])


def test_group_advantages_errors_name_the_problem():
    r = np.zeros(6, np.float32)
    for bad in (1, 0, -2):
        with pytest.raises(ValueError, match=f"group_size must be >= 2.*got {bad}"):
            losses.group_advantages(r, bad)
    with pytest.raises(ValueError, match="N=6 .* group_size=4"):
        losses.group_advantages(r, 4)
    with pytest.raises(ValueError, match="method"):
        losses.group_advantages(r, 2, "ppo")
    with pytest.raises(ValueError, match=r"rewards must be \[N\]"):
        losses.group_advantages(r.reshape(2, 3), 3)
    with pytest.raises(ValueError, match="static Python int"):
        losses.group_advantages(r, 2.0)
    assert losses.group_advantages(r, np.int64(3)).shape == (6,)  # numpy ints are fine


def test_group_advantages_jit_no_retrace_and_sharded_equals_unsharded():
    fn = jax.jit(
        chex.assert_max_traces(losses.group_advantages, n=1), static_argnames=("group_size", "method")
    )
    for i in range(3):
        r = RNG.normal(size=32).astype(np.float32)
        out = fn(r, group_size=4, method="rloo", eps=1e-6 * (i + 1))
        np.testing.assert_allclose(out, group_advantages_loop(r, 4, "rloo"), rtol=1e-5, atol=1e-6)
    # The rewards sharded over 8 devices (one group of 4 per device): the same advantages.
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    r = RNG.normal(size=32).astype(np.float32)
    sharded = jax.device_put(r, NamedSharding(mesh, PartitionSpec("data")))
    for method in losses.GROUP_ADVANTAGE_METHODS:
        out = _group_adv_jit(sharded, group_size=4, method=method)
        np.testing.assert_allclose(out, _group_adv_jit(r, group_size=4, method=method), rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# REINFORCE++
# ----------------------------------------------------------------------------------------------
def returns_loop(rewards, mask, gamma):
    """Plain Python reference: walk each row's valid tokens backwards."""
    rewards, mask = np.asarray(rewards, np.float64), np.asarray(mask)
    out = np.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        running = 0.0
        for t in reversed(range(rewards.shape[1])):
            if mask[b, t] == 0:
                continue
            running = rewards[b, t] + gamma * running
            out[b, t] = running
    return out


_returns_jit = jax.jit(losses.reinforce_pp_returns)


@pytest.mark.parametrize("gamma", [1.0, 0.99, 0.5, 0.0])
def test_reinforce_pp_returns_match_python_loop_with_offsets_padding_and_holes(gamma):
    rewards = RNG.normal(size=MASK.shape).astype(np.float32)
    out = _returns_jit(with_garbage(rewards, MASK), MASK, gamma)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, returns_loop(rewards, MASK, gamma), rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(out)[MASK == 0] == 0)


def test_reinforce_pp_returns_closed_form_hole_and_whitening():
    # Score 1 on the last token, KL penalties 0.1 on every token: reward-to-go by hand.
    r = np.array([[-0.1, -0.1, -0.1, 0.9]], np.float32)
    np.testing.assert_allclose(
        losses.reinforce_pp_returns(r, np.ones((1, 4))), [[0.6, 0.7, 0.8, 0.9]], rtol=1e-6
    )
    out = losses.reinforce_pp_returns(r, np.ones((1, 4)), gamma=0.5)
    np.testing.assert_allclose(out, [[-0.1 - 0.05 - 0.025 + 0.1125, -0.1 - 0.05 + 0.225, -0.1 + 0.45, 0.9]])
    # A row with holes equals the row with the holes removed (the discount counts valid tokens).
    holed = np.array([[1.0, 7.0, 2.0, 7.0, 7.0, 3.0]], np.float32)
    hmask = np.array([[1, 0, 1, 0, 0, 1]])
    np.testing.assert_allclose(
        np.asarray(losses.reinforce_pp_returns(holed, hmask, 0.9))[:, [0, 2, 5]],
        losses.reinforce_pp_returns(holed[:, [0, 2, 5]], np.ones((1, 3)), 0.9),
        rtol=1e-6,
    )
    # Advantages: the returns whitened over every valid token of the batch (population std).
    rewards = RNG.normal(size=MASK.shape).astype(np.float32)
    ret = losses.reinforce_pp_returns(rewards, MASK, 1.0)
    valid = returns_loop(rewards, MASK, 1.0)[MASK == 1]
    adv = np.asarray(losses.masked_whiten(ret, MASK))
    np.testing.assert_allclose(
        adv[MASK == 1], (valid - valid.mean()) / np.sqrt(valid.var() + 1e-8), rtol=1e-4
    )
    with pytest.raises(ValueError, match="differ"):
        losses.reinforce_pp_returns(rewards, MASK[:, :-1])


def test_reinforce_pp_returns_garbage_does_not_leak_into_grads_and_no_retrace():
    rewards = with_garbage(np.random.default_rng(3).normal(size=MASK.shape), MASK, np.inf)
    g = np.asarray(jax.grad(lambda r: jnp.sum(losses.reinforce_pp_returns(r, MASK, 0.9)))(rewards))
    assert np.all(np.isfinite(g)) and np.all(g[MASK == 0] == 0)
    # d sum_t G_t / d r_s = sum over valid t <= s of gamma^(valid steps between): 1 + 0.9 + ... by hand.
    np.testing.assert_allclose(g[1], [sum(0.9**k for k in range(s + 1)) for s in range(8)], rtol=1e-6)
    fn = jax.jit(chex.assert_max_traces(losses.reinforce_pp_returns, n=1))
    for gamma in (1.0, 0.9, 0.3):
        np.testing.assert_allclose(
            fn(rewards, MASK, gamma), returns_loop(np.nan_to_num(rewards), MASK, gamma), rtol=1e-5, atol=1e-6
        )


# ----------------------------------------------------------------------------------------------
# Clipped policy loss: token (PPO/GRPO/DAPO) and sequence (GSPO) ratios
# ----------------------------------------------------------------------------------------------
def policy_loss_loop(lp, old, adv, mask, low, high, sequence):
    """Plain Python reference: per-token loss, ratio and clip flags (ratio of the sequence for GSPO)."""
    lp, old, adv = (np.asarray(x, np.float64) for x in (lp, old, adv))
    B, T = lp.shape
    loss, ratio = np.zeros((B, T)), np.ones((B, T))
    c_low, c_high = np.zeros((B, T), bool), np.zeros((B, T), bool)
    for b in range(B):
        idx = [t for t in range(T) if mask[b, t]]
        seq_ratio = math.exp(sum(lp[b, t] - old[b, t] for t in idx) / max(len(idx), 1))
        for t in idx:
            rho = seq_ratio if sequence else math.exp(lp[b, t] - old[b, t])
            a = adv[b, t] if adv.ndim == 2 else adv[b]
            clipped = min(max(rho, 1 - low), 1 + high)
            loss[b, t] = max(-a * rho, -a * clipped)
            ratio[b, t] = rho
            c_low[b, t] = rho < 1 - low and a < 0
            c_high[b, t] = rho > 1 + high and a > 0
    return loss, ratio, c_low, c_high


def _policy_inputs(seed=0, spread=0.4):
    rng = np.random.default_rng(seed)
    old = rng.normal(size=MASK.shape).astype(np.float32) - 2
    lp = (old + rng.normal(size=MASK.shape) * spread).astype(np.float32)
    adv = rng.normal(size=MASK.shape).astype(np.float32)
    return lp, old, adv


@pytest.mark.parametrize("ratio_level", losses.RATIO_LEVELS)
@pytest.mark.parametrize("low,high", [(0.2, None), (0.2, 0.28), (0.1, 0.5), (3e-4, 4e-4)])
@pytest.mark.parametrize("adv_shape", ["token", "sequence"])
def test_clipped_policy_loss_matches_loop(ratio_level, low, high, adv_shape):
    lp, old, adv = _policy_inputs(1)
    if adv_shape == "sequence":
        adv = adv[:, 0]
    loss, d = losses.clipped_policy_loss(
        with_garbage(lp, MASK),
        with_garbage(old, MASK, np.inf),
        adv if adv.ndim == 1 else with_garbage(adv, MASK),
        MASK,
        clip_eps_low=low,
        clip_eps_high=high,
        ratio_level=ratio_level,
    )
    ref_loss, ref_ratio, ref_low, ref_high = policy_loss_loop(
        lp, old, adv, MASK, low, low if high is None else high, ratio_level == "sequence"
    )
    assert loss.dtype == jnp.float32 and loss.shape == MASK.shape
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(d["ratio"], ref_ratio, rtol=1e-5)
    np.testing.assert_array_equal(d["clipped_low"], ref_low)
    np.testing.assert_array_equal(d["clipped_high"], ref_high)


def test_clip_higher_fractions_by_hand():
    # Ratios 0.7 0.85 1.1 1.25 1.3 1.5 on tokens with A > 0 then A < 0; eps_low 0.2, eps_high 0.28.
    ratios = np.array([0.7, 0.85, 1.1, 1.25, 1.3, 1.5], np.float32)
    lp = np.log(np.stack([ratios, ratios]))
    adv = np.array([1.0, -1.0], np.float32)
    mask = np.ones((2, 6))
    loss, d = losses.clipped_policy_loss(lp, np.zeros((2, 6)), adv, mask, clip_eps_high=0.28)
    # A > 0: clipped above 1.28 (1.3, 1.5); A < 0: clipped below 0.8 (0.7).
    np.testing.assert_array_equal(d["clipped_high"], [[0, 0, 0, 0, 1, 1], [0] * 6])
    np.testing.assert_array_equal(d["clipped_low"], [[0] * 6, [1, 0, 0, 0, 0, 0]])
    assert float(losses.aggregate_loss(d["clipped_high"], mask)) == pytest.approx(2 / 12)
    assert float(losses.aggregate_loss(d["clipped_low"], mask)) == pytest.approx(1 / 12)
    np.testing.assert_allclose(
        loss, [[-0.7, -0.85, -1.1, -1.25, -1.28, -1.28], [0.8, 0.85, 1.1, 1.25, 1.3, 1.5]], rtol=1e-6
    )
    # Symmetric clipping (eps_high = eps_low) clips 1.25 too.
    _, d = losses.clipped_policy_loss(lp, np.zeros((2, 6)), adv, mask)
    np.testing.assert_array_equal(d["clipped_high"][0], [0, 0, 0, 1, 1, 1])
    # Gradient: -A * rho where the clip is inactive, 0 where it is active.
    g = jax.grad(
        lambda lp: jnp.sum(
            losses.clipped_policy_loss(lp, jnp.zeros((2, 6)), adv, mask, clip_eps_high=0.28)[0]
        )
    )(jnp.asarray(lp))
    np.testing.assert_allclose(
        g, [[-0.7, -0.85, -1.1, -1.25, 0, 0], [0, 0.85, 1.1, 1.25, 1.3, 1.5]], rtol=1e-6
    )


def test_token_level_symmetric_equals_ppo_policy_loss_on_valid_tokens():
    lp, old, adv = _policy_inputs(2)
    loss, _ = losses.clipped_policy_loss(lp, old, adv, MASK, clip_eps_low=0.15)
    ppo = np.asarray(losses.ppo_policy_loss(lp, old, adv, clip_eps=0.15))
    np.testing.assert_allclose(np.asarray(loss)[MASK == 1], ppo[MASK == 1], rtol=1e-6)
    assert np.all(np.asarray(loss)[MASK == 0] == 0)


def gspo_objective(lp, old, adv, mask, low, high):
    """GSPO written directly (no stop-gradient): per-sequence ``max(-A s, -A clip(s))`` and lengths."""
    lengths = jnp.sum(mask, axis=-1)
    s = jnp.exp(jnp.sum(jnp.where(mask != 0, lp - old, 0), axis=-1) / jnp.maximum(lengths, 1))
    per_seq = jnp.maximum(-adv * s, -adv * jnp.clip(s, 1 - low, 1 + high))
    return per_seq, lengths


@pytest.mark.parametrize("mode", losses.AGGREGATION_MODES)
def test_gspo_value_and_gradient_equal_the_direct_sequence_objective(mode):
    """The stop-gradient form = GSPO written directly, for every aggregation: values and gradients."""
    with jax.enable_x64(True):
        lp, old, adv = (jnp.asarray(x, jnp.float64) for x in _policy_inputs(3, spread=0.3))
        adv = adv[:, 0]
        mask = jnp.asarray(MASK)
        low, high = 0.05, 0.08  # some sequences clipped, some not

        def ours(lp):
            loss, _ = losses.clipped_policy_loss(
                lp, old, adv, mask, clip_eps_low=low, clip_eps_high=high, ratio_level="sequence"
            )
            return losses.aggregate_loss(loss, mask, mode, max_tokens=10 if mode == "seq_sum_norm" else None)

        def direct(lp):
            per_seq, n = gspo_objective(lp, old, adv, mask, low, high)
            rows = jnp.sum(n > 0)
            den = {
                "token_mean": jnp.sum(n),
                "seq_mean": rows,
                "seq_sum": rows,
                "seq_sum_norm": rows * 10,
            }[mode]
            weight = jnp.ones_like(n) if mode == "seq_mean" else n  # a sequence's tokens all carry its loss
            return jnp.sum(jnp.where(n > 0, per_seq * weight, 0)) / den

        s = np.asarray(gspo_objective(lp, old, adv, mask, low, high)[0])
        assert np.isfinite(s).all()
        _, d = losses.clipped_policy_loss(
            lp, old, adv, mask, clip_eps_low=low, clip_eps_high=high, ratio_level="sequence"
        )
        clipped = np.asarray(d["clipped_low"] | d["clipped_high"]).any(-1)
        assert clipped.any() and (~clipped[MASK.any(-1)]).any()  # both cases exercised
        np.testing.assert_allclose(ours(lp), direct(lp), rtol=1e-12)
        np.testing.assert_allclose(
            jax.jit(jax.grad(ours))(lp), jax.jit(jax.grad(direct))(lp), rtol=1e-10, atol=1e-14
        )
        check_grads(jax.jit(ours), (lp,), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


def test_gspo_gradient_closed_form_and_gspo_token_with_per_token_advantages():
    lp, old, _ = _policy_inputs(4, spread=0.05)
    mask = MASK
    n = mask.sum(-1)
    s = np.exp(np.where(mask != 0, lp.astype(np.float64) - old, 0).sum(-1) / np.maximum(n, 1))
    adv_seq = np.array([1.0, -0.5, 2.0, -1.0, 3.0], np.float32)

    def total(lp, adv):
        loss, _ = losses.clipped_policy_loss(lp, old, adv, mask, clip_eps_low=0.5, ratio_level="sequence")
        return losses.aggregate_loss(loss, mask, "seq_mean")

    # GSPO (no clip active with eps 0.5): d/d lp_{i,t} = -A_i s_i / |y_i| / (number of sequences).
    g = np.asarray(jax.grad(total)(jnp.asarray(lp), adv_seq))
    expected = np.where(mask != 0, (-adv_seq * s / np.maximum(n, 1))[:, None] / 4, 0)
    np.testing.assert_allclose(g, expected, rtol=1e-5, atol=1e-8)
    # GSPO-token (per-token advantages): d/d lp_{i,t} = -A_{i,t} s_i / |y_i| / 4.
    adv_tok = RNG.normal(size=mask.shape).astype(np.float32)
    g = np.asarray(jax.grad(total)(jnp.asarray(lp), adv_tok))
    expected = np.where(mask != 0, -adv_tok * (s / np.maximum(n, 1))[:, None] / 4, 0)
    np.testing.assert_allclose(g, expected, rtol=1e-5, atol=1e-8)


def _policy_loss_sum(lp, old, adv, level):
    return jnp.sum(losses.clipped_policy_loss(lp, old, adv, MASK, ratio_level=level)[0])


def test_clipped_policy_loss_extremes_and_masked_garbage():
    lp, old, adv = _policy_inputs(5)
    # Log-ratios of +-50 on valid tokens: finite loss and finite gradient for both ratio levels.
    big = old + np.where(RNG.random(MASK.shape) < 0.5, 50.0, -50.0).astype(np.float32)
    pos = np.abs(adv)  # A > 0: the loss is bounded by the upper clip
    for level in losses.RATIO_LEVELS:
        assert np.all(np.isfinite(np.asarray(_policy_loss_sum(big, old, pos, level))))
        assert np.all(np.isfinite(np.asarray(jax.grad(_policy_loss_sum)(jnp.asarray(big), old, pos, level))))
    # Masked slots holding NaN / inf: loss 0, ratio 1, never clipped, zero gradient.
    dirty_lp, dirty_old, dirty_adv = (
        with_garbage(lp, MASK, np.inf),
        with_garbage(old, MASK, -np.inf),
        with_garbage(adv, MASK),
    )
    for level in losses.RATIO_LEVELS:
        loss, d = losses.clipped_policy_loss(dirty_lp, dirty_old, dirty_adv, MASK, ratio_level=level)
        assert np.all(np.asarray(loss)[MASK == 0] == 0) and np.all(np.asarray(d["ratio"])[MASK == 0] == 1)
        assert not np.asarray(d["clipped_low"] | d["clipped_high"])[MASK == 0].any()
        g = np.asarray(jax.grad(_policy_loss_sum)(jnp.asarray(dirty_lp), dirty_old, dirty_adv, level))
        assert np.all(np.isfinite(g)) and np.all(g[MASK == 0] == 0)
    # The diagnostics carry no gradient.
    g = jax.grad(lambda x: jnp.sum(losses.clipped_policy_loss(x, old, adv, MASK)[1]["ratio"]))(
        jnp.asarray(lp)
    )
    assert np.all(np.asarray(g) == 0)


def test_clipped_policy_loss_errors():
    lp, old, adv = _policy_inputs(6)
    with pytest.raises(ValueError, match="ratio_level"):
        losses.clipped_policy_loss(lp, old, adv, MASK, ratio_level="group")
    with pytest.raises(ValueError, match="advantages must be"):
        losses.clipped_policy_loss(lp, old, adv[:, :3], MASK)
    with pytest.raises(ValueError, match="share one"):
        losses.clipped_policy_loss(lp, old[:, 1:], adv, MASK)
    with pytest.raises(ValueError, match="clip_eps"):
        losses.clipped_policy_loss(lp, old, adv, MASK, clip_eps_low=1.0)
    with pytest.raises(ValueError, match="clip_eps"):
        losses.clipped_policy_loss(lp, old, adv, MASK, clip_eps_high=-0.1)


# ----------------------------------------------------------------------------------------------
# Aggregation: seq_sum_norm (Dr.GRPO) and micro-batch exactness of every mode
# ----------------------------------------------------------------------------------------------
def test_seq_sum_norm_closed_form_defaults_and_errors():
    loss = np.array([[1.0, 3.0, np.nan, 0.0], [5.0, np.inf, 2.0, 0.0], [np.nan] * 4], np.float32)
    m = np.array([[1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    assert float(losses.aggregate_loss(loss, m, "seq_sum_norm", max_tokens=16)) == pytest.approx(
        11 / (2 * 16)
    )
    assert float(losses.aggregate_loss(loss, m, "seq_sum_norm")) == pytest.approx(11 / (2 * 4))  # L = T
    assert float(losses.loss_denominator(m, "seq_sum_norm", max_tokens=16)) == 32.0
    assert float(losses.aggregate_loss(loss, np.zeros_like(m), "seq_sum_norm", max_tokens=16)) == 0.0
    with pytest.raises(ValueError, match="read only by mode 'seq_sum_norm'"):
        losses.aggregate_loss(loss, m, "token_mean", max_tokens=16)
    with pytest.raises(ValueError, match="read only by mode 'seq_sum_norm'"):
        losses.loss_denominator(m, "seq_mean", max_tokens=16)
    with pytest.raises(ValueError, match="positive int"):
        losses.loss_denominator(m, "seq_sum_norm", max_tokens=0)
    with pytest.raises(ValueError, match="global_denominator"):
        losses.aggregate_loss(loss, m, "seq_sum_norm", global_denominator=3.0, max_tokens=16)


def test_seq_sum_norm_weighs_every_token_the_same_whatever_its_length():
    """Dr.GRPO: d loss / d per_token = m / (D_seq L) for all rows; seq_mean gives m / (D_seq |y|)."""
    m = MASK.astype(np.float32)
    x = jnp.asarray(RNG.normal(size=m.shape), jnp.float32)
    g = np.asarray(jax.grad(lambda x: losses.aggregate_loss(x, m, "seq_sum_norm", max_tokens=12))(x))
    np.testing.assert_allclose(g, m / (4 * 12), rtol=1e-6)
    g = np.asarray(jax.grad(lambda x: losses.aggregate_loss(x, m, "seq_mean"))(x))
    np.testing.assert_allclose(g, m / (4 * np.maximum(m.sum(-1, keepdims=True), 1)), rtol=1e-6)


@pytest.mark.parametrize("mode", losses.AGGREGATION_MODES)
@pytest.mark.parametrize("ratio_level", losses.RATIO_LEVELS)
def test_every_mode_is_exact_under_micro_batching(mode, ratio_level):
    """Splitting the batch and summing the micro-batch losses (global denominator) = full batch,
    in value and in gradient, for uneven splits and a row with no valid token."""
    rng = np.random.default_rng(7)
    B, T = 7, 6
    mask = (rng.random((B, T)) < 0.7).astype(np.int32)
    mask[3] = 0
    old = rng.normal(size=(B, T)).astype(np.float32)
    lp = jnp.asarray(old + rng.normal(size=(B, T)) * 0.3, jnp.float32)
    adv = rng.normal(size=B).astype(np.float32)
    max_tokens = 9 if mode == "seq_sum_norm" else None

    def loss_of(lp, rows, den=None):
        per_token, _ = losses.clipped_policy_loss(
            lp[rows], old[rows], adv[rows], mask[rows], clip_eps_high=0.28, ratio_level=ratio_level
        )
        if den is None:
            return losses.aggregate_loss(per_token, mask[rows], mode, max_tokens=max_tokens)
        return losses.aggregate_loss(per_token, mask[rows], mode, global_denominator=den)

    full, g_full = jax.jit(jax.value_and_grad(lambda lp: loss_of(lp, slice(0, B))))(lp)
    for splits in ([0, 2, 7], [0, 1, 4, 7], [0, 6, 7]):
        parts = [slice(a, b) for a, b in zip(splits[:-1], splits[1:], strict=True)]
        den = sum(float(losses.loss_denominator(mask[p], mode, max_tokens=max_tokens)) for p in parts)
        micro = lambda lp, parts=parts, den=den: sum(loss_of(lp, p, den) for p in parts)
        value, g = jax.jit(jax.value_and_grad(micro))(lp)
        np.testing.assert_allclose(value, full, rtol=1e-6)
        np.testing.assert_allclose(g, g_full, rtol=1e-5, atol=1e-8)


# ----------------------------------------------------------------------------------------------
# SimPO
# ----------------------------------------------------------------------------------------------
def test_simpo_closed_form_and_conventions():
    rng = np.random.default_rng(11)  # its own draw: the module RNG's state depends on test order
    pc = rng.normal(size=6).astype(np.float32) * 10 - 40
    pr = rng.normal(size=6).astype(np.float32) * 10 - 40
    lc = rng.integers(1, 50, size=6)
    lr = rng.integers(1, 50, size=6)
    for beta, gamma in [(2.0, 0.5), (10.0, 3.0), (2.5, 0.0)]:
        margin = beta * pc.astype(np.float64) / lc - beta * pr.astype(np.float64) / lr
        out = losses.simpo_loss(pc, pr, lc, lr, beta=beta, gamma=gamma)
        assert out.shape == (6,) and out.dtype == jnp.float32
        # float32 cannot hold losses below ~1e-38 (won pairs): an absolute floor for those
        np.testing.assert_allclose(out, -np_log_sigmoid(margin - gamma), rtol=1e-5, atol=1e-12)
        # TRL (CPOTrainer, loss_type="simpo"): -log sigmoid(beta * (logratio - simpo_gamma / beta)).
        trl = -np_log_sigmoid(beta * ((pc / lc - pr / lr) - gamma / beta))
        np.testing.assert_allclose(out, trl, rtol=1e-5, atol=1e-12)
        np.testing.assert_allclose(losses.simpo_implicit_rewards(pc, lc, beta), beta * pc / lc, rtol=1e-6)
    # Defaults beta = 2, gamma = 0.5; equal normalised log-probs give -log sigmoid(-0.5).
    out = losses.simpo_loss(np.array([-4.0]), np.array([-8.0]), np.array([2]), np.array([4]))
    np.testing.assert_allclose(out, -np_log_sigmoid(-0.5), rtol=1e-6)


def test_simpo_extremes_zero_lengths_and_gradients():
    huge = np.array([-1e6, -1e4, 0.0], np.float32)
    out = np.asarray(losses.simpo_loss(huge, huge[::-1].copy(), np.array([1, 1, 0]), np.array([0, 1, 1])))
    assert np.all(np.isfinite(out))
    # Pairs: lost by 2e6 (rejected length 0 counts as 1), a tie (only the margin), won by 2e6.
    np.testing.assert_allclose(out, [2e6 + 0.5, -np_log_sigmoid(-0.5), 0.0], rtol=1e-6, atol=1e-30)
    g = jax.grad(lambda c: losses.simpo_loss(c, jnp.zeros(3), jnp.array([4, 4, 4]), jnp.ones(3)).sum())(
        jnp.asarray(huge)
    )
    g = np.asarray(g)
    assert np.all(np.isfinite(g))
    # d/d log pi(y_w) = -(beta / |y_w|) sigmoid(-z): -0.5 where the pair is badly lost.
    np.testing.assert_allclose(g[0], -0.5, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# KL to the reference as a loss term (GRPO): the existing kl_penalty serves it
# ----------------------------------------------------------------------------------------------
def test_kl_loss_term_coefficient_zero_and_k3_gradient():
    lp, old, adv = _policy_inputs(8)
    ref = (lp + RNG.normal(size=MASK.shape) * 0.5).astype(np.float32)

    def total(lp, coef):
        pg, _ = losses.clipped_policy_loss(lp, old, adv, MASK)
        kl = losses.kl_penalty(lp, ref, "k3")
        return losses.aggregate_loss(pg, MASK) + coef * losses.aggregate_loss(kl, MASK)

    policy_only = lambda lp: losses.aggregate_loss(losses.clipped_policy_loss(lp, old, adv, MASK)[0], MASK)
    lp = jnp.asarray(lp)
    assert float(total(lp, 0.0)) == float(policy_only(lp))
    np.testing.assert_array_equal(jax.grad(total)(lp, 0.0), jax.grad(policy_only)(lp))
    # GRPO's k3 = exp(ref - lp) - (ref - lp) - 1 has gradient 1 - exp(ref - lp) per token.
    g_kl = np.asarray(jax.grad(total)(lp, 0.1) - jax.grad(total)(lp, 0.0))
    expected = np.where(MASK != 0, 0.1 * (1 - np.exp(ref - np.asarray(lp))) / MASK.sum(), 0)
    np.testing.assert_allclose(g_kl, expected, rtol=1e-4, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# Cross-cutting: float64 gradients, bf16 inputs, one trace for a GRPO-like step
# ----------------------------------------------------------------------------------------------
def _grad_cases():
    rng = np.random.default_rng(11)
    n = lambda *s: rng.normal(size=s)
    m = np.array([[0, 1, 1, 1], [1, 1, 0, 1]])
    ratio_lp = np.log(np.array([[1.05, 0.9, 1.5, 0.5], [1.1, 0.95, 1.3, 0.7]]))
    cases = [
        (f"group_{method}", lambda r, method=method: losses.group_advantages(r, 3, method), (n(9),))
        for method in losses.GROUP_ADVANTAGE_METHODS
    ]
    return cases + [
        ("group_std", lambda r: losses.group_reward_stats(r, 4)["std"], (n(8),)),
        ("reinforce_pp", lambda r: losses.reinforce_pp_returns(r, MASK, 0.9), (n(*MASK.shape),)),
        (
            "clipped_token",
            lambda lp, a: losses.clipped_policy_loss(lp, np.zeros((2, 4)), a, m, clip_eps_high=0.28)[0],
            (ratio_lp, n(2, 4)),
        ),
        (
            "clipped_sequence_seq_mean",
            lambda lp, a: losses.aggregate_loss(
                losses.clipped_policy_loss(lp, np.zeros((2, 4)), a, m, ratio_level="sequence")[0],
                m,
                "seq_mean",
            ),
            (ratio_lp * 0.1, n(2)),
        ),
        (
            "aggregate_seq_sum_norm",
            lambda x: losses.aggregate_loss(x, m, "seq_sum_norm", max_tokens=5),
            (n(2, 4),),
        ),
        (
            "simpo",
            lambda c, r: losses.simpo_loss(c, r, np.array([3, 5, 1]), np.array([2, 2, 7])),
            (n(3), n(3)),
        ),
        ("simpo_rewards", lambda p: losses.simpo_implicit_rewards(p, np.array([3, 5, 1]), 2.5), (n(3),)),
    ]


@pytest.mark.parametrize("case", range(len(_grad_cases())), ids=[c[0] for c in _grad_cases()])
def test_check_grads_float64(case):
    with jax.enable_x64(True):
        name, fn, args = _grad_cases()[case]
        args = tuple(jnp.asarray(a, jnp.float64) for a in args)
        assert all(x.dtype == jnp.float64 for x in jax.tree.leaves(fn(*args))), name
        check_grads(jax.jit(fn), args, order=1, modes=("rev",), atol=1e-5, rtol=1e-5)


def test_bf16_inputs_give_f32_outputs():
    bf = lambda *s: jnp.asarray(RNG.normal(size=s), jnp.bfloat16)
    m = jnp.ones((2, 3), jnp.int32)
    outs = {
        "group_advantages": losses.group_advantages(bf(4), 2),
        "reinforce_pp": losses.reinforce_pp_returns(bf(2, 3), m),
        "clipped": losses.clipped_policy_loss(bf(2, 3), bf(2, 3), bf(2), m)[0],
        "clipped_seq": losses.clipped_policy_loss(bf(2, 3), bf(2, 3), bf(2, 3), m, ratio_level="sequence")[0],
        "seq_sum_norm": losses.aggregate_loss(bf(2, 3), m, "seq_sum_norm"),
        "simpo": losses.simpo_loss(bf(3), bf(3), jnp.ones(3, jnp.int32), jnp.ones(3, jnp.int32)),
    }
    for name, out in outs.items():
        assert out.dtype == jnp.float32, name


def test_grpo_like_step_traces_once():
    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(lp, old, ref, rewards, token_rewards, mask, gamma, pc, pr):
        adv = losses.group_advantages(rewards, 4, "grpo")
        pg, d = losses.clipped_policy_loss(lp, old, adv, mask, clip_eps_high=0.28)
        gspo, _ = losses.clipped_policy_loss(lp, old, adv, mask, ratio_level="sequence")
        rpp = losses.masked_whiten(losses.reinforce_pp_returns(token_rewards, mask, gamma), mask)
        pp, _ = losses.clipped_policy_loss(lp, old, rpp, mask)
        kl = losses.kl_penalty(lp, ref, "k3")
        out = losses.aggregate_loss(pg + 0.01 * kl, mask, "seq_sum_norm", max_tokens=8)
        out += losses.aggregate_loss(gspo, mask, "seq_mean") + losses.aggregate_loss(pp, mask)
        out += losses.simpo_loss(pc, pr, jnp.sum(mask, -1)[:4], jnp.sum(mask, -1)[4:]).mean()
        return out, losses.aggregate_loss(d["clipped_high"], mask)

    for i in range(3):
        rng = np.random.default_rng(20 + i)
        f = lambda *s, rng=rng: jnp.asarray(rng.normal(size=s), jnp.float32)
        mask = jnp.asarray(rng.random((8, 6)) < 0.8, jnp.int32)
        out, frac = step(f(8, 6), f(8, 6), f(8, 6), f(8), f(8, 6), mask, jnp.float32(1 - 0.1 * i), f(4), f(4))
        assert np.isfinite(float(out)) and 0 <= float(frac) <= 1
