"""Golden checks: the metrics a run logs at its first steps equal an independent computation.

Every run goes through the public API (``jaxrlhf.registry.run`` on a config built with
``jaxrlhf.config_defaults``) from weights written with ``jaxrlhf.models.save_pretrained``; the
expected values come from transformers/PyTorch on the same HF weights and the same rows, tokenised
with the HF tokenizer (no ``jaxrlhf`` code), and plain NumPy for the formulas:

* SFT: token mean of the response tokens' NLL (EOS included, prompt excluded);
* reward model: per-half scores at the last real token, Bradley-Terry loss with the margin column,
  accuracy and margin;
* DPO: with a reference that differs from the policy (the run's step 2 after a resume: policy = the
  step-1 export, reference = the initial weights), chosen/rejected log-probs, conservative-DPO loss,
  NLL term per chosen token, implicit rewards; IPO's value at step 1 and its kernel; SimPO;
* PPO: see ``test_ppo_first_iterations_match_torch``.

Each dataset holds exactly one global batch, so the first batch is the whole file whatever the
shuffle order, and every logged metric (a mean) is order-independent.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from jaxrlhf import config_defaults as d
from jaxrlhf import losses, models, registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHAR_TOK = os.path.join(ROOT, "tests", "fixtures", "tokenizers", "char_pad_eos")
pytestmark = pytest.mark.torch


def _need(module: str):
    """Imports ``module``; without it the test skips, or fails in CI (the test extra brings it)."""
    try:
        return __import__(module)
    except ImportError:
        msg = f"{module} is not installed (pip install -e '.[test]' brings it)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


torch = _need("torch")
transformers = _need("transformers")
torch.set_grad_enabled(False)


# ---------------------------------------------------------------------------------------------
# Independent side: HF tokenizer + transformers on the saved weights, NumPy formulas.
# ---------------------------------------------------------------------------------------------
def save_tiny(path, *, seed: int, head=None, vocab_size: int = 256) -> str:
    model = models.init("llama", seed=seed, head=head, **dict(d.TINY_LLAMA, vocab_size=vocab_size))
    models.save_pretrained(model, str(path))
    return str(path)


def torch_lm(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()


def torch_scorer(path):
    return transformers.AutoModelForSequenceClassification.from_pretrained(
        path, torch_dtype=torch.float32
    ).eval()


def encode(tok, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """(prompt ids with the tokenizer's start tokens, response ids + EOS), as docs/data.md states."""
    p = tok(prompt)["input_ids"]
    r = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return p, r


def response_logps(model, prompt_ids, response_ids) -> np.ndarray:
    """log p(response token | everything before it), one value per response token (float64)."""
    ids = torch.tensor([prompt_ids + response_ids])
    logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    n = len(prompt_ids)
    targets = ids[0, n:]
    return logp[n - 1 : -1].gather(-1, targets[:, None])[:, 0].numpy()


def last_score(scorer, ids) -> float:
    """The scalar head at the last token of the unpadded sequence."""
    return float(scorer(torch.tensor([ids])).logits[0, 0])


def log_sigmoid(x):
    return -np.logaddexp(0.0, -np.asarray(x, np.float64))


# ---------------------------------------------------------------------------------------------
# Runs through the public API.
# ---------------------------------------------------------------------------------------------
SFT_ROWS = [
    {"prompt": "say hi:", "completion": " hi there"},
    {"prompt": "a much longer prompt here:", "completion": " ok"},
    {"prompt": "q:", "completion": " a rather long answer with many tokens in it"},
    {"prompt": "count:", "completion": " one two three"},
]
PREF_ROWS = [
    {"prompt": "which is best?", "chosen": " the first", "rejected": " none of them at all", "margin": 1.5},
    {"prompt": "q:", "chosen": " a long and careful answer", "rejected": " no", "margin": 0.25},
    {"prompt": "tell me more about it:", "chosen": " sure", "rejected": " go away", "margin": 0.0},
    {"prompt": "x?", "chosen": " y and z", "rejected": " w", "margin": 2.0},
]


def write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def offline_config(algorithm: str, model_path: str, data_path: str, n_rows: int):
    """One global batch = the whole file; one compile (fixed length); float32 throughout."""
    c = d.base(algorithm)
    c.model = d.model(path=model_path)
    c.model.dtype = "float32"
    c.tokenizer = CHAR_TOK
    c.data = d.data(path=data_path, max_prompt_length=32, max_length=96)
    c.batch_size = n_rows
    c.total_steps = 1
    c.pad_to_multiple_of = 96  # every row padded: a score read at the padding would differ
    c.optim = d.optim(lr=1e-2, warmup_steps=0, schedule="constant")
    c.log_every = 1
    c.checkpoint.every = 1
    c.checkpoint.async_save = False
    c.export_hf = False
    c.mesh = dict(data=1, fsdp=1, tensor=1)
    c.progress_bar = False
    return c


@pytest.fixture(scope="module")
def char_tok():
    return transformers.AutoTokenizer.from_pretrained(CHAR_TOK)


@pytest.fixture(scope="module")
def w0(tmp_path_factory):
    """The initial LM weights every offline run starts from."""
    return save_tiny(tmp_path_factory.mktemp("w0"), seed=3)


def close(got, want, name, rtol=2e-5, atol=2e-6):
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=name)


