"""LoRA (Hu et al. 2021, arXiv:2106.09685) as a pure transform of the parameter pytree.

A targeted kernel ``W [in, out]`` (``y = x @ W``) stays frozen; the run trains two adapter matrices
``A [in, r]`` and ``B [r, out]`` and the model sees

    W_eff = W + (alpha / r) * A @ B

(PEFT's ``W + (alpha/r) * B·A`` in torch's ``[out, in]`` layout). ``B`` starts at zero, so step 0
is the base model exactly (``W + 0 == W`` bit for bit).

Design: the forward never forms ``W_eff``. ``adapt`` replaces each targeted kernel leaf of the
model's parameter tree by a ``models.modeling.AdaptedKernel`` ``(W, A, B)``, and the model's
``Linear`` computes ``x @ W + (alpha / r) * (dropout(x) @ A) @ B`` (PEFT's form, so
``config.lora.dropout`` is exact): no ``[in, out]`` gradient of ``W_eff`` in the backward, no
merged copy in the sampler (docs/lora.md has the measured FLOPs and bytes against merging).
``merge``/``materialize`` (``W + s·A@B``) remain for exports and comparisons. The train state
splits the parameters into

* ``params`` (trainable): a tree mirroring the model's, holding ``{"lora_a", "lora_b"}`` in place
  of each targeted kernel, plus the leaves trained in full (``config.lora.full``: the scalar head);
* ``frozen``: every other base leaf, sharded like the base, outside the optimizer.

The reference policy is the base with the adapters off (no reference copy); an EMA reference is
an EMA of the adapters (of ``A`` and ``B`` separately: its weights are ``W + s·EMA(A)·EMA(B)``,
not the EMA of ``W_eff``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxrlhf.models.modeling import AdaptedKernel

# The attention and MLP projections of every family (all families share these parameter names).
DEFAULT_TARGETS = r"(attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)/kernel$"
# Leaves trained in full: the scalar head of reward models and critics.
DEFAULT_FULL = r"(^|/)score/kernel$"
INITS = ("kaiming", "gaussian")
DROPOUT_SALT = 0x10AD  # folded into the loss's key before the per-layer paths (dropout keys only)
ADAPTER_KEYS = ("lora_a", "lora_b")


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """``config.lora`` with ``rank > 0``; ``targets``/``full`` are regexes searched in the
    ``/``-joined parameter path (``layers/0/attn/q_proj/kernel``; PPO: ``actor/layers/...``)."""

    rank: int
    alpha: float
    targets: str = DEFAULT_TARGETS
    full: str = DEFAULT_FULL
    init: str = "kaiming"
    dropout: float = 0.0  # on the adapter path's input, training forwards only

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def from_config(config) -> LoraSpec | None:
    """The spec of ``config.lora`` (every key read and checked), or ``None`` when ``rank == 0``
    (or the config has no ``lora`` section)."""
    c = config.get("lora")
    if c is None:
        return None
    rank, alpha, targets, full, init, dropout = c.rank, c.alpha, c.targets, c.full, c.init, c.dropout
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ValueError(f"config.lora.rank={rank!r}; expected an int >= 0 (0: LoRA off)")
    if not alpha > 0:
        raise ValueError(f"config.lora.alpha={alpha!r}; expected > 0")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"config.lora.dropout={dropout!r}; expected a rate in [0, 1)")
    if init not in INITS:
        raise ValueError(f"config.lora.init={init!r}; expected one of {INITS}")
    for key, pattern in (("targets", targets), ("full", full)):
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"config.lora.{key}={pattern!r} is not a regex: {e}") from None
    if rank == 0:
        return None
    return LoraSpec(
        rank=int(rank), alpha=float(alpha), targets=targets, full=full, init=init, dropout=float(dropout)
    )


# ----------------------------------------------------------------------------------------------
# Nested-dict trees keyed by their original keys (ints for layer lists).
# ----------------------------------------------------------------------------------------------
def flatten(tree, prefix: tuple = ()) -> dict[tuple, Any]:
    """``{key tuple: leaf}`` of a nested dict (``None`` and empty dicts have no leaves)."""
    out: dict[tuple, Any] = {}
    if tree is None:
        return out
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def unflatten(flat: dict[tuple, Any]) -> dict:
    out: dict = {}
    for keys, leaf in flat.items():
        node = out
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = leaf
    return out


def name(keys: tuple) -> str:
    return "/".join(str(k) for k in keys)


def is_adapter(keys: tuple) -> bool:
    return len(keys) > 0 and keys[-1] in ADAPTER_KEYS


# ----------------------------------------------------------------------------------------------
# Split and merge.
# ----------------------------------------------------------------------------------------------
def classify(params, spec: LoraSpec) -> dict[tuple, str]:
    """``{key tuple: "full" | "lora" | "frozen"}`` for every leaf (``full`` wins over ``targets``).
    A targeted leaf that is not a 2-D ``Linear`` kernel (a path ending in ``kernel``) raises, naming it."""
    full, targets = re.compile(spec.full), re.compile(spec.targets)
    kinds = {}
    for keys, leaf in flatten(params).items():
        path = name(keys)
        if full.search(path):
            kinds[keys] = "full"
        elif targets.search(path):
            if len(leaf.shape) != 2 or keys[-1] != "kernel":
                raise ValueError(
                    f"config.lora.targets matches {path!r} of shape {leaf.shape}; LoRA adapts the 2-D "
                    "kernels of Linear layers (paths ending in /kernel)"
                )
            kinds[keys] = "lora"
        else:
            kinds[keys] = "frozen"
    if "lora" not in kinds.values():
        raise ValueError(f"config.lora.targets={spec.targets!r} matches no 2-D parameter")
    return kinds


def adapter_shardings(w_sharding) -> tuple[Any, Any]:
    """``A`` sharded like ``W``'s input dimension, ``B`` like its output dimension."""
    if not isinstance(w_sharding, NamedSharding):
        return w_sharding, w_sharding
    spec = tuple(w_sharding.spec) + (None,) * (2 - len(w_sharding.spec))
    mesh = w_sharding.mesh
    a = NamedSharding(mesh, PartitionSpec(spec[0], None))  # [in, r]
    b = NamedSharding(mesh, PartitionSpec(None, spec[1]))  # [r, out]
    return a, b


