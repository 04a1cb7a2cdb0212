"""Large vocabularies: the chunked log-prob / entropy kernels (``losses.chunked_*``) against a float64
numpy closed form (values and gradients wrt the hidden states and the output layer), and the wired
path (``config.vocab_chunk``) against the plain logits path: SFT, DPO and PPO's token log-probs
with temperature and entropy, tied and untied heads, on a tensor=2 mesh, and the compiled memory
without a ``[B, T, V]`` float32 buffer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxrlhf import config_defaults as d
from jaxrlhf import losses, models, registry
from jaxrlhf.algorithms import common
from jaxrlhf.sharding import activation_mesh, make_mesh, named_shardings, shard_batch


# ----------------------------------------------------------------------------------------------
# The kernels against numpy float64.
# ----------------------------------------------------------------------------------------------
def _numpy_reference(h, w, labels, temperature, g_lp, g_ent):
    """float64 log p(label), entropy and the gradients of ``sum(g_lp * logp + g_ent * H)`` wrt
    ``h [N, D]`` and ``w [D, V]``: ``dz = g_lp (onehot - p) - g_ent p (log p + H)``, ``z = h w / tau``."""
    h, w = np.asarray(h, np.float64), np.asarray(w, np.float64)
    z = h @ w / temperature
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    p = np.exp(logp)
    ent = -(p * logp).sum(-1)
    onehot = np.eye(w.shape[1])[labels]
    dz = g_lp[:, None] * (onehot - p) - g_ent[:, None] * p * (logp + ent[:, None])
    dz = dz / temperature
    return logp[np.arange(len(labels)), labels], ent, dz @ w.T, h.T @ dz


@pytest.mark.parametrize("vocab_axis,temperature,scale", [(0, 0.7, 1.0), (1, 0.7, 1.0), (1, 1.0, 60.0)])
def test_chunked_kernels_equal_float64_closed_form(vocab_axis, temperature, scale):
    rng = np.random.default_rng(0)
    b, t, dim, v, chunk = 3, 5, 16, 37, 8  # 37 = 4 * 8 + 5: the last chunk overlaps the previous one
    h = (rng.normal(size=(b, t, dim)) * scale).astype(np.float32)  # scale 60: logits ~ +-1e3
    w = rng.normal(size=(dim, v)).astype(np.float32)
    labels = rng.integers(0, v, size=(b, t))
    labels[0, 0] = v - 1  # in the overlapped tail
    labels[1, 1] = v - 6  # in the last full chunk, overlapped by the tail chunk
    g_lp, g_ent = rng.normal(size=(b, t)), rng.normal(size=(b, t))
    wk = w if vocab_axis == 1 else w.T
    kw = dict(chunk=chunk, temperature=temperature, vocab_axis=vocab_axis)

    def objective(h, wk):
        lp, ent = losses.chunked_logprobs_and_entropy(h, wk, jnp.asarray(labels), **kw)
        return jnp.sum(lp * g_lp + ent * g_ent), (lp, ent)

    (_, (lp, ent)), (dh, dwk) = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(h, wk)
    want_lp, want_ent, want_dh, want_dw = _numpy_reference(
        h.reshape(-1, dim), w, labels.reshape(-1), temperature, g_lp.reshape(-1), g_ent.reshape(-1)
    )
    tol = dict(rtol=2e-5, atol=2e-5 * scale)
    np.testing.assert_allclose(np.asarray(lp).reshape(-1), want_lp, **tol)
    np.testing.assert_allclose(np.asarray(ent).reshape(-1), want_ent, rtol=2e-5, atol=5e-5)
    np.testing.assert_allclose(np.asarray(dh).reshape(-1, dim), want_dh, rtol=1e-4, atol=1e-4)
    dw = np.asarray(dwk) if vocab_axis == 1 else np.asarray(dwk).T
    np.testing.assert_allclose(dw, want_dw, rtol=1e-4, atol=1e-4 * scale)
    # the log-probs alone (no entropy pass) are the same numbers, and so is their gradient
    only = lambda h, wk: jnp.sum(losses.chunked_token_logprobs(h, wk, jnp.asarray(labels), **kw) * g_lp)
    np.testing.assert_allclose(
        np.asarray(losses.chunked_token_logprobs(h, wk, jnp.asarray(labels), **kw)), np.asarray(lp)
    )
    dh_only = jax.grad(only)(h, wk)
    _, _, want_dh_only, _ = _numpy_reference(
        h.reshape(-1, dim), w, labels.reshape(-1), temperature, g_lp.reshape(-1), np.zeros(b * t)
    )
    np.testing.assert_allclose(np.asarray(dh_only).reshape(-1, dim), want_dh_only, rtol=1e-4, atol=1e-4)


def test_chunked_kernels_bfloat16_hidden_and_clipped_labels():
    """bf16 activations: the matmul runs in bf16 with float32 accumulation, so the values match the
    float64 computation on the bf16-rounded inputs to float32 rounding; the gradients pass through
    bf16 (the model's compute dtype) and match to bf16 rounding. Out-of-range labels are clipped."""
    rng = np.random.default_rng(1)
    n, dim, v = 24, 32, 101
    h = jnp.asarray(rng.normal(size=(n, dim)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(v, dim)) * 0.3, jnp.float32)  # tied layout [V, D]
    labels = rng.integers(0, v, size=n)
    labels[:3] = [-100, v, v + 7]
    clipped = np.clip(labels, 0, v - 1)
    g = rng.normal(size=n)
    kw = dict(chunk=16, vocab_axis=0)
    lp, ent = losses.chunked_logprobs_and_entropy(h, w, jnp.asarray(labels), **kw)
    assert lp.dtype == jnp.float32 and ent.dtype == jnp.float32
    h64 = np.asarray(h.astype(jnp.float32), np.float64)
    w64 = np.asarray(w.astype(jnp.bfloat16).astype(jnp.float32), np.float64).T
    want_lp, want_ent, want_dh, want_dw = _numpy_reference(h64, w64, clipped, 1.0, g, np.zeros(n))
    np.testing.assert_allclose(np.asarray(lp), want_lp, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(ent), want_ent, rtol=1e-5, atol=1e-4)
    dh, dw = jax.grad(
        lambda h, w: jnp.sum(losses.chunked_token_logprobs(h, w, jnp.asarray(labels), **kw) * g), (0, 1)
    )(h, w)
    assert dh.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
    scale_h, scale_w = np.abs(want_dh).max(), np.abs(want_dw).max()
    np.testing.assert_allclose(np.asarray(dh.astype(jnp.float32)), want_dh, atol=2e-2 * scale_h)
    np.testing.assert_allclose(np.asarray(dw).T, want_dw, atol=2e-2 * scale_w)


def test_chunked_kernels_reject_bad_shapes():
    h, w = jnp.zeros((2, 3, 4)), jnp.zeros((4, 10))
    with pytest.raises(ValueError, match="hidden"):
        losses.chunked_token_logprobs(h, w.T, jnp.zeros((2, 3), jnp.int32), chunk=4)  # [V, D], axis 1
    with pytest.raises(ValueError, match="chunk must be"):
        losses.chunked_token_logprobs(h, w, jnp.zeros((2, 3), jnp.int32), chunk=0)
    with pytest.raises(ValueError, match="integer"):
        losses.chunked_token_logprobs(h, w, jnp.zeros((2, 3)), chunk=4)


# ----------------------------------------------------------------------------------------------
# The wired path: vocab_chunk on equals off.
# ----------------------------------------------------------------------------------------------
V, T, B, CHUNK = 203, 10, 4, 32  # 203 = 6 * 32 + 11


def _config(algorithm, vocab_chunk, tie=False):
    c = d.base(algorithm)
    c.model = d.model(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
        tie_word_embeddings=tie,
    )
    c.model.dtype = "float32"
    c.vocab_chunk = vocab_chunk
    c.dpo = dict(beta=0.1, label_smoothing=0.0, loss_type="sigmoid", nll_coef=0.5)
    return c


def _seq(rng, b=B, t=T):
    ids = rng.integers(3, V, size=(b, t)).astype(np.int32)
    am, lm = np.zeros((b, t), np.int32), np.zeros((b, t), np.int32)
    for i in range(b):
        n = int(rng.integers(5, t + 1))
        am[i, :n] = 1
        lm[i, int(rng.integers(1, n - 1)) : n] = 1
    pos = np.maximum(np.cumsum(am, 1) - 1, 0) * am
    return {"input_ids": np.where(am > 0, ids, 0), "attention_mask": am, "loss_mask": lm, "positions": pos}


def _batch(algorithm, seed=0):
    rng = np.random.default_rng(seed)
    if algorithm == "sft":
        return _seq(rng)
    c, r = _seq(rng), _seq(rng)
    out = {f"chosen_{k}": v for k, v in c.items()} | {f"rejected_{k}": v for k, v in r.items()}
    out["margin"] = np.zeros(B, np.float32)
    return out


def _model(tie, seed=0, vocab=V):
    init = dict(_config("sft", 0, tie).model.init, vocab_size=vocab)
    return nnx.split(models.init("llama", seed=seed, dtype=jnp.float32, **init))


def _loss_and_grads(algorithm, vocab_chunk, tie):
    config = _config(algorithm, vocab_chunk, tie)
    graphdef, params = _model(tie)
    params = nnx.to_pure_dict(params)
    ref = jax.tree.map(lambda x: x * 0.9, params)  # a reference that differs from the policy
    loss_fn, denominators = registry.get(algorithm).build_loss(config, graphdef)
    batch = jax.tree.map(jnp.asarray, _batch(algorithm))
    denoms = denominators(batch)
    f = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, ref, batch, denoms, None), has_aux=True))
    (loss, metrics), grads = f(params)
    return loss, metrics, grads


