r"""jaxrlhf's runner for the side-by-side benchmark (``python -m jaxrlhf.bench.compare``).

    python -m jaxrlhf.bench.ours --task dpo|reward --workdir DIR [--steps S] [--warmup K]
        [--no_packing]

Loads the shared workload (``jaxrlhf.bench.workload``): the HF-format Llama in ``model/`` (policy
and frozen reference) or ``reward_model/``, the saved tokenizer and ``data.jsonl``; tokenizes with
our data pipeline (file order, no shuffle). By default each batch's 2 B sequences are packed into
rows of ``max_length`` (``config.data.packing``: the same pairs per step, a varying row count);
``--no_packing`` pads pairs to the batch's longest sequence rounded to ``--pad_multiple``. Every
shape the run will use is compiled before timing, as a long run amortises it;
trains ``K + S`` steps with our jitted DPO / reward train step (AdamW, constant LR, global-norm
clipping, the workload's hyper-parameters) and prints one result line
(``jaxrlhf.bench.results.emit``). Each step is timed end to end: host batching, device transfer,
the step, ``block_until_ready`` on the new state.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf import config_defaults as d
from jaxrlhf import data as data_lib
from jaxrlhf import registry
from jaxrlhf.bench import results
from jaxrlhf.bench import workload as wl
from jaxrlhf.sharding import make_mesh, shard_batch
from jaxrlhf.trainer import setup as setup_lib


def build_config(task: str, w: wl.Workload, paths: dict, pad_multiple: int, packing: bool = True):
    """An ordinary jaxrlhf config for the workload (the same keys ``jaxrlhf.train`` reads)."""
    c = d.base(task)
    c.model = d.model(paths["reward_model"] if task == "reward" else paths["model"])
    c.model.dtype = c.model.param_dtype = w.dtype
    c.tokenizer = paths["tokenizer"]
    c.data = d.data(
        path=paths["data"],
        schema="preference",
        max_prompt_length=w.max_prompt_length,
        max_length=w.max_length,
        bucket=False,
        shuffle=False,
        packing=packing,
        strict=True,  # the workload is built so that nothing is dropped or cut
    )
    c.mesh = dict(data=1, fsdp=1, tensor=1)
    c.batch_size = w.batch_size
    c.pad_to_multiple_of = pad_multiple
    c.optim = d.optim(
        lr=w.learning_rate, schedule="constant", warmup_steps=0, b1=w.adam_b1, b2=w.adam_b2, eps=w.adam_eps,
        weight_decay=w.weight_decay, clip_norm=w.max_grad_norm, no_decay=(),
    )  # fmt: skip
    if task == "dpo":
        c.ref = d.ref(ema_decay=1.0)
        c.dpo = d.dpo(beta=w.beta)
    return c


def setup(task: str, workdir: str, steps: int, warmup: int, pad_multiple: int = 64, packing: bool = True):
    """The workload, its rows, a fresh-iterator factory, the train state and the compiled step.

    Returns ``(w, rows, iterator, state, train_step, mesh)``; ``iterator()`` starts at the first batch.
    """
    w, paths, rows = wl.load(workdir)
    c = build_config(task, w, paths, pad_multiple, packing)
    mesh = make_mesh(c.mesh)
    tok = data_lib.load_tokenizer(c.tokenizer)
    ds = data_lib.build_dataset(c.data, tok, "preference", "train")

    def iterator():
        return data_lib.BatchIterator(
            ds, w.batch_size, shuffle=False, bucket=False, pad_to_multiple_of=pad_multiple, packing=packing
        )

    t = setup_lib.build_offline(c, registry.get(task), mesh, total_steps=steps + warmup)
    return w, rows, iterator, t.state, t.step, mesh


def run(
    task: str, workdir: str, steps: int, warmup: int, pad_multiple: int, precompile: bool = True,
    packing: bool = True,
) -> dict:  # fmt: skip
    w, rows, iterator, state, train_step, mesh = setup(task, workdir, steps, warmup, pad_multiple, packing)
    it = iterator()
    if precompile:  # every shape the run's batches have, compiled before the clock starts
        t0 = time.perf_counter()
        probe, seen = iterator(), set()
        for _ in range(warmup + steps):
            host = next(probe)
            key = tuple((k, v.shape) for k, v in sorted(host.items()))
            if key not in seen:
                seen.add(key)
                train_step.precompile(state, {k: (v.shape, v.dtype) for k, v in host.items()})
        compile_s = time.perf_counter() - t0
    else:
        compile_s = 0.0
    times, real, padded = [], [], []
    t_prev = time.perf_counter()
    for i in range(warmup + steps):
        host = next(it)
        expected = wl.real_tokens(wl.step_rows(rows, w, i), task, w.bos)
        got = int(sum(v.sum() for k, v in host.items() if k.endswith("attention_mask")))
        if got != expected:
            raise RuntimeError(f"step {i}: our batch has {got} real tokens, the workload says {expected}")
        state, metrics = train_step(state, shard_batch(mesh, host))
        jax.block_until_ready(state)
        now = time.perf_counter()
        if i >= warmup:
            times.append(now - t_prev)
            real.append(got)
            padded.append(int(sum(v.size for k, v in host.items() if k.endswith("input_ids"))))
        t_prev = now
    loss = float(jax.device_get(metrics["loss"]))
    if not np.isfinite(loss):
        raise RuntimeError(f"non-finite loss {loss}")
    import flax
    import optax

    return {
        "framework": "ours",
        "task": task,
        "workload": w.name,
        "fingerprint": w.fingerprint(),
        "steps": steps,
        "warmup_steps": warmup,
        "step_times": times,
        "real_tokens_per_step": real,
        "padded_tokens_per_step": padded,
        "versions": {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__},
        "config": {
            "dtype": w.dtype,
            "pad_to_multiple_of": pad_multiple,
            "packing": packing,
            "compiled_shapes": len(train_step.executables),
            "precompile_s": compile_s,
            "final_loss": loss,
            "devices": f"{jax.device_count()} x {jax.devices()[0].platform}",
            "jnp_default": str(jnp.zeros(()).dtype),
        },
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", choices=results.TASKS, required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--pad_multiple", type=int, default=64, help="dynamic padding granularity")
    ap.add_argument(
        "--no_precompile", action="store_true", help="compile new batch lengths inside the timed steps"
    )
    ap.add_argument("--no_packing", action="store_true", help="pad pairs instead of packing sequences")
    a = ap.parse_args(argv)
    w, _, _ = wl.load(a.workdir)
    res = run(
        a.task,
        os.path.abspath(a.workdir),
        a.steps if a.steps is not None else w.steps,
        a.warmup if a.warmup is not None else w.warmup_steps,
        a.pad_multiple,
        precompile=not a.no_precompile,
        packing=not a.no_packing,
    )
    results.emit(res)
    return res


if __name__ == "__main__":
    main()
