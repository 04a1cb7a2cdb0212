r"""Benchmark: DPO (sigmoid, beta 0.1, reference forward every step),
on the CLI comparison's workload with the 2,000-word synthetic tokenizer.

The random Llama (4 layers, d 256, ffn 1024, 4/2 heads), 512 synthetic pairs in file order, 8 pairs
per step, max length 256, float32, AdamW, packed batches: the work that
`python -m jaxrlhf.bench.cli` times against TRL (docs/benchmarks.md). The workload's files are
written by `python -m jaxrlhf.bench.cli --prepare_only` into workdirs/bench (or pass a
workload directory after a colon, as below).

Command:
  python -m jaxrlhf.bench.cli --prepare_only --vocab v2k
  python -m jaxrlhf.train --config=configs/bench/dpo_v2k.py --workdir=/tmp/bench_dpo_v2k
  python -m jaxrlhf.train --config=configs/bench/dpo_v2k.py:/some/workload_dir --workdir=/tmp/bench_dpo_v2k

Expected result: 200 steps; the loss falls from 0.693; perf/tokens_per_s in every 10-step window.
"""

from jaxrlhf.bench.cli import train_config


def get_config(workload_dir=None):
    return train_config("dpo", "v2k", workload_dir or None)
