"""The reviews gold scorer cannot be gamed (issue 17): gaming strings, verdicts of natural reviews, the
intensifier cap, diminishing returns, no length reward, adversarial search, grammar bigrams."""

import math

import numpy as np
import pytest

from jaxrlhf.tasks import degeneracy, gold_search, reviews

SUBJECTS = ("the movie", "the acting", "the plot", "the story", "the ending", "the script", "the music",
            "the cast", "the dialogue", "the villain")  # fmt: skip
STRONG = ("perfect", "superb", "excellent", "brilliant", "wonderful", "amazing", "fantastic", "stunning",
          "gripping", "beautiful")  # fmt: skip

GAMING = {
    # The two strings of issue 17 (the old scorer gave them 1.000 and 0.998).
    "adjective list": "the movie was great and excellent and wonderful and brilliant and amazing and superb "
    "and fantastic and perfect .",
    "stacked intensifiers": "the movie was absolutely extremely incredibly amazing .",
    "repeated clause": " ".join(["the movie was great ."] * 8),
    "clause spam x10": " ".join(f"{s} was great ." for s in SUBJECTS),
    "word salad": "great excellent wonderful superb amazing perfect brilliant fantastic",
    "salad with grammar words": "was great was excellent a masterpiece a gem i loved i adored was perfect",
    # The old scorer's beam-search maxima (tasks.gold_search on the scorer before issue 17).
    "verb chain": "you adored you adore you loved you love you recommend you enjoyed you enjoy "
    "you appreciated",
    "intensifier salad": "but absolute absolute is pretty excellent absolute absolute songs are brilliant "
    "a amazing",
    # Own designs: stacked noun intensifiers, padding with full stops, the coordinated pair repeated.
    "noun stack": "it was a absolute complete total true real masterpiece",
    "period padding": "the movie was perfect . . . . . . . . . .",
    "coordinated pair repeated": " ".join(["the movie was great and excellent ."] * 4),
    # The new scorer's own 40-word beam-search maximum before run-on sentences paid.
    "run-on chain": "were wonderful and superb but we absolutely adored this thriller is very unusual and "
    "perfect but we watched this thriller but we saw this thriller and we watched the visuals were very "
    "unusual thriller but this thriller although you should",
}


