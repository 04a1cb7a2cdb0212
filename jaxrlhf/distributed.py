"""Multi-controller JAX: initialise ``jax.distributed`` from the launcher's environment.

Recognised launchers (no home-made cluster layer):
  * explicit: ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``
    (``JAX_LOCAL_DEVICE_IDS`` optional) — used by ``launch/slurm.sbatch`` and the tests;
  * SLURM with more than one task, and multi-worker TPU VMs: ``jax.distributed.initialize()``
    with no arguments, which reads their environment itself.
"""

from __future__ import annotations

import os

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


def maybe_initialize() -> None:
    """Initialises ``jax.distributed`` once when the environment describes several processes."""
    if not is_multi_process_env() or jax.distributed.is_initialized():
        return
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if "JAX_COORDINATOR_ADDRESS" in os.environ:
        local = os.environ.get("JAX_LOCAL_DEVICE_IDS")
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
            local_device_ids=[int(x) for x in local.split(",")] if local else None,
        )
    else:
        jax.distributed.initialize()
    logging.info(
        "jax.distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
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
