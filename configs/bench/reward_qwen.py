r"""Benchmark: Bradley-Terry reward model,
on the CLI comparison's workload with the real Qwen2.5
tokenizer (151,665 entries, ../shared/real/tokenizer_qwen2_5_instruct).

The random Llama (4 layers, d 256, ffn 1024, 4/2 heads), 512 synthetic pairs in file order, 8 pairs
per step, max length 256, float32, AdamW, packed batches: the work that
`python -m jaxrlhf.bench.cli` times against TRL (docs/benchmarks.md). The workload's files are
written by `python -m jaxrlhf.bench.cli --prepare_only` into workdirs/bench (or pass a
workload directory after a colon, as below).

Command:
  python -m jaxrlhf.bench.cli --prepare_only --vocab qwen
  python -m jaxrlhf.train --config=configs/bench/reward_qwen.py --workdir=/tmp/bench_reward_qwen
  python -m jaxrlhf.train --config=configs/bench/reward_qwen.py:/some/workload_dir \
      --workdir=/tmp/bench_reward_qwen

Expected result: 200 steps; the loss falls from 0.693; perf/tokens_per_s in every 10-step window.
"""

from jaxrlhf.bench.cli import train_config


def get_config(workload_dir=None):
    return train_config("reward", "qwen", workload_dir or None)
