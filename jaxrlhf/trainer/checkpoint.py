"""Orbax checkpoints of the ``TrainState`` plus JSON side state (data iterator, controllers).

A checkpoint is written by every process (orbax coordinates multi-host writes) into
``<workdir>/checkpoints/<step>``; orbax writes into a temporary directory and renames it when
complete, so a checkpoint half-written by ``kill -9`` is never picked up as the latest, and it
deletes old steps (``keep``) only after a new one is committed.

Integrity (docs/reliability.md):
- ``save`` stores a fingerprint of the state in the side state: per leaf,
  ``sum_i bits(x)_i * (2 i + 1) mod 2**32`` over the row-major element index ``i``, computed on
  device. tensorstore's zstd chunks carry no checksum, so a flipped byte inside a chunk otherwise
  restores silently as different numbers; with the fingerprint any single changed element is
  detected (odd weights are invertible mod 2**32) and several with probability ~1 - 2**-32.
- ``restore`` tries the newest checkpoint first. One that does not restore (an orbax/tensorstore
  read error, a fingerprint mismatch, a side state that is missing, unreadable or lacks a
  required key) is reported in one warning line naming the step, the file and the error (the
  full traceback goes to the debug log), moved aside to ``checkpoints/corrupt-<step>-<time>``
  (never deleted; orbax does not list it as a step) and the next newest is tried. If none
  restores, ``CheckpointRestoreError``; also on a later rerun while only moved-aside checkpoints
  remain, so a run never silently restarts from scratch next to them.
- A checkpoint whose arrays do not match the run's state (names or shapes: other code or another
  model) is not corrupt: ``IncompatibleCheckpoint`` names the differences and nothing is moved.
- A save that fails (disk full, file-size limit) raises ``CheckpointSaveError`` naming the step,
  the error and the intact earlier steps, from ``save`` (synchronous writes, or the previous
  asynchronous one) or from ``manager.wait_until_finished()``.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

FINGERPRINT_KEY = "_state_fingerprint"  # side-state key written by ``save``, removed by ``restore``
ASIDE_PREFIX = "corrupt-"


class CheckpointError(RuntimeError):
    """Base class of the errors below."""


class CheckpointSaveError(CheckpointError):
    """A checkpoint could not be written; the earlier ones are untouched."""


class CheckpointRestoreError(CheckpointError):
    """Checkpoints exist but none restores (each was moved aside)."""


class IncompatibleCheckpoint(CheckpointError):
    """A readable checkpoint whose arrays do not match this run's state."""


class Manager(ocp.CheckpointManager):
    """An orbax ``CheckpointManager`` whose failed asynchronous saves raise ``CheckpointSaveError``."""

    pending_step: int | None = None

    def wait_until_finished(self):
        try:
            super().wait_until_finished()
        except Exception as e:
            step, self.pending_step = self.pending_step, None
            raise _save_error(self, step, e) from e
        self.pending_step = None


