"""Optax chains from ``config.optim``: AdamW/Adafactor/SGD, warmup schedules, decay masks, clipping.

``config.optim`` keys (all read here):
  name: "adamw" | "adafactor" | "sgd".
  lr: peak learning rate.
  schedule: "constant" | "cosine" | "linear" (after ``warmup_steps`` of linear warmup from 0).
  warmup_steps: int.
  min_lr_ratio: final lr / peak lr for "cosine" and "linear".
  b1, b2, eps: Adam moments (b1 doubles as SGD momentum).
  weight_decay: decoupled weight decay (AdamW).
  no_decay: regexes (``re.search`` on the ``/``-joined parameter path) exempt from weight decay.
  clip_norm: global-norm clipping (0 disables).
"""

from __future__ import annotations

import re

import jax
import optax

from jaxrlhf.sharding import path_str


def make_schedule(cfg, total_steps: int) -> optax.Schedule:
    warmup = int(cfg.warmup_steps)
    if warmup < 0 or not 0.0 <= cfg.min_lr_ratio <= 1.0:
        raise ValueError(
            "config.optim: warmup_steps must be >= 0 and min_lr_ratio in [0, 1], "
            f"got {warmup}, {cfg.min_lr_ratio}"
        )
    decay_steps = max(int(total_steps) - warmup, 1)
    if cfg.schedule == "constant":
        main = optax.constant_schedule(cfg.lr)
    elif cfg.schedule == "cosine":
        main = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        main = optax.linear_schedule(cfg.lr, cfg.lr * cfg.min_lr_ratio, decay_steps)
    else:
        raise ValueError(f"config.optim.schedule={cfg.schedule!r}; expected constant, cosine or linear")
    if warmup <= 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), main], [warmup])


def decay_mask(patterns):
    """A mask function: True where weight decay applies (no ``no_decay`` regex matches)."""
    compiled = [re.compile(p) for p in patterns]

    def mask(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: not any(c.search(path_str(path)) for c in compiled), params
        )

    return mask


def make_optimizer(cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer and its learning-rate schedule (logged each step)."""
    schedule = make_schedule(cfg, total_steps)
    if cfg.name == "adamw":
        opt = optax.adamw(
            schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
            mask=decay_mask(cfg.no_decay),
        )  # fmt: skip
    elif cfg.name == "adafactor":
        opt = optax.adafactor(
            schedule, weight_decay_rate=cfg.weight_decay or None, weight_decay_mask=decay_mask(cfg.no_decay)
        )
    elif cfg.name == "sgd":
        opt = optax.sgd(schedule, momentum=cfg.b1 or None)
    else:
        raise ValueError(f"config.optim.name={cfg.name!r}; expected adamw, adafactor or sgd")
    chain = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm and cfg.clip_norm > 0 else []
    return optax.chain(*chain, opt), schedule
