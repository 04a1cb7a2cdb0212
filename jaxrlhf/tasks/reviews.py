"""Synthetic reviews: a stand-in for the IMDb controlled-sentiment task of the DPO paper.

A seeded generator writes short review-like texts (10-40 words) from a small grammar: subjects
("the movie", "the acting", ...), copulas, positive / negative / neutral adjectives, verbs and
nouns, intensifiers ("very", "really", ...), negations ("not", "never", "hardly") and connectives
("and", "but", "although"). Prompts are review openings (the first 2-5 words, as the DPO paper
uses IMDb prefixes). A deterministic gold scorer (``gold_score``) plays the human labeller / the
sentiment classifier, and ``reward`` exposes it as a programmatic PPO reward.

Texts are lower-case words and punctuation separated by single spaces
("i thought the acting was really good . the plot was not boring ."), so the shared word-level
tokenizer (``build_tokenizer`` / ``tokenizer_path``) round-trips them exactly.

Gold score (``gold_score``), computed on the words of the text (see ``jaxrlhf.tasks.common.words``).
It is built so that a policy cannot win with degenerate text (issue 17): the score is a function of
the *mean* clause verdict (length as such earns nothing), each clause's verdict saturates, and text
outside the grammar pays in the logit.

1. The text is cut at its first ``<eos>``; ``<pad>``/``<bos>`` are ignored.
2. *Clauses* end at "." "," ";" "but" "although", and at "and" unless it joins an adjective to the
   clause ("the plot was great and funny"). Negation and intensifier scope also ends at "and".
3. Every *sentiment word* (adjective, verb or noun in ``LEXICON``, polarity ``p`` in [-2, 2]) gets
   ``c = p * m * n * d`` where
   - ``m``: one intensifier's worth: the multiplier (``INTENSIFIERS``: "very" 1.5, "extremely" 2,
     "slightly" 0.5, ...) of the intensifier nearest before the word, met since the previous
     sentiment word in the clause; every further intensifier of that run is *stacked*;
   - ``n``: negation: each negation word ("not" -0.8, "never" -0.9, "hardly" -0.6) met since the
     previous sentiment word in the same clause multiplies by its factor, so a negation flips
     (and damps) the *next* sentiment word only ("not bad" = +0.8, "not very good" = -1.2);
   - ``d = 0.5 ** (j - 1)`` for the j-th counted occurrence of the same word in the text.
   A sentiment word counts only when it is *licensed*: the nearest preceding word that is not an
   intensifier, negation or adverb must be a word that can grammatically introduce it (a copula or
   article for adjectives and nouns, a subject or auxiliary for verbs; ``LICENSORS``), and it must be
   the clause's first sentiment word, or its second joined by "and" (no lists of three or more).
4. A clause's verdict is ``v = tanh(sum_k c_(k) * 0.5 ** (k - 1))`` over its contributions sorted by
   magnitude (diminishing returns across the different words of a clause; ``|v| < 1``). The text's
   verdict ``V`` is the mean of ``v`` over the clauses with a counted sentiment word, weighted 1.5
   after "but" (the contrast carries the verdict), 0.5 after "although" (a concession), 1 otherwise;
   ``V = 0`` when there is none.
5. Degenerate text is penalised in the logit, ``0.5`` per unlicensed sentiment word, stacked
   intensifier, ``<unk>``, and per *off-grammar* item, that is anything the generator never writes:
   a word bigram (``grammar_bigrams``: the 3 546 bigrams of 20 000 generated reviews,
   ``assets/review_bigrams.txt``), a trigram of word classes (``grammar_class_trigrams``:
   adjectives, verbs, nouns, intensifiers and negations replaced by their class, the start of the
   text marked ``<s>``; the 1 115 trigrams of 60 000 reviews, ``assets/review_class_trigrams.txt``),
   a connective beyond the first of a sentence (run-on), a verb beyond one in a clause
   (``FINITE_VERBS``), a noun after an adjective without an article ("was dark story"); plus
   ``4 * r`` where ``r`` is the fraction of word 3-grams that repeat an earlier 3-gram of the text.
6. ``gold_score = sigmoid(SCALE * V - penalty)`` with ``SCALE = 3``, a number in (0, 1); a clean text
   scores at most ``sigmoid(3) = 0.953``.

Generated reviews keep their verdicts (2 000 per class, seed 123: 97.5 % of positive ones score
> 0.5, 97.3 % of negative ones < 0.5, mixed ones have median 0.50), and the issue-17 gaming strings
("the movie was great and excellent and ... and perfect .", stacked intensifiers, repeated clauses,
"the X was great ." spam, word salads) score below the median positive review (0.904); a beam search over
the vocabulary (``jaxrlhf.tasks.gold_search``) finds grammatical positive reviews as the maximum.
Hand-checked values are in ``tests/test_tasks.py``, ``tests/test_gold_scorer.py`` and
``docs/tasks.md``.
"""

from __future__ import annotations

import functools
import math
import os
import random
from collections.abc import Collection, Sequence

import numpy as np

import jaxrlhf.tasks.common as common
from jaxrlhf.tasks.common import UNK, best_worst_pairs, write_preference_jsonl

