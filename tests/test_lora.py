"""LoRA (``jaxrlhf.lora``): split/merge vs numpy, adapter shardings, the LoRA gradient vs the chain
rule on the full model's gradient, accumulation/sharding exactness, a tiny DPO run whose merged
export differs from the base by rank <= r only and whose PEFT export reproduces it through ``peft``,
bit-exact resume, the base-model check, the sampler with adapters, and every algorithm with LoRA."""

import importlib.util
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from jaxrlhf import config_defaults as d
from jaxrlhf import generation, lora, models, registry
from jaxrlhf.algorithms.common import apply_model
from jaxrlhf.sharding import make_mesh, shard_batch
from jaxrlhf.trainer import setup
from jaxrlhf.trainer.optim import make_optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V, T, B = 64, 12, 8
RANK = 4


# ----------------------------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------------------------
def load_config(relpath):
    path = os.path.join(ROOT, relpath)
    spec = importlib.util.spec_from_file_location("cfg_" + os.path.basename(path)[:-3], path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def _config(algorithm, rank=RANK, ema_decay=0.9, clip_norm=1.0):
    c = d.base(algorithm)
    c.model = d.model(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2
    )
    c.model.dtype = "float32"
    c.mesh = dict(data=1, fsdp=1, tensor=1)
    # SGD: equal updates mean equal gradients (see tests/test_train_step.py).
    c.optim = d.optim(name="sgd", lr=1e-1, b1=0.0, warmup_steps=0, schedule="constant", clip_norm=clip_norm)
    c.ref = d.ref(ema_decay=ema_decay)
    c.dpo = dict(beta=0.1, label_smoothing=0.1, loss_type="sigmoid", nll_coef=0.5)
    c.lora = d.lora(rank=rank, alpha=8.0, init="gaussian")
    return c


def _pref_batch(seed=0):
    rng = np.random.default_rng(seed)

    def seq():
        ids = rng.integers(3, V, size=(B, T)).astype(np.int32)
        am, lm = np.zeros((B, T), np.int32), np.zeros((B, T), np.int32)
        for i in range(B):
            n = rng.integers(5, T + 1)
            am[i, :n] = 1
            lm[i, rng.integers(1, n - 1) : n] = 1
        pos = (np.maximum(np.cumsum(am, 1) - 1, 0) * am).astype(np.int32)
        return {
            "input_ids": np.where(am > 0, ids, 0),
            "attention_mask": am,
            "loss_mask": lm,
            "positions": pos,
        }

    c, r = seq(), seq()
    out = {f"chosen_{k}": v for k, v in c.items()}
    out.update({f"rejected_{k}": v for k, v in r.items()})
    out["margin"] = np.zeros((B,), np.float32)
    return out


def _train(config, batch, micro_batches=1, steps=1):
    """``(state, metrics)`` after ``steps`` steps through ``setup`` (the drivers' path)."""
    config.micro_batches = micro_batches
    mesh = make_mesh(config.mesh)
    algorithm = registry.get(config.algorithm)
    graphdef, params, _ = setup.load_model(config, config.model, mesh, head=algorithm.head)
    loss_fn, denoms = algorithm.build_loss(config, graphdef)
    params, frozen = setup.lora_split(config, params)
    tx, _ = make_optimizer(config.optim, 10)
    ref_of = setup.whole if algorithm.uses_reference else setup.no_reference
    state, shardings = setup.make_state(
        tx,
        params,
        mesh,
        ref_of=ref_of,
        seed=0,
        frozen=frozen,
        follow_reference=setup.reference_follows(config),
    )
    step = setup.jit_step(setup.train_step_fn(config, loss_fn, denoms, tx, ref_of=ref_of), shardings, mesh)
    for _ in range(steps):
        state, metrics = step(state, shard_batch(mesh, batch))
    return jax.device_get(state), jax.device_get(metrics), shardings


def _flat(tree):
    """``{path: numpy array}`` of any pytree (nested dicts, optimizer states)."""
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]
    return {
        "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in p): np.asarray(v) for p, v in leaves
    }


def _close(a, b, rtol=2e-5, atol=2e-6):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_allclose(fa[k], fb[k], rtol=rtol, atol=atol, err_msg=k)


