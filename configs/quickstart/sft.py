r"""Quickstart stage (b): SFT of a tiny Llama from scratch on synthetic reviews.

Command (the quickstart runs it for you; this is the same stage by hand, after stage (a)):
  python -m jaxrlhf.train --config=configs/quickstart/sft.py:full,workdirs/quickstart \
      --workdir=workdirs/quickstart/sft

The config argument is ``SIZE[,QUICKSTART_WORKDIR]`` with SIZE ``full`` or ``smoke``.
Expected result (full): 600 steps in ~2 min on 2 CPU cores; the response NLL falls from ln 512 to
1.76 nats/token and samples are mixed-sentiment reviews (48 % positive); see docs/quickstart.md.
"""

from jaxrlhf import config_defaults as d
from jaxrlhf import quickstart as q


def get_config(arg: str = "full"):
    s, paths = q.parse_config_arg(arg)
    c = d.base("sft")
    c.seed = s.seed
    c.model = d.model(**s.model)
    c.model.dtype = "float32"
    c.tokenizer = paths.tokenizer
    c.data = d.data(path=paths.sft_data, max_prompt_length=s.max_prompt_length, max_length=s.max_length)
    c.batch_size = s.sft_batch
    c.total_steps = s.sft_steps
    c.pad_to_multiple_of = s.max_length  # one batch shape, one compile
    c.optim = d.optim(lr=s.sft_lr, warmup_steps=s.sft_steps // 20, weight_decay=0.01)
    c.checkpoint.every = s.sft_steps
    c.log_every = max(1, s.sft_steps // 10)
    c.progress_bar = s.progress_bar
    return c
