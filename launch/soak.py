r"""Soak test of resume (not in CI): interrupt a training run N times at random points, resume it
each time, and compare its final parameters bit for bit with an uninterrupted run.

    nice -n 10 python launch/soak.py --n 10 --seed 0 --workdir /tmp/soak

Each interruption is SIGTERM (the run checkpoints and exits) or SIGKILL (no warning: the run
resumes from its last complete checkpoint), sent after a random logged step or, sometimes, during
start-up before any step. Interruptions land anywhere: during compilation, inside a step, during
an asynchronous checkpoint write. After the N-th, the run is resumed until it finishes. The
exported ``hf/*.safetensors`` of both runs must be bit-identical. Prints one line per attempt and
a summary; exit status 0 only when every parameter matches.
"""

from __future__ import annotations

import argparse
import glob
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP_LINE = re.compile(r"\] step (\d+): ")  # the Logger's console line


def train_cmd(args, workdir: str) -> list[str]:
    return [
        sys.executable, "-m", "jaxrlhf.train", f"--config={args.config}", f"--workdir={workdir}",
        f"--config.total_steps={args.steps}", f"--config.checkpoint.every={args.every}",
        "--config.log_every=1", "--config.progress_bar=False",
    ]  # fmt: skip


def env() -> dict:
    e = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    e.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    return e


def checkpoint_steps(workdir: str) -> list[int]:
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def run_once(args, workdir: str, *, kill_at: int | None, sig, startup: bool, rng) -> tuple[int, int, str]:
    """Runs training; when ``kill_at`` is set, sends ``sig`` after step ``kill_at`` is logged (plus a
    random delay), or during start-up when ``startup``. Returns ``(exit code, last logged step, tail)``."""
    proc = subprocess.Popen(
        train_cmd(args, workdir),
        cwd=ROOT,
        env=env(),
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    last = -1
    tail: list[str] = []
    sent = False

    def fire():
        nonlocal sent
        if not sent and proc.poll() is None:
            proc.send_signal(sig)
            sent = True

    if kill_at is not None and startup:
        threading.Timer(rng.uniform(0.5, args.startup_s), fire).start()
    armed = kill_at is not None and not startup
    for line in proc.stderr:
        tail = (tail + [line.rstrip()])[-40:]
        m = STEP_LINE.search(line)
        if m:
            last = int(m.group(1))
        if armed and last >= kill_at:
            threading.Timer(rng.uniform(0.0, args.max_delay_s), fire).start()
            armed = False
    code = proc.wait(timeout=args.timeout_s)
    return code, last, "\n".join(tail)


def load_params(hf_dir: str) -> dict:
    from safetensors.numpy import load_file

    out = {}
    for f in sorted(glob.glob(os.path.join(hf_dir, "*.safetensors"))):
        out.update(load_file(f))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=10, help="interruptions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", default="configs/tiny/sft.py")
    p.add_argument("--steps", type=int, default=40, help="config.total_steps")
    p.add_argument("--every", type=int, default=3, help="config.checkpoint.every")
    p.add_argument("--kill_fraction", type=float, default=0.5, help="share of SIGKILL (rest SIGTERM)")
    p.add_argument("--startup_fraction", type=float, default=0.2, help="share sent during start-up")
    p.add_argument("--startup_s", type=float, default=8.0, help="start-up window for those (seconds)")
    p.add_argument("--max_delay_s", type=float, default=0.3, help="random delay after the chosen step")
    p.add_argument("--timeout_s", type=float, default=900.0)
    p.add_argument("--workdir", default="/tmp/jaxrlhf_soak")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    shutil.rmtree(args.workdir, ignore_errors=True)
    ref_dir, soak_dir = os.path.join(args.workdir, "reference"), os.path.join(args.workdir, "soak")
    t0 = time.time()

    code, last, tail = run_once(args, ref_dir, kill_at=None, sig=None, startup=False, rng=rng)
    if code != 0 or last != args.steps:
        print(f"reference run failed (exit {code}, last step {last}):\n{tail}")
        return 2
    print(f"reference: {args.steps} steps, exit 0 ({time.time() - t0:.0f}s)", flush=True)

    interruptions = {"SIGTERM": 0, "SIGKILL": 0, "startup": 0}
    attempts = 0
    while True:
        attempts += 1
        done = checkpoint_steps(soak_dir)
        start = done[-1] if done else 0
        if interruptions["SIGTERM"] + interruptions["SIGKILL"] < args.n and start < args.steps - 1:
            sig = signal.SIGKILL if rng.random() < args.kill_fraction else signal.SIGTERM
            startup = rng.random() < args.startup_fraction
            # spread the remaining interruptions over the remaining steps
            remaining = args.n - interruptions["SIGTERM"] - interruptions["SIGKILL"]
            window = max(2, (args.steps - start) // (remaining + 1))
            kill_at = min(start + rng.randint(1, window), args.steps - 1)
            code, last, tail = run_once(args, soak_dir, kill_at=kill_at, sig=sig, startup=startup, rng=rng)
            name = signal.Signals(sig).name
            if code == 0 and last == args.steps:
                print(f"attempt {attempts}: {name} came too late; run finished (step {last})", flush=True)
                break
            interruptions[name] += 1
            interruptions["startup"] += int(startup and last < 0)
            expected = {signal.SIGTERM: (0,), signal.SIGKILL: (-9,)}[sig]
            when = "start-up" if last < 0 else f"after step {last}"
            print(
                f"attempt {attempts}: {name} {when} (from checkpoint {start}); exit {code}; "
                f"checkpoints now {checkpoint_steps(soak_dir)}",
                flush=True,
            )
            if code not in expected and not (sig == signal.SIGTERM and code == -15):
                print(f"unexpected exit {code}:\n{tail}")
                return 2
        else:
            code, last, tail = run_once(args, soak_dir, kill_at=None, sig=None, startup=False, rng=rng)
            print(f"attempt {attempts}: resumed to the end, exit {code}, last step {last}", flush=True)
            if code != 0:
                print(tail)
                return 2
            break

    ref, got = load_params(os.path.join(ref_dir, "hf")), load_params(os.path.join(soak_dir, "hf"))
    differ = [k for k in ref if k not in got or ref[k].tobytes() != got[k].tobytes()]
    differ += [k for k in got if k not in ref]
    n_int = interruptions["SIGTERM"] + interruptions["SIGKILL"]
    summary = (
        f"soak: {n_int} interruptions ({interruptions['SIGTERM']} SIGTERM, "
        f"{interruptions['SIGKILL']} SIGKILL, "
        f"{interruptions['startup']} during start-up) over {attempts} runs of {args.steps} steps "
        f"(checkpoint every {args.every}), seed {args.seed}, {time.time() - t0:.0f}s: "
    )
    if differ:
        print(summary + f"{len(differ)} of {len(ref)} tensors DIFFER: {differ[:5]}")
        return 1
    total = sum(int(np.prod(v.shape)) for v in ref.values())
    print(summary + f"final parameters bit-identical ({len(ref)} tensors, {total} values)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
