r"""Tiny PPO (tests and smoke runs): a 2-layer Llama on the synthetic-review prompts, gold-sentiment reward.

Command:
  python -m jaxrlhf.train --config=configs/tiny/ppo.py --workdir=/tmp/tiny_ppo

Expected result: 4 iterations in about a minute on 2 CPU cores, logging every PPO metric;
train/first_minibatch_ratio_max_dev ~0 (the ratio-is-1 check).
"""

import os

from jaxrlhf import config_defaults as d

# tests/fixtures of the checkout, found from this file: the config runs from any working directory.
FIXTURES = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../tests/fixtures"))


def get_config():
    c = d.base("ppo")
    c.model = d.model(**d.TINY_LLAMA_WORDS)
    c.model.dtype = "float32"
    c.tokenizer = d.asset("tasks/assets/reviews_tokenizer")  # found from the installed package
    c.data = d.data(
        path=os.path.join(FIXTURES, "data/review_prompts.jsonl"),
        max_prompt_length=8,
        max_length=32,
        bucket=False,
    )
    c.critic = dict(
        model=d.model(**d.TINY_LLAMA_WORDS), optim=d.optim(lr=1e-3, warmup_steps=0, schedule="constant")
    )
    c.critic.model.dtype = "float32"
    c.reward = d.reward(fn="jaxrlhf.tasks.reviews:reward", missing_eos_penalty=0.0)
    c.ref = d.ref(ema_decay=0.9)
    c.generation = d.generation(max_new_tokens=12)
    c.ppo = d.ppo(iterations=4, rollout_batch_size=16, minibatch_size=8, epochs=2)
    c.optim = d.optim(lr=1e-3, warmup_steps=0, schedule="constant")
    c.checkpoint.every = 2
    c.log_every = 1
    c.mesh = dict(data=1, fsdp=1, tensor=1)  # one device, whatever the host has
    c.progress_bar = False
    return c
