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
from safetensors.numpy import load_file, save_file

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
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg, allow_module_level=True)


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
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def torch_scorer(path):
    return transformers.AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()


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


# ---------------------------------------------------------------------------------------------
# PPO: two iterations (the second after a resume) against a greedy rollout redone in PyTorch.
# ---------------------------------------------------------------------------------------------
REVIEW_TOK = os.path.join(ROOT, "jaxrlhf", "tasks", "assets", "reviews_tokenizer")
PPO_PROMPTS = ["it was", "my family saw", "this thriller is", "to be honest this film", "the story follows",
               "everyone absolutely", "for me", "i saw it in"]  # fmt: skip


def ppo_reward(prompts, responses, rows=None):
    """The run's programmatic reward (``config.reward.fn = "test_golden:ppo_reward"``): varied,
    and computed here again from the PyTorch rollout's decoded text. Its scale (about -0.2 .. 2.3
    on this rollout) lets both the clip at 1.0 and the missing-EOS penalty of 0.7 change scores
    (a larger scale clipped every cut response to 1.0 and hid the penalty)."""
    return np.array(
        [0.05 * len(r) - 0.03 * len(p) + 0.1 * r.count("e") for p, r in zip(prompts, responses, strict=True)]
    )


def greedy(lm, prompt_ids, max_new: int, eos: int) -> tuple[list[int], bool]:
    """Greedy response (EOS included when produced) and whether it was cut at ``max_new``."""
    ids = list(prompt_ids)
    for _ in range(max_new):
        nxt = int(torch.argmax(lm(torch.tensor([ids])).logits[0, -1]))
        ids.append(nxt)
        if nxt == eos:
            return ids[len(prompt_ids) :], False
    return ids[len(prompt_ids) :], True


def actor_that_stops(path, tok, max_new: int) -> str:
    """A tiny actor whose greedy responses end with EOS for some prompts and not for others:
    the LM-head row of EOS becomes 1.05x the row of a token that about half of the greedy
    responses emit (so EOS wins wherever that token would), edited in the safetensors file."""
    save_tiny(path, seed=11, vocab_size=512)
    lm = torch_lm(str(path))
    responses = [greedy(lm, tok(p)["input_ids"], max_new, tok.eos_token_id)[0] for p in PPO_PROMPTS]
    counts = {t: sum(t in r[1:] for r in responses) for r in responses for t in r[1:]}
    target = min(counts, key=lambda t: abs(counts[t] - len(PPO_PROMPTS) / 2))
    file = os.path.join(path, "model.safetensors")
    weights = load_file(file)
    weights["lm_head.weight"][tok.eos_token_id] = 1.05 * weights["lm_head.weight"][target]
    save_file(weights, file, metadata={"format": "pt"})
    return str(path)


def critic_values(critic, ids) -> np.ndarray:
    """The scalar head at every position ``[T]`` (not only the last)."""
    h = critic.model(torch.tensor([ids])).last_hidden_state
    return critic.score(h)[0, :, 0].double().numpy()


def gae_loop(rewards, values, gamma, lam):
    """GAE (Schulman et al. 2016) of one episode with V = 0 after its last action."""
    adv, nxt_v, nxt_a = np.zeros(len(rewards)), 0.0, 0.0
    for t in reversed(range(len(rewards))):
        delta = rewards[t] + gamma * nxt_v - values[t]
        nxt_a = delta + gamma * lam * nxt_a
        adv[t], nxt_v = nxt_a, values[t]
    return adv


def entropy_at(lm, ids, start: int) -> np.ndarray:
    logp = torch.log_softmax(lm(torch.tensor([ids])).logits[0].double(), dim=-1)
    return (-(logp.exp() * logp).sum(-1))[start - 1 : len(ids) - 1].numpy()