@pytest.mark.parametrize("algorithm,tie", [("sft", False), ("dpo", True), ("simpo", False)])
def test_step_with_vocab_chunks_equals_plain(algorithm, tie):
    plain = _loss_and_grads(algorithm, 0, tie)
    chunked = _loss_and_grads(algorithm, CHUNK, tie)
    np.testing.assert_allclose(chunked[0], plain[0], rtol=1e-5)
    for k in plain[1]:
        np.testing.assert_allclose(chunked[1][k], plain[1][k], rtol=1e-5, atol=1e-6, err_msg=k)
    flat_p, flat_c = jax.tree_util.tree_leaves_with_path(plain[2]), jax.tree.leaves(chunked[2])
    for (path, gp), gc in zip(flat_p, flat_c, strict=True):
        scale = float(np.abs(gp).max()) + 1e-12
        np.testing.assert_allclose(gc, gp, rtol=1e-4, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path))


def test_chunk_larger_than_vocabulary_takes_the_plain_path():
    model = nnx.merge(*_model(False))
    assert common.uses_vocab_chunks(model.config, CHUNK) and not common.uses_vocab_chunks(model.config, V)
    assert not common.uses_vocab_chunks(model.config, 0)


def test_token_logps_with_temperature_and_entropy():
    """PPO/GRPO's path: log-probs and entropy of logits / temperature, and their gradients (tied head)."""
    graphdef, params = _model(True, seed=3)
    params = nnx.to_pure_dict(params)
    seq = jax.tree.map(jnp.asarray, _seq(np.random.default_rng(5)))
    w = jnp.asarray(np.random.default_rng(6).normal(size=(B, T - 1)), jnp.float32)

    def run(chunk):
        def f(p):
            lp, mask, ent = common.token_logps(
                graphdef, p, seq, vocab_chunk=chunk, temperature=0.7, entropy=True
            )
            return jnp.sum(w * lp) + jnp.sum(w * ent * mask), (lp, mask, ent)

        return jax.jit(jax.value_and_grad(f, has_aux=True))(params)

    (vp, (lp_p, mask_p, ent_p)), gp = run(0)
    (vc, (lp_c, mask_c, ent_c)), gc = run(CHUNK)
    np.testing.assert_array_equal(mask_c, mask_p)
    assert np.all(np.asarray(lp_c)[np.asarray(mask_c) == 0] == 0.0)
    np.testing.assert_allclose(lp_c, lp_p, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ent_c, ent_p, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(gc), jax.tree.leaves(gp), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * (float(np.abs(b).max()) + 1e-12))


