r"""PPO on GSM8K with a programmatic reward: Qwen2.5-0.5B-Instruct, exact final-answer checker.

The reward is ``jaxrlhf.tasks.gsm8k:reward``: 1.0 when the response's final answer (``#### N``,
``\boxed{N}``, ``The answer is N``, else the last number) equals the reference exactly as a
rational number, else 0.0 (docs/rewards.md). The critic starts from the actor's checkpoint with a
fresh scalar head; the reference is the study's EMA of the actor.

Prompt files (chat template; the instruction asks for ``#### N`` on the last line):
  python -m jaxrlhf.tasks.gsm8k --input gsm8k/train.jsonl --output /tmp/gsm8k/train.jsonl --template chat
  python -m jaxrlhf.tasks.gsm8k --input gsm8k/test.jsonl --output /tmp/gsm8k/test.jsonl --template chat

Command:
  python -m jaxrlhf.train --config=configs/ppo_gsm8k_qwen.py --workdir=/tmp/ppo_gsm8k

Evaluation on the test split (accuracy = pass@1; pass@k from --samples):
  python -m jaxrlhf.evaluate --config=configs/ppo_gsm8k_qwen.py \
      --config.data.path=/tmp/gsm8k/test.jsonl --policy=/tmp/ppo_gsm8k/hf \
      --baseline=Qwen/Qwen2.5-0.5B-Instruct --samples=8

Expected result (not yet measured with this config): reward/raw_mean (training accuracy) starts
near the instruct model's GSM8K accuracy (~0.4 for 0.5B, Qwen2.5 report) and rises over the first
~50 iterations while kl_ref/k1 stays small; response_length first drops as answers get terser.
"""

from jaxrlhf import config_defaults as d

MODEL = "Qwen/Qwen2.5-0.5B-Instruct"


def get_config():
    c = d.base("ppo")
    c.model = d.model(MODEL)
    c.tokenizer = MODEL
    c.data = d.data(
        path="/tmp/gsm8k/train.jsonl", max_prompt_length=320,
        max_length=832, bucket=False,
    )  # fmt: skip
    c.critic = dict(model=d.model(MODEL), optim=d.optim(lr=5e-6, warmup_steps=0))
    c.reward = d.reward(fn="jaxrlhf.tasks.gsm8k:reward", missing_eos_penalty=1.0)
    c.ref = d.ref(ema_decay=0.99)
    c.generation = d.generation(max_new_tokens=512, temperature=1.0)
    c.ppo = d.ppo(iterations=200, rollout_batch_size=512, minibatch_size=64, epochs=2)
    c.micro_batches = 8
    c.optim = d.optim(lr=1e-6, warmup_steps=0, schedule="constant")
    c.mesh = dict(data=1, fsdp=-1, tensor=1)
    c.checkpoint.every = 10
    c.log_every = 1
    return c