TARGETED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ----------------------------------------------------------------------------------------------
# Split / merge / shardings.
# ----------------------------------------------------------------------------------------------
def test_split_and_merge_against_numpy():
    model = models.init("llama", head="scalar", **d.TINY_LLAMA)
    params = nnx.to_pure_dict(nnx.split(model)[1])
    spec = lora.LoraSpec(rank=RANK, alpha=8.0)
    trainable, frozen = lora.split(params, spec, seed=0)
    base = _flat(params)
    t = _flat(trainable)
    # the scalar head trains in full; every projection kernel gets A [in, r], B [r, out] = 0
    assert "score/kernel" in t and "score/kernel" not in _flat(frozen)
    kernels = [k for k in base if k.endswith("/kernel") and k.split("/")[-2] in TARGETED]
    assert len(kernels) == 2 * 7
    assert sorted(k for k in t if k.endswith("lora_a")) == sorted(k + "/lora_a" for k in kernels)
    for k in kernels:
        assert t[k + "/lora_a"].shape == (base[k].shape[0], RANK) and not np.all(t[k + "/lora_a"] == 0)
        np.testing.assert_array_equal(t[k + "/lora_b"], 0)
    # step 0: the base exactly, bit for bit
    merged0 = _flat(lora.merge(trainable, frozen, spec.scale))
    assert merged0.keys() == base.keys()
    for k in base:
        np.testing.assert_array_equal(merged0[k], base[k], err_msg=k)
    # random B: W + (alpha / r) A @ B in float64 numpy; untargeted leaves untouched
    rng = np.random.default_rng(0)
    trainable = jax.tree_util.tree_map_with_path(
        lambda p, x: rng.normal(size=x.shape).astype(np.float32) if "lora_b" in str(p) else x, trainable
    )
    t = _flat(trainable)
    for merged in (
        lora.merge(trainable, frozen, spec.scale),
        lora.materialize(trainable, frozen, spec.scale),
    ):
        merged = _flat(merged)
        for k in base:
            if k in kernels:
                want = (
                    base[k].astype(np.float64) + 2.0 * t[k + "/lora_a"].astype(np.float64) @ t[k + "/lora_b"]
                )
                np.testing.assert_allclose(merged[k], want, rtol=1e-5, atol=1e-6, err_msg=k)
            else:
                np.testing.assert_array_equal(merged[k], base[k], err_msg=k)
    # adapters off (a frozen reference): the base
    off = _flat(lora.merge(lora.without_adapters(trainable), frozen, spec.scale))
    for k in base:
        np.testing.assert_array_equal(off[k], base[k], err_msg=k)


def test_config_errors_name_the_key():
    c = _config("sft")
    c.lora.init = "zeros"
    with pytest.raises(ValueError, match="config.lora.init"):
        lora.from_config(c)
    c = _config("sft")
    c.lora.targets = "nothing_matches$"
    params = {"layers": {0: {"attn": {"q_proj": {"kernel": np.zeros((4, 4), np.float32)}}}}}
    with pytest.raises(ValueError, match="matches no 2-D parameter"):
        lora.split(params, lora.from_config(c), 0)
    assert lora.from_config(_config("sft", rank=0)) is None


def test_adapter_shardings_follow_their_kernel():
    """A is sharded like the kernel's input dimension, B like its output dimension."""
    config = _config("sft")
    config.mesh = dict(data=1, fsdp=2, tensor=4)
    mesh = make_mesh(config.mesh)
    _, params, _ = setup.load_model(config, config.model, mesh)
    trainable, frozen = setup.lora_split(config, params)
    f, t = lora.flatten(frozen), lora.flatten(trainable)
    checked = 0
    for keys, w in f.items():
        if keys + ("lora_a",) not in t:
            continue
        spec = tuple(w.sharding.spec) + (None,) * 2
        assert any(ax is not None for ax in spec[:2]), keys  # the kernel really is split
        assert tuple(t[keys + ("lora_a",)].sharding.spec) in ((spec[0], None), (spec[0],)), keys
        assert tuple(t[keys + ("lora_b",)].sharding.spec) == (None, spec[1]), keys
        assert f[keys] is params_leaf(params, keys)  # the base is not copied
        checked += 1
    assert checked == 14


def params_leaf(tree, keys):
    for k in keys:
        tree = tree[k]
    return tree


