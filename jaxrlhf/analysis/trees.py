"""Inner products of parameter-shaped pytrees (gradients, updates, parameter differences), jittable.

All sums run in float32 over every leaf: for pytrees ``a``, ``b`` with the same structure,
``tree_vdot(a, b) = sum_leaves sum(a * b)``, ``tree_norm(a) = sqrt(tree_vdot(a, a))`` and
``tree_cosine(a, b) = tree_vdot(a, b) / (|a| |b|)`` (0 when either is zero). ``tree_sq_diff``
gives the per-leaf mean squared difference, the in-memory form of ``divergence``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def tree_vdot(a: Any, b: Any) -> jax.Array:
    """``sum over leaves of sum(a * b)``, float32 scalar."""
    parts = jax.tree.map(lambda x, y: jnp.sum(x.astype(jnp.float32) * y.astype(jnp.float32)), a, b)
    return sum(jax.tree.leaves(parts), jnp.zeros((), jnp.float32))


def tree_norm(a: Any) -> jax.Array:
    """Global L2 norm over all leaves, float32 scalar."""
    return jnp.sqrt(tree_vdot(a, a))


def tree_cosine(a: Any, b: Any, eps: float = 1e-30) -> jax.Array:
    """``<a, b> / (|a| |b|)`` over all leaves; 0 when either tree is zero."""
    den = jnp.sqrt(tree_vdot(a, a) * tree_vdot(b, b))
    return jnp.where(den > eps, tree_vdot(a, b) / jnp.maximum(den, eps), 0.0)


def tree_sq_diff(a: Any, b: Any) -> Any:
    """Per-leaf ``mean((b - a) ** 2)`` (float32 scalars, same structure)."""
    return jax.tree.map(
        lambda x, y: jnp.mean(jnp.square(y.astype(jnp.float32) - x.astype(jnp.float32))), a, b
    )