__all__ = [
    "best_worst_pairs", "generate_reviews", "gold_details", "gold_score", "gold_scores",
    "make_sft_examples", "review_prompts", "reward", "vocabulary", "write_preference_jsonl",
    "write_prompts_jsonl", "write_sft_jsonl",
]  # fmt: skip

# ---------------------------------------------------------------------------------------------
# Vocabulary and lexicon
# ---------------------------------------------------------------------------------------------

SUBJECTS_SINGULAR = (
    "the movie", "the film", "this movie", "this film", "the plot", "the acting", "the story",
    "the ending", "the script", "the dialogue", "the soundtrack", "the direction", "the pacing",
    "the cinematography", "the humor", "the cast", "the lead actor", "the villain", "the music",
    "the first half", "the final scene",
)  # fmt: skip
SUBJECTS_PLURAL = (
    "the characters", "the actors", "the effects", "the visuals", "the jokes", "the songs",
    "the performances", "the action scenes",
)  # fmt: skip

POSITIVE_ADJECTIVES = {
    "good": 1.0, "great": 1.5, "excellent": 2.0, "wonderful": 2.0, "brilliant": 2.0, "amazing": 2.0,
    "superb": 2.0, "fantastic": 2.0, "enjoyable": 1.0, "fun": 1.0, "funny": 0.75, "moving": 1.0,
    "beautiful": 1.5, "clever": 1.0, "charming": 1.0, "entertaining": 1.0, "gripping": 1.5,
    "memorable": 1.0, "solid": 0.75, "fine": 0.5, "decent": 0.5, "nice": 0.75, "perfect": 2.0,
    "stunning": 1.5, "delightful": 1.5, "engaging": 1.0, "powerful": 1.0, "fresh": 0.75,
}  # fmt: skip
NEGATIVE_ADJECTIVES = {
    "bad": -1.0, "terrible": -2.0, "awful": -2.0, "boring": -1.5, "dull": -1.0, "weak": -1.0,
    "poor": -1.0, "horrible": -2.0, "dreadful": -2.0, "mediocre": -0.75, "predictable": -0.75,
    "forgettable": -1.0, "tedious": -1.5, "messy": -1.0, "stupid": -1.5, "annoying": -1.0,
    "painful": -1.5, "pointless": -1.5, "lazy": -1.0, "bland": -1.0, "slow": -0.5, "confusing": -1.0,
    "disappointing": -1.5, "clumsy": -1.0, "flat": -0.75, "cheap": -0.75,
}  # fmt: skip
NEUTRAL_ADJECTIVES = (
    "long", "short", "new", "old", "simple", "typical", "quiet", "dark", "serious", "familiar",
    "ordinary", "modern", "loud", "different", "unusual",
)  # fmt: skip

# (past, base) -> polarity; "recommend" and "avoid" are used with auxiliaries only.
POSITIVE_VERBS = {
    ("loved", "love"): 1.5, ("enjoyed", "enjoy"): 1.0, ("liked", "like"): 0.75,
    ("adored", "adore"): 2.0, ("admired", "admire"): 1.0, ("appreciated", "appreciate"): 1.0,
}  # fmt: skip
NEGATIVE_VERBS = {
    ("hated", "hate"): -1.5, ("disliked", "dislike"): -1.0, ("despised", "despise"): -2.0,
    ("resented", "resent"): -1.0,
}  # fmt: skip
NEUTRAL_VERBS = (
    ("watched", "watch"), ("saw", "see"), ("noticed", "notice"), ("remembered", "remember"),
    ("expected", "expect"), ("rented", "rent"), ("discussed", "discuss"),
)  # fmt: skip
AUX_VERBS = {"recommend": 1.0, "avoid": -1.5}

POSITIVE_NOUNS = {"masterpiece": 2.0, "gem": 1.5, "triumph": 1.5, "classic": 1.0, "delight": 1.5}
NEGATIVE_NOUNS = {"disaster": -2.0, "mess": -1.5, "waste": -1.5, "failure": -1.5, "letdown": -1.5}
NEUTRAL_NOUNS = ("film", "movie", "story", "experience", "drama", "comedy", "thriller", "sequel", "remake")

INTENSIFIERS = {
    "very": 1.5, "really": 1.5, "truly": 1.5, "so": 1.5, "quite": 1.25, "pretty": 1.25,
    "extremely": 2.0, "incredibly": 2.0, "absolutely": 2.0, "highly": 1.5,
    "absolute": 2.0, "complete": 1.5, "total": 1.5, "true": 1.5, "real": 1.5,
    "somewhat": 0.5, "slightly": 0.5, "fairly": 0.75, "rather": 0.75,
}  # fmt: skip
ADJ_INTENSIFIERS = ("very", "really", "truly", "so", "quite", "pretty", "extremely", "incredibly",
                    "somewhat", "slightly", "fairly", "rather")  # fmt: skip