# ----------------------------------------------------------------------------------------------
# The step: gradients, reference, accumulation and sharding.
# ----------------------------------------------------------------------------------------------
def test_lora_step_is_the_chain_rule_of_the_full_step():
    """Step 1 with LoRA == the full model's step 1 seen through W_eff = W + s A B: the same loss
    (step 0 is the base), A unchanged (dL/dA = s G B^T = 0 at B = 0), and
    dL/dB = s A^T G with G the full model's kernel gradient (SGD without clipping: G = -(W1 - W0)/lr)."""
    batch = _pref_batch(3)
    full_cfg = _config("dpo", rank=0, ema_decay=1.0, clip_norm=0.0)
    lora_cfg = _config("dpo", ema_decay=1.0, clip_norm=0.0)
    full, m_full, _ = _train(full_cfg, batch)
    mesh = make_mesh(full_cfg.mesh)
    _, base, _ = setup.load_model(full_cfg, full_cfg.model, mesh)
    trainable0, _ = lora.split(base, lora.from_config(lora_cfg), lora_cfg.seed)
    st, m_lora, _ = _train(lora_cfg, batch)
    assert m_lora["loss"] == m_full["loss"]  # bit-identical forward at step 0
    assert st.ref_params is None  # frozen reference = the base with the adapters off
    w0, w1, t0, t1 = _flat(base), _flat(full.params), _flat(trainable0), _flat(st.params)
    s, lr = 8.0 / RANK, 0.1
    for k in w0:
        if k + "/lora_a" not in t1:
            assert k not in t1
            continue
        np.testing.assert_array_equal(t1[k + "/lora_a"], t0[k + "/lora_a"])
        grad_w = -(w1[k].astype(np.float64) - w0[k]) / lr
        want_b = t0[k + "/lora_b"] - lr * s * t0[k + "/lora_a"].astype(np.float64).T @ grad_w
        np.testing.assert_allclose(t1[k + "/lora_b"], want_b, rtol=2e-3, atol=2e-6, err_msg=k)
    # the optimizer covers the adapters only
    assert {x.shape for x in jax.tree.leaves(st.opt_state) if x.ndim} <= {
        x.shape for x in jax.tree.leaves(st.params)
    }


@pytest.fixture(scope="module")
def single_lora_dpo():
    return _train(_config("dpo"), _pref_batch(2), steps=2)


@pytest.mark.parametrize("mesh,micro", [((1, 1, 1), 4), ((2, 2, 2), 2)])
def test_lora_accumulation_and_sharding_are_exact(mesh, micro, single_lora_dpo):
    """Two steps (A moves from the second) with an EMA reference of the adapters: 4 micro-batches
    on one device, and 2 micro-batches on 8 devices (data, fsdp and tensor axes all 2)."""
    single, m_single, _ = single_lora_dpo
    config = _config("dpo")
    config.mesh = dict(zip(("data", "fsdp", "tensor"), mesh, strict=True))
    other, m_other, _ = _train(config, _pref_batch(2), micro_batches=micro, steps=2)
    _close(single.params, other.params)
    _close(single.ref_params, other.ref_params)
    _close(single.opt_state, other.opt_state)
    np.testing.assert_allclose(m_single["loss"], m_other["loss"], rtol=1e-5)


def test_ema_reference_is_an_ema_of_the_adapters(single_lora_dpo):
    one, _, _ = _train(_config("dpo"), _pref_batch(2), steps=1)
    two, _, _ = single_lora_dpo
    p1, r1, p2, r2 = _flat(one.params), _flat(one.ref_params), _flat(two.params), _flat(two.ref_params)
    assert r2.keys() == p2.keys() and any(k.endswith("lora_a") for k in r2)
    for k in r2:  # r_{t+1} = 0.9 r_t + 0.1 p_{t+1}
        np.testing.assert_allclose(r2[k], 0.9 * r1[k] + 0.1 * p2[k], rtol=1e-5, atol=1e-7, err_msg=k)
    assert not all(np.array_equal(p1[k], p2[k]) for k in p2)


# ----------------------------------------------------------------------------------------------
# A tiny DPO run: merged export, PEFT export, resume, the base check, the sampler.
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("lora_base"))
    models.save_pretrained(models.init("llama", seed=3, **d.TINY_LLAMA), out)
    return out


