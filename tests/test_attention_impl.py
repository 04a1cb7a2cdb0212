"""The fused-attention choice (``config.model.attention``): ``jax.nn.dot_product_attention`` with
the XLA implementation equals the portable kernel and a float64 numpy softmax attention (values and
gradients), in a model forward and through the config. cuDNN needs an NVIDIA GPU: not run on CPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrlhf import config_defaults as d
from jaxrlhf import models
from jaxrlhf.models.modeling import attend
from jaxrlhf.sharding import make_mesh
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
    c.model.attention = "splash"
    with pytest.raises(ValueError, match=r"config\.model\.attention='splash': expected one of"):
        setup.load_model(c, c.model, mesh)
