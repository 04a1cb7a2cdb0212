r"""Quickstart stage (d): a Bradley-Terry reward model on the SFT model's best/worst sample pairs.

Command (after stages (a)-(c)):
  python -m jaxrlhf.train --config=configs/quickstart/reward.py:full,workdirs/quickstart \
      --workdir=workdirs/quickstart/reward

Initialised from the SFT export with a fresh scalar head (its LM head dropped). The config argument
is ``SIZE[,QUICKSTART_WORKDIR]``. Expected result (full): held-out pair accuracy 0.76 (train 0.89) after 150 steps.
"""

from jaxrlhf import quickstart


def get_config(arg: str = "full"):
    return quickstart.stage_config("reward", arg)
