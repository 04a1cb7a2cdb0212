r"""The user's path, side by side: ``python -m jaxrlhf.train`` on a bench config vs TRL's trainers.

::

    python -m jaxrlhf.bench.cli --task dpo,reward --vocab v2k,qwen --rounds 3 --steps 200
    python -m jaxrlhf.bench.cli --prepare_only          # write the workloads (then run a config by hand)
    python -m jaxrlhf.bench.compare --mode cli ...      # the same, through compare

Each run is a fresh process, as a user starts it, nothing precompiled and no compilation cache:

- ``ours``: ``python -m jaxrlhf.train --config=configs/bench/<task>_<vocab>.py:<workload dir>
  --workdir=<fresh dir> --config.total_steps=N --config.log_every=K`` (packed batches, the
  default bucketed row counts and prefetch); ``ours-padded`` adds ``--config.data.packing=False``,
  ``ours-lora16`` adds ``--config.lora.rank=16``;
- ``trl``: ``python -m jaxrlhf.bench.peer_trl --wrap --warmup 0 --steps N`` in ``.venv-bench``
  (TRL's ``DPOTrainer`` / ``RewardTrainer`` configured as in ``peer_trl``), skipped with "trl venv
  not found" when that venv is absent.

Same model (random Llama, :data:`jaxrlhf.bench.workload.WORKLOADS` ``cli-v2k`` / ``cli-qwen``:
4 layers, d 256, ffn 1024, 4/2 heads), data (512 synthetic pairs, file order, epochs repeating),
batch (8 pairs), max length 256, float32, AdamW, reference forward every step; the vocabulary is a
2,000-word synthetic tokenizer (``v2k``) or the real Qwen2.5 tokenizer (``qwen``, 151,665 entries,
``../shared/real/tokenizer_qwen2_5_instruct``). Frameworks alternate (ours, TRL, ours, TRL, ...).

Per run: **steady-state real tokens/s** = median over the logging windows (``K`` steps each) after
the first two (ours: ``perf/tokens_per_s`` from its log; TRL: real tokens / time of the same
windows from its per-step stamps); **wall time** of the whole process (start-up, data, compiles,
N steps; ours also writes its final checkpoint); **compiles** and **compile seconds** (ours:
``perf/compiles``, ``perf/compile_s``); ``perf/host_fraction`` (ours, median of the same windows);
**peak memory** = the process tree's RSS high-water mark (``os.wait4``'s ``ru_maxrss``: the
largest process of the tree, a process never adds its children). Per round, ours / TRL of the
steady tokens/s and of the wall time. **Where the wall time goes** (``split_s``, from the logs'
timestamps): ours = start-up (process start to the training loop: imports, JAX, data, model; and
exit after the last log line), compiles (``perf/compile_s``), the loop's steps and logging (without
compiles), the final checkpoint and HF export; TRL = its timed steps and everything else. Writes
``<out>/bench_cli.json`` and ``<out>/bench_cli.md``; ``--resummarize <json>`` recomputes both
from the runs' logs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from jaxrlhf.bench import results
from jaxrlhf.bench import workload as wl
from jaxrlhf.bench.results import REPO, machine_info

VOCABS = {"v2k": "cli-v2k", "qwen": "cli-qwen", "tiny": "cli-tiny"}  # --vocab -> workload name
FRAMEWORKS = ("ours", "ours-padded", "ours-lora16", "trl")
_OURS_FLAGS = {
    "ours": [],
    "ours-padded": ["--config.data.packing=False"],
    "ours-lora16": ["--config.lora.rank=16"],
}
SKIP_WINDOWS = 2


def bench_dir(root: str, vocab: str) -> str:
    return os.path.join(root, VOCABS[vocab])


def train_config(task: str, vocab: str, workload_dir: str | None = None):
    """The ``jaxrlhf.train`` config of ``configs/bench/<task>_<vocab>.py``: the model, tokenizer and
    data of workload ``VOCABS[vocab]`` in ``workdirs/bench/<workload>`` (nothing read here), or of
    the workload prepared in ``workload_dir`` (its ``workload.json`` read: any workload, e.g. the
    tests' ``cli-tiny``); packed, 200 steps, a log window every 10, no export, no eval, one
    checkpoint (at the end)."""
    from jaxrlhf.bench import ours

    if workload_dir:
        w, p, _ = wl.load(workload_dir)
    else:
        w = wl.get_workload(VOCABS[vocab])
        p = wl.paths(bench_dir(os.path.join(REPO, "workdirs", "bench"), vocab), w)
    c = ours.build_config(task, w, p, pad_multiple=64, packing=True)
    c.data.chat_template = False  # plain strings, as TRL reads them
    c.data.schema = "auto"  # prompt/chosen/rejected columns: the preference schema
    c.total_steps = 200
    c.log_every = 10
    c.progress_bar = False
    c.export_hf = False
    c.eval_every = 0
    c.checkpoint.every = 1_000_000  # only the final one, whatever --config.total_steps says
    return c


# ----------------------------------------------------------------------------------------- runs
def command(framework: str, *, task: str, vocab: str, root: str, steps: int, log_every: int, workdir: str,
            pythons: dict) -> list[str]:  # fmt: skip
    """The argv of one run."""
    if framework in _OURS_FLAGS:
        name = "v2k" if vocab == "tiny" else vocab  # the tiny workload: a v2k config on its directory
        cfg = os.path.join(REPO, "configs", "bench", f"{task}_{name}.py") + ":" + bench_dir(root, vocab)
        cmd = [pythons["ours"], "-m", "jaxrlhf.train", f"--config={cfg}", f"--workdir={workdir}",
               f"--config.total_steps={steps}", f"--config.log_every={log_every}"]  # fmt: skip
        return cmd + _OURS_FLAGS[framework]
    if framework == "trl":
        return [pythons["trl"], "-m", "jaxrlhf.bench.peer_trl", "--task", task, "--workdir",
                bench_dir(root, vocab), "--warmup", "0", "--steps", str(steps), "--wrap"]  # fmt: skip
    raise ValueError(f"unknown framework {framework!r}; known: {FRAMEWORKS}")


def run_process(cmd: list[str], *, timeout: float, log_path: str) -> dict[str, Any]:
    """Runs ``cmd`` (stdout+stderr to ``log_path``); returns wall seconds, exit code and the
    RSS high-water mark in MiB of the process tree (``os.wait4``)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("XLA_FLAGS", None)  # never the test suite's fake devices: the real machine
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    t0 = time.perf_counter()
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline, status, usage = t0 + timeout, None, None
        while status is None:
            pid, st, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                status, usage = st, ru
            elif time.perf_counter() > deadline:
                proc.kill()
                _, status, usage = os.wait4(proc.pid, 0)
                return {"error": f"timed out after {timeout:.0f} s", "wall_s": time.perf_counter() - t0}
            else:
                time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return {"wall_s": time.perf_counter() - t0, "rc": proc.returncode, "peak_rss_mib": usage.ru_maxrss / 1024}


def parse_our_log(text: str) -> list[dict[str, float]]:
    """The logged windows of a ``jaxrlhf.train`` run: ``[{"step", "perf/tokens_per_s", ...}]``."""
    windows = []
    for line in text.splitlines():
        i = line.find("] step ")
        if i < 0 or ": " not in line[i:]:
            continue
        head, _, body = line[i + 7 :].partition(": ")
        if not head.isdigit():
            continue
        row: dict[str, float] = {"step": float(head)}
        for kv in body.split(", "):
            k, _, v = kv.partition("=")
            with contextlib.suppress(ValueError):
                row[k] = float(v)
        if "perf/tokens_per_s" in row:
            windows.append(row)
    return windows


_STAMP = re.compile(r"^[IWEF]\d{4} (\d\d):(\d\d):(\d\d(?:\.\d+)?) ")


def _stamped(text: str) -> list[tuple[float, str]]:
    """``(seconds, line)`` of the absl-stamped lines (``I1130 13:57:05.325860 ...``), in order; a
    stamp earlier than the previous one is taken to be the next day."""
    out, day = [], 0.0
    for line in text.splitlines():
        m = _STAMP.match(line)
        if not m:
            continue
        t = int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3]) + day
        if out and t < out[-1][0]:
            day += 86400.0
            t += 86400.0
        out.append((t, line))
    return out