# ---------------------------------------------------------------------------------------------
# SFT
# ---------------------------------------------------------------------------------------------
def test_sft_first_step_nll_is_the_response_token_mean(w0, char_tok, tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS)
    result = registry.run(offline_config("sft", w0, data, len(SFT_ROWS)), str(tmp_path / "run"))
    lm = torch_lm(w0)
    per_token = [response_logps(lm, *encode(char_tok, r["prompt"], r["completion"])) for r in SFT_ROWS]
    want = -np.sum(np.concatenate(per_token)) / sum(len(x) for x in per_token)
    per_row_mean = -np.mean([np.mean(x) for x in per_token])
    assert abs(want - per_row_mean) > 1e-3  # the batch distinguishes token mean from row mean
    close(result["history"][0]["nll"], want, "nll")
    close(result["history"][0]["loss"], want, "loss")


# ---------------------------------------------------------------------------------------------
# Reward model
# ---------------------------------------------------------------------------------------------
def test_reward_first_step_scores_margin_loss_and_accuracy(char_tok, tmp_path):
    w = save_tiny(tmp_path / "rm0", seed=5, head="scalar")
    data = write_jsonl(tmp_path / "pref.jsonl", PREF_ROWS)
    c = offline_config("reward", w, data, len(PREF_ROWS))
    c.bradley_terry.use_margin = True
    result = registry.run(c, str(tmp_path / "run"))
    scorer = torch_scorer(w)
    rc, rr = [], []
    for r in PREF_ROWS:
        p, ch = encode(char_tok, r["prompt"], r["chosen"])
        _, rj = encode(char_tok, r["prompt"], r["rejected"])
        rc.append(last_score(scorer, p + ch))
        rr.append(last_score(scorer, p + rj))
    rc, rr = np.array(rc), np.array(rr)
    m = np.array([r["margin"] for r in PREF_ROWS])
    got = result["history"][0]
    assert 0 < np.mean(rc > rr) < 1 or np.all(rc != rr)
    close(got["reward_chosen"], np.mean(rc), "reward_chosen", atol=1e-5)
    close(got["reward_rejected"], np.mean(rr), "reward_rejected", atol=1e-5)
    close(got["margin"], np.mean(rc - rr), "margin", atol=1e-5)
    close(got["accuracy"], np.mean(rc > rr), "accuracy")
    close(got["bt_loss"], np.mean(-log_sigmoid(rc - rr - m)), "bt_loss", atol=1e-5)


# ---------------------------------------------------------------------------------------------
# DPO family
# ---------------------------------------------------------------------------------------------
def pair_logps(lm, tok, rows):
    """Per-pair summed response log-probs and chosen token counts under ``lm``."""
    c, r, n = [], [], []
    for row in rows:
        p, ch = encode(tok, row["prompt"], row["chosen"])
        _, rj = encode(tok, row["prompt"], row["rejected"])
        c.append(response_logps(lm, p, ch).sum())
        r.append(response_logps(lm, p, rj).sum())
        n.append(len(ch))
    return np.array(c), np.array(r), np.array(n)


def two_step_dpo(config, workdir, tmp_path):
    """Step 1, its export (the policy of step 2), then a resumed step 2 whose reference is still
    the initial weights: the step-2 metrics compare a policy and a reference that differ."""
    config.export_hf = True
    registry.run(config, str(workdir))
    policy = str(tmp_path / "w1")
    shutil.copytree(os.path.join(workdir, "hf"), policy)
    config.total_steps = 2
    result = registry.run(config, str(workdir))
    assert result["step"] == 2 and len(result["history"]) == 1  # resumed: only step 2 ran
    return policy, result["history"][-1]