VERB_INTENSIFIERS = ("really", "truly", "absolutely")
NOUN_INTENSIFIERS = ("absolute", "complete", "total", "true", "real")
NEGATIONS = {"not": -0.8, "never": -0.9, "hardly": -0.6}
CONNECTIVES = ("and", "but", "although")
CLAUSE_WEIGHTS = {"but": 1.5, "although": 0.5}
BOUNDARIES = frozenset({".", ",", ";", "and", "but", "although"})

ADJECTIVES = {**POSITIVE_ADJECTIVES, **NEGATIVE_ADJECTIVES, "worth": 1.0}
VERBS = {
    **{w: p for (past, base), p in {**POSITIVE_VERBS, **NEGATIVE_VERBS}.items() for w in (past, base)},
    **AUX_VERBS,
}
NOUNS = {**POSITIVE_NOUNS, **NEGATIVE_NOUNS}
LEXICON: dict[str, float] = {**ADJECTIVES, **VERBS, **NOUNS}
"""Every sentiment word and its polarity in [-2, 2]."""

PRONOUNS = ("i", "we", "everyone", "my friends", "my family")
COPULAS_SINGULAR = ("was", "is")
COPULAS_PLURAL = ("were", "are")
PERCEPTION_VERBS = ("felt", "seemed", "looked")
OPENERS = (
    "i thought", "i think", "honestly", "in my opinion", "to be honest", "overall", "i have to say",
    "i felt that", "for me", "i must say",
)  # fmt: skip
NEUTRAL_CLAUSES = (
    "i watched it last week", "i saw it with my family", "i watched it on a friday night",
    "the film is about a young detective", "the story follows two brothers",
    "it runs for about two hours", "it was released last year", "i went in with no expectations",
    "the director also wrote the script", "it is based on a novel", "i rented it on a whim",
    "my friends recommended it to me", "i saw it in the cinema", "it is the second film in the series",
    "the movie is set in a small town", "we watched it at home",
)  # fmt: skip

_ADVERBS = frozenset({"also", "still", "just", "even", "only", "both"})
LICENSORS = {
    "adjective": frozenset(COPULAS_SINGULAR + COPULAS_PLURAL + PERCEPTION_VERBS + ("a", "an", "be", "and")),
    "noun": frozenset({"a", "an"}),
    "verb": frozenset(
        {"i", "we", "everyone", "friends", "family", "they", "you", "did", "would", "will", "should", "to"}
    ),
}
"""Words that may directly precede (skipping intensifiers, negations, adverbs) a sentiment word."""

SCALE = 3.0  # logit per unit of mean clause verdict (a verdict of +-1 gives 0.953 / 0.047)
WORD_DECAY = 0.5  # k-th strongest sentiment word of a clause counts WORD_DECAY ** (k - 1)
REPEAT_DECAY = 0.5  # j-th occurrence of the same sentiment word in the text counts REPEAT_DECAY ** (j - 1)
UNLICENSED_PENALTY = 0.5
STACKED_PENALTY = 0.5
OFF_GRAMMAR_PENALTY = 0.5  # per word bigram and per class trigram the grammar never produces
BIGRAM_REVIEWS = 20_000  # reviews of seed 0 whose bigrams define the grammar's (10 000 miss 1 of 3 546)
TRIGRAM_REVIEWS = 60_000  # reviews of seed 0 whose class trigrams define the grammar's (20 000 miss 10)
_ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
BIGRAMS_PATH = os.path.join(_ASSETS, "review_bigrams.txt")
TRIGRAMS_PATH = os.path.join(_ASSETS, "review_class_trigrams.txt")
UNK_PENALTY = 0.5
REPEAT_PENALTY = 4.0
SENTIMENTS = ("positive", "negative", "mixed")


def _pos_of(word: str) -> str:
    if word in ADJECTIVES:
        return "adjective"
    if word in NOUNS:
        return "noun"
    return "verb"


def vocabulary() -> list[str]:
    """All words the review grammar can produce, sorted (deterministic)."""
    pieces: list[str] = [
        *SUBJECTS_SINGULAR, *SUBJECTS_PLURAL, *LEXICON, *NEUTRAL_ADJECTIVES, *NEUTRAL_NOUNS,
        *(w for pair in NEUTRAL_VERBS for w in pair), *INTENSIFIERS, *NEGATIONS, *CONNECTIVES, *PRONOUNS,
        *COPULAS_SINGULAR, *COPULAS_PLURAL, *PERCEPTION_VERBS, *OPENERS, *NEUTRAL_CLAUSES, *_ADVERBS,
        *(w for ws in LICENSORS.values() for w in ws), "it", "a", "an", "did", "would", "should", "you",
        "watching", "the", "money", "time", "of", "this", ".", ",", ";",
    ]  # fmt: skip
    return sorted({w for piece in pieces for w in piece.split()})


# ---------------------------------------------------------------------------------------------
# Generator
# ---------------------------------------------------------------------------------------------


def _article(next_word: str) -> str:
    return "an" if next_word[0] in "aeiou" else "a"


def _pick_polar(rng: random.Random, table: dict, sign: int):
    keys = [k for k, p in table.items() if (p > 0) == (sign > 0)]
    return keys[rng.randrange(len(keys))]


