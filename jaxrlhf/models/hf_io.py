"""HF checkpoint import/export: ``config.json`` + safetensors <-> ``Transformer``.

Each family's weight layout is a list of ``Group``s: one HF tensor <-> one or more of our
parameters with a layout transform (``T``: torch ``Linear`` ``[out, in]`` <-> our ``[in, out]``;
``split``: GPT-2 fused ``c_attn`` Conv1D ``[in, 3 * E]``; ``neox_qkv``: GPT-NeoX fused
``query_key_value`` interleaved per head, ``[H, 3, D]`` rows).

Loading reads one tensor at a time (``safetensors.safe_open``) and places it straight into its
``NamedSharding`` (``jax.make_array_from_callback``), so host memory stays bounded by the largest
tensor; the module is created abstractly (``nnx.eval_shape``) and never randomly initialised.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import logging
import math
import os
import re
import shlex
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxrlhf import paths
from jaxrlhf import sharding as shd
from jaxrlhf.models.config import ModelConfig
from jaxrlhf.models.modeling import Transformer

log = logging.getLogger(__name__)

_PREFIX = {
    "llama": "model.",
    "mistral": "model.",
    "qwen2": "model.",
    "qwen3": "model.",
    "gpt2": "transformer.",
    "gpt_neox": "gpt_neox.",
}
# Non-parameter buffers some checkpoints carry; never an error.
_IGNORABLE = (r"rotary_emb\.inv_freq$", r"\.attn\.(masked_)?bias$", r"\.attention\.(masked_)?bias$")


@dataclasses.dataclass(frozen=True)
class Group:
    """One HF tensor ``hf`` <-> our parameters ``ours`` (``/`` paths) under transform ``kind``."""

    hf: str
    ours: tuple[str, ...]
    kind: str = "id"  # id | T | split | neox_qkv
    top_level: bool = False  # HF name has no base-model prefix (lm_head, embed_out, score)


def weight_groups(cfg: ModelConfig) -> list[Group]:
    """The family's HF <-> jaxrlhf weight map for ``cfg`` (its head included)."""
    f = cfg.family
    g: list[Group] = []

    def lin(hf, ours, bias, kind="T"):
        g.append(Group(f"{hf}.weight", (f"{ours}/kernel",), kind))
        if bias:
            g.append(Group(f"{hf}.bias", (f"{ours}/bias",)))

    def norm(hf, ours):
        g.append(Group(f"{hf}.weight", (f"{ours}/scale",)))
        if cfg.norm == "layer":
            g.append(Group(f"{hf}.bias", (f"{ours}/bias",)))

    if f == "gpt2":
        g += [Group("wte.weight", ("embed",)), Group("wpe.weight", ("pos_embed",))]
        for i in range(cfg.num_layers):
            h, o = f"h.{i}", f"layers/{i}"
            qkv = tuple(f"{o}/attn/{n}_proj" for n in "qkv")
            norm(f"{h}.ln_1", f"{o}/input_norm")
            g.append(Group(f"{h}.attn.c_attn.weight", tuple(p + "/kernel" for p in qkv), "split"))
            g.append(Group(f"{h}.attn.c_attn.bias", tuple(p + "/bias" for p in qkv), "split"))
            lin(f"{h}.attn.c_proj", f"{o}/attn/o_proj", True, "id")
            norm(f"{h}.ln_2", f"{o}/post_attn_norm")
            lin(f"{h}.mlp.c_fc", f"{o}/mlp/up_proj", True, "id")
            lin(f"{h}.mlp.c_proj", f"{o}/mlp/down_proj", True, "id")
        norm("ln_f", "final_norm")
    elif f == "gpt_neox":
        g.append(Group("embed_in.weight", ("embed",)))
        for i in range(cfg.num_layers):
            h, o = f"layers.{i}", f"layers/{i}"
            qkv = tuple(f"{o}/attn/{n}_proj" for n in "qkv")
            norm(f"{h}.input_layernorm", f"{o}/input_norm")
            norm(f"{h}.post_attention_layernorm", f"{o}/post_attn_norm")
            g.append(
                Group(f"{h}.attention.query_key_value.weight", tuple(p + "/kernel" for p in qkv), "neox_qkv")
            )
            if cfg.qkv_bias:
                g.append(
                    Group(f"{h}.attention.query_key_value.bias", tuple(p + "/bias" for p in qkv), "neox_qkv")
                )
            lin(f"{h}.attention.dense", f"{o}/attn/o_proj", cfg.o_bias)
            lin(f"{h}.mlp.dense_h_to_4h", f"{o}/mlp/up_proj", True)
            lin(f"{h}.mlp.dense_4h_to_h", f"{o}/mlp/down_proj", True)
        norm("final_layer_norm", "final_norm")
    else:  # llama, mistral, qwen2, qwen3
        g.append(Group("embed_tokens.weight", ("embed",)))
        for i in range(cfg.num_layers):
            h, o = f"layers.{i}", f"layers/{i}"
            norm(f"{h}.input_layernorm", f"{o}/input_norm")
            for n in "qkv":
                lin(f"{h}.self_attn.{n}_proj", f"{o}/attn/{n}_proj", cfg.qkv_bias)
            lin(f"{h}.self_attn.o_proj", f"{o}/attn/o_proj", cfg.o_bias)
            if cfg.qk_norm:
                g.append(Group(f"{h}.self_attn.q_norm.weight", (f"{o}/attn/q_norm/scale",)))
                g.append(Group(f"{h}.self_attn.k_norm.weight", (f"{o}/attn/k_norm/scale",)))
            norm(f"{h}.post_attention_layernorm", f"{o}/post_attn_norm")
            for n in ("gate", "up", "down"):
                lin(f"{h}.mlp.{n}_proj", f"{o}/mlp/{n}_proj", cfg.mlp_bias)
        norm("norm", "final_norm")
    if cfg.head == "scalar":
        g.append(Group("score.weight", ("score/kernel",), "T", top_level=True))
    elif not cfg.tie_word_embeddings:
        name = "embed_out.weight" if f == "gpt_neox" else "lm_head.weight"
        g.append(Group(name, ("lm_head/kernel",), "T", top_level=True))
    return [dataclasses.replace(x, hf=x.hf if x.top_level else _PREFIX[f] + x.hf) for x in g]


