"""Tests of jaxrlhf.generation: logit filters, the cached decode loop against full forwards,
per-row stopping, determinism, no-retrace and resharded == not resharded on 8 fake devices."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxrlhf import generation as gen
from jaxrlhf import models
from jaxrlhf import sharding as shd

V, D = 16, 16
PAD = 0


class TinyLM(nnx.Module):
    """One causal attention layer with a real KV cache, implementing the DESIGN.md contract:
    ``__call__(ids, attention_mask, positions)``, ``init_cache``, ``decode``."""

    def __init__(self, vocab=V, dim=D, *, seed=0):
        rngs = nnx.Rngs(seed)
        self.embed = nnx.Embed(vocab, dim, rngs=rngs)
        self.q = nnx.Linear(dim, dim, use_bias=False, rngs=rngs)
        self.k = nnx.Linear(dim, dim, use_bias=False, rngs=rngs)
        self.v = nnx.Linear(dim, dim, use_bias=False, rngs=rngs)
        self.o = nnx.Linear(dim, dim, use_bias=False, rngs=rngs)
        self.out = nnx.Linear(dim, vocab, rngs=rngs)
        self.dim = dim

    def _x(self, ids, positions):
        freq = 1.0 / (10.0 ** (jnp.arange(self.dim // 2) / (self.dim // 2)))
        ang = positions[..., None].astype(jnp.float32) * freq  # [B, T, D/2]
        pos = jnp.concatenate([jnp.sin(ang), jnp.cos(ang)], -1)  # [B, T, D]
        return self.embed(ids) + pos

    def _attend(self, x, k, v, mask):
        q = self.q(x)  # [B, T, D]
        s = jnp.einsum("btd,bsd->bts", q, k) / np.sqrt(self.dim)
        s = jnp.where(mask, s, -1e9)
        a = jnp.einsum("bts,bsd->btd", jax.nn.softmax(s, -1), v)
        return 3.0 * self.out(x + self.o(a))  # [B, T, V]

    def __call__(self, input_ids, attention_mask=None, positions=None):
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.int32)
        if positions is None:
            positions = gen.mask_positions(attention_mask)
        x = self._x(input_ids, positions)
        causal = jnp.tril(jnp.ones((t, t), bool))
        mask = causal[None] & (attention_mask[:, None, :] == 1)
        return self._attend(x, self.k(x), self.v(x), mask)

    def init_cache(self, batch, max_len, dtype=None):
        z = jnp.zeros((batch, max_len, self.dim), dtype or jnp.float32)
        return {"k": z, "v": z}

    def decode(self, input_ids, positions, cache, cache_mask, index):
        t = input_ids.shape[1]
        s = cache["k"].shape[1]
        x = self._x(input_ids, positions)
        k = jax.lax.dynamic_update_slice_in_dim(cache["k"], self.k(x).astype(cache["k"].dtype), index, 1)
        v = jax.lax.dynamic_update_slice_in_dim(cache["v"], self.v(x).astype(cache["v"].dtype), index, 1)
        q_slot = index + jnp.arange(t)  # [t]
        mask = (jnp.arange(s)[None, None, :] <= q_slot[None, :, None]) & (cache_mask[:, None, :] == 1)
        return self._attend(x, k, v, mask), {"k": k, "v": v}


def left_padded(lengths, width, seed=0):
    """``[B, width]`` left-padded random prompts (ids in 1..V-1) and their mask."""
    rng = np.random.default_rng(seed)
    ids = np.full((len(lengths), width), PAD, np.int32)
    mask = np.zeros((len(lengths), width), np.int32)
    for r, n in enumerate(lengths):
        ids[r, width - n :] = rng.integers(1, V, n)
        mask[r, width - n :] = 1
    return jnp.asarray(ids), jnp.asarray(mask)


def full_forward_logps(model, out, temperature):
    """Log-probs of the response tokens under one full forward of ``out.to_batch()``: ``[B, N]``."""
    batch = out.to_batch()
    logits = model(batch["input_ids"], batch["attention_mask"], batch["positions"]).astype(jnp.float32)
    p = out.prompt_ids.shape[1]
    pred = logits[:, p - 1 : -1] / temperature  # predicts response tokens [B, N, V]
    logp = jax.nn.log_softmax(pred, -1)
    tok = jnp.take_along_axis(logp, out.response_ids[..., None], -1)[..., 0]
    return tok, pred


@pytest.fixture(scope="module")
def model():
    return TinyLM()


@pytest.fixture(scope="module")
def prompts():
    return left_padded([6, 3, 1, 5], 6, seed=1)


# ----------------------------------------------------------------------------------------------
# Logit filters
# ----------------------------------------------------------------------------------------------


def test_top_k_keeps_ties_and_k():
    logits = jnp.array([[1.0, 3.0, 2.0, 2.0, 0.0], [5.0, 4.0, 3.0, 2.0, 1.0]])
    np.testing.assert_array_equal(gen.top_k_mask(logits, 2), [[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(gen.top_k_mask(logits, 1), [[0, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    assert bool(gen.top_k_mask(logits, 0).all()) and bool(gen.top_k_mask(logits, 5).all())


def test_top_p_nucleus_hand_made():
    probs = jnp.array([[0.1, 0.4, 0.2, 0.3]])
    logits = jnp.log(probs)
    # mass before each sorted token: 0.4 -> 0, 0.3 -> 0.4, 0.2 -> 0.7, 0.1 -> 0.9
    np.testing.assert_array_equal(gen.top_p_mask(logits, 0.5), [[0, 1, 0, 1]])
    np.testing.assert_array_equal(gen.top_p_mask(logits, 0.35), [[0, 1, 0, 0]])
    np.testing.assert_array_equal(gen.top_p_mask(logits, 0.95), [[1, 1, 1, 1]])
    # top_p tiny -> argmax only (always at least one token)
    np.testing.assert_array_equal(gen.top_p_mask(logits, 1e-6), [[0, 1, 0, 0]])
    # ties at the cut are all kept: probs 0.4, 0.2, 0.2, 0.2 with p = 0.5 keeps 0.4 and every 0.2
    tied = jnp.log(jnp.array([[0.2, 0.4, 0.2, 0.2]]))
    np.testing.assert_array_equal(gen.top_p_mask(tied, 0.5), [[1, 1, 1, 1]])
    np.testing.assert_array_equal(gen.top_p_mask(tied, 0.3), [[0, 1, 0, 0]])


def test_process_logits_matches_hf_warpers():
    torch = pytest.importorskip("torch")
    lp = pytest.importorskip("transformers.generation.logits_process")
    logits = np.random.default_rng(0).normal(size=(6, 50)).astype(np.float32) * 2
    for temp, k, p in [(1.0, 10, 1.0), (0.7, 0, 0.8), (1.3, 20, 0.6), (1.0, 0, 0.05)]:
        scores = torch.tensor(logits) / temp
        if k:
            scores = lp.TopKLogitsWarper(k)(None, scores)
        if p < 1:
            scores = lp.TopPLogitsWarper(p)(None, scores)
        _, filtered = gen.process_logits(jnp.asarray(logits), temperature=temp, top_k=k, top_p=p)
        np.testing.assert_array_equal(np.isfinite(np.asarray(filtered)), np.isfinite(scores.numpy()))


def test_sample_step_distribution_and_logprobs():
    logits = jnp.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    cfg = gen.SamplingConfig(max_new_tokens=1, pad_id=0, temperature=0.8, top_k=4, top_p=0.9)
    n = 20000
    keys = jax.random.split(jax.random.key(0), n)
    tok, logp, mlogp = jax.jit(lambda k: gen.sample_step(jnp.tile(logits, (n, 1)), k, cfg))(keys)
    tempered = logits / 0.8
    keep = np.asarray(gen.top_p_mask(jnp.where(gen.top_k_mask(tempered, 4), tempered, -jnp.inf), 0.9))
    want = np.where(keep, np.exp(tempered - jax.nn.logsumexp(jnp.where(keep, tempered, -jnp.inf))), 0.0)
    freq = np.bincount(np.asarray(tok), minlength=6) / n
    np.testing.assert_allclose(freq, want, atol=0.015)
    assert np.all(freq[~keep] == 0)
    np.testing.assert_allclose(logp, jax.nn.log_softmax(tempered)[tok], rtol=1e-6)
    np.testing.assert_allclose(mlogp, jax.nn.log_softmax(logits)[tok], rtol=1e-6)


def test_config_validation():
    with pytest.raises(ValueError, match="temperature"):
        gen.SamplingConfig(max_new_tokens=2, pad_id=0, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        gen.SamplingConfig(max_new_tokens=2, pad_id=0, top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        gen.SamplingConfig(max_new_tokens=0, pad_id=0)
    with pytest.raises(ValueError, match="pad_id"):
        gen.SamplingConfig(max_new_tokens=2, pad_id=None)


def test_output_to_batch_hand_made():
    """Prompt [_, _, 5, 6] / [7, 8, 9, 4] and responses [3, EOS=2, pad] / [3, 3, 3] (truncated)."""
    out = gen.GenerationOutput(
        prompt_ids=jnp.array([[0, 0, 5, 6], [7, 8, 9, 4]]),
        prompt_mask=jnp.array([[0, 0, 1, 1], [1, 1, 1, 1]]),
        response_ids=jnp.array([[3, 2, 0], [3, 3, 3]]),
        response_mask=jnp.array([[1, 1, 0], [1, 1, 1]]),
        logprobs=jnp.array([[-1.0, -2.0, 0.0], [-1.0, -1.0, -1.0]]),
        model_logprobs=jnp.zeros((2, 3)),
        truncated=jnp.array([False, True]),
    )
    b = out.to_batch()
    np.testing.assert_array_equal(b["input_ids"], [[0, 0, 5, 6, 3, 2, 0], [7, 8, 9, 4, 3, 3, 3]])
    np.testing.assert_array_equal(b["attention_mask"], [[0, 0, 1, 1, 1, 1, 0], [1] * 7])
    np.testing.assert_array_equal(b["positions"], [[0, 0, 0, 1, 2, 3, 0], [0, 1, 2, 3, 4, 5, 6]])
    np.testing.assert_array_equal(b["loss_mask"], [[0, 0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 1, 1, 1]])
    np.testing.assert_array_equal(out.shifted(out.logprobs), [[0, 0, 0, -1, -2, 0], [0, 0, 0, -1, -1, -1]])
    np.testing.assert_array_equal(out.response_lengths, [2, 3])
    np.testing.assert_array_equal(out.stopped, [True, False])


# ----------------------------------------------------------------------------------------------
# Decode loop against the full forward
# ----------------------------------------------------------------------------------------------


def test_fake_model_cache_matches_full_forward(model, prompts):
    """Sanity of the test model itself: prefill + one decode step == full forward."""
    ids, mask = prompts
    full = model(ids, mask)
    cache = model.init_cache(4, 7)
    cmask = jnp.concatenate([mask, jnp.zeros((4, 1), jnp.int32)], 1)
    lp, cache = model.decode(ids, gen.mask_positions(mask), cache, cmask, 0)
    np.testing.assert_allclose(lp * mask[..., None], full * mask[..., None], atol=1e-5)


def test_greedy_equals_argmax_of_full_forward(model, prompts):
    ids, mask = prompts
    graphdef, params = nnx.split(model)
    out = jax.jit(gen.generate, static_argnames=("max_new_tokens", "pad_id", "greedy"))(
        graphdef, params, ids, mask, jax.random.key(0), max_new_tokens=7, pad_id=PAD, greedy=True
    )
    assert out.response_ids.shape == (4, 7)
    assert bool(out.response_mask.all()) and bool(out.truncated.all())
    _, pred = full_forward_logps(model, out, 1.0)
    np.testing.assert_array_equal(out.response_ids, jnp.argmax(pred, -1))
    want, _ = full_forward_logps(model, out, 1.0)
    np.testing.assert_allclose(out.logprobs, want, atol=1e-5)


@pytest.mark.parametrize("temp,top_k,top_p", [(0.7, 5, 0.9), (1.0, 0, 1.0)])
def test_sampled_logprobs_equal_full_forward(model, temp, top_k, top_p):
    """The basis of PPO's ratio == 1 check: rows with different left padding."""
    ids, mask = left_padded([5, 2, 4, 1, 3, 5], 5, seed=3)
    graphdef, params = nnx.split(model)
    sampler = gen.make_sampler(
        graphdef, max_new_tokens=6, pad_id=PAD, temperature=temp, top_k=top_k, top_p=top_p
    )
    out = sampler(params, ids, mask, jax.random.key(7))
    want, _ = full_forward_logps(model, out, temp)
    m = out.response_mask
    np.testing.assert_allclose(out.logprobs * m, want * m, atol=2e-5)
    want1, _ = full_forward_logps(model, out, 1.0)
    np.testing.assert_allclose(out.model_logprobs * m, want1 * m, atol=2e-5)
    # the shifted frame lines up with losses.shifted_logprobs(logits, input_ids, loss_mask)
    batch = out.to_batch()
    shifted = out.shifted(out.logprobs)
    assert shifted.shape == (6, 5 + 6 - 1)
    np.testing.assert_array_equal(out.shifted(m), batch["loss_mask"][:, 1:])
    np.testing.assert_array_equal(
        batch["positions"][:, 5:] * m, (mask.sum(-1, keepdims=True) + jnp.arange(6)) * m
    )