def _copula_clause(rng: random.Random, s: int, opener: bool) -> list[str]:
    plural = rng.random() < 0.3
    subj = rng.choice(SUBJECTS_PLURAL if plural else SUBJECTS_SINGULAR).split()
    out = rng.choice(OPENERS).split() if opener else []
    negate = s != 0 and rng.random() < 0.25
    if s == 0:
        adj = rng.choice(NEUTRAL_ADJECTIVES)
    else:
        adj = _pick_polar(rng, POSITIVE_ADJECTIVES | NEGATIVE_ADJECTIVES, -s if negate else s)
    intens = [rng.choice(ADJ_INTENSIFIERS)] if rng.random() < 0.35 else []
    if rng.random() < 0.7:  # be-copula: negation after it
        cop = rng.choice(COPULAS_PLURAL if plural else COPULAS_SINGULAR)
        out += subj + [cop] + ([rng.choice(tuple(NEGATIONS))] if negate else []) + intens + [adj]
    else:  # perception verb: negation before it ("never felt boring")
        neg = [rng.choice(("never", "hardly"))] if negate else []
        out += subj + neg + [rng.choice(PERCEPTION_VERBS)] + intens + [adj]
    if rng.random() < 0.2:
        second = (
            rng.choice(NEUTRAL_ADJECTIVES)
            if s == 0
            else _pick_polar(rng, POSITIVE_ADJECTIVES | NEGATIVE_ADJECTIVES, s)
        )
        if second != adj:
            out += ["and", second]
    return out


def _verb_clause(rng: random.Random, s: int) -> list[str]:
    out = rng.choice(PRONOUNS).split()
    obj = rng.choice(SUBJECTS_SINGULAR + SUBJECTS_PLURAL).split()
    if s == 0:
        past, _ = rng.choice(NEUTRAL_VERBS)
        return out + [past] + obj
    negate = rng.random() < 0.25
    past, base = _pick_polar(rng, POSITIVE_VERBS | NEGATIVE_VERBS, -s if negate else s)
    if negate:
        out += ["did", "not", base] if rng.random() < 0.5 else [rng.choice(("never", "hardly")), past]
    else:
        out += ([rng.choice(VERB_INTENSIFIERS)] if rng.random() < 0.3 else []) + [past]
    return out + obj


def _noun_clause(rng: random.Random, s: int) -> list[str]:
    out = (
        ["it", rng.choice(COPULAS_SINGULAR)]
        if rng.random() < 0.5
        else ["this", rng.choice(NEUTRAL_NOUNS), "is"]
    )
    if s == 0:
        noun = rng.choice(NEUTRAL_NOUNS)
        adj = rng.choice(NEUTRAL_ADJECTIVES)
        return out + [_article(adj), adj, noun]
    negate = rng.random() < 0.25
    neg = ["not"] if negate else []
    sign = -s if negate else s
    if rng.random() < 0.5:  # "a total disaster"
        noun = _pick_polar(rng, NOUNS, sign)
        intens = [rng.choice(NOUN_INTENSIFIERS)] if rng.random() < 0.4 else []
        first = (intens or [noun])[0]
        return out + neg + [_article(first)] + intens + [noun]
    adj = _pick_polar(rng, POSITIVE_ADJECTIVES | NEGATIVE_ADJECTIVES, sign)  # "a really good film"
    intens = [rng.choice([w for w in ADJ_INTENSIFIERS if w != "so"])] if rng.random() < 0.3 else []
    first = (intens or [adj])[0]
    return out + neg + [_article(first)] + intens + [adj, rng.choice(NEUTRAL_NOUNS)]


def _recommend_clause(rng: random.Random, s: int) -> list[str]:
    if s > 0:
        return rng.choice(
            (["i", "would", "recommend", "it"], ["i", "would", "highly", "recommend", "it"],
             ["it", "was", "worth", "watching"], ["you", "should", "not", "avoid", "it"])
        )  # fmt: skip
    return rng.choice(
        (["i", "would", "not", "recommend", "it"], ["i", "would", "never", "recommend", "it"],
         ["you", "should", "avoid", "it"], ["it", "was", "not", "worth", "watching"])
    )  # fmt: skip


def _clause(rng: random.Random, s: int, first: bool) -> list[str]:
    if s == 0:
        r = rng.random()
        if r < 0.5:
            return rng.choice(NEUTRAL_CLAUSES).split()
        if r < 0.75:
            return _copula_clause(rng, 0, first and rng.random() < 0.4)
        return _verb_clause(rng, 0) if r < 0.9 else _noun_clause(rng, 0)
    r = rng.random()
    if r < 0.45:
        return _copula_clause(rng, s, first and rng.random() < 0.4)
    if r < 0.7:
        return _verb_clause(rng, s)
    if r < 0.9:
        return _noun_clause(rng, s)
    return _recommend_clause(rng, s)


