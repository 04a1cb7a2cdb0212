"""Verifiable answers: a stand-in for the code-competition tasks (APPS / CodeContests).

Prompts have exact, checkable answers, written as space-separated words and numbers so that the
shared word-level tokenizer (``jaxrlhf.tasks.tokenizer``) covers them:

=========  ===========================================================  ====================
task       prompt                                                       answer
=========  ===========================================================  ====================
arith      ``compute 3 + 4 * 2 =``                                      ``11``
reverse    ``reverse 3 1 4 =``                                          ``4 1 3``
sort       ``sort 5 2 9 =``                                             ``2 5 9``
max / min  ``max of 3 8 1 =``                                           ``8``
fit        ``find f : f ( 1 ) = 3 , f ( 2 ) = 5 ; f ( x ) =``           ``2 * x + 1``
=========  ===========================================================  ====================

``fit`` is the closest analogue of a programming problem: the response is a small program (an
integer expression in ``x``) and it is run on test cases, the examples shown in the prompt plus
hidden ones; its score is the fraction of test cases passed, so a program that only fits the
shown examples gets partial credit. Every other task has a single test (its answer) and scores 1/0.

Prompt rows (``make_prompts``, ``write_prompts_jsonl``) are dicts::

    {"prompt": str, "task": str, "answer": str, "tests": [[x, y], ...]}

``answer`` is the canonical reference answer; ``tests`` holds the ``fit`` test cases (shown and
hidden) and is empty for the other tasks.

Answer convention (``check``): the response's words (split like the tokenizer's pre-tokenizer) up
to its first ``<eos>`` (or its end; ``<pad>``/``<bos>`` ignored, see
``jaxrlhf.tasks.common.response_words``) are the answer; anything after the first ``<eos>`` is
ignored. For single-answer tasks these words must equal the reference answer's words exactly (a
trailing word *before* ``<eos>`` makes the answer wrong, as extra output fails a judge). For
``fit`` they must parse as an expression over integers, ``x``, ``+ - *`` and parentheses.

Numbers are whole-word tokens ``0..MAX_NUMBER``; generated answers and test outputs stay within
that range and are non-negative.
"""

from __future__ import annotations

import os
import random
from collections.abc import Collection, Sequence

import numpy as np

import jaxrlhf.tasks.common as common
from jaxrlhf.tasks.common import best_worst_pairs, write_preference_jsonl

__all__ = [
    "best_worst_pairs", "check", "evaluate", "make_prompts", "make_sft_examples", "pass_at_k",
    "pass_at_k_from_scores", "reward", "row_from_prompt", "vocabulary", "write_preference_jsonl",
    "write_prompts_jsonl", "write_sft_jsonl",
]  # fmt: skip

MAX_NUMBER = 199
TASKS = ("arith", "reverse", "sort", "max", "min", "fit")
DIFFICULTIES = ("easy", "medium", "hard")
SYMBOLS = ("+", "-", "*", "(", ")", "=", ",", ":", ";")
KEYWORDS = ("compute", "reverse", "sort", "max", "min", "of", "find", "f", "x")

# difficulty -> settings
_ARITH = {
    "easy": (2, 2, 9, False),
    "medium": (3, 3, 9, False),
    "hard": (3, 4, 12, True),
}  # ops, max value, parens
_LISTS = {"easy": (3, 3, 9), "medium": (4, 5, 19), "hard": (5, 7, 49)}  # min len, max len, max value
_FIT = {"easy": (2, 4), "medium": (2, 5), "hard": (3, 6)}  # shown examples, total tests
_MAX_EXPR_WORDS = 64
_MAX_DEPTH = 16


def vocabulary() -> list[str]:
    """All words of the task prompts and answers: numbers ``0..MAX_NUMBER``, symbols, keywords."""
    return sorted({*map(str, range(MAX_NUMBER + 1)), *SYMBOLS, *KEYWORDS}, key=lambda w: (not w.isdigit(), w))


# ---------------------------------------------------------------------------------------------
# Expressions: a tiny safe parser/evaluator (no eval)
# ---------------------------------------------------------------------------------------------


class _ParseError(ValueError):
    pass


