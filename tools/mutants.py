"""The mutation suite: break one thing at a time in a copy of the repository and run the tests
meant to notice; every mutation must be caught.

Usage (from the repository root; ``make mutants`` runs the whole list)::

    python tools/mutants.py                       # every mutation in tools/mutants.txt
    python tools/mutants.py --fast                # the ones marked ``fast: yes`` (a CI subset)
    python tools/mutants.py --only dpo-swap-pairs reward-margin-ignored
    python tools/mutants.py --list                # names, files and tests; runs nothing
    python tools/mutants.py --check               # every original snippet still occurs once; runs nothing

Each mutation in ``tools/mutants.txt`` names a file, an exact original snippet (it must occur
exactly once), its replacement and the pytest node ids meant to catch it. The tracked files of
the checkout (as they are in the working tree) are copied once to a temporary directory; each
mutation is applied there, the named tests run with the same Python (``pytest -x``) with the copy
first on ``PYTHONPATH``, and the file is restored. A mutation is *caught* when pytest exits with
1 (a test failed) or 2/3 (the mutated code broke collection); *survived* when the tests pass;
*stale* when its snippet no longer occurs exactly once; *timeout* past ``--timeout``. Exit status
0 only when every mutation run is caught. The report (name, result, seconds) goes to stdout and,
with ``--report FILE``, to a Markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIST = os.path.join(ROOT, "tools", "mutants.txt")


@dataclasses.dataclass
class Mutant:
    name: str
    file: str
    tests: list[str]
    original: str
    replacement: str
    guarantee: str = ""
    fast: bool = False


def parse(path: str) -> list[Mutant]:
    """Blocks of ``[name]``, ``key: value`` lines (file, tests, guarantee, fast), then
    ``<<<`` original lines ``===`` replacement lines ``>>>``; ``#`` lines outside blocks are comments."""
    mutants, cur, mode, orig, repl = [], None, None, [], []
    with open(path) as f:
        lines = f.read().splitlines()
    for n, line in enumerate(lines, 1):
        where = f"{path}:{n}"
        if mode in ("orig", "repl"):
            if line == "===" and mode == "orig":
                mode = "repl"
            elif line == ">>>":
                cur.original, cur.replacement = "\n".join(orig), "\n".join(repl)
                mutants.append(cur)
                cur, mode, orig, repl = None, None, [], []
            else:
                (orig if mode == "orig" else repl).append(line)
        elif line.startswith("[") and line.endswith("]"):
            if cur is not None:
                raise ValueError(f"{where}: mutation {cur.name!r} has no <<< ... >>> block")
            cur = Mutant(name=line[1:-1], file="", tests=[], original="", replacement="")
        elif line == "<<<":
            if cur is None or not cur.file or not cur.tests:
                raise ValueError(f"{where}: <<< outside a mutation with file: and tests:")
            mode = "orig"
        elif ":" in line and cur is not None and not line.startswith("#"):
            key, value = (s.strip() for s in line.split(":", 1))
            if key == "file":
                cur.file = value
            elif key == "tests":
                cur.tests = value.split()
            elif key == "guarantee":
                cur.guarantee = value
            elif key == "fast":
                cur.fast = value.lower() in ("yes", "true", "1")
            else:
                raise ValueError(f"{where}: unknown key {key!r} in mutation {cur.name!r}")
        elif line.strip() and not line.startswith("#"):
            raise ValueError(f"{where}: unexpected line {line!r}")
    if cur is not None:
        raise ValueError(f"{path}: mutation {cur.name!r} is not closed with >>>")
    names = [m.name for m in mutants]
    dup = {x for x in names if names.count(x) > 1}
    if dup:
        raise ValueError(f"{path}: duplicate mutation names {sorted(dup)}")
    return mutants


def occurrences(m: Mutant, root: str) -> int:
    with open(os.path.join(root, m.file)) as f:
        return f.read().count(m.original)


def copy_tracked(dst: str) -> None:
    """The working tree's tracked and untracked-but-not-ignored files into ``dst`` (what a fresh
    checkout of the current work would hold; no ``.venv``, no build outputs)."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split("\0")
    for rel in filter(None, files):
        src = os.path.join(ROOT, rel)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(dst, rel))


def env_for(copy: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = copy + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("PYTEST_ADDOPTS", None)
    return env


def check_copy_is_imported(copy: str) -> None:
    """The tests in the copy must import the copy's ``jaxrlhf`` (not an editable install's)."""
    out = subprocess.run(
        [sys.executable, "-c", "import jaxrlhf, os; print(os.path.realpath(jaxrlhf.__file__))"],
        cwd=copy,
        env=env_for(copy),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not out.startswith(os.path.realpath(copy)):
        raise RuntimeError(f"the copy imports jaxrlhf from {out}, not from {copy}")


def check_baseline_collects(mutants: list[Mutant], copy: str) -> None:
    """Every named test collects in the unmutated copy, so that a collection error under a
    mutation (pytest exit 2) is the mutation's doing."""
    tests = sorted({t for m in mutants for t in m.tests})
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *tests],
        cwd=copy,
        env=env_for(copy),
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError("the unmutated copy does not collect the named tests:\n" + proc.stdout[-3000:])


