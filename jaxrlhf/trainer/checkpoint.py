"""Orbax checkpoints of the ``TrainState`` plus JSON side state (data iterator, controllers).

A checkpoint is written by every process (orbax coordinates multi-host writes) into
``<workdir>/checkpoints/<step>``; orbax writes into a temporary directory and renames it when
complete, so a checkpoint half-written by ``kill -9`` is never picked up as the latest.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging


def make_manager(workdir: str, cfg) -> ocp.CheckpointManager:
    """``config.checkpoint``: ``every`` (steps), ``keep`` (how many), ``async_save`` (bool)."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.keep,
        save_interval_steps=1,
        enable_async_checkpointing=cfg.async_save,
        create=True,
        cleanup_tmp_directories=True,
    )
    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")), options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any, side: dict, *, force: bool = False) -> bool:
    saved = manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), side=ocp.args.JsonSave(side)),
        force=force,
    )
    if saved:
        logging.info("checkpoint: saving step %d", step)
    return saved


def restore(manager: ocp.CheckpointManager, abstract_state: Any) -> tuple[int, Any, dict] | None:
    """``(step, state, side)`` from the latest complete checkpoint, or ``None`` when there is none."""
    step = manager.latest_step()
    if step is None:
        return None
    restored = manager.restore(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), side=ocp.args.JsonRestore()),
    )
    logging.info("checkpoint: restored step %d from %s", step, manager.directory)
    return step, restored["state"], dict(restored["side"])


def abstract_like(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class StopSignal:
    """Turns SIGTERM (and SIGINT) into a flag the loop polls between steps: save, then exit."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self._event = threading.Event()
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for s in signals:
                self._previous[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        logging.warning("received signal %d: will checkpoint and stop after this step", signum)
        self._event.set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def restore_handlers(self):
        for s, h in self._previous.items():
            signal.signal(s, h)