def mixed_lm(path_a, path_b, w_a: float):
    """A model whose every weight is ``w_a * a + (1 - w_a) * b`` (the EMA reference's closed form)."""
    lm, other = torch_lm(path_a), torch_lm(path_b).state_dict()
    lm.load_state_dict({k: w_a * v + (1 - w_a) * other[k] for k, v in lm.state_dict().items()})
    return lm


def expected_iteration(actor, ref, critic, tok, cfg, kl_coef: float, stats: dict):
    """Every metric of one PPO iteration whose update is a single minibatch (ratio 1), from the
    PyTorch rollout; returns ``(metrics, new reward stats)``."""
    pc, rc = cfg.ppo, cfg.reward
    rows = []
    for prompt in PPO_PROMPTS:
        p = tok(prompt)["input_ids"]
        resp, cut = greedy(actor, p, cfg.generation.max_new_tokens, tok.eos_token_id)
        old = response_logps(actor, p, resp)
        kl = old - response_logps(ref, p, resp)  # k1
        rows.append(dict(p=p, resp=resp, cut=cut, old=old, kl=kl, ent=entropy_at(actor, p + resp, len(p))))
        rows[-1]["v"] = critic_values(critic, p + resp)[len(p) - 1 : -1]
        rows[-1]["raw"] = ppo_reward([tok.decode(p, skip_special_tokens=True)],
                                     [tok.decode(resp, skip_special_tokens=True)])[0]  # fmt: skip
    raw = np.array([r["raw"] for r in rows])
    s = raw - rc.missing_eos_penalty * np.array([r["cut"] for r in rows])
    n, mb, vb = stats["count"] + len(s), np.mean(s), np.var(s)  # Chan et al. parallel update
    mean = stats["mean"] + (mb - stats["mean"]) * len(s) / n
    var = (
        stats["var"] * stats["count"] + vb * len(s) + (mb - stats["mean"]) ** 2 * stats["count"] * len(s) / n
    ) / n
    score = (s - mean) / np.sqrt(var + 1e-8) if rc.normalize else s
    score = np.clip(score, -rc.clip, rc.clip) if rc.clip > 0 else score
    adv, ret = [], []
    for r, sc in zip(rows, score, strict=True):
        rew = np.zeros(len(r["resp"]))
        rew[-1] = sc
        if pc.kl_mode == "reward":
            rew = rew - kl_coef * r["kl"]
        a = gae_loop(rew, r["v"], pc.gamma, pc.lam)
        adv.append(a), ret.append(a + r["v"])
    cat = lambda key: np.concatenate([r[key] for r in rows])
    A, R, V = np.concatenate(adv), np.concatenate(ret), cat("v")
    Aw = (A - A.mean()) / np.sqrt(A.var() + 1e-8) if pc.whiten_advantages else A
    pg, vf, ent = -np.mean(Aw), 0.5 * np.mean((V - R) ** 2), np.mean(cat("ent"))
    kl_term = np.mean(cat("kl")) if pc.kl_mode == "loss" else 0.0
    m = {
        "reward/raw_mean": raw.mean(),
        "response/eos_rate": 1 - np.mean([r["cut"] for r in rows]),
        "reward/normalized_mean": score.mean(),
        "kl_ref/k1": np.mean([r["kl"].sum() for r in rows]),
        "value/mean": V.mean(),
        "advantages/mean": A.mean(),
        "advantages/std": A.std(),
        "returns/mean": R.mean(),
        "train/policy_loss": pg,
        "train/value_loss": vf,
        "train/entropy": ent,
        "train/loss": pg
        + pc.vf_coef * vf
        - pc.entropy_coef * ent
        + (kl_coef * kl_term if pc.kl_mode == "loss" else 0),
        "kl_coef": kl_coef,
    }
    return m, {"count": n, "mean": mean, "var": var}


