r"""Quickstart stage (e): DPO from the SFT model on the best/worst sample pairs (DPO paper recipe).

Command (after stages (a)-(c)):
  python -m jaxrlhf.train --config=configs/quickstart/dpo.py:full,workdirs/quickstart \
      --workdir=workdirs/quickstart/dpo

The reference is the frozen SFT model. The config argument is ``SIZE[,QUICKSTART_WORKDIR]``.
Expected result (full): rewards/accuracy 0.85, margin 0.47 after 150 steps; held-out gold reward
0.68 vs SFT's 0.49 (docs/quickstart.md).
"""

from jaxrlhf import config_defaults as d
from jaxrlhf import quickstart as q


def get_config(arg: str = "full"):
    s, paths = q.parse_config_arg(arg)
    c = d.base("dpo")
    c.seed = s.seed
    c.model = d.model(paths.sft_export)
    c.model.dtype = "float32"
    c.tokenizer = paths.tokenizer
    c.data = d.data(path=paths.pairs, max_prompt_length=s.max_prompt_length, max_length=s.max_length)
    c.batch_size = s.pair_batch
    c.total_steps = s.dpo_steps
    c.pad_to_multiple_of = s.max_length
    c.optim = d.optim(lr=s.dpo_lr, warmup_steps=s.dpo_steps // 10, schedule="constant")
    c.ref = d.ref(ema_decay=1.0)
    c.dpo = dict(beta=s.dpo_beta, label_smoothing=0.0, loss_type="sigmoid", nll_coef=0.0)
    c.checkpoint.every = s.dpo_steps
    c.log_every = max(1, s.dpo_steps // 5)
    c.progress_bar = s.progress_bar
    return c
