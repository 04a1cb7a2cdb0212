"""Side-by-side benchmark: jaxrlhf vs TRL vs Tunix on the same DPO / reward-model work, in one run.

::

    python -m jaxrlhf.bench.compare --task dpo --rounds 3 --steps 10
    python -m jaxrlhf.bench.compare --task reward --rounds 3 --steps 10
    python -m jaxrlhf.bench.compare --task dpo --frameworks trl,tunix   # peers only
    python -m jaxrlhf.bench.compare --mode cli --task dpo,reward --vocab v2k,qwen --steps 200

``--mode cli`` measures the user's path instead (``python -m jaxrlhf.train`` in a fresh process vs
TRL's trainers, start-up and compiles included): :mod:`jaxrlhf.bench.cli`, which takes the other
arguments. The default ``--mode step`` times the jitted step alone, as below.

Writes the shared workload once (:mod:`jaxrlhf.bench.workload`), then runs each framework's runner
as a subprocess, in alternation (ours, TRL, Tunix, ours, TRL, Tunix, ...) for ``--rounds`` rounds so
that the machine's drift hits all of them alike. Each runner prints one result line
(:mod:`jaxrlhf.bench.results`); per round and framework the run's median real tokens/s is kept,
and each peer's ratio ``ours / peer`` is reported as its median and min–max over rounds.

Runners and their interpreters (each framework lives in its own venv):

- ``ours``: ``python -m jaxrlhf.bench.ours`` with ``--ours-python`` (default: this interpreter);
- ``trl`` / ``trl-bf16``: ``python -m jaxrlhf.bench.peer_trl [--bf16]`` with ``--trl-python``
  (default ``.venv-bench/bin/python``);
- ``tunix``: ``python -m jaxrlhf.bench.peer_tunix`` with ``--tunix-python`` (default
  ``.venv-bench-tunix/bin/python``); DPO only (Tunix has no reward-model trainer).

Results: ``<out>/bench_compare_<task>.json`` (every raw result line, the aggregate, the machine and
the exact commands) and ``<out>/bench_compare_<task>.md`` (the table).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from typing import Any

from jaxrlhf.bench import results
from jaxrlhf.bench import workload as wl
from jaxrlhf.bench.results import REPO, machine_info

FRAMEWORKS = ("ours", "ours-padded", "trl", "trl-bf16", "tunix")
_MODULES = {
    "ours": "jaxrlhf.bench.ours",
    "ours-padded": "jaxrlhf.bench.ours",
    "trl": "jaxrlhf.bench.peer_trl",
    "trl-bf16": "jaxrlhf.bench.peer_trl",
    "tunix": "jaxrlhf.bench.peer_tunix",
}
SUPPORTED_TASKS = {"ours": ("dpo", "reward"), "ours-padded": ("dpo", "reward"), "trl": ("dpo", "reward"),
                   "trl-bf16": ("dpo", "reward"), "tunix": ("dpo",)}  # fmt: skip
_PYTHON = {"ours-padded": "ours", "trl-bf16": "trl"}  # variants run in their framework's venv
_FLAGS = {"ours-padded": ["--no_packing"], "trl-bf16": ["--bf16"]}


def command_for(
    framework: str, *, task: str, workdir: str, steps: int, warmup: int, pythons: dict
) -> list[str]:
    """The argv that runs ``framework``'s runner once."""
    if framework not in _MODULES:
        raise ValueError(f"unknown framework {framework!r}; known: {list(_MODULES)}")
    py = pythons[_PYTHON.get(framework, framework)]
    cmd = [py, "-m", _MODULES[framework], "--task", task, "--workdir", workdir]
    cmd += ["--steps", str(steps), "--warmup", str(warmup)]
    return cmd + _FLAGS.get(framework, [])


