"""The fused-attention choice (``config.model.attention``): ``jax.nn.dot_product_attention`` with
the XLA implementation equals the portable kernel and a float64 numpy softmax attention (values and
gradients), in a model forward and through the config. cuDNN needs an NVIDIA GPU: not run on CPU.
Pallas splash attention (the TPU kernel) runs here in Pallas's interpreter: equal to numpy on real
tokens with packing, padding and a sliding window, in its gradients to the portable kernel, in a
model forward and sharded over 8 devices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrlhf import config_defaults as d
from jaxrlhf import models
from jaxrlhf.models import splash
from jaxrlhf.models.modeling import attend
from jaxrlhf.sharding import activation_mesh, make_mesh
from jaxrlhf.trainer import setup


def numpy_attention(q, k, v, allowed):
    """float64 masked softmax attention with GQA; a row with no allowed key averages the values."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, h, dh = q.shape
    kh = k.shape[2]
    out = np.zeros((b, t, h, dh))
    for bi in range(b):
        for hi in range(h):
            kv = hi // (h // kh)
            s = q[bi, :, hi] @ k[bi, :, kv].T / np.sqrt(dh)  # [T, S]
            for ti in range(t):
                m = allowed[bi, ti]
                w = np.exp(s[ti] - s[ti][m].max()) * m if m.any() else np.ones(len(m))
                out[bi, ti, hi] = (w / w.sum()) @ v[bi, :, kv]
    return out


def _inputs(seed=0, b=2, t=96, h=4, kh=2, dh=16):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.normal(size=(b, t, n, dh)).astype(np.float32) for n in (h, kh, kh))
    lengths = np.array([t, t - 37])
    causal = np.tril(np.ones((t, t), bool))
    allowed = causal[None] & (np.arange(t)[None, None, :] < lengths[:, None, None])
    allowed[1, t - 5 :] = False  # padding queries attend nothing
    return q, k, v, allowed


@pytest.mark.parametrize("causal", [True, False])
def test_xla_kernel_equals_portable_and_numpy(causal):
    q, k, v, allowed = _inputs()
    want = numpy_attention(q, k, v, allowed)
    for impl in ("portable", "xla"):
        got = attend(
            jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(allowed), causal=causal, impl=impl
        )
        np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, err_msg=impl)


def test_xla_kernel_gradients_equal_portable():
    q, k, v, allowed = (jnp.asarray(x) for x in _inputs(seed=1))
    w = jax.random.normal(jax.random.key(0), q.shape)

    def loss(impl):
        return jax.grad(
            lambda q, k, v: jnp.sum(w * attend(q, k, v, allowed, causal=True, impl=impl)), (0, 1, 2)
        )

    for g_x, g_p in zip(loss("xla")(q, k, v), loss("portable")(q, k, v), strict=True):
        np.testing.assert_allclose(np.asarray(g_x), np.asarray(g_p), atol=5e-5)


def test_model_forward_with_the_xla_kernel_equals_portable():
    ids = jnp.asarray(np.random.default_rng(2).integers(4, 256, size=(2, 40)), jnp.int32)
    mask = jnp.asarray(np.arange(40)[None] < np.array([[40], [23]]), jnp.int32)
    outs = {}
    for impl in ("portable", "xla"):
        model = models.init("qwen2", seed=3, attention=impl)
        assert model.config.attention == impl
        outs[impl] = np.asarray(model(ids, attention_mask=mask))
    np.testing.assert_allclose(outs["xla"][mask == 1], outs["portable"][mask == 1], atol=2e-5)


def test_config_key_reaches_the_model_and_bad_values_name_the_key():
    c = d.base("sft")
    c.model = d.model(family="llama", vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=1)
    c.model.dtype = "float32"
    mesh = make_mesh(dict(data=-1, fsdp=1, tensor=1))
    c.model.attention = "xla"
    graphdef, params, cfg = setup.load_model(c, c.model, mesh)
    assert cfg.attention == "xla"
    assert nnx.merge(graphdef, params).layers[0].attention_impl == "xla"
    c.model.attention = "flash"
    with pytest.raises(ValueError, match=r"config\.model\.attention='flash': expected one of"):
        setup.load_model(c, c.model, mesh)


# ----------------------------------------------------------------------------------------------
# Splash attention (interpreted on CPU).
# ----------------------------------------------------------------------------------------------
def _packed(seed=0, b=2, t=96, h=4, kh=2, dh=16):
    """Row 0: two packed examples (ids 1, 2) then 6 padding tokens (id 0); row 1: 7 left-padding
    tokens then one example."""
    rng = np.random.default_rng(seed)
    q, k, v = (rng.normal(size=(b, t, n, dh)).astype(np.float32) for n in (h, kh, kh))
    seg = np.zeros((b, t), np.int32)
    seg[0, :40], seg[0, 40:90] = 1, 2
    seg[1, 7:] = 1
    return q, k, v, seg


