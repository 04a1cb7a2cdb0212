r"""Code generation with unit tests (HumanEval format), scored by running the code in a sandbox.

Rows (HumanEval, Chen et al. 2021): ``{"task_id", "prompt", "entry_point", "test",
"canonical_solution"}``; ``prompt`` is a function signature and docstring, ``test`` defines
``check(candidate)``. A response passes when the program

    code(row, response) + "\n\n" + row["test"] + f"\n\ncheck({row['entry_point']})\n"

runs to completion in :class:`jaxrlhf.tasks.sandbox.Sandbox` (every assertion held, no exception,
no early exit, within the time and resource limits); ``reward`` is 1.0 then, else 0.0
(``config.reward.fn = "jaxrlhf.tasks.code:reward"``). pass@k comes from ``python -m
jaxrlhf.evaluate --samples=n`` (any 0/1 reward gets pass@k there) or ``pass_at_k`` here.

``code(row, response)``, two response styles:

* **completion** (a base model continuing the prompt): ``prompt + response`` with the response cut
  at the first top-level ``\ndef``, ``\nclass``, ``\nif``, ``\nprint`` or ``\n#`` (the stop
  sequences of Chen et al. 2021; a model that goes on writing tests or a ``__main__`` block is not
  scored on them);
* **chat** (the response holds a fenced code block): the block that defines ``entry_point``
  (else the first block) is appended to the prompt (the prompt's imports and helper functions stay
  defined; a block that redefines the function replaces the stub).

The prompt is read from ``row["code_prompt"]`` when present (``make_prompts`` writes it: with a chat
template, ``prompt`` is a message list and the data pipeline replaces ``row["prompt"]`` with the
rendered chat text), else from ``row["prompt"]``.

The default sandbox of ``reward`` is configured by environment variables (read once, when first
used): ``JAXRLHF_SANDBOX_TIMEOUT`` (seconds per program, default 10),
``JAXRLHF_SANDBOX_WORKERS`` (programs in parallel, default: the CPU count) and
``JAXRLHF_SANDBOX_REQUIRE_ISOLATION`` (``1``: refuse to run without Linux namespaces).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import threading
import time
from collections.abc import Sequence

import numpy as np

from jaxrlhf.tasks.common import write_jsonl
from jaxrlhf.tasks.sandbox import Sandbox
from jaxrlhf.tasks.verifiable import pass_at_k_from_scores

__all__ = [
    "CHAT_INSTRUCTION", "STOP_SEQUENCES", "CodeReward", "code", "load_rows", "make_prompts", "pass_at_k",
    "program", "reward", "score_samples",
]  # fmt: skip

STOP_SEQUENCES = ("\ndef", "\nclass", "\nif", "\nprint", "\n#")
CHAT_INSTRUCTION = (
    "Complete the following Python function. Answer with the whole function (imports included) in "
    "one ```python code block."
)
TEMPLATES = ("plain", "chat")
_FENCE_RE = re.compile(r"```[ \t]*([\w+-]*)[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def load_rows(path: str | os.PathLike) -> list[dict]:
    """Rows of a HumanEval-format ``.jsonl`` or ``.jsonl.gz`` file."""
    opener = gzip.open if os.fspath(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _check_row(row: dict) -> None:
    for key in ("test", "entry_point"):
        if not isinstance(row.get(key), str):
            raise ValueError(
                f"code row {row.get('task_id', '?')}: {key!r} must be a string (keys: {sorted(row)})"
            )
    if not isinstance(row.get("code_prompt", row.get("prompt")), str):
        raise ValueError(f"code row {row.get('task_id', '?')}: needs a string 'code_prompt' or 'prompt'")


def _fenced_blocks(response: str) -> list[str]:
    return [
        m.group(2)
        for m in _FENCE_RE.finditer(response)
        if m.group(1).lower() in ("", "python", "py", "python3")
    ]


def code(row: dict, response: str) -> str:
    """The candidate's code: prompt + completion, or prompt + the chat answer's code block."""
    _check_row(row)
    prompt = row.get("code_prompt", row.get("prompt"))
    if "```" in response:
        blocks = _fenced_blocks(response)
        defines = re.compile(rf"^[ \t]*def[ \t]+{re.escape(row['entry_point'])}[ \t]*\(", re.M)
        defining = [b for b in blocks if defines.search(b)]
        block = (defining or blocks or [""])[0]
        return prompt + "\n\n" + block
    cut = min((i for s in STOP_SEQUENCES if (i := response.find(s)) >= 0), default=len(response))
    return prompt + response[:cut]


def program(row: dict, response: str) -> str:
    """The program the sandbox runs: the candidate's code, the row's tests, ``check(entry_point)``."""
    return f"{code(row, response)}\n\n{row['test']}\n\ncheck({row['entry_point']})\n"


class CodeReward:
    """``reward(prompts, responses, rows) -> float32 [B]``: 1.0 where the program passes.

    Args:
      sandbox: the :class:`Sandbox` to run programs in (default: built on first use from the
        ``JAXRLHF_SANDBOX_*`` environment variables, see the module docstring).
    """

    def __init__(self, sandbox: Sandbox | None = None):
        self._sandbox = sandbox
        self._lock = threading.Lock()

    @property
    def sandbox(self) -> Sandbox:
        with self._lock:
            if self._sandbox is None:
                env = os.environ.get
                self._sandbox = Sandbox(
                    timeout=float(env("JAXRLHF_SANDBOX_TIMEOUT", "10")),
                    workers=int(env("JAXRLHF_SANDBOX_WORKERS", "0")) or None,
                    require_isolation=env("JAXRLHF_SANDBOX_REQUIRE_ISOLATION", "0") not in ("", "0", "false"),
                )
            return self._sandbox

    def __call__(
        self, prompts: Sequence[str], responses: Sequence[str], rows: Sequence[dict] | None = None
    ) -> np.ndarray:
        if rows is None or len(rows) != len(responses) or len(prompts) != len(responses):
            raise ValueError(
                f"code.reward: {len(prompts)} prompts, {len(responses)} responses, "
                f"{'no' if rows is None else len(rows)} rows (rows with 'test'/'entry_point' are required)"
            )
        programs = [program(r, y) for r, y in zip(rows, responses, strict=True)]
        results = self.sandbox.run_many(programs)
        return np.asarray([r.passed for r in results], np.float32)


reward = CodeReward()


def score_samples(
    rows: Sequence[dict], samples: Sequence[Sequence[str]], sandbox: Sandbox | None = None
) -> np.ndarray:
    """``[P, n]`` 0/1 scores of ``n`` responses per problem (one pool for all ``P * n`` programs)."""
    sandbox = sandbox or reward.sandbox
    n = len(samples[0]) if samples else 0
    if any(len(s) != n for s in samples) or len(samples) != len(rows):
        raise ValueError(
            f"score_samples: {len(rows)} rows and sample lists of lengths {[len(s) for s in samples]}"
        )
    programs = [program(r, y) for r, ys in zip(rows, samples, strict=True) for y in ys]
    passed = [res.passed for res in sandbox.run_many(programs)]
    return np.asarray(passed, np.float32).reshape(len(rows), n)


def pass_at_k(
    rows: Sequence[dict], samples: Sequence[Sequence[str]], k: int, sandbox: Sandbox | None = None
) -> float:
    """Mean unbiased pass@k (Chen et al. 2021) over problems of ``n >= k`` samples each."""
    return float(np.mean(pass_at_k_from_scores(score_samples(rows, samples, sandbox), k)))


def make_prompts(
    rows: Sequence[dict], template: str = "plain", instruction: str = CHAT_INSTRUCTION
) -> list[dict]:
    """Prompt rows for the data pipeline: ``{"prompt", "code_prompt", "test", "entry_point", "task_id"}``.

    ``template="plain"``: ``prompt`` is the HumanEval prompt itself (a base model completes it);
    ``"chat"``: one user message, the instruction and the prompt in a fenced block (rendered by the
    tokenizer's chat template).
    """
    if template not in TEMPLATES:
        raise ValueError(f"code template {template!r}: expected one of {TEMPLATES}")
    out = []
    for row in rows:
        _check_row(row)
        text = row.get("code_prompt", row.get("prompt"))
        prompt: str | list[dict] = text
        if template == "chat":
            prompt = [{"role": "user", "content": f"{instruction}\n\n```python\n{text.rstrip()}\n```"}]
        out.append(
            {
                "prompt": prompt,
                "code_prompt": text,
                "test": row["test"],
                "entry_point": row["entry_point"],
                "task_id": row.get("task_id", ""),
            }
        )
    return out


def main(argv: list[str] | None = None) -> None:
    """``prompts``: write prompt rows; ``canonical``: run the canonical solutions, print throughput."""
    p = argparse.ArgumentParser(prog="python -m jaxrlhf.tasks.code", description=main.__doc__)
    p.add_argument("command", choices=("prompts", "canonical"))
    p.add_argument("--input", required=True, help="HumanEval-format .jsonl or .jsonl.gz")
    p.add_argument("--output", help="prompts: the .jsonl to write")
    p.add_argument("--template", default="plain", choices=TEMPLATES)
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--workers", type=int, default=0, help="0: the CPU count")
    a = p.parse_args(argv)
    rows = load_rows(a.input)
    if a.command == "prompts":
        if not a.output:
            p.error("prompts needs --output")
        print(json.dumps({"rows": write_jsonl(a.output, make_prompts(rows, a.template)), "output": a.output}))
        return
    sandbox = Sandbox(timeout=a.timeout, workers=a.workers or None)
    level = sandbox.isolation
    start = time.perf_counter()
    results = sandbox.run_many([program(r, r["canonical_solution"]) for r in rows])
    seconds = time.perf_counter() - start
    failed = [r["task_id"] for r, res in zip(rows, results, strict=True) if not res.passed]
    print(json.dumps({"programs": len(rows), "passed": len(rows) - len(failed), "failed": failed,
                      "seconds": round(seconds, 2), "programs_per_s": round(len(rows) / seconds, 1),
                      "workers": sandbox.workers, "isolation": level}))  # fmt: skip


if __name__ == "__main__":
    main()