def run_one(cmd: list[str], *, timeout: float) -> dict[str, Any]:
    """Runs one runner; returns ``{"result": dict, "wall_s": float}`` or ``{"error": str, ...}``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    # Never inherit the test suite's fake-device flags: every runner sees the real machine.
    env.pop("XLA_FLAGS", None)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    if not os.path.exists(cmd[0]):
        return {"error": f"interpreter {cmd[0]} not found (see docs/benchmarks.md: setting up the peers)"}
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "wall_s": time.perf_counter() - t0}
    out = {"wall_s": time.perf_counter() - t0, "load_before": load_before, "load_after": os.getloadavg()[0]}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        out["error"] = f"exit {proc.returncode}: " + " | ".join(tail)
        return out
    try:
        out["result"] = results.parse_output(proc.stdout)
    except ValueError as e:
        out["error"] = str(e)
    return out


def run_rounds(
    frameworks: list[str],
    *,
    task: str,
    workdir: str,
    rounds: int,
    steps: int,
    warmup: int,
    pythons: dict,
    timeout: float,
    log=print,
) -> list[dict[str, Any]]:
    """Runs the frameworks in alternation for ``rounds`` rounds; returns one record per run:
    ``{"round", "framework", "cmd", "result" | "error", "wall_s", ...}``."""
    runs = []
    for r in range(rounds):
        for fw in frameworks:
            cmd = command_for(fw, task=task, workdir=workdir, steps=steps, warmup=warmup, pythons=pythons)
            rec = {"round": r, "framework": fw, "cmd": shlex.join(cmd), **run_one(cmd, timeout=timeout)}
            if "result" in rec:
                s = results.summarize_run(rec["result"])
                log(f"[round {r}] {fw:9s} {s['tokens_per_s']:10,.0f} real tok/s  "
                    f"step {s['step_time_median']:.3f} s  ({rec['wall_s']:.0f} s wall)")  # fmt: skip
            else:
                log(f"[round {r}] {fw:9s} FAILED: {rec['error'][:300]}")
            runs.append(rec)
    return runs


def check_same_work(runs: list[dict[str, Any]]) -> list[str]:
    """Warnings when frameworks trained on different real tokens or workload fingerprints."""
    seen: dict[str, set] = {}
    for rec in runs:
        if "result" in rec:
            res = rec["result"]
            key = (res.get("fingerprint"), tuple(res["real_tokens_per_step"]))
            seen.setdefault(rec["framework"], set()).add(key)
    keys = {k for v in seen.values() for k in v}
    if len(keys) > 1:
        return [
            f"frameworks did not train on the same work: {sorted((fw, len(v)) for fw, v in seen.items())}"
        ]
    return []


def render_markdown(report: dict[str, Any]) -> str:
    """The markdown file: what was run, on what, and the table."""
    m, w = report["machine"], report["workload"]
    lines = [
        f"# Side by side: {report['task']} ({w['name']})",
        "",
        f"Command: `{report['command']}`  ",
        f"Date (UTC): {report['date']}  ",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['mem_gib']} GiB, {m['os']}  ",
        f"Workload: Llama {w['num_layers']} layers x {w['hidden_size']} hidden ({w['num_heads']} heads, "
        f"ffn {w['intermediate_size']}, vocab {w['vocab_size']}, "
        f"{wl.num_params(wl.Workload.from_dict(w)) / 1e6:.1f} M params), batch {w['batch_size']} pairs, "
        f"max length {w['max_length']}, {w['dtype']}, AdamW lr {w['learning_rate']}, beta {w['beta']}  ",
        f"Protocol: {report['rounds']} rounds x ({report['warmup']} warm-up + {report['steps']} timed "
        f"steps), frameworks alternated in the order {', '.join(report['frameworks'])}; tokens/s = median "
        "over a run's timed steps of real (non-pad) tokens / step time; spread = median (min–max) "
        "over rounds.",
        "",
        results.markdown_table(report["aggregate"], task=report["task"]),
        "",
    ]
    if report["skipped"]:
        lines += [f"- skipped: {s}" for s in report["skipped"]] + [""]
    if report["warnings"]:
        lines += [f"- warning: {s}" for s in report["warnings"]] + [""]
    vers = {}
    for rec in report["runs"]:
        if "result" in rec:
            vers.setdefault(rec["framework"], rec["result"]["versions"])
    for fw, v in vers.items():
        lines.append(f"- {fw}: " + ", ".join(f"{k} {val}" for k, val in v.items()))
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict[str, Any]:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--mode", choices=("step", "cli"), default="step")
    mode, rest = pre.parse_known_args(sys.argv[1:] if argv is None else argv)
    if mode.mode == "cli":  # the user's path: python -m jaxrlhf.train vs TRL (jaxrlhf.bench.cli)
        from jaxrlhf.bench import cli

        return cli.main(rest)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=("step", "cli"), default="step", help="cli: see jaxrlhf.bench.cli")
    ap.add_argument("--task", choices=results.TASKS, required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=None, help="timed steps per run (default: the workload's)")
    ap.add_argument(
        "--warmup", type=int, default=None, help="untimed steps per run (default: the workload's)"
    )
    ap.add_argument(
        "--frameworks", default="ours,trl,tunix", help=f"comma list from {FRAMEWORKS}, run in order"
    )
    ap.add_argument("--baseline", default=None, help="framework the ratios divide (default: ours if run)")
    ap.add_argument("--workload", default="cpu", choices=sorted(wl.WORKLOADS))
    ap.add_argument("--workdir", default=os.path.join(REPO, "workdirs", "bench"))
    ap.add_argument("--out", default=os.path.join(REPO, "docs", "results"))
    ap.add_argument("--ours-python", default=sys.executable)
    ap.add_argument("--trl-python", default=os.path.join(REPO, ".venv-bench", "bin", "python"))
    ap.add_argument("--tunix-python", default=os.path.join(REPO, ".venv-bench-tunix", "bin", "python"))
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per runner")
    a = ap.parse_args(argv)

    frameworks = [f.strip() for f in a.frameworks.split(",") if f.strip()]
    unknown = [f for f in frameworks if f not in FRAMEWORKS]
    if unknown or not frameworks:
        ap.error(f"--frameworks: unknown {unknown}; choose from {FRAMEWORKS}")
    skipped = [f"{f}: no {a.task} trainer" for f in frameworks if a.task not in SUPPORTED_TASKS[f]]
    frameworks = [f for f in frameworks if a.task in SUPPORTED_TASKS[f]]
    baseline = a.baseline or ("ours" if "ours" in frameworks else frameworks[0])
    if baseline not in frameworks:
        ap.error(f"--baseline {baseline!r} is not among the frameworks run {frameworks}")

    w = wl.get_workload(a.workload)
    steps = w.steps if a.steps is None else a.steps
    warmup = w.warmup_steps if a.warmup is None else a.warmup
    if w.batch_size * (steps + warmup) > w.num_pairs:
        ap.error(
            f"--steps + --warmup = {steps + warmup} steps need more than the {w.num_pairs} pairs of the data"
        )
    workdir = os.path.join(a.workdir, a.workload)
    wl.prepare(workdir, w)
    pythons = {"ours": a.ours_python, "trl": a.trl_python, "tunix": a.tunix_python}

    runs = run_rounds(frameworks, task=a.task, workdir=workdir, rounds=a.rounds, steps=steps, warmup=warmup,
                      pythons=pythons, timeout=a.timeout)  # fmt: skip
    agg = results.aggregate(runs, baseline=baseline)
    report = {
        "task": a.task,
        "command": "python -m jaxrlhf.bench.compare " + shlex.join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "machine": machine_info(),
        "workload": w.to_dict(),
        "rounds": a.rounds,
        "steps": steps,
        "warmup": warmup,
        "frameworks": frameworks,
        "skipped": skipped,
        "warnings": check_same_work(runs),
        "aggregate": agg,
        "runs": runs,
    }
    results.write_report(a.out, f"bench_compare_{a.task}", report, render_markdown(report))
    return report


if __name__ == "__main__":
    main()
