r"""How the DPO step scales: batch size, sequence length, and (fake CPU) device count.

    python -m jaxrlhf.bench.scaling [--preset=cpu-small] [--out=docs/results/bench_scaling.json]

* batch sweep at a fixed sequence length and sequence sweep at a fixed batch, in this process;
* device sweep: the same global batch on 1, 2, 4, 8 devices (``fsdp=n``; on CPU these are fake
  devices from ``--xla_force_host_platform_device_count``, one subprocess each), showing that the
  sharded step's cost does not explode with the device count (on one CPU the devices share the
  same cores, so the ideal is a flat line, not a speed-up).

Writes JSON, a markdown table and a PNG (tokens/s vs sequence length and vs batch size).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import types

import jax
import numpy as np

from jaxrlhf import config_defaults as d
from jaxrlhf.bench import steps
from jaxrlhf.sharding import make_mesh


def one(preset: str, algo: str, batch: int, seq: int, n_steps: int, warmup: int, mesh, peak) -> dict:
    cfg_model = d.model(**steps.PRESETS[preset])
    cfg_model.dtype = "float32"
    a = types.SimpleNamespace(batch=batch, seq=seq, warmup=warmup, steps=n_steps, micro_batches=1)
    r = steps.bench_train_step(algo, cfg_model, a, mesh, peak, np.random.default_rng(0))
    return {
        "batch": batch,
        "seq": seq,
        **{k: r[k] for k in ("step_time_s", "real_tokens_per_s", "padded_tokens_per_s")},
    }


def device_sweep(preset: str, batch: int, seq: int, counts, n_steps: int, warmup: int) -> list[dict]:
    out = []
    for n in counts:
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
        cmd = [
            sys.executable, "-m", "jaxrlhf.bench", f"--preset={preset}", "--only=dpo", f"--fsdp={n}",
            f"--batch={batch}", f"--seq={seq}", f"--steps={n_steps}", f"--warmup={warmup}",
        ]  # fmt: skip
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode:
            raise RuntimeError(f"device sweep with {n} devices failed:\n{proc.stderr[-2000:]}")
        line = next(ln for ln in proc.stdout.splitlines() if ln.startswith('{"step": "dpo"'))
        r = json.loads(line)
        out.append(
            {"devices": n, "step_time_s": r["step_time_s"], "padded_tokens_per_s": r["padded_tokens_per_s"]}
        )
    return out


def plot(report: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, xs, label in (
        (axes[0], "seq_sweep", "seq", "sequence length"),
        (axes[1], "batch_sweep", "batch", "batch size (pairs)"),
    ):
        rows = report[key]
        ax.plot([r[xs] for r in rows], [r["padded_tokens_per_s"] for r in rows], "o-", label="padded")
        ax.plot([r[xs] for r in rows], [r["real_tokens_per_s"] for r in rows], "s--", label="real")
        ax.set_xlabel(label)
        ax.set_ylabel("tokens/s (DPO step)")
        ax.grid(alpha=0.3)
        ax.legend()
    rows = report["device_sweep"]
    axes[2].plot([r["devices"] for r in rows], [r["step_time_s"]["median"] for r in rows], "o-")
    axes[2].set_xlabel("fake CPU devices (fsdp)")
    axes[2].set_ylabel("step time (s)")
    axes[2].set_xscale("log", base=2)
    axes[2].grid(alpha=0.3)
    fig.suptitle(f"jaxrlhf DPO step scaling ({report['preset']}, {report['device']})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def markdown(report: dict) -> str:
    lines = [f"Preset {report['preset']}, DPO step, float32, {report['device']}.", ""]
    for key, xs in (("seq_sweep", "seq"), ("batch_sweep", "batch")):
        lines += [
            f"| swept: {xs} | batch | seq | step time s (median) | real tok/s | padded tok/s |",
            "|---|---|---|---|---|---|",
        ]
        for r in report[key]:
            lines.append(
                f"| {r[xs]} | {r['batch']} | {r['seq']} | {r['step_time_s']['median']:.3f} | "
                f"{r['real_tokens_per_s']:,.0f} | {r['padded_tokens_per_s']:,.0f} |"
            )
        lines.append("")
    lines += ["| fake devices (fsdp) | step time s (median) | padded tok/s |", "|---|---|---|"]
    for r in report["device_sweep"]:
        lines.append(
            f"| {r['devices']} | {r['step_time_s']['median']:.3f} | {r['padded_tokens_per_s']:,.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description="DPO step scaling with batch, sequence length and devices.")
    ap.add_argument("--preset", default="cpu-small", choices=sorted(steps.PRESETS))
    ap.add_argument("--seqs", default="128,256,512")
    ap.add_argument("--batches", default="2,4,8")
    ap.add_argument("--devices", default="1,2,4,8")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--out", default=None, help="JSON path (a .md and a .png are written beside it)")
    a = ap.parse_args(argv)
    mesh = make_mesh(dict(data=1, fsdp=1, tensor=1))
    _, peak = steps.device_peak()
    seqs = [int(x) for x in a.seqs.split(",")]
    batches = [int(x) for x in a.batches.split(",")]
    mid_b, mid_t = batches[len(batches) // 2], seqs[len(seqs) // 2]
    report = {
        "preset": a.preset,
        "device": f"{jax.devices()[0].platform}",
        "seq_sweep": [one(a.preset, "dpo", mid_b, t, a.steps, a.warmup, mesh, peak) for t in seqs],
        "batch_sweep": [one(a.preset, "dpo", b, mid_t, a.steps, a.warmup, mesh, peak) for b in batches],
        "device_sweep": device_sweep(
            a.preset, max(batches), mid_t, [int(x) for x in a.devices.split(",")], a.steps, a.warmup
        ),
    }
    text = markdown(report)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=2)
        base = os.path.splitext(a.out)[0]
        with open(base + ".md", "w") as f:
            f.write(text)
        plot(report, base + ".png")
    return report


if __name__ == "__main__":
    main()
