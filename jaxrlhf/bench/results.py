"""The result line every runner prints, and the maths that turns runs into the side-by-side table.

A runner (``jaxrlhf.bench.ours``, ``peer_trl``, ``peer_tunix``) prints exactly one line to stdout
that starts with ``{"framework":`` (other output may surround it), e.g.::

    {"framework": "trl", "task": "dpo", "workload": "cpu-llama-5m", "fingerprint": "…",
     "steps": 10, "warmup_steps": 3, "step_times": [0.61, …], "real_tokens_per_step": [4180, …],
     "padded_tokens_per_step": [7936, …], "versions": {"trl": "1.16.0", …}, "config": {…}}

- ``step_times[i]``: wall seconds of timed step ``i`` (after ``warmup_steps`` untimed steps), from
  the end of the previous step to the end of this one, with the device synchronised (so it includes
  host-side batch preparation, the forward/backward passes and the optimizer update).
- ``real_tokens_per_step[i]``: non-pad tokens that step trained on (chosen + rejected sequences,
  ``<s>``/``</s>`` included; the DPO reference forward is not counted again).
- ``padded_tokens_per_step[i]``: elements of the token arrays the step's model forward saw
  (``rows x columns`` of chosen + rejected, padding included).

Pure python (no numpy needed) so every venv can import it.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from collections.abc import Iterable, Sequence
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write_report(out_dir: str, name: str, report: dict[str, Any], md: str) -> None:
    """Writes ``<out_dir>/<name>.json`` (the report) and ``<name>.md`` (``md``), prints both paths."""
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, name)
    with open(base + ".json", "w") as f:
        json.dump(report, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(md)
    print(md)
    print(f"wrote {base}.json and {base}.md")


def machine_info() -> dict[str, Any]:
    """CPU model, core count, memory and OS: what the table was measured on."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gib = None
    try:
        with open("/proc/meminfo") as f:
            mem_gib = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_gib": mem_gib, "os": platform.platform(),
            "python": sys.version.split()[0]}  # fmt: skip


REQUIRED = {
    "framework": str,
    "task": str,
    "steps": int,
    "step_times": list,
    "real_tokens_per_step": list,
    "padded_tokens_per_step": list,
    "versions": dict,
}
TASKS = ("dpo", "reward")


def validate(result: dict[str, Any]) -> dict[str, Any]:
    """Checks a result dict; raises ``ValueError`` naming the key. Returns it unchanged."""
    for key, typ in REQUIRED.items():
        if key not in result:
            raise ValueError(f"result line lacks key {key!r} (has {sorted(result)})")
        if not isinstance(result[key], typ):
            raise ValueError(f"result key {key!r} is {type(result[key]).__name__}, expected {typ.__name__}")
    if result["task"] not in TASKS:
        raise ValueError(f"result key 'task' is {result['task']!r}; expected one of {TASKS}")
    n = result["steps"]
    for key in ("step_times", "real_tokens_per_step", "padded_tokens_per_step"):
        if len(result[key]) != n:
            raise ValueError(f"result key {key!r} has {len(result[key])} entries, expected steps={n}")
    if n < 1:
        raise ValueError("result key 'steps' must be >= 1")
    if any(not (t > 0) for t in result["step_times"]):
        raise ValueError(f"result key 'step_times' has a non-positive time: {result['step_times']}")
    for r, p in zip(result["real_tokens_per_step"], result["padded_tokens_per_step"], strict=True):
        if not 0 < r <= p:
            raise ValueError(f"need 0 < real_tokens <= padded_tokens per step, got real={r}, padded={p}")
    return result


def format_line(result: dict[str, Any]) -> str:
    """The JSON line for ``result`` (validated), ``framework`` first."""
    validate(result)
    ordered = {"framework": result["framework"], **{k: v for k, v in result.items() if k != "framework"}}
    return json.dumps(ordered)


def emit(result: dict[str, Any]) -> None:
    """Prints the result line to stdout (flushed), for a runner's last act."""
    print(format_line(result), flush=True)