def _parse(ws: Sequence[str]):
    """Parses an expression (list of words) into a nested tuple tree; raises ``_ParseError``."""
    pos = 0

    def peek():
        return ws[pos] if pos < len(ws) else None

    def take():
        nonlocal pos
        pos += 1
        return ws[pos - 1]

    def expr(depth):
        if depth > _MAX_DEPTH:
            raise _ParseError("too deep")
        node = term(depth)
        while peek() in ("+", "-"):
            node = (take(), node, term(depth))
        return node

    def term(depth):
        node = factor(depth)
        while peek() == "*":
            take()
            node = ("*", node, factor(depth))
        return node

    def factor(depth):
        w = peek()
        if w is None:
            raise _ParseError("unexpected end")
        if w == "(":
            take()
            node = expr(depth + 1)
            if peek() != ")":
                raise _ParseError("missing )")
            take()
            return node
        if w == "-":
            take()
            return ("neg", factor(depth + 1))
        if w == "x" or w.isdigit():
            return take()
        raise _ParseError(f"unexpected word {w!r}")

    if not ws or len(ws) > _MAX_EXPR_WORDS:
        raise _ParseError(f"expression of {len(ws)} words")
    tree = expr(0)
    if pos != len(ws):
        raise _ParseError(f"trailing words {list(ws[pos:])}")
    return tree


def _evaluate(tree, x: int | None = None) -> int:
    if isinstance(tree, str):
        if tree == "x":
            if x is None:
                raise _ParseError("x in a closed expression")
            return x
        return int(tree)
    if tree[0] == "neg":
        return -_evaluate(tree[1], x)
    a, b = _evaluate(tree[1], x), _evaluate(tree[2], x)
    return a + b if tree[0] == "+" else a - b if tree[0] == "-" else a * b


def evaluate(expression: str, x: int | None = None) -> int:
    """Value of an integer expression in words (``"3 + 4 * 2"``, ``"2 * ( x + 1 )"``) at ``x``.

    Raises:
      ValueError: when the expression does not parse (or uses ``x`` with ``x=None``).
    """
    return _evaluate(_parse(common.words(expression)), x)


# ---------------------------------------------------------------------------------------------
# Generators
# ---------------------------------------------------------------------------------------------


def _arith(rng: random.Random, difficulty: str) -> tuple[str, str]:
    min_ops, max_ops, hi, parens = _ARITH[difficulty]
    while True:
        k = rng.randint(min_ops, max_ops)
        nums = [str(rng.randint(0, hi)) for _ in range(k)]
        ops = [rng.choice("+-*") for _ in range(k - 1)]
        ws = [nums[0]]
        for op, num in zip(ops, nums[1:], strict=True):
            ws += [op, num]
        if parens and k >= 3 and rng.random() < 0.5:
            i = 2 * rng.randrange(k - 1)  # wrap operands i/2 .. i/2+1
            ws = ws[:i] + ["("] + ws[i : i + 3] + [")"] + ws[i + 3 :]
        value = evaluate(" ".join(ws))
        if 0 <= value <= MAX_NUMBER and all(_nonneg_subtractions(_parse(ws))):
            return "compute " + " ".join(ws) + " =", str(value)


def _nonneg_subtractions(tree):
    """Yields, for every subtraction node, whether its value is >= 0 (keeps intermediates natural)."""
    if isinstance(tree, str):
        return
    if tree[0] == "-":
        yield _evaluate(tree) >= 0
    for child in tree[1:]:
        yield from _nonneg_subtractions(child)


def _list_task(rng: random.Random, task: str, difficulty: str) -> tuple[str, str]:
    lo, hi, vmax = _LISTS[difficulty]
    xs = [rng.randint(0, vmax) for _ in range(rng.randint(lo, hi))]
    if task == "reverse":
        return "reverse " + _join(xs) + " =", _join(xs[::-1])
    if task == "sort":
        return "sort " + _join(xs) + " =", _join(sorted(xs))
    value = max(xs) if task == "max" else min(xs)
    return f"{task} of " + _join(xs) + " =", str(value)


def _join(xs) -> str:
    return " ".join(map(str, xs))


def _fit_program(rng: random.Random, difficulty: str) -> str:
    kind = rng.choice(("linear", "square", "scaled")) if difficulty == "hard" else "linear"
    amax, bmax = {"easy": (2, 5), "medium": (4, 9), "hard": (4, 9)}[difficulty]
    a, b = rng.randint(1, amax), rng.randint(0, bmax)
    if kind == "square":
        return "x * x" + (f" + {b}" if b else "")
    if kind == "scaled" and b:
        return f"{max(a, 2)} * ( x + {b} )"
    return ("x" if a == 1 else f"{a} * x") + (f" + {b}" if b else "")