def split_ours(text: str, wall_s: float, compile_s: float) -> dict[str, float]:
    """Our run's wall time in four parts that add up to ``wall_s``: ``startup`` (process start to
    the last stamped line before the first compile or logged window, plus the exit after the last
    stamped line), ``compile`` (``compile_s``), ``steps`` (from there to the last logged window,
    compiles excluded: steps, logging, batch preparation) and ``final_save`` (the last logged window
    to the last stamped line: final checkpoint, HF export)."""
    lines = _stamped(text)
    window = re.compile(r"\] step \d+: ")
    first = next(i for i, (_, ln) in enumerate(lines) if "compiled step for batch" in ln or window.search(ln))
    t_loop = lines[max(first - 1, 0)][0]
    t_last_window = max(t for t, ln in lines if window.search(ln))
    t_end = lines[-1][0]
    return {
        "startup": wall_s - (t_end - t_loop),
        "compile": compile_s,
        "steps": t_last_window - t_loop - compile_s,
        "final_save": t_end - t_last_window,
    }


def _median_after(values: list[float], skip: int = SKIP_WINDOWS) -> float | None:
    kept = values[skip:]
    return statistics.median(kept) if kept else None


def summarize_ours(text: str) -> dict[str, Any]:
    """Steady tokens/s, compiles, compile seconds and host fraction from our log."""
    win = parse_our_log(text)
    if not win:
        raise ValueError("no logged window (a 'step N: ... perf/tokens_per_s=...' line) in the run's output")
    last = win[-1]
    return {
        "windows_tokens_per_s": [w["perf/tokens_per_s"] for w in win],
        "steady_tokens_per_s": _median_after([w["perf/tokens_per_s"] for w in win]),
        "compiles": last.get("perf/compiles"),
        "compile_s": last.get("perf/compile_s"),
        "host_fraction": _median_after([w.get("perf/host_fraction", float("nan")) for w in win]),
        "final_loss": last.get("loss"),
    }


