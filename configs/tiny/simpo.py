r"""Tiny SimPO (tests and smoke runs): reference-free, length-normalised preference optimisation.

Command:
  python -m jaxrlhf.train --config=configs/tiny/simpo.py --workdir=/tmp/tiny_simpo

Expected result: 20 steps in well under a minute on 2 CPU cores; simpo_loss falls from ~0.97
(log(1 + e^0.5) at step 0, where both length-normalised log-probs are about equal) and
rewards/accuracy rises; the checkpoint holds no reference parameters.
"""

import os

from jaxrlhf import config_defaults as d

# tests/fixtures of the checkout, found from this file: the config runs from any working directory.
FIXTURES = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../tests/fixtures"))


def get_config():
    c = d.base("simpo")
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
    c.simpo = d.simpo(beta=2.0, gamma=0.5, nll_coef=0.0)
    c.checkpoint.every = 10
    c.log_every = 5
    c.mesh = dict(data=1, fsdp=1, tensor=1)  # one device, whatever the host has
    c.progress_bar = False
    return c
