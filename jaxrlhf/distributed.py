"""Multi-controller JAX: initialise ``jax.distributed`` from the launcher's environment, and stop
with a clear error when another process of the run is gone.

Recognised launchers (no home-made cluster layer):
  * explicit: ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``
    (``JAX_LOCAL_DEVICE_IDS`` optional) — used by ``launch/slurm.sbatch`` and the tests;
  * SLURM with more than one task, and multi-worker TPU VMs: ``jax.distributed.initialize()``
    with no arguments, which reads their environment itself.

A lost peer (killed, crashed, preempted). Left to JAX, a process blocked in a collective with a
dead peer waits until the coordination service misses the peer's heartbeats, then aborts in C++
(``LOG(FATAL)``, exit -6, a stack dump of every thread: about a minute with JAX's default timeout).
JAX offers no Python hook for it (jaxlib 0.10's client takes a ``missed_heartbeat_callback`` but
cannot pass it the error: ``std::bad_cast``). So ``PeerWatch``, a daemon thread, writes this
process's beat into JAX's key-value store and reads the others': a peer whose beat has not moved
for ``heartbeat_timeout_s`` (``config.distributed.heartbeat_timeout_s``), one that reports a
failure (``mark_failed``), or a store that stops answering (the coordinator, process 0, is gone)
ends this process with ``runtime_failed_message`` and exit ``PEER_LOST_EXIT_CODE``. JAX's own
heartbeat timeout is set to ``JAX_TIMEOUT_FACTOR`` times that, so ours comes first.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time

import jax
import numpy as np
from absl import logging


def is_multi_process_env() -> bool:
    if int(os.environ.get("JAX_NUM_PROCESSES", "1")) > 1:
        return True
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts


PEER_LOST_EXIT_CODE = 75  # EX_TEMPFAIL (sysexits.h): a temporary failure; rerunning resumes
DEFAULT_HEARTBEAT_TIMEOUT_S = 100
JAX_TIMEOUT_FACTOR = 3  # JAX's coordination heartbeat timeout, in units of ours
# key-value store directory of the beats: <process> -> "<counter>" | "finished" | "failed: <error>"
_PREFIX = "jaxrlhf/alive/"

# Where the run resumes from, for the message of a process whose peer is gone (the harness keeps it).
_resume: dict = {"workdir": None, "checkpoint": None}


def note_checkpoint(workdir: str, step: int | None) -> None:
    """Records the run's ``workdir`` and newest checkpoint ``step`` for ``runtime_failed_message``."""
    _resume.update(workdir=workdir, checkpoint=step)


def runtime_failed_message(cause: str) -> str:
    """The message a process prints when another process of the run is gone (``cause``)."""
    where = "the last checkpoint"
    if _resume["workdir"] is not None:
        step = _resume["checkpoint"]
        last = f"step {step}" if step is not None else "none yet: it starts over"
        where = f"the last checkpoint in {_resume['workdir']} ({last})"
    return (
        f"jaxrlhf: process {jax.process_index()} of {jax.process_count()}: the distributed runtime failed: "
        f"{cause}\njaxrlhf: stopping this process (exit {PEER_LOST_EXIT_CODE}) instead of waiting for it. "
        f"Rerun the same command on every process: the run resumes from {where}.\n"
    )