def summarize_trl(text: str, log_every: int) -> dict[str, Any]:
    """The same windows from TRL's per-step stamps and token counts (its result line)."""
    res = results.parse_output(text)
    t, n = res["step_times"], res["real_tokens_per_step"]
    rates = [sum(n[s : s + log_every]) / sum(t[s : s + log_every]) for s in range(0, len(t), log_every)]
    return {"windows_tokens_per_s": rates, "steady_tokens_per_s": _median_after(rates), "compiles": None,
            "compile_s": None, "host_fraction": None, "versions": res["versions"],
            "steps_s": sum(t)}  # fmt: skip


def summarize(rec: dict[str, Any], text: str, log_every: int) -> dict[str, Any]:
    """The fields a run's record takes from its log (``summarize_ours`` / ``summarize_trl``), with
    ``split_s``, the wall time in parts (see the module docstring)."""
    if rec["framework"] == "trl":
        out = summarize_trl(text, log_every)
        out["split_s"] = {"steps": out["steps_s"], "other": rec["wall_s"] - out["steps_s"]}
    else:
        out = summarize_ours(text)
        out["split_s"] = split_ours(text, rec["wall_s"], out["compile_s"] or 0.0)
    return out


def one_run(framework: str, *, task: str, vocab: str, root: str, steps: int, log_every: int, pythons: dict,
            timeout: float, logs: str) -> dict[str, Any]:  # fmt: skip
    """Runs one framework once; the record of :func:`run_rounds`."""
    py = pythons["trl" if framework == "trl" else "ours"]
    rec: dict[str, Any] = {"framework": framework, "task": task, "vocab": vocab}
    if not os.path.exists(py):
        return {**rec, "skipped": f"{framework}: trl venv not found ({py}); see jaxrlhf/bench/setup_peers.sh"}
    with tempfile.TemporaryDirectory(prefix=f"bench_cli_{framework}_") as workdir:
        cmd = command(framework, task=task, vocab=vocab, root=root, steps=steps, log_every=log_every,
                      workdir=workdir, pythons=pythons)  # fmt: skip
        log_path = os.path.join(logs, f"{task}_{vocab}_{framework}_{int(time.time() * 1000)}.log")
        rec.update(cmd=shlex.join(cmd), log=log_path, load_before=os.getloadavg()[0])
        rec.update(run_process(cmd, timeout=timeout, log_path=log_path))
    with open(log_path) as f:
        text = f.read()
    if "error" not in rec and rec["rc"] != 0:
        rec["error"] = f"exit {rec['rc']}: " + " | ".join(text.strip().splitlines()[-8:])
    if "error" in rec:
        return rec
    try:
        rec.update(summarize(rec, text, log_every))
    except ValueError as e:
        rec["error"] = str(e)
    return rec


