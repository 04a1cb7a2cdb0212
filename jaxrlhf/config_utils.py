"""Config helpers: which keys a run read (no dead flags) and which keys changed on resume."""

from __future__ import annotations

import json
from typing import Any

import ml_collections


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b.c": leaf}`` for a ConfigDict / dict (lists and tuples are leaves)."""
    out = {}
    items = cfg.items() if hasattr(cfg, "items") else []
    for k, v in items:
        key = f"{prefix}{k}"
        if isinstance(v, ml_collections.ConfigDict | dict):
            sub = flatten(v, key + ".")
            out.update(sub if sub else {key: {}})
        else:
            out[key] = v
    return out


def to_json(cfg: ml_collections.ConfigDict) -> str:
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=str)


def _normalise(v):
    return json.loads(json.dumps(v, default=str))


def incompatible_keys(saved: dict, current: ml_collections.ConfigDict, resumable=()) -> list[str]:
    """Keys whose values differ between a saved config dict and ``current``, except ``resumable``
    ones (a key, or a prefix ending in "." for a whole section)."""
    a, b = flatten(saved), flatten(_normalise(current.to_dict()))
    keys = sorted(set(a) | set(b))
    bad = []
    for k in keys:
        if any(k == r or (r.endswith(".") and k.startswith(r)) for r in resumable):
            continue
        if _normalise(a.get(k, "<missing>")) != _normalise(b.get(k, "<missing>")):
            bad.append(f"{k}: saved={a.get(k, '<missing>')!r} now={b.get(k, '<missing>')!r}")
    return bad


class ReadTracker:
    """A read-only view of a ConfigDict that records every key path read through it."""

    def __init__(self, cfg, reads: set[str] | None = None, prefix: str = ""):
        object.__setattr__(self, "_cfg", cfg)
        object.__setattr__(self, "_reads", set() if reads is None else reads)
        object.__setattr__(self, "_prefix", prefix)

    @property
    def reads(self) -> set[str]:
        return self._reads

    def _wrap(self, key, value):
        path = f"{self._prefix}{key}"
        self._reads.add(path)
        if isinstance(value, ml_collections.ConfigDict):
            return ReadTracker(value, self._reads, path + ".")
        return value

    def __getattr__(self, key):
        return self._wrap(key, getattr(self._cfg, key))

    def __getitem__(self, key):
        return self._wrap(key, self._cfg[key])

    def __contains__(self, key):
        return key in self._cfg

    def get(self, key, default=None):
        return self._wrap(key, self._cfg.get(key, default)) if key in self._cfg else default

    def keys(self):
        return self._cfg.keys()

    def __iter__(self):
        return iter(self._cfg.keys())

    def __len__(self):
        return len(self._cfg.keys())

    def items(self):
        return [(k, self[k]) for k in self._cfg.keys()]  # noqa: SIM118 - ConfigDict

    def to_dict(self):
        return self._cfg.to_dict()

    def unwrap(self):
        return self._cfg


def unwrap(cfg):
    return cfg.unwrap() if isinstance(cfg, ReadTracker) else cfg


def unread_keys(cfg: ml_collections.ConfigDict, reads: set[str]) -> list[str]:
    """Leaf keys of ``cfg`` that were never read (a leaf counts as read if it or a parent was)."""
    out = []
    for k in flatten(cfg):
        parts = k.split(".")
        if not any(".".join(parts[: i + 1]) in reads for i in range(len(parts) - 1, len(parts))):
            out.append(k)
    return out
