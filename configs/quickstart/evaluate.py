r"""Quickstart stage (g): held-out evaluation settings (``jaxrlhf.evaluate``), judged by the gold scorer.

Command (one policy by hand, after the training stages):
  python -m jaxrlhf.evaluate --config=configs/quickstart/evaluate.py:full,workdirs/quickstart \
      --policy=workdirs/quickstart/dpo/hf --baseline=workdirs/quickstart/sft/hf --batch_size=128

Held-out prompts are review openings never used for SFT, pairs or PPO. The gold sentiment scorer
(``jaxrlhf.tasks.reviews:reward``) plays the human: it gives the reward and judges the win rate.
"""

from jaxrlhf import quickstart


def get_config(arg: str = "full"):
    return quickstart.stage_config("evaluate", arg)