def ppo_config(actor, critic, data, *, kl_mode: str, normalize: bool):
    c = d.base("ppo")
    c.model = d.model(path=actor)
    c.model.dtype = "float32"
    c.tokenizer = REVIEW_TOK
    c.data = d.data(path=data, max_prompt_length=8, max_length=32, bucket=False)
    # lr 1e-30: the critic stays at its initial weights (every weight moves by < 1 ulp)
    c.critic = dict(model=d.model(path=critic), optim=d.optim(lr=1e-30, warmup_steps=0, schedule="constant"))
    c.critic.model.dtype = "float32"
    c.reward = d.reward(fn="test_golden:ppo_reward", missing_eos_penalty=0.7, normalize=normalize, clip=1.0)
    c.ref = d.ref(ema_decay=0.9)
    c.generation = d.generation(max_new_tokens=6, top_k=1)  # greedy: a rollout PyTorch can redo
    c.ppo = d.ppo(
        iterations=1, rollout_batch_size=len(PPO_PROMPTS), minibatch_size=len(PPO_PROMPTS), epochs=1,
        gamma=0.9, lam=0.8, whiten_advantages=True, kl_mode=kl_mode, kl_coef=0.3, adaptive_kl=True,
        kl_target=6.0, kl_horizon=10, entropy_coef=0.01, vf_coef=0.5,
    )  # fmt: skip
    c.optim = d.optim(lr=3e-2, warmup_steps=0, schedule="constant")
    c.checkpoint.every = 1
    c.checkpoint.async_save = False
    c.log_every = 1
    c.mesh = dict(data=1, fsdp=1, tensor=1)
    c.progress_bar = False
    return c


@pytest.mark.parametrize("kl_mode,normalize", [("reward", True), ("loss", False)])
def test_ppo_first_iterations_match_torch(kl_mode, normalize, tmp_path):
    """Iteration 1 (reference = actor): sampled responses, shaped scores (missing-EOS penalty,
    running normalisation, clipping), critic values, GAE with the configured γ and λ, whitening,
    the clipped losses at ratio 1, the entropy bonus. Iteration 2, resumed from the checkpoint:
    the policy is the exported actor, the reference is the EMA closed form 0.9·W0 + 0.1·W1, the
    KL coefficient is the adaptive controller's value (restored), the reward statistics continue."""
    tok = transformers.AutoTokenizer.from_pretrained(REVIEW_TOK)
    w0 = actor_that_stops(tmp_path / "w0", tok, max_new=6)
    c0 = save_tiny(tmp_path / "c0", seed=12, head="scalar", vocab_size=512)
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PPO_PROMPTS])
    cfg = ppo_config(w0, c0, data, kl_mode=kl_mode, normalize=normalize)
    work = str(tmp_path / "run")
    got1 = registry.run(cfg, work)["history"][-1]
    w1 = shutil.copytree(os.path.join(work, "hf"), str(tmp_path / "w1"))
    cfg.ppo.iterations = 2
    got2 = registry.run(cfg, work)["history"][-1]

    actor0, critic = torch_lm(w0), torch_scorer(c0)
    stats = {"count": 0.0, "mean": 0.0, "var": 1.0}
    want1, stats = expected_iteration(actor0, actor0, critic, tok, cfg, 0.3, stats)
    coef2 = 0.3 * (1 + np.clip(0.0 / 6.0 - 1, -0.2, 0.2) * len(PPO_PROMPTS) / 10)  # Ziegler et al. 2019
    want2, _ = expected_iteration(torch_lm(w1), mixed_lm(w0, w1, 0.9), critic, tok, cfg, coef2, stats)
    assert 0.0 < want1["response/eos_rate"] < 1.0, want1  # the missing-EOS penalty is seen
    assert abs(want2["kl_ref/k1"]) > 1e-3  # the reference differs from the moved actor
    for it, got, want in ((1, got1, want1), (2, got2, want2)):
        for key, value in want.items():
            close(got[key], value, f"iteration {it}: {key}", rtol=1e-4, atol=2e-5)