def init_a(key: jax.Array, shape: tuple[int, int], init: str, rank: int, dtype) -> jax.Array:
    """PEFT's initialisations of ``A [in, r]``: ``kaiming`` = ``U(-1/sqrt(in), 1/sqrt(in))``
    (torch ``kaiming_uniform_(a=sqrt(5))``), ``gaussian`` = ``N(0, 1/r)`` (std ``1/r``)."""
    if init == "kaiming":
        bound = 1.0 / np.sqrt(shape[0])
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return jax.random.normal(key, shape, dtype) / rank


def split(params, spec: LoraSpec, seed: int) -> tuple[dict, dict]:
    """``(trainable, frozen)`` from a base parameter tree (arrays, sharded or not).

    Frozen and fully trained leaves are the base arrays themselves (no copy); the adapters are
    created sharded like their kernel (``adapter_shardings``); ``A`` is drawn from
    ``fold_in(key(seed), crc32(path))`` (independent of the tree's order), ``B`` is zero.
    """
    kinds = classify(params, spec)
    flat = flatten(params)
    trainable = {k: v for k, v in flat.items() if kinds[k] == "full"}
    frozen = {k: v for k, v in flat.items() if kinds[k] != "full"}
    targets = [k for k in flat if kinds[k] == "lora"]
    shardings = {}
    for k in targets:
        sa, sb = adapter_shardings(getattr(flat[k], "sharding", None))
        shardings[k + ("lora_a",)], shardings[k + ("lora_b",)] = sa, sb
    shapes = {k: (tuple(flat[k].shape), flat[k].dtype) for k in targets}

    def make():
        out = {}
        root = jax.random.key(seed)
        for k, (shape, dtype) in shapes.items():
            key = jax.random.fold_in(root, zlib.crc32(name(k).encode()))
            out[k + ("lora_a",)] = init_a(key, (shape[0], spec.rank), spec.init, spec.rank, dtype)
            out[k + ("lora_b",)] = jnp.zeros((spec.rank, shape[1]), dtype)
        return out

    if any(s is None for s in shardings.values()):
        adapters = jax.jit(make)()
    else:
        adapters = jax.jit(make, out_shardings=shardings)()
    trainable.update(adapters)
    return unflatten(trainable), unflatten(frozen)


