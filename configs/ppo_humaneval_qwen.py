r"""PPO on code with unit tests (HumanEval format): Qwen2.5-Coder-0.5B-Instruct, sandboxed execution.

The reward is ``jaxrlhf.tasks.code:reward``: each response's code (the fenced block of the chat
answer, appended to the problem's prompt) runs with the problem's tests and ``check(entry_point)``
in ``jaxrlhf.tasks.sandbox`` (own PID/network/mount namespaces, read-only filesystem, resource
limits, an unprivileged uid); 1.0 when the tests ran to completion, else 0.0. docs/rewards.md has
the sandbox's guarantees and limits. Settings come from the environment:
``JAXRLHF_SANDBOX_TIMEOUT`` (s, default 10), ``JAXRLHF_SANDBOX_WORKERS`` (default: CPUs),
``JAXRLHF_SANDBOX_REQUIRE_ISOLATION=1`` (refuse to run without namespaces; set it on shared hosts).

Prompt file (HumanEval's 164 problems; it is an evaluation set: for a study, train on a
HumanEval-format conversion of MBPP/APPS, fields prompt/test/entry_point, and evaluate here):
  python -m jaxrlhf.tasks.code prompts --input HumanEval.jsonl.gz --output /tmp/humaneval/prompts.jsonl \
      --template chat

Command:
  JAXRLHF_SANDBOX_REQUIRE_ISOLATION=1 python -m jaxrlhf.train --config=configs/ppo_humaneval_qwen.py \
      --workdir=/tmp/ppo_humaneval

pass@1 / pass@k (unbiased estimator, Chen et al. 2021) of a policy:
  python -m jaxrlhf.evaluate --config=configs/ppo_humaneval_qwen.py --policy=/tmp/ppo_humaneval/hf \
      --baseline=Qwen/Qwen2.5-Coder-0.5B-Instruct --samples=16

Expected result (not yet measured with this config): reward/raw_mean starts near the model's
HumanEval pass@1 (~0.3 for Coder-0.5B-Instruct per the Qwen2.5-Coder report, under its own
prompt) and rises; the sandbox runs 512 programs in ~40 s on 2 cores (docs/rewards.md), far
below the generation time of 512 responses.
"""

from jaxrlhf import config_defaults as d

MODEL = "Qwen/Qwen2.5-Coder-0.5B-Instruct"


def get_config():
    c = d.base("ppo")
    c.model = d.model(MODEL)
    c.tokenizer = MODEL
    c.data = d.data(
        path="/tmp/humaneval/prompts.jsonl", max_prompt_length=640,
        max_length=1152, bucket=False,
    )  # fmt: skip
    c.critic = dict(model=d.model(MODEL), optim=d.optim(lr=5e-6, warmup_steps=0))
    c.reward = d.reward(fn="jaxrlhf.tasks.code:reward", missing_eos_penalty=1.0)
    c.ref = d.ref(ema_decay=0.99)
    c.generation = d.generation(max_new_tokens=512, temperature=1.0)
    c.ppo = d.ppo(iterations=100, rollout_batch_size=512, minibatch_size=64, epochs=2)
    c.micro_batches = 8
    c.optim = d.optim(lr=1e-6, warmup_steps=0, schedule="constant")
    c.mesh = dict(data=1, fsdp=-1, tensor=1)
    c.checkpoint.every = 10
    c.log_every = 1
    return c
