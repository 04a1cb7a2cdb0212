"""The adapter-aware forward (``models.modeling.AdaptedKernel``, ``lora.adapt``): the LoRA ``Linear``
against numpy, adapter dropout (its masks read back through identity adapters), the whole model
against the numpy-merged model for every fused layout (remat and tensor parallelism included),
dropout in the train step (deterministic given the key, never in the reference or evaluation), and
the PEFT export of GPT-2 (``Conv1D``, fused ``c_attn``) and GPT-NeoX (interleaved
``query_key_value``) loaded by ``peft`` onto the transformers base."""

import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrlhf import config_defaults as d
from jaxrlhf import lora, models
from jaxrlhf.models.modeling import AdaptedKernel, Linear
from jaxrlhf.sharding import activation_mesh, make_mesh, shard_batch
from jaxrlhf.trainer import setup

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "hf")


def _random_adapters(trainable, seed=0, std=0.2):
    """Adapters with ``B != 0`` (a trained state), float32."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape).astype(np.float32) * std), trainable)


def _numpy_merged(trainable, frozen, scale):
    """``W + scale * A @ B`` in float64 numpy, cast back to float32 (independent of ``lora.merge``)."""
    t, out = lora.flatten(trainable), {}
    for keys, w in lora.flatten(frozen).items():
        w = np.asarray(w, np.float64)
        if keys + ("lora_a",) in t:
            a, b = (np.asarray(t[keys + (n,)], np.float64) for n in ("lora_a", "lora_b"))
            w = w + scale * a @ b
        out[keys] = w.astype(np.float32)
    return lora.unflatten(out)


# ----------------------------------------------------------------------------------------------
# One layer.
# ----------------------------------------------------------------------------------------------
def _linear(din, dout, bias=True):
    cfg = types.SimpleNamespace(param_dtype="float32", dtype="float32")  # what Linear reads of a ModelConfig
    layer = Linear(din, dout, bias=bias, cfg=cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(layer)
    return graphdef, nnx.to_pure_dict(state)


def test_adapted_linear_against_numpy():
    """``x @ W + b + s (x @ A) @ B`` (PEFT's order: the base layer with its bias, then the adapter)."""
    rng = np.random.default_rng(0)
    gd, p = _linear(6, 5)
    p["bias"] = rng.normal(size=5).astype(np.float32)
    a, b = rng.normal(size=(6, 3)).astype(np.float32), rng.normal(size=(3, 5)).astype(np.float32)
    x = rng.normal(size=(2, 4, 6)).astype(np.float32)
    w = np.asarray(p["kernel"])
    adapted = dict(p, kernel=AdaptedKernel(jnp.asarray(w), jnp.asarray(a), jnp.asarray(b), scale=1.5))
    got = np.asarray(jax.jit(lambda q, x: nnx.merge(gd, q)(x))(adapted, x))
    x64 = x.astype(np.float64)
    want = x64 @ w + p["bias"] + 1.5 * (x64 @ a) @ b
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # the frozen base gets no gradient (it is frozen by definition), the adapters do
    grads = jax.grad(lambda q: jnp.sum(nnx.merge(gd, q)(x) ** 2))(adapted)
    assert not np.any(np.asarray(grads["kernel"].w))
    assert np.all(np.abs(np.asarray(grads["kernel"].b)).sum(0) > 0)


def _dropped(x, rate, key, w_in=6):
    """``dropout(x)`` read back through ``W = 0``, ``A = B = I``, ``scale = 1``."""
    gd, p = _linear(w_in, w_in, bias=False)
    eye = jnp.eye(w_in, dtype=jnp.float32)
    k = AdaptedKernel(jnp.zeros((w_in, w_in)), eye, eye, rng=key, scale=1.0, rate=rate)
    return np.asarray(jax.jit(lambda q, x: nnx.merge(gd, q)(x))(dict(p, kernel=k), x))


def test_adapter_dropout_masks():
    """Inverted dropout of the adapter's input: every entry is 0 or ``x / (1 - p)``, a fraction ~ p
    is dropped (binomial 5-sigma bounds), the same key gives the same mask, another key another."""
    rate, n = 0.3, 4000
    x = np.random.default_rng(1).uniform(1.0, 2.0, size=(n, 6)).astype(np.float32)
    y = _dropped(x, rate, jax.random.key(0))
    kept = y != 0
    np.testing.assert_allclose(y[kept], x[kept] / (1 - rate), rtol=1e-6)
    frac = 1 - kept.mean()
    assert abs(frac - rate) < 5 * np.sqrt(rate * (1 - rate) / x.size), frac
    np.testing.assert_array_equal(_dropped(x, rate, jax.random.key(0)), y)
    assert not np.array_equal(_dropped(x, rate, jax.random.key(1)) != 0, kept)
    np.testing.assert_array_equal(_dropped(x, rate, None), x)  # no key (reference, sampler): no dropout


def test_with_dropout_keys_each_adapted_kernel_by_its_path():
    w = jnp.zeros((4, 4))
    layer = {"q": {"kernel": AdaptedKernel(w, w, w, rate=0.1)}, "k": {"kernel": AdaptedKernel(w, w, w)}}
    tree = {"layers": {0: layer}, "norm": {"scale": jnp.ones(4)}}
    out = lora.with_dropout(tree, jax.random.key(3))
    q, k = out["layers"][0]["q"]["kernel"], out["layers"][0]["k"]["kernel"]
    assert q.rng is not None and k.rng is None  # rate 0: no key, no dropout
    again = lora.with_dropout(tree, jax.random.key(3))["layers"][0]["q"]["kernel"]
    np.testing.assert_array_equal(jax.random.key_data(q.rng), jax.random.key_data(again.rng))
    tree["layers"][1] = tree["layers"][0]
    other = lora.with_dropout(tree, jax.random.key(3))["layers"][1]["q"]["kernel"]
    assert not np.array_equal(jax.random.key_data(q.rng), jax.random.key_data(other.rng))


# ----------------------------------------------------------------------------------------------
# The whole model: adapter-aware forward == the numpy-merged model.
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,remat,tensor",
    [("llama", False, 1), ("gpt2", True, 1), ("gpt_neox", False, 1), ("qwen2", False, 2)],
)
def test_adapted_model_equals_the_merged_model(name, remat, tensor):
    """Every family's fused projections (q|k|v, gate|up) and the unfused tensor-parallel path."""
    mesh = make_mesh(dict(data=1, fsdp=1, tensor=tensor))
    model = models.from_pretrained(os.path.join(FIX, name), remat=remat)
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    spec = lora.LoraSpec(rank=3, alpha=6.0)
    trainable, frozen = lora.split(params, spec, seed=0)
    trainable = _random_adapters(trainable)
    ids = np.random.default_rng(0).integers(3, model.config.vocab_size, size=(2, 9)).astype(np.int32)

    @jax.jit
    def forward(p):
        with activation_mesh(mesh):
            return nnx.merge(graphdef, p)(ids)

    adapted = np.asarray(forward(lora.adapt(trainable, frozen, spec.scale)))
    merged = np.asarray(forward(_numpy_merged(trainable, frozen, spec.scale)))
    base = np.asarray(forward(params))
    np.testing.assert_allclose(adapted, merged, atol=2e-5, rtol=0)
    assert np.abs(adapted - base).max() > 1e-2  # the adapters matter
    # adapters off (the frozen reference): the base, bit for bit
    np.testing.assert_array_equal(np.asarray(forward(lora.adapt(None, frozen, spec.scale))), base)


