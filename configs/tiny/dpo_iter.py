r"""Tiny iterative DPO (tests and smoke runs): review prompts, k samples each, gold-sentiment labels.

Command:
  python -m jaxrlhf.train --config=configs/tiny/dpo_iter.py --workdir=/tmp/tiny_dpo_iter

Expected result: 3 rounds in under a minute on 2 CPU cores; each round logs its pairs and DPO metrics.
"""

import os

from jaxrlhf import config_defaults as d

# tests/fixtures of the checkout, found from this file: the config runs from any working directory.
FIXTURES = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../tests/fixtures"))


def get_config():
    c = d.base("dpo_iter")
    c.model = d.model(**d.TINY_LLAMA_WORDS)
    c.model.dtype = "float32"
    c.tokenizer = d.asset("tasks/assets/reviews_tokenizer")  # found from the installed package
    c.data = d.data(
        path=os.path.join(FIXTURES, "data/review_prompts.jsonl"),
        max_prompt_length=8,
        max_length=32,
        bucket=False,
    )
    c.reward = d.reward(fn="jaxrlhf.tasks.reviews:reward", shaping=False, missing_eos_penalty=0.0)
    c.ref = d.ref(ema_decay=1.0)
    c.generation = d.generation(max_new_tokens=12)
    c.dpo = dict(beta=0.1, label_smoothing=0.0, loss_type="sigmoid", nll_coef=0.0)
    c.dpo_iter = dict(
        rounds=3, prompts_per_round=8, samples_per_prompt=4, steps_per_round=2, reset_reference=True
    )
    c.batch_size = 4
    c.optim = d.optim(lr=1e-3, warmup_steps=0, schedule="constant")
    c.checkpoint.every = 2
    c.log_every = 1
    c.mesh = dict(data=1, fsdp=1, tensor=1)  # one device, whatever the host has
    c.progress_bar = False
    return c