def _sentence(rng: random.Random, target: int, first: bool) -> list[str]:
    """One sentence ending in '.', overall polarity ``target`` in {+1, -1, 0}."""
    if target == 0:  # mixed review sentence: any polarity, sometimes contrasted
        s = rng.choice((1, -1, 0, 0))
    else:
        s = target if rng.random() < 0.8 else 0
    r = rng.random()
    if s != 0 and r < 0.2:  # contrast: "<other> but <s>" / "<s> although <other>"
        other = -s if rng.random() < 0.7 else 0
        if rng.random() < 0.5:
            out = _clause(rng, other, first) + ["but"] + _clause(rng, s, False)
        else:
            out = _clause(rng, s, first) + ["although"] + _clause(rng, other, False)
    elif r < 0.35:
        out = _clause(rng, s, first) + ["and"] + _clause(rng, s if target else rng.choice((1, -1, 0)), False)
    else:
        out = _clause(rng, s, first)
    return out + ["."]


def _review(rng: random.Random, sentiment: str, min_words: int = 10, max_words: int = 40) -> list[str]:
    """Sentences appended until a drawn target length is reached, never exceeding ``max_words``."""
    target = {"positive": 1, "negative": -1, "mixed": 0}[sentiment]
    for _ in range(1000):
        length = rng.randint(min_words, max_words)
        out: list[str] = []
        for _ in range(100):
            sent = _sentence(rng, target, first=not out)
            if len(out) + len(sent) <= max_words:
                out += sent
            if len(out) >= length or (len(out) >= min_words and len(out) + 4 > max_words):
                break
        if min_words <= len(out) <= max_words:
            return out
    raise ValueError(f"could not write a review of {min_words}..{max_words} words; widen the bounds")


def _mix(sentiment_mix) -> list[float]:
    if isinstance(sentiment_mix, str):
        if sentiment_mix not in SENTIMENTS:
            raise ValueError(f"sentiment_mix {sentiment_mix!r}: expected one of {SENTIMENTS} or 3 weights")
        return [float(s == sentiment_mix) for s in SENTIMENTS]
    if isinstance(sentiment_mix, dict):
        unknown = set(sentiment_mix) - set(SENTIMENTS)
        if unknown:
            raise ValueError(f"sentiment_mix: unknown keys {sorted(unknown)}; expected {SENTIMENTS}")
        weights = [float(sentiment_mix.get(s, 0.0)) for s in SENTIMENTS]
    else:
        weights = [float(w) for w in sentiment_mix]
    if len(weights) != 3 or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(
            f"sentiment_mix {sentiment_mix!r}: need 3 non-negative weights (positive, negative, mixed)"
        )
    return weights


def generate_reviews(
    n: int,
    seed: int = 0,
    sentiment_mix=(0.4, 0.4, 0.2),
    min_words: int = 10,
    max_words: int = 40,
    return_sentiments: bool = False,
):
    """Generates ``n`` synthetic reviews, deterministically from ``seed``.

    Args:
      n: number of reviews.
      seed: RNG seed (Python ``random.Random``; same seed, same texts on every platform).
      sentiment_mix: weights of (positive, negative, mixed) reviews: a 3-sequence, a dict keyed by
        those names, or one name. Positive/negative reviews mostly use words of their polarity (and
        negated words of the other: "not bad"), with some neutral or contrasted clauses; mixed
        reviews mix both polarities and neutral sentences.
      min_words, max_words: length bounds in words (punctuation counts as a word).
      return_sentiments: also return the intended sentiment of each review.

    Returns:
      ``list[str]`` of ``n`` single-spaced lower-case texts ending in ".", or
      ``(texts, sentiments)`` when ``return_sentiments``.
    """
    if max_words < min_words or min_words < 4:
        raise ValueError(f"generate_reviews: need 4 <= min_words <= max_words, got {min_words}, {max_words}")
    weights = _mix(sentiment_mix)
    rng = random.Random(f"reviews:{seed}")
    texts, kinds = [], []
    for _ in range(n):
        kind = rng.choices(SENTIMENTS, weights)[0]
        texts.append(" ".join(_review(rng, kind, min_words, max_words)))
        kinds.append(kind)
    return (texts, kinds) if return_sentiments else texts


def _split_opening(rng: random.Random, text: str, min_prompt: int, max_prompt: int) -> tuple[str, str]:
    ws = text.split()
    first_end = ws.index(".") if "." in ws else len(ws)
    m = max(1, min(rng.randint(min_prompt, max_prompt), first_end - 1))
    return " ".join(ws[:m]), " ".join(ws[m:])


def make_sft_examples(
    n: int, seed: int = 0, sentiment_mix=(0.4, 0.4, 0.2), min_prompt: int = 2, max_prompt: int = 5
) -> list[dict]:
    """``n`` prompt/completion pairs: a review's opening (2-5 words, inside its first sentence) and the rest.

    Returns:
      ``[{"prompt": str, "completion": str}]``; ``prompt + " " + completion`` is the whole review.
    """
    texts = generate_reviews(n, seed, sentiment_mix)
    rng = random.Random(f"reviews-split:{seed}")
    out = []
    for t in texts:
        p, c = _split_opening(rng, t, min_prompt, max_prompt)
        out.append({"prompt": p, "completion": c})
    return out