def run_one(m: Mutant, copy: str, timeout: float) -> tuple[str, float, str]:
    """``(result, seconds, output tail)`` of one mutation applied in ``copy``."""
    if occurrences(m, copy) != 1:
        return "stale", 0.0, f"snippet occurs {occurrences(m, copy)} times in {m.file}"
    path = os.path.join(copy, m.file)
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text.replace(m.original, m.replacement))
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *m.tests]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, cwd=copy, env=env_for(copy), capture_output=True, text=True, timeout=timeout
        )
        rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-4000:]
    except subprocess.TimeoutExpired:
        rc, tail = None, f"no result after {timeout:.0f}s"
    finally:
        with open(path, "w") as f:
            f.write(text)
    seconds = time.perf_counter() - t0
    if rc is None:
        return "timeout", seconds, tail
    if rc == 1:
        return "caught", seconds, tail
    if rc in (2, 3):
        return "caught (collection/internal error)", seconds, tail
    if rc == 0:
        return "SURVIVED", seconds, tail
    return f"error (pytest exit {rc})", seconds, tail


def markdown(rows) -> str:
    out = ["| mutation | file | result | seconds |", "|---|---|---|---|"]
    out += [f"| `{m.name}` | `{m.file}` | {r} | {s:.0f} |" for m, r, s in rows]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--list-file", default=LIST)
    ap.add_argument("--only", nargs="*", default=None, help="mutation names to run")
    ap.add_argument("--fast", action="store_true", help="only the mutations marked fast: yes")
    ap.add_argument("--list", action="store_true", help="print the mutations and exit")
    ap.add_argument("--check", action="store_true", help="check every snippet occurs once; run nothing")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per mutation")
    ap.add_argument("--deadline", type=float, default=0.0, help="stop starting mutations after this many s")
    ap.add_argument("--report", default="", help="also write a Markdown table here")
    ap.add_argument("--logs", default="", help="write each mutation's pytest output tail to DIR/<name>.txt")
    args = ap.parse_args(argv)

    mutants = parse(args.list_file)
    if args.only:
        unknown = set(args.only) - {m.name for m in mutants}
        if unknown:
            raise SystemExit(f"unknown mutation names: {sorted(unknown)}")
        mutants = [m for m in mutants if m.name in args.only]
    if args.fast:
        mutants = [m for m in mutants if m.fast]
    if args.list:
        for m in mutants:
            print(f"{m.name:36s} {m.file:40s} {' '.join(m.tests)}")
        return 0
    if args.check:
        bad = [(m.name, occurrences(m, ROOT)) for m in mutants if occurrences(m, ROOT) != 1]
        for name, n in bad:
            print(f"stale: {name} (snippet occurs {n} times)")
        print(f"{len(mutants) - len(bad)}/{len(mutants)} snippets occur exactly once")
        return 1 if bad else 0

    rows, t_start = [], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="jaxrlhf-mutants-") as copy:
        copy_tracked(copy)
        check_copy_is_imported(copy)
        check_baseline_collects(mutants, copy)
        for i, m in enumerate(mutants, 1):
            if args.deadline and time.perf_counter() - t_start > args.deadline:
                print(f"deadline reached: {len(mutants) - i + 1} mutations not run", flush=True)
                break
            result, seconds, tail = run_one(m, copy, args.timeout)
            rows.append((m, result, seconds))
            if args.logs:
                os.makedirs(args.logs, exist_ok=True)
                with open(os.path.join(args.logs, m.name + ".txt"), "w") as f:
                    f.write(tail)
            print(f"[{i}/{len(mutants)}] {m.name}: {result} ({seconds:.0f}s)", flush=True)
            if not result.startswith("caught"):
                print("    " + tail.replace("\n", "\n    "), flush=True)
    caught = sum(r.startswith("caught") for _, r, _ in rows)
    total = time.perf_counter() - t_start
    print(f"caught {caught}/{len(rows)} mutations in {total:.0f}s")
    if args.report:
        with open(args.report, "w") as f:
            f.write(markdown(rows) + f"\ncaught {caught}/{len(rows)} in {total:.0f}s\n")
    return 0 if rows and caught == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
