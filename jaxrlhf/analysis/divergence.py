"""Weight divergence: the mean squared difference of every tensor of a model from a base model.

For tensors ``a`` (base) and ``b`` (model) of the same HF name and shape::

    mse(a, b) = mean((b - a) ** 2)        # float64 over all elements

Tensors are keyed by their HF name (what ``save_pretrained`` writes) and sorted into kinds by name
and rank (``tensor_kind``), the same rule for every family:

* ``norm``: the name contains ``norm`` (Llama/Mistral/Qwen ``input_layernorm``,
  ``post_attention_layernorm``, ``model.norm``, Qwen3 ``q_norm``/``k_norm``; GPT-NeoX
  ``*_layernorm``, ``final_layer_norm``) or a ``ln_`` component (GPT-2 ``ln_1``, ``ln_2``,
  ``ln_f``), weight (scale) and bias (shift) alike;
* ``bias``: any other 1-D tensor (GPT-2 ``c_attn``/``c_proj``/``c_fc`` biases, GPT-NeoX
  ``query_key_value``/``dense``/``dense_h_to_4h``/``dense_4h_to_h`` biases, Qwen2 q/k/v biases);
* ``weight``: every tensor of rank >= 2 (embeddings, projection matrices, LM / score head);
* ``buffer``: non-parameters some checkpoints carry (``rotary_emb.inv_freq``, GPT-2/NeoX causal
  ``attn.bias``/``masked_bias`` masks); reported in ``tensors`` but left out of every summary.

A tensor belongs to layer ``i`` when its name has a ``.h.{i}.`` (GPT-2) or ``.layers.{i}.``
component; the others (embeddings, final norm, heads) are summarised under ``non_layer``.

Summaries of a set of tensors: ``*_mean`` is the unweighted mean of their per-tensor MSEs (each
tensor counts once, as in a per-tensor plot); ``*_pooled`` is the MSE over all their elements
together (large tensors dominate). ``None`` where a set is empty (e.g. Llama has no biases).
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

KINDS = ("weight", "bias", "norm")
_PLURAL = {"weight": "weights", "bias": "biases", "norm": "norms"}
_NORM = re.compile(r"norm|(?:^|\.)ln_")
_LAYER = re.compile(r"(?:^|\.)(?:h|layers)\.(\d+)\.")
# Non-parameter buffers of some HF checkpoints (as ``jaxrlhf.models.hf_io`` ignores on load).
_BUFFERS = (r"rotary_emb\.inv_freq$", r"\.attn\.(masked_)?bias$", r"\.attention\.(masked_)?bias$")


def tensor_kind(name: str, ndim: int) -> str:
    """``"norm"``, ``"bias"``, ``"weight"`` or ``"buffer"`` for an HF tensor name and rank (module doc)."""
    if any(re.search(p, name) for p in _BUFFERS):
        return "buffer"
    if _NORM.search(name):
        return "norm"
    return "bias" if ndim <= 1 else "weight"


def layer_index(name: str) -> int | None:
    """The decoder layer of an HF tensor name (``transformer.h.3.attn...`` -> 3), else ``None``."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def sq_diff_sum(a: np.ndarray, b: np.ndarray) -> float:
    """``sum((b - a) ** 2)`` in float64 (any float dtype, bfloat16 included)."""
    d = np.asarray(b, np.float64) - np.asarray(a, np.float64)
    return float(np.sum(d * d))


def tensor_mse(a: np.ndarray, b: np.ndarray) -> float:
    """``mean((b - a) ** 2)`` in float64; shapes must match."""
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {a.shape} vs {b.shape}")
    return sq_diff_sum(a, b) / max(a.size, 1)


# ------------------------------------------------------------------------------------- summaries
def _stats(names: list[str], mse: Mapping[str, float], size: Mapping[str, int]) -> tuple[Any, Any]:
    if not names:
        return None, None
    mean = float(np.mean([mse[n] for n in names]))
    n = sum(size[n] for n in names)
    pooled = float(sum(mse[n] * size[n] for n in names) / n) if n else None
    return mean, pooled


