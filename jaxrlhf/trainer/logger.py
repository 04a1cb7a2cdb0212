"""Logs people read: tensorboardX events, concise console lines, a tqdm bar (process 0 only)."""

from __future__ import annotations

import logging as std_logging
import os
import time

import jax
import numpy as np
from absl import logging
from tqdm import tqdm


class _QuietLibraries(std_logging.Filter):
    """Keeps orbax's and jax's INFO chatter out of the console (warnings still pass)."""

    def filter(self, record):
        noisy = "/orbax/" in record.pathname or "/jax/_src/" in record.pathname
        return record.levelno >= std_logging.WARNING or not noisy


def quiet_libraries() -> None:
    f = _QuietLibraries()
    for h in std_logging.getLogger("absl").handlers + std_logging.getLogger().handlers:
        if not any(isinstance(x, _QuietLibraries) for x in h.filters):
            h.addFilter(f)


class Logger:
    def __init__(self, workdir: str, total_steps: int, start_step: int, *, progress_bar: bool):
        self.main = jax.process_index() == 0
        quiet_libraries()
        self.writer = None
        if self.main:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(os.path.join(workdir, "tb"))
        self.bar = None
        if self.main and progress_bar:
            self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, unit="step")
        self._t = time.perf_counter()
        self._tokens = 0.0

    def count_tokens(self, real: float, padded: float):
        self._tokens += real
        if self.bar is not None:
            self.bar.update(1)

    def write(self, step: int, metrics: dict[str, float], *, console: bool = True):
        """Writes scalars; adds ``tokens_per_s`` since the previous write."""
        now = time.perf_counter()
        elapsed = max(now - self._t, 1e-9)
        metrics = dict(metrics)
        metrics["perf/tokens_per_s"] = self._tokens / elapsed
        self._t, self._tokens = now, 0.0
        if not self.main:
            return metrics
        for k, v in metrics.items():
            if np.ndim(v) == 0 and np.isfinite(v):
                self.writer.add_scalar(k, float(v), step)
        self.writer.flush()
        if self.bar is not None:
            loss = metrics.get("loss", metrics.get("train/loss", float("nan")))  # PPO logs train/loss
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{metrics['perf/tokens_per_s']:.0f}")
        if console:
            shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()) if np.ndim(v) == 0)
            logging.info("step %d: %s", step, shown)
        return metrics

    def write_prefixed(self, step: int, prefix: str, metrics: dict[str, float]):
        if self.main:
            for k, v in metrics.items():
                self.writer.add_scalar(f"{prefix}/{k}", float(v), step)
            self.writer.flush()
            logging.info(
                "step %d %s: %s", step, prefix, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())
            )

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def mean_metrics(history: list[dict]) -> dict[str, float]:
    """Host means of a list of device metric dicts (one ``device_get`` for all)."""
    if not history:
        return {}
    host = jax.device_get(history)
    return {k: float(np.mean([h[k] for h in host])) for k in host[0]}
