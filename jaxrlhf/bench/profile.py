r"""Where the time of a benchmark step goes: ``python -m jaxrlhf.bench.profile``.

    python -m jaxrlhf.bench.profile --task reward|dpo [--workdir workdirs/bench/cpu] [--steps 2]
        [--no_packing] [--top 25]

Builds the side-by-side benchmark's step (``jaxrlhf.bench.ours.setup``: same workload, weights,
batches), runs its first batch once to compile, then traces ``--steps`` calls with the JAX profiler
and XLA:CPU's per-kernel trace events (``--xla_cpu_enable_xprof_traceme``, set here before JAX
starts). It prints the kernel time per category (matmuls inside attention, other matmuls,
elementwise/copy/reduce fusions) and the ``--top`` kernels with their shapes and the JAX operation
they come from (HLO ``op_name`` metadata: ``transpose(jvp(...))`` is the backward pass).

Kernels of one step run concurrently on the CPU's threads, so the kernel-time sum exceeds the
step's wall time; the shares are what matters. GPU/TPU: use ``jax.profiler`` with XProf instead.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile

if __name__ == "__main__":  # before JAX starts: XLA:CPU emits one trace event per kernel
    _flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = (_flags + " --xla_cpu_enable_xprof_traceme=true").strip()

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_SKIP = ("Thunk", "Await", "$")  # executor / Python-side events, not kernels
ATTENTION_EINSUMS = ("bkgtd,bksd->bkgts", "bkgts,bksd->bkgtd")  # jaxrlhf.models.modeling.attend


def kernel_times(trace_dir: str) -> collections.Counter:
    """Microseconds per kernel name summed over a ``jax.profiler`` perfetto trace."""
    (path,) = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    times: collections.Counter = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and not any(s in e["name"] for s in _SKIP):
            times[e["name"]] += e["dur"]
    return times


def describe(hlo_text: str, name: str) -> dict[str, str]:
    """Shape, JAX op_name and category of the HLO instruction ``name`` in an optimized module."""
    m = re.search(r"^\s*%?" + re.escape(name) + r" = (\S+) (\w[\w-]*)\((.*)$", hlo_text, re.M)
    if not m:
        return {"shape": "?", "op": "?", "category": "other"}
    shape, line = m.group(1), m.group(0)
    op = re.search(r'op_name="([^"]*)"', line)
    op_name = op.group(1) if op else ""
    body = ""
    called = re.search(r"calls=%?([\w.\-]+)", line)
    if called:
        b = re.search(r"^%?" + re.escape(called.group(1)) + r" \(.*?\n(.*?)\n}", hlo_text, re.M | re.S)
        body = b.group(1) if b else ""
    is_dot = m.group(2) in ("dot", "convolution") or " dot(" in body or "__onednn" in line
    if is_dot:
        attn = any(e in op_name or e in body for e in ATTENTION_EINSUMS)
        category = "matmul: attention" if attn else "matmul: projections/MLP/head"
    else:
        category = "elementwise/copy/reduce"
    return {"shape": shape, "op": op_name, "category": category}


def profile(task: str, workdir: str, steps: int, packing: bool, top: int) -> dict:
    import jax

    from jaxrlhf.bench import ours
    from jaxrlhf.sharding import shard_batch

    _, _, iterator, state, train_step, mesh = ours.setup(task, workdir, steps, 1, packing=packing)
    batch = shard_batch(mesh, next(iterator()))
    state, _ = train_step(state, batch)
    jax.block_until_ready(state)
    trace_dir = tempfile.mkdtemp(prefix="jaxrlhf-profile-")
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(steps):
            state, _ = train_step(state, batch)
            jax.block_until_ready(state)
    times = kernel_times(trace_dir)
    (exe,) = train_step.executables.values()
    hlo = exe.as_text()
    rows = []
    for name, us in times.items():
        rows.append({"kernel": name, "ms_per_step": us / 1e3 / steps, **describe(hlo, name)})
    rows.sort(key=lambda r: -r["ms_per_step"])
    by_cat: collections.Counter = collections.Counter()
    for r in rows:
        by_cat[r["category"]] += r["ms_per_step"]
    total = sum(by_cat.values())
    shapes = {k: tuple(v.shape) for k, v in batch.items()}
    return {"task": task, "packing": packing, "batch_shapes": shapes, "kernel_ms_per_step": total,
            "categories": dict(by_cat.most_common()), "top": rows[:top]}  # fmt: skip


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", choices=("reward", "dpo"), required=True)
    ap.add_argument("--workdir", default=os.path.join(REPO, "workdirs", "bench", "cpu"))
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--no_packing", action="store_true")
    a = ap.parse_args(argv)
    from jaxrlhf.bench import workload as wl

    if not os.path.exists(os.path.join(a.workdir, "workload.json")):
        wl.prepare(a.workdir, wl.WORKLOADS["cpu"])
    rep = profile(a.task, a.workdir, a.steps, not a.no_packing, a.top)
    print(f"{a.task} step, batch {rep['batch_shapes'].get('input_ids') or rep['batch_shapes']}, "
          f"packing={rep['packing']}: {rep['kernel_ms_per_step']:.0f} kernel-ms per step")  # fmt: skip
    for cat, ms in rep["categories"].items():
        print(f"  {cat:32s} {ms:8.1f} ms  {100 * ms / rep['kernel_ms_per_step']:5.1f} %")
    print(f"top {len(rep['top'])} kernels (ms per step, output shape, JAX op):")
    for r in rep["top"]:
        print(f"  {r['ms_per_step']:7.1f}  {r['shape'][:34]:34s} {r['op'][:90]}")
    return rep


if __name__ == "__main__":
    main()