# ---------------------------------------------------------------------------- layout transforms
def _hf_shape(group: Group, ours: Sequence[tuple[int, ...]], cfg: ModelConfig) -> tuple[int, ...]:
    if group.kind == "id":
        return tuple(ours[0])
    if group.kind == "T":
        return tuple(reversed(ours[0]))
    if group.kind == "split":  # [E, 3E] or [3E]
        return tuple(ours[0][:-1]) + (sum(s[-1] for s in ours),)
    if group.kind == "neox_qkv":  # ours [E, H*D] x3 (or [H*D] x3) -> [3*H*D, E] (or [3*H*D])
        return (3 * ours[0][-1],) + tuple(ours[0][:-1])
    raise ValueError(group.kind)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _device_layout(x: jax.Array, dtype: str, transpose: bool) -> jax.Array:
    """Cast (and transpose a 2-D weight) on device: host transposes of big bf16 tensors are slow."""
    return (x.T if transpose else x).astype(dtype)


def _as_bits(x: np.ndarray) -> np.ndarray:
    """Same bytes as an unsigned-int array: layout ops on ml_dtypes (bfloat16) are ~10x slower."""
    return x.view(np.dtype(f"u{x.dtype.itemsize}")) if x.dtype.itemsize in (1, 2, 4, 8) else x


def _to_ours(group: Group, x: np.ndarray, cfg: ModelConfig) -> list[np.ndarray]:
    """HF tensor -> our parameter(s); a pure layout change, done on the raw bits."""
    return [y.view(x.dtype) for y in _to_ours_bits(group, _as_bits(x), cfg)]


def _to_hf(group: Group, xs: list[np.ndarray], cfg: ModelConfig) -> np.ndarray:
    """Our parameter(s) -> the HF tensor; a pure layout change, done on the raw bits."""
    return _to_hf_bits(group, [_as_bits(x) for x in xs], cfg).view(xs[0].dtype)