def make_manager(workdir: str, cfg) -> Manager:
    """``config.checkpoint``: ``every`` (steps), ``keep`` (how many), ``async_save`` (bool)."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.keep,
        save_interval_steps=1,
        enable_async_checkpointing=cfg.async_save,
        create=True,
        cleanup_tmp_directories=True,
    )
    return Manager(os.path.abspath(os.path.join(workdir, "checkpoints")), options=options)


def has_checkpoint(workdir: str) -> bool:
    """Whether ``<workdir>/checkpoints`` holds a committed step or a moved-aside one (no orbax)."""
    return bool(step_dirs(os.path.join(workdir, "checkpoints"))) or bool(
        aside_dirs(os.path.join(workdir, "checkpoints"))
    )


def step_dirs(directory: str) -> list[int]:
    """Committed steps on disk (orbax's temporary ``<step>.orbax-checkpoint-tmp*`` excluded)."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def aside_dirs(directory: str) -> list[str]:
    """Checkpoint directories moved aside by ``restore`` (``corrupt-<step>-<time>``)."""
    if not os.path.isdir(directory):
        return []
    return sorted(n for n in os.listdir(directory) if n.startswith(ASIDE_PREFIX))


# ----------------------------------------------------------------------------------------------
# Fingerprint.
# ----------------------------------------------------------------------------------------------
def _as_uint32(x: jax.Array) -> jax.Array:
    """The element bits of ``x`` as uint32 (8-byte elements as two words on a new last axis)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)


def _leaf_fingerprint(x: jax.Array) -> jax.Array:
    """``sum_i bits(x)_i * (2 i + 1) mod 2**32`` (``i``: row-major index); sharding-independent."""
    bits = _as_uint32(x)
    index = jnp.zeros(bits.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(bits.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * jnp.uint32(stride % 2**32)
        stride *= bits.shape[axis]
    return jnp.sum(bits * (2 * index + 1), dtype=jnp.uint32)


@jax.jit
def _fingerprints(tree):
    return jax.tree.map(_leaf_fingerprint, tree)


def _path_name(path) -> str:
    """``/``-joined names of a pytree path; dataclass fields and dict keys spell the same."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def fingerprint(state: Any) -> dict[str, int]:
    """``{leaf path: fingerprint}`` of a pytree of arrays (every process gets the same dict)."""
    values = jax.device_get(_fingerprints(state))
    return {_path_name(p): int(v) for p, v in jax.tree_util.tree_flatten_with_path(values)[0]}


# ----------------------------------------------------------------------------------------------
# Save.
# ----------------------------------------------------------------------------------------------
def save(manager: ocp.CheckpointManager, step: int, state: Any, side: dict, *, force: bool = False) -> bool:
    """Saves ``state`` and the JSON-able ``side`` dict (plus the state's fingerprint) at ``step``.

    Raises ``CheckpointSaveError`` when this save (synchronous) or the previous one (asynchronous)
    failed; the earlier checkpoints are left as they were.
    """
    side = {**side, FINGERPRINT_KEY: fingerprint(state)}
    try:
        saved = manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), side=ocp.args.JsonSave(side)),
            force=force,
        )
    except CheckpointSaveError:
        raise
    except Exception as e:
        raise _save_error(manager, step, e) from e
    if saved:
        if isinstance(manager, Manager):
            manager.pending_step = step
        logging.info("checkpoint: saving step %d", step)
    return saved


def _save_error(manager, step: int | None, e: BaseException) -> CheckpointSaveError:
    directory = str(manager.directory)
    intact = ", ".join(str(s) for s in step_dirs(directory) if s != step) or "none"
    which = f"step {step}" if step is not None else "a checkpoint"
    logging.debug("checkpoint: saving %s failed", which, exc_info=e)
    return CheckpointSaveError(
        f"checkpoint: saving {which} to {directory} failed: {root_cause(e)}. "
        f"The earlier checkpoints are intact (steps: {intact}); the partial write is ignored and "
        "removed by the next run. Free disk space (or raise the file-size limit) and rerun to resume."
    )


