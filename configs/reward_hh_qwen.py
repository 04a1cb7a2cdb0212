r"""Bradley-Terry reward model on Anthropic HH-RLHF from Qwen2.5-0.5B (fresh scalar head).

Command:
  python -m jaxrlhf.train --config=configs/reward_hh_qwen.py --workdir=/tmp/rm_qwen \
      [--config.data.path=/local/hh_rlhf.jsonl] [--config.model.path=/local/Qwen2.5-0.5B]

Expected result: held-out pair accuracy ~0.65-0.70 after one epoch (HH-RLHF labels are noisy;
published 0.5B-1B reward models land there); <workdir>/hf is an AutoModelForSequenceClassification.
"""

from jaxrlhf import config_defaults as d


def get_config():
    c = d.base("reward")
    c.model = d.model("Qwen/Qwen2.5-0.5B")
    c.tokenizer = "Qwen/Qwen2.5-0.5B"
    c.data = d.data(
        path="Anthropic/hh-rlhf", schema="hh_rlhf", eval_split="test", max_prompt_length=384, max_length=512
    )
    c.mesh = dict(data=1, fsdp=-1, tensor=1)
    c.batch_size = 64
    c.total_steps = 2500
    c.eval_every = 250
    c.eval_batches = 16
    c.optim = d.optim(lr=1e-5, warmup_steps=50)
    c.bradley_terry = d.bradley_terry(use_margin=False)
    return c
