"""Embedded tasks: generators, gold scorer, tokenizer round trip, checker, pass@k, rewards, files."""

import importlib
import itertools
import json
import math
import random
from fractions import Fraction

import numpy as np
import pytest

from jaxrlhf.tasks import common, reviews, tokenizer, verifiable
from jaxrlhf.tasks.__main__ import main as tasks_cli

# ---------------------------------------------------------------------------------------------
# Synthetic reviews: generator
# ---------------------------------------------------------------------------------------------


def test_reviews_deterministic_varied_and_in_grammar():
    a = reviews.generate_reviews(300, seed=3)
    assert a == reviews.generate_reviews(300, seed=3)
    b = reviews.generate_reviews(300, seed=4)
    assert a != b and len(set(a) & set(b)) < 5
    assert len(set(a)) >= 295  # varied
    vocab = set(reviews.vocabulary())
    for text in a:
        ws = text.split()
        assert 10 <= len(ws) <= 40, text
        assert text == " ".join(ws) and text == text.lower() and ws[-1] == "."
        assert set(ws) <= vocab, set(ws) - vocab
    # Every review is grammatical for the scorer: no unlicensed sentiment word, no <unk>.
    details = [reviews.gold_details(t) for t in a]
    assert all(d["n_unlicensed"] == 0 and d["n_unk"] == 0 for d in details)
    assert np.mean([d["repeat_frac"] for d in details]) < 0.03
    short = reviews.generate_reviews(100, seed=3, min_words=10, max_words=12)
    assert all(10 <= len(t.split()) <= 12 for t in short)


def test_reviews_sentiment_mix_controls_gold_score():
    pos = reviews.gold_scores(reviews.generate_reviews(200, 0, sentiment_mix="positive"))
    neg = reviews.gold_scores(reviews.generate_reviews(200, 0, sentiment_mix={"negative": 1.0}))
    mixed = reviews.gold_scores(reviews.generate_reviews(200, 0, sentiment_mix=(0, 0, 1)))
    assert np.median(pos) > 0.85 and np.median(neg) < 0.15
    assert 0.3 < np.median(mixed) < 0.7 and mixed.std() > 0.2  # spread: SFT sees mixed sentiment
    texts, kinds = reviews.generate_reviews(100, 1, return_sentiments=True)
    assert len(texts) == len(kinds) == 100 and set(kinds) == set(reviews.SENTIMENTS)
    with pytest.raises(ValueError, match="sentiment_mix"):
        reviews.generate_reviews(2, 0, sentiment_mix=(1, 0))
    with pytest.raises(ValueError, match="unknown keys"):
        reviews.generate_reviews(2, 0, sentiment_mix={"happy": 1})


def test_review_prompts_and_sft_examples():
    prompts = reviews.review_prompts(300, seed=0)
    assert prompts == reviews.review_prompts(300, seed=0)
    assert prompts != reviews.review_prompts(300, seed=1)
    assert len(set(prompts)) > 150
    assert all(2 <= len(p.split()) <= 5 and "." not in p.split() for p in prompts)
    # Prompts come from another stream than the SFT reviews of the same seed.
    sft = reviews.make_sft_examples(300, seed=0)
    assert [r["prompt"] for r in sft] != prompts
    held_out = reviews.review_prompts(300, seed=9, exclude=[r["prompt"] for r in sft])
    assert not set(held_out) & {r["prompt"] for r in sft} and len(held_out) == 300
    with pytest.raises(ValueError, match="outside `exclude`"):
        reviews.review_prompts(3, seed=0, min_words=1, max_words=1, exclude=reviews.vocabulary())
    full = reviews.generate_reviews(300, seed=0)
    for row, text in zip(sft, full, strict=True):
        assert row["prompt"] + " " + row["completion"] == text
        assert 1 <= len(row["prompt"].split()) <= 5 and row["completion"]


# ---------------------------------------------------------------------------------------------
# Synthetic reviews: gold scorer
# ---------------------------------------------------------------------------------------------


def _sig(z):
    return 1.0 / (1.0 + math.exp(-z))