def test_eos_stop_per_row_and_truncation(model, prompts):
    ids, mask = prompts
    graphdef, params = nnx.split(model)
    key = jax.random.key(3)
    for greedy in (True, False):
        free = gen.make_sampler(graphdef, max_new_tokens=8, pad_id=PAD, greedy=greedy)(params, ids, mask, key)
        toks = np.asarray(free.response_ids)
        eos = int(toks[0, 2])  # a token that row 0 emits at step 2 (maybe earlier too)
        out = gen.make_sampler(graphdef, max_new_tokens=8, pad_id=PAD, eos_ids=(eos, 99), greedy=greedy)(
            params, ids, mask, key
        )
        for r in range(4):
            hits = np.flatnonzero(toks[r] == eos)
            n = hits[0] + 1 if len(hits) else 8
            # prefix identical to the free run (same per-step keys), EOS kept with mask 1, pad after
            np.testing.assert_array_equal(out.response_ids[r, :n], toks[r, :n])
            np.testing.assert_array_equal(out.response_ids[r, n:], PAD)
            np.testing.assert_array_equal(out.response_mask[r], np.arange(8) < n)
            np.testing.assert_allclose(out.logprobs[r, :n], free.logprobs[r, :n], atol=1e-6)
            np.testing.assert_array_equal(out.logprobs[r, n:], 0.0)
            assert bool(out.truncated[r]) == (len(hits) == 0), (r, hits)
            assert int(out.response_lengths[r]) == n
        assert int(out.response_lengths[0]) <= 3