def _group(names: list[str], kinds, mse, size) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in KINDS:
        mean, pooled = _stats([n for n in names if kinds[n] == k], mse, size)
        out[f"{_PLURAL[k]}_mean"], out[f"{_PLURAL[k]}_pooled"] = mean, pooled
    return out


def summarize(mse: Mapping[str, float], ndim: Mapping[str, int], size: Mapping[str, int]) -> dict[str, Any]:
    """The divergence summary of per-tensor MSEs.

    Args:
      mse: HF tensor name -> mean squared difference.
      ndim, size: HF tensor name -> rank (for the kind) and number of elements (pooled means).
    Returns:
      ``{"tensors": {name: mse}, "kinds": {name: kind}, "weights_mean", "biases_mean",
      "norms_mean", "weights_pooled", "biases_pooled", "norms_pooled", "layers": {"0": {same
      six keys}, ...}, "non_layer": {same six keys}}`` (module doc).
    """
    kinds = {n: tensor_kind(n, ndim[n]) for n in mse}
    names = sorted(mse)
    layers: dict[int, list[str]] = {}
    other = []
    for n in names:
        i = layer_index(n)
        (layers.setdefault(i, []) if i is not None else other).append(n)
    out: dict[str, Any] = {"tensors": {n: float(mse[n]) for n in names}, "kinds": kinds}
    out.update(_group(names, kinds, mse, size))
    out["layers"] = {str(i): _group(layers[i], kinds, mse, size) for i in sorted(layers)}
    out["non_layer"] = _group(other, kinds, mse, size)
    return out


# ----------------------------------------------------------------------------- safetensors dirs
class SafetensorsDir:
    """The tensors of an HF checkpoint directory, read one at a time with ``safetensors`` (numpy).

    Reads ``model.safetensors.index.json`` (sharded checkpoints) when present, else every
    ``model*.safetensors`` (or, failing that, ``*.safetensors``) file.
    """

    def __init__(self, path: str):
        from safetensors import safe_open

        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path}: not a directory (expected an HF checkpoint directory)")
        self.path = path
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as fh:
                wm = json.load(fh)["weight_map"]
            files = {k: os.path.join(path, v) for k, v in wm.items()}
        else:
            fns = sorted(glob.glob(os.path.join(path, "model*.safetensors"))) or sorted(
                glob.glob(os.path.join(path, "*.safetensors"))
            )
            if not fns:
                raise FileNotFoundError(f"{path}: no *.safetensors files")
            files = {}
            for fn in fns:
                with safe_open(fn, framework="numpy") as fh:
                    files.update({k: fn for k in fh.keys()})  # noqa: SIM118 - not a dict
        self.files = files
        self.shapes: dict[str, tuple[int, ...]] = {}
        for fn in sorted(set(files.values())):
            with safe_open(fn, framework="numpy") as fh:
                for k in fh.keys():  # noqa: SIM118
                    if k in files:
                        self.shapes[k] = tuple(fh.get_slice(k).get_shape())

    def keys(self) -> list[str]:
        return list(self.files)

    def get(self, name: str) -> np.ndarray:
        from safetensors import safe_open

        with safe_open(self.files[name], framework="numpy") as fh:
            return fh.get_tensor(name)


def _compare(
    base_shapes: Mapping[str, tuple[int, ...]],
    model_shapes: Mapping[str, tuple[int, ...]],
    sq_sum: Callable[[str], float],
    what: str,
) -> dict[str, Any]:
    common = sorted(set(base_shapes) & set(model_shapes))
    if not common:
        raise ValueError(f"{what}: no tensor name in common")
    bad = [(n, base_shapes[n], model_shapes[n]) for n in common if base_shapes[n] != model_shapes[n]]
    if bad:
        raise ValueError(f"{what}: tensors differ in shape (name, base, model): {bad}")
    size = {n: int(np.prod(base_shapes[n], dtype=np.int64)) for n in common}
    mse = {n: sq_sum(n) / max(size[n], 1) for n in common}
    out = summarize(mse, {n: len(base_shapes[n]) for n in common}, size)
    out["only_in_base"] = sorted(set(base_shapes) - set(model_shapes))
    out["only_in_model"] = sorted(set(model_shapes) - set(base_shapes))
    return out