def _dpo_lora(base, total, every=2):
    c = load_config("configs/tiny/dpo_lora.py")
    with c.unlocked():
        c.model = d.model(path=base)
        c.model.dtype = "float32"
        c.total_steps = total
        c.optim.schedule = "constant"  # resumed runs of different lengths share the schedule
        c.checkpoint.every = every
        c.checkpoint.async_save = False
        c.log_every = 1
    return c


@pytest.fixture(scope="module")
def dpo_run(base_dir, tmp_path_factory):
    work = str(tmp_path_factory.mktemp("lora_dpo"))
    return registry.run(_dpo_lora(base_dir, 4), work), work


def test_merged_export_differs_from_the_base_by_rank_r(dpo_run, base_dir):
    result, work = dpo_run
    base = load_file(os.path.join(base_dir, "model.safetensors"))
    merged = load_file(os.path.join(work, "hf", "model.safetensors"))
    assert merged.keys() == base.keys()
    changed = 0
    for name, w in base.items():
        if any(f".{p}." in name for p in TARGETED):
            diff = merged[name].astype(np.float64) - w
            rank = np.linalg.matrix_rank(diff, tol=1e-6 * max(np.abs(diff).max(), 1e-30))
            assert 1 <= rank <= RANK, (name, rank)
            changed += 1
        else:
            np.testing.assert_array_equal(merged[name], w, err_msg=name)
    assert changed == 2 * 7
    assert result["export_dir"] == os.path.join(work, "hf")