def test_gold_score_orders_sentiment_negation_and_intensity():
    g = reviews.gold_score
    assert g("the movie was great .") > g("the movie was long .") > g("the movie was awful .")
    assert g("the movie was long .") == pytest.approx(0.5)
    assert g("") == pytest.approx(0.5)
    # Negation flips the next sentiment word and damps it.
    assert g("the movie was not good .") < 0.5 < g("the movie was not bad .")
    assert g("the movie was good .") > g("the movie was not bad .")
    assert g("i did not like the plot") < 0.5 < g("i never hated the plot")
    assert g("i would not recommend it") < 0.5 < g("i would recommend it")
    # The negation's scope ends at the sentiment word it flips and at clause boundaries.
    assert g("the plot was not good and funny .") > g("the plot was not good .")
    verdict = reviews.gold_details("the plot was not . the acting was good .")["verdict"]
    assert verdict == pytest.approx(reviews.gold_details("the acting was good .")["verdict"])
    # Intensifiers and downtoners.
    assert g("the movie was extremely good .") > g("the movie was very good .") > g("the movie was good .")
    assert g("the movie was slightly good .") < g("the movie was good .")
    assert g("the movie was very bad .") < g("the movie was bad .")
    # "but" carries the verdict, "although" concedes.
    assert g("the acting was great but the plot was terrible .") < 0.5
    assert g("the acting was great although the plot was terrible .") > 0.5
    # Exact values from the documented formula: sigmoid(3 * weighted mean of tanh(clause sums)).
    assert g("the movie was very good .") == pytest.approx(_sig(3 * math.tanh(1.5 * 1.0)))
    assert g("the movie was not very good .") == pytest.approx(_sig(3 * math.tanh(-0.8 * 1.5 * 1.0)))
    assert g("the acting was great but the plot was terrible .") == pytest.approx(
        _sig(3 * (math.tanh(1.5) + 1.5 * math.tanh(-2.0)) / 2.5)
    )
    assert g("it was a total disaster") == pytest.approx(_sig(3 * math.tanh(1.5 * -2.0)))


def test_gold_score_penalises_degenerate_text():
    g = reviews.gold_score
    natural = g("the movie was great .")
    assert g("great great great great great great") < 0.05  # unlicensed + repetitive
    assert g("great excellent wonderful superb amazing") < 0.5  # sentiment words without grammar
    assert g("the movie was great great great great great .") < natural
    repeated = " ".join(["the movie was great ."] * 6)
    assert g(repeated) < natural
    d = reviews.gold_details("the movie was great great great great great")
    assert d["n_unlicensed"] == 4 and d["repeat_frac"] == pytest.approx(2 / 6)
    assert d["n_bigrams_off_grammar"] == 4  # "great great" x4: the grammar never writes it
    # Diminishing returns for the same word even when licensed (two clauses, mean verdict).
    d = reviews.gold_details("the plot was great and the acting was great .")
    assert d["verdict"] == pytest.approx((math.tanh(1.5) + math.tanh(0.75)) / 2)
    # <unk> is penalised; everything after the first <eos> is ignored; <pad>/<bos> are dropped.
    assert g("the movie was great . <unk> <unk>") < natural
    assert g("<bos> the movie was great . <eos> terrible terrible terrible") == pytest.approx(natural)
    assert g("the movie was great . <pad> <pad>") == pytest.approx(natural)
    assert g("The Movie was GREAT.") == pytest.approx(natural)  # case and spacing do not matter


def test_reviews_reward_shape_dtype_and_prompt_context():
    prompts = ["the movie was not", "i thought the plot was", "this film"]
    responses = ["good . <eos> <pad>", "great .", ""]
    r = reviews.reward(prompts, responses)
    assert r.shape == (3,) and r.dtype == np.float32
    assert r[0] < 0.5 < r[1] and r[2] == pytest.approx(0.5)
    assert r[1] == pytest.approx(reviews.gold_score("i thought the plot was great ."))
    assert reviews.reward([], []).shape == (0,)
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        reviews.reward(["a", "b"], ["c"])