# ----------------------------------------------------------------------------------------------
# Dropout in the train step.
# ----------------------------------------------------------------------------------------------
def _dpo_config(dropout, ema_decay=0.9):
    c = d.base("dpo")
    c.model = d.model(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2)  # fmt: skip
    c.model.dtype = "float32"
    c.mesh = dict(data=1, fsdp=1, tensor=1)
    c.optim = d.optim(name="sgd", lr=1e-1, b1=0.0, warmup_steps=0, schedule="constant", clip_norm=0.0)
    c.ref = d.ref(ema_decay=ema_decay)
    c.lora = d.lora(rank=4, alpha=8.0, init="gaussian", dropout=dropout)
    return c


def _batch(seed=0, b=8, t=12, v=64):
    rng = np.random.default_rng(seed)
    out = {}
    for side in ("chosen", "rejected"):
        am = np.ones((b, t), np.int32)
        lm = np.zeros((b, t), np.int32)
        lm[:, t // 2 :] = 1
        out[f"{side}_input_ids"] = rng.integers(3, v, size=(b, t)).astype(np.int32)
        out[f"{side}_attention_mask"], out[f"{side}_loss_mask"] = am, lm
        out[f"{side}_positions"] = np.tile(np.arange(t, dtype=np.int32), (b, 1))
    out["margin"] = np.zeros((b,), np.float32)
    return out


def _stepper(config):
    from jaxrlhf import registry
    from jaxrlhf.trainer.optim import make_optimizer

    mesh = make_mesh(config.mesh)
    algorithm = registry.get("dpo")
    graphdef, params, _ = setup.load_model(config, config.model, mesh)
    loss_fn, denoms = algorithm.build_loss(config, graphdef)
    params, frozen = setup.lora_split(config, params)
    tx, _ = make_optimizer(config.optim, 10)
    state, shardings = setup.make_state(
        tx, params, mesh, ref_of=setup.whole, seed=0, frozen=frozen,
        follow_reference=setup.reference_follows(config),
    )  # fmt: skip
    step = setup.jit_step(
        setup.train_step_fn(config, loss_fn, denoms, tx, ref_of=setup.whole), shardings, mesh
    )
    batch = shard_batch(mesh, _batch())
    return state, lambda s: step(s, batch), (graphdef, loss_fn, denoms, mesh)


def _host(state):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state.replace(frozen=None)))]


