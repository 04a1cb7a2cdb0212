r"""DPO on Anthropic HH-RLHF from an SFT'd Qwen2.5-0.5B (Rafailov et al. 2023; Xu et al. 2024 baseline).

Command:
  python -m jaxrlhf.train --config=configs/dpo_hh_qwen.py --workdir=/tmp/dpo_qwen \
      --config.model.path=/tmp/sft_qwen/hf --config.tokenizer=/tmp/sft_qwen/hf

Expected result: rewards/accuracy rises from 0.5 to ~0.65 and rewards/margin grows steadily over one
epoch; set dpo.nll_coef > 0 for the study's extra-SFT remedy, dpo.loss_type="ipo" for IPO, and
ref.ema_decay < 1 for an EMA reference.
"""

from jaxrlhf import config_defaults as d


def get_config():
    c = d.base("dpo")
    c.model = d.model("Qwen/Qwen2.5-0.5B-Instruct")
    c.tokenizer = "Qwen/Qwen2.5-0.5B-Instruct"
    c.data = d.data(path="Anthropic/hh-rlhf", schema="hh_rlhf", max_prompt_length=384, max_length=512)
    c.mesh = dict(data=1, fsdp=-1, tensor=1)
    c.batch_size = 64
    c.total_steps = 2500
    c.optim = d.optim(lr=5e-7, warmup_steps=150, schedule="linear", min_lr_ratio=0.0)
    c.ref = d.ref(ema_decay=1.0, precompute=False)
    c.dpo = dict(beta=0.1, label_smoothing=0.0, loss_type="sigmoid", nll_coef=0.0)
    return c
