r"""Tiny DPO with LoRA adapters (rank 4 on every attention/MLP projection; docs/lora.md).

Command:
  python -m jaxrlhf.train --config=configs/tiny/dpo_lora.py --workdir=/tmp/tiny_dpo_lora

Expected result: 20 steps in well under a minute on 2 CPU cores; dpo_loss starts at 0.693 (step 0
is the base model exactly: B = 0) and falls; the train state holds the adapters and their Adam
moments only, the reference is the base with the adapters off; <workdir>/hf holds the merged
model and <workdir>/peft the PEFT adapter.
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
    c.lora = d.lora(rank=4, alpha=8.0)
    c.optim = d.optim(lr=1e-2, warmup_steps=2)  # adapters start at zero: a larger lr than full DPO
    c.ref = d.ref(ema_decay=1.0, precompute=False)
    c.dpo = dict(beta=0.1, label_smoothing=0.0, loss_type="sigmoid", nll_coef=0.0)
    c.checkpoint.every = 10
    c.log_every = 5
    c.mesh = dict(data=1, fsdp=1, tensor=1)  # one device, whatever the host has
    c.progress_bar = False
    return c
