"""Types and ranges of every numeric (and boolean) config key, checked before a run writes anything.

``validate_config(config)`` walks ``RULES``, a table of ``Rule(key, type, allowed)`` rows:

- ``key``: dotted path from the config root (``"optim.lr"``). A key absent from a config is
  skipped: the sections differ per algorithm (``ppo`` only in PPO configs, ``critic.optim`` only
  where there is a critic). Sections that appear in several places (``optim``, ``model``) are
  written once and mounted under each prefix with ``_mount``.
- ``type``: ``int`` (a Python/NumPy integer; ``True`` is not an int), ``float`` (any real number,
  ints included; not a bool) or ``bool``.
- ``allowed``: interval notation, alternatives joined by ``" or "``: ``"(0, inf)"``, ``"[0, 1)"``,
  ``"[1, inf) or -1"``; literal alternatives are numbers or ``None``. Empty: any value of the type.

The error names the key, the value and the allowed range, e.g.
``config.optim.lr=-0.01 is outside the allowed range (0, inf)``. Cross-key constraints (one key a
multiple of another) are the ``CROSS_CHECKS`` rows below. To cover a new key, add a row.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from jaxrlhf import paths

_MISSING = object()


@dataclasses.dataclass(frozen=True)
class Rule:
    """``config.<key>`` must be of ``type`` and inside ``allowed`` (see the module docstring)."""

    key: str
    type: type
    allowed: str = ""


# ----------------------------------------------------------------------------------------------
# The table.
# ----------------------------------------------------------------------------------------------
POS = "(0, inf)"  # > 0
NONNEG = "[0, inf)"  # >= 0
AT_LEAST_1 = "[1, inf)"
UNIT_OPEN = "[0, 1)"
UNIT = "[0, 1]"

OPTIM = (
    Rule("lr", float, POS),
    Rule("warmup_steps", int, NONNEG),
    Rule("min_lr_ratio", float, UNIT),
    Rule("b1", float, UNIT_OPEN),
    Rule("b2", float, UNIT_OPEN),
    Rule("eps", float, POS),
    Rule("weight_decay", float, NONNEG),
    Rule("clip_norm", float, NONNEG),  # 0 disables clipping
)

MODEL = (
    Rule("remat", bool),
    Rule("init.vocab_size", int, AT_LEAST_1),
    Rule("init.hidden_size", int, AT_LEAST_1),
    Rule("init.intermediate_size", int, AT_LEAST_1),
    Rule("init.num_layers", int, AT_LEAST_1),
    Rule("init.num_heads", int, AT_LEAST_1),
    Rule("init.num_kv_heads", int, AT_LEAST_1),
    Rule("init.head_dim", int, AT_LEAST_1),
    Rule("init.max_position_embeddings", int, AT_LEAST_1),
    Rule("init.rope_theta", float, POS),
    Rule("init.norm_eps", float, POS),
)


def _mount(prefix: str, rules: tuple[Rule, ...]) -> tuple[Rule, ...]:
    return tuple(dataclasses.replace(r, key=f"{prefix}.{r.key}") for r in rules)


RULES: tuple[Rule, ...] = (
    # ---- common run keys
    Rule("seed", int, NONNEG),
    Rule("mesh.data", int, "[1, inf) or -1"),  # -1 fills the remaining devices
    Rule("mesh.fsdp", int, "[1, inf) or -1"),
    Rule("mesh.tensor", int, "[1, inf) or -1"),
    Rule("micro_batches", int, AT_LEAST_1),
    Rule("log_every", int, AT_LEAST_1),
    Rule("progress_bar", bool),
    Rule("max_consecutive_skips", int, AT_LEAST_1),
    Rule("guard.factor", float, NONNEG),  # 0: off; else > 1 makes sense
    Rule("guard.warmup", int, NONNEG),
    Rule("guard.decay", float, "[0, 1)"),
    Rule("guard.loss_factor", float, NONNEG),  # 0: the loss is not watched (non-finite still is)
    Rule("distributed.heartbeat_timeout_s", int, AT_LEAST_1),
    Rule("export_hf", bool),
    Rule("checkpoint.every", int, AT_LEAST_1),
    Rule("checkpoint.keep", int, AT_LEAST_1),
    Rule("checkpoint.async_save", bool),
    # ---- offline run length
    Rule("batch_size", int, AT_LEAST_1),
    Rule("total_steps", int, AT_LEAST_1),
    Rule("pad_to_multiple_of", int, AT_LEAST_1),
    Rule("prefetch", int, NONNEG),  # 0: no background batch preparation
    Rule("vocab_chunk", int, NONNEG),  # 0: the plain logits path
    Rule("eval_every", int, NONNEG),  # 0: no evaluation
    Rule("eval_batches", int, AT_LEAST_1),
    # ---- optimizers and models
    *_mount("optim", OPTIM),
    *_mount("critic.optim", OPTIM),
    *_mount("model", MODEL),
    *_mount("critic.model", MODEL),
    *_mount("reward.model", MODEL),
    # ---- data (jaxrlhf.data.DATA_DEFAULTS)
    Rule("data.eval_fraction", float, UNIT_OPEN),
    Rule("data.max_samples", int, NONNEG),  # 0: all rows
    Rule("data.max_prompt_length", int, AT_LEAST_1),
    Rule("data.max_length", int, "[2, inf)"),
    Rule("data.strict", bool),
    Rule("data.packing", bool),
    Rule("data.packed_row_buckets", int, NONNEG),  # 0: exact packed row counts
    Rule("data.bucket", bool),
    Rule("data.shuffle", bool),
    Rule("data.seed", int, NONNEG),
    Rule("data.chat_template", bool, "None"),
    # ---- reference policy
    Rule("ref.ema_decay", float, "(0, 1]"),  # 1: frozen
    Rule("ref.reset_every", int, NONNEG),  # 0: never
    Rule("ref.precompute", bool),
    # ---- sampling
    Rule("generation.max_new_tokens", int, AT_LEAST_1),
    Rule("generation.temperature", float, POS),
    Rule("generation.top_k", int, NONNEG),  # 0: off
    Rule("generation.top_p", float, "(0, 1]"),  # 1: off
    Rule("generation.reshard", bool),
    # ---- reward source (rollout algorithms) and reward-model training
    Rule("reward.missing_eos_penalty", float, NONNEG),
    Rule("reward.normalize", bool),
    Rule("reward.clip", float, NONNEG),  # 0 disables
    Rule("reward.use_margin", bool),
    Rule("bradley_terry.use_margin", bool),
    # ---- preference losses
    Rule("dpo.beta", float, POS),
    Rule("dpo.label_smoothing", float, "[0, 0.5)"),
    Rule("dpo.nll_coef", float, NONNEG),
    Rule("simpo.beta", float, POS),
    Rule("simpo.gamma", float, NONNEG),
    Rule("simpo.nll_coef", float, NONNEG),
    # ---- PPO
    Rule("ppo.iterations", int, AT_LEAST_1),
    Rule("ppo.rollout_batch_size", int, AT_LEAST_1),
    Rule("ppo.minibatch_size", int, AT_LEAST_1),
    Rule("ppo.epochs", int, AT_LEAST_1),
    Rule("ppo.shuffle_minibatches", bool),
    Rule("ppo.clip_eps", float, POS),
    Rule("ppo.value_clip_eps", float, POS),
    Rule("ppo.vf_coef", float, NONNEG),
    Rule("ppo.entropy_coef", float, NONNEG),
    Rule("ppo.gamma", float, UNIT),
    Rule("ppo.lam", float, UNIT),
    Rule("ppo.whiten_advantages", bool),
    Rule("ppo.kl_coef", float, NONNEG),
    Rule("ppo.adaptive_kl", bool),
    Rule("ppo.kl_target", float, POS),
    Rule("ppo.kl_horizon", int, AT_LEAST_1),
    Rule("ppo.coef_top", float, NONNEG),  # coordinated PPO (Wang et al.): TOP/MID/BOT token weights
    Rule("ppo.coef_mid", float, NONNEG),
    Rule("ppo.coef_bot", float, NONNEG),
    Rule("ppo.pos_coef", float, NONNEG),  # positive / negative learning weights (0: that part off)
    Rule("ppo.neg_coef", float, NONNEG),
    Rule("ppo.period", int, NONNEG),  # periodic variant; 0: off
    Rule("ppo.amplitude", float, "[0, 1]"),
    # ---- coordinated DPO and the training-dynamics probes
    Rule("dpo.early_neg_coef", float, NONNEG),
    Rule("dpo.early_until", int, NONNEG),
    Rule("dpo.late_pos_coef", float, NONNEG),
    Rule("dpo.late_from", int, NONNEG),
    Rule("analysis.every", int, NONNEG),  # 0: off
    # ---- GRPO
    Rule("grpo.samples_per_prompt", int, "[2, inf)"),  # a group needs 2 samples for a baseline
    Rule("grpo.clip_eps", float, POS),
    Rule("grpo.clip_eps_high", float, NONNEG),  # 0: symmetric (clip_eps)
    # ---- iterative DPO
    Rule("dpo_iter.rounds", int, AT_LEAST_1),
    Rule("dpo_iter.prompts_per_round", int, AT_LEAST_1),
    Rule("dpo_iter.samples_per_prompt", int, "[2, inf)"),  # best vs worst
    Rule("dpo_iter.steps_per_round", int, AT_LEAST_1),
    Rule("dpo_iter.reset_reference", bool),
    # ---- LoRA
    Rule("lora.rank", int, NONNEG),  # 0: full fine-tuning
    Rule("lora.alpha", float, POS),
    Rule("lora.dropout", float, UNIT_OPEN),  # dropout on the adapter path (training forwards only)
)


def _divides(a: str, b: str) -> tuple[tuple[str, str], Callable[[Any, Any], bool], str]:
    return (a, b), lambda x, y: y % x == 0, f"config.{b} must be a multiple of config.{a}"


# ((keys...), predicate over their values, message); skipped unless every key is present.
CROSS_CHECKS = (
    _divides("micro_batches", "batch_size"),
    _divides("ppo.minibatch_size", "ppo.rollout_batch_size"),
    _divides("micro_batches", "ppo.minibatch_size"),
    (
        ("data.max_prompt_length", "data.max_length"),
        lambda p, t: p < t,
        "config.data.max_prompt_length must be < config.data.max_length",
    ),
)


# ----------------------------------------------------------------------------------------------
# Checking.
# ----------------------------------------------------------------------------------------------
_INTERVAL = re.compile(r"^([\[(])\s*(\S+)\s*,\s*(\S+)\s*([\])])$")


def lookup(config: Any, key: str) -> Any:
    """``config.<key>`` for a dotted key, or ``_MISSING`` when any part is absent."""
    node = config
    for part in key.split("."):
        try:
            node = node[part]
        except (KeyError, TypeError, AttributeError, IndexError):
            return _MISSING
    return node


def has_type(value: Any, kind: type) -> bool:
    """``int``: an integer, ``float``: a real number, ``bool``: a bool; a bool is neither number."""
    is_bool = isinstance(value, bool | np.bool_)
    if kind is bool or is_bool:
        return kind is bool and is_bool
    if kind is int:
        return isinstance(value, numbers.Integral)
    if kind is float:
        return isinstance(value, numbers.Real)
    return isinstance(value, kind)


def in_range(value: Any, allowed: str) -> bool:
    """Whether ``value`` matches one alternative of ``allowed`` (see the module docstring)."""
    if not allowed or (value is not None and allowed.strip() == "None"):  # "None": the type, or None
        return True
    for alt in allowed.split(" or "):
        alt = alt.strip()
        m = _INTERVAL.match(alt)
        if m is None:
            if (alt == "None" and value is None) or (value is not None and _number(alt) == value):
                return True
            continue
        if value is None or not isinstance(value, numbers.Real) or math.isnan(value):
            continue
        lo, hi = _number(m.group(2)), _number(m.group(3))
        above = value >= lo if m.group(1) == "[" else value > lo
        below = value <= hi if m.group(4) == "]" else value < hi
        if above and below:
            return True
    return False


def _number(text: str) -> float:
    return float(text)  # float("inf") / float("-inf") included


def check_rule(config: Any, rule: Rule) -> None:
    """Raises ``ValueError`` when ``config.<rule.key>`` is present and breaks ``rule``."""
    value = lookup(config, rule.key)
    if value is _MISSING:
        return
    if value is None and "None" in rule.allowed.split(" or "):
        return
    if not has_type(value, rule.type):
        allowed = f" in {rule.allowed}" if rule.allowed else ""
        raise ValueError(
            f"config.{rule.key}={value!r} has type {type(value).__name__}; "
            f"expected {'a' if rule.type is not int else 'an'} {rule.type.__name__}{allowed}"
        )
    if not in_range(value, rule.allowed):
        raise ValueError(f"config.{rule.key}={value!r} is outside the allowed range {rule.allowed}")


def _plain(config: Any) -> Any:
    """The ConfigDict under a ``config_utils.ReadTracker`` (validation must not count as a read)."""
    return config.unwrap() if callable(getattr(type(config), "unwrap", None)) else config


def validate_config(config: Any, rules: tuple[Rule, ...] = RULES) -> None:
    """Checks every present key of ``rules`` and every ``CROSS_CHECKS`` row; raises ``ValueError``
    naming the key, the value and the allowed range. Reads only; call before writing anything."""
    config = _plain(config)
    for rule in rules:
        check_rule(config, rule)
    for keys, ok, message in CROSS_CHECKS:
        values = [lookup(config, k) for k in keys]
        if any(v is _MISSING for v in values):
            continue
        if not ok(*values):
            got = ", ".join(f"{k}={v!r}" for k, v in zip(keys, values, strict=True))
            raise ValueError(f"{message}, got {got}")


# ----------------------------------------------------------------------------------------------
# Paths.
# ----------------------------------------------------------------------------------------------
# Keys naming a local path or hub id; an empty value means "none" (e.g. a randomly initialised model).
PATH_KEYS = ("tokenizer", "model.path", "critic.model.path", "reward.model.path", "data.path")


def check_paths(config: Any) -> None:
    """Every ``PATH_KEYS`` value (and a path-like ``data.eval_split``) exists or is a hub id.

    Raises ``FileNotFoundError`` "no such file or directory: <path> (config.<key>)" for a missing
    local-looking path, ``ValueError`` for a string that is neither a path nor a hub id
    (``jaxrlhf.paths``). Touches no network; call before writing anything.
    """
    config = _plain(config)
    for key in PATH_KEYS:
        value = lookup(config, key)
        if isinstance(value, str) and value:
            paths.classify(value, key)
    eval_split = lookup(config, "data.eval_split")
    if isinstance(eval_split, str) and eval_split and paths.looks_local(eval_split):
        paths.classify(eval_split, "data.eval_split")  # else a split name of data.path