def _to_ours_bits(group: Group, x: np.ndarray, cfg: ModelConfig) -> list[np.ndarray]:
    if group.kind == "id":
        return [x]
    if group.kind == "T":
        return [np.ascontiguousarray(x.T)]
    if group.kind == "split":
        return [np.ascontiguousarray(p) for p in np.split(x, 3, axis=-1)]
    if group.kind == "neox_qkv":
        h, d = cfg.num_heads, cfg.head_dim
        y = x.reshape((h, 3, d) + x.shape[1:])  # [H,3,D,(E)]
        parts = [y[:, j].reshape((h * d,) + x.shape[1:]) for j in range(3)]
        return [np.ascontiguousarray(p.T) for p in parts]
    raise ValueError(group.kind)


def _to_hf_bits(group: Group, xs: list[np.ndarray], cfg: ModelConfig) -> np.ndarray:
    if group.kind == "id":
        return xs[0]
    if group.kind == "T":
        return np.ascontiguousarray(xs[0].T)
    if group.kind == "split":
        return np.concatenate(xs, axis=-1)
    if group.kind == "neox_qkv":
        h, d = cfg.num_heads, cfg.head_dim
        parts = [p.T.reshape((h, d) + p.T.shape[1:]) for p in xs]  # [H,D,(E)]
        y = np.stack(parts, axis=1)  # [H,3,D,(E)]
        return np.ascontiguousarray(y.reshape((3 * h * d,) + y.shape[3:]))
    raise ValueError(group.kind)


