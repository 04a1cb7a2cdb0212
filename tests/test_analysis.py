"""jaxrlhf.analysis and its model support, each against an independent computation.

- hidden states (``return_hidden``) == transformers' ``output_hidden_states``; the logit lens of
  the last layer == the model's logits;
- a head mask == the output projection's input rows zeroed in numpy; all ones == no mask;
- ``divergence`` == numpy MSEs on the safetensors (``safetensors.numpy.load_file``), HF dirs
  (single file and sharded) and the orbax checkpoints of a run (written by the trainer's writer);
- ``activations`` == numpy cosine / logit-lens KL on per-example (unpadded) hidden states;
- ``heads`` == numpy NLL of the zeroed-weight model, and a greedy full-forward decode loop.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from jaxrlhf import models as M
from jaxrlhf.analysis import __main__ as cli
from jaxrlhf.analysis import activations, divergence, heads, inputs, trees
from jaxrlhf.sharding import path_str
from jaxrlhf.tasks import reviews
from jaxrlhf.tasks import tokenizer as task_tokenizer

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
TOK = task_tokenizer.tokenizer_path()


def np_init(family, seed=0, **kw) -> M.Transformer:
    """A ``family`` model with numpy-random parameters (norm scales near 1): no XLA compile."""
    abstract = nnx.eval_shape(lambda: M.init(family, **kw))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(seed)

    def fill(path, x):
        z = rng.normal(size=x.shape).astype(np.float32)
        return jnp.asarray(1.0 + 0.1 * z if path_str(path).endswith("scale") else 0.05 * z)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


def perturbed(model: M.Transformer, seed: int, scale: float = 0.05) -> M.Transformer:
    """``model`` with ``scale * normal`` numpy noise added to every parameter."""
    graphdef, params = nnx.split(model)
    rng = np.random.default_rng(seed)
    noisy = jax.tree.map(
        lambda x: jnp.asarray(np.asarray(x) + scale * rng.normal(size=x.shape).astype(x.dtype)), params
    )
    return nnx.merge(graphdef, noisy)


def with_params(model: M.Transformer, edit) -> M.Transformer:
    """A new model: ``model``'s params as a flat numpy dict (paths ``a/b/c``), ``edit``-ed in place."""
    graphdef, params = nnx.split(model)
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    flat = {path_str(p): np.array(v) for p, v in leaves}
    edit(flat)
    new = jax.tree_util.tree_map_with_path(lambda p, v: jnp.asarray(flat[path_str(p)]), params)
    return nnx.merge(graphdef, new)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def np_softmax_log(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


# ------------------------------------------------------------------------------ model support
@pytest.mark.torch
@pytest.mark.parametrize("name", ["gpt2", "gpt_neox", "qwen3"])
def test_hidden_states_match_transformers(name):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    d = os.path.join(FIX, name)
    ids = np.load(os.path.join(d, "expected.npz"))["input_ids"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = [
            h.numpy()
            for h in hf(torch.tensor(ids, dtype=torch.long), output_hidden_states=True).hidden_states
        ]
    model = M.from_pretrained(d)
    graphdef, params = nnx.split(model)
    fwd = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x, return_hidden=True))
    out, hidden = fwd(params, jnp.asarray(ids))
    n = model.config.num_layers
    assert len(hidden) == len(ref) == n + 1
    for i in range(n):  # HF's entries 0..L-1 are the residual streams before block i
        np.testing.assert_allclose(hidden[i], ref[i], atol=2e-5, rtol=0, err_msg=f"layer {i}")
    # HF's last entry is after the final norm; ours is before it
    np.testing.assert_allclose(model.final_norm(hidden[n]), ref[n], atol=2e-5, rtol=0)
    lens = jax.jit(lambda p, h: nnx.merge(graphdef, p).unembed(h))(params, hidden[n])
    np.testing.assert_array_equal(lens, out)
    np.testing.assert_allclose(out, hf(torch.tensor(ids)).logits.detach().numpy(), atol=1e-4, rtol=0)


