"""An installed (non-editable) jaxrlhf runs its own quickstart from a directory that is not the checkout.

The wheel built from this checkout is installed (without dependencies: they are this environment's)
into a fresh directory that shadows the editable install, and ``python -m jaxrlhf.quickstart
--size=smoke`` runs from an empty working directory: package assets (the tokenizer) must be found
from the package, and nothing may be read from ``configs/`` or ``tests/``.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_wheel_runs_the_smoke_quickstart_from_an_empty_directory(tmp_path):
    wheels, site, cwd = tmp_path / "wheels", tmp_path / "site", tmp_path / "empty"
    cwd.mkdir()
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), ROOT], check=True)
    (wheel,) = wheels.glob("jaxrlhf-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True)
    env = dict(os.environ, PYTHONPATH=str(site), XLA_FLAGS="--xla_force_host_platform_device_count=1")
    probe = subprocess.run(
        [sys.executable, "-c", "import jaxrlhf; print(jaxrlhf.__file__)"],
        cwd=cwd, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert probe.stdout.strip().startswith(str(site)), probe.stdout  # the wheel, not the checkout
    out = tmp_path / "qs"
    proc = subprocess.run(
        [sys.executable, "-m", "jaxrlhf.quickstart", "--size=smoke", f"--workdir={out}"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "results" / "results.json") as f:
        rows = json.load(f)
    assert set(rows["table"]) == {"sft", "dpo", "ppo"}
    assert os.listdir(cwd) == []  # nothing written to the working directory