# ---------------------------------------------------------------------------- checkpoint reading
class _Checkpoint:
    """Lazy tensor access over a directory of safetensors (or, opt-in, pickle ``.bin``) files."""

    def __init__(self, path: str, allow_pickle: bool):
        self.path = path
        self._torch: dict[str, np.ndarray] | None = None
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as fh:
                wm = json.load(fh)["weight_map"]
            self.files = {k: os.path.join(path, v) for k, v in wm.items()}
        else:
            # HF names weights model*.safetensors; other files (Mistral's consolidated.safetensors,
            # adapters) are other formats of the same or other weights.
            files = sorted(glob.glob(os.path.join(path, "model*.safetensors"))) or sorted(
                glob.glob(os.path.join(path, "*.safetensors"))
            )
            self.files = {}
            if files:
                from safetensors import safe_open

                for fn in files:
                    with safe_open(fn, framework="numpy") as fh:
                        for k in fh.keys():  # noqa: SIM118 - safe_open is not a dict
                            self.files[k] = fn
            else:
                bins = sorted(glob.glob(os.path.join(path, "*.bin")))
                if not bins:
                    raise FileNotFoundError(f"{path}: no *.safetensors (or *.bin) weight files found")
                if not allow_pickle:
                    raise ValueError(pickle_refusal(path, bins))
                import torch

                self._torch = {}
                for b in bins:
                    sd = torch.load(b, map_location="cpu", weights_only=True)
                    self._torch.update(
                        {
                            k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
                            for k, v in sd.items()
                        }
                    )
                self.files = {k: "<pickle>" for k in self._torch}
        self._shapes: dict[str, tuple[int, ...]] | None = None

    def keys(self) -> list[str]:
        return list(self.files)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Tensor shapes from the safetensors headers (no data read)."""
        if self._shapes is None:
            if self._torch is not None:
                self._shapes = {k: tuple(v.shape) for k, v in self._torch.items()}
            else:
                from safetensors import safe_open

                out = {}
                for fn in sorted(set(self.files.values())):
                    with safe_open(fn, framework="numpy") as fh:
                        for k in fh.keys():  # noqa: SIM118
                            out[k] = tuple(fh.get_slice(k).get_shape())
                self._shapes = out
        return self._shapes

    def get(self, name: str) -> np.ndarray:
        if self._torch is not None:
            return self._torch[name]
        from safetensors import safe_open

        with safe_open(self.files[name], framework="numpy") as fh:
            return fh.get_tensor(name)


def pickle_refusal(path: str, bins: Sequence[str]) -> str:
    """Why a pickle-only checkpoint is refused, and the one-liner that converts it to safetensors."""
    names = ", ".join(os.path.basename(b) for b in bins)
    return (
        f"{path} has only pickle weights ({names}); jaxrlhf loads safetensors only, since unpickling "
        "can run arbitrary code. If you trust this checkpoint, convert it once with transformers:\n"
        '  python -c "import sys, transformers as t; '
        "t.AutoModelForCausalLM.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2], "
        f'safe_serialization=True)" {shlex.quote(path)} {shlex.quote(path.rstrip(os.sep) + "-safetensors")}\n'
        "(AutoModelForSequenceClassification for a reward model; copy the tokenizer files too) and "
        "point the config at the new directory."
    )


def _resolve(path: str, allow_pickle: bool, config_key: str | None = None) -> str:
    """A local checkpoint directory, or a hub id's snapshot (``jaxrlhf.paths`` decides which)."""
    if paths.classify(path, config_key) == "local":
        path = os.path.expanduser(path)
        if not os.path.isdir(path):
            raise ValueError(f"{path} is a file; pass the checkpoint directory (config.json + *.safetensors)")
        return path
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "model*.safetensors"] + (["*.bin"] if allow_pickle else [])
        return snapshot_download(repo_id=path, allow_patterns=patterns)
    except Exception as e:  # offline, unknown repo, no huggingface_hub
        raise FileNotFoundError(
            f"{path!r}{f' (config.{config_key})' if config_key else ''} is not a local directory and "
            f"could not be fetched from the HF hub: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from e


def load_config(
    path: str,
    *,
    head: str | None = None,
    allow_pickle: bool = False,
    config_key: str | None = None,
    **overrides,
) -> ModelConfig:
    """The ``ModelConfig`` of a checkpoint (local dir or hub id) without reading any weights.

    ``overrides`` set any field (``dtype``, ``param_dtype``, ``remat``, ...). ``config_key`` (e.g.
    ``"reward.model.path"``) is named in the error for a local path that does not exist.
    """
    local = _resolve(path, allow_pickle, config_key)
    with open(os.path.join(local, "config.json")) as fh:
        return ModelConfig.from_hf(json.load(fh), head=head, **overrides)


def _pretty_mismatch(missing, unexpected, bad_shape, path) -> str:
    lines = [f"checkpoint {path} does not match the model:"]
    if missing:
        lines.append(f"  missing tensors ({len(missing)}): {missing}")
    if unexpected:
        lines.append(f"  unexpected tensors ({len(unexpected)}): {unexpected}")
    for n, got, want in bad_shape:
        lines.append(f"  wrong shape for {n}: checkpoint {got}, model expects {want}")
    return "\n".join(lines)


def _match_tensors(ckpt, cfg, groups, flat, head, local):
    """Matches our parameters with the checkpoint's tensors by name and shape before reading any
    data: ``(resolved {HF name: checkpoint key}, fresh [groups to initialise])``; raises naming the
    missing, unexpected and wrongly shaped tensors."""
    prefix = _PREFIX[cfg.family]
    available = ckpt.shapes()
    resolved: dict[str, str] = {}  # expected HF name -> checkpoint key
    missing, bad_shape, fresh = [], [], []
    for grp in groups:
        key = grp.hf
        if key not in available and key.startswith(prefix) and key[len(prefix) :] in available:
            key = key[len(prefix) :]  # base-model checkpoint saved without the prefix
        if key not in available:
            if grp.hf == "score.weight":
                fresh.append(grp)
                continue
            missing.append(grp.hf)
            continue
        want = _hf_shape(grp, [flat[o].shape for o in grp.ours], cfg)
        if tuple(available[key]) != want:
            hint = " (a scalar head needs num_labels=1)" if grp.hf == "score.weight" else ""
            bad_shape.append((key + hint, tuple(available[key]), want))
        resolved[grp.hf] = key
    used = set(resolved.values())
    droppable = (
        {"lm_head.weight", "embed_out.weight"} if (head == "scalar" or cfg.tie_word_embeddings) else set()
    )
    unexpected = [
        k
        for k in ckpt.files
        if k not in used and k not in droppable and not any(re.search(p, k) for p in _IGNORABLE)
    ]
    if missing or unexpected or bad_shape:
        raise ValueError(_pretty_mismatch(missing, unexpected, bad_shape, local))

    return resolved, fresh


def _read_tensors(ckpt, cfg, groups, resolved, fresh, flat, shardings, seed, local):
    """Reads one tensor at a time, places it (sharded, in ``param_dtype``) and drops the host copy;
    fresh scalar heads are initialised. Returns ``{our path: array}``."""
    pd = jnp.dtype(cfg.param_dtype)
    values: dict[str, jax.Array] = {}

    def put(x: np.ndarray, sharding) -> jax.Array:
        if sharding is None:
            return jnp.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    def place(name: str, x: np.ndarray, transpose: bool = False) -> jax.Array:
        """Host tensor -> device array of ``name`` in ``param_dtype``; the cast (and, for torch
        ``[out, in]`` weights, the transpose) runs on device, sharded like the target."""
        target = shardings.get(name)
        src = target
        if transpose and target is not None:
            spec = tuple(target.spec) + (None,) * (x.ndim - len(target.spec))
            src = NamedSharding(target.mesh, PartitionSpec(*reversed(spec)))
        out = _device_layout(put(x, src), pd.name, transpose)
        if target is not None and not out.sharding.is_equivalent_to(target, out.ndim):
            out = jax.device_put(out, target)
        return out

    for grp in groups:
        if grp in fresh:
            continue
        x = ckpt.get(resolved[grp.hf])
        if grp.kind == "T":
            values[grp.ours[0]] = place(grp.ours[0], x, transpose=True)
        else:
            for o, part in zip(grp.ours, _to_ours(grp, x, cfg), strict=True):
                values[o] = place(o, part)
        del x
    for grp in fresh:
        (o,) = grp.ours
        std = 1.0 / math.sqrt(cfg.hidden_size + 1)
        init = np.asarray(jax.random.normal(jax.random.key(seed), flat[o].shape, jnp.float32)) * std
        values[o] = place(o, init)
        log.info(
            "from_pretrained: %s has no score.weight; initialised a fresh scalar head (std %.4g)", local, std
        )

    return values


def from_pretrained(
    path: str,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    head: str | None = None,
    mesh: Mesh | None = None,
    rules: Sequence[tuple[str, PartitionSpec]] | None = None,
    allow_pickle: bool = False,
    remat: bool = False,
    seed: int = 0,
    config_key: str | None = None,
    attention: str = "portable",
) -> Transformer:
    """Loads an HF checkpoint (local dir or hub id) into a ``Transformer``.

    Args:
      path: directory with ``config.json`` and ``*.safetensors`` (sharded index included), or a
        hub id fetched with ``huggingface_hub.snapshot_download`` (json + safetensors only).
      dtype, param_dtype: activation and parameter dtypes (tensors are cast on load).
      head: ``None`` (causal LM) or ``"scalar"``: loads a ``*ForSequenceClassification``
        checkpoint's ``score`` (``num_labels=1``), or initialises a fresh head
        (``normal(0, 1/sqrt(hidden+1))``, no bias) on a causal-LM checkpoint (its LM head dropped).
      mesh, rules: place each tensor straight into ``NamedSharding(mesh, rule)`` as it is read
        (``rules`` default ``partition_rules(config)``); without a mesh, default device placement.
      allow_pickle: permit ``*.bin`` pickle weights (``torch.load(weights_only=True)``).
      remat: gradient-checkpoint each block in the forward.
      seed: seed of a freshly initialised scalar head.
      attention: the attention kernel (``ModelConfig.attention``).
      config_key: the config key ``path`` came from (``"model.path"``), named in the error when a
        local-looking ``path`` does not exist (a hub id is only tried for strings shaped like one).
    Raises:
      ValueError naming the missing, unexpected and wrongly shaped tensors; an unsupported
      ``model_type`` (listing the supported ones); pickle weights without ``allow_pickle``.
    """
    from jaxrlhf.models.sharding_rules import partition_rules

    local = _resolve(path, allow_pickle, config_key)
    opts = dict(dtype=dtype, param_dtype=param_dtype, remat=remat, attention=attention)
    cfg = load_config(local, head=head, **opts)
    ckpt = _Checkpoint(local, allow_pickle)

    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(seed)))
    graphdef, abs_state = nnx.split(abstract)
    flat = {shd.path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(abs_state)[0]}
    shardings: dict[str, Any] = {}
    if mesh is not None:
        sh_tree = shd.named_shardings(mesh, rules if rules is not None else partition_rules(cfg), abs_state)
        shardings = {shd.path_str(p): s for p, s in jax.tree_util.tree_flatten_with_path(sh_tree)[0]}

    groups = weight_groups(cfg)
    resolved, fresh = _match_tensors(ckpt, cfg, groups, flat, head, local)
    values = _read_tensors(ckpt, cfg, groups, resolved, fresh, flat, shardings, seed, local)

    def fill(p, leaf):
        return values[shd.path_str(p)]

    state = jax.tree_util.tree_map_with_path(fill, abs_state)
    return nnx.merge(graphdef, state)