# ----------------------------------------------------------------------------------------------
# Restore with fallback.
# ----------------------------------------------------------------------------------------------
def restore(
    manager: ocp.CheckpointManager,
    abstract_state: Any,
    *,
    required_side: Sequence[str] = ("data",),
    check_side: Callable[[dict], None] | None = None,
) -> tuple[int, Any, dict] | None:
    """``(step, state, side)`` from the newest checkpoint that restores, or ``None`` when there is none.

    Args:
      manager: from ``make_manager``.
      abstract_state: ``abstract_like(state, shardings)``: shapes, dtypes and target shardings.
      required_side: side-state keys the caller needs (e.g. PPO: ``("data", "reward_stats",
        "kl_coef")``); a checkpoint without one of them is treated as unreadable.
      check_side: optional ``fn(side)`` that applies or validates the side state (e.g. sets the
        data iterator's state) and raises if it is unusable; that checkpoint then counts as
        unreadable and the next older one's side state is passed to it.
    Raises:
      IncompatibleCheckpoint: the newest readable array tree differs from ``abstract_state``.
      CheckpointRestoreError: checkpoints exist (or were moved aside earlier) and none restores.
    """
    manager.reload()
    directory = str(manager.directory)
    failures: list[str] = []
    for step in sorted(manager.all_steps(), reverse=True):
        state = side = None
        error: BaseException | None = None
        try:
            _check_compatible(directory, step, abstract_state)
            state, side = _restore_step(manager, step, abstract_state, required_side, check_side)
        except IncompatibleCheckpoint:
            raise
        except Exception as e:
            error = e
        if _all_processes_ok(error is None, step):
            if failures:
                logging.warning(
                    "checkpoint: resuming from step %d; %d newer checkpoint(s) were unreadable and moved "
                    "aside (see above)",
                    step,
                    len(failures),
                )
            logging.info("checkpoint: restored step %d from %s", step, directory)
            return step, state, side
        _quiet_aborted_reads()
        line = _describe_failure(directory, step, error)
        aside = _move_aside(directory, step)
        failures.append(f"step {step}: {line}")
        logging.warning(
            "checkpoint %d is unreadable: %s; moved to %s; trying an older checkpoint", step, line, aside
        )
        if error is not None:
            logging.debug("checkpoint %d: full error", step, exc_info=error)
        manager.reload()
    moved = aside_dirs(directory)
    if failures or moved:
        detail = "; ".join(failures) if failures else "none left (earlier runs moved them aside)"
        raise CheckpointRestoreError(
            f"no checkpoint in {directory} restores: {detail}. Unreadable checkpoints are kept, moved "
            f"aside as {', '.join(moved)}. To start over, delete them (or use a new workdir); to retry "
            "one, move it back to its step number."
        )
    return None


def _restore_step(manager, step, abstract_state, required_side, check_side) -> tuple[Any, dict]:
    restored = manager.restore(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), side=ocp.args.JsonRestore()),
    )
    if restored["side"] is None:
        raise FileNotFoundError(f"{manager.directory}/{step}/side: no side state")
    state, side = restored["state"], dict(restored["side"])
    missing = [k for k in required_side if k not in side]
    if missing:
        raise KeyError(f"{manager.directory}/{step}/side/metadata lacks the side state {missing}")
    saved_fp = side.pop(FINGERPRINT_KEY, None)
    if saved_fp is not None:  # checkpoints written before fingerprints have none
        now = fingerprint(state)
        bad = sorted(k for k in set(saved_fp) | set(now) if saved_fp.get(k) != now.get(k))
        if bad:
            raise ValueError(
                f"{manager.directory}/{step}/state: restored values differ from the saved fingerprint in "
                f"{len(bad)} array(s) ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}): a data "
                "file is corrupt"
            )
    if check_side is not None:
        check_side(side)
    return state, side


