r"""Tiny SFT (tests and smoke runs): a 2-layer Llama from scratch on the fixture prompt/completion data.

Command:
  python -m jaxrlhf.train --config=configs/tiny/sft.py --workdir=/tmp/tiny_sft

Expected result: runs 20 steps in well under a minute on 2 CPU cores; the NLL falls from ~4.6.
"""

import os

from jaxrlhf import config_defaults as d

# tests/fixtures of the checkout, found from this file: the config runs from any working directory.
FIXTURES = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../tests/fixtures"))


def get_config():
    c = d.base("sft")
    c.model = d.model(**d.TINY_LLAMA)
    c.model.dtype = "float32"
    c.tokenizer = os.path.join(FIXTURES, "tokenizers/char_pad_eos")
    c.data = d.data(
        path=os.path.join(FIXTURES, "data/sft_prompt_completion.jsonl"), max_prompt_length=48, max_length=160
    )
    c.batch_size = 8
    c.total_steps = 20
    c.pad_to_multiple_of = 160  # one batch shape, one compile
    c.optim = d.optim(lr=3e-3, warmup_steps=2)
    c.checkpoint.every = 10
    c.log_every = 5
    c.mesh = dict(data=1, fsdp=1, tensor=1)  # one device, whatever the host has
    c.progress_bar = False
    return c