# ---------------------------------------------------------------------------- export
def _parse_size(s: int | str) -> int:
    if isinstance(s, int):
        return s
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)\s*", s, re.I)
    if not m:
        raise ValueError(f"max_shard_size {s!r}: use bytes (int) or e.g. '5GB', '500MB'")
    unit = m.group(2).upper()
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    return int(float(m.group(1)) * base**power)


def _to_host(x: jax.Array) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def save_pretrained(model: Transformer, out_dir: str, max_shard_size: int | str = "5GB") -> list[str]:
    """Writes ``config.json`` + safetensors that transformers loads with identical outputs.

    ``AutoModelForCausalLM`` for LM models, ``AutoModelForSequenceClassification`` (``num_labels=1``)
    for ``head="scalar"``. Weights keep the parameter dtype; files above ``max_shard_size`` bytes
    are split into ``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json``. One
    tensor is gathered to host at a time and one shard is held in memory at a time. Every process
    must call it (arrays are gathered); process 0 writes. Returns the written weight file names.
    """
    from safetensors.numpy import save_file

    cfg: ModelConfig = model.config
    limit = _parse_size(max_shard_size)
    state = nnx.state(model, nnx.Param)
    flat = {shd.path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(state)[0]}
    writer = jax.process_index() == 0
    if writer:
        os.makedirs(out_dir, exist_ok=True)
    shards: list[list[str]] = []
    sizes: list[int] = []
    cur: dict[str, np.ndarray] = {}
    cur_size, total = 0, 0
    tmp_names: list[str] = []

    def flush():
        nonlocal cur, cur_size
        if not cur:
            return
        name = os.path.join(out_dir, f".shard-{len(shards):05d}.tmp")
        if writer:
            save_file(cur, name, metadata={"format": "pt"})
        tmp_names.append(name)
        shards.append(list(cur))
        sizes.append(cur_size)
        cur, cur_size = {}, 0

    for grp in weight_groups(cfg):
        if grp.kind == "T":  # transpose on device (fast), then gather
            x = _to_host(_device_layout(flat[grp.ours[0]], flat[grp.ours[0]].dtype.name, True))
        else:
            x = _to_hf(grp, [_to_host(flat[o]) for o in grp.ours], cfg)
        if cur and cur_size + x.nbytes > limit:
            flush()
        cur[grp.hf] = np.ascontiguousarray(x)
        cur_size += x.nbytes
        total += x.nbytes
    flush()

    n = len(shards)
    names = (
        ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    )
    if writer:
        for tmp, nm in zip(tmp_names, names, strict=True):
            os.replace(tmp, os.path.join(out_dir, nm))
        if n > 1:
            index = {
                "metadata": {"total_size": total},
                "weight_map": {k: nm for keys, nm in zip(shards, names, strict=True) for k in keys},
            }
            with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as fh:
                json.dump(index, fh, indent=2)
        with open(os.path.join(out_dir, "config.json"), "w") as fh:
            json.dump(cfg.to_hf(), fh, indent=2)
    return names