def divergence_dirs(base: str | SafetensorsDir, model: str) -> dict[str, Any]:
    """``summarize`` of the per-tensor MSEs between two HF checkpoint directories.

    Tensors present in only one directory are listed under ``only_in_base`` / ``only_in_model``
    and left out; a shape mismatch is an error naming the tensors.
    """
    b = base if isinstance(base, SafetensorsDir) else SafetensorsDir(base)
    m = SafetensorsDir(model)
    out = _compare(b.shapes, m.shapes, lambda n: sq_diff_sum(b.get(n), m.get(n)), f"{b.path} vs {model}")
    return {"base": b.path, "model": model, **out}


# ------------------------------------------------------------------ params in jaxrlhf layout
def hf_sq_sums(base: Mapping[str, np.ndarray], params: Mapping[str, np.ndarray], groups: Iterable) -> dict:
    """Per-HF-tensor ``(sum of squared differences, shape)`` of two flat param dicts in our layout.

    ``groups`` is ``jaxrlhf.models.weight_groups(config)``: HF tensor ``g.hf`` is the parameters
    ``g.ours`` under a pure layout change (transpose, split of fused q/k/v), so its squared
    difference is the sum over those parameters' and its size the sum of their sizes.
    """
    out = {}
    for g in groups:
        s = sum(sq_diff_sum(base[o], params[o]) for o in g.ours)
        n = sum(int(np.size(base[o])) for o in g.ours)
        out[g.hf] = (s, n)
    return out


def divergence_params(base: Mapping, params: Mapping, config) -> dict[str, Any]:
    """``summarize`` over HF names for two flat ``{path: array}`` dicts in our layout.

    Args:
      base, params: ``{"layers/0/attn/q_proj/kernel": array, ...}`` (``flat_params``).
      config: their ``ModelConfig`` (names and layout from ``weight_groups``).
    """
    from jaxrlhf.models import weight_groups

    groups = weight_groups(config)
    sums = hf_sq_sums(base, params, groups)
    mse = {n: sq / max(k, 1) for n, (sq, k) in sums.items()}
    # Every parameter of a group has the HF tensor's rank (fused q/k/v are split along one axis).
    ndim = {g.hf: np.ndim(base[g.ours[0]]) for g in groups}
    return summarize(mse, ndim, {n: k for n, (_, k) in sums.items()})


