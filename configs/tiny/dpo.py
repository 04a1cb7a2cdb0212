r"""Tiny DPO on the fixture prompt/chosen/rejected pairs (tests and smoke runs).

Command:
  python -m jaxrlhf.train --config=configs/tiny/dpo.py --workdir=/tmp/tiny_dpo

Expected result: 20 steps in well under a minute on 2 CPU cores; dpo_loss falls from 0.693 and
rewards/accuracy rises above 0.5.
"""

import os

from jaxrlhf import config_defaults as d

# tests/fixtures of the checkout, found from this file: the config runs from any working directory.
FIXTURES = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../tests/fixtures"))


def get_config():
    c = d.base("dpo")
    c.model = d.model(**d.TINY_LLAMA)
    c.model.dtype = "float32"
    c.tokenizer = os.path.join(FIXTURES, "tokenizers/char_pad_eos")
    c.data = d.data(
        path=os.path.join(FIXTURES, "data/pref_prompt_chosen_rejected.jsonl"),
        max_prompt_length=48,
        max_length=160,
    )
    c.batch_size = 4
    c.total_steps = 20
    c.pad_to_multiple_of = 160  # one batch shape, one compile
    c.optim = d.optim(lr=1e-3, warmup_steps=2)
    c.ref = d.ref(ema_decay=1.0, precompute=False)
    c.dpo = dict(beta=0.1, label_smoothing=0.0, loss_type="sigmoid", nll_coef=0.0)
    c.checkpoint.every = 10
    c.log_every = 5
    c.mesh = dict(data=1, fsdp=1, tensor=1)  # one device, whatever the host has
    c.progress_bar = False
    return c