def _allowed(seg, window=None):
    """``[B,T,S]`` from the definition (causal, same example, real key, inside the window)."""
    t = seg.shape[1]
    qi, ki = np.arange(t)[:, None], np.arange(t)[None, :]
    ok = (ki <= qi) & (qi - ki < (window or t + 1))
    return ok[None] & (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0)


@pytest.mark.parametrize("window", [None, 24])
def test_splash_equals_numpy_on_real_tokens(window):
    q, k, v, seg = _packed()
    want = numpy_attention(q, k, v, _allowed(seg, window))
    ids = splash.segment_ids(jnp.asarray(seg != 0), jnp.asarray(seg))
    got = np.asarray(attend(*map(jnp.asarray, (q, k, v)), ids, causal=True, impl="splash", window=window))
    real = seg != 0
    np.testing.assert_allclose(got[real], want[real], atol=2e-5)
    assert np.isfinite(got).all()  # padding rows attend themselves: finite, unspecified


def test_splash_gradients_equal_portable_on_real_tokens():
    q, k, v, seg = _packed(seed=1)
    allowed = jnp.asarray(_allowed(seg))
    ids = splash.segment_ids(jnp.asarray(seg != 0), jnp.asarray(seg))
    w = jax.random.normal(jax.random.key(0), q.shape) * jnp.asarray(seg != 0)[:, :, None, None]

    def grads(impl, mask):
        f = lambda q, k, v: jnp.sum(w * attend(q, k, v, mask, causal=True, impl=impl))
        return jax.grad(f, (0, 1, 2))(*map(jnp.asarray, (q, k, v)))

    for g_s, g_p in zip(grads("splash", ids), grads("portable", allowed), strict=True):
        np.testing.assert_allclose(np.asarray(g_s), np.asarray(g_p), atol=5e-5)


def test_splash_segment_ids_and_causal_only():
    key_ok = jnp.asarray([[False, True, True, True], [True, True, True, False]])
    np.testing.assert_array_equal(splash.segment_ids(key_ok, None), [[-1, 1, 1, 1], [1, 1, 1, -4]])
    seg = jnp.asarray([[0, 3, 3, 5], [1, 1, 2, 0]])
    np.testing.assert_array_equal(splash.segment_ids(seg != 0, seg), [[-1, 3, 3, 5], [1, 1, 2, -4]])
    q = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(ValueError, match="full causal forward only"):
        attend(q, q, q, seg[:1], causal=False, impl="splash")


@pytest.mark.parametrize("family,extra", [("qwen2", {}), ("mistral", {"sliding_window": 16})])
def test_model_forward_with_splash_equals_portable(family, extra):
    """Padding by attention_mask, then packing by segment_ids; logits on real tokens."""
    rng = np.random.default_rng(4)
    ids = jnp.asarray(rng.integers(4, 256, size=(2, 40)), jnp.int32)
    mask = jnp.asarray(np.arange(40)[None] < np.array([[40], [23]]), jnp.int32)
    seg = np.zeros((2, 40), np.int32)
    seg[0, :15], seg[0, 15:38], seg[1, :40] = 1, 2, 1
    built = {impl: models.init(family, seed=3, attention=impl, **extra) for impl in ("portable", "splash")}
    assert built["splash"].layers[0].window == extra.get("sliding_window")
    cases = (
        (dict(attention_mask=mask), np.asarray(mask) == 1),
        (dict(segment_ids=jnp.asarray(seg)), seg != 0),
    )
    for kw, real in cases:
        outs = {impl: np.asarray(m(ids, **kw)) for impl, m in built.items()}
        np.testing.assert_allclose(outs["splash"][real], outs["portable"][real], atol=2e-5)


def test_splash_sharded_over_eight_devices_equals_unsharded():
    """Under a data x fsdp x tensor mesh the kernel runs per batch shard (shard_map)."""
    q, k, v, _ = _packed(seed=2, b=4)
    seg = np.tile(np.r_[np.ones(50), 2 * np.ones(46)].astype(np.int32), (4, 1))
    ids = splash.segment_ids(jnp.asarray(seg != 0), jnp.asarray(seg))
    want = np.asarray(splash.attention(*map(jnp.asarray, (q, k, v)), ids))
    np.testing.assert_allclose(want, numpy_attention(q, k, v, _allowed(seg)), atol=2e-5)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    with activation_mesh(mesh):
        got = jax.jit(splash.attention)(*map(jnp.asarray, (q, k, v)), ids)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-6)


def test_splash_off_tpu_is_allowed_with_a_warning_naming_the_key(caplog):
    import logging

    c = d.base("sft")
    c.model = d.model(family="llama", vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=1)
    c.model.dtype = "float32"
    c.model.attention = "splash"
    with caplog.at_level(logging.WARNING):
        _, _, cfg = setup.load_model(c, c.model, make_mesh(dict(data=-1, fsdp=1, tensor=1)))
    assert cfg.attention == "splash"
    assert "config.model.attention='splash' is the TPU kernel: on cpu" in caplog.text