def _zero_head_rows(layer: int, head: int, head_dim: int):
    def edit(flat):
        k = flat[f"layers/{layer}/attn/o_proj/kernel"]  # [H*D, E]: input rows of head h
        k[head * head_dim : (head + 1) * head_dim, :] = 0.0

    return edit


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama"])
def test_head_mask_equals_zeroed_o_proj_input_rows(family):
    model = np_init(family, seed=1, remat=family == "llama")
    c = model.config
    graphdef, params = nnx.split(model)
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 200, (2, 9)), jnp.int32)
    mask = jnp.asarray([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1] * 9], jnp.int32)
    fwd = jax.jit(lambda p, hm: nnx.merge(graphdef, p)(ids, mask, head_mask=hm))
    plain = jax.jit(lambda p: nnx.merge(graphdef, p)(ids, mask))
    ones = np.ones((c.num_layers, c.num_heads), np.float32)
    np.testing.assert_array_equal(fwd(params, ones), plain(params))
    for layer, head in [(0, 1), (1, 3)]:
        hm = ones.copy()
        hm[layer, head] = 0.0
        zeroed = nnx.split(with_params(model, _zero_head_rows(layer, head, c.head_dim)))[1]
        want = plain(zeroed)
        np.testing.assert_allclose(fwd(params, hm), want, atol=1e-6, rtol=0)
        np.testing.assert_allclose(
            plain(heads.ablate_params(params, hm, c.head_dim)), want, atol=1e-6, rtol=0
        )
        assert np.abs(np.asarray(want) - np.asarray(plain(params))).max() > 1e-4  # the head mattered
    # the cached decode path takes the same mask
    hm = ones.copy()
    hm[1, 0] = 0.0
    cache = model.init_cache(2, 9)
    pos = jnp.maximum(jnp.cumsum(mask, 1) - 1, 0)
    dec, _ = jax.jit(lambda p, cache: nnx.merge(graphdef, p).decode(ids, pos, cache, mask, 0, head_mask=hm))(
        params, cache
    )
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(np.asarray(dec)[real], np.asarray(fwd(params, hm))[real], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------- divergence
def test_tensor_kinds_and_layers_per_family():
    kinds = {
        "model.layers.0.input_layernorm.weight": "norm",
        "model.layers.3.self_attn.q_proj.weight": "weight",
        "model.layers.0.self_attn.q_proj.bias": "bias",  # qwen2
        "model.layers.0.self_attn.q_norm.weight": "norm",  # qwen3
        "model.norm.weight": "norm",
        "lm_head.weight": "weight",
        "transformer.h.11.ln_1.bias": "norm",
        "transformer.h.0.attn.c_attn.bias": "bias",
        "transformer.h.0.mlp.c_fc.bias": "bias",
        "transformer.wpe.weight": "weight",
        "transformer.ln_f.weight": "norm",
        "transformer.h.0.attn.bias": "buffer",
        "gpt_neox.final_layer_norm.bias": "norm",
        "gpt_neox.layers.2.attention.query_key_value.bias": "bias",
        "gpt_neox.layers.2.post_attention_layernorm.bias": "norm",
        "gpt_neox.layers.1.attention.rotary_emb.inv_freq": "buffer",
        "embed_out.weight": "weight",
        "score.weight": "weight",
    }
    for name, kind in kinds.items():
        ndim = (
            2
            if name.endswith(("proj.weight", "head.weight", "wpe.weight", "out.weight", "score.weight"))
            else 1
        )
        assert divergence.tensor_kind(name, ndim) == kind, name
    assert divergence.layer_index("transformer.h.11.ln_1.bias") == 11
    assert divergence.layer_index("gpt_neox.layers.2.attention.dense.bias") == 2
    assert divergence.layer_index("model.norm.weight") is None
    # every HF tensor of every family: a norm iff it maps to one of our norms, a bias iff to a
    # ``bias`` outside them, a weight iff rank >= 2
    for fam in M.FAMILIES:
        for head in (None, "scalar"):
            abstract = nnx.eval_shape(lambda fam=fam, head=head: M.init(fam, head=head))
            leaves = jax.tree_util.tree_flatten_with_path(nnx.state(abstract))[0]
            shapes = {path_str(p): len(v.shape) for p, v in leaves}
            for g in M.weight_groups(abstract.config):
                ours = g.ours[0]
                want = "norm" if "norm/" in ours else "bias" if ours.endswith("/bias") else "weight"
                assert divergence.tensor_kind(g.hf, shapes[ours]) == want, (fam, g.hf)
                assert (want == "weight") == (shapes[ours] >= 2)


@pytest.fixture(scope="module")
def saved_pair(tmp_path_factory):
    """A tiny GPT-2 (biases, tied embeddings) saved as the base, and a copy with known edits saved
    sharded (index file): one bias + 0.1, one weight x 2, one norm scale set to 3, one weight noised."""
    root = tmp_path_factory.mktemp("div")
    base = np_init("gpt2", seed=0, vocab_size=482)
    d = base.config.head_dim

    def edit(flat):
        flat["layers/0/attn/o_proj/bias"] += 0.1
        flat["layers/1/mlp/up_proj/kernel"] *= 2.0
        flat["layers/1/post_attn_norm/scale"][:] = 3.0
        flat["layers/0/attn/k_proj/kernel"] += np.random.default_rng(0).normal(size=(64, 4 * d)) * 0.01

    model = with_params(base, edit)
    M.save_pretrained(base, str(root / "base"))
    files = M.save_pretrained(model, str(root / "model"), max_shard_size="100KB")
    assert len(files) > 1
    return str(root / "base"), str(root / "model"), base, model


def _numpy_mse(base_dir, model_dir):
    def read(d):
        out = {}
        for f in os.listdir(d):
            if f.endswith(".safetensors"):
                out.update(load_file(os.path.join(d, f)))
        return out

    a, b = read(base_dir), read(model_dir)
    assert set(a) == set(b)
    return {k: float(np.mean((b[k].astype(np.float64) - a[k].astype(np.float64)) ** 2)) for k in a}


def test_divergence_dirs_equals_numpy_on_safetensors(saved_pair, tmp_path):
    base_dir, model_dir, base, _ = saved_pair
    want = _numpy_mse(base_dir, model_dir)
    out_json = str(tmp_path / "div.json")
    assert cli.main(["divergence", f"--base={base_dir}", "--model", model_dir, f"--out={out_json}"]) == 0
    got = read_json(out_json)
    assert set(got["tensors"]) == set(want)
    for k, v in want.items():
        assert got["tensors"][k] == pytest.approx(v, rel=1e-12, abs=0), k
    # the known edits, by hand
    assert got["tensors"]["transformer.h.0.attn.c_proj.bias"] == pytest.approx(0.01, rel=1e-5)
    w = np.asarray(base.layers[1].mlp.up_proj.kernel.value, np.float64)
    assert got["tensors"]["transformer.h.1.mlp.c_fc.weight"] == pytest.approx(np.mean(w**2), rel=1e-6)
    s = np.asarray(base.layers[1].post_attn_norm.scale.value, np.float64)
    assert got["tensors"]["transformer.h.1.ln_2.weight"] == pytest.approx(np.mean((3.0 - s) ** 2), rel=1e-6)
    assert got["tensors"]["transformer.h.0.attn.c_attn.weight"] > 0  # fused q|k|v: k part noised
    untouched = [k for k in want if k.startswith("transformer.h.1.attn.")]
    assert untouched and all(got["tensors"][k] == 0.0 for k in untouched)
    # summaries: HF GPT-2 biases are the ".bias" tensors outside the ln_* layer norms
    biases = [k for k in want if k.endswith(".bias") and ".ln_" not in k]
    norms = [k for k in want if ".ln_" in k]
    weights = [k for k in want if k not in biases and k not in norms]
    assert got["biases_mean"] == pytest.approx(np.mean([want[k] for k in biases]), rel=1e-12)
    assert got["weights_mean"] == pytest.approx(np.mean([want[k] for k in weights]), rel=1e-12)
    assert got["norms_mean"] == pytest.approx(np.mean([want[k] for k in norms]), rel=1e-12)
    layer1 = [k for k in biases if k.startswith("transformer.h.1.")]
    assert got["layers"]["1"]["biases_mean"] == pytest.approx(np.mean([want[k] for k in layer1]), rel=1e-12)
    assert (
        set(got["non_layer"]) >= {"weights_mean", "biases_mean"} and got["non_layer"]["biases_mean"] is None
    )
    assert os.path.getsize(str(tmp_path / "div.png")) > 0
    # several models (the base against itself included: all zeros, still plotted)
    argv = ["divergence", f"--base={base_dir}", "--model", model_dir, base_dir, "--labels=m,same"]
    assert cli.main(argv + [f"--out={tmp_path / 'two.json'}"]) == 0
    two = read_json(str(tmp_path / "two.json"))
    assert two["models"]["m"]["tensors"] == got["tensors"]
    assert set(two["models"]["same"]["tensors"].values()) == {0.0}
    assert two["curve"]["x"] == ["m", "same"] and two["curve"]["biases_mean"] == [got["biases_mean"], 0.0]
    assert os.path.getsize(str(tmp_path / "two.png")) > 0


def test_divergence_of_run_checkpoints_equals_numpy_on_exports(saved_pair, tmp_path, monkeypatch):
    """Checkpoints written by the trainer's writer (TrainState with Adam state and a reference);
    each step's MSEs == numpy on the HF export of the same params."""
    import ml_collections
    import optax

    from jaxrlhf.trainer import checkpoint
    from jaxrlhf.trainer import state as state_lib

    base_dir, _, base, _ = saved_pair
    workdir = str(tmp_path / "run")
    manager = checkpoint.make_manager(workdir, ml_collections.ConfigDict(dict(keep=5, async_save=False)))
    ref = nnx.to_pure_dict(nnx.state(base, nnx.Param))
    want = {}
    for step, seed in ((3, 1), (7, 2)):
        model = perturbed(base, seed, scale=0.01 * step)
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        st = state_lib.create(
            params, optax.adam(1e-3), ref_params=ref, rng=jax.random.key_data(jax.random.key(0))
        )
        checkpoint.save(manager, step, st, {})
        M.save_pretrained(model, str(tmp_path / f"export{step}"))
        want[step] = _numpy_mse(base_dir, str(tmp_path / f"export{step}"))
    manager.wait_until_finished()
    manager.close()
    out_json = str(tmp_path / "runs.json")
    assert (
        cli.main(["divergence", f"--base={base_dir}", "--run", workdir, "--labels=dpo", f"--out={out_json}"])
        == 0
    )
    got = read_json(out_json)["runs"]["dpo"]
    assert got["x"] == [3, 7]
    for point, step in zip(got["points"], (3, 7), strict=True):
        assert set(point["tensors"]) == set(want[step])
        for k, v in want[step].items():
            assert point["tensors"][k] == pytest.approx(v, rel=1e-9), (step, k)
    assert got["weights_mean"][1] > got["weights_mean"][0] > 0
    assert {p["params_key"] for p in got["points"]} == {"params"}  # not ref_params, not opt_state/mu
    # an explicit subtree: the frozen reference (== the base) diverges by exactly 0
    # (a run directory given relative to the working directory: orbax needs absolute paths)
    monkeypatch.chdir(tmp_path)
    argv = ["divergence", f"--base={base_dir}", "--run", "run", "--params_key=ref_params"]
    assert cli.main(argv + [f"--out={tmp_path / 'ref.json'}"]) == 0
    ref_curve = read_json(str(tmp_path / "ref.json"))["runs"]["run"]
    assert ref_curve["weights_mean"] == [0.0, 0.0] and ref_curve["biases_mean"] == [0.0, 0.0]
    assert os.path.getsize(str(tmp_path / "runs.png")) > 0


# -------------------------------------------------------------------------------- activations
def _write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def _np_lens(model: M.Transformer, h: np.ndarray) -> np.ndarray:
    """GPT-2 final LayerNorm + tied LM head in numpy (float64)."""
    c = model.config
    h = h.astype(np.float64)
    mu = h.mean(-1, keepdims=True)
    var = ((h - mu) ** 2).mean(-1, keepdims=True)
    n = (h - mu) / np.sqrt(var + c.norm_eps)
    n = n * np.asarray(model.final_norm.scale.value) + np.asarray(model.final_norm.bias.value)
    return n @ np.asarray(model.embed.value, np.float64).T


def test_activation_divergence_equals_numpy_per_example(tmp_path):
    base = np_init("gpt2", seed=0, vocab_size=482)
    model = perturbed(base, 5, scale=0.02)
    M.save_pretrained(base, str(tmp_path / "base"))
    M.save_pretrained(model, str(tmp_path / "model"))
    rows = [
        {"prompt": p, "label": ["neg", "pos"][i % 2]}
        for i, p in enumerate(reviews.review_prompts(11, seed=3))
    ]
    data = _write_jsonl(tmp_path / "prompts.jsonl", rows)
    out_json = str(tmp_path / "act.json")
    argv = [
        "activations",
        f"--base={tmp_path / 'base'}",
        "--model",
        str(tmp_path / "model"),
        str(tmp_path / "base"),
    ]
    argv += [f"--data={data}", f"--tokenizer={TOK}", "--label=label", "--batch_size=4", "--labels=m,same"]
    assert cli.main(argv + [f"--out={out_json}"]) == 0
    result = read_json(out_json)
    got = result["models"]["m"]
    same = result["models"]["same"]["groups"]["all"]  # the base against itself
    np.testing.assert_allclose(same["cosine"], 1.0, atol=1e-6)
    np.testing.assert_allclose(same["kl"], 0.0, atol=1e-6)

    # reference: each prompt alone, right-padded to one width (causal: the real positions do not
    # see the padding), hidden states from the model, the lens and the statistics in numpy
    from jaxrlhf import data as data_lib

    tok = data_lib.load_tokenizer(TOK)
    gd = nnx.split(base)[0]
    fwd = jax.jit(lambda p, x, m: nnx.merge(gd, p)(x, m, return_hidden=True))
    width = 8
    sums = {g: {"cos": 0.0, "kl": 0.0, "n": 0} for g in ("all", "neg", "pos")}
    for r in rows:
        ids = tok(r["prompt"]).input_ids
        n = len(ids)
        x = jnp.asarray([ids + [0] * (width - n)], jnp.int32)
        mask = jnp.asarray([[1] * n + [0] * (width - n)], jnp.int32)
        per = []
        for m in (model, base):
            out, hid = fwd(nnx.split(m)[1], x, mask)
            hid = [np.asarray(h[0, :n], np.float64) for h in hid]  # [n, E] each
            np.testing.assert_allclose(_np_lens(m, hid[-1]), np.asarray(out[0, :n]), atol=1e-4)  # lens(L)
            per.append(hid)
        cos = [
            (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
            for a, b in zip(*per, strict=True)
        ]
        kl = []
        for a, b in zip(*per, strict=True):
            la, lb = np_softmax_log(_np_lens(model, a)), np_softmax_log(_np_lens(base, b))
            kl.append((np.exp(la) * (la - lb)).sum(-1))
        for g in ("all", r["label"]):
            sums[g]["cos"] = sums[g]["cos"] + np.asarray([c.sum() for c in cos])
            sums[g]["kl"] = sums[g]["kl"] + np.asarray([k.sum() for k in kl])
            sums[g]["n"] += n
    assert got["layers"] == base.config.num_layers + 1
    assert set(got["groups"]) == {"all", "neg", "pos"}
    for g, s in sums.items():
        assert got["groups"][g]["tokens"] == s["n"]
        np.testing.assert_allclose(got["groups"][g]["cosine"], s["cos"] / s["n"], rtol=1e-5, err_msg=g)
        np.testing.assert_allclose(got["groups"][g]["kl"], s["kl"] / s["n"], rtol=1e-3, atol=1e-7, err_msg=g)
    assert max(got["groups"]["all"]["kl"]) > 1e-4 and min(got["groups"]["all"]["cosine"]) < 0.999
    assert os.path.getsize(str(tmp_path / "act.png")) > 0


def test_activation_divergence_response_tokens_of_sft_rows(tmp_path):
    base = np_init("gpt_neox", seed=0, vocab_size=482, num_layers=1)
    gp = nnx.split(base)
    tok_rows = [
        {"prompt": p, "completion": " the movie was good ."} for p in reviews.review_prompts(5, seed=1)
    ]
    from jaxrlhf import data as data_lib

    tok = data_lib.load_tokenizer(TOK)
    ex = inputs.load_examples(inputs.data_config(_write_jsonl(tmp_path / "sft.jsonl", tok_rows)), tok)
    assert ex.dataset.kind == "sft" and ex.labels is None
    batches = list(inputs.sequence_batches(ex.dataset, 2))
    res = activations.activation_divergence(gp, gp, batches, tokens="response")
    # response tokens: " the movie was good ." + EOS = 6 per row
    assert res["groups"]["all"]["tokens"] == 6 * 5
    np.testing.assert_allclose(res["groups"]["all"]["cosine"], 1.0, atol=1e-6)
    np.testing.assert_allclose(res["groups"]["all"]["kl"], 0.0, atol=1e-6)


def test_cosine_and_kl_kernels():
    r = np.random.default_rng(0)
    a, b = r.normal(size=(3, 5, 8)), r.normal(size=(3, 5, 8))
    want = np.einsum("...e,...e->...", a, b) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    np.testing.assert_allclose(activations.cosine_similarity(jnp.asarray(a), jnp.asarray(b)), want, rtol=1e-5)
    assert float(activations.cosine_similarity(jnp.zeros(4), jnp.ones(4))) == 0.0
    p, q = r.normal(size=(4, 7)) * 3, r.normal(size=(4, 7))
    lp, lq = np_softmax_log(p), np_softmax_log(q)
    np.testing.assert_allclose(
        activations.kl_from_logits(jnp.asarray(p), jnp.asarray(q)),
        (np.exp(lp) * (lp - lq)).sum(-1),
        rtol=1e-5,
    )


def test_tree_inner_products():
    r = np.random.default_rng(1)
    a = {"x": r.normal(size=(3, 4)), "y": [r.normal(size=5)]}
    b = {"x": r.normal(size=(3, 4)), "y": [r.normal(size=5)]}
    fa = np.concatenate([a["x"].ravel(), a["y"][0]])
    fb = np.concatenate([b["x"].ravel(), b["y"][0]])
    assert float(trees.tree_vdot(a, b)) == pytest.approx(fa @ fb, rel=1e-5)
    assert float(trees.tree_norm(a)) == pytest.approx(np.linalg.norm(fa), rel=1e-5)
    cos = fa @ fb / np.linalg.norm(fa) / np.linalg.norm(fb)
    assert float(trees.tree_cosine(a, b)) == pytest.approx(cos, rel=1e-5)
    assert float(trees.tree_sq_diff(a, b)["x"]) == pytest.approx(np.mean((b["x"] - a["x"]) ** 2), rel=1e-5)


# --------------------------------------------------------------------------------------- heads
def test_heads_cli_loss_and_reward_against_independent_references(tmp_path):
    """Two models through the CLI; the first one's every ablation checked against its weights
    zeroed in numpy: numpy NLL of the response tokens of each example, and greedy decoding by
    full forwards (no KV cache) scored by the same reward."""
    from jaxrlhf import data as data_lib

    model = np_init("gpt_neox", seed=2, vocab_size=482, num_heads=2, num_kv_heads=2, head_dim=32)
    M.save_pretrained(model, str(tmp_path / "m0"))
    M.save_pretrained(
        np_init("gpt_neox", seed=3, vocab_size=482, num_heads=2, num_kv_heads=2, head_dim=32),
        str(tmp_path / "m1"),
    )
    c = model.config
    tok = data_lib.load_tokenizer(TOK)
    sft_rows = [{"prompt": p, "completion": " it was good ."} for p in reviews.review_prompts(3, seed=2)]
    prompt_rows = [{"prompt": p} for p in reviews.review_prompts(3, seed=4)]
    sft = _write_jsonl(tmp_path / "sft.jsonl", sft_rows)
    prompts = _write_jsonl(tmp_path / "p.jsonl", prompt_rows)
    n_new = 3
    out_json = str(tmp_path / "heads.json")
    argv = ["heads", "--model", str(tmp_path / "m0"), str(tmp_path / "m1"), "--labels=a,b", f"--data={sft}"]
    argv += [f"--prompts={prompts}", f"--tokenizer={TOK}", "--reward_fn=jaxrlhf.tasks.reviews:reward"]
    argv += [f"--max_new_tokens={n_new}", "--greedy", "--batch_size=2", f"--out={out_json}"]
    assert cli.main(argv) == 0
    got = read_json(out_json)
    assert set(got["models"]) == {"a", "b"} and len(got["models"]["b"]["rank_by_loss"]) == 4
    assert os.path.getsize(str(tmp_path / "heads.png")) > 0
    res = got["models"]["a"]

    graphdef = nnx.split(model)[0]
    width = 16
    plain = jax.jit(lambda p, x, m: nnx.merge(graphdef, p)(x, m))

    def logits_of(p, ids):  # right-padded to one width: one compile, real positions unaffected
        x = jnp.asarray([ids + [0] * (width - len(ids))], jnp.int32)
        m = jnp.asarray([[1] * len(ids) + [0] * (width - len(ids))], jnp.int32)
        return np.asarray(plain(p, x, m))[0, : len(ids)].astype(np.float64)

    def np_loss(p):
        total, n = 0.0, 0
        for r in sft_rows:
            prompt = tok(r["prompt"]).input_ids
            ids = prompt + tok(r["completion"], add_special_tokens=False).input_ids + [tok.eos_token_id]
            logp = np_softmax_log(logits_of(p, ids))
            for t in range(len(prompt), len(ids)):
                total -= logp[t - 1, ids[t]]
                n += 1
        return total / n

    def np_reward(p):
        texts_p, texts_r = [], []
        for r in prompt_rows:
            seq = tok(r["prompt"]).input_ids
            p_len = len(seq)
            for _ in range(n_new):
                seq.append(int(np.argmax(logits_of(p, seq)[-1])))
                if seq[-1] == tok.eos_token_id:
                    break
            texts_p.append(tok.decode(seq[:p_len], skip_special_tokens=True))
            texts_r.append(tok.decode(seq[p_len:], skip_special_tokens=True))
        return float(np.mean(reviews.reward(texts_p, texts_r)))

    params = nnx.split(model)[1]
    assert res["base"]["loss"] == pytest.approx(np_loss(params), rel=1e-5)
    assert res["base"]["reward"] == pytest.approx(np_reward(params), rel=1e-6)
    for layer in range(c.num_layers):
        for head in range(c.num_heads):
            zeroed = nnx.split(with_params(model, _zero_head_rows(layer, head, c.head_dim)))[1]
            assert res["loss"][layer][head] == pytest.approx(np_loss(zeroed), rel=1e-5), (layer, head)
            assert res["delta_loss"][layer][head] == pytest.approx(
                res["loss"][layer][head] - res["base"]["loss"]
            )
            assert res["reward"][layer][head] == pytest.approx(np_reward(zeroed), rel=1e-6), (layer, head)
    ranked = [r["delta"] for r in res["rank_by_loss"]]
    assert ranked == sorted(ranked, reverse=True) and len(ranked) == c.num_layers * c.num_heads
    ranked = [r["delta"] for r in res["rank_by_reward"]]
    assert ranked == sorted(ranked)
