r"""PPO with the study's recipe on HH-RLHF prompts: Qwen2.5-0.5B SFT actor, Bradley-Terry reward model.

Xu et al. (ICML 2024) found PPO beats DPO on dialogue once it has a large rollout batch (512),
advantage normalization and an EMA reference; those are this config's defaults.

Command (after configs/sft_qwen.py and configs/reward_hh_qwen.py):
  python -m jaxrlhf.train --config=configs/ppo_hh_qwen.py --workdir=/tmp/ppo_qwen \
      --config.model.path=/tmp/sft_qwen/hf --config.critic.model.path=/tmp/rm_qwen/hf \
      --config.reward.model.path=/tmp/rm_qwen/hf --config.tokenizer=/tmp/sft_qwen/hf

Expected result: on 8 H100s, ~20 min per iteration of 512 rollouts; reward/raw_mean rises for the
first ~50 iterations while kl_ref/k1 stays below ~10 nats; train/first_minibatch_ratio_max_dev ~0.
Ablations: --config.ppo.rollout_batch_size=64 --config.ppo.minibatch_size=16,
--config.ppo.whiten_advantages=False, --config.ref.ema_decay=1.0 (frozen reference).
"""

from jaxrlhf import config_defaults as d


def get_config():
    c = d.base("ppo")
    c.model = d.model("Qwen/Qwen2.5-0.5B-Instruct")
    c.tokenizer = "Qwen/Qwen2.5-0.5B-Instruct"
    c.data = d.data(
        path="Anthropic/hh-rlhf", schema="hh_rlhf", max_prompt_length=256, max_length=384, bucket=False
    )
    c.critic = dict(model=d.model("/path/to/reward_model/hf"), optim=d.optim(lr=5e-6, warmup_steps=0))
    c.reward = d.reward(model_path="/path/to/reward_model/hf", missing_eos_penalty=1.0)
    c.ref = d.ref(ema_decay=0.99)
    c.generation = d.generation(max_new_tokens=128, temperature=1.0)
    c.ppo = d.ppo(iterations=200, rollout_batch_size=512, minibatch_size=64, epochs=2)
    c.micro_batches = 4
    c.optim = d.optim(lr=1e-6, warmup_steps=0, schedule="constant")
    c.mesh = dict(data=1, fsdp=-1, tensor=1)
    c.checkpoint.every = 10
    c.log_every = 1
    return c