def test_reward_functions_resolve_from_config_strings():
    for spec in ("jaxrlhf.tasks.reviews:reward", "jaxrlhf.tasks.verifiable:reward"):
        module, name = spec.split(":")
        fn = getattr(importlib.import_module(module), name)
        rows = verifiable.make_prompts(4, seed=0, tasks=("sort",))
        out = fn([r["prompt"] for r in rows], [r["answer"] for r in rows], rows)
        assert out.shape == (4,) and out.dtype == np.float32


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer.tokenizer_path())


def test_tokenizer_special_ids_and_loading(hf_tokenizer):
    tok = hf_tokenizer
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == common.SPECIAL_TOKENS
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.pad_token_id != tok.eos_token_id
    assert len(tok) == len(tokenizer.vocabulary())
    ids = tok("the movie was good").input_ids
    assert ids[0] == tok.bos_token_id and tok.eos_token_id not in ids and tok.unk_token_id not in ids
    assert tok("the movie", add_special_tokens=False).input_ids == ids[1:3]
    assert tok("zebra").input_ids == [1, 3]  # out of vocabulary -> <unk>
    assert tok.decode([*ids, 2, 0, 0]) == "<bos> the movie was good <eos> <pad> <pad>"


def test_tokenizer_round_trips_every_task_text(hf_tokenizer):
    tok = hf_tokenizer
    texts = reviews.generate_reviews(300, seed=5) + reviews.review_prompts(200, seed=5)
    for difficulty in verifiable.DIFFICULTIES:
        for row in verifiable.make_sft_examples(100, seed=5, noise=0.5, difficulty=difficulty):
            texts += [row["prompt"], row["completion"], row["answer"]]
    enc = tok(texts, add_special_tokens=False).input_ids
    for text, ids in zip(texts, enc, strict=True):
        assert tok.unk_token_id not in ids, text
        assert tok.decode(ids) == text
        assert tok.decode([tok.bos_token_id, *ids, tok.eos_token_id], skip_special_tokens=True) == text
    # The tokenized prompt is a prefix of prompt + completion, whichever way they are joined.
    for row in reviews.make_sft_examples(50, seed=6):
        p = tok(row["prompt"]).input_ids
        for joined in (
            row["prompt"] + common.as_completion(row["completion"]),
            row["prompt"] + " " + row["completion"],
        ):
            full = tok(joined).input_ids
            assert full[: len(p)] == p and tok.decode(full[len(p) :]) == row["completion"]


def test_shipped_tokenizer_matches_a_fresh_build(tmp_path):
    built = tokenizer.build_tokenizer(tmp_path / "tok")
    fresh = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    with open(tokenizer.tokenizer_path() + "/tokenizer.json", encoding="utf-8") as f:
        shipped = json.load(f)
    assert fresh["model"]["vocab"] == shipped["model"]["vocab"]
    assert fresh["post_processor"] == shipped["post_processor"]
    assert built.get_vocab() == {w: i for i, w in enumerate(tokenizer.vocabulary())}
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert not config["clean_up_tokenization_spaces"]


# ---------------------------------------------------------------------------------------------
# Verifiable answers
# ---------------------------------------------------------------------------------------------


def test_verifiable_prompts_deterministic_varied_and_solvable():
    for difficulty in verifiable.DIFFICULTIES:
        rows = verifiable.make_prompts(300, seed=1, difficulty=difficulty)
        assert rows == verifiable.make_prompts(300, seed=1, difficulty=difficulty)
        assert rows != verifiable.make_prompts(300, seed=2, difficulty=difficulty)
        assert {r["task"] for r in rows} == set(verifiable.TASKS)
        assert len({r["prompt"] for r in rows}) > 200
        for r in rows:
            assert r["prompt"].endswith(" =") and verifiable.check(r, r["answer"]) == 1.0
            assert all(0 <= int(w) <= verifiable.MAX_NUMBER for w in r["answer"].split() if w.isdigit())
            if r["task"] == "fit":
                assert r["tests"] and all(verifiable.evaluate(r["answer"], x) == y for x, y in r["tests"])
            else:
                assert r["tests"] == [] and verifiable.row_from_prompt(r["prompt"]) == r
    assert verifiable.make_prompts(2, 0, tasks=("max",))[0]["prompt"].startswith("max of ")
    train = {r["prompt"] for r in verifiable.make_sft_examples(2000, seed=0)}
    test = verifiable.make_prompts(500, seed=0, exclude=train)
    assert len(test) == 500 and not {r["prompt"] for r in test} & train
    every_max = {f"max of {a} {b} {c} =" for a in range(10) for b in range(10) for c in range(10)}
    with pytest.raises(ValueError, match="outside `exclude`"):
        verifiable.make_prompts(5, 0, tasks=("max",), exclude=every_max)
    with pytest.raises(ValueError, match="difficulty"):
        verifiable.make_prompts(2, 0, difficulty="trivial")
    with pytest.raises(ValueError, match="tasks"):
        verifiable.make_prompts(2, 0, tasks=("divide",))


