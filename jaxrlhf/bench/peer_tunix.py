"""Tunix runner for the side-by-side benchmark: ``tunix.sft.dpo.DPOTrainer`` on the shared workload.

Runs in its own venv (``.venv-bench-tunix``: google-tunix with the jax/flax it pulls in; Tunix pins
``safetensors<0.8``, which drags transformers back to 5.12, so it cannot share TRL's venv)::

    .venv-bench-tunix/bin/python -m jaxrlhf.bench.peer_tunix --task dpo --workdir workdirs/bench/cpu

and prints one result line (see :mod:`jaxrlhf.bench.results`). Tunix has no reward-model trainer,
so ``--task reward`` is refused.

How Tunix is configured (its documented usage; nothing hobbled):

- the model is Tunix's own ``tunix.models.llama3`` ``Llama3`` built from the shared HF safetensors
  with ``tunix.models.llama3.params.create_model_from_safe_tensors`` (policy and a separate frozen
  reference), float32, no remat (``RematConfig.NONE``, Tunix's default);
- batches are Tunix's pre-tokenized ``TrainingInput`` (its no-tokenizer path, so tokenization is
  outside the timed loop as for TRL): prompts ``<s> + words`` **left**-padded to
  ``max_prompt_length``, responses ``words + </s>`` **right**-padded to ``max_response_length``.
  These fixed shapes are how Tunix's ``process_dpo_record`` pads (one compile for the run);
  we build the ids ourselves only because ``process_dpo_record`` would prepend ``<s>`` to
  responses and add no ``</s>``, which is other work than TRL's and ours;
- ``DPOTrainingConfig(beta=workload.beta, max_steps=warmup+steps)``, optimizer
  ``optax.chain(clip_by_global_norm, adamw)`` with the workload's lr, betas, eps and weight decay;
  Tunix's default ``max_inflight_computations=2`` (async dispatch), no checkpointing, no eval.

Timing: the batch iterator stamps ``time.perf_counter()`` each time the trainer asks for the next
batch, after blocking on the policy's parameters (``jax.block_until_ready``) from the first timed
step on, so each timed step is exact. The sync costs Tunix only the host-side overlap of its two
in-flight steps (batches are pre-built); without it the per-step split followed the dispatch pace
(a ~0 s first step, the drain in the last).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from jaxrlhf.bench import results
from jaxrlhf.bench import workload as wl


def make_batch(rows, w: wl.Workload, tok) -> dict[str, np.ndarray]:
    """Tunix ``TrainingInput`` fields for ``rows``: prompt ids/mask ``[B, P]`` left-padded, chosen
    and rejected ids/mask ``[B, R]`` right-padded (``P = max_prompt_length``, ``R =
    max_response_length``)."""
    b, P, R = len(rows), w.max_prompt_length, w.max_response_length
    keys = ("prompt_ids", "prompt_mask", "chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask")
    out = {k: np.zeros((b, P if k.startswith("prompt") else R), np.int32) for k in keys}
    out["prompt_ids"][:] = wl.PAD_ID
    out["chosen_ids"][:] = wl.PAD_ID
    out["rejected_ids"][:] = wl.PAD_ID
    for i, r in enumerate(rows):
        p = tok(r["prompt"])["input_ids"]  # <s> + prompt words
        if len(p) > P:
            raise ValueError(f"row {r['id']}: prompt has {len(p)} tokens > max_prompt_length={P}")
        out["prompt_ids"][i, P - len(p) :] = p
        out["prompt_mask"][i, P - len(p) :] = 1
        for key in ("chosen", "rejected"):
            ids = tok(r[key], add_special_tokens=False)["input_ids"] + [wl.EOS_ID]
            if len(ids) > R:
                raise ValueError(f"row {r['id']}: {key} has {len(ids)} tokens > max_response_length={R}")
            out[f"{key}_ids"][i, : len(ids)] = ids
            out[f"{key}_mask"][i, : len(ids)] = 1
    return out


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    import jax

    return {
        "python": sys.version.split()[0],
        "google-tunix": version("google-tunix"),
        "jax": jax.__version__,
        "jaxlib": version("jaxlib"),
        "flax": version("flax"),
        "optax": version("optax"),
        "backend": jax.default_backend(),
    }


def run(task: str, workdir: str, *, steps: int | None, warmup: int | None) -> dict:
    if task != "dpo":
        raise ValueError(f"Tunix has no {task!r} trainer (only DPO/ORPO); run it with --task dpo")
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx
    from transformers import AutoTokenizer
    from tunix.models.llama3 import model as llama_lib
    from tunix.models.llama3 import params as llama_params
    from tunix.sft.dpo import dpo_trainer

    w, p, rows = wl.load(workdir)
    steps = w.steps if steps is None else steps
    warmup = w.warmup_steps if warmup is None else warmup
    total = warmup + steps
    tok = AutoTokenizer.from_pretrained(p["tokenizer"])
    batches = [make_batch(wl.step_rows(rows, w, i), w, tok) for i in range(total)]
    expected = [wl.real_tokens(wl.step_rows(rows, w, i), task) for i in range(total)]
    got = [
        int(2 * b["prompt_mask"].sum() + b["chosen_mask"].sum() + b["rejected_mask"].sum()) for b in batches
    ]
    if got != expected:
        raise RuntimeError(f"Tunix batches hold other tokens than the workload defines: {got} != {expected}")
    padded = 2 * w.batch_size * w.max_length

    cfg = llama_lib.ModelConfig(
        num_layers=w.num_layers,
        vocab_size=w.vocab_size,
        embed_dim=w.hidden_size,
        hidden_dim=w.intermediate_size,
        num_heads=w.num_heads,
        head_dim=w.head_dim,
        num_kv_heads=w.num_kv_heads,
        rope_theta=int(w.rope_theta),
        norm_eps=w.rms_norm_eps,
        weight_tying=False,
    )
    dtype = jnp.bfloat16 if w.dtype == "bfloat16" else jnp.float32
    policy = llama_params.create_model_from_safe_tensors(p["model"], cfg, dtype=dtype)
    ref = llama_params.create_model_from_safe_tensors(p["model"], cfg, dtype=dtype)
    optimizer = optax.chain(
        optax.clip_by_global_norm(w.max_grad_norm),
        optax.adamw(w.learning_rate, b1=w.adam_b1, b2=w.adam_b2, eps=w.adam_eps, weight_decay=w.weight_decay),
    )
    tcfg = dpo_trainer.DPOTrainingConfig(
        beta=w.beta,
        eval_every_n_steps=10**9,
        max_steps=total,
        pbar_description=None,
    )
    trainer = dpo_trainer.DPOTrainer(model=policy, ref_model=ref, optimizer=optimizer, training_config=tcfg)

    stamps: list[float] = []

    def sync():
        jax.block_until_ready(nnx.state(trainer.model, nnx.Param))

    def feed():
        for i, b in enumerate(batches):
            if i >= warmup:
                sync()
            stamps.append(time.perf_counter())
            yield dict(b)
        sync()
        stamps.append(time.perf_counter())

    trainer.train(feed())
    if len(stamps) != total + 1:
        raise RuntimeError(f"expected {total + 1} batch stamps, got {len(stamps)}")
    times = [b - a for a, b in zip(stamps[warmup:-1], stamps[warmup + 1 :], strict=True)]
    return {
        "framework": "tunix",
        "task": task,
        "workload": w.name,
        "fingerprint": w.fingerprint(),
        "steps": steps,
        "warmup_steps": warmup,
        "step_times": times,
        "real_tokens_per_step": expected[warmup:],
        "padded_tokens_per_step": [padded] * steps,
        "versions": _versions(),
        "config": {
            "trainer": "tunix.sft.dpo.DPOTrainer",
            "model": "tunix.models.llama3.Llama3",
            "dtype": w.dtype,
            "padding": f"fixed: prompt left-padded to {w.max_prompt_length}, responses right-padded "
            f"to {w.max_response_length}",
            "remat": "none",
            "max_inflight_computations": 2,
            "threads": os.cpu_count(),
        },
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", choices=results.TASKS, required=True)
    ap.add_argument("--workdir", required=True, help="a work dir written by jaxrlhf.bench.workload.prepare")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default: the workload's)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: the workload's)")
    a = ap.parse_args(argv)
    results.emit(run(a.task, a.workdir, steps=a.steps, warmup=a.warmup))


if __name__ == "__main__":
    main()