def test_empty_prompt_row_gets_empty_response(model):
    ids, mask = left_padded([3, 0, 2], 3, seed=2)
    graphdef, params = nnx.split(model)
    out = gen.make_sampler(graphdef, max_new_tokens=3, pad_id=PAD)(params, ids, mask, jax.random.key(0))
    np.testing.assert_array_equal(out.response_mask.sum(-1), [3, 0, 3])
    np.testing.assert_array_equal(out.response_ids[1], PAD)
    np.testing.assert_array_equal(out.truncated, [True, False, True])
    assert bool(jnp.isfinite(out.logprobs).all())


def test_all_rows_stop_early_and_deterministic(model, prompts):
    ids, mask = prompts
    graphdef, params = nnx.split(model)
    eos_all = tuple(range(V))  # every token is a stop id: one token per row, loop exits at once
    s = gen.make_sampler(graphdef, max_new_tokens=5, pad_id=PAD, eos_ids=eos_all, top_k=3)
    out = s(params, ids, mask, jax.random.key(0))
    np.testing.assert_array_equal(out.response_mask, np.eye(5, dtype=np.int32)[[0] * 4])
    assert not bool(out.truncated.any())
    s2 = gen.make_sampler(graphdef, max_new_tokens=5, pad_id=PAD)
    a = s2(params, ids, mask, jax.random.key(11))
    b = s2(params, ids, mask, jax.random.key(11))
    c = s2(params, ids, mask, jax.random.key(12))
    chex.assert_trees_all_equal(a, b)
    assert not np.array_equal(a.response_ids, c.response_ids)


