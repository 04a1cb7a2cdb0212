"""Degeneracy statistics of a set of review responses: is a policy's gain from writing positive reviews,
or from degenerate strings? (issue 17; reported per policy by every evaluation that scores reviews.)

For responses ``r_i`` (words up to the first ``<eos>``, ``common.response_words``) to prompts ``p_i``:

- ``repeat_3gram_frac``: mean over responses of the fraction of the response's word 3-grams that
  repeat an earlier 3-gram of the same response (0 for responses shorter than 3 words);
- ``distinct_2``: distinct word bigrams / all word bigrams, pooled over the set (distinct-n of
  Li et al., 2016, "A Diversity-Promoting Objective Function for Neural Conversation Models");
- ``out_of_grammar_frac``: (unlicensed sentiment words + ``<unk>`` tokens) / words, pooled, where a
  word's licence is judged in context (``prompt + response``, as ``reviews.gold_details`` does);
- ``off_grammar_bigram_frac``: bigrams the grammar never writes (``reviews.grammar_bigrams``) /
  bigrams, pooled, the bigram joining prompt and response included;
- ``off_grammar_trigram_frac``: the same for trigrams of word classes
  (``reviews.grammar_class_trigrams``), the two trigrams that span the join included;
- ``mean_length``: mean response length in words;
- ``frac_positive``: fraction of scores > 0.5;
- ``score_hist``: counts of the scores in ``bins`` equal bins on [0, 1] (the last bin closed).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

import jaxrlhf.tasks.common as common
import jaxrlhf.tasks.reviews as reviews

HIST_BINS = 10
REVIEWS_REWARD = "jaxrlhf.tasks.reviews:reward"
"""The ``config.reward.fn`` of the reviews gold scorer: evaluations judged by it report ``row_fields``."""


def repeat_3gram_frac(ws: Sequence[str]) -> float:
    """Fraction of the 3-grams of ``ws`` that repeat an earlier one (0.0 under 3 words)."""
    grams = [tuple(ws[i : i + 3]) for i in range(len(ws) - 2)]
    return (len(grams) - len(set(grams))) / len(grams) if grams else 0.0


def _grammar_counts(prompt: str, response: str) -> tuple[int, ...]:
    """Out-of-grammar words, off-grammar bigrams, bigrams, off-grammar class trigrams, trigrams of
    ``response`` read after ``prompt`` (the counts of the whole text less those of the prompt alone)."""
    pw, rw = common.response_words(prompt), common.response_words(response)
    whole = reviews.gold_details(" ".join(pw + rw))
    alone = reviews.gold_details(" ".join(pw))

    def diff(*keys: str) -> int:
        return sum(whole[k] for k in keys) - sum(alone[k] for k in keys)

    def n_grams(n: int, start: int) -> int:  # a text of L words (and a start marker) has L + start - n + 1
        return max(len(pw) + len(rw) + start - n + 1, 0) - max(len(pw) + start - n + 1, 0)

    return (
        diff("n_unlicensed", "n_unk"),
        diff("n_bigrams_off_grammar"),
        n_grams(2, 0),
        diff("n_trigrams_off_grammar"),
        n_grams(3, 1),  # class trigrams start at "<s>"
    )


def score_histogram(scores: np.ndarray, bins: int = HIST_BINS) -> list[int]:
    """Counts of ``scores`` in ``bins`` equal bins on [0, 1] (``np.histogram``: the last bin is closed)."""
    counts, _ = np.histogram(np.clip(scores, 0.0, 1.0), bins=bins, range=(0.0, 1.0))
    return [int(c) for c in counts]


def degeneracy_stats(
    responses: Sequence[str],
    prompts: Sequence[str] | None = None,
    scores: Sequence[float] | np.ndarray | None = None,
    bins: int = HIST_BINS,
) -> dict[str, Any]:
    """The statistics of the module docstring for ``responses [N]``.

    Args:
      responses: ``[N]`` decoded responses (cut at their first ``<eos>``).
      prompts: ``[N]`` their prompts (licences and the joining bigram are judged in context); ``None``
        reads each response alone.
      scores: ``[N]`` gold scores; ``None`` computes ``reviews.reward(prompts, responses)``.
      bins: histogram bins on [0, 1].

    Returns:
      ``{"n", "repeat_3gram_frac", "distinct_2", "out_of_grammar_frac", "off_grammar_bigram_frac",
      "off_grammar_trigram_frac", "mean_length", "frac_positive", "score_hist"}`` (floats; ``n`` and
      the ``[bins]`` counts ints).
    """
    prompts = [""] * len(responses) if prompts is None else list(prompts)
    if len(prompts) != len(responses):
        raise ValueError(f"degeneracy_stats: {len(prompts)} prompts but {len(responses)} responses")
    scores = reviews.reward(prompts, responses) if scores is None else np.asarray(scores, np.float64)
    if scores.shape != (len(responses),):
        raise ValueError(f"degeneracy_stats: scores of shape {scores.shape}, expected ({len(responses)},)")
    words = [common.response_words(r) for r in responses]
    bigrams = [pair for ws in words for pair in zip(ws, ws[1:], strict=False)]
    counts = [_grammar_counts(p, r) for p, r in zip(prompts, responses, strict=True)]
    bad_words, bad_bi, n_bi, bad_tri, n_tri = (sum(c[k] for c in counts) for k in range(5))
    n_words = sum(len(ws) for ws in words)
    n = len(responses)
    return {
        "n": n,
        "repeat_3gram_frac": float(np.mean([repeat_3gram_frac(ws) for ws in words])) if n else 0.0,
        "distinct_2": len(set(bigrams)) / len(bigrams) if bigrams else 0.0,
        "out_of_grammar_frac": bad_words / n_words if n_words else 0.0,
        "off_grammar_bigram_frac": bad_bi / n_bi if n_bi else 0.0,
        "off_grammar_trigram_frac": bad_tri / n_tri if n_tri else 0.0,
        "mean_length": n_words / n if n else 0.0,
        "frac_positive": float(np.mean(scores > 0.5)) if n else 0.0,
        "score_hist": score_histogram(scores, bins),
    }


def row_fields(prompts: Sequence[str], responses: Sequence[str], scores) -> dict[str, float | int]:
    """``degeneracy_stats`` as the flat numeric fields of an evaluation row (``quickstart.compare_policies``,
    ``evaluate.evaluate``): ``frac_positive``, ``repeat_3gram_frac``, ``distinct_2``,
    ``out_of_grammar_frac``, ``off_grammar_bigram_frac``, ``off_grammar_trigram_frac``,
    ``response_words`` (mean length in words; the rows' ``response_length`` counts tokens, EOS
    included) and ``score_hist_0`` .. ``score_hist_9`` (the number of scores in [b/10, (b+1)/10), the
    last bin closed)."""
    st = degeneracy_stats(responses, prompts, scores)
    keys = ("frac_positive", "repeat_3gram_frac", "distinct_2", "out_of_grammar_frac")
    return {
        **{k: st[k] for k in keys},
        "off_grammar_bigram_frac": st["off_grammar_bigram_frac"],
        "off_grammar_trigram_frac": st["off_grammar_trigram_frac"],
        "response_words": st["mean_length"],
        **{f"score_hist_{b}": c for b, c in enumerate(st["score_hist"])},
    }
