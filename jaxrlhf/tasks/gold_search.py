r"""Adversarial search for the strings that maximise the reviews gold scorer, as a policy would.

    python -m jaxrlhf.tasks.gold_search --length 20 --beam 32 [--scorer old]

A policy trained against ``reviews.gold_score`` climbs toward whatever string scores highest. This
searches for it directly over the grammar's vocabulary (``reviews.vocabulary()``):

1. **beam search**: strings of ``length`` words built left to right; every beam string is extended
   by every vocabulary word, the extensions are scored as whole texts and the ``beam`` best distinct
   ones are kept;
2. **hill climbing** from the beam's best string and from natural reviews: single-word substitutions
   at every position, the best improving one taken, until none improves.

The result (the best string, its score and ``gold_details``) shows whether the scorer's maximum is
a natural-looking positive review or a degenerate string (docs/tasks.md lists both searches, on the
scorer before and after issue 17).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence

import jaxrlhf.tasks.reviews as reviews

Scorer = Callable[[str], float]


def beam_search(score: Scorer, vocab: Sequence[str], length: int, beam: int) -> tuple[float, str]:
    """The best ``length``-word string a left-to-right beam of width ``beam`` finds: ``(score, text)``."""
    beams: list[tuple[float, tuple[str, ...]]] = [(0.0, ())]
    for _ in range(length):
        cand = {}
        for _, prefix in beams:
            for w in vocab:
                words = (*prefix, w)
                cand[words] = score(" ".join(words))
        beams = sorted(((s, ws) for ws, s in cand.items()), reverse=True)[:beam]
    best_score, best = beams[0]
    return best_score, " ".join(best)


def hill_climb(score: Scorer, vocab: Sequence[str], text: str, max_sweeps: int = 20) -> tuple[float, str]:
    """Best single-word substitutions of ``text`` until none improves its score: ``(score, text)``."""
    words = text.split()
    current = score(" ".join(words))
    for _ in range(max_sweeps):
        best = (current, None, None)
        for i in range(len(words)):
            for w in vocab:
                trial = words[:i] + [w] + words[i + 1 :]
                s = score(" ".join(trial))
                if s > best[0]:
                    best = (s, i, w)
        if best[1] is None:
            break
        current, words[best[1]] = best[0], best[2]
    return current, " ".join(words)


def natural_starts(length: int, n: int, seed: int = 0) -> list[str]:
    """``n`` positive generated reviews cut or padded (with ".") to exactly ``length`` words."""
    texts = reviews.generate_reviews(n, seed, sentiment_mix="positive", min_words=min(length, 40))
    return [" ".join((t.split() + ["."] * length)[:length]) for t in texts]


def search(score: Scorer, length: int, beam: int, restarts: int = 4) -> dict:
    """Beam search, then hill climbing from its result and from ``restarts`` natural reviews."""
    vocab = reviews.vocabulary()
    found = [beam_search(score, vocab, length, beam)]
    found.append(hill_climb(score, vocab, found[0][1]))
    found += [hill_climb(score, vocab, t) for t in natural_starts(length, restarts)]
    best_score, best = max(found)
    return {"length": length, "beam": beam, "score": best_score, "text": best, "beam_text": found[0][1]}


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=20)
    ap.add_argument("--beam", type=int, default=32)
    ap.add_argument("--restarts", type=int, default=4)
    ap.add_argument("--scorer", default="new", help="'new' (reviews.gold_score) or a module:function path")
    args = ap.parse_args(argv)
    if args.scorer == "new":
        score = reviews.gold_score
    else:
        import importlib

        module, fn = args.scorer.split(":")
        score = getattr(importlib.import_module(module), fn)
    out = search(score, args.length, args.beam, args.restarts)
    out["details"] = reviews.gold_details(out["text"])
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