def _fit(rng: random.Random, difficulty: str) -> tuple[str, str, list[list[int]]]:
    shown, total = _FIT[difficulty]
    program = _fit_program(rng, difficulty)
    xs = rng.sample(range(10), total)
    tests = [[x, evaluate(program, x)] for x in xs]
    examples = " , ".join(f"f ( {x} ) = {y}" for x, y in tests[:shown])
    return f"find f : {examples} ; f ( x ) =", program, tests


def _row(rng: random.Random, task: str, difficulty: str) -> dict:
    if task == "arith":
        prompt, answer = _arith(rng, difficulty)
        tests: list[list[int]] = []
    elif task == "fit":
        prompt, answer, tests = _fit(rng, difficulty)
    else:
        prompt, answer = _list_task(rng, task, difficulty)
        tests = []
    return {"prompt": prompt, "task": task, "answer": answer, "tests": tests}


def _check_args(difficulty: str, tasks: Sequence[str]) -> None:
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty {difficulty!r}: expected one of {DIFFICULTIES}")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"tasks {list(tasks)}: expected a non-empty subset of {TASKS}")


def _rows(
    rng: random.Random, n: int, difficulty: str, tasks: Sequence[str], exclude: Collection[str]
) -> list[dict]:
    _check_args(difficulty, tasks)
    exclude = frozenset(" ".join(p.split()) for p in exclude)
    out: list[dict] = []
    for _ in range(1000 + 100 * n):
        if len(out) == n:
            return out
        row = _row(rng, rng.choice(tuple(tasks)), difficulty)
        if row["prompt"] not in exclude:
            out.append(row)
    raise ValueError(f"found only {len(out)} of {n} {difficulty} prompts outside `exclude`")


def make_prompts(
    n: int,
    seed: int = 0,
    difficulty: str = "easy",
    tasks: Sequence[str] = TASKS,
    exclude: Collection[str] = (),
) -> list[dict]:
    """``n`` prompt rows ``{"prompt", "task", "answer", "tests"}`` (see the module docstring).

    Args:
      n: number of rows.
      seed: RNG seed (Python ``random.Random``, deterministic on every platform).
      difficulty: ``"easy"`` (2-operand arithmetic, lists of 3 digits, ``fit`` of ``a*x+b`` with
        a <= 2 from 2 shown of 4 tests), ``"medium"`` (3 operands with precedence, lists of 4-5
        numbers <= 19, a <= 4, 2 shown of 5 tests) or ``"hard"`` (3-4 operands with parentheses,
        lists of 5-7 numbers <= 49, also ``x*x+b`` and ``a*(x+b)``, 3 shown of 6 tests).
      tasks: task names drawn uniformly per row.
      exclude: prompts to skip (for example the SFT prompts, for a held-out set); duplicates within
        the result are allowed (the easy space is small: about 60% of 5000 easy prompts are distinct).
    """
    return _rows(random.Random(f"verifiable-prompts:{difficulty}:{seed}"), n, difficulty, tasks, exclude)


def _wrong_answer(rng: random.Random, row: dict) -> str:
    """A plausible wrong answer to ``row`` (a typical mistake for its task); guaranteed to fail."""
    task, answer = row["task"], row["answer"]
    for _ in range(100):
        if task == "arith":
            ws = row["prompt"].split()[1:-1]
            left_to_right = _left_to_right(ws)
            if left_to_right != int(answer) and 0 <= left_to_right <= MAX_NUMBER and rng.random() < 0.5:
                cand = str(left_to_right)
            else:
                cand = str(min(MAX_NUMBER, max(0, int(answer) + rng.choice((-2, -1, 1, 2)))))
        elif task in ("reverse", "sort"):
            xs = row["prompt"].split()[1:-1]
            r = rng.random()
            if r < 0.4:
                cand = " ".join(xs)  # copied the input
            elif r < 0.7:
                cand = " ".join(sorted(xs, key=int, reverse=task == "sort"))  # wrong order
            else:
                ys = answer.split()
                i = rng.randrange(len(ys))
                ys[i] = str(min(MAX_NUMBER, int(ys[i]) + 1))  # one wrong element
                cand = " ".join(ys)
        elif task in ("max", "min"):
            xs = [int(w) for w in row["prompt"].split()[2:-1]]
            r = rng.random()
            if r < 0.5:
                cand = str(min(xs) if task == "max" else max(xs))
            else:
                cand = str(rng.choice(xs) if r < 0.8 else min(MAX_NUMBER, int(answer) + 1))
        else:  # fit: a neighbouring program
            consts = [w for w in answer.split() if w.isdigit()]
            if consts and rng.random() < 0.7:
                target = rng.choice(consts)
                new = str(max(0, int(target) + rng.choice((-1, 1))))
                ws = answer.split()
                ws[ws.index(target)] = new
                cand = " ".join(ws)
            else:
                cand = answer + " + 1"
        if check(row, cand) < 1.0:
            return cand
    raise RuntimeError(f"could not make a wrong answer for {row}")