def review_prompts(
    n: int,
    seed: int = 0,
    min_words: int = 2,
    max_words: int = 5,
    sentiment_mix=(0.4, 0.4, 0.2),
    exclude: Collection[str] = (),
) -> list[str]:
    """``n`` review openings: the first ``min_words..max_words`` words of generated reviews.

    An opening never reaches the end of the review's first sentence (so it never ends in "."). Uses a
    different stream than ``generate_reviews(n, seed)``, so prompts are not the openings of the SFT
    reviews of the same seed. Openings in ``exclude`` (for example the SFT prompts) are skipped, which
    makes a held-out prompt set; duplicates within the result are allowed.
    """
    weights = _mix(sentiment_mix)
    exclude = frozenset(" ".join(p.split()) for p in exclude)
    rng = random.Random(f"reviews:prompts:{seed}")
    split_rng = random.Random(f"reviews-prompts:{seed}")
    out: list[str] = []
    for _ in range(1000 + 100 * n):
        if len(out) == n:
            break
        review = " ".join(_review(rng, rng.choices(SENTIMENTS, weights)[0]))
        prompt = _split_opening(split_rng, review, min_words, max_words)[0]
        if prompt not in exclude:
            out.append(prompt)
    if len(out) < n:
        raise ValueError(f"review_prompts: found only {len(out)} of {n} openings outside `exclude`")
    return out


# ---------------------------------------------------------------------------------------------
# Gold scorer
# ---------------------------------------------------------------------------------------------


def _word_classes() -> dict[str, str]:
    """Content words -> their class (ADJ, VPAST, VBASE, NS sentiment noun, N noun, INT, NEG); every other
    word is its own class."""
    out = {w: "ADJ" for w in (*POSITIVE_ADJECTIVES, *NEGATIVE_ADJECTIVES, *NEUTRAL_ADJECTIVES)}
    for past, base in (*POSITIVE_VERBS, *NEGATIVE_VERBS, *NEUTRAL_VERBS):
        out[past], out[base] = "VPAST", "VBASE"
    out.update({w: "VBASE" for w in AUX_VERBS})
    out.update({w: "NS" for w in NOUNS})
    out.update({s.split()[-1]: "N" for s in SUBJECTS_SINGULAR + SUBJECTS_PLURAL})
    out.update({w: "N" for w in NEUTRAL_NOUNS})
    out.update({w: "INT" for w in INTENSIFIERS})
    out.update({w: "NEG" for w in NEGATIONS})
    return out


WORD_CLASSES = _word_classes()


def _class_trigrams(ws: Sequence[str]) -> list[tuple[str, str, str]]:
    """The class trigrams of ``<s> ws`` (``<s>`` marks the start of the text: a review starts as one)."""
    cs = ["<s>"] + [WORD_CLASSES.get(w, w) for w in ws]
    return list(zip(cs, cs[1:], cs[2:], strict=False))


FINITE_VERBS = frozenset(
    {*COPULAS_SINGULAR, *COPULAS_PLURAL, "seemed", "looked", "did", "would", "should"}
    | {w for w, c in WORD_CLASSES.items() if c == "VPAST"}
)
"""Verbs a clause holds one of ("felt" is left out: the opener "i felt that" precedes a clause's verb)."""


def build_class_trigrams(n: int = TRIGRAM_REVIEWS, seed: int = 0) -> frozenset[tuple[str, str, str]]:
    """Every trigram of word classes (``WORD_CLASSES``) in ``generate_reviews(n, seed)``: the grammar's
    sentence structure ("the N was ADJ", never "ADJ N is ADJ N is"; ``<s>`` marks the start). 1 115
    trigrams; 20 000 fresh reviews of another seed have none outside the set."""
    out: set[tuple[str, str, str]] = set()
    for text in generate_reviews(n, seed):
        out.update(_class_trigrams(text.split()))
    return frozenset(out)


def build_grammar_bigrams(n: int = BIGRAM_REVIEWS, seed: int = 0) -> frozenset[tuple[str, str]]:
    """Every word bigram of ``generate_reviews(n, seed)`` (default mix): the grammar's bigrams.

    The set is closed well before ``n = 20 000`` (3 546 bigrams; 300 000 reviews of another seed add
    none and 20 000 fresh reviews contain no bigram outside it).
    """
    out: set[tuple[str, str]] = set()
    for text in generate_reviews(n, seed):
        ws = text.split()
        out.update(zip(ws, ws[1:], strict=False))
    return frozenset(out)


def write_grammar_ngrams(bigrams_path=BIGRAMS_PATH, trigrams_path=TRIGRAMS_PATH) -> tuple[int, int]:
    """Writes ``build_grammar_bigrams()`` and ``build_class_trigrams()`` as sorted space-separated lines
    (the shipped assets; rerun after changing the grammar); returns the two counts."""
    counts = []
    for path, grams in ((bigrams_path, build_grammar_bigrams()), (trigrams_path, build_class_trigrams())):
        with open(path, "w") as f:
            f.writelines(" ".join(g) + "\n" for g in sorted(grams))
        counts.append(len(grams))
    return counts[0], counts[1]


