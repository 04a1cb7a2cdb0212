r"""Quickstart stage (d): a Bradley-Terry reward model on the SFT model's best/worst sample pairs.

Command (after stages (a)-(c)):
  python -m jaxrlhf.train --config=configs/quickstart/reward.py:full,workdirs/quickstart \
      --workdir=workdirs/quickstart/reward

Initialised from the SFT export with a fresh scalar head (its LM head dropped). The config argument
is ``SIZE[,QUICKSTART_WORKDIR]``. Expected result (full): held-out pair accuracy 0.76 (train 0.89) after 150 steps.
"""

from jaxrlhf import config_defaults as d
from jaxrlhf import quickstart as q


def get_config(arg: str = "full"):
    s, paths = q.parse_config_arg(arg)
    c = d.base("reward")
    c.seed = s.seed
    c.model = d.model(paths.sft_export)
    c.model.dtype = "float32"
    c.tokenizer = paths.tokenizer
    c.data = d.data(
        path=paths.pairs,
        eval_fraction=s.rm_eval_fraction,
        max_prompt_length=s.max_prompt_length,
        max_length=s.max_length,
    )
    c.batch_size = s.pair_batch
    c.total_steps = s.rm_steps
    c.pad_to_multiple_of = s.max_length
    c.eval_every = s.rm_steps
    c.eval_batches = 4
    c.optim = d.optim(lr=s.rm_lr, warmup_steps=s.rm_steps // 10)
    c.reward = dict(use_margin=False)
    c.checkpoint.every = s.rm_steps
    c.log_every = max(1, s.rm_steps // 5)
    c.progress_bar = s.progress_bar
    return c