def test_dropout_in_the_step_is_deterministic_and_only_on_the_adapters():
    """Step 1 (B = 0): the loss is the same bit for bit (dropout acts on the adapter path only) and A
    does not move (dL/dA = s x^T dy B^T = 0), but B's update differs (dL/dB = s (dropout(x) A)^T dy).
    Rerunning step 2 from a copy of the step-1 state gives the same state bit for bit (the masks are
    a function of the state's key: resume is exact). Evaluation (and the reference) see no dropout."""
    s_off, step_off, _ = _stepper(_dpo_config(0.0))
    s_on, step_on, (graphdef, loss_fn, denoms, mesh) = _stepper(_dpo_config(0.5))
    s_off1, m_off1 = step_off(s_off)
    s_on1, m_on1 = step_on(s_on)
    assert float(m_on1["loss"]) == float(m_off1["loss"])
    off, on = lora.flatten(jax.device_get(s_off1.params)), lora.flatten(jax.device_get(s_on1.params))
    for k in off:
        if k[-1] == "lora_a":
            np.testing.assert_array_equal(on[k], off[k])
        else:
            assert not np.allclose(on[k], off[k], rtol=1e-3, atol=0), k
    s_on1_copy = jax.tree.map(jnp.copy, s_on1)
    s_off2, m_off2 = step_off(s_off1)
    s_on2, m_on2 = step_on(s_on1)
    assert float(m_on2["loss"]) != float(m_off2["loss"])
    again, m_again = step_on(s_on1_copy)
    assert float(m_again["loss"]) == float(m_on2["loss"])
    for x, y in zip(_host(again), _host(s_on2), strict=True):
        np.testing.assert_array_equal(x, y)
    # evaluation (views without keys) of the dropout run's state == the same state without dropout
    from jaxrlhf.trainer.offline import make_eval_step

    batch = shard_batch(mesh, _batch(1))
    ev_on = make_eval_step(loss_fn, denoms, mesh, setup.lora_views(_dpo_config(0.5), setup.whole))
    ev_off = make_eval_step(loss_fn, denoms, mesh, setup.lora_views(_dpo_config(0.0), setup.whole))
    a = ev_on(s_on2.params, s_on2.ref_params, s_on2.frozen, batch)
    b = ev_off(s_on2.params, s_on2.ref_params, s_on2.frozen, batch)
    assert float(a["loss"]) == float(b["loss"]) and float(a["rewards/margin"]) != 0.0


def test_sampler_params_are_not_merged():
    """``setup.full_params`` (sampler, scoring) holds the frozen kernels themselves, no merged copy."""
    config = _dpo_config(0.2)
    mesh = make_mesh(config.mesh)
    _, params, _ = setup.load_model(config, config.model, mesh)
    trainable, frozen = setup.lora_split(config, params)
    view = lora.flatten(setup.full_params(config, trainable, frozen))
    adapted = {k: v for k, v in view.items() if isinstance(v, AdaptedKernel)}
    assert len(adapted) == 2 * 7
    for keys, k in adapted.items():
        assert k.w is lora.flatten(frozen)[keys] and k.rng is None and k.rate == 0.0
    for keys, v in view.items():
        if keys not in adapted:
            assert v is lora.flatten(frozen)[keys]


# ----------------------------------------------------------------------------------------------
# PEFT export: GPT-2 and GPT-NeoX (fused q|k|v modules), loaded by peft onto the HF base.
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,targets", [("gpt2", lora.DEFAULT_TARGETS), ("gpt_neox", r"attn/(q|v)_proj/kernel$|mlp/\w+/kernel$")]
)
def test_peft_export_of_fused_families_reproduces_our_logits(name, targets, tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    base_dir = os.path.join(FIX, name)
    model = models.from_pretrained(base_dir)
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    spec = lora.LoraSpec(rank=2, alpha=5.0, targets=targets)
    trainable, frozen = lora.split(params, spec, seed=0)
    trainable = _random_adapters(trainable, seed=1)
    ids = np.random.default_rng(2).integers(3, model.config.vocab_size, size=(2, 10)).astype(np.int32)
    ours = np.asarray(
        jax.jit(lambda p: nnx.merge(graphdef, p)(ids))(lora.adapt(trainable, frozen, spec.scale))
    )
    out = lora.export_peft(trainable, spec, model.config, str(tmp_path / "peft"), base_dir)
    with open(os.path.join(out, "adapter_config.json")) as f:
        cfg = json.load(f)
    assert cfg["lora_alpha"] / cfg["r"] == spec.scale and cfg["fan_in_fan_out"] == (name == "gpt2")
    with torch.no_grad():
        hf = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        base_logits = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
        with_adapter = peft.PeftModel.from_pretrained(hf, out).eval()
        peft_logits = with_adapter(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(peft_logits, ours, atol=1e-4, rtol=0)
    assert np.abs(peft_logits - base_logits).max() > 1e-2  # the adapter really loaded and matters