def test_row_ids_make_samples_batch_invariant(model):
    """Seeding rows by id: two half batches (any order) give the full batch's samples."""
    ids, mask = left_padded([5, 2, 4, 1, 3, 5], 5, seed=8)
    graphdef, params = nnx.split(model)
    s = gen.make_sampler(graphdef, max_new_tokens=6, pad_id=PAD, eos_ids=(2,), temperature=1.2)
    key = jax.random.key(9)
    full = s(params, ids, mask, key)
    order = np.array([4, 0, 5])
    part = s(params, ids[order], mask[order], key, jnp.asarray(order))
    np.testing.assert_array_equal(part.response_ids, full.response_ids[order])
    np.testing.assert_allclose(part.logprobs, full.logprobs[order], atol=1e-5)
    other = s(params, ids[order], mask[order], key)  # seeded by position 0..2 instead
    assert not np.array_equal(other.response_ids, full.response_ids[order])


def test_sampler_traces_once(model, prompts):
    ids, mask = prompts
    graphdef, params = nnx.split(model)
    s = gen.make_sampler(model, max_new_tokens=4, pad_id=PAD, eos_ids=(1,), top_p=0.8)
    params2 = jax.tree.map(lambda x: x * 1.01, params)
    for i, p in enumerate([params, params2, params, params2]):
        s(p, ids, mask, jax.random.key(i))
    assert s.traces == 1
    # a pure `generate` under jit with chex's trace counter
    f = jax.jit(
        chex.assert_max_traces(gen.generate, n=1), static_argnames=("max_new_tokens", "pad_id", "eos_ids")
    )
    for i in range(3):
        f(graphdef, params, ids, mask, jax.random.key(i), max_new_tokens=3, pad_id=PAD, eos_ids=(2,))


