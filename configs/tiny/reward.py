r"""Tiny Bradley-Terry reward model on the fixture HH-RLHF transcripts (tests and smoke runs).

Command:
  python -m jaxrlhf.train --config=configs/tiny/reward.py --workdir=/tmp/tiny_rm

Expected result: 20 steps in well under a minute on 2 CPU cores; bt_loss falls from ~0.69.
"""

import os

from jaxrlhf import config_defaults as d

# tests/fixtures of the checkout, found from this file: the config runs from any working directory.
FIXTURES = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../tests/fixtures"))


def get_config():
    c = d.base("reward")
    c.model = d.model(**d.TINY_LLAMA)
    c.model.dtype = "float32"
    c.tokenizer = os.path.join(FIXTURES, "tokenizers/char_pad_eos")
    c.data = d.data(
        path=os.path.join(FIXTURES, "data/hh_rlhf.jsonl"),
        eval_fraction=0.25,
        max_prompt_length=192,
        max_length=320,
    )
    c.batch_size = 4
    c.total_steps = 20
    c.pad_to_multiple_of = 320  # one batch shape, one compile
    c.eval_every = 10
    c.eval_batches = 2
    c.optim = d.optim(lr=1e-3, warmup_steps=2)
    c.bradley_terry = d.bradley_terry(use_margin=False)
    c.checkpoint.every = 10
    c.log_every = 5
    c.mesh = dict(data=1, fsdp=1, tensor=1)  # one device, whatever the host has
    c.progress_bar = False
    return c