def test_verifiable_check_answer_convention():
    row = verifiable.row_from_prompt("compute 3 + 4 * 2 =")
    assert row["answer"] == "11"
    check = verifiable.check
    assert check(row, "11") == 1.0
    assert check(row, "  11 ") == 1.0
    assert check(row, "11 <eos>") == 1.0
    assert check(row, "11 <eos> 7 junk + 3") == 1.0  # anything after the first <eos> is ignored
    assert check(row, "<bos> 11 <pad> <pad>") == 1.0
    assert check(row, "14") == 0.0  # left-to-right evaluation
    assert check(row, "11 5") == 0.0  # extra output before <eos> is wrong
    assert check(row, "") == 0.0 and check(row, "<eos> 11") == 0.0
    assert check(row, "<unk>") == 0.0
    lst = verifiable.row_from_prompt("reverse 3 1 4 =")
    assert check(lst, "4 1 3 <eos> 3") == 1.0 and check(lst, "4 1") == 0.0 and check(lst, "3 1 4") == 0.0
    assert verifiable.row_from_prompt("sort 5 2 9 =")["answer"] == "2 5 9"
    assert verifiable.row_from_prompt("max of 3 8 1 =")["answer"] == "8"
    assert verifiable.row_from_prompt("min of 3 8 1 =")["answer"] == "1"
    with pytest.raises(ValueError, match="must end with"):
        verifiable.row_from_prompt("compute 3 + 4")
    with pytest.raises(ValueError, match="lacks 'answer'"):
        check({"task": "arith"}, "1")


def test_verifiable_check_fit_fraction_of_tests():
    row = {
        "prompt": "find f : f ( 1 ) = 3 , f ( 2 ) = 5 ; f ( x ) =",
        "task": "fit",
        "answer": "2 * x + 1",
        "tests": [[1, 3], [2, 5], [0, 1], [5, 11]],
    }
    check = verifiable.check
    assert check(row, "2 * x + 1 <eos> garbage") == 1.0
    assert check(row, "x + x + 1") == 1.0 and check(row, "( x + 1 ) * 2 - 1") == 1.0  # any equal program
    assert check(row, "x * x - x + 3") == 0.5  # fits the shown examples, fails the hidden ones
    assert check(row, "1") == 0.25
    assert check(row, "- 1 + 2 * ( x + 1 )") == 1.0  # unary minus
    for bad in (
        "",
        "2 * x +",
        "( x + 1",
        "x y",
        "2 x",
        "x ) (",
        "<unk>",
        "( " * 20 + "x" + " )" * 20,
        "x +" * 40 + " 1",
    ):
        assert check(row, bad) == 0.0, bad
    with pytest.raises(ValueError, match="without tests"):
        check({**row, "tests": []}, "x")
    with pytest.raises(ValueError, match="hidden tests"):
        verifiable.row_from_prompt(row["prompt"])
    assert verifiable.evaluate("3 + 4 * 2") == 11 and verifiable.evaluate("( 3 + 4 ) * 2") == 14
    with pytest.raises(ValueError):
        verifiable.evaluate("x + 1")


