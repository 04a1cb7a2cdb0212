r"""Tiny GRPO (tests and smoke runs): a 2-layer Llama on the synthetic-review prompts, gold-sentiment
reward, 8 prompts x 4 samples per iteration, no critic.

Command:
  python -m jaxrlhf.train --config=configs/tiny/grpo.py --workdir=/tmp/tiny_grpo

Other estimators: ``--config.grpo.estimator=dr_grpo`` (or ``rloo``, ``reinforce_pp``); GSPO:
``--config.grpo.ratio_level=sequence --config.grpo.clip_eps=3e-4 --config.grpo.clip_eps_high=4e-4``.

Expected result: 4 iterations in well under a minute on 2 CPU cores, logging every GRPO metric;
train/first_minibatch_ratio_max_dev ~0 (the ratio-is-1 check), kl_ref/k1 0 at iteration 1.
"""

import os

from jaxrlhf import config_defaults as d

# tests/fixtures of the checkout, found from this file: the config runs from any working directory.
FIXTURES = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../tests/fixtures"))


def get_config():
    c = d.base("grpo")
    c.model = d.model(**d.TINY_LLAMA_WORDS)
    c.model.dtype = "float32"
    c.tokenizer = d.asset("tasks/assets/reviews_tokenizer")  # found from the installed package
    c.data = d.data(
        path=os.path.join(FIXTURES, "data/review_prompts.jsonl"),
        max_prompt_length=8,
        max_length=32,
        bucket=False,
    )
    c.reward = d.reward(fn="jaxrlhf.tasks.reviews:reward", missing_eos_penalty=0.0, shaping=False)
    c.ref = d.ref(ema_decay=1.0)  # frozen; < 1 is the EMA reference of Xu et al. (2024)
    c.generation = d.generation(max_new_tokens=12)
    c.grpo = d.grpo(
        iterations=4, prompts_per_iteration=8, samples_per_prompt=4, minibatch_size=16, epochs=2, kl_coef=0.04
    )
    c.optim = d.optim(lr=1e-3, warmup_steps=0, schedule="constant")
    c.checkpoint.every = 2
    c.log_every = 1
    c.mesh = dict(data=1, fsdp=1, tensor=1)  # one device, whatever the host has
    c.progress_bar = False
    return c