def _left_to_right(ws: Sequence[str]) -> int:
    """Evaluates an arithmetic prompt left to right, ignoring precedence (a common mistake)."""
    ws = [w for w in ws if w not in "()"]
    value = int(ws[0])
    for op, num in zip(ws[1::2], ws[2::2], strict=True):
        value = value + int(num) if op == "+" else value - int(num) if op == "-" else value * int(num)
    return value


def make_sft_examples(
    n: int,
    seed: int = 0,
    noise: float = 0.0,
    difficulty: str = "easy",
    tasks: Sequence[str] = TASKS,
    exclude: Collection[str] = (),
) -> list[dict]:
    """``n`` SFT rows: ``make_prompts`` rows plus ``completion`` and ``correct``.

    Args:
      noise: fraction in [0, 1] of rows whose completion is a plausible wrong answer (left-to-right
        arithmetic, an off-by-one, the input copied, the other extreme, a neighbouring program), so
        that SFT gives a mediocre policy that RL can improve. Exactly ``round(noise * n)`` rows are
        wrong, at random positions.
      difficulty, tasks, exclude: as in ``make_prompts``.

    Returns:
      ``[{"prompt", "completion", "task", "answer", "tests", "correct"}]``; ``completion`` has no
      leading space here (``write_sft_jsonl`` adds it).
    """
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise={noise}: must be in [0, 1]")
    rng = random.Random(f"verifiable-sft:{difficulty}:{seed}")
    rows = _rows(rng, n, difficulty, tasks, exclude)
    wrong = set(rng.sample(range(n), round(noise * n)))
    for i, row in enumerate(rows):
        row["correct"] = i not in wrong
        row["completion"] = row["answer"] if row["correct"] else _wrong_answer(rng, row)
    return rows


def row_from_prompt(prompt: str) -> dict:
    """Re-derives the row of a prompt of a single-answer task from its text.

    Raises:
      ValueError: for ``fit`` prompts (their hidden tests are not in the prompt) and unknown prompts.
    """
    ws = common.words(prompt)
    if not ws or ws[-1] != "=":
        raise ValueError(f"not a verifiable prompt (must end with '='): {prompt!r}")
    task = ws[0]
    try:
        if task == "compute":
            return {
                "prompt": prompt,
                "task": "arith",
                "answer": str(evaluate(" ".join(ws[1:-1]))),
                "tests": [],
            }
        if task in ("reverse", "sort"):
            xs = [int(w) for w in ws[1:-1]]
            ys = xs[::-1] if task == "reverse" else sorted(xs)
            return {"prompt": prompt, "task": task, "answer": _join(ys), "tests": []}
        if task in ("max", "min") and ws[1] == "of":
            xs = [int(w) for w in ws[2:-1]]
            return {
                "prompt": prompt,
                "task": task,
                "answer": str(max(xs) if task == "max" else min(xs)),
                "tests": [],
            }
    except ValueError as e:
        raise ValueError(f"cannot parse verifiable prompt {prompt!r}: {e}") from None
    if task == "find":
        raise ValueError(f"fit prompt {prompt!r}: its hidden tests are only in the prompt row; pass rows")
    raise ValueError(f"unknown verifiable prompt {prompt!r}")


# ---------------------------------------------------------------------------------------------
# Checker, reward, pass@k
# ---------------------------------------------------------------------------------------------


def check(row: dict, response: str) -> float:
    """Score of ``response`` on ``row`` in [0, 1]; see the module docstring for the answer convention.

    Args:
      row: a prompt row (``task``, ``answer``, and ``tests`` for ``fit``).
      response: decoded response text.

    Returns:
      1.0 / 0.0 for single-answer tasks; for ``fit``, the fraction of ``row["tests"]`` (pairs
      ``[x, y]``) on which the response's expression evaluates to ``y`` (0.0 if it does not parse).
    """
    for key in ("task", "answer"):
        if key not in row:
            raise ValueError(f"verifiable row lacks {key!r} (keys: {sorted(row)})")
    ws = common.response_words(response)
    if row["task"] != "fit":
        return float(ws == common.words(row["answer"]))
    tests = row.get("tests") or []
    if not tests:
        raise ValueError(f"fit row without tests: {row.get('prompt')!r}")
    try:
        tree = _parse(ws)
    except _ParseError:
        return 0.0
    passed = 0
    for x, y in tests:
        try:
            passed += _evaluate(tree, int(x)) == int(y)
        except _ParseError:
            return 0.0
    return passed / len(tests)


