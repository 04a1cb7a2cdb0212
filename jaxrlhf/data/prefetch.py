"""Batches prepared in a background thread while the current step runs (``config.data.prefetch``).

``Prefetcher(iterator, place, depth)`` calls ``next(iterator)`` and ``place(host_batch)`` (collation
and ``jax.device_put`` with the batch sharding) in one daemon thread, at most ``depth`` batches
ahead of the consumer, through a bounded FIFO queue: batches come out in the iterator's order, so a
run with prefetch trains on exactly the batches of a run without it.

Each item carries the iterator's state *after* its batch (``iterator.get_state()``, taken in the
thread right after ``next``): a checkpoint saves the state of the last batch the loop consumed,
never that of a batch still waiting in the queue, so a resume continues with the batch after it.

An exception in the thread is re-raised in the consumer as a ``RuntimeError`` naming the step
whose batch failed (``StopIteration`` passes through as is). ``close()`` (also on leaving a
``with`` block, e.g. after a stop signal or an error) stops the thread and drops what it prepared.
``depth = 0`` prepares each batch in the caller's thread on ``next``: no thread.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass
class Prepared:
    """One prepared batch: the host arrays, the placed (device) batch, the iterator state after it
    and its padding fraction (``iterator.last_padding_fraction``)."""

    host: dict
    batch: Any
    state: dict
    padding_fraction: float


@dataclasses.dataclass
class _Failure:
    step: int
    error: BaseException


class Prefetcher:
    """Iterator of :class:`Prepared` batches, ``depth`` ahead (see the module docstring).

    Args:
      iterator: a ``BatchIterator`` (``next``, ``get_state``, ``last_padding_fraction``), already
        positioned (``set_state`` before this is built).
      place: ``host_batch -> device batch`` (e.g. ``functools.partial(shard_batch, mesh)``).
      depth: batches prepared ahead (the queue's bound); 0: none.
      first_step: the step that consumes the first batch (named in errors).

    Attributes:
      wait_s: seconds the consumer has spent waiting in ``next`` (the host work that was not
        hidden behind a step), reset by the caller at will.
    """

    def __init__(self, iterator, place: Callable, depth: int, *, first_step: int = 1):
        if depth < 0:
            raise ValueError(f"prefetch depth must be >= 0, got {depth}")
        self.iterator, self.place, self.depth = iterator, place, int(depth)
        self.next_step = int(first_step)
        self.wait_s = 0.0
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, self.depth))
        self._thread = None
        if self.depth > 0:
            self._thread = threading.Thread(target=self._work, name="jaxrlhf-prefetch", daemon=True)
            self._thread.start()

    def _prepare(self) -> Prepared:
        host = next(self.iterator)
        state = self.iterator.get_state()
        return Prepared(host, self.place(host), state, float(self.iterator.last_padding_fraction))

    def _work(self) -> None:
        step = self.next_step
        while not self._stop.is_set():
            try:
                item = self._prepare()
            except BaseException as e:  # StopIteration included: handed to the consumer
                item = _Failure(step, e)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.05)
                    break
                except queue.Full:
                    continue
            if isinstance(item, _Failure):
                return
            step += 1

    def __iter__(self):
        return self

    def __next__(self) -> Prepared:
        t0 = time.perf_counter()
        try:
            if self._thread is None:
                try:
                    return self._prepare()
                except StopIteration:
                    raise
                except Exception as e:
                    raise RuntimeError(f"preparing the batch of step {self.next_step} failed: {e!r}") from e
            item = self._get()
            if isinstance(item, _Failure):
                if isinstance(item.error, StopIteration):
                    raise StopIteration
                raise RuntimeError(
                    f"data prefetch: preparing the batch of step {item.step} failed: {item.error!r}"
                ) from item.error
            return item
        finally:
            self.next_step += 1
            self.wait_s += time.perf_counter() - t0

    def _get(self):
        while True:
            try:
                return self._queue.get(timeout=1.0)
            except queue.Empty:
                if (self._thread is None or not self._thread.is_alive()) and self._queue.empty():
                    raise RuntimeError("data prefetch thread ended without a batch") from None

    def close(self) -> None:
        """Stops the thread (it may be blocked on a full queue) and drops the prepared batches."""
        self._stop.set()
        if self._thread is not None:
            while self._thread.is_alive():
                try:
                    while True:
                        self._queue.get_nowait()
                except queue.Empty:
                    pass
                self._thread.join(timeout=0.05)
            self._thread = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
