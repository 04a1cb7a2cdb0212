r"""GRPO on GSM8K with a programmatic reward: Qwen2.5-0.5B-Instruct, exact final-answer checker, no critic.

The reward is ``jaxrlhf.tasks.gsm8k:reward``: 1.0 when the response's final answer (``#### N``,
``\boxed{N}``, ``The answer is N``, else the last number) equals the reference exactly as a
rational number, else 0.0; a response cut at ``max_new_tokens`` loses ``missing_eos_penalty``.
Each iteration samples 8 answers for each of 64 questions (512 responses, the rollout size of
``configs/ppo_gsm8k_qwen.py``); GRPO's group-normalised advantages, DAPO's clip-higher (0.2 / 0.28)
and token-mean loss, groups whose 8 answers are all right or all wrong masked out of the loss
(counted in ``groups/filtered``), k3 KL to a frozen reference with coefficient 0.04 (DeepSeekMath).
Dr.GRPO: ``--config.grpo.estimator=dr_grpo --config.grpo.loss_agg=seq_sum_norm``; RLOO:
``--config.grpo.estimator=rloo``; REINFORCE++: ``--config.grpo.estimator=reinforce_pp``; GSPO:
``--config.grpo.ratio_level=sequence --config.grpo.clip_eps=3e-4 --config.grpo.clip_eps_high=4e-4
--config.grpo.loss_agg=seq_mean``.

Prompt files (chat template; the instruction asks for ``#### N`` on the last line):
  python -m jaxrlhf.tasks.gsm8k --input gsm8k/train.jsonl --output /tmp/gsm8k/train.jsonl --template chat
  python -m jaxrlhf.tasks.gsm8k --input gsm8k/test.jsonl --output /tmp/gsm8k/test.jsonl --template chat

Command:
  python -m jaxrlhf.train --config=configs/grpo_gsm8k_qwen.py --workdir=/tmp/grpo_gsm8k

Evaluation on the test split (accuracy = pass@1; pass@k from --samples):
  python -m jaxrlhf.evaluate --config=configs/grpo_gsm8k_qwen.py \
      --config.data.path=/tmp/gsm8k/test.jsonl --policy=/tmp/grpo_gsm8k/hf \
      --baseline=Qwen/Qwen2.5-0.5B-Instruct --samples=8

Expected result (not yet measured with this config): reward/raw_mean (training accuracy) starts
near the instruct model's GSM8K accuracy (~0.4 for 0.5B, Qwen2.5 report) and rises over the first
~50 iterations; groups/all_equal_fraction falls as the model stops answering a question all-right
or all-wrong, kl_ref/k3 stays small, train/first_minibatch_ratio_max_dev stays ~0.
"""

from jaxrlhf import config_defaults as d

MODEL = "Qwen/Qwen2.5-0.5B-Instruct"


def get_config():
    c = d.base("grpo")
    c.model = d.model(MODEL)
    c.tokenizer = MODEL
    c.data = d.data(
        path="/tmp/gsm8k/train.jsonl", max_prompt_length=320,
        max_length=832, bucket=False,
    )  # fmt: skip
    c.reward = d.reward(fn="jaxrlhf.tasks.gsm8k:reward", missing_eos_penalty=1.0, shaping=False)
    c.ref = d.ref(ema_decay=1.0)  # frozen; 0.99 is the study's EMA reference
    c.generation = d.generation(max_new_tokens=512, temperature=1.0)
    c.grpo = d.grpo(
        iterations=200,
        prompts_per_iteration=64,
        samples_per_prompt=8,
        minibatch_size=128,
        epochs=1,
        estimator="grpo",
        clip_eps=0.2,
        clip_eps_high=0.28,
        loss_agg="token_mean",
        filter_equal_groups=True,
        kl_coef=0.04,
        kl_estimator="k3",
    )
    c.micro_batches = 16
    c.optim = d.optim(lr=1e-6, warmup_steps=0, schedule="constant")
    c.mesh = dict(data=1, fsdp=-1, tensor=1)
    c.checkpoint.every = 10
    c.log_every = 1
    return c