class PeerWatch(threading.Thread):
    """Peer liveness over JAX's key-value store (see the module docstring).

    Every ``period`` seconds: write this process's beat counter, read every process's entry. A peer
    whose counter has not changed for ``timeout`` seconds, or whose entry says ``failed``, or no
    successful read for ``timeout`` seconds, calls ``on_lost(cause)`` (default: print
    ``runtime_failed_message`` and ``os._exit``). A peer that wrote ``finished`` is no longer watched.
    """

    def __init__(self, client, process: int, processes: int, timeout: float, on_lost=None):
        super().__init__(name="jaxrlhf-peer-watch", daemon=True)
        self.client, self.process, self.processes, self.timeout = client, process, processes, timeout
        self.period = max(0.2, timeout / 10)
        self.on_lost = on_lost or _exit_lost
        self.done = threading.Event()
        self._beat = 0

    def _key(self, process: int) -> str:
        return f"{_PREFIX}{process}"

    def put(self, value: str) -> None:
        self.client.key_value_set(self._key(self.process), value, allow_overwrite=True)

    def finish(self, value: str = "finished") -> None:
        """Stops watching and tells the peers this process will beat no more (``value``)."""
        if self.done.is_set():
            return
        self.done.set()
        try:
            self.put(value)
        except Exception as e:  # the store is gone too: nothing left to tell
            logging.debug("peer watch: could not write %r: %s", value, e)

    def run(self) -> None:
        now = time.monotonic()
        seen = {p: (None, now) for p in range(self.processes) if p != self.process}
        last_ok = now
        while not self.done.wait(self.period):
            now = time.monotonic()
            try:
                self._beat += 1
                self.put(str(self._beat))
                entries = dict(self.client.key_value_dir_get(_PREFIX))
                last_ok = now
            except Exception as e:
                if now - last_ok > self.timeout:
                    return self._lost(
                        f"the coordination service stopped answering for {self.timeout:g} s "
                        f"(process 0, which runs it, is most likely gone): {e}"
                    )
                continue
            cause = self._check(entries, seen, now)
            if cause is not None:
                return self._lost(cause)

    def _check(self, entries: dict, seen: dict, now: float) -> str | None:
        for p, (value, since) in list(seen.items()):
            got = entries.get(self._key(p))
            if got == "finished":
                del seen[p]
            elif got is not None and got.startswith("failed"):
                # the same error usually stops this process too: give it a moment to say so itself
                self.done.wait(min(5.0, self.timeout))
                return f"process {p} {got}"
            elif got != value:
                seen[p] = (got, now)
            elif now - since > self.timeout:
                return (
                    f"process {p} sent no heartbeat for {self.timeout:g} s "
                    "(config.distributed.heartbeat_timeout_s): it is gone (killed, crashed or preempted)"
                )
        return None

    def _lost(self, cause: str) -> None:
        if not self.done.is_set():
            self.on_lost(cause)


def _exit_lost(cause: str) -> None:
    os.write(2, runtime_failed_message(cause).encode())
    os._exit(PEER_LOST_EXIT_CODE)


_watch: PeerWatch | None = None


def mark_finished() -> None:
    """This process ends normally: its peers stop watching it (the harness calls it at a run's end)."""
    if _watch is not None:
        _watch.finish()


def mark_failed(error: BaseException) -> None:
    """This process stops on ``error``: its peers stop too, naming it, instead of waiting for it."""
    if _watch is not None:
        _watch.finish("failed: " + " ".join(f"{type(error).__name__}: {error}".split())[:500])


def _start_watch(timeout: float) -> None:
    global _watch
    from jax._src import distributed as jax_distributed  # the client JAX connected (no public accessor)

    client = jax_distributed.global_state.client
    if client is None or not hasattr(client, "key_value_dir_get"):
        logging.warning("no jax.distributed key-value client: a lost peer is left to JAX's own timeout")
        return
    _watch = PeerWatch(client, jax.process_index(), jax.process_count(), timeout)
    _watch.start()
    atexit.register(mark_finished)  # runs before JAX's shutdown barrier (atexit is last-in first-out)
    previous = sys.excepthook

    def excepthook(kind, value, tb):  # an uncaught error (before atexit): the peers stop too, naming it
        mark_failed(value)
        previous(kind, value, tb)

    sys.excepthook = excepthook


def maybe_initialize(heartbeat_timeout_s: int = DEFAULT_HEARTBEAT_TIMEOUT_S) -> None:
    """Initialises ``jax.distributed`` once when the environment describes several processes, and
    starts the ``PeerWatch`` that stops this process clearly when another one is gone for
    ``heartbeat_timeout_s`` seconds."""
    if not is_multi_process_env() or jax.distributed.is_initialized():
        return
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {"heartbeat_timeout_seconds": int(heartbeat_timeout_s) * JAX_TIMEOUT_FACTOR}
    if "JAX_COORDINATOR_ADDRESS" in os.environ:
        local = os.environ.get("JAX_LOCAL_DEVICE_IDS")
        kwargs.update(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
            local_device_ids=[int(x) for x in local.split(",")] if local else None,
        )
    jax.distributed.initialize(**kwargs)
    _start_watch(heartbeat_timeout_s)
    logging.info(
        "jax.distributed: process %d of %d, %d local / %d global devices; peers watched (timeout %d s)",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
        int(heartbeat_timeout_s),
    )


def gather(x) -> np.ndarray:
    """A (possibly multi-process) global array as one host numpy array on every process."""
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def local_rows(rows: np.ndarray) -> np.ndarray:
    """This process's contiguous part of a global list of rows."""
    n, p = len(rows), jax.process_count()
    per = n // p
    return rows[jax.process_index() * per : (jax.process_index() + 1) * per]
