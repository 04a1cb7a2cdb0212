"""save_pretrained -> transformers (torch) load -> identical outputs, for every family and head."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrlhf import models as M


def _need(module: str):
    """Imports ``module``; without it these parity tests skip, or fail in CI (``CI`` set), where the
    test extra (torch CPU + transformers) must be installed: a silent skip there hid them before."""
    try:
        return __import__(module)
    except ImportError:
        msg = f"{module} is not installed (the [test] extra brings it; make test installs torch CPU)"
        if os.environ.get("CI"):
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg, allow_module_level=True)


torch = _need("torch")
transformers = _need("transformers")
pytestmark = pytest.mark.torch

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "hf")


def _ours(model, ids):
    graphdef, params = nnx.split(model)
    return np.asarray(jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))(params, jnp.asarray(ids)))


def _perturbed(model, seed):
    """The model with every parameter shifted, so the export does not just copy the fixture files."""
    graphdef, params = nnx.split(model)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)]
    return nnx.merge(graphdef, jax.tree.unflatten(tree, leaves))


@pytest.mark.parametrize(
    "name",
    ["llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox", "llama_cls", "gpt2_cls", "gpt_neox_cls"],
)
def test_save_pretrained_loads_in_transformers_with_same_outputs(name, tmp_path):
    scalar = name.endswith("_cls")
    model = _perturbed(M.from_pretrained(os.path.join(FIX, name), head="scalar" if scalar else None), seed=7)
    ids = np.load(os.path.join(FIX, name, "expected.npz"))["input_ids"]
    ours = _ours(model, ids)
    M.save_pretrained(model, str(tmp_path), max_shard_size="30KB" if name == "qwen3" else "5GB")
    auto = transformers.AutoModelForSequenceClassification if scalar else transformers.AutoModelForCausalLM
    hf = auto.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
    with torch.no_grad():
        t_ids = torch.from_numpy(ids.astype(np.int64))
        if scalar:
            hidden = getattr(hf, hf.base_model_prefix)(input_ids=t_ids).last_hidden_state
            theirs = hf.score(hidden)[..., 0].numpy()
            pooled = hf(input_ids=t_ids).logits[:, 0].numpy()
            np.testing.assert_allclose(ours[:, -1], pooled, atol=1e-4, rtol=0)
        else:
            theirs = hf(input_ids=t_ids).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_bf16_params_export_and_tied_head(tmp_path):
    """bfloat16 parameters are written as bf16 safetensors; a tied model writes no LM head."""
    model = M.from_pretrained(os.path.join(FIX, "qwen3"), dtype=jnp.float32, param_dtype=jnp.bfloat16)
    M.save_pretrained(model, str(tmp_path))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "np") as f:
        assert "lm_head.weight" not in f.keys()  # noqa: SIM118
        assert f.get_tensor("model.embed_tokens.weight").dtype.name == "bfloat16"
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    ids = np.load(os.path.join(FIX, "qwen3", "expected.npz"))["input_ids"]
    with torch.no_grad():
        theirs = hf(input_ids=torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    np.testing.assert_allclose(_ours(model, ids), theirs, atol=1e-3, rtol=0)
