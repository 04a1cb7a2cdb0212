"""Two processes (``jax.distributed`` on localhost, 4 fake CPU devices each, gloo collectives)
through ``python -m jaxrlhf.train``: a killed peer stops the other with a clear error within a
bounded time, the rerun resumes bit-exactly, and checkpoints, tensorboard events and the HF export
are written once (docs/reliability.md).

The reference for "bit-exact" is an uninterrupted two-process run of the same config (same mesh,
same device layout); the reference for "written once" is a one-process run of the same config.
"""

import contextlib
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxrlhf import distributed

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("multiprocess_faults")]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, KILL_AFTER, HEARTBEAT_S = 8, 5, 15
BOUND_S = 60  # the survivor must be gone this long after the kill at the latest

# python -m jaxrlhf.train, except that process $KILL_PROCESS SIGKILLs itself right after step
# $KILL_AFTER (a deterministic point mid-training; SIGKILL cannot be caught, whoever sends it),
# first writing the time of the kill to $KILL_STAMP.
KILLER = """
import os, runpy, signal, sys, time
from jaxrlhf.trainer import harness
end = harness.Run.end_iteration
def end_iteration(self, i, state, side):
    stop = end(self, i, state, side)
    if i == int(os.environ["KILL_AFTER"]) and os.environ["JAX_PROCESS_ID"] == os.environ["KILL_PROCESS"]:
        with open(os.environ["KILL_STAMP"], "w") as f:
            f.write(repr(time.time()))
        os.kill(os.getpid(), signal.SIGKILL)
    return stop
harness.Run.end_iteration = end_iteration
sys.argv = ["jaxrlhf.train"] + sys.argv[1:]
runpy.run_module("jaxrlhf.train", run_name="__main__")
"""


def _args(workdir):
    # No persistent compilation cache: a hit on one process and a miss on the other (its devices
    # differ) puts them 30 s apart at the first collective, past gloo's fixed rendezvous timeout.
    return [
        "--config=configs/tiny/sft.py", f"--workdir={workdir}", f"--config.total_steps={STEPS}",
        "--config.mesh.data=2", "--config.mesh.fsdp=4", "--config.log_every=1",
        "--config.checkpoint.every=2", "--config.checkpoint.async_save=False",
        "--config.optim.schedule=constant", f"--config.distributed.heartbeat_timeout_s={HEARTBEAT_S}",
    ]  # fmt: skip


def _env(devices, **extra):
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_COORDINATOR_ADDRESS", "JAX_PROCESS_ID")}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    env.update(PYTHONPATH=ROOT, PYTHONUNBUFFERED="1", JAX_NUM_PROCESSES="1")
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_group(proc) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def run_two(workdir, logs, *, kill_process=None, timeout=400):
    """Runs both processes to their end; returns ``(returncodes, stderr texts, kill time, end times)``."""
    port = _free_port()
    stamp = f"{logs}.killed"
    procs, files, ends = [], [], {}
    try:
        for i in range(2):
            env = _env(
                4, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)
            )
            cmd = [sys.executable, "-m", "jaxrlhf.train"]
            if kill_process is not None:
                env.update(KILL_AFTER=str(KILL_AFTER), KILL_PROCESS=str(kill_process), KILL_STAMP=stamp)
                cmd = [sys.executable, "-c", KILLER]
            files.append(open(f"{logs}.{i}.err", "w"))  # noqa: SIM115 - closed in the finally
            procs.append(
                subprocess.Popen(
                    cmd + _args(workdir), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                    stderr=files[-1], start_new_session=True,
                )
            )  # fmt: skip
        deadline = time.time() + timeout
        while len(ends) < 2 and time.time() < deadline:
            for i, p in enumerate(procs):
                if i not in ends and p.poll() is not None:
                    ends[i] = time.time()
            time.sleep(0.1)
        codes = [p.poll() for p in procs]
    finally:
        for p in procs:
            _kill_group(p)
        for f in files:
            f.close()
    errs = []
    for i in range(2):
        with open(f"{logs}.{i}.err") as f:
            errs.append(f.read())
    assert None not in codes, f"a process still ran after {timeout} s:\n" + "\n".join(e[-3000:] for e in errs)
    killed = None
    if os.path.exists(stamp):
        with open(stamp) as f:
            killed = float(f.read())
    return codes, errs, killed, ends


