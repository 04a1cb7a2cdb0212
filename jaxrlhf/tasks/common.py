"""Helpers shared by the embedded tasks: word splitting, response cleaning, JSONL files, pairs.

Texts in the embedded tasks are lower-case words and symbols separated by single spaces, so that
the word-level tokenizer (``jaxrlhf.tasks.tokenizer``) round-trips them exactly. ``words`` splits a
text the same way the tokenizer's ``Whitespace`` pre-tokenizer does (``\\w+|[^\\w\\s]+``), except
that the special tokens ``<pad> <bos> <eos> <unk>`` stay whole.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)

_WORD_RE = re.compile(r"<(?:pad|bos|eos|unk)>|\w+|[^\w\s]+")


def words(text: str) -> list[str]:
    """Splits ``text`` into words like the tokenizer's pre-tokenizer (special tokens kept whole)."""
    return _WORD_RE.findall(text.lower())


def response_words(text: str) -> list[str]:
    """The words of a decoded response up to its first ``<eos>`` (or its end).

    This is the precise answer convention of every embedded task: the response is cut at its first
    ``<eos>``; ``<pad>`` and ``<bos>`` are dropped wherever they are; ``<unk>`` is kept (it never
    matches an answer and counts as degenerate for the sentiment scorer). Responses decoded with
    ``skip_special_tokens=True`` carry no ``<eos>`` and are taken whole.
    """
    out = []
    for w in words(text):
        if w == EOS:
            break
        if w not in (PAD, BOS):
            out.append(w)
    return out


def clean_response(text: str) -> str:
    """``response_words(text)`` joined by single spaces."""
    return " ".join(response_words(text))


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> int:
    """Writes ``rows`` as JSON lines (UTF-8, one object a line); creates parent dirs. Returns the count."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Reads a JSON-lines file into a list of dicts (blank lines skipped)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def as_completion(text: str) -> str:
    """A completion/chosen/rejected string as written to files: one leading space, single-spaced.

    The leading space makes ``prompt + completion`` the full text whether a pipeline joins the two
    with or without a separator; the word-level tokenizer ignores repeated whitespace either way.
    """
    return " " + " ".join(text.split())


def write_preference_jsonl(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> int:
    """Writes preference pairs ``{"prompt", "chosen", "rejected"[, "margin"]}`` as JSON lines.

    Args:
      path: output file.
      rows: dicts with string ``prompt``, ``chosen`` and ``rejected`` (any other keys are dropped,
        except a numeric ``margin``). ``chosen``/``rejected`` are written with one leading space
        (see ``as_completion``).

    Returns:
      The number of rows written.

    Raises:
      ValueError: naming the row index and key when a field is missing or not a string, or when
        chosen == rejected.
    """

    def _rows():
        for i, row in enumerate(rows):
            out = {}
            for key in ("prompt", "chosen", "rejected"):
                if key not in row:
                    raise ValueError(f"preference row {i}: missing key {key!r} (keys: {sorted(row)})")
                if not isinstance(row[key], str):
                    raise ValueError(f"preference row {i}: {key!r} must be a string, got {type(row[key])}")
                out[key] = " ".join(row[key].split()) if key == "prompt" else as_completion(row[key])
            if out["chosen"] == out["rejected"]:
                raise ValueError(f"preference row {i}: chosen == rejected ({out['chosen']!r})")
            if "margin" in row and row["margin"] is not None:
                out["margin"] = float(row["margin"])
            yield out

    return write_jsonl(path, _rows())


def best_worst_pairs(
    prompts: Sequence[str],
    samples: Sequence[Sequence[str]],
    scores: np.ndarray | Sequence[Sequence[float]],
    min_gap: float = 0.0,
    with_margin: bool = False,
) -> list[dict[str, Any]]:
    """Preference pairs as in the DPO paper: chosen = best-scored sample, rejected = worst.

    Args:
      prompts: ``[P]`` prompt strings.
      samples: ``[P][k]`` completions sampled for each prompt (k >= 2).
      scores: ``[P, k]`` gold scores of ``samples``.
      min_gap: pairs whose best-minus-worst score is ``<= min_gap`` are skipped, as are pairs whose
        best and worst texts are equal.
      with_margin: also store ``margin = best - worst``.

    Returns:
      A list of ``{"prompt", "chosen", "rejected"[, "margin"]}`` dicts (ties resolved by first index).
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape[0] != len(prompts) or len(samples) != len(prompts):
        raise ValueError(
            f"best_worst_pairs: {len(prompts)} prompts, {len(samples)} sample lists, scores {scores.shape}"
        )
    pairs = []
    for i, (prompt, texts) in enumerate(zip(prompts, samples, strict=True)):
        if len(texts) != scores.shape[1] or len(texts) < 2:
            raise ValueError(f"best_worst_pairs: prompt {i} has {len(texts)} samples, scores {scores.shape}")
        hi, lo = int(np.argmax(scores[i])), int(np.argmin(scores[i]))
        gap = float(scores[i, hi] - scores[i, lo])
        if gap <= min_gap or clean_response(texts[hi]) == clean_response(texts[lo]):
            continue
        row = {"prompt": prompt, "chosen": clean_response(texts[hi]), "rejected": clean_response(texts[lo])}
        if with_margin:
            row["margin"] = gap
        pairs.append(row)
    return pairs
