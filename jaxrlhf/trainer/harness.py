"""The one run harness every driver shares: config checks, restore, stop signal, logging, the
non-finite-skip check, checkpoints and the HF export, with cleanup on every exit path.

A driver reads::

    with harness.Run(config, workdir, algorithm, total=N) as run:
        start, state, side = run.restore(state, shardings, side)
        for i in range(start + 1, N + 1):
            state, metrics = ...                   # one step / iteration / round
            run.check_skips(state, i)
            run.log(i, metrics)
            if run.end_iteration(i, state, side):  # checkpoints when due; True: stop requested
                break
    run.export(graphdef, state.params)
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
from absl import logging

from jaxrlhf import config_utils, config_validation, distributed
from jaxrlhf import lora as lora_lib
from jaxrlhf.trainer import checkpoint
from jaxrlhf.trainer.guard import describe as describe_guard
from jaxrlhf.trainer.logger import Logger, quiet_libraries
from jaxrlhf.trainer.setup import export_hf, export_lora

# Keys every driver may change between a run and its resumption: how long or how loudly a run goes,
# never the state it saves. Algorithms add their own (``Algorithm.resumable_keys``).
COMMON_RESUMABLE_KEYS = (
    "log_every",
    "checkpoint.",
    "export_hf",
    "progress_bar",
    "max_consecutive_skips",
    "compilation_cache_dir",
    "distributed.",
    "prefetch",  # how far ahead batches are prepared, never which batches
    "vocab_chunk",  # how the log-softmax is tiled, never what it computes
)

# Keys added after runs were saved, with the value that means the behaviour those runs had: a
# ``config.json`` that lacks one compares as if it held that value (old checkpoints stay resumable).
ADDED_KEYS = {"guard.loss_factor": 0.0, "data.packed_row_buckets": 0}


class TooManySkips(RuntimeError):
    """``config.max_consecutive_skips`` updates in a row had a non-finite loss or gradient."""


def check_renamed_keys(config, algorithm) -> None:
    """An old config key that a user's file may still set fails with the key that replaced it."""
    flat = config_utils.flatten(config_utils.unwrap(config))
    for old, new in algorithm.renamed_keys.items():
        if any(k == old or k.startswith(old + ".") for k in flat):
            raise ValueError(f"config.{old} was renamed: set config.{new} instead")