def run_one(workdir, logs, timeout=400):
    proc = subprocess.run(
        [sys.executable, "-m", "jaxrlhf.train", *_args(workdir)],
        cwd=ROOT, env=_env(8), capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    with open(f"{logs}.err", "w") as f:
        f.write(proc.stderr)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def tb_scalars(workdir) -> list[tuple[str, int, float]]:
    """Every scalar in ``<workdir>/tb``'s event files: (tag, step, value), read record by record
    (TFRecord framing: length u64, its crc u32, the Event proto, its crc u32)."""
    from tensorboardX.proto import event_pb2

    out = []
    tb = os.path.join(workdir, "tb")
    for name in sorted(os.listdir(tb)):
        with open(os.path.join(tb, name), "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + n])
            pos += 12 + n + 4
            out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    return out


def files(workdir) -> list[str]:
    """Every file under ``workdir`` (relative), except orbax's array data files (``.../d/<hash>``:
    hashed names, one set per writing process and the merged one); the tensorboard event file's
    name (host, time) as ``tb/<events>``."""
    out = []
    for root, _, names in os.walk(workdir):
        for n in names:
            rel = os.path.relpath(os.path.join(root, n), workdir)
            if re.search(r"/d/[0-9a-f]+$", rel):
                continue
            out.append("tb/<events>" if rel.startswith("tb" + os.sep) else rel)
    return sorted(out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The uninterrupted two-process run (the reference)."""
    base = tmp_path_factory.mktemp("mp")
    codes, errs, _, _ = run_two(str(base / "straight"), str(base / "straight"))
    assert codes == [0, 0], "\n".join(e[-3000:] for e in errs)
    return base, errs


def test_killed_peer_stops_the_other_clearly_and_the_rerun_is_bit_exact(runs):
    base, _ = runs
    w = str(base / "killed")
    codes, errs, killed, ends = run_two(w, w, kill_process=1)
    assert codes[1] == -signal.SIGKILL and killed is not None, errs[1][-3000:]
    assert codes[0] == distributed.PEER_LOST_EXIT_CODE, errs[0][-3000:]
    waited = ends[0] - killed
    assert waited < BOUND_S, f"process 0 stopped {waited:.0f} s after the kill"
    message = errs[0][errs[0].index("jaxrlhf: process 0 of 2") :]
    assert "process 1 sent no heartbeat for 15 s" in message
    assert f"the run resumes from the last checkpoint in {w} (step 4)" in message
    assert "Check failure stack trace" not in errs[0]  # not JAX's own abort
    steps = sorted(int(d) for d in os.listdir(os.path.join(w, "checkpoints")) if d.isdigit())
    assert steps[-1] == 4

    codes, errs, _, _ = run_two(w, w + ".rerun")
    assert codes == [0, 0], "\n".join(e[-3000:] for e in errs)
    a = load_file(os.path.join(base / "straight", "hf", "model.safetensors"))
    b = load_file(os.path.join(w, "hf", "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # the resumed steps' logged losses equal the uninterrupted run's, bit for bit
    losses = lambda d: {s: v for t, s, v in tb_scalars(d) if t == "loss" and s > 4}  # noqa: E731
    assert losses(w) == losses(str(base / "straight")) and sorted(losses(w)) == [5, 6, 7, 8]


def test_killed_coordinator_stops_the_other_within_the_bound(runs):
    """Process 0 runs the coordination service: its death is seen by JAX's own error poll at
    once, which aborts the survivor itself (its message names the leader task); bounded, not clear."""
    base, _ = runs
    w = str(base / "killed0")
    codes, errs, killed, ends = run_two(w, w, kill_process=0)
    assert codes[0] == -signal.SIGKILL and killed is not None, errs[0][-3000:]
    assert codes[1] != 0, errs[1][-3000:]
    assert ends[1] - killed < BOUND_S
    assert "leader task was preempted/died" in errs[1] or "jaxrlhf: process 1 of 2" in errs[1], errs[1][
        -3000:
    ]


def test_two_processes_write_each_file_once(runs):
    """Checkpoints (orbax's coordinated save), tensorboard events, config.json and the HF export of
    the two-process run: the same files, sizes and scalar records as a one-process run."""
    base, errs = runs
    one = str(base / "one")
    one_err = run_one(one, one)
    two = str(base / "straight")
    a, b = files(one), files(two)
    assert a.count("tb/<events>") == b.count("tb/<events>") == 1
    # orbax's coordinated save: each process writes its own shards (``process_<i>``), the rest once
    assert [f for f in b if "process_1" not in f] == a
    assert [f.replace("process_1", "process_0") for f in b if "process_1" in f] == [
        f for f in a if "process_0" in f
    ]
    steps = sorted({f.split(os.sep)[1] for f in a if f.startswith("checkpoints")})
    assert steps == ["4", "6", "8"]  # checkpoint.keep = 3 of 2, 4, 6, 8
    for rel in ("config.json", "hf/config.json", "hf/model.safetensors"):
        assert os.path.getsize(os.path.join(one, rel)) == os.path.getsize(os.path.join(two, rel)), rel
    x = load_file(os.path.join(one, "hf", "model.safetensors"))
    y = load_file(os.path.join(two, "hf", "model.safetensors"))
    assert x.keys() == y.keys()
    for k in x:  # another device layout: the same numbers up to reduction order
        np.testing.assert_allclose(x[k], y[k], rtol=1e-5, atol=1e-6, err_msg=k)
    records = lambda d: Counter((t, s) for t, s, _ in tb_scalars(d))  # noqa: E731
    assert records(two) == records(one)
    assert max(records(two).values()) == 1  # each scalar once per step
    # the console: process 0 logs each step once, process 1 none
    lines = lambda e: [ln.split("] ", 1)[1].split(":")[0] for ln in e.splitlines() if "] step " in ln]  # noqa: E731
    assert lines(errs[0]) == lines(one_err) == [f"step {i}" for i in range(1, STEPS + 1)]
    assert lines(errs[1]) == []