def test_merged_and_peft_exports_reproduce_the_lora_logits(dpo_run, base_dir):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    result, work = dpo_run
    state = result["state"]
    ids = np.random.default_rng(0).integers(3, 256, size=(2, 16)).astype(np.int32)
    seq = {"input_ids": ids, "attention_mask": np.ones_like(ids), "positions": np.tile(np.arange(16), (2, 1))}
    ours = np.asarray(apply_model(result["graphdef"], lora.merge(state.params, state.frozen, 2.0), seq))
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(os.path.join(work, "hf"), dtype=torch.float32)
        hf_logits = merged(torch.tensor(ids, dtype=torch.long)).logits.numpy()
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        base_logits = base(torch.tensor(ids, dtype=torch.long)).logits.numpy()
        with_adapter = peft.PeftModel.from_pretrained(base, os.path.join(work, "peft"))
        peft_logits = with_adapter(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(hf_logits, ours, atol=1e-4, rtol=0)
    np.testing.assert_allclose(peft_logits, hf_logits, atol=1e-4, rtol=0)
    assert np.abs(peft_logits - base_logits).max() > 1e-3  # the adapter really loaded and matters


def test_resume_is_bit_exact_and_a_different_base_is_refused(dpo_run, base_dir, tmp_path):
    straight, _ = dpo_run
    base = str(tmp_path / "base")  # the same weights as dpo_run's base, at a path we can overwrite
    shutil.copytree(base_dir, base)
    work = str(tmp_path / "run")
    first = registry.run(_dpo_lora(base, 2), work)
    assert first["step"] == 2
    resumed = registry.run(_dpo_lora(base, 4), work)
    assert resumed["step"] == 4 and len(resumed["history"]) == 2
    a, b = jax.device_get(straight["state"]), jax.device_get(resumed["state"])
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    # the same path with other weights: refused, naming both bases
    models.save_pretrained(models.init("llama", seed=4, **d.TINY_LLAMA), base)
    with pytest.raises(
        ValueError, match=r"trained on base .*/base \(fingerprint \w+\).*this run's base is .*/base"
    ):
        registry.run(_dpo_lora(base, 6), work)


def test_precomputed_reference_matches_the_adapters_off_reference(dpo_run, base_dir, tmp_path):
    """``ref.precompute`` computes the reference on the base before the split: the same losses as
    the in-step reference (the base with the adapters off)."""
    straight, _ = dpo_run
    c = _dpo_lora(base_dir, 3)  # the policy moves from step 2 (lr warms up from 0 at step 1)
    with c.unlocked():
        c.ref.precompute = True
        c.export_hf = False
    pre = registry.run(c, str(tmp_path / "pre"))
    assert pre["state"].ref_params is None
    assert straight["history"][2]["loss"] != straight["history"][0]["loss"]
    for h_pre, h in zip(pre["history"], straight["history"][:3], strict=True):
        np.testing.assert_allclose(h_pre["loss"], h["loss"], rtol=1e-5)
        np.testing.assert_allclose(h_pre["rewards/margin"], h["rewards/margin"], rtol=1e-4, atol=1e-6)


def test_sampler_with_adapters_equals_the_merged_model(dpo_run):
    """The rollout sampler fed the adapters unmerged (``setup.full_params``: ``AdaptedKernel`` leaves,
    ``x @ W + s (x @ A) @ B`` in every decode step) decodes the same greedy tokens as the exported
    merged model loaded back from disk."""
    result, work = dpo_run
    state = result["state"]
    config = _dpo_lora("", 4)
    exported = nnx.to_pure_dict(nnx.split(models.from_pretrained(os.path.join(work, "hf")))[1])
    sampler = generation.make_sampler(result["graphdef"], max_new_tokens=12, pad_id=0, greedy=True)
    prompts = np.random.default_rng(1).integers(3, 256, size=(4, 8)).astype(np.int32)
    mask = np.ones_like(prompts)
    key = jax.random.key(0)
    with_adapters = sampler(setup.full_params(config, state.params, state.frozen), prompts, mask, key)
    merged = sampler(exported, prompts, mask, key)
    np.testing.assert_array_equal(np.asarray(with_adapters.response_ids), np.asarray(merged.response_ids))


# ----------------------------------------------------------------------------------------------
# Every algorithm trains adapters only, on the untouched base.
# ----------------------------------------------------------------------------------------------
def _tiny_lora(name):
    c = load_config(f"configs/tiny/{name}.py")
    with c.unlocked():
        c.lora = d.lora(rank=RANK, alpha=8.0, init="gaussian")
        c.checkpoint.async_save = False
        c.optim.lr = 1e-2
        if "total_steps" in c:
            c.total_steps = 2
        if name == "ppo":
            c.ppo.iterations = 1
        if name == "grpo":
            c.grpo.iterations = 1
        if name == "dpo_iter":
            c.dpo_iter.rounds, c.dpo_iter.steps_per_round = 1, 2
    return c


def _roles(config, name):
    """``{role: (model section, head)}`` of the models a run loads (the base a LoRA run freezes)."""
    if name == "ppo":
        return {"actor": (config.model, None), "critic": (config.critic.model, "scalar")}
    if name == "grpo":
        return {"actor": (config.model, None)}
    return {None: (config.model, registry.get(name).head)}


# sft and simpo take the offline path of the DPO run above; reward (a fully trained head), PPO (two
# models, an EMA reference of the adapters), DPO-Iter (a reset reference) and GRPO add to it.
@pytest.mark.slow
@pytest.mark.parametrize("name", ["reward", "ppo", "dpo_iter", "grpo"])
def test_every_algorithm_trains_adapters_on_a_frozen_base(name, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    config = _tiny_lora(name)
    result = registry.run(config, str(tmp_path / name))
    state = jax.device_get(result["state"])
    mesh = make_mesh(config.mesh)
    for role, (section, head) in _roles(config, name).items():
        frozen = state.frozen if role is None else state.frozen[role]
        trainable = state.params if role is None else state.params[role]
        _, base, _ = setup.load_model(config, section, mesh, head=head)
        base, f, t = _flat(base), _flat(frozen), _flat(trainable)
        for k, v in f.items():  # the frozen base is the loaded base, bit for bit
            np.testing.assert_array_equal(v, base[k], err_msg=k)
        full = {k for k in t if not k.endswith(("lora_a", "lora_b"))}
        assert full == ({"score/kernel"} if head == "scalar" else set()), full
        assert set(f) | full == set(base)
        assert any(np.abs(v).max() > 0 for k, v in t.items() if k.endswith("lora_b")), "adapters did not move"
    if name == "reward":  # the scalar head trains in full
        assert not np.array_equal(_flat(state.params)["score/kernel"], base["score/kernel"])
    assert os.path.isdir(result["export_dir"])
    assert os.path.exists(os.path.join(str(tmp_path / name), "peft", "adapter_config.json")) == (
        name != "reward"
    )