class Run:
    """Scaffolding of one run of ``algorithm`` in ``workdir`` for ``total`` iterations (its unit)."""

    def __init__(self, config, workdir: str, algorithm, *, total: int):
        self.config, self.workdir, self.algorithm, self.total = config, workdir, algorithm, total
        self.unit = algorithm.unit
        self.manager = checkpoint.make_manager(workdir, config.checkpoint)
        self._check_config(refuse=self.manager.latest_step() is not None)
        self.stop = None
        self.log_ = None
        self.result: dict[str, Any] = {"interrupted": False, "history": [], "step": 0}
        self._last_logged: tuple[int, dict] | None = None  # (i, metrics) of the last log()
        self.lora_base: dict | None = None  # a LoRA run's base model record, saved in every checkpoint

    # ------------------------------------------------------------------ start
    def __enter__(self):
        return self

    def restore(self, state, shardings, side: dict | None = None, *, required=("data",), check_side=None):
        """``(start, state, side)``: the newest checkpoint that restores (an unreadable one is
        reported, moved aside and the next older tried), or ``(0, state, side)`` on a fresh run;
        writes ``config.json`` now that training starts.

        ``side`` holds the defaults of the side state (data-iterator position, reward statistics, ...);
        a checkpoint missing one of ``required`` counts as unreadable; ``check_side(saved)`` may
        raise to reject a checkpoint whose side state does not load (e.g. the iterator's).
        """
        side = dict(side or {})
        start = 0
        frozen = state.frozen  # LoRA's base: not checkpointed, checked against the checkpoint's record
        if frozen is not None:
            self.lora_base = lora_lib.base_record(frozen, self.config.model.path, checkpoint.fingerprint)
            state, shardings = state.replace(frozen=None), shardings.replace(frozen=None)
        abstract = checkpoint.abstract_like(state, shardings)
        restored = checkpoint.restore(self.manager, abstract, required_side=required, check_side=check_side)
        if restored is not None:
            start, state, saved = restored
            saved = dict(saved)
            base = saved.pop("lora_base", None)
            if frozen is not None:
                lora_lib.check_base(base, self.lora_base, f"{self.workdir} step {start}")
            side = {**side, **saved}
        state = state.replace(frozen=frozen)
        distributed.note_checkpoint(self.workdir, start if restored is not None else None)
        self._write_config()
        self.stop = checkpoint.StopSignal()
        self.log_ = Logger(self.workdir, self.total, start, progress_bar=self.config.progress_bar)
        self.result["step"] = start
        return start, state, side

    def _resumable(self) -> tuple[str, ...]:
        return COMMON_RESUMABLE_KEYS + tuple(self.algorithm.resumable_keys)

    def _check_config(self, *, refuse: bool) -> None:
        """Names the keys that changed since the saved ``config.json``: an error when there is a
        checkpoint to resume, a log line when there is none (a failed start never blocks a rerun)."""
        path = os.path.join(self.workdir, "config.json")
        if not os.path.exists(path):
            return
        with open(path) as f:
            saved = _with_added_keys(json.load(f))
        bad = config_utils.incompatible_keys(saved, config_utils.unwrap(self.config), self._resumable())
        if bad and not refuse:
            logging.info("no checkpoint in %s; config changed since its config.json: %s", self.workdir, bad)
        elif bad:
            raise ValueError(
                f"cannot resume from {self.workdir}: the config differs from the saved one in "
                + "; ".join(bad)
            )

    def _write_config(self) -> None:
        if jax.process_index() == 0:
            os.makedirs(self.workdir, exist_ok=True)
            with open(os.path.join(self.workdir, "config.json"), "w") as f:
                f.write(config_utils.to_json(config_utils.unwrap(self.config)))

    # ------------------------------------------------------------------ per iteration
    @property
    def logger(self) -> Logger:
        return self.log_

    def check_skips(self, state, i: int) -> None:
        """Stops the run when the last ``max_consecutive_skips`` updates were all skipped (a
        non-finite loss or gradient, or a divergence-guard spike), naming the step, the last logged
        values, the guard's statistics and what to try."""
        consecutive = int(jax.device_get(state.consecutive_skips))
        if consecutive < self.config.max_consecutive_skips:
            return
        keys = ("loss", "grad_norm", "guard_spike", "guard_loss_spike", "skipped")
        logged = ""
        if self._last_logged is not None:
            step, m = self._last_logged
            shown = ", ".join(f"{k}={float(m[k]):.4g}" for k in keys if k in m and np.ndim(m[k]) == 0)
            logged = f" Last logged ({self.unit} {step}, mean over the logging window): {shown}."
        newest = self.manager.latest_step()
        newest = "none" if newest is None else f"{self.unit} {newest}"
        raise TooManySkips(
            f"{self.algorithm.name} {self.unit} {i}: {consecutive} consecutive steps had a non-finite "
            "loss or gradient, or a divergence-guard spike (config.guard); stopping without applying "
            f"any of them.{logged} {describe_guard(state.guard)}. No checkpoint was written during "
            f"the streak (newest: {newest}). Try: lower optim.lr, check the data, use float32 compute "
            "(model.dtype); if the spikes are legitimate changes, raise config.guard.factor / "
            "config.guard.loss_factor (0 turns each off) or config.max_consecutive_skips."
        )

    def log(self, i: int, metrics: dict, *, console: bool | None = None) -> dict:
        """Writes ``metrics`` (tensorboard, console) and keeps them in ``result["history"]``."""
        if console is None:
            console = i % self.config.log_every == 0 or i == self.total
        metrics = self.log_.write(i, metrics, console=console)
        self._last_logged = (i, metrics)
        self.result["history"].append(metrics)
        self.result["metrics"] = metrics
        return metrics

    def log_analysis(self, i: int, metrics: dict) -> None:
        """Writes probe metrics (``analysis/...``) and keeps them in ``result["analysis"]``."""
        self.result.setdefault("analysis", []).append({"step": i, **metrics})
        self.log_.write_prefixed(i, "analysis", {k.removeprefix("analysis/"): v for k, v in metrics.items()})

    def end_iteration(self, i: int, state, side: dict) -> bool:
        """Checkpoints when due (every ``checkpoint.every``, at the end, on a stop signal) unless a
        streak of skipped (non-finite) updates is open: the last checkpoint then stays the one
        from before the streak. Returns True when a stop signal asks the driver to leave its loop."""
        self.result["step"] = i
        stop = self.stop.requested
        due = i % self.config.checkpoint.every == 0 or stop or i == self.total
        if due and int(jax.device_get(state.consecutive_skips)) > 0:
            logging.warning("%s %d: no checkpoint while updates are being skipped", self.unit, i)
            due = False
        if due:
            if self.lora_base is not None:
                state, side = state.replace(frozen=None), {**side, "lora_base": self.lora_base}
            checkpoint.save(self.manager, i, state, side, force=True)
            distributed.note_checkpoint(self.workdir, i)
        if stop:
            self.result["interrupted"] = True
        return stop

    # ------------------------------------------------------------------ end
    def __exit__(self, *exc):
        self.manager.wait_until_finished()
        if self.stop is not None:
            self.stop.restore_handlers()
        if self.log_ is not None:
            self.log_.close()
        return False

    def export(self, graphdef, params, frozen=None) -> None:
        """``<workdir>/hf`` in HF format when ``config.export_hf`` and the run was not interrupted;
        with LoRA (``frozen``: the base) the merged model there and the adapters in ``<workdir>/peft``."""
        if not self.config.export_hf or self.result["interrupted"]:
            return
        if frozen is None:
            self.result["export_dir"] = export_hf(graphdef, params, os.path.join(self.workdir, "hf"))
        else:
            out = export_lora(self.config, graphdef, params, frozen, self.workdir)
            self.result["export_dir"] = out["hf"]
            self.result["peft_dir"] = out.get("peft")


