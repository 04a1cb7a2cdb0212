"""TRL runner for the side-by-side benchmark: ``DPOTrainer`` or ``RewardTrainer`` on the shared workload.

Runs in the peers' venv (``.venv-bench``: torch CPU, transformers, trl), never in jaxrlhf's::

    .venv-bench/bin/python -m jaxrlhf.bench.peer_trl --task dpo --workdir workdirs/bench

and prints one result line (see :mod:`jaxrlhf.bench.results`).

How TRL is configured (its docs' speed advice that applies on CPU; nothing hobbled):

- ``gradient_checkpointing=False`` (TRL's ``DPOConfig``/``RewardConfig`` default to ``True``, which
  trades ~30% more compute for memory we do not need); ``bf16`` follows the workload's ``dtype``
  (``float32`` by default: the same precision as ours; ``--bf16`` measures TRL's bf16 autocast);
- ``precompute_ref_log_probs=False``: the reference model runs a forward on every step, the same
  work as ours; ``padding_free`` is not set (TRL 1.16 warns that it is temporarily unavailable for
  DPO and falls back to padding, and it needs FlashAttention, which CPU lacks): batches are padded
  to the longest sequence of the batch (TRL's dynamic padding), ``attn_implementation="sdpa"``;
- ``torch.set_num_threads(cores)``; ``dataloader_num_workers=0`` (tokenization is done once before
  training by ``datasets.map``; collation is cheap); ``logging_steps`` past the run, no saving,
  no reporting, no progress bar;
- ``train_sampling_strategy="sequential"`` so step ``i`` trains on rows ``[i*B, (i+1)*B)`` as in
  every framework; constant learning rate, no warm-up, AdamW (``adamw_torch``) with the
  workload's lr, betas, eps, weight decay and grad-norm clipping.

Timing: a ``TrainerCallback`` stamps ``time.perf_counter()`` at every ``on_step_end``; step ``i``
lasts from the end of step ``i-1`` to the end of step ``i`` (data collation, forward/backward,
optimizer). Token counts come from a wrapper around the data collator (``num_workers=0`` so
batches are collated in step order).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Any

from jaxrlhf.bench import results
from jaxrlhf.bench import workload as wl


class _CountingCollator:
    """Wraps a collator; records (real, padded) token counts of each batch it builds."""

    def __init__(self, inner):
        self.inner = inner
        self.counts: list[tuple[int, int]] = []

    def __call__(self, examples):
        batch = self.inner(examples)
        mask = batch["attention_mask"]
        self.counts.append((int(mask.sum()), int(mask.numel())))
        return batch


def _versions() -> dict[str, str]:
    import accelerate
    import datasets
    import torch
    import transformers
    import trl

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "accelerate": accelerate.__version__,
        "datasets": datasets.__version__,
        "torch_threads": str(torch.get_num_threads()),
    }


def run(
    task: str,
    workdir: str,
    *,
    steps: int | None,
    warmup: int | None,
    bf16: bool,
    threads: int,
    wrap: bool = False,
) -> dict:
    """Trains ``warmup + steps`` steps; ``wrap``: on all the rows, epochs repeating in file order
    (the CLI comparison's long runs), else on the first ``(warmup + steps) * batch`` rows."""
    import datasets
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )

    torch.set_num_threads(threads)
    w, p, rows = wl.load(workdir)
    steps = w.steps if steps is None else steps
    warmup = w.warmup_steps if warmup is None else warmup
    total = warmup + steps
    n_rows = len(rows) if wrap else total * w.batch_size
    if n_rows > len(rows):
        raise ValueError(f"warmup + steps = {total} steps need {n_rows} rows; the data has {len(rows)}")
    data = datasets.Dataset.from_list(
        [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows[:n_rows]]
    )
    tok = AutoTokenizer.from_pretrained(p["tokenizer"])
    torch.manual_seed(w.seed)

    stamps: list[float] = []

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

    common: dict[str, Any] = dict(
        output_dir=tempfile.mkdtemp(prefix="bench_trl_"),
        per_device_train_batch_size=w.batch_size,
        gradient_accumulation_steps=1,
        max_steps=total,
        learning_rate=w.learning_rate,
        adam_beta1=w.adam_b1,
        adam_beta2=w.adam_b2,
        adam_epsilon=w.adam_eps,
        weight_decay=w.weight_decay,
        max_grad_norm=w.max_grad_norm,
        optim="adamw_torch",
        lr_scheduler_type="constant",
        warmup_steps=0,
        gradient_checkpointing=False,
        bf16=bf16,
        fp16=False,
        use_cpu=True,
        dataloader_num_workers=0,
        train_sampling_strategy="sequential",
        logging_steps=total + 1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=w.seed,
        max_length=w.max_length,
    )
    dtype = torch.float32
    if task == "dpo":
        from trl import DPOConfig, DPOTrainer

        cfg = DPOConfig(**common, beta=w.beta, precompute_ref_log_probs=False, loss_type=["sigmoid"])
        model = AutoModelForCausalLM.from_pretrained(p["model"], dtype=dtype, attn_implementation="sdpa")
        ref = AutoModelForCausalLM.from_pretrained(p["model"], dtype=dtype, attn_implementation="sdpa")
        trainer = DPOTrainer(model=model, ref_model=ref, args=cfg, train_dataset=data, processing_class=tok)
    elif task == "reward":
        from trl import RewardConfig, RewardTrainer

        cfg = RewardConfig(**common)
        model = AutoModelForSequenceClassification.from_pretrained(
            p["reward_model"], dtype=dtype, attn_implementation="sdpa", num_labels=1
        )
        trainer = RewardTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok)
    else:
        raise ValueError(f"task={task!r}; expected 'dpo' or 'reward'")
    counter = _CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    trainer.add_callback(Timer())
    trainer.train()

    if len(stamps) != total + 1:
        raise RuntimeError(f"expected {total} step-end stamps, got {len(stamps) - 1}")
    if len(counter.counts) < total:
        raise RuntimeError(f"expected >= {total} collated batches, got {len(counter.counts)}")
    times = [b - a for a, b in zip(stamps[:-1], stamps[1:], strict=True)]
    counts = counter.counts[:total]
    expected = [wl.real_tokens(wl.step_rows(rows, w, i, wrap=wrap), task, w.bos) for i in range(total)]
    got = [c[0] for c in counts]
    if got != expected:
        raise RuntimeError(f"TRL trained on other tokens than the workload defines: {got} != {expected}")
    return {
        "framework": "trl" + ("-bf16" if bf16 else ""),
        "task": task,
        "workload": w.name,
        "fingerprint": w.fingerprint(),
        "steps": steps,
        "warmup_steps": warmup,
        "step_times": times[warmup:],
        "real_tokens_per_step": [c[0] for c in counts[warmup:]],
        "padded_tokens_per_step": [c[1] for c in counts[warmup:]],
        "versions": _versions(),
        "config": {
            "trainer": type(trainer).__name__,
            "dtype": "bf16-autocast" if bf16 else "float32",
            "gradient_checkpointing": False,
            "precompute_ref_log_probs": False if task == "dpo" else None,
            "padding": "dynamic (longest in batch), right",
            "attn_implementation": "sdpa",
            "threads": threads,
        },
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", choices=results.TASKS, required=True)
    ap.add_argument("--workdir", required=True, help="a work dir written by jaxrlhf.bench.workload.prepare")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default: the workload's)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: the workload's)")
    ap.add_argument("--bf16", action="store_true", help="TRL's bf16 autocast instead of float32")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
    ap.add_argument(
        "--wrap", action="store_true", help="all rows, epochs repeating (runs longer than the data)"
    )
    a = ap.parse_args(argv)
    out = run(a.task, a.workdir, steps=a.steps, warmup=a.warmup, bf16=a.bf16, threads=a.threads, wrap=a.wrap)
    results.emit(out)


if __name__ == "__main__":
    main()