def _read_ngrams(path: str) -> frozenset[tuple[str, ...]]:
    with open(path) as f:
        return frozenset(tuple(line.split()) for line in f if line.strip())


@functools.cache
def grammar_bigrams() -> frozenset[tuple[str, str]]:
    """The shipped ``assets/review_bigrams.txt`` (``write_grammar_ngrams``), loaded once."""
    return _read_ngrams(BIGRAMS_PATH)


@functools.cache
def grammar_class_trigrams() -> frozenset[tuple[str, str, str]]:
    """The shipped ``assets/review_class_trigrams.txt`` (``write_grammar_ngrams``), loaded once."""
    return _read_ngrams(TRIGRAMS_PATH)


def _skip_modifiers(ws: Sequence[str], j: int, step: int) -> int:
    """The first index from ``j`` (moving by ``step``) that is not an intensifier, negation or adverb."""
    while 0 <= j < len(ws) and (ws[j] in INTENSIFIERS or ws[j] in NEGATIONS or ws[j] in _ADVERBS):
        j += step
    return j


def _licensor(ws: Sequence[str], i: int) -> str | None:
    """The word that introduces the sentiment word ``ws[i]``, or None when the grammar has none."""
    j = _skip_modifiers(ws, i - 1, -1)
    return ws[j] if j >= 0 and ws[j] in LICENSORS[_pos_of(ws[i])] else None


def _coordinates(ws: Sequence[str], i: int) -> bool:
    """Whether the "and" at ``ws[i]`` joins an adjective to its clause ("was great and funny")."""
    j = _skip_modifiers(ws, i + 1, 1)
    return j < len(ws) and (ws[j] in ADJECTIVES or ws[j] in NEUTRAL_ADJECTIVES)


def _licensed_in_clause(licensor: str | None, n_before: int) -> bool:
    """A clause holds one sentiment word, or two joined by "and" ("was great and funny"); no lists."""
    if licensor is None:
        return False
    return n_before == 1 if licensor == "and" else n_before == 0


def _is_verb(ws: Sequence[str], i: int) -> bool:
    """``ws[i]`` is a clause's verb (``FINITE_VERBS``, or "felt" unless in the opener "i felt that")."""
    return ws[i] in FINITE_VERBS or (ws[i] == "felt" and ws[i + 1 : i + 2] != ["that"])


def _is_bare_noun(ws: Sequence[str], i: int) -> bool:
    """``ws[i]`` is a noun after an adjective whose phrase has no article ("the plot was dark story")."""
    if WORD_CLASSES.get(ws[i]) != "N" or i == 0 or WORD_CLASSES.get(ws[i - 1]) != "ADJ":
        return False
    j = _skip_modifiers(ws, i - 2, -1)
    return j < 0 or ws[j] not in ("a", "an")


def _clause_verdict(contribs: Sequence[float]) -> float:
    """``tanh(sum_k c_(k) * WORD_DECAY ** (k - 1))`` over the contributions sorted by magnitude."""
    ordered = sorted(contribs, key=abs, reverse=True)
    return math.tanh(sum(c * WORD_DECAY**k for k, c in enumerate(ordered)))


class _Clauses:
    """Accumulates the contributions of each clause and their ``w``-weighted mean verdict, and counts the
    *run-on* joins (connectives beyond the first in one sentence: the grammar joins at most two clauses)
    and the verbs beyond one in a clause (``FINITE_VERBS``: "we loved the film is great")."""

    def __init__(self) -> None:
        self.weight, self.contribs, self.done = 1.0, [], []
        self.joins, self.run_on, self.verbs, self.extra_verbs = 0, 0, 0, 0

    def verb(self) -> None:
        self.verbs += 1
        self.extra_verbs += self.verbs > 1

    def close(self, boundary: str = ".") -> None:
        """Ends the current clause at ``boundary`` (a word of ``BOUNDARIES``)."""
        if self.contribs:
            self.done.append((self.weight, _clause_verdict(self.contribs)))
        self.weight, self.contribs, self.verbs = CLAUSE_WEIGHTS.get(boundary, 1.0), [], 0
        if boundary in CONNECTIVES:
            self.joins += 1
            self.run_on += self.joins > 1
        elif boundary == ".":
            self.joins = 0

    def mean(self) -> float:
        total = sum(w for w, _ in self.done)
        return sum(w * v for w, v in self.done) / total if total else 0.0


