"""Meshes and partition rules: sharding is data.

A mesh comes from the config as named axes (``data``, ``fsdp``, ``tensor``; one ``-1`` fills the
remaining devices). Parameters are placed by a list of ``(regex, PartitionSpec)`` rules matched
with ``re.search`` against each parameter's ``/``-joined path: the first match wins and an
unmatched parameter is an error naming it. Batches are sharded on their leading axis over
``("data", "fsdp")``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

Rules = Sequence[tuple[str, PartitionSpec]]


def mesh_shape(axes: Mapping[str, int], n_devices: int) -> dict[str, int]:
    """Resolves a ``{axis: size}`` mapping with at most one ``-1`` against ``n_devices``."""
    unknown = set(axes) - set(AXES)
    if unknown:
        raise ValueError(f"config.mesh has unknown axes {sorted(unknown)}; allowed: {list(AXES)}")
    sizes = {a: int(axes.get(a, 1)) for a in AXES}
    fill = [a for a, s in sizes.items() if s == -1]
    if len(fill) > 1:
        raise ValueError(f"config.mesh: at most one axis may be -1, got {fill}")
    if any(s == 0 or s < -1 for s in sizes.values()):
        raise ValueError(f"config.mesh: sizes must be positive or -1, got {sizes}")
    known = math.prod(s for s in sizes.values() if s != -1)
    if fill:
        if n_devices % known:
            raise ValueError(f"config.mesh {sizes}: {n_devices} devices not divisible by {known}")
        sizes[fill[0]] = n_devices // known
    if math.prod(sizes.values()) > n_devices or (
        jax.process_count() > 1 and math.prod(sizes.values()) != n_devices
    ):
        raise ValueError(
            f"config.mesh {sizes} has {math.prod(sizes.values())} devices but {n_devices} are available"
        )
    return sizes


def make_mesh(axes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``Mesh`` with axes ``("data", "fsdp", "tensor")`` from a config mapping.

    A single process may ask for fewer devices than it has (e.g. ``data=1`` on an 8-device host):
    the mesh then uses the first ones. Several processes must use every device.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(axes, len(devices))
    shape = tuple(sizes[a] for a in AXES)
    devices = devices[: math.prod(shape)]
    try:
        dev_array = jax.experimental.mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # fake CPU devices / unusual topologies: plain row-major order
        dev_array = np.asarray(devices).reshape(shape)
    return Mesh(dev_array, AXES)


def path_str(path: tuple[Any, ...]) -> str:
    """``/``-joined string of a pytree key path (dict keys, attributes, sequence indices).

    A trailing ``.value`` attribute (the array inside an ``nnx.Param``) is dropped, so an
    ``nnx.State`` and its pure-dict form give the same names (``layers/0/attn/q_proj/kernel``).
    """
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        path = path[:-1]
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(str(k.name))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif hasattr(k, "key"):
            parts.append(str(k.key))
        else:
            parts.append(str(k))
    return "/".join(parts)


def spec_for(rules: Rules, name: str, ndim: int) -> PartitionSpec:
    """The first rule whose regex ``re.search``-matches ``name``; raises if none does."""
    for pattern, spec in rules:
        if re.search(pattern, name):
            if len(spec) > ndim:
                raise ValueError(f"partition rule {pattern!r} gives {spec} for {name!r} of rank {ndim}")
            return spec
    raise ValueError(
        f"no partition rule matches parameter {name!r}; add a (regex, PartitionSpec) rule for it "
        f"(rules tried: {[p for p, _ in rules]})"
    )


def match_partition_rules(rules: Rules, tree: Any) -> Any:
    """Pytree of ``PartitionSpec`` for ``tree``; scalars get ``PartitionSpec()``."""

    def one(path, leaf):
        ndim = len(getattr(leaf, "shape", ()))
        if ndim == 0:
            return PartitionSpec()
        return spec_for(rules, path_str(path), ndim)

    return jax.tree_util.tree_map_with_path(one, tree)


def fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """Drops mesh axes from ``spec`` on dimensions they do not divide (e.g. a tiny vocab)."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=False):
        if axes is None:
            out.append(None)
            continue
        names = axes if isinstance(axes, tuple) else (axes,)
        kept = tuple(a for a in names if a in mesh.shape)
        size = math.prod(mesh.shape[a] for a in kept)
        out.append(None if (not kept or dim % size) else (kept if len(kept) > 1 else kept[0]))
    return PartitionSpec(*out)


def named_shardings(mesh: Mesh, rules: Rules, tree: Any) -> Any:
    """Pytree of ``NamedSharding`` for ``tree`` (arrays or ``ShapeDtypeStruct``s) under ``rules``."""
    specs = match_partition_rules(rules, tree)
    return jax.tree.map(
        lambda leaf, spec: NamedSharding(mesh, fit_spec(spec, getattr(leaf, "shape", ()), mesh)),
        tree,
        specs,
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a batch array of any rank: leading axis over ``("data", "fsdp")``, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def shard_batch(mesh: Mesh, batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """Places this process's part of a global batch onto the mesh.

    Single process: ``batch`` is the global batch. Several processes: ``batch`` is this process's
    contiguous slice of it, and the global array is assembled with
    ``jax.make_array_from_process_local_data``.
    """
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        sharding = batch_sharding(mesh)
        if jax.process_count() == 1:
            out[k] = jax.device_put(v, sharding)
        else:
            out[k] = jax.make_array_from_process_local_data(sharding, v)
    return out


# Logical axis names of activations -> mesh axes. Model and trainer code constrain activations
# by logical names so that a mesh change never touches model code.
LOGICAL_RULES: dict[str, Any] = {
    "batch": BATCH_AXES,
    "length": None,
    "embed": None,
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
}

_ACTIVE_MESH: list[Mesh] = []


class activation_mesh:  # noqa: N801 - used as a context manager, like jax.sharding.use_mesh
    """Context in which ``constrain`` pins activations to ``mesh`` by logical axis names."""

    def __init__(self, mesh: Mesh | None):
        self.mesh = mesh

    def __enter__(self):
        _ACTIVE_MESH.append(self.mesh)
        return self.mesh

    def __exit__(self, *exc):
        _ACTIVE_MESH.pop()


def active_mesh() -> Mesh | None:
    """The innermost ``activation_mesh``'s mesh, or None outside one."""
    return _ACTIVE_MESH[-1] if _ACTIVE_MESH else None


def axis_size(name: str) -> int:
    """Size of mesh axis ``name`` in the active ``activation_mesh`` (1 outside one)."""
    mesh = active_mesh()
    return 1 if mesh is None else int(dict(mesh.shape).get(name, 1))


def logical_spec(names: Sequence[str | None]) -> PartitionSpec:
    return PartitionSpec(*(LOGICAL_RULES.get(n) if n is not None else None for n in names))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical axis names; a no-op outside ``activation_mesh``."""
    mesh = active_mesh()
    if mesh is None or mesh.size == 1:
        return x
    spec = fit_spec(logical_spec(names), x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