def _check_compatible(directory: str, step: int, abstract_state: Any) -> None:
    """Raises ``IncompatibleCheckpoint`` when the saved array names/shapes differ from the run's.

    Unreadable metadata is left to the restore (it then fails as corrupt); missing metadata
    (older orbax) skips the check.
    """
    path = epath.Path(directory) / str(step) / "state"
    try:
        meta = ocp.StandardCheckpointHandler().metadata(path)
    except Exception:
        return
    tree = getattr(meta, "tree", None)
    if tree is None:
        return
    saved = {_path_name(p): tuple(v.shape) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
    want = {_path_name(p): tuple(v.shape) for p, v in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
    missing = sorted(set(want) - set(saved))
    extra = sorted(set(saved) - set(want))
    shapes = sorted(k for k in set(want) & set(saved) if want[k] != saved[k])
    if missing or extra or shapes:

        def show(keys, fmt=str):
            return ", ".join(fmt(k) for k in keys[:5]) + (
                f", ... ({len(keys)} in all)" if len(keys) > 5 else ""
            )

        parts = []
        if missing:
            parts.append(f"not in the checkpoint: {show(missing)}")
        if extra:
            parts.append(f"only in the checkpoint: {show(extra)}")
        if shapes:
            parts.append(f"shapes differ: {show(shapes, lambda k: f'{k} saved {saved[k]} now {want[k]}')}")
        raise IncompatibleCheckpoint(
            f"checkpoint {step} in {directory} was written for a different train state ("
            + "; ".join(parts)
            + "). It is readable, so nothing was moved: resume with the code and config that wrote it, "
            "or use a new workdir."
        )


def _all_processes_ok(ok: bool, step: int) -> bool:
    """Whether every process restored ``step`` (single process: ``ok``)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.asarray([int(ok)], np.int32))
    return bool(np.all(flags))


def _move_aside(directory: str, step: int) -> str:
    """Renames ``<directory>/<step>`` to ``<directory>/corrupt-<step>-<time>`` (process 0)."""
    base = os.path.join(directory, f"{ASIDE_PREFIX}{step}-{time.strftime('%Y%m%dT%H%M%S')}")
    target, n = base, 1
    while os.path.exists(target):  # the same step moved aside twice within a second
        target, n = f"{base}.{n}", n + 1
    if jax.process_index() == 0:
        os.rename(os.path.join(directory, str(step)), target)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"jaxrlhf-checkpoint-aside-{step}")
    return target


def _quiet_aborted_reads() -> None:
    """Sends the leftovers of an aborted orbax read to the debug log instead of stderr.

    When one array read fails, orbax's other read coroutines are abandoned: at garbage collection
    Python prints "Exception ignored in: <coroutine _read_array_index_and_device_put>" with the
    tensorstore spec (~60 lines), and tensorstore callbacks into the closed event loop print
    "RuntimeError: Event loop is closed". Installed once, only after a failed restore; every other
    unraisable exception still goes to the previous hook.
    """
    previous = sys.unraisablehook
    if getattr(previous, "_jaxrlhf_quiet", False):
        return

    def hook(unraisable):
        obj, exc = unraisable.object, unraisable.exc_value
        from_orbax = "orbax" in getattr(getattr(obj, "cr_code", None), "co_filename", "")
        if from_orbax or (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"):
            logging.debug("ignored after an aborted checkpoint read: %r", exc)
            return
        previous(unraisable)

    hook._jaxrlhf_quiet = True
    sys.unraisablehook = hook


_TS_KEY = re.compile(r'Error (?:reading|writing) "([^"]+)" in OCDBT database at local file "([^"]+)"')


def root_cause(e: BaseException, limit: int = 600) -> str:
    """The innermost error of an exception chain on one line (``Type: message``); a longer one
    keeps its start and end (tensorstore puts the OS error last)."""
    chain, seen = [e], {id(e)}
    while True:
        nxt = chain[-1].__cause__ or chain[-1].__context__
        if nxt is None or id(nxt) in seen:
            break
        chain.append(nxt)
        seen.add(id(nxt))
    for err in reversed(chain):
        text = " ".join(str(err).split())
        if text:
            text = f"{type(err).__name__}: {text}"
            half = (limit - 5) // 2
            return text if len(text) <= limit else f"{text[:half]} ... {text[-half:]}"
    return type(e).__name__


def _describe_failure(directory: str, step: int, error: BaseException | None) -> str:
    """``<file>: <root error>`` for a failed restore."""
    if error is None:
        return f"{directory}/{step}: restored here but not on every process"
    cause = root_cause(error)
    m = _TS_KEY.search(cause)
    if m:
        where = f"{m.group(2).rstrip('/')} (array chunk {m.group(1)})"
    elif isinstance(error, OSError) and error.filename:
        where = str(error.filename)
    else:
        where = f"{directory}/{step}"
    return f"{where}: {cause}"


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