def _sig(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


@pytest.fixture(scope="module")
def natural():
    """2 000 generated reviews per class (seed 123) and their gold scores."""
    out = {}
    for kind in reviews.SENTIMENTS:
        texts = reviews.generate_reviews(2000, seed=123, sentiment_mix=kind)
        out[kind] = (texts, np.asarray([reviews.gold_score(t) for t in texts]))
    return out


@pytest.mark.parametrize("name", sorted(GAMING))
def test_gaming_strings_score_below_the_median_natural_positive_review(natural, name):
    median = float(np.median(natural["positive"][1]))
    assert reviews.gold_score(GAMING[name]) < median, (name, reviews.gold_details(GAMING[name]), median)


def test_natural_reviews_keep_their_verdicts(natural):
    # Measured on this seed: 97.5 % / 97.3 % (the scorer before issue 17: 96.1 % / 95.6 %). The misses
    # are reviews the generator wrote without a polar clause or with a "but" clause of the other sign.
    pos, neg, mixed = (natural[k][1] for k in reviews.SENTIMENTS)
    assert np.mean(pos > 0.5) >= 0.96 and np.mean(neg < 0.5) >= 0.96
    assert 0.45 < np.median(mixed) < 0.55 and mixed.std() > 0.2  # mixed: centred, spread
    assert np.median(pos) > 0.85 and np.median(neg) < 0.15


def test_one_intensifier_per_sentiment_word():
    d1 = reviews.gold_details("the movie was incredibly amazing .")
    d3 = reviews.gold_details("the movie was absolutely extremely incredibly amazing .")
    assert d1["verdict"] == pytest.approx(math.tanh(2.0 * 2.0))  # "incredibly" x2, "amazing" 2
    assert d3["verdict"] == pytest.approx(d1["verdict"])  # stacking adds nothing ...
    assert d3["n_stacked"] == 2 and d3["score"] < d1["score"]  # ... and costs
    # The nearest intensifier is the one that counts: a downtoner next to the word damps it.
    d = reviews.gold_details("the movie was very slightly good .")
    assert d["verdict"] == pytest.approx(math.tanh(0.5 * 1.0)) and d["n_stacked"] == 1


def test_diminishing_returns_across_the_words_of_a_clause():
    g = reviews.gold_details
    assert g("the movie was great and funny .")["verdict"] == pytest.approx(math.tanh(1.5 + 0.5 * 0.75))
    # Sorted by magnitude: the strongest word counts fully whatever the order.
    assert g("the movie was funny and great .")["verdict"] == pytest.approx(math.tanh(1.5 + 0.5 * 0.75))
    assert g("the movie was great and terrible .")["verdict"] == pytest.approx(math.tanh(-2.0 + 0.5 * 1.5))
    # A third coordinated word is a list the grammar never writes: not counted, penalised.
    d = g("the movie was great and funny and perfect .")
    assert d["n_sentiment"] == 2 and d["n_unlicensed"] == 1
    # Two sentiment words in one clause without "and" ("you adored you loved"): the second is not counted.
    d = g("you adored you loved")
    assert d["n_sentiment"] == 1 and d["n_unlicensed"] == 1


def test_sentence_structure_outside_the_grammar_pays():
    # The grammar joins at most two clauses per sentence; "and" before an adjective coordinates instead.
    d = reviews.gold_details("the plot was good but the acting was great but the music was superb .")
    assert d["n_run_on"] == 1 and d["penalty"] == pytest.approx(0.5)
    d = reviews.gold_details("the plot was dark and long and i loved the acting . the music was superb .")
    assert d["n_run_on"] == 0 and d["n_clauses"] == 2
    # One verb per clause; the start of the text is checked too ("were wonderful ..." has no subject).
    d = reviews.gold_details("we absolutely adored this thriller is very unusual .")
    assert d["n_extra_verbs"] == 1 and d["n_run_on"] == 0
    assert reviews.gold_details("i felt that the acting was superb .")["penalty"] == 0  # an opener's verb
    assert reviews.gold_details("were wonderful .")["n_trigrams_off_grammar"] >= 1
    # A noun after an adjective needs an article ("a really good film", not "felt extremely good film").
    d = reviews.gold_details("we watched the visuals . the plot felt extremely good film .")
    assert d["n_bare_nouns"] == 1 and reviews.gold_details("it was a really good film .")["penalty"] == 0


def test_no_reward_for_length():
    review = "the acting was superb and i loved the story ."
    base = reviews.gold_score(review)
    spam = " ".join(f"{s} was great ." for s in SUBJECTS)
    assert reviews.gold_score(review + " " + spam) < base
    assert reviews.gold_score(review + " " + review) < base
    # Neutral clauses neither add nor dilute: the verdict is a mean over the clauses with sentiment.
    padded = review + " i watched it last week . it runs for about two hours ."
    assert reviews.gold_details(padded)["verdict"] == pytest.approx(reviews.gold_details(review)["verdict"])
    # Ten different strong clauses score as two of them: a mean, not a sum.
    two = " ".join(f"{s} was {a} ." for s, a in zip(SUBJECTS[:2], ("perfect", "perfect"), strict=True))
    ten = " ".join(f"{s} was {a} ." for s, a in zip(SUBJECTS, STRONG, strict=True))
    assert reviews.gold_score(ten) <= reviews.gold_score(two.replace("perfect .", "superb .", 1)) + 1e-9
    assert reviews.gold_score(ten) < _sig(3.0)  # the ceiling of any text


def test_no_reward_for_length_on_natural_reviews(natural):
    texts, scores = natural["positive"]
    spam = " ".join(f"{s} was great ." for s in SUBJECTS)
    extended = np.asarray([reviews.gold_score(t + " " + spam) for t in texts[:300]])
    doubled = np.asarray([reviews.gold_score(t + " " + t) for t in texts[:300]])
    assert np.all(extended < scores[:300]) and np.all(doubled < scores[:300])


def test_adversarial_search_finds_a_grammatical_review():
    best, text = gold_search.beam_search(reviews.gold_score, reviews.vocabulary(), length=12, beam=4)
    best, text = gold_search.hill_climb(reviews.gold_score, reviews.vocabulary(), text)
    d = reviews.gold_details(text)
    assert best == pytest.approx(d["score"]) and best > 0.9, text
    assert d["penalty"] == 0 and d["n_unlicensed"] == d["n_stacked"] == 0, text
    assert d["n_bigrams_off_grammar"] == d["n_trigrams_off_grammar"] == 0, text
    assert d["n_run_on"] == d["n_extra_verbs"] == d["n_bare_nouns"] == 0, text


def test_shipped_grammar_ngrams_match_the_generator():
    fresh = reviews.build_grammar_bigrams()
    assert reviews.grammar_bigrams() == fresh
    # The class trigrams take 60 000 reviews (20 s) to build: the first 5 000 are a subset.
    trigrams = reviews.grammar_class_trigrams()
    assert reviews.build_class_trigrams(5000) <= trigrams and len(trigrams) == 1115
    # Closed: reviews of another seed have no bigram or class trigram outside the sets.
    for text in reviews.generate_reviews(2000, seed=99):
        ws = text.split()
        assert set(zip(ws, ws[1:], strict=False)) <= fresh, text
        classes = ["<s>"] + [reviews.WORD_CLASSES.get(w, w) for w in ws]
        assert set(zip(classes, classes[1:], classes[2:], strict=False)) <= trigrams, text


# ---------------------------------------------------------------------------------------------
# Degeneracy statistics
# ---------------------------------------------------------------------------------------------


def test_degeneracy_stats_hand_computed():
    # The last prompt is itself out of the grammar: only the responses' words and bigrams count.
    prompts = ["the movie was", "i think", "it was", "the plot was", "good good it was"]
    responses = ["great . great . great .", "the acting was superb .", "great great", "", "fine ."]
    s = degeneracy.degeneracy_stats(responses, prompts, scores=[0.1, 0.95, 0.5, 0.55, 0.75])
    assert s["n"] == 5
    # 3-grams: r1 has 4, 2 of them repeats ("great . great", ". great ."); the others none.
    assert s["repeat_3gram_frac"] == pytest.approx((2 / 4 + 0 + 0 + 0 + 0) / 5)
    # Bigrams: r1 "great ." x3 ". great" x2; r2 4 distinct; r3 "great great"; r5 "fine .": 8 of 11.
    assert s["distinct_2"] == pytest.approx(8 / 11)
    # Words 6 + 5 + 2 + 0 + 2; unlicensed: r1's 2nd and 3rd "great" (after "."), r3's 2nd "great".
    assert s["out_of_grammar_frac"] == pytest.approx(3 / 15)
    # Bigrams in context (the joining one included): 6 + 5 + 2 + 0 + 2; off the grammar: ". great" x2
    # and "great great".
    assert s["off_grammar_bigram_frac"] == pytest.approx(3 / 15)
    # Class trigrams in context: 6 + 5 + 2 + 0 + 2. Off the grammar: r1 "ADJ . ADJ" x2, ". ADJ ." x2
    # (no sentence starts with an adjective); r3 "it was ADJ" (the grammar writes "it was a ...") and
    # "was ADJ ADJ"; r5 "it was ADJ".
    assert s["off_grammar_trigram_frac"] == pytest.approx(7 / 15)
    assert s["mean_length"] == pytest.approx(15 / 5)
    assert s["frac_positive"] == pytest.approx(3 / 5)  # 0.95, 0.55, 0.75; 0.5 is not positive
    assert s["score_hist"] == [0, 1, 0, 0, 0, 2, 0, 1, 0, 1]
    assert degeneracy.score_histogram(np.asarray([0.0, 1.0, 0.999]), bins=4) == [1, 0, 0, 2]
    with pytest.raises(ValueError, match="2 prompts but 5 responses"):
        degeneracy.degeneracy_stats(responses, prompts[:2])


def test_degeneracy_stats_match_plain_python_counting():
    texts = reviews.generate_reviews(60, seed=4) + ["the movie was great . " * 3, "good good good", "."]
    s = degeneracy.degeneracy_stats(texts)  # no prompts: each response read alone
    toks = [t.split() for t in texts]
    reps = []
    for ws in toks:
        seen, rep, total = set(), 0, 0
        for i in range(len(ws) - 2):
            g = (ws[i], ws[i + 1], ws[i + 2])
            rep += g in seen
            seen.add(g)
            total += 1
        reps.append(rep / total if total else 0.0)
    pairs = [(a, b) for ws in toks for a, b in zip(ws, ws[1:], strict=False)]
    scores = [reviews.gold_score(t) for t in texts]
    assert s["repeat_3gram_frac"] == pytest.approx(sum(reps) / len(reps))
    assert s["distinct_2"] == pytest.approx(len(set(pairs)) / len(pairs))
    assert s["mean_length"] == pytest.approx(sum(map(len, toks)) / len(toks))
    assert s["frac_positive"] == pytest.approx(sum(x > 0.5 for x in scores) / len(scores))
    assert s["score_hist"] == [sum(b / 10 <= x < (b + 1) / 10 for x in scores) for b in range(10)]
    # Generated reviews are in the grammar, and so is the repeated sentence: the only out-of-grammar
    # words are the three "good" of "good good good" (no copula or article introduces them).
    assert s["out_of_grammar_frac"] == pytest.approx(3 / sum(map(len, toks)))
