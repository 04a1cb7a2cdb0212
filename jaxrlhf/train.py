r"""Train SFT, reward models, DPO, PPO and iterative DPO from one ml_collections config.

    python -m jaxrlhf.train --config=configs/dpo_hh_qwen.py --workdir=/tmp/run \
        [--config.key=value ...]

``config.algorithm`` picks the algorithm's record in ``jaxrlhf.registry``, whose driver runs it:
the offline loop (``jaxrlhf.trainer.offline``) or an online rollout loop (``jaxrlhf.algorithms.ppo``,
``jaxrlhf.algorithms.dpo_iter``), each built from the one setup path and the one run harness.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from jaxrlhf.registry import run

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to an experiment config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs, export).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config=configs/<experiment>.py is required")
    workdir = _WORKDIR.value or config.get("workdir") or os.path.join("workdirs", config.algorithm)
    logging.set_verbosity(logging.INFO)
    result = run(config, workdir)
    if result.get("interrupted"):
        logging.info("stopped by a signal after a checkpoint at step %d", result["step"])
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main))
