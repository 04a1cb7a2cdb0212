"""GSM8K checker: the real model solutions' published labels, every reference answer, the answer
forms models write (hand-written expectations), prompt rows through the data pipeline."""

from __future__ import annotations

import importlib.util
import json
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from jaxrlhf import data
from jaxrlhf.tasks import gsm8k

ROOT = Path(__file__).resolve().parents[1]
REAL = Path(__file__).resolve().parents[2] / "shared" / "real"
SAMPLES = ("6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification")


def real(name: str) -> Path:
    path = REAL / name
    if not path.exists():
        pytest.skip(f"real artifact {name} absent: {REAL} (../shared/real) absent")
    return path


def read(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_agrees_with_the_published_labels_of_real_model_solutions():
    """5,276 real GPT-3 solutions (4 per test question) with the paper's is_correct labels."""
    rows = read(real("gsm8k") / "example_model_solutions.jsonl")
    agree = total = 0
    for r in rows:
        ref = {"answer": r["ground_truth"]}  # a worked solution ending in "A: N"
        for key in SAMPLES:
            total += 1
            agree += gsm8k.score(ref, r[key]["solution"]) == float(r[key]["is_correct"])
    assert total == 5276
    assert agree / total >= 0.995, f"{agree}/{total}"


@pytest.mark.parametrize("split", ["train", "test"])
def test_every_reference_answer_scores_one(split):
    rows = read(real("gsm8k") / f"{split}.jsonl")
    final = [r["answer"].split("####")[-1].strip() for r in rows]
    assert np.all(gsm8k.reward([""] * len(rows), [r["answer"] for r in rows], rows) == 1.0)
    prompt_rows = [{"answer": f} for f in final]  # the rows make_prompts writes
    assert np.all(gsm8k.reward([""] * len(rows), [f"#### {f}" for f in final], prompt_rows) == 1.0)
    # A neighbouring number is wrong.
    wrong = [f"The answer is {int(f.replace(',', '')) + 1}." for f in final]
    assert np.all(gsm8k.reward([""] * len(rows), wrong, prompt_rows) == 0.0)


@pytest.mark.parametrize(
    "response, expected",
    [
        ("She makes 9 * 2 = $18 every day.\n#### 18", 18),
        ("#### 1,234,567", 1234567),
        ("so the total is 70,000 dollars.\n#### $70,000.00", 70000),
        ("The answer is 42.", 42),
        ("The final answer is: $1,200.50", Fraction(240100, 200)),
        ("Thus x = 7.\nA: 7", 7),
        ("Answer: -5", -5),
        ("The temperature drops to −3 degrees.", -3),
        (r"So the result is $\boxed{18}$.", 18),
        (r"\boxed{\frac{3}{4}}", Fraction(3, 4)),
        (r"\boxed{\dfrac{10}{4}}", Fraction(5, 2)),
        ("The answer is 7/2", Fraction(7, 2)),
        ("It is 18.0", 18),
        ("She got 50% of the votes, so 25 votes.", 25),
        ("He runs 3 sprints 3 times, 60 meters each: 540 meters", 540),
        ("0.5 of them", Fraction(1, 2)),
        ("#### 18\n\nQuestion: Tom has 3 apples. How many?\nAnswer: #### 3", 18),  # few-shot continuation cut
        ("The answer is 5.\nQ: next one\nThe answer is 9", 5),
        ("#### 12\nI think the answer is 13", 12),  # #### takes precedence
        (r"\boxed{4} but the answer is 6", 4),  # \boxed before phrases
        ("1,2,3 and then 4", 4),  # a list is not a thousands separator
        ("I don't know.", None),
        ("", None),
    ],
)
def test_extraction_forms(response, expected):
    got = gsm8k.extract_answer(response)
    assert got == (None if expected is None else Fraction(expected))


JUNK = ["\\boxed{", "\\frac{1 ", "\n", "\nQ", "1,", "1/", "A: ", "the ", " "]


@pytest.mark.parametrize("unit", JUNK)
def test_long_degenerate_responses_take_linear_time(unit):
    """RL policies emit long junk: 4x the length must cost about 4x the time, not 16x (each of
    these patterns was quadratic in a first version: seconds to minutes on 20k characters)."""

    def seconds(n):
        start = time.perf_counter()
        gsm8k.extract_answer(unit * n)
        return time.perf_counter() - start

    small = min(seconds(4000) for _ in range(3))
    large = min(seconds(16000) for _ in range(3))
    assert large < 8 * small + 0.05, (small, large)


def test_long_numbers_are_not_read():
    assert gsm8k.extract_answer("7" * 20000) is None  # a 20,000-digit run: no number, no crash
    assert gsm8k.extract_answer("The answer is 7. " + "3" * 5000) == 7


def test_exact_comparison():
    row = {"answer": "18"}
    assert gsm8k.score(row, "#### 18.00") == 1.0
    assert gsm8k.score(row, "#### 36/2") == 1.0
    assert gsm8k.score(row, "#### 18.01") == 0.0
    assert gsm8k.score({"answer": "#### 0.33"}, "1/3") == 0.0  # rounded decimals are not exact
    assert gsm8k.score({"answer": "-4"}, "#### 4") == 0.0


def test_reward_contract():
    rows = [{"answer": "3"}, {"answer": "#### 1,000"}, {"answer": "7"}]
    out = gsm8k.reward(["a", "b", "c"], ["#### 3", "It costs $1,000.", "8"], rows)
    assert out.dtype == np.float32 and out.shape == (3,)
    np.testing.assert_array_equal(out, [1.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="rows"):
        gsm8k.reward(["a"], ["#### 3"], None)
    with pytest.raises(ValueError, match="no numeric answer"):
        gsm8k.reward(["a"], ["#### 3"], [{"answer": "n/a", "question": "q"}])


ROWS = [
    {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3+4=<<3+4=7>>7\n#### 7"},
    {"question": "A pen costs $2. What do 5 cost?", "answer": "5*2=<<5*2=10>>10\n#### 10"},
    {"question": "What is 6 times 7?", "answer": "6*7=<<6*7=42>>42\n#### 42"},
]


def test_plain_prompts_with_few_shot_examples():
    out = gsm8k.make_prompts(ROWS, template="plain", few_shot=2)
    assert [r["answer"] for r in out] == ["7", "10", "42"]
    # Row 0's examples are rows 1 and 2 (never itself); row 2's are rows 0 and 1.
    assert out[0]["prompt"] == (
        "Question: A pen costs $2. What do 5 cost?\nAnswer: 5*2=10\n#### 10\n\n"
        "Question: What is 6 times 7?\nAnswer: 6*7=42\n#### 42\n\n"
        "Question: Tom has 3 apples and buys 4. How many?\nAnswer:"
    )
    assert out[2]["prompt"].count("Question:") == 3 and out[2]["prompt"].endswith(
        "What is 6 times 7?\nAnswer:"
    )
    assert (
        gsm8k.make_prompts(ROWS[:1])[0]["prompt"]
        == "Question: Tom has 3 apples and buys 4. How many?\nAnswer:"
    )
    with pytest.raises(ValueError, match="few_shot"):
        gsm8k.make_prompts(ROWS, few_shot=4)


def test_chat_prompts_through_the_data_pipeline_with_qwen(tmp_path):
    """CLI -> JSONL -> PromptDataset with the real Qwen2.5 chat template -> rows -> reward."""
    tok = data.load_tokenizer(str(real("tokenizer_qwen2_5_instruct")))
    src = real("gsm8k") / "test.jsonl"
    out = tmp_path / "prompts.jsonl"
    gsm8k.main(["--input", str(src), "--output", str(out), "--template", "chat", "--few_shot", "1",
                "--shots_file", str(real("gsm8k") / "train.jsonl"), "--max_rows", "16"])  # fmt: skip
    cfg = data.default_data_config(path=str(out), max_prompt_length=1024, max_length=1536)
    ds = data.build_dataset(cfg, tok, "prompt")
    assert len(ds) == 16 and ds.schema == "prompt"
    originals = read(src)[:16]
    for i in range(len(ds)):
        row = ds.row(i)
        text = tok.decode(ds.prompt_ids[i])
        assert text.endswith("<|im_start|>assistant\n") and text.count("<|im_start|>user") == 2
        assert originals[row["source_index"]]["question"].strip() in text
        assert gsm8k.reward([text], [originals[row["source_index"]]["answer"]], [row])[0] == 1.0
        assert gsm8k.reward([text], ["#### -1"], [row])[0] == 0.0


def test_config_builds():
    path = ROOT / "configs" / "ppo_gsm8k_qwen.py"
    spec = importlib.util.spec_from_file_location("ppo_gsm8k_qwen", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    assert c.algorithm == "ppo" and c.reward.fn == "jaxrlhf.tasks.gsm8k:reward"
    module, name = c.reward.fn.split(":")
    assert getattr(importlib.import_module(module), name) is gsm8k.reward