@pytest.mark.parametrize("difficulty", verifiable.DIFFICULTIES)
def test_verifiable_sft_noise_gives_wrong_answers(difficulty):
    rows = verifiable.make_sft_examples(400, seed=3, noise=0.25, difficulty=difficulty)
    assert rows == verifiable.make_sft_examples(400, seed=3, noise=0.25, difficulty=difficulty)
    wrong = [r for r in rows if not r["correct"]]
    assert len(wrong) == 100
    assert all(verifiable.check(r, r["completion"]) == 1.0 for r in rows if r["correct"])
    assert all(verifiable.check(r, r["completion"]) < 1.0 for r in wrong)
    assert {r["task"] for r in wrong} == set(verifiable.TASKS)
    clean = verifiable.make_sft_examples(50, seed=3, difficulty=difficulty)
    assert all(r["correct"] and r["completion"] == r["answer"] for r in clean)
    with pytest.raises(ValueError, match="noise"):
        verifiable.make_sft_examples(5, noise=1.5)


def test_verifiable_reward_shapes_and_rows():
    rows = verifiable.make_prompts(6, seed=0, difficulty="medium", tasks=("fit", "arith", "sort"))
    prompts = [r["prompt"] for r in rows]
    out = verifiable.reward(prompts, [r["answer"] + " <eos> 1 2" for r in rows], rows)
    assert out.shape == (6,) and out.dtype == np.float32 and np.all(out == 1.0)
    assert np.all(verifiable.reward(prompts, ["<eos>"] * 6, rows) == 0.0)
    single = [r for r in rows if r["task"] != "fit"]
    no_rows = verifiable.reward([r["prompt"] for r in single], [r["answer"] for r in single])
    assert no_rows.dtype == np.float32 and np.all(no_rows == 1.0)
    fit = [r for r in rows if r["task"] == "fit"]
    with pytest.raises(ValueError, match="hidden tests"):
        verifiable.reward([fit[0]["prompt"]], ["x"])
    with pytest.raises(ValueError, match="6 prompts, 6 responses, 2 rows"):
        verifiable.reward(prompts, prompts, rows[:2])


# ---------------------------------------------------------------------------------------------
# pass@k
# ---------------------------------------------------------------------------------------------