def test_split_prefill_decode_equals_fused(model, prompts):
    ids, mask = prompts
    graphdef, params = nnx.split(model)
    s = gen.make_sampler(graphdef, max_new_tokens=5, pad_id=PAD, eos_ids=(3,), temperature=0.9)
    fused = s(params, ids, mask, jax.random.key(5))
    split, stats = s.timed(params, ids, mask, jax.random.key(5))
    chex.assert_trees_all_close(fused, split, atol=1e-6)
    assert stats["prefill_tokens"] == int(mask.sum()) and stats["decode_tokens"] == int(
        fused.response_mask.sum()
    )


# ----------------------------------------------------------------------------------------------
# Generation layout on 8 fake devices
# ----------------------------------------------------------------------------------------------

RULES = [
    ("embed/embedding", P("tensor", "fsdp")),
    ("(q|k|v)/kernel", P("fsdp", "tensor")),
    ("o/kernel", P("tensor", "fsdp")),
    ("out/kernel", P("fsdp", "tensor")),
    ("bias", P("tensor")),
]


def test_generation_shardings_drop_fsdp():
    mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    s = {"a": jax.sharding.NamedSharding(mesh, P(("data", "fsdp"), "tensor")), "b": shd.replicated(mesh)}
    g = gen.generation_shardings(s)
    assert g["a"].spec == P("data", "tensor") and g["b"].spec == P()


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (fake) devices")
def test_resharded_equals_not_resharded_on_8_devices(model):
    ids, mask = left_padded([4, 2, 3, 1, 4, 4, 2, 3], 4, seed=5)
    graphdef, params = nnx.split(model)
    kw = dict(max_new_tokens=5, pad_id=PAD, eos_ids=(4,), temperature=0.8, top_k=6)
    ref = gen.make_sampler(graphdef, **kw)(params, ids, mask, jax.random.key(2))

    mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    train_sh = shd.named_shardings(mesh, RULES, params)
    gen_sh = gen.generation_shardings(train_sh)
    sharded = jax.device_put(params, train_sh)
    assert sharded["q"]["kernel"].sharding.spec == P("fsdp", "tensor")
    outs = []
    for g in (None, gen_sh):
        s = gen.make_sampler(graphdef, mesh=mesh, param_shardings=train_sh, gen_param_shardings=g, **kw)
        out = s(sharded, ids, mask, jax.random.key(2))
        assert out.response_ids.sharding.spec[0] == ("data", "fsdp")
        outs.append(out)
    # the layout moved out of the decode loop; the tokens do not move
    for out in outs:
        np.testing.assert_array_equal(out.response_ids, ref.response_ids)
        np.testing.assert_array_equal(out.response_mask, ref.response_mask)
        np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-5)
    # explicit device_put into the generation layout, outside jit, gives the same
    moved = gen.reshard(sharded, gen_sh)
    assert moved["q"]["kernel"].sharding.spec == P(None, "tensor")
    out = gen.make_sampler(graphdef, mesh=mesh, **kw)(moved, ids, mask, jax.random.key(2))
    np.testing.assert_array_equal(out.response_ids, ref.response_ids)