def test_dpo_step_two_conservative_loss_nll_and_rewards_with_a_moved_policy(w0, char_tok, tmp_path):
    beta, eps, nll_coef = 0.1, 0.2, 0.5
    data = write_jsonl(tmp_path / "pref.jsonl", PREF_ROWS)
    c = offline_config("dpo", w0, data, len(PREF_ROWS))
    c.dpo = d.dpo(beta=beta, label_smoothing=eps, loss_type="sigmoid", nll_coef=nll_coef)
    policy, got = two_step_dpo(c, tmp_path / "run", tmp_path)
    pc, pr, n_chosen = pair_logps(torch_lm(policy), char_tok, PREF_ROWS)
    rc0, rr0, _ = pair_logps(torch_lm(w0), char_tok, PREF_ROWS)
    assert np.max(np.abs(pc - rc0)) > 1e-2  # the policy moved away from the reference
    h = beta * ((pc - rc0) - (pr - rr0))
    dpo = np.mean(-(1 - eps) * log_sigmoid(h) - eps * log_sigmoid(-h))  # Mitchell 2023, cDPO
    nll = -np.sum(pc) / np.sum(n_chosen)  # per chosen token, not per pair
    close(got["logps/chosen"], np.mean(pc), "logps/chosen", rtol=1e-5)
    close(got["logps/rejected"], np.mean(pr), "logps/rejected", rtol=1e-5)
    close(got["rewards/chosen"], np.mean(beta * (pc - rc0)), "rewards/chosen", atol=2e-5)
    close(got["rewards/rejected"], np.mean(beta * (pr - rr0)), "rewards/rejected", atol=2e-5)
    close(got["rewards/margin"], np.mean(h), "rewards/margin", atol=2e-5)
    close(got["rewards/accuracy"], np.mean(h > 0), "rewards/accuracy")
    close(got["dpo_loss"], dpo, "dpo_loss", atol=2e-5)
    close(got["chosen_nll"], nll, "chosen_nll", rtol=1e-5)
    close(got["loss"], dpo + nll_coef * nll, "loss", rtol=1e-5)

    # IPO (Azar et al. 2023) and the kernel's cDPO on the same log-probs, against the formulas.
    ipo = losses.dpo_loss(pc, pr, rc0, rr0, beta=beta, loss_type="ipo")
    close(np.asarray(ipo), (h / beta - 1 / (2 * beta)) ** 2, "ipo kernel", rtol=1e-5)
    sig = losses.dpo_loss(pc, pr, rc0, rr0, beta=beta, label_smoothing=eps, loss_type="sigmoid")
    close(np.mean(np.asarray(sig)), dpo, "cdpo kernel", atol=2e-5)


def test_ipo_first_step_is_its_value_at_equal_policy_and_reference(w0, tmp_path):
    beta = 0.25
    data = write_jsonl(tmp_path / "pref.jsonl", PREF_ROWS)
    c = offline_config("dpo", w0, data, len(PREF_ROWS))
    c.dpo = d.dpo(beta=beta, loss_type="ipo")
    got = registry.run(c, str(tmp_path / "run"))["history"][0]
    close(got["dpo_loss"], (1 / (2 * beta)) ** 2, "ipo at step 1")  # (0 - 1/(2 beta))^2


def test_simpo_first_step_is_length_normalised(w0, char_tok, tmp_path):
    beta, gamma = 2.0, 0.5
    data = write_jsonl(tmp_path / "pref.jsonl", PREF_ROWS)
    c = offline_config("simpo", w0, data, len(PREF_ROWS))
    c.simpo = d.simpo(beta=beta, gamma=gamma, nll_coef=0.0)
    got = registry.run(c, str(tmp_path / "run"))["history"][0]
    lm = torch_lm(w0)
    lc, lr = [], []
    for row in PREF_ROWS:
        p, ch = encode(char_tok, row["prompt"], row["chosen"])
        _, rj = encode(char_tok, row["prompt"], row["rejected"])
        lc.append(response_logps(lm, p, ch).mean())
        lr.append(response_logps(lm, p, rj).mean())
    lc, lr = np.array(lc), np.array(lr)
    want = np.mean(-log_sigmoid(beta * lc - beta * lr - gamma))  # Meng et al. 2024, eq. 6
    close(got["simpo_loss"], want, "simpo_loss", atol=2e-5)
    close(got["rewards/margin"], np.mean(beta * (lc - lr)), "rewards/margin", atol=2e-5)