def flat_params(tree: Any) -> dict[str, np.ndarray]:
    """``{path: numpy array}`` of a params pytree (``nnx.State``, pure dict or restored dict)."""
    import jax

    from jaxrlhf.sharding import path_str

    return {path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ------------------------------------------------------------------------ run checkpoints
def run_checkpoints(workdir: str) -> list[tuple[int, str]]:
    """``[(step, state_dir), ...]`` of the complete orbax checkpoints under ``workdir/checkpoints``."""
    # absolute: orbax's metadata() of a relative checkpoint path has no item metadata
    root = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: no checkpoints directory (is {workdir} a run directory?)")
    out = []
    for d in os.listdir(root):
        state = os.path.join(root, d, "state")
        if d.isdigit() and os.path.isdir(state):
            out.append((int(d), state))
    if not out:
        raise FileNotFoundError(f"{root}: no complete checkpoints (<step>/state)")
    return sorted(out)


def _saved_names(state_dir: str) -> dict[str, Any]:
    """``{path: array metadata}`` of every leaf of an orbax ``TrainState`` checkpoint (no data read)."""
    import jax
    import orbax.checkpoint as ocp

    from jaxrlhf.sharding import path_str

    tree = ocp.PyTreeCheckpointer().metadata(os.path.abspath(state_dir)).item_metadata.tree
    return {path_str(p): m for p, m in jax.tree_util.tree_flatten_with_path(tree)[0]}


def find_params_key(state_dir: str, expected: list[str], key: str | None = None) -> str:
    """The subtree of a saved ``TrainState`` that holds the parameters ``expected`` (our paths).

    ``key`` (e.g. ``"params"``, ``"params/actor"``) is checked; ``None`` picks the one subtree
    outside ``ref_params`` / ``opt_state`` holding every expected path (several or none: an error
    listing the candidates, so the caller can pass ``key``).
    """
    names = _saved_names(state_dir)
    if key is None:
        tail = "/" + expected[0]
        cands = {n[: -len(tail)] for n in names if n.endswith(tail)}
        cands = sorted(
            c
            for c in cands
            if not c.startswith(("ref_params", "opt_state")) and all(f"{c}/{e}" in names for e in expected)
        )
        if len(cands) != 1:
            raise ValueError(
                f"{state_dir}: {len(cands)} subtrees hold the model's parameters {cands}; pass the key"
            )
        return cands[0]
    missing = [e for e in expected if f"{key}/{e}" not in names]
    if missing:
        raise ValueError(
            f"{state_dir}: subtree {key!r} lacks parameters {missing[:5]} ({len(missing)} missing)"
        )
    return key


def restore_params(state_dir: str, expected: Iterable[str], key: str) -> dict[str, np.ndarray]:
    """The parameters ``expected`` (our ``/`` paths) under ``key`` of one orbax ``TrainState``
    checkpoint, as numpy; only those arrays are read (orbax partial restore)."""
    import jax
    import orbax.checkpoint as ocp

    expected = list(expected)
    names = _saved_names(state_dir)
    wanted: dict = {}
    for e in expected:
        d = wanted
        *parents, last = f"{key}/{e}".split("/")
        for part in parents:
            d = d.setdefault(part, {})
        d[last] = names[f"{key}/{e}"]
    item = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), wanted)
    args = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
    restored = ocp.PyTreeCheckpointer().restore(
        os.path.abspath(state_dir),
        args=ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=True),
    )
    flat = flat_params(restored)
    return {e: flat[f"{key}/{e}"] for e in expected}


def base_params(base_dir: str, head: str | None = None) -> tuple[Any, dict[str, np.ndarray]]:
    """``(ModelConfig, flat float32 params)`` of an HF directory, in our layout."""
    import jax.numpy as jnp
    from flax import nnx

    from jaxrlhf import models

    model = models.from_pretrained(base_dir, head=head, dtype=jnp.float32, param_dtype=jnp.float32)
    return model.config, flat_params(nnx.state(model, nnx.Param))


def divergence_run(base_dir: str, workdir: str, *, key: str | None = None) -> list[dict[str, Any]]:
    """One ``divergence_params`` summary per checkpoint of a run (``{"step": s, ...}``), against
    the HF directory ``base_dir`` the run started from.

    The architecture (and so the HF names) comes from ``base_dir``; a run's ``config.json`` is not
    read. The base is tried as a causal LM, then with a scalar head (a reward-model run; from a
    causal-LM base its ``score`` head is the fresh initialisation of ``from_pretrained``, seed 0,
    not the run's). ``key``: the params subtree in the checkpoints (``find_params_key``).
    """
    steps = run_checkpoints(workdir)
    errors = []
    for head in (None, "scalar"):
        cfg, base = base_params(base_dir, head)
        try:
            found = find_params_key(steps[0][1], list(base), key)
            break
        except ValueError as e:
            errors.append(f"head={head}: {e}")
    else:
        raise ValueError(f"{workdir}: no checkpoint subtree matches {base_dir}: " + "; ".join(errors))
    out = []
    for step, state_dir in steps:
        params = restore_params(state_dir, list(base), found)
        out.append(
            {
                "step": step,
                "checkpoint": state_dir,
                "params_key": found,
                **divergence_params(base, params, cfg),
            }
        )
    return out


CURVE_KEYS = ("weights_mean", "biases_mean", "norms_mean", "weights_pooled", "biases_pooled", "norms_pooled")


def curve(points: list[dict[str, Any]], xs: list[Any]) -> dict[str, Any]:
    """``{"x": xs, "weights_mean": [...], ..., "points": points}`` over a list of summaries."""
    return {"x": list(xs), **{k: [p[k] for p in points] for k in CURVE_KEYS}, "points": points}
