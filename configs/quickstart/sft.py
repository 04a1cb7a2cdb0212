r"""Quickstart stage (b): SFT of a tiny Llama from scratch on synthetic reviews.

Command (the quickstart runs it for you; this is the same stage by hand, after stage (a)):
  python -m jaxrlhf.train --config=configs/quickstart/sft.py:full,workdirs/quickstart \
      --workdir=workdirs/quickstart/sft

The config argument is ``SIZE[,QUICKSTART_WORKDIR]`` with SIZE ``full`` or ``smoke``.
Expected result (full): 600 steps in ~2 min on 2 CPU cores; the response NLL falls from ln 512 to
1.76 nats/token and samples are mixed-sentiment reviews (48 % positive); see docs/quickstart.md.
"""

from jaxrlhf import quickstart


def get_config(arg: str = "full"):
    return quickstart.stage_config("sft", arg)