def test_chunked_path_on_a_tensor_parallel_mesh():
    """Vocabulary-sharded LM head (tensor=2, data=2, fsdp=2 on 8 fake devices): compiles and gives
    the unsharded plain values and gradients."""
    graphdef, params = _model(False, seed=1, vocab=206)  # 206 = 2 * 103 = 6 * 32 + 14
    params = nnx.to_pure_dict(params)
    seq = jax.tree.map(jnp.asarray, _seq(np.random.default_rng(2), b=8))
    f = lambda p, s, chunk: jnp.sum(common.response_logps(graphdef, p, s, vocab_chunk=chunk))
    want, want_g = jax.jit(jax.value_and_grad(f), static_argnums=2)(params, seq, 0)

    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = models.partition_rules(nnx.merge(*_model(False)).config)
    sharded = jax.device_put(params, named_shardings(mesh, rules, params))
    assert sharded["lm_head"]["kernel"].sharding.spec == P("fsdp", "tensor")  # [E, V]: vocab-sharded
    with activation_mesh(mesh):
        got, got_g = jax.jit(jax.value_and_grad(f), static_argnums=2)(sharded, shard_batch(mesh, seq), CHUNK)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * (float(np.abs(b).max()) + 1e-12))


def test_compiled_chunked_step_has_no_full_logits_buffer():
    """The DPO loss + gradient compiled with chunks needs far less temporary memory than one
    ``[2B, T, V]`` float32 array; the plain path needs at least that much."""
    vocab, t, b = 16384, 128, 2  # logits 2b x t x V x 4 = 33.6 MB; the LM head 32 x V x 4 = 2.1 MB
    config = _config("dpo", 0)
    with config.unlocked():
        config.model.init.vocab_size = vocab
    model = models.init("llama", seed=0, dtype=jnp.float32, **config.model.init)
    graphdef, state = nnx.split(model)
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(state))
    seq = {
        k: jax.ShapeDtypeStruct((b, t), jnp.int32)
        for k in ("input_ids", "attention_mask", "loss_mask", "positions")
    }
    batch = {f"{side}_{k}": v for side in ("chosen", "rejected") for k, v in seq.items()}
    batch["margin"] = jax.ShapeDtypeStruct((b,), jnp.float32)
    logits_bytes = 2 * b * t * vocab * 4

    def temp_bytes(chunk):
        with config.unlocked():
            config.vocab_chunk = chunk
        loss_fn, denominators = registry.get("dpo").build_loss(config, graphdef)
        step = jax.grad(lambda p, r, x: loss_fn(p, r, x, denominators(x), None)[0])
        return jax.jit(step).lower(params, params, batch).compile().memory_analysis().temp_size_in_bytes

    plain, chunked = temp_bytes(0), temp_bytes(512)
    assert plain >= logits_bytes, (plain, logits_bytes)
    assert chunked < logits_bytes / 4, (chunked, logits_bytes)