def reward(
    prompts: Sequence[str], responses: Sequence[str], rows: Sequence[dict] | None = None
) -> np.ndarray:
    """Programmatic PPO reward (``config.reward.fn = "jaxrlhf.tasks.verifiable:reward"``).

    Args:
      prompts: ``[B]`` decoded prompts.
      responses: ``[B]`` decoded responses.
      rows: ``[B]`` prompt-dataset rows (``answer``/``tests``); when ``None`` the rows are
        re-derived from the prompts (``row_from_prompt``; single-answer tasks only).

    Returns:
      ``float32 [B]``: ``check(row, response)`` per row.
    """
    if len(prompts) != len(responses) or (rows is not None and len(rows) != len(prompts)):
        raise ValueError(
            f"verifiable.reward: {len(prompts)} prompts, {len(responses)} responses, "
            f"{'no' if rows is None else len(rows)} rows"
        )
    if rows is None:
        rows = [row_from_prompt(p) for p in prompts]
    return np.asarray([check(r, y) for r, y in zip(rows, responses, strict=True)], np.float32).reshape(
        len(prompts)
    )


def pass_at_k(n, c, k: int) -> np.ndarray:
    """Unbiased pass@k estimator of Chen et al. (2021), vectorised over problems.

    ``pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n - c + 1}^{n} (1 - k / i)``, computed in
    the numerically stable product form (no large binomials); it is 1 when ``n - c < k``.

    Args:
      n: samples per problem, int or int array ``[P]``.
      c: correct samples per problem, same shape (``0 <= c <= n``).
      k: the k of pass@k (``1 <= k <= min(n)``).

    Returns:
      float64 array of the broadcast shape of ``n`` and ``c`` (``[P]``, or ``[]`` for scalars).

    References:
      Chen et al., "Evaluating Large Language Models Trained on Code", 2021, eq. (1) and Fig. 3.
    """
    n, c = np.broadcast_arrays(np.asarray(n, dtype=np.int64), np.asarray(c, dtype=np.int64))
    if np.any(c < 0) or np.any(c > n):
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got n={n.tolist()}, c={c.tolist()}")
    if k < 1 or (n.size and k > n.min()):
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got k={k}, n={n.tolist()}")
    if n.size == 0:
        return np.zeros(n.shape)
    i = np.arange(1, int(n.max()) + 1, dtype=np.float64)  # [N]
    inside = (i > (n - c)[..., None]) & (i <= n[..., None])  # [..., N]
    terms = np.where(inside, 1.0 - k / i, 1.0)
    return 1.0 - np.prod(terms, axis=-1)


def pass_at_k_from_scores(scores, k: int, threshold: float = 1.0) -> np.ndarray:
    """pass@k per problem from a ``[P, n]`` array of check scores (correct = score >= ``threshold``).

    Returns:
      float64 ``[P]``; average it for the benchmark number.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"pass_at_k_from_scores: scores must be [P, n], got shape {scores.shape}")
    c = (scores >= threshold).sum(axis=1)
    return pass_at_k(np.full_like(c, scores.shape[1]), c, k)


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def write_sft_jsonl(
    path: str | os.PathLike,
    n: int,
    seed: int = 0,
    noise: float = 0.0,
    difficulty: str = "easy",
    tasks: Sequence[str] = TASKS,
) -> int:
    """Writes ``make_sft_examples`` as ``{"prompt", "completion"}`` JSON lines (completion with one
    leading space). Returns the number of rows."""
    rows = make_sft_examples(n, seed, noise, difficulty, tasks)
    return common.write_jsonl(
        path, ({"prompt": r["prompt"], "completion": common.as_completion(r["completion"])} for r in rows)
    )


def write_prompts_jsonl(
    path: str | os.PathLike, n: int, seed: int = 0, difficulty: str = "easy", tasks: Sequence[str] = TASKS
) -> int:
    """Writes ``make_prompts`` rows ``{"prompt", "task", "answer", "tests"}`` as JSON lines."""
    return common.write_jsonl(path, make_prompts(n, seed, difficulty, tasks))