def gold_details(text: str) -> dict[str, float]:
    """The parts of ``gold_score(text)`` (module docstring): ``verdict`` (weighted mean clause verdict
    in [-1, 1]), ``penalty``, ``logit``, ``score``, and the counts ``n_sentiment`` (counted sentiment
    words), ``n_clauses`` (clauses with one), ``n_unlicensed``, ``n_stacked`` (intensifiers beyond one
    per sentiment word), ``n_unk``, ``n_bigrams_off_grammar``, ``n_trigrams_off_grammar`` (class
    trigrams), ``n_run_on`` (connectives beyond the first of a sentence), ``n_extra_verbs`` (verbs beyond
    one in a clause), ``n_bare_nouns`` (a noun after an adjective with no article: "was great film"),
    ``n_words``, ``repeat_frac``."""
    ws = common.response_words(text)
    clauses = _Clauses()
    unlicensed = stacked = unk = n_sent = bare = 0
    mult, n_intens, neg = 1.0, 0, 1.0
    seen: dict[str, int] = {}
    for i, w in enumerate(ws):
        if _is_verb(ws, i):
            clauses.verb()
        bare += _is_bare_noun(ws, i)
        if w in BOUNDARIES:
            if not (w == "and" and _coordinates(ws, i)):
                clauses.close(w)
            mult, n_intens, neg = 1.0, 0, 1.0
        elif w in INTENSIFIERS:
            stacked += n_intens > 0
            mult, n_intens = INTENSIFIERS[w], n_intens + 1  # the nearest intensifier is the one that counts
        elif w in NEGATIONS:
            neg *= NEGATIONS[w]
        elif w in LEXICON:
            if not _licensed_in_clause(_licensor(ws, i), len(clauses.contribs)):
                unlicensed += 1
            else:
                seen[w] = seen.get(w, 0) + 1
                clauses.contribs.append(LEXICON[w] * mult * neg * REPEAT_DECAY ** (seen[w] - 1))
                n_sent += 1
            mult, n_intens, neg = 1.0, 0, 1.0
        elif w == UNK:
            unk += 1
    clauses.close()
    grams = [tuple(ws[i : i + 3]) for i in range(len(ws) - 2)]
    repeat = (len(grams) - len(set(grams))) / len(grams) if grams else 0.0
    allowed, structures = grammar_bigrams(), grammar_class_trigrams()
    off_bigrams = sum(pair not in allowed for pair in zip(ws, ws[1:], strict=False))
    off_trigrams = sum(t not in structures for t in _class_trigrams(ws))
    penalty = (
        UNLICENSED_PENALTY * unlicensed
        + STACKED_PENALTY * stacked
        + UNK_PENALTY * unk
        + OFF_GRAMMAR_PENALTY * (off_bigrams + off_trigrams + clauses.run_on + clauses.extra_verbs + bare)
        + REPEAT_PENALTY * repeat
    )
    verdict = clauses.mean()
    logit = SCALE * verdict - penalty
    return {
        "verdict": verdict,
        "penalty": penalty,
        "logit": logit,
        "score": 1.0 / (1.0 + math.exp(-logit)),
        "n_sentiment": n_sent,
        "n_clauses": len(clauses.done),
        "n_unlicensed": unlicensed,
        "n_stacked": stacked,
        "n_unk": unk,
        "n_bigrams_off_grammar": off_bigrams,
        "n_trigrams_off_grammar": off_trigrams,
        "n_run_on": clauses.run_on,
        "n_extra_verbs": clauses.extra_verbs,
        "n_bare_nouns": bare,
        "n_words": len(ws),
        "repeat_frac": repeat,
    }


def gold_score(text: str) -> float:
    """Deterministic gold sentiment of ``text`` in (0, 1) (> 0.5 positive); see the module docstring."""
    return gold_details(text)["score"]


def gold_scores(texts: Sequence[str]) -> np.ndarray:
    """``gold_score`` of each text: ``float32 [len(texts)]``."""
    return np.asarray([gold_score(t) for t in texts], dtype=np.float32).reshape(len(texts))


def reward(
    prompts: Sequence[str], responses: Sequence[str], rows: Sequence[dict] | None = None
) -> np.ndarray:
    """Programmatic PPO reward (``config.reward.fn = "jaxrlhf.tasks.reviews:reward"``).

    Args:
      prompts: ``[B]`` decoded prompts.
      responses: ``[B]`` decoded responses (cut at their first ``<eos>``; see ``common.response_words``).
      rows: unused (prompt-dataset rows; accepted for the common signature).

    Returns:
      ``float32 [B]``: ``gold_score(prompt + " " + response)``; the prompt is included so that a
      negation in the opening ("the plot was not") applies to the response's first word.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"reviews.reward: {len(prompts)} prompts but {len(responses)} responses")
    texts = [
        " ".join(common.response_words(p) + common.response_words(r))
        for p, r in zip(prompts, responses, strict=True)
    ]
    return gold_scores(texts)


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def write_sft_jsonl(path: str | os.PathLike, n: int, seed: int = 0, sentiment_mix=(0.4, 0.4, 0.2)) -> int:
    """Writes ``make_sft_examples(n, seed)`` as ``{"prompt", "completion"}`` JSON lines.

    Completions carry one leading space (``common.as_completion``). Returns the number of rows.
    """
    rows = make_sft_examples(n, seed, sentiment_mix)
    return common.write_jsonl(
        path, ({"prompt": r["prompt"], "completion": common.as_completion(r["completion"])} for r in rows)
    )


def write_prompts_jsonl(path: str | os.PathLike, n: int, seed: int = 0) -> int:
    """Writes ``review_prompts(n, seed)`` as ``{"prompt"}`` JSON lines (no reference fields: the reward
    is ``reward``). Returns the number of rows."""
    return common.write_jsonl(path, ({"prompt": p} for p in review_prompts(n, seed)))
