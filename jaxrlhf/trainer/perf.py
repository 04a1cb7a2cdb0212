"""The share of a run's wall time spent outside the compiled step (``perf/host_fraction``), measured
without syncing the training loop.

The loop tells :class:`StepClock` when each step call returned (``dispatched(out)``, ``out`` one of
the step's outputs). A watcher thread blocks on each output in turn (``block_until_ready``: the
loop itself never waits) and stamps when it is ready. Step ``i`` keeps the device busy from
``max(returned_i, ready_{i-1})`` to ``ready_i``; per logging window::

    host_fraction = 1 - sum_i busy_i / window wall time

Host work that overlaps a running step (prefetched collation and transfer, the next dispatch) does
not count; data the loop waited for, compiles (the step call returns after compiling), logging,
evaluation and checkpoints do. The ready stamps can come late by the watcher thread's wake-up
time, so the busy time is an upper bound and the fraction a lower bound.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time

import jax


class StepClock:
    """Device-busy accounting of dispatched steps (see the module docstring)."""

    def __init__(self):
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._busy = 0.0
        self._last_ready = 0.0
        self._window_start = time.perf_counter()
        self._thread = threading.Thread(target=self._watch, name="jaxrlhf-step-clock", daemon=True)
        self._thread.start()

    def dispatched(self, out) -> None:
        """Call right after a step call returned; ``out``: one of its (device) outputs."""
        self._queue.put((time.perf_counter(), out))

    def _watch(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                self._queue.task_done()
                return
            returned, out = item
            with contextlib.suppress(Exception):  # a failed step: the loop reports it
                jax.block_until_ready(out)
            ready = time.perf_counter()
            with self._lock:
                self._busy += max(0.0, ready - max(returned, self._last_ready))
                self._last_ready = ready
            self._queue.task_done()

    def host_fraction(self) -> float:
        """The window's host fraction since the previous call (waits for the dispatched steps,
        which a logging point has already synchronised)."""
        self._queue.join()
        now = time.perf_counter()
        with self._lock:
            wall = max(now - self._window_start, 1e-9)
            busy, self._busy, self._window_start = self._busy, 0.0, now
        return min(1.0, max(0.0, 1.0 - busy / wall))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5.0)
