r"""Iterative DPO (DPO-Iter, Xu et al. 2024): fresh samples each round, labelled by a reward model.

Command (after configs/sft_qwen.py and configs/reward_hh_qwen.py):
  python -m jaxrlhf.train --config=configs/dpo_iter_hh_qwen.py --workdir=/tmp/dpo_iter_qwen \
      --config.model.path=/tmp/sft_qwen/hf --config.reward.model.path=/tmp/rm_qwen/hf \
      --config.tokenizer=/tmp/sft_qwen/hf

Expected result: round/reward_mean of the sampled responses rises round over round (the study's
DPO-Iter closes much of the gap to PPO on HH-RLHF); train/rewards/accuracy ~0.7-0.9 within rounds.
"""

from jaxrlhf import config_defaults as d


def get_config():
    c = d.base("dpo_iter")
    c.model = d.model("Qwen/Qwen2.5-0.5B-Instruct")
    c.tokenizer = "Qwen/Qwen2.5-0.5B-Instruct"
    c.data = d.data(
        path="Anthropic/hh-rlhf", schema="hh_rlhf", max_prompt_length=256, max_length=384, bucket=False
    )
    c.reward = d.reward(model_path="/path/to/reward_model/hf", shaping=False)
    c.ref = d.ref(ema_decay=1.0)
    c.generation = d.generation(max_new_tokens=128, temperature=1.0)
    c.dpo = dict(beta=0.1, label_smoothing=0.0, loss_type="sigmoid", nll_coef=0.0)
    c.dpo_iter = dict(
        rounds=10, prompts_per_round=512, samples_per_prompt=4, steps_per_round=8, reset_reference=True
    )
    c.batch_size = 64
    c.optim = d.optim(lr=5e-7, warmup_steps=10, schedule="constant")
    c.mesh = dict(data=1, fsdp=-1, tensor=1)
    c.checkpoint.every = 1
    c.log_every = 1
    return c