def delta(a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """``scale * A @ B`` ``[in, out]`` in float32 at full precision (TPUs default to bf16 passes)."""
    ab = jnp.dot(a.astype(jnp.float32), b.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return scale * ab


def merge(trainable, frozen, scale: float) -> dict:
    """The model's parameter tree: frozen leaves, ``W + scale·A@B`` where ``trainable`` has
    adapters for ``W`` (a tree without them, or ``None``, leaves ``W`` as it is: adapters off),
    and ``trainable``'s fully trained leaves. Pure; use inside ``jit``.
    """
    t = flatten(trainable)
    out = {}
    for keys, w in flatten(frozen).items():
        a = t.get(keys + ("lora_a",))
        if a is None:
            out[keys] = w
        else:
            out[keys] = (w.astype(jnp.float32) + delta(a, t[keys + ("lora_b",)], scale)).astype(w.dtype)
    for keys, v in t.items():
        if not is_adapter(keys):
            out[keys] = v
    return unflatten(out)


def adapt(trainable, frozen, scale: float, rate: float = 0.0) -> dict:
    """The model's parameter tree with each adapted kernel as an ``AdaptedKernel(W, A, B)`` (no merge):
    the frozen leaves, ``trainable``'s fully trained leaves, and ``AdaptedKernel`` (dropout ``rate``,
    no key yet: ``with_dropout`` adds them) where ``trainable`` has adapters for ``W`` (a tree without
    them, or ``None``, leaves ``W`` as it is: adapters off). Pure; no array is created."""
    t = flatten(trainable)
    out = {}
    for keys, w in flatten(frozen).items():
        a = t.get(keys + ("lora_a",))
        out[keys] = w if a is None else AdaptedKernel(w, a, t[keys + ("lora_b",)], scale=scale, rate=rate)
    out.update({k: v for k, v in t.items() if not is_adapter(k)})
    return unflatten(out)


def with_dropout(tree, rng: jax.Array) -> dict:
    """``tree`` (from ``adapt``) with a dropout key in each ``AdaptedKernel`` whose rate is > 0:
    ``fold_in(fold_in(rng, DROPOUT_SALT), crc32(path))``, so every layer draws its own mask and the
    masks are a function of the step's key (resume stays bit-exact)."""
    root = jax.random.fold_in(rng, DROPOUT_SALT)
    out = {}
    for keys, v in flatten(tree).items():
        if isinstance(v, AdaptedKernel) and v.rate > 0:
            v = dataclasses.replace(v, rng=jax.random.fold_in(root, zlib.crc32(name(keys).encode())))
        out[keys] = v
    return unflatten(out)


def without_adapters(tree) -> dict | None:
    """``tree`` less its adapters (the reference of a frozen-reference LoRA run: adapters off);
    ``None`` when nothing is left."""
    rest = {k: v for k, v in flatten(tree).items() if not is_adapter(k)}
    return unflatten(rest) if rest else None


def _merge_kernels(ws, abs_, bs, scale):
    return [
        (w.astype(jnp.float32) + delta(a, b, scale)).astype(w.dtype)
        for w, a, b in zip(ws, abs_, bs, strict=True)
    ]


@functools.lru_cache(maxsize=8)
def _kernel_merger(shardings: tuple):
    """``_merge_kernels`` jitted with each output sharded like its kernel (one compile per layout)."""
    if any(s is None for s in shardings):
        return jax.jit(_merge_kernels, static_argnums=3)
    return jax.jit(_merge_kernels, static_argnums=3, out_shardings=list(shardings))


def materialize(trainable, frozen, scale: float) -> dict:
    """``merge`` outside a step (export, sampler, scoring): untargeted leaves are the frozen
    arrays themselves (no copy); only the targeted kernels are merged (one jitted call, each
    output sharded like its kernel)."""
    t, f = flatten(trainable), flatten(frozen)
    targets = [k for k in f if k + ("lora_a",) in t]
    ws = [f[k] for k in targets]
    merger = _kernel_merger(tuple(getattr(w, "sharding", None) for w in ws))
    merged = merger(ws, [t[k + ("lora_a",)] for k in targets], [t[k + ("lora_b",)] for k in targets], scale)
    out = dict(f)
    out.update(zip(targets, merged, strict=True))
    out.update({k: v for k, v in t.items() if not is_adapter(k)})
    return unflatten(out)


def count(tree) -> int:
    return int(sum(np.prod(v.shape) for v in flatten(tree).values()))


# ----------------------------------------------------------------------------------------------
# The base a LoRA checkpoint was trained on.
# ----------------------------------------------------------------------------------------------
def base_record(frozen, model_path: str, fingerprint_fn) -> dict:
    """``{"path", "fingerprint"}`` of the frozen base (a hash of the per-leaf bit fingerprints
    ``fingerprint_fn(tree) -> {path: int}``; any changed element changes it)."""
    fp = fingerprint_fn(frozen)
    digest = hashlib.sha256(json.dumps(sorted(fp.items())).encode()).hexdigest()[:16]
    return {"path": model_path or "(random init)", "fingerprint": digest}


def check_base(saved: dict | None, current: dict, where: str) -> None:
    """Refuses to resume a LoRA checkpoint onto a different base, naming both."""
    if saved is None:
        raise ValueError(
            f"{where}: the checkpoint records no LoRA base model; it was not written by a LoRA run"
        )
    if saved.get("fingerprint") != current["fingerprint"]:
        raise ValueError(
            f"{where}: this LoRA checkpoint was trained on base {saved.get('path')} (fingerprint "
            f"{saved.get('fingerprint')}), but this run's base is {current['path']} (fingerprint "
            f"{current['fingerprint']}); resume with the checkpoint's base model"
        )


# ----------------------------------------------------------------------------------------------
# PEFT export.
# ----------------------------------------------------------------------------------------------
def _host(x) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


# HF layouts (``hf_io.Group.kind``) whose weight is a GPT-2 ``Conv1D`` ``[in, out]`` (PEFT: fan_in_fan_out).
_CONV1D_KINDS = ("id", "split")


def _peft_groups(model_config) -> dict[str, tuple[Any, int]]:
    """``{our kernel path: (hf_io.Group, index of the kernel in it)}`` of every 2-D HF weight."""
    from jaxrlhf.models.hf_io import weight_groups

    out = {}
    for g in weight_groups(model_config):
        if g.hf.endswith(".weight") and all(o.endswith("/kernel") for o in g.ours):
            for i, ours in enumerate(g.ours):
                out[ours] = (g, i)
    return out


def _module_adapter(group, parts: dict[int, tuple[np.ndarray, np.ndarray]], model_config):
    """One HF module's PEFT ``(lora_A [R, in], lora_B [out, R])`` from our adapters ``{index in the
    group: (A [in, r], B [r, out])}`` of its parts, ``R = r * len(parts)``.

    ``delta = sum_j A_j B_j`` placed at part ``j``'s output columns is ``[A_1 | A_2 | ...] @
    blockdiag(B_1, B_2, ...)``: ``lora_A`` = the ``A``s side by side (transposed), ``lora_B`` = the
    block matrix (zeros for untargeted parts) put into the HF output order by the group's own
    layout transform (``hf_io._to_hf``: GPT-2 ``c_attn`` columns ``[q | k | v]``, GPT-NeoX
    ``query_key_value`` rows interleaved per head), transposed for ``Conv1D`` layouts.
    """
    from jaxrlhf.models.hf_io import _to_hf

    order = sorted(parts)
    r = parts[order[0]][0].shape[1]
    a = np.concatenate([parts[j][0] for j in order], axis=1)  # [in, R]
    c = model_config
    dims = [c.num_heads * c.head_dim] + [c.num_kv_heads * c.head_dim] * 2  # fused q, k, v outputs
    blocks = []
    for j, _ in enumerate(group.ours):
        out_dim = parts[j][1].shape[1] if j in parts else dims[j]
        bj = np.zeros((len(order) * r, out_dim), a.dtype)  # our kernel layout [in = R, out_j]
        if j in parts:
            k = order.index(j)
            bj[k * r : (k + 1) * r] = parts[j][1]
        blocks.append(bj)
    hf_b = _to_hf(group, blocks, model_config)  # the HF weight layout with in = R
    b = hf_b.T if group.kind in _CONV1D_KINDS else hf_b  # [out, R]
    return np.ascontiguousarray(a.T), np.ascontiguousarray(b)


def peft_tensors(trainable, spec: LoraSpec, model_config) -> tuple[dict[str, np.ndarray], list[str], int]:
    """``({PEFT tensor name: array}, target module names, PEFT rank)`` for a causal LM.

    PEFT layout: ``lora_A.weight [R, in]``, ``lora_B.weight [out, R]``, ``delta_W = (alpha'/R) B A``
    in torch's ``[out, in]``. Our targeted kernels map to HF modules one-to-one (Llama-like families,
    GPT-2's ``c_proj``/``c_fc``, GPT-NeoX's ``dense*``) or several to one fused module (GPT-2
    ``c_attn``, GPT-NeoX ``query_key_value``: q, k and v), whose adapter is the exact sum of the
    parts', of rank ``r`` per part (``_module_adapter``). PEFT and vLLM take one rank per adapter,
    so every module is written at ``R`` = the largest (others padded with zero rows of ``A`` and zero
    columns of ``B``, which change nothing) and ``alpha' = alpha * R / r`` keeps the scale ``alpha / r``.
    Fully trained leaves (``config.lora.full``) and scalar-head models have no PEFT LoRA form and raise.
    """
    if model_config.head is not None:
        raise ValueError("PEFT export covers causal LMs; a scalar-head model is exported merged only")
    t = flatten(trainable)
    full = [name(k) for k in t if not is_adapter(k)]
    if full:
        raise ValueError(f"PEFT export: fully trained leaves {full[:3]} have no LoRA form (config.lora.full)")
    groups = _peft_groups(model_config)
    modules: dict[str, tuple[Any, dict]] = {}
    for keys in sorted((k[:-1] for k in t if k[-1] == "lora_a"), key=name):
        if name(keys) not in groups:
            family = model_config.family
            raise ValueError(f"PEFT export: {name(keys)} maps to no HF weight of family {family!r}")
        g, j = groups[name(keys)]
        ab = (_host(t[keys + ("lora_a",)]), _host(t[keys + ("lora_b",)]))
        modules.setdefault(g.hf[: -len(".weight")], (g, {}))[1][j] = ab
    adapters = {m: _module_adapter(g, parts, model_config) for m, (g, parts) in modules.items()}
    rank = max(a.shape[0] for a, _ in adapters.values())
    tensors = {}
    for module, (a, b) in adapters.items():
        pad = rank - a.shape[0]
        tensors[f"base_model.model.{module}.lora_A.weight"] = np.pad(a, ((0, pad), (0, 0)))
        tensors[f"base_model.model.{module}.lora_B.weight"] = np.pad(b, ((0, 0), (0, pad)))
    return tensors, list(adapters), rank


def export_peft(trainable, spec: LoraSpec, model_config, out_dir: str, base_path: str) -> str:
    """Writes ``adapter_config.json`` + ``adapter_model.safetensors`` that
    ``peft.PeftModel.from_pretrained(base, out_dir)`` loads (and vLLM serves) on the HF base."""
    from safetensors.numpy import save_file

    tensors, modules, rank = peft_tensors(trainable, spec, model_config)
    if jax.process_index() == 0:
        os.makedirs(out_dir, exist_ok=True)
        save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
        cfg = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_path,
            "r": rank,
            "lora_alpha": spec.alpha * rank / spec.rank,  # the scale alpha' / R = alpha / r
            "lora_dropout": spec.dropout,
            "target_modules": modules,
            "bias": "none",
            "fan_in_fan_out": model_config.family == "gpt2",  # GPT-2's Conv1D weights are [in, out]
            "inference_mode": True,
            "init_lora_weights": True,
            "use_rslora": False,
            "modules_to_save": None,
        }
        with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
    return out_dir