def _pass_at_k_brute(n, c, k):
    """Fraction of k-subsets of n samples (c correct) that contain a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_subset_enumeration():
    for n in range(1, 7):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert verifiable.pass_at_k(n, c, k) == pytest.approx(_pass_at_k_brute(n, c, k), abs=1e-12)


def test_pass_at_k_known_values_vectorised_and_stable():
    p = verifiable.pass_at_k
    assert p(10, 3, 5) == pytest.approx(1 - 21 / 252)  # 1 - C(7,5)/C(10,5)
    np.testing.assert_allclose(p([10, 10, 10, 10], [0, 3, 10, 7], 1), [0.0, 0.3, 1.0, 0.7])
    assert p(200, 0, 100) == 0.0 and p(200, 101, 100) == 1.0  # n - c < k
    # Large n: exact rational reference (binomials ~1e58 would overflow a float ratio naively).
    n, c, k = 200, 10, 100
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert p(n, c, k) == pytest.approx(float(exact), rel=1e-12)
    rng = np.random.default_rng(0)
    ns = rng.integers(5, 50, size=64)
    cs = rng.integers(0, ns + 1)
    out = p(ns, cs, 5)
    assert out.shape == (64,) and out.dtype == np.float64
    ref = [1 - math.comb(int(a) - int(b), 5) / math.comb(int(a), 5) for a, b in zip(ns, cs, strict=True)]
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-15)
    scores = np.array([[1.0, 0.0, 0.5, 1.0], [0.0, 0.0, 0.75, 0.0]])
    np.testing.assert_allclose(verifiable.pass_at_k_from_scores(scores, 2), [1 - 1 / 6, 0.0])
    with pytest.raises(ValueError, match="0 <= c <= n"):
        p(5, 6, 1)
    with pytest.raises(ValueError, match="1 <= k <= n"):
        p(5, 1, 6)


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def test_writers_round_trip_and_load_with_datasets(tmp_path):
    n = reviews.write_sft_jsonl(tmp_path / "r_sft.jsonl", 20, seed=0)
    rows = common.read_jsonl(tmp_path / "r_sft.jsonl")
    assert n == 20 and all(set(r) == {"prompt", "completion"} for r in rows)
    assert all(r["completion"].startswith(" ") and not r["completion"].startswith("  ") for r in rows)
    assert [r["prompt"] + r["completion"] for r in rows] == reviews.generate_reviews(20, seed=0)
    reviews.write_prompts_jsonl(tmp_path / "r_prompts.jsonl", 10, seed=0)
    assert [r["prompt"] for r in common.read_jsonl(tmp_path / "r_prompts.jsonl")] == reviews.review_prompts(
        10, 0
    )

    verifiable.write_sft_jsonl(tmp_path / "v_sft.jsonl", 30, seed=0, noise=0.2, difficulty="medium")
    v_sft = common.read_jsonl(tmp_path / "v_sft.jsonl")
    assert all(set(r) == {"prompt", "completion"} for r in v_sft)
    verifiable.write_prompts_jsonl(tmp_path / "v_prompts.jsonl", 40, seed=0, difficulty="medium")
    v_rows = common.read_jsonl(tmp_path / "v_prompts.jsonl")
    assert v_rows == verifiable.make_prompts(40, 0, "medium")

    import datasets

    ds = datasets.load_dataset(
        "json", data_files=str(tmp_path / "v_prompts.jsonl"), split="train", cache_dir=str(tmp_path / "cache")
    )
    loaded = [dict(r) for r in ds]
    assert all(verifiable.check(r, r["answer"]) == 1.0 for r in loaded)
    assert (
        verifiable.reward([r["prompt"] for r in loaded], [r["answer"] for r in loaded], loaded).min() == 1.0
    )


def test_preference_pairs_and_writer(tmp_path):
    prompts = reviews.review_prompts(8, seed=2)
    rng = random.Random(0)
    samples = [
        [" ".join(rng.choice(reviews.generate_reviews(20, i)).split()[2:]) for _ in range(4)]
        for i in range(8)
    ]
    scores = np.stack([reviews.reward([p] * 4, s) for p, s in zip(prompts, samples, strict=True)])
    pairs = common.best_worst_pairs(prompts, samples, scores, with_margin=True)
    assert 0 < len(pairs) <= 8
    for pair in pairs:
        i = prompts.index(pair["prompt"])
        assert pair["chosen"] == samples[i][int(np.argmax(scores[i]))]
        assert pair["margin"] == pytest.approx(scores[i].max() - scores[i].min())
    assert reviews.write_preference_jsonl(tmp_path / "pref.jsonl", pairs) == len(pairs)
    back = common.read_jsonl(tmp_path / "pref.jsonl")
    assert [r["chosen"] for r in back] == [" " + p["chosen"] for p in pairs]
    assert set(back[0]) == {"prompt", "chosen", "rejected", "margin"}
    with pytest.raises(ValueError, match="row 0: missing key 'rejected'"):
        verifiable.write_preference_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "a"}])
    with pytest.raises(ValueError, match="row 1: chosen == rejected"):
        common.write_preference_jsonl(
            tmp_path / "bad.jsonl",
            [
                {"prompt": "p", "chosen": "a", "rejected": "b"},
                {"prompt": "p", "chosen": "a ", "rejected": " a"},
            ],
        )
    ties = common.best_worst_pairs(["p"], [["a", "b"]], [[0.5, 0.5]])
    assert ties == []


def test_cli_writes_files(tmp_path, capsys):
    tasks_cli(
        ["verifiable", "prompts", "--n", "5", "--difficulty", "hard", "--out", str(tmp_path / "p.jsonl")]
    )
    tasks_cli(["reviews", "sft", "--n", "3", "--out", str(tmp_path / "s.jsonl")])
    assert "wrote 5 rows" in capsys.readouterr().out
    assert (
        len(common.read_jsonl(tmp_path / "p.jsonl")) == 5
        and len(common.read_jsonl(tmp_path / "s.jsonl")) == 3
    )
    with pytest.raises(SystemExit):
        tasks_cli(["reviews"])