# ----------------------------------------------------------------------------------------------
# The real decoder (jaxrlhf.models) and the CLI
# ----------------------------------------------------------------------------------------------

TOKENIZERS = "tests/fixtures/tokenizers"


@pytest.fixture(scope="module")
def llama():
    return models.init("llama", seed=3, vocab_size=64)


def test_llama_sampled_logprobs_equal_full_forward(llama):
    """Sampling log-probs of the real KV-cached decoder == a full forward of the generated batch,
    rows with different left padding (PPO's ratio == 1 at the first minibatch)."""
    rng = np.random.default_rng(4)
    lengths = [7, 2, 5, 1]
    ids = np.zeros((4, 7), np.int32)
    mask = np.zeros((4, 7), np.int32)
    for r, n in enumerate(lengths):
        ids[r, 7 - n :] = rng.integers(1, 64, n)
        mask[r, 7 - n :] = 1
    graphdef, params = nnx.split(llama)
    temp = 0.7
    s = gen.make_sampler(graphdef, max_new_tokens=6, pad_id=0, eos_ids=(5,), temperature=temp, top_k=40)
    out = s(params, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(1))
    batch = out.to_batch()
    logits = llama(batch["input_ids"], batch["attention_mask"], batch["positions"]).astype(jnp.float32)
    pred = logits[:, 6:-1]  # predicts the 6 response tokens
    tok = out.response_ids[..., None]
    want = jnp.take_along_axis(jax.nn.log_softmax(pred / temp, -1), tok, -1)[..., 0]
    want1 = jnp.take_along_axis(jax.nn.log_softmax(pred, -1), tok, -1)[..., 0]
    m = out.response_mask
    np.testing.assert_allclose(out.logprobs * m, want * m, atol=1e-4)
    np.testing.assert_allclose(out.model_logprobs * m, want1 * m, atol=1e-4)
    ratio = jnp.exp((want - out.logprobs) * m)
    np.testing.assert_allclose(ratio, 1.0, atol=1e-4)


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (fake) devices")
def test_llama_generation_layout_equal(llama):
    ids, mask = left_padded([4, 2, 3, 1, 4, 4, 2, 3], 4, seed=6)
    graphdef, params = nnx.split(llama)
    kw = dict(max_new_tokens=4, pad_id=0, greedy=True)
    ref = gen.make_sampler(graphdef, **kw)(params, ids, mask, jax.random.key(0))
    mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    train_sh = shd.named_shardings(mesh, models.partition_rules(llama.config), params)
    s = gen.make_sampler(
        graphdef,
        mesh=mesh,
        param_shardings=train_sh,
        gen_param_shardings=gen.generation_shardings(train_sh),
        **kw,
    )
    out = s(jax.device_put(params, train_sh), ids, mask, jax.random.key(0))
    np.testing.assert_array_equal(out.response_ids, ref.response_ids)
    np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-4)


