r"""GSM8K: grade-school math word problems with a numeric final answer (Cobbe et al., 2021).

Rows of the GSM8K files are ``{"question": str, "answer": str}``; the answer is a worked solution
with calculator annotations ``<<48/2=24>>`` that ends in ``"\n#### 72"``. This module turns them
into prompt rows for PPO / DPO-Iter / evaluation and scores responses:

* ``make_prompts(rows, template=..., few_shot=k)``: ``{"prompt", "question", "answer",
  "solution"}`` rows; ``prompt`` is a string (``template="plain"``: ``Question: ...\nAnswer:``,
  optionally after ``k`` worked examples) or a list of chat messages (``template="chat"``: one user
  turn with an instruction, optionally after ``k`` user/assistant example turns), rendered by the
  tokenizer's chat template in the data pipeline. ``answer`` is the reference final answer.
* ``reward(prompts, responses, rows)``: 1.0 when the response's final answer equals the row's
  ``answer`` exactly as a rational number, else 0.0
  (``config.reward.fn = "jaxrlhf.tasks.gsm8k:reward"``).

Answer extraction (``extract_answer``), in order of precedence; the response is first cut where a
few-shot continuation starts (a line beginning ``Question:`` or ``Q:``):

1. the last ``#### N`` (the GSM8K format);
2. the last ``\boxed{N}`` (nested braces, ``\frac{a}{b}``, ``\dfrac``);
3. the last ``The (final) answer is N`` / ``Answer: N`` / ``A: N``;
4. otherwise the last number of the response.

A number is read with its sign (``-`` or ``−``), thousands separators (``1,234,567``), a decimal
part, a fraction ``a/b`` or ``\frac{a}{b}``, a currency sign or a unit after it (``$1,200.00``,
``50%``, ``12 dollars``: the unit is ignored) and a sentence's final period. Numbers are compared
exactly as ``fractions.Fraction``: ``18``, ``18.0``, ``$18.00`` and ``36/2`` all equal ``18``;
``0.33`` does not equal ``1/3`` (GSM8K's references are all integers, so a rounded decimal answer
is never exact anyway).

Why not HF ``math-verify``: GSM8K answers are plain numbers, for which an exact rational comparison
is enough, and the GSM8K-specific rules matter more: ``math-verify`` (sympy + an ANTLR LaTeX
parser, ~25x slower here) does not know ``#### N`` (it scores 4 of the 1,319 reference test
solutions 0, reading a number of the worked solution) nor few-shot continuations. On the 5,276
real model solutions of the GSM8K repository this checker agrees with the published correctness
labels on all 5,276 (``math-verify``: also 5,276); docs/rewards.md has the measurement.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from fractions import Fraction

import numpy as np

from jaxrlhf.tasks.common import read_jsonl, write_jsonl

__all__ = [
    "CHAT_INSTRUCTION", "extract_answer", "make_prompts", "parse_number", "reference_answer", "reward",
    "score", "strip_annotations", "write_prompts_jsonl",
]  # fmt: skip

CHAT_INSTRUCTION = (
    "Solve the problem step by step. Write the final answer as a number on the last line: #### N"
)
TEMPLATES = ("plain", "chat")

# A number: optional sign, currency, digits with thousands separators or plain digits, decimals.
# Whitespace inside the patterns is horizontal and bounded: no quadratic backtracking on long
# degenerate responses (tested on 100k-character inputs).
_NUM = (
    r"(?:[$€£¥₹][ \t]?)?(?P<sign>[-−]?)(?:[$€£¥₹][ \t]?)?"
    r"(?P<int>\d{1,3}(?:,\d{3})+|\d+)?(?P<dec>\.\d+)?"
    r"(?:[ \t]?/[ \t]?(?P<den>\d+(?:\.\d+)?))?"
)
_NUMBER_RE = re.compile(r"(?<![\w.])" + _NUM + r"(?![\d])")
_HASH_RE = re.compile(r"####[ \t]*(?P<body>[^\n]*)")
_PHRASE_RE = re.compile(
    r"(?:the[ \t]+(?:final[ \t]+)?answer[ \t]+is|final[ \t]+answer[ \t]*:"
    r"|^[ \t]*answer[ \t]*:|^[ \t]*a[ \t]*:)[ \t]*(?P<body>[^\n]*)",
    re.IGNORECASE | re.MULTILINE,
)
_FRAC_RE = re.compile(r"\\[dt]?frac\{([^{}]{1,64})\}\{([^{}]{1,64})\}")
_BRACE_RE = re.compile(r"\\(?:boxed|fbox)\s*\{|\{|\}")
_CONTINUATION_RE = re.compile(r"\n[ \t]*(?:Question|Q)[ \t]*:", re.IGNORECASE)
_ANNOTATION_RE = re.compile(r"<<[^<>]*>>")
_MAX_DIGITS = 100  # longer digit runs (a model repeating "3333...") are not read as numbers


# ---------------------------------------------------------------------------------------------
# Numbers and answers
# ---------------------------------------------------------------------------------------------


def _to_fraction(m: re.Match) -> Fraction | None:
    """The value of a ``_NUMBER_RE`` match, or None when it holds no digits."""
    whole, dec, den = m.group("int"), m.group("dec"), m.group("den")
    if whole is None and dec is None:
        return None
    if sum(len(g or "") for g in (whole, dec, den)) > _MAX_DIGITS:  # degenerate output, not an answer
        return None
    value = Fraction((whole or "0").replace(",", "") + (dec or ""))
    if den is not None:
        d = Fraction(den)
        if d == 0:
            return None
        value /= d
    return -value if m.group("sign") else value


def _numbers(text: str) -> list[Fraction]:
    """Every number in ``text`` in order (see the module docstring for the forms read)."""
    text = _FRAC_RE.sub(lambda m: f"{m.group(1)}/{m.group(2)}", text)
    out = []
    for m in _NUMBER_RE.finditer(text):
        v = _to_fraction(m)
        if v is not None:
            out.append(v)
    return out


def parse_number(text: str) -> Fraction | None:
    """The first number in ``text`` (``"$1,234.50."`` -> ``Fraction(2469, 2)``), or None."""
    nums = _numbers(text)
    return nums[0] if nums else None


def _boxed(text: str) -> list[str]:
    r"""Contents of every ``\boxed{...}`` (or ``\fbox{...}``) in ``text``, braces balanced, in the
    order they close (one pass: linear in the text, whatever its braces)."""
    out, stack = [], []  # stack: (content start, is_boxed) per open brace
    for m in _BRACE_RE.finditer(text):
        if m.group() == "}":
            if stack:
                start, boxed = stack.pop()
                if boxed:
                    out.append(text[start : m.start()])
        else:
            stack.append((m.end(), m.group() != "{"))
    return out


def extract_answer(response: str) -> Fraction | None:
    """The final answer of a response, or None when it has no number (see the module docstring)."""
    cut = _CONTINUATION_RE.search(response)
    text = response[: cut.start()] if cut else response
    candidates = [m.group("body") for m in _HASH_RE.finditer(text)]
    if not candidates:
        candidates = _boxed(text)
    if not candidates:
        candidates = [m.group("body") for m in _PHRASE_RE.finditer(text)]
    for body in reversed(candidates):
        value = parse_number(body)
        if value is not None:
            return value
    nums = _numbers(text)
    return nums[-1] if nums else None


def reference_answer(row: dict) -> Fraction:
    """The reference answer of a row: ``row["answer"]`` is a number (``"1,600"``) or a worked
    solution, read like a response (``#### N`` in GSM8K's files, ``A: N`` in its model solutions).

    Raises:
      ValueError: naming the row's question when it has no ``answer`` or no number in it.
    """
    if "answer" not in row:
        raise ValueError(f"gsm8k row lacks 'answer' (keys: {sorted(row)})")
    text = str(row["answer"])
    value = extract_answer(text)
    if value is None:
        raise ValueError(f"gsm8k row has no numeric answer: {text!r} (question {row.get('question')!r})")
    return value


def score(row: dict, response: str) -> float:
    """1.0 when ``extract_answer(response)`` equals ``reference_answer(row)`` exactly, else 0.0."""
    got = extract_answer(response)
    return float(got is not None and got == reference_answer(row))


def reward(
    prompts: Sequence[str], responses: Sequence[str], rows: Sequence[dict] | None = None
) -> np.ndarray:
    """Programmatic reward (``config.reward.fn = "jaxrlhf.tasks.gsm8k:reward"``).

    Args:
      prompts: ``[B]`` decoded prompts (unused; the reference is in ``rows``).
      responses: ``[B]`` decoded responses.
      rows: ``[B]`` prompt rows with ``answer`` (as written by ``make_prompts``, or raw GSM8K rows).

    Returns:
      ``float32 [B]`` of 1.0 / 0.0.
    """
    if rows is None or len(rows) != len(responses) or len(prompts) != len(responses):
        raise ValueError(
            f"gsm8k.reward: {len(prompts)} prompts, {len(responses)} responses, "
            f"{'no' if rows is None else len(rows)} rows (rows with 'answer' are required)"
        )
    return np.asarray([score(r, y) for r, y in zip(rows, responses, strict=True)], np.float32)


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------


def strip_annotations(solution: str) -> str:
    """A GSM8K solution without its calculator annotations (``"48/2 = <<48/2=24>>24"`` -> ``"48/2 = 24"``)."""
    return _ANNOTATION_RE.sub("", solution)


def _final(solution: str) -> str:
    m = list(_HASH_RE.finditer(solution))
    if not m:
        raise ValueError(f"GSM8K solution does not end in '#### N': {solution[-80:]!r}")
    return m[-1].group("body").strip()


def make_prompts(
    rows: Sequence[dict],
    template: str = "plain",
    few_shot: int = 0,
    shots: Sequence[dict] | None = None,
    instruction: str = CHAT_INSTRUCTION,
    system: str | None = None,
) -> list[dict]:
    """Prompt rows for GSM8K-format ``rows`` (``question``, ``answer`` ending in ``#### N``).

    Args:
      rows: the problems.
      template: ``"plain"``: ``prompt`` is the text ``"Question: {q}\nAnswer:"``, after ``few_shot``
        examples ``"Question: {q}\nAnswer: {solution}\n\n"`` (so a base model answers in the
        ``#### N`` format and a continuation starts with ``Question:``, where the checker cuts);
        ``"chat"``: ``prompt`` is a list of messages, ``[system], (user, assistant) * few_shot,
        user``, each user turn ``"{q}\n\n{instruction}"``.
      few_shot: number of worked examples before the question (taken from ``shots``).
      shots: rows to take the examples from (default: the first ``few_shot`` of ``rows``; pass the
        train split when ``rows`` is the test split). A row equal to an example keeps its question
        in the prompt only once: the examples exclude it.
      instruction: the chat template's instruction after each question.
      system: optional system message (chat template only).

    Returns:
      ``[{"prompt", "question", "answer", "solution"}]``: ``answer`` is the final answer text
      (``"72"``), ``solution`` the worked solution without calculator annotations.
    """
    if template not in TEMPLATES:
        raise ValueError(f"gsm8k template {template!r}: expected one of {TEMPLATES}")
    pool = list(shots if shots is not None else rows)
    if few_shot < 0 or few_shot > len(pool):
        raise ValueError(f"few_shot={few_shot}: need 0 <= few_shot <= {len(pool)} example rows")
    out = []
    for i, row in enumerate(rows):
        for key in ("question", "answer"):
            if not isinstance(row.get(key), str):
                raise ValueError(f"gsm8k row {i}: {key!r} must be a string (keys: {sorted(row)})")
        examples = [s for s in pool[: few_shot + 1] if s["question"] != row["question"]][:few_shot]
        q = row["question"].strip()
        if template == "plain":
            prefix = "".join(
                f"Question: {s['question'].strip()}\nAnswer: {strip_annotations(s['answer']).strip()}\n\n"
                for s in examples
            )
            prompt: str | list[dict] = f"{prefix}Question: {q}\nAnswer:"
        else:
            prompt = [{"role": "system", "content": system}] if system else []
            for s in examples:
                prompt.append({"role": "user", "content": f"{s['question'].strip()}\n\n{instruction}"})
                prompt.append({"role": "assistant", "content": strip_annotations(s["answer"]).strip()})
            prompt.append({"role": "user", "content": f"{q}\n\n{instruction}"})
        out.append(
            {
                "prompt": prompt,
                "question": row["question"],
                "answer": _final(row["answer"]),
                "solution": strip_annotations(row["answer"]),
            }
        )
    return out


def write_prompts_jsonl(src: str, dst: str, *, shots_file: str | None = None, max_rows: int = 0, **kw) -> int:
    """Reads a GSM8K file, writes ``make_prompts`` rows as JSON lines; returns the row count.

    ``shots_file``: a GSM8K file to draw the few-shot examples from (default: ``src``).
    ``max_rows > 0``: only the first ``max_rows`` problems.
    """
    rows = read_jsonl(src)
    if max_rows > 0:
        rows = rows[:max_rows]
    shots = read_jsonl(shots_file) if shots_file else None
    return write_jsonl(dst, make_prompts(rows, shots=shots, **kw))


def main(argv: list[str] | None = None) -> None:
    """``python -m jaxrlhf.tasks.gsm8k --input test.jsonl --output prompts.jsonl [--template chat]``."""
    p = argparse.ArgumentParser(prog="python -m jaxrlhf.tasks.gsm8k", description=main.__doc__)
    p.add_argument("--input", required=True, help="GSM8K-format .jsonl (question, answer)")
    p.add_argument("--output", required=True, help="prompt rows .jsonl to write")
    p.add_argument("--template", default="plain", choices=TEMPLATES)
    p.add_argument("--few_shot", type=int, default=0)
    p.add_argument(
        "--shots_file", default=None, help="GSM8K file for the few-shot examples (default: --input)"
    )
    p.add_argument("--max_rows", type=int, default=0)
    p.add_argument("--system", default=None, help="system message (chat template)")
    a = p.parse_args(argv)
    n = write_prompts_jsonl(
        a.input, a.output, shots_file=a.shots_file, max_rows=a.max_rows, template=a.template,
        few_shot=a.few_shot, system=a.system,
    )  # fmt: skip
    print(json.dumps({"rows": n, "output": a.output}))


if __name__ == "__main__":
    main()
