r"""Quickstart stage (g): held-out evaluation settings (``jaxrlhf.evaluate``), judged by the gold scorer.

Command (one policy by hand, after the training stages):
  python -m jaxrlhf.evaluate --config=configs/quickstart/evaluate.py:full,workdirs/quickstart \
      --policy=workdirs/quickstart/dpo/hf --baseline=workdirs/quickstart/sft/hf --batch_size=128

Held-out prompts are review openings never used for SFT, pairs or PPO. The gold sentiment scorer
(``jaxrlhf.tasks.reviews:reward``) plays the human: it gives the reward and judges the win rate.
"""

import ml_collections

from jaxrlhf import config_defaults as d
from jaxrlhf import quickstart as q


def get_config(arg: str = "full"):
    s, paths = q.parse_config_arg(arg)
    c = ml_collections.ConfigDict()
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    c.tokenizer = paths.tokenizer
    c.model = dict(dtype="float32")
    c.data = d.data(
        path=paths.eval_prompts,
        max_prompt_length=s.max_prompt_length,
        max_length=s.max_prompt_length + s.max_new_tokens,
        bucket=False,
        shuffle=False,
    )
    c.reward = dict(fn="jaxrlhf.tasks.reviews:reward")
    c.generation = d.generation(max_new_tokens=s.max_new_tokens, temperature=1.0)
    return c
