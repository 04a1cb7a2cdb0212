"""jaxrlhf.models: HF parity on tiny fixtures, padding/packing invariance, KV cache, load/save, errors.

Fixtures (tests/fixtures/hf/<name>/) come from tests/fixtures/make_hf_fixtures.py: tiny random
transformers models with their float32 outputs; these tests never need torch.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from jaxrlhf import models as M
from jaxrlhf import sharding as shd
from jaxrlhf.models.hf_io import _PREFIX

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
CAUSAL = ["llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox"]
SCALAR = ["llama_cls", "qwen2_cls", "gpt2_cls", "gpt_neox_cls"]

_CACHE: dict[str, M.Transformer] = {}


def load(name: str) -> M.Transformer:
    if name not in _CACHE:
        _CACHE[name] = M.from_pretrained(os.path.join(FIX, name), head="scalar" if name in SCALAR else None)
    return _CACHE[name]


_FWD: dict[int, object] = {}


def run(model: M.Transformer, ids, mask=None, segment_ids=None) -> np.ndarray:
    """Jitted full forward (one trace per model and shape; eager op-by-op is slow on CPU)."""
    key = id(model)
    if key not in _FWD:
        graphdef, params = nnx.split(model)
        f = jax.jit(lambda p, i, m, s: nnx.merge(graphdef, p)(i, m, segment_ids=s))
        _FWD[key] = (model, lambda i, m, s: f(params, i, m, s))
    return np.asarray(
        _FWD[key][1](
            jnp.asarray(ids),
            None if mask is None else jnp.asarray(mask),
            None if segment_ids is None else jnp.asarray(segment_ids),
        )
    )


def jit_init(*args, **kw) -> M.Transformer:
    """``M.init`` with the random initialisation jitted (one compile instead of one per op)."""
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: M.init(*args, **kw)))
    return nnx.merge(graphdef, jax.jit(lambda: nnx.split(M.init(*args, **kw))[1])())


def expected(name: str) -> dict[str, np.ndarray]:
    return dict(np.load(os.path.join(FIX, name, "expected.npz")))


# ------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("name", CAUSAL + SCALAR)
def test_hf_parity(name):
    model, exp = load(name), expected(name)
    out = run(model, exp["input_ids"])
    if name in SCALAR:
        assert out.shape == exp["scores"].shape and out.dtype == np.float32
        np.testing.assert_allclose(out, exp["scores"], atol=1e-4, rtol=0)
        np.testing.assert_allclose(out[:, -1], exp["pooled"], atol=1e-4, rtol=0)
    else:
        assert out.shape == exp["logits"].shape
        np.testing.assert_allclose(out, exp["logits"], atol=1e-4, rtol=0)


def test_families_exercise_their_features():
    cfgs = {n: load(n).config for n in CAUSAL + SCALAR}
    assert cfgs["llama"].rope_type == "llama3" and cfgs["llama"].num_kv_heads < cfgs["llama"].num_heads
    assert cfgs["mistral"].sliding_window == 4
    assert cfgs["qwen2"].qkv_bias and cfgs["qwen3"].qk_norm and cfgs["qwen3"].tie_word_embeddings
    assert cfgs["qwen3"].head_dim * cfgs["qwen3"].num_heads != cfgs["qwen3"].hidden_size
    assert cfgs["gpt2"].position == "learned" and cfgs["gpt2"].activation == "gelu_new"
    assert cfgs["gpt_neox"].parallel_residual and cfgs["gpt_neox"].rotary_dim < cfgs["gpt_neox"].head_dim
    assert not cfgs["gpt_neox_cls"].parallel_residual
    # the llama fixture is a sharded checkpoint with an index
    assert os.path.exists(os.path.join(FIX, "llama", "model.safetensors.index.json"))


@pytest.mark.parametrize("name", CAUSAL + SCALAR)
def test_config_hf_round_trip(name):
    cfg = load(name).config
    assert M.ModelConfig.from_hf(cfg.to_hf(), head=cfg.head) == cfg


# ------------------------------------------------------------------------ padding and packing
@pytest.mark.parametrize("name", ["llama", "gpt2", "gpt_neox", "qwen2_cls"])
def test_left_right_padding_invariance(name):
    model, ids = load(name), expected(name)["input_ids"]
    ref = run(model, ids)
    b, t = ids.shape
    pad = np.full((b, 3), 7, np.int32)  # pad id is arbitrary: only the mask counts
    for left in (True, False):
        pids = np.concatenate([pad, ids] if left else [ids, pad], axis=1)
        mask = np.concatenate(
            [np.zeros_like(pad), np.ones_like(ids)] if left else [np.ones_like(ids), 0 * pad], 1
        )
        out = run(model, pids, mask)
        real = out[:, 3:] if left else out[:, :t]
        np.testing.assert_allclose(real, ref, atol=1e-5, rtol=0, err_msg=f"left={left}")
        assert np.all(np.isfinite(out))


@pytest.mark.parametrize("name", ["mistral", "gpt2"])
def test_packed_segments_do_not_attend_across(name):
    model, ids = load(name), expected(name)["input_ids"]
    a, b_ = ids[0, :4], ids[1, :5]
    packed = np.concatenate([a, b_, [9]])[None].astype(np.int32)
    seg = np.array([[1] * 4 + [2] * 5 + [0]], np.int32)
    out = run(model, packed, segment_ids=seg)
    out_a, out_b = run(model, a[None]), run(model, b_[None])
    np.testing.assert_allclose(out[0, :4], out_a[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(out[0, 4:9], out_b[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("t,window", [(200, None), (150, 40), (64, None)])
def test_chunked_causal_attention_equals_full(t, window):
    """``attend`` (its FlashAttention-style backward; ``causal=True``: query chunks against their key
    prefix) == one plain masked softmax, values and gradients, with GQA, left padding, a sliding
    window and packed segments."""
    from jaxrlhf.models.modeling import attend, attention_chunks, window_mask

    chunks = attention_chunks(t)
    assert chunks[0][0] == 0 and chunks[-1][1] == t and len(chunks) == max(1, min(8, t // 64))
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:], strict=False))
    r = np.random.default_rng(t)
    b, h, k, d = 3, 4, 2, 8
    q = jnp.asarray(r.normal(size=(b, t, h, d)), jnp.float32)
    kv = [jnp.asarray(r.normal(size=(b, t, k, d)), jnp.float32) for _ in range(2)]
    key_ok = np.ones((b, t), bool)
    key_ok[1, :17] = False  # left padding
    seg = np.ones((b, t), np.int32)
    seg[2, t // 3 :] = 2  # two packed segments
    allowed = key_ok[:, None, :] & (seg[:, :, None] == seg[:, None, :])
    allowed = jnp.asarray(allowed) & window_mask(jnp.arange(t), jnp.arange(t), window)[None]

    def f(causal):
        return lambda q, kk, vv: attend(q, kk, vv, allowed, causal=causal)

    def naive(q, kk, vv):  # one plain jax.nn.softmax over [B, T, H, S], autodiff backward
        kk, vv = jnp.repeat(kk, h // k, axis=2), jnp.repeat(vv, h // k, axis=2)
        sc = jnp.einsum("bthd,bshd->bhts", q, kk) / np.sqrt(d)
        p = jax.nn.softmax(jnp.where(allowed[:, None], sc, -1e30), axis=-1)
        return jnp.einsum("bhts,bshd->bthd", p, vv)

    real = np.asarray(key_ok)[:, :, None, None]  # fully masked (padding) query rows may differ
    w = jnp.asarray(r.normal(size=q.shape), jnp.float32) * jnp.asarray(real, jnp.float32)

    def loss(fn):
        return jax.grad(lambda *a: jnp.sum(fn(*a) * w), argnums=(0, 1, 2))

    ref, ref_grads = naive(q, *kv), loss(naive)(q, *kv)
    for fn in (f(False), f(True)):
        np.testing.assert_allclose(np.where(real, fn(q, *kv), 0), np.where(real, ref, 0), atol=2e-6, rtol=0)
        for g1, g2 in zip(loss(fn)(q, *kv), ref_grads, strict=True):
            np.testing.assert_allclose(g1, g2, atol=2e-5, rtol=0)


# -------------------------------------------------------------------------------------- KV cache
@pytest.mark.parametrize("name", ["mistral", "gpt2", "gpt_neox", "qwen3", "llama_cls"])
def test_kv_cache_matches_full_forward(name):
    """Prefill of a left-padded prompt + 4 single-token steps (jitted, traced index) == full forward."""
    model, ids = load(name), expected(name)["input_ids"]
    graphdef, params = nnx.split(model)
    b, p, n = 2, 6, 4
    prompt = ids[:, :p].copy()
    pmask = np.ones((b, p), np.int32)
    pmask[0, :2] = 0  # row 0 is left-padded by 2
    prompt[0, :2] = 5
    new = ids[:, p : p + n]
    full_ids = np.concatenate([prompt, new], 1)
    full_mask = np.concatenate([pmask, np.ones((b, n), np.int32)], 1)
    full = np.asarray(jax.jit(lambda pr, x, m: nnx.merge(graphdef, pr)(x, m))(params, full_ids, full_mask))

    @jax.jit
    def step(pr, x, pos, cache, cmask, index):
        return nnx.merge(graphdef, pr).decode(x, pos, cache, cmask, index)

    s = p + n
    cache = model.init_cache(b, s)
    assert cache[0]["k"].shape == (b, s, model.config.num_kv_heads, model.config.head_dim)
    cmask = np.concatenate([pmask, np.zeros((b, n), np.int32)], 1)
    pos = np.maximum(np.cumsum(pmask, 1) - 1, 0)
    out, cache = step(params, prompt, pos, cache, cmask, jnp.int32(0))  # prefill
    real = pmask.astype(bool)
    np.testing.assert_allclose(np.asarray(out)[real], full[:, :p][real], atol=1e-5, rtol=0)
    npos = pmask.sum(1)
    for i in range(n):
        cmask[:, p + i] = 1
        out, cache = step(params, new[:, i : i + 1], (npos + i)[:, None], cache, cmask, jnp.int32(p + i))
        np.testing.assert_allclose(
            np.asarray(out)[:, 0], full[:, p + i], atol=1e-5, rtol=0, err_msg=f"step {i}"
        )
    assert step._cache_size() == 2  # prefill + one step shape; the index is traced


def test_kv_cache_multi_token_chunks():
    """Slots [index, index + t) with t > 1 after the prefill (speculative/chunked decoding)."""
    model, ids = load("gpt2"), expected("gpt2")["input_ids"]
    full = run(model, ids)
    cache, cmask = model.init_cache(2, 10), np.zeros((2, 10), np.int32)
    pos = np.broadcast_to(np.arange(10), (2, 10))
    outs = []
    for lo, hi in ((0, 4), (4, 7), (7, 10)):
        cmask[:, lo:hi] = 1
        out, cache = model.decode(ids[:, lo:hi], pos[:, lo:hi], cache, cmask, lo)
        outs.append(np.asarray(out))
    np.testing.assert_allclose(np.concatenate(outs, 1), full, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------- init / jit / remat
def test_init_families_and_heads():
    ids = jnp.asarray(np.arange(12).reshape(2, 6) % 50, jnp.int32)
    for fam in M.FAMILIES:  # shapes only (traced, not compiled): parity tests run every family
        lm_out = jax.eval_shape(lambda fam=fam: M.init(fam, num_layers=1)(ids))
        rm_out = jax.eval_shape(lambda fam=fam: M.init(fam, head="scalar", num_layers=1)(ids))
        assert lm_out.shape == (2, 6, 256) and rm_out.shape == (2, 6) and rm_out.dtype == jnp.float32
        rm = nnx.eval_shape(lambda fam=fam: M.init(fam, head="scalar", num_layers=1))
        names = {shd.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(nnx.state(rm))[0]}
        assert "score/kernel" in names and "layers/0/attn/q_proj/kernel" in names
        assert all(isinstance(v, nnx.Param) for _, v in nnx.to_flat_state(nnx.state(rm)))
    model = jit_init("qwen3", seed=0, head="scalar", num_layers=1)
    out = run(model, ids)
    assert np.all(np.isfinite(out)) and out.std() > 0
    k = np.asarray(model.score.kernel.value)
    assert 0.5 / np.sqrt(65) < k.std() < 2 / np.sqrt(65)
    with pytest.raises(ValueError, match="supported"):
        M.init("bert")


def test_remat_and_bf16_compute_and_grads_under_jit():
    ids = jnp.asarray(np.arange(16).reshape(2, 8) % 100, jnp.int32)
    path = os.path.join(FIX, "llama")
    m, mr = load("llama"), M.from_pretrained(path, remat=True)
    mb = M.from_pretrained(path, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    assert mr.config.remat and mb.config.dtype == "bfloat16"

    def loss_fn(graphdef):
        def f(params):
            return jnp.mean(nnx.merge(graphdef, params)(ids) ** 2)

        return jax.jit(jax.value_and_grad(f))

    g1, p1 = nnx.split(m)
    g2, p2 = nnx.split(mr)
    (l1, gr1), (l2, gr2) = loss_fn(g1)(p1), loss_fn(g2)(p2)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(gr1), jax.tree.leaves(gr2), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    out_b = run(mb, ids)
    assert out_b.dtype == np.float32 and mb.embed.value.dtype == jnp.float32
    np.testing.assert_allclose(out_b, run(m, ids), atol=0.1)


def test_count_params_and_flops():
    model = load("llama")
    n_hf = sum(
        v.size
        for f in os.listdir(os.path.join(FIX, "llama"))
        if f.endswith(".safetensors")
        for v in load_file(os.path.join(FIX, "llama", f)).values()
    )
    assert M.count_params(model) == M.count_params(nnx.state(model)) == n_hf
    c = model.config
    e, f, v, layers = c.hidden_size, c.intermediate_size, c.vocab_size, c.num_layers
    n = layers * (e * 32 + 2 * e * 16 + 32 * e + 3 * e * f) + e * v  # H*D=32, K*D=16
    assert M.flops_per_token(c, 100) == 6 * n + 6 * layers * 100 * 32
    assert M.flops_per_token(c, 100) < 6 * M.count_params(model) + 6 * layers * 100 * 32


# -------------------------------------------------------------------------------- save / load
def test_save_sharded_then_load_round_trip(tmp_path):
    for name in ("gpt_neox", "qwen3", "gpt2_cls"):
        model, ids = load(name), expected(name)["input_ids"]
        out_dir = tmp_path / name
        files = M.save_pretrained(model, str(out_dir), max_shard_size="20KB")
        assert len(files) > 1 and (out_dir / "model.safetensors.index.json").exists()
        idx = json.loads((out_dir / "model.safetensors.index.json").read_text())
        assert set(idx["weight_map"].values()) == set(files)
        back = M.from_pretrained(str(out_dir), head=model.config.head)
        assert back.config == model.config
        np.testing.assert_array_equal(run(back, ids), run(model, ids))
    one = M.save_pretrained(load("llama"), str(tmp_path / "single"))
    assert one == ["model.safetensors"]
    hf_cfg = json.loads((tmp_path / "single" / "config.json").read_text())
    assert hf_cfg["architectures"] == ["LlamaForCausalLM"] and hf_cfg["model_type"] == "llama"


def test_sharded_loading_places_each_param_by_rules(tmp_path):
    mesh = shd.make_mesh({"fsdp": 4, "tensor": 2})
    for name in ("llama", "gpt_neox_cls"):
        cfg = load(name).config
        rules = M.partition_rules(cfg)
        model = M.from_pretrained(os.path.join(FIX, name), head=cfg.head, mesh=mesh, rules=rules)
        state = nnx.state(model)
        want = shd.named_shardings(mesh, rules, state)
        n_split = 0
        for (path, arr), sh in zip(
            jax.tree_util.tree_flatten_with_path(state)[0], jax.tree.leaves(want), strict=True
        ):
            assert arr.sharding.is_equivalent_to(sh, arr.ndim), shd.path_str(path)
            n_split += arr.addressable_shards[0].data.size < arr.size
        assert n_split > 10  # most weights really are split over the 8 devices
        ids = expected(name)["input_ids"]
        with shd.activation_mesh(mesh):  # activations pinned by logical axes inside the trace
            out = run(model, np.concatenate([ids, ids]))
        np.testing.assert_allclose(out[:2], run(load(name), ids), atol=1e-5, rtol=0)
        M.save_pretrained(model, str(tmp_path / name))  # gathers the sharded params
        back = M.from_pretrained(str(tmp_path / name), head=cfg.head)
        np.testing.assert_array_equal(run(back, ids), run(load(name), ids))


def test_scalar_head_from_causal_lm_checkpoint_is_fresh():
    model = M.from_pretrained(os.path.join(FIX, "llama"), head="scalar", seed=3)
    k = np.asarray(model.score.kernel.value)
    assert k.shape == (32, 1) and model.lm_head is None
    assert 0.5 / np.sqrt(33) < k.std() < 2.0 / np.sqrt(33)
    # the trunk is the checkpoint's: same hidden states as the LM
    lm = load("llama")
    ids = expected("llama")["input_ids"]
    assert run(model, ids).shape == ids.shape
    np.testing.assert_array_equal(
        model.layers[0].attn.q_proj.kernel.value, lm.layers[0].attn.q_proj.kernel.value
    )


# ------------------------------------------------------------------------------------ errors
def _copy(name, tmp_path):
    dst = tmp_path / name
    shutil.copytree(os.path.join(FIX, name), dst)
    return dst


def test_error_pickle_refused(tmp_path):
    d = tmp_path / "pkl"
    d.mkdir()
    shutil.copy(os.path.join(FIX, "gpt2", "config.json"), d / "config.json")
    (d / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(ValueError, match="safe_serialization=True"):
        M.from_pretrained(str(d))


def test_error_missing_unexpected_and_bad_shape_named(tmp_path):
    d = _copy("qwen2", tmp_path)
    f = d / "model.safetensors"
    sd = load_file(str(f))
    del sd["model.layers.1.mlp.up_proj.weight"]
    sd["model.layers.0.self_attn.k_proj.weight"] = np.zeros((3, 32), np.float32)
    sd["model.extra.weight"] = np.zeros((2,), np.float32)
    save_file(sd, str(f), metadata={"format": "pt"})
    with pytest.raises(ValueError) as e:
        M.from_pretrained(str(d))
    msg = str(e.value)
    assert "missing tensors (1): ['model.layers.1.mlp.up_proj.weight']" in msg
    assert "unexpected tensors (1): ['model.extra.weight']" in msg
    assert (
        "wrong shape for model.layers.0.self_attn.k_proj.weight: checkpoint (3, 32), model expects (16, 32)"
        in msg
    )


def test_error_unsupported_model_type_lists_supported(tmp_path):
    d = _copy("gpt2", tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "bert"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"unsupported model_type 'bert'.*'llama'.*'gpt_neox'"):
        M.from_pretrained(str(d))


def test_error_classifier_loaded_as_lm_names_lm_head():
    with pytest.raises(ValueError, match=r"missing tensors \(1\): \['lm_head.weight'\]"):
        M.from_pretrained(os.path.join(FIX, "llama_cls"))


def test_base_model_checkpoint_without_prefix_loads(tmp_path):
    d = _copy("gpt2", tmp_path)
    f = d / "model.safetensors"
    sd = {k.removeprefix(_PREFIX["gpt2"]): v for k, v in load_file(str(f)).items()}
    sd["h.0.attn.bias"] = np.ones((1, 1, 4, 4), np.float32)  # old GPT-2 causal-mask buffer: ignored
    save_file(sd, str(f), metadata={"format": "pt"})
    ids = expected("gpt2")["input_ids"]
    np.testing.assert_allclose(run(M.from_pretrained(str(d)), ids), expected("gpt2")["logits"], atol=1e-4)


def test_unknown_path_or_offline_hub_id_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="not a local directory"):
        M.from_pretrained("no-such-org/no-such-model-xyz")


def test_non_hf_weight_files_beside_model_safetensors_are_not_read(tmp_path):
    d = _copy("gpt_neox", tmp_path)
    save_file({"tok_embeddings.weight": np.zeros((4, 4), np.float32)}, str(d / "consolidated.safetensors"))
    ids = expected("gpt_neox")["input_ids"]
    np.testing.assert_allclose(run(M.from_pretrained(str(d)), ids), expected("gpt_neox")["logits"], atol=1e-4)