def run_rounds(frameworks, *, tasks, vocabs, rounds, log=print, **kw) -> list[dict[str, Any]]:
    """For each task and vocabulary, ``rounds`` rounds of the frameworks in alternation."""
    runs = []
    for task in tasks:
        for vocab in vocabs:
            for r in range(rounds):
                for fw in frameworks:
                    rec = {"round": r, **one_run(fw, task=task, vocab=vocab, **kw)}
                    runs.append(rec)
                    if "skipped" in rec:
                        log(f"[{task} {vocab} round {r}] {rec['skipped']}")
                    elif "error" in rec:
                        log(f"[{task} {vocab} round {r}] {fw} FAILED: {rec['error'][:400]}")
                    else:
                        steady = _fmt(rec["steady_tokens_per_s"])
                        log(
                            f"[{task} {vocab} round {r}] {fw:11s} steady {steady} tok/s, "
                            f"wall {rec['wall_s']:.0f} s, peak {rec['peak_rss_mib']:.0f} MiB"
                        )
    return runs


# ----------------------------------------------------------------------------------------- report
def _spread(xs: list[float]) -> dict[str, float] | None:
    xs = [x for x in xs if x is not None]
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)} if xs else None


FIELDS = ("steady_tokens_per_s", "wall_s", "compiles", "compile_s", "host_fraction", "peak_rss_mib")
SPLIT_PARTS = ("startup", "compile", "steps", "final_save", "other")


def aggregate(runs: list[dict[str, Any]], baseline: str = "ours", peer: str = "trl") -> list[dict[str, Any]]:
    """One row per (task, vocab, framework): each field's median (min–max) over rounds, and per
    round the ratios ``baseline / peer`` of steady tokens/s and ``peer / baseline`` of wall time
    (> 1: ours better in both)."""
    rows = []
    order = {fw: i for i, fw in enumerate(FRAMEWORKS)}
    keys = sorted(
        {(r["task"], r["vocab"], r["framework"]) for r in runs}, key=lambda k: (k[0], k[1], order[k[2]])
    )
    for task, vocab, fw in keys:
        mine = [r for r in runs if (r["task"], r["vocab"], r["framework"]) == (task, vocab, fw)]
        ok = [r for r in mine if "error" not in r and "skipped" not in r]
        row: dict[str, Any] = {
            "task": task,
            "vocab": vocab,
            "framework": fw,
            "runs": len(ok),
            "failed": sum("error" in r for r in mine),
            "skipped": next((r["skipped"] for r in mine if "skipped" in r), None),
        }
        for f in FIELDS:
            row[f] = _spread([r.get(f) for r in ok])
        parts = [p for p in SPLIT_PARTS if all(p in r.get("split_s", {}) for r in ok)] if ok else []
        row["split_s"] = {p: _spread([r["split_s"][p] for r in ok]) for p in parts}
        row["speed_vs_peer"] = row["wall_vs_peer"] = None
        peers = {r["round"]: r for r in runs if (r["task"], r["vocab"], r["framework"]) == (task, vocab, peer)
                 and "error" not in r and "skipped" not in r}  # fmt: skip
        if fw == baseline and peers:
            pairs = [(r, peers[r["round"]]) for r in ok if r["round"] in peers]
            speed = "steady_tokens_per_s"
            row["speed_vs_peer"] = _spread(
                [a[speed] / b[speed] for a, b in pairs if a.get(speed) and b.get(speed)]
            )
            row["wall_vs_peer"] = _spread([b["wall_s"] / a["wall_s"] for a, b in pairs])
        rows.append(row)
    return rows