def parse_output(text: str) -> dict[str, Any]:
    """The last result line in a runner's stdout; raises ``ValueError`` when there is none."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith('{"framework"'):
            return validate(json.loads(line))
    tail = "\n".join(text.splitlines()[-20:])
    raise ValueError(f'no result line (starting with {{"framework") in the runner output; its tail:\n{tail}')


# ----------------------------------------------------------------------------------------- maths
def per_step_tps(result: dict[str, Any], *, padded: bool = False) -> list[float]:
    """Tokens/s of each timed step (real tokens, or padded tokens when ``padded``)."""
    toks = result["padded_tokens_per_step" if padded else "real_tokens_per_step"]
    return [t / s for t, s in zip(toks, result["step_times"], strict=True)]


def summarize_run(result: dict[str, Any]) -> dict[str, float]:
    """One run's numbers: median real/padded tokens/s over its timed steps, median/min/max step
    time, and the padding fraction (1 - real/padded over all timed steps)."""
    validate(result)
    times = result["step_times"]
    real, padded = sum(result["real_tokens_per_step"]), sum(result["padded_tokens_per_step"])
    return {
        "tokens_per_s": statistics.median(per_step_tps(result)),
        "padded_tokens_per_s": statistics.median(per_step_tps(result, padded=True)),
        "step_time_median": statistics.median(times),
        "step_time_min": min(times),
        "step_time_max": max(times),
        "pad_fraction": 1.0 - real / padded,
        "real_tokens": real,
    }


def spread(values: Sequence[float]) -> dict[str, float]:
    """``{"median", "min", "max", "n"}`` of a non-empty list."""
    if not values:
        raise ValueError("spread() of an empty list")
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def aggregate(runs: Iterable[dict[str, Any]], *, baseline: str = "ours") -> dict[str, Any]:
    """Groups runs by framework and computes each peer's ratio to ``baseline``.

    ``runs``: dicts with keys ``round`` (int), ``framework`` and ``result`` (a result line dict) or
    ``error`` (a string, for a run that failed). Per round and framework, the run's median
    tokens/s; the ratio of a peer in round ``r`` is ``baseline_tps[r] / peer_tps[r]`` over the
    rounds where both succeeded.

    Returns ``{"frameworks": {name: {"tokens_per_s": spread, "padded_tokens_per_s": spread,
    "step_time": spread, "pad_fraction": float, "rounds": int, "errors": [str]}}, "ratios":
    {peer: spread | None}, "baseline": baseline, "real_tokens_check": {name: int}}``.
    """
    by_fw: dict[str, dict[int, dict[str, float]]] = {}
    errors: dict[str, list[str]] = {}
    real_tokens: dict[str, set[int]] = {}
    order: list[str] = []
    for run in runs:
        fw = run["framework"]
        if fw not in order:
            order.append(fw)
        by_fw.setdefault(fw, {})
        errors.setdefault(fw, [])
        if run.get("error"):
            errors[fw].append(f"round {run['round']}: {run['error']}")
            continue
        s = summarize_run(run["result"])
        by_fw[fw][run["round"]] = s
        real_tokens.setdefault(fw, set()).add(int(s["real_tokens"]))
    frameworks = {}
    for fw in order:
        rounds = by_fw[fw]
        entry: dict[str, Any] = {"rounds": len(rounds), "errors": errors[fw]}
        if rounds:
            vals = list(rounds.values())
            entry.update(
                tokens_per_s=spread([v["tokens_per_s"] for v in vals]),
                padded_tokens_per_s=spread([v["padded_tokens_per_s"] for v in vals]),
                step_time=spread([v["step_time_median"] for v in vals]),
                pad_fraction=statistics.median(v["pad_fraction"] for v in vals),
            )
        frameworks[fw] = entry
    ratios: dict[str, Any] = {}
    base = by_fw.get(baseline, {})
    for fw in order:
        if fw == baseline:
            continue
        common = sorted(set(base) & set(by_fw[fw]))
        ratios[fw] = (
            spread([base[r]["tokens_per_s"] / by_fw[fw][r]["tokens_per_s"] for r in common])
            if common
            else None
        )
    return {
        "baseline": baseline,
        "frameworks": frameworks,
        "ratios": ratios,
        "real_tokens_check": {fw: sorted(v) for fw, v in real_tokens.items()},
    }


def _fmt_spread(s: dict[str, float] | None, fmt: str) -> str:
    if s is None:
        return "n/a"
    return f"{s['median']:{fmt}} ({s['min']:{fmt}}–{s['max']:{fmt}})"


def markdown_table(agg: dict[str, Any], *, task: str) -> str:
    """The side-by-side table: one row per framework, median (min–max over rounds)."""
    base = agg["baseline"]
    lines = [
        f"| framework | task | rounds | real tokens/s | padded tokens/s | step time (s) | pad fraction "
        f"| {base} / framework |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for fw, e in agg["frameworks"].items():
        if not e["rounds"]:
            err = e["errors"][0] if e["errors"] else "no run"
            lines.append(f"| {fw} | {task} | 0 | failed: {err[:80]} | | | | |")
            continue
        ratio = "1 (baseline)" if fw == base else _fmt_spread(agg["ratios"].get(fw), ".2f") + "×"
        if fw != base and agg["ratios"].get(fw) is None:
            ratio = "n/a (no common round)"
        lines.append(
            f"| {fw} | {task} | {e['rounds']} | {_fmt_spread(e['tokens_per_s'], ',.0f')} "
            f"| {_fmt_spread(e['padded_tokens_per_s'], ',.0f')} | {_fmt_spread(e['step_time'], '.3f')} "
            f"| {e['pad_fraction']:.2f} | {ratio} |"
        )
    return "\n".join(lines)