def test_cli_generate(tmp_path, capsys):
    pytest.importorskip("transformers")
    import json

    from jaxrlhf import generate as cli

    tok_dir = f"{TOKENIZERS}/char_chat"
    model = models.init("llama", seed=0, vocab_size=101, eos_token_id=3, pad_token_id=1)
    models.save_pretrained(model, str(tmp_path / "model"))
    prompts = tmp_path / "prompts.jsonl"
    rows = [
        {"prompt": "hello", "id": 0},
        {"prompt": "a longer prompt here", "id": 1},
        {"prompt": [{"role": "user", "content": "hi"}], "id": 2},
        {"prompt": "x", "id": 3},
        {"prompt": "bye now", "id": 4},
    ]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [
        f"--model={tmp_path / 'model'}",
        f"--tokenizer={tok_dir}",
        f"--prompts={prompts}",
        "--max_new_tokens=6",
        "--batch_size=2",
        "--temperature=0.9",
        "--top_k=20",
        "--top_p=0.95",
        "--stop_ids=40,41",
    ]
    s1 = cli.main(args + [f"--out={tmp_path / 'a.jsonl'}"])
    s3 = cli.main(
        [a for a in args if not a.startswith("--batch_size")]
        + ["--batch_size=4", "--mesh=data=2,fsdp=2,tensor=2", "--gen_layout"]
        + [f"--out={tmp_path / 'c.jsonl'}", f"--stats={tmp_path / 'stats.json'}"]
    )
    a = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [r["id"] for r in a] == [0, 1, 2, 3, 4] and a[2]["prompt"] == rows[2]["prompt"]
    # rows seeded by line number: another batch size, sharded with the generation layout, same text
    c = [json.loads(x) for x in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert [r["completion"] for r in c] == [r["completion"] for r in a]
    np.testing.assert_allclose([r["logprob"] for r in c], [r["logprob"] for r in a], rtol=1e-4)
    assert s3["batches"] == 2 and s3["devices"] == len(jax.devices())
    for r in a:
        assert 1 <= r["completion_tokens"] <= 6 and isinstance(r["completion"], str)
        assert r["finish_reason"] in ("stop", "length") and r["logprob"] <= 0
        if r["finish_reason"] == "length":
            assert r["completion_tokens"] == 6
    assert s1["prompts"] == 5 and s1["batches"] == 3
    assert s1["decode_tokens"] == sum(r["completion_tokens"] for r in a)
    assert s1["prefill_tok_s"] > 0 and s1["decode_tok_s"] > 0
    assert json.loads((tmp_path / "stats.json").read_text()) == s3
    assert '"decode_tok_s"' in capsys.readouterr().out


def test_prefill_never_builds_prompt_logits():
    """Only the last prompt slot's logits exist after compilation ([B, V], never [B, P, V])."""
    graphdef, params = nnx.split(models.init("llama", vocab_size=1000, num_layers=1))
    s = gen.make_sampler(graphdef, max_new_tokens=2, pad_id=0)
    ids = jnp.ones((8, 64), jnp.int32)
    hlo = s._prefill.lower(params, ids, ids).compile().as_text()
    assert "f32[8,1000]" in hlo
    for shape in ("[8,64,1000]", "[8,63,1000]", "[512,1000]", "[504,1000]"):
        assert shape not in hlo, shape
