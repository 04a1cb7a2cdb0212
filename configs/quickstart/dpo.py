r"""Quickstart stage (e): DPO from the SFT model on the best/worst sample pairs (DPO paper recipe).

Command (after stages (a)-(c)):
  python -m jaxrlhf.train --config=configs/quickstart/dpo.py:full,workdirs/quickstart \
      --workdir=workdirs/quickstart/dpo

The reference is the frozen SFT model. The config argument is ``SIZE[,QUICKSTART_WORKDIR]``.
Expected result (full): rewards/accuracy 0.85, margin 0.47 after 150 steps; held-out gold reward
0.68 vs SFT's 0.49 (docs/quickstart.md).
"""

from jaxrlhf import quickstart


def get_config(arg: str = "full"):
    return quickstart.stage_config("dpo", arg)