def _with_added_keys(saved: dict) -> dict:
    """``saved`` (a ``config.json``) with each absent ``ADDED_KEYS`` entry set to its old-behaviour value."""
    for key, value in ADDED_KEYS.items():
        *parents, leaf = key.split(".")
        node = saved
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.setdefault(leaf, value)
    return saved


def enable_compilation_cache(path: str) -> None:
    """JAX's persistent compilation cache in ``path`` (``config.compilation_cache_dir``; "" = off):
    a rerun or a resume of the same config loads its compiled steps instead of compiling them."""
    if not path:
        return
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    logging.info("persistent compilation cache: %s", path)


def start(config, algorithm) -> None:
    """What every driver does first, before anything is written: ``jax.distributed`` from the
    environment (a lost peer process then stops this one with a clear error, ``distributed``),
    quiet library logs, renamed keys, every numeric key's range and type (``config_validation``),
    local paths, then the algorithm's own validation."""
    distributed.maybe_initialize(config.distributed.heartbeat_timeout_s)
    quiet_libraries()
    enable_compilation_cache(config.compilation_cache_dir)
    check_renamed_keys(config, algorithm)
    config_validation.validate_config(config)  # ranges and types of every numeric key, before any write
    config_validation.check_paths(config)  # a missing local path says so, naming its key
    if algorithm.validate is not None:
        algorithm.validate(config)
    logging.info("algorithm: %s", algorithm.name)