def _fmt(x, nd=0) -> str:
    if x is None:
        return "–"
    return f"{x:,.{nd}f}"


def _cell(s: dict | None, nd=0, suffix="") -> str:
    if s is None:
        return "–"
    if s["n"] == 1 or s["min"] == s["max"]:
        return _fmt(s["median"], nd) + suffix
    return f"{_fmt(s['median'], nd)}{suffix} ({_fmt(s['min'], nd)}–{_fmt(s['max'], nd)})"


def _md(columns: list[str], lines: list[list[str]]) -> str:
    """A markdown table: the header, its rule, one line per row of cells."""
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(out + ["| " + " | ".join(cells) + " |" for cells in lines])


def _who(r: dict[str, Any]) -> list[str]:
    return [r["task"], r["vocab"], r["framework"]]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The table: one line per task x vocabulary x framework."""
    columns = ["task", "vocab", "framework", "steady real tok/s", "wall (s)", "compiles", "compile (s)",
               "host fraction", "peak RSS (MiB)", "ours/TRL tok/s", "TRL/ours wall"]  # fmt: skip
    lines = []
    for r in rows:
        if r["runs"] == 0:
            why = r["skipped"] or f"{r['failed']} failed run(s)"
            lines.append([*_who(r), why, *[""] * 7])
            continue
        lines.append([*_who(r), _cell(r["steady_tokens_per_s"]), _cell(r["wall_s"]), _cell(r["compiles"]),
                      _cell(r["compile_s"], 1), _cell(r["host_fraction"], 2), _cell(r["peak_rss_mib"]),
                      _cell(r["speed_vs_peer"], 2, "×"), _cell(r["wall_vs_peer"], 2, "×")])  # fmt: skip
    return _md(columns, lines)


def split_table(rows: list[dict[str, Any]]) -> str:
    """Where the wall time goes: seconds per part, median (min–max) over rounds."""
    columns = ["task", "vocab", "framework", "wall (s)", "start-up", "compiles", "steps (no compiles)",
               "final save", "other"]  # fmt: skip
    lines = [[*_who(r), _cell(r["wall_s"]), *(_cell(r["split_s"].get(p), 1) for p in SPLIT_PARTS)]
             for r in rows if r["runs"] and r.get("split_s")]  # fmt: skip
    return _md(columns, lines)


def render_markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# The CLI path side by side: `python -m jaxrlhf.train` vs TRL",
        "",
        f"Command: `{report['command']}`  ",
        f"Date (UTC): {report['date']}  ",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['mem_gib']} GiB, {m['os']}  ",
        f"Protocol: {report['rounds']} alternated rounds ({', '.join(report['frameworks'])}) per task and "
        f"vocabulary; each run a fresh process of {report['steps']} steps; steady tok/s = median over "
        f"the {report['log_every']}-step windows after the first {SKIP_WINDOWS}; wall = the whole process; "
        "median (min–max) over rounds. Ratios > 1: ours faster.",
        "",
        markdown_table(report["aggregate"]),
        "",
        "Where the wall time goes (s; ours: from the log's timestamps, TRL: its timed steps and the rest):",
        "",
        split_table(report["aggregate"]),
        "",
    ]
    lines += [f"- {s}" for s in report["notes"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="dpo,reward", help="comma list from dpo, reward")
    ap.add_argument("--vocab", default="v2k,qwen", help=f"comma list from {sorted(VOCABS)}")
    ap.add_argument("--frameworks", default="ours,trl", help=f"comma list from {FRAMEWORKS}, run in order")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--log_every", type=int, default=10, help="steps per logged window")
    ap.add_argument("--root", default=os.path.join(REPO, "workdirs", "bench"), help="where workloads live")
    ap.add_argument("--out", default=os.path.join(REPO, "docs", "results"))
    ap.add_argument("--ours-python", default=sys.executable)
    ap.add_argument("--trl-python", default=os.path.join(REPO, ".venv-bench", "bin", "python"))
    ap.add_argument("--timeout", type=float, default=7200.0, help="seconds per run")
    ap.add_argument("--prepare_only", action="store_true", help="write the workloads and stop")
    ap.add_argument(
        "--resummarize", default="", help="a bench_cli json: recompute it and its md from the logs"
    )
    a = ap.parse_args(argv)
    if a.resummarize:
        return resummarize(a.resummarize)
    tasks = [t for t in a.task.split(",") if t]
    vocabs = [v for v in a.vocab.split(",") if v]
    frameworks = [f for f in a.frameworks.split(",") if f]
    for name, got, known in (("--task", tasks, results.TASKS), ("--vocab", vocabs, VOCABS),
                             ("--frameworks", frameworks, FRAMEWORKS)):  # fmt: skip
        if not got or any(x not in known for x in got):
            ap.error(f"{name}: {got} not all in {sorted(known)}")
    for v in vocabs:
        wl.prepare(bench_dir(a.root, v), wl.get_workload(VOCABS[v]))
    if a.prepare_only:
        return {}
    logs = os.path.join(a.root, "cli_logs")
    os.makedirs(logs, exist_ok=True)
    pythons = {"ours": a.ours_python, "trl": a.trl_python}
    runs = run_rounds(frameworks, tasks=tasks, vocabs=vocabs, rounds=a.rounds, root=a.root, steps=a.steps,
                      log_every=a.log_every, pythons=pythons, timeout=a.timeout, logs=logs)  # fmt: skip
    notes = sorted({r["skipped"] for r in runs if "skipped" in r})
    report = {
        "command": "python -m jaxrlhf.bench.cli " + shlex.join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "machine": machine_info(),
        "workloads": {v: wl.get_workload(VOCABS[v]).to_dict() for v in vocabs},
        "rounds": a.rounds, "steps": a.steps, "log_every": a.log_every, "frameworks": frameworks,
        "notes": notes, "aggregate": aggregate(runs), "runs": runs,
    }  # fmt: skip
    results.write_report(a.out, "bench_cli", report, render_markdown(report))
    return report


def resummarize(path: str) -> dict[str, Any]:
    """Re-reads every run's log (the paths in ``path``), recomputes its summary (``summarize``) and
    the aggregate, and rewrites ``path`` and its ``.md``; the measured wall times, RSS and the
    report's command, date and machine are kept."""
    with open(path) as f:
        report = json.load(f)
    for rec in report["runs"]:
        if "error" in rec or "skipped" in rec:
            continue
        with open(rec["log"]) as f:
            rec.update(summarize(rec, f.read(), report["log_every"]))
    report["aggregate"] = aggregate(report["runs"])
    out, name = os.path.split(os.path.splitext(path)[0])
    results.write_report(out or ".", name, report, render_markdown(report))
    return report


if __name__ == "__main__":
    main()
