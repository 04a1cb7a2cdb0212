"""The shared side-by-side workload: one model, tokenizer, data file and optimizer for every framework.

Every framework in the comparison (jaxrlhf, TRL, Tunix) reads the files that :func:`prepare` writes
into one work dir, so the work is the same by construction:

- ``tokenizer/``: a deterministic word-level HF tokenizer (``tokenizer.json`` +
  ``tokenizer_config.json``); ``<pad>``=0, ``<s>``=1 (prepended on encode), ``</s>``=2, ``<unk>``=3.
  With ``Workload.tokenizer`` set (a real tokenizer's directory, e.g. Qwen2.5's), nothing is
  written: the runners read that directory, the model's vocabulary is that tokenizer's, and the
  data's words are ``num_words`` of its single-token words (``" word"`` is one token), so each
  word is still exactly one token; ``bos`` says whether that tokenizer prepends a BOS token.
- ``model/``: a randomly initialised HF ``LlamaForCausalLM`` (``config.json`` +
  ``model.safetensors``, float32), the policy and the DPO reference.
- ``reward_model/``: the same body as a ``LlamaForSequenceClassification`` (``score.weight`` [1, E]),
  the reward model's starting point.
- ``data.jsonl``: preference rows ``{"prompt", "chosen", "rejected"}`` of variable length. Chosen and
  rejected start with a space, so ``prompt + chosen`` tokenizes to ``prompt`` then ``chosen`` (TRL
  concatenates the strings). With the ``<s>`` and ``</s>`` the tokenizer/trainers add, each
  sequence is ``1 + n_prompt + n_response + 1`` tokens, between ``min_seq_tokens`` and
  ``max_length``: no framework truncates anything.
- ``workload.json``: :meth:`Workload.to_dict`, plus the file paths; the runners read only this.

Batches are taken in file order (no shuffle): step ``i`` (warm-up steps included) trains on rows
``[i * batch_size, (i + 1) * batch_size)``, so every framework sees the same rows at the same step.

This module imports only the standard library and numpy at top level (``tokenizers`` and
``safetensors`` are imported inside :func:`prepare`), so the peers' venv and the main venv both
import it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import numpy as np

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
_STAMP = "workload.json"


@dataclasses.dataclass(frozen=True)
class Workload:
    """Everything that defines the compared work. Defaults are the CPU workload.

    Sizes: ``vocab_size`` includes the 4 special tokens. Sequence lengths are in tokens, ``<s>`` and
    ``</s>`` included; ``max_prompt_length`` bounds ``1 + n_prompt`` and ``max_length`` bounds the
    whole prompt+response sequence.
    """

    name: str = "cpu-llama-5m"
    seed: int = 0
    # Model (Llama family, randomly initialised).
    vocab_size: int = 4096
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 8
    intermediate_size: int = 688
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 1024
    init_std: float = 0.02
    # Data.
    num_pairs: int = 1024
    min_seq_tokens: int = 64
    max_length: int = 512
    max_prompt_length: int = 192
    # Training.
    batch_size: int = 8
    learning_rate: float = 1e-5
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    beta: float = 0.1
    dtype: str = "float32"
    # Timing protocol.
    warmup_steps: int = 3
    steps: int = 10
    # Tokenizer: "" = the synthetic word-level one; else a real tokenizer's directory (see above).
    tokenizer: str = ""
    bos: bool = True  # the tokenizer prepends a BOS token (checked by prepare)
    num_words: int = 0  # distinct data words with a real tokenizer (0: the synthetic vocabulary's)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def max_response_length(self) -> int:
        """Tokens left for a response (``</s>`` included) after the longest prompt."""
        return self.max_length - self.max_prompt_length

    def replace(self, **kw) -> Workload:
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        """Every field; the tokenizer fields only when not their defaults (so the fingerprints of
        the workloads defined before them did not change)."""
        d = dataclasses.asdict(self)
        for k, default in (("tokenizer", ""), ("bos", True), ("num_words", 0)):
            if d[k] == default:
                d.pop(k)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Workload:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown Workload field(s) {unknown}; known: {sorted(names)}")
        return cls(**d)

    def fingerprint(self) -> str:
        """Short hash of every field: the work dir is rebuilt when it changes."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def validate(self) -> None:
        """Raises ``ValueError`` naming the field when the workload is inconsistent."""
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not a multiple of num_heads={self.num_heads}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.vocab_size <= len(SPECIAL_TOKENS) + 16:
            raise ValueError(f"vocab_size={self.vocab_size} too small (needs > {len(SPECIAL_TOKENS) + 16})")
        if not 4 <= self.min_seq_tokens <= self.max_length:
            raise ValueError(
                f"min_seq_tokens={self.min_seq_tokens} must be in [4, max_length={self.max_length}]"
            )
        if not 2 <= self.max_prompt_length < self.max_length - 1:
            raise ValueError(
                f"max_prompt_length={self.max_prompt_length} must be in "
                f"[2, max_length - 1 = {self.max_length - 1})"
            )
        if self.max_length > self.max_position_embeddings:
            raise ValueError(
                f"max_length={self.max_length} exceeds max_position_embeddings={self.max_position_embeddings}"
            )
        if self.num_pairs < self.batch_size * (self.warmup_steps + self.steps):
            raise ValueError(
                f"num_pairs={self.num_pairs} < batch_size * (warmup_steps + steps) = "
                f"{self.batch_size * (self.warmup_steps + self.steps)}: a run would wrap around the data"
            )
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r}; expected 'float32' or 'bfloat16'")


DEFAULT = Workload()

# Named workloads for `--workload NAME`. "tiny" is for plumbing tests, not for numbers.
WORKLOADS: dict[str, Workload] = {
    "cpu": DEFAULT,
    # The CLI comparison (`python -m jaxrlhf.bench.cli`): the model, data, batch and length of
    # issue 19's measurement, with a 2k word-level vocabulary or the real Qwen2.5 tokenizer.
    "cli-v2k": Workload(
        name="cli-v2k",
        vocab_size=2000,
        hidden_size=256,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=1024,
        num_pairs=512,
        min_seq_tokens=32,
        max_length=256,
        max_prompt_length=96,
        max_position_embeddings=512,
        warmup_steps=0,
        steps=64,
    ),
    "cli-qwen": Workload(
        name="cli-qwen",
        vocab_size=151665,
        hidden_size=256,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=1024,
        num_pairs=512,
        min_seq_tokens=32,
        max_length=256,
        max_prompt_length=96,
        max_position_embeddings=512,
        warmup_steps=0,
        steps=64,
        bos=False,
        num_words=4000,
        tokenizer=os.path.join("..", "shared", "real", "tokenizer_qwen2_5_instruct"),
    ),
    "cli-tiny": Workload(
        name="cli-tiny",
        vocab_size=128,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=64,
        num_pairs=32,
        min_seq_tokens=8,
        max_length=48,
        max_prompt_length=16,
        batch_size=2,
        warmup_steps=0,
        steps=16,
    ),
    "tiny": Workload(
        name="tiny",
        vocab_size=128,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=64,
        num_pairs=32,
        min_seq_tokens=8,
        max_length=48,
        max_prompt_length=16,
        batch_size=2,
        warmup_steps=2,  # Tunix compiles on its 1st and 2nd step
        steps=3,
    ),
}


def get_workload(name: str, **overrides) -> Workload:
    """A named workload from :data:`WORKLOADS` with field overrides; raises naming the known names."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; known: {sorted(WORKLOADS)}")
    w = WORKLOADS[name].replace(**overrides)
    w.validate()
    return w


# ----------------------------------------------------------------------------------------- vocabulary
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "ch", "sh", "tr", "pl")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou")


def make_words(n: int) -> list[str]:
    """``n`` distinct lower-case words (syllable combinations), the same for every call."""
    syll = [o + v for o in _ONSETS for v in _VOWELS]  # 126 syllables
    words: list[str] = []
    seen: set[str] = set()
    k = 1
    while len(words) < n:
        for idx in np.ndindex(*([len(syll)] * k)):
            w = "".join(syll[i] for i in idx)
            if w not in seen:
                seen.add(w)
                words.append(w)
                if len(words) == n:
                    break
        k += 1
    return words


# ----------------------------------------------------------------------------------------- data
def sample_lengths(w: Workload, rng: np.random.Generator) -> np.ndarray:
    """Word counts ``[num_pairs, 3]`` (prompt, chosen, rejected).

    Prompt words in ``[1, max_prompt_length - 1]``; each response in ``[1, max_response_length - 1]``
    and such that ``1 + n_prompt + n_response + 1`` lies in ``[min_seq_tokens, max_length]``.
    """
    n = w.num_pairs
    p = rng.integers(1, w.max_prompt_length, size=n)  # + <s> <= max_prompt_length
    out = np.zeros((n, 3), np.int64)
    out[:, 0] = p
    for j in (1, 2):
        lo = np.maximum(1, w.min_seq_tokens - 2 - p)
        hi = np.minimum(w.max_response_length - 1, w.max_length - 2 - p)  # inclusive
        out[:, j] = lo + np.floor(rng.random(n) * (hi - lo + 1)).astype(np.int64)
    return out


def make_rows(w: Workload, words: list[str]) -> list[dict[str, Any]]:
    """The preference rows, deterministic in ``w.seed``. Word ids follow a Zipf-like law. With a
    real tokenizer the prompt starts with a space too (its words are the ``" word"`` tokens)."""
    rng = np.random.default_rng(w.seed)
    lengths = sample_lengths(w, rng)
    ranks = np.arange(1, len(words) + 1, dtype=np.float64)
    probs = 1.0 / ranks
    probs /= probs.sum()
    rows = []
    for i, (np_, nc, nr) in enumerate(lengths):
        ids = rng.choice(len(words), size=int(np_ + nc + nr), p=probs)
        prompt = (" " if w.tokenizer else "") + " ".join(words[t] for t in ids[:np_])
        chosen = " " + " ".join(words[t] for t in ids[np_ : np_ + nc])
        rejected = " " + " ".join(words[t] for t in ids[np_ + nc :])
        rows.append(
            {"id": i, "prompt": prompt, "chosen": chosen, "rejected": rejected,
             "n_prompt": int(np_), "n_chosen": int(nc), "n_rejected": int(nr)}
        )  # fmt: skip
    return rows


def real_tokens(rows: list[dict[str, Any]], task: str, bos: bool = True) -> int:
    """Real (non-pad) tokens that one step over ``rows`` trains on, ``<s>`` (when the tokenizer
    prepends one, ``bos``) and ``</s>`` included.

    Both tasks forward ``prompt + chosen`` and ``prompt + rejected`` (the prompt counts twice); DPO
    also forwards both through the reference model, which is not counted again (tokens/s is
    trained tokens per second).
    """
    if task not in ("dpo", "reward"):
        raise ValueError(f"task={task!r}; expected 'dpo' or 'reward'")
    special = 1 + int(bool(bos))
    return int(sum(2 * (r["n_prompt"] + special) + r["n_chosen"] + r["n_rejected"] for r in rows))


def step_rows(
    rows: list[dict[str, Any]], w: Workload, step: int, *, wrap: bool = False
) -> list[dict[str, Any]]:
    """Rows of step ``step`` (0-based, warm-up steps included); ``wrap``: epochs repeat the file
    in order (``num_pairs`` a multiple of ``batch_size``), as a run longer than the data reads it."""
    lo = step * w.batch_size
    if wrap:
        if len(rows) % w.batch_size:
            raise ValueError(f"{len(rows)} rows are not a whole number of batches of {w.batch_size}")
        lo %= len(rows)
    if lo + w.batch_size > len(rows):
        raise ValueError(f"step {step} needs rows [{lo}, {lo + w.batch_size}) but the data has {len(rows)}")
    return rows[lo : lo + w.batch_size]


# ----------------------------------------------------------------------------------------- model
def hf_config(w: Workload, *, reward: bool = False, special: dict | None = None) -> dict[str, Any]:
    """HF ``config.json`` of the Llama model (causal LM, or sequence classifier with one label);
    ``special``: the tokenizer's ``bos/eos/pad_token_id`` (default: the synthetic tokenizer's)."""
    cfg: dict[str, Any] = {
        "architectures": ["LlamaForSequenceClassification" if reward else "LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": w.vocab_size,
        "hidden_size": w.hidden_size,
        "intermediate_size": w.intermediate_size,
        "num_hidden_layers": w.num_layers,
        "num_attention_heads": w.num_heads,
        "num_key_value_heads": w.num_kv_heads,
        "head_dim": w.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": w.max_position_embeddings,
        "rms_norm_eps": w.rms_norm_eps,
        "rope_theta": w.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": w.rope_theta},
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        **(special or {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}),
        "initializer_range": w.init_std,
        "torch_dtype": "float32",
        "dtype": "float32",
    }
    if reward:
        cfg.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    return cfg


def init_weights(w: Workload) -> dict[str, np.ndarray]:
    """Random float32 Llama weights with HF names and shapes (``[out, in]`` for linears).

    Linears and embeddings ~ N(0, init_std); RMSNorm scales = 1; ``score.weight`` [1, E] ~
    N(0, 1/sqrt(E+1)) (TRL's value-head init). Deterministic in ``w.seed``.
    """
    rng = np.random.default_rng(w.seed + 1)
    e, f, v = w.hidden_size, w.intermediate_size, w.vocab_size
    hq, hk = w.num_heads * w.head_dim, w.num_kv_heads * w.head_dim

    def normal(*shape, std=w.init_std):
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(np.float32)

    out = {"model.embed_tokens.weight": normal(v, e)}
    for i in range(w.num_layers):
        p = f"model.layers.{i}."
        out[p + "self_attn.q_proj.weight"] = normal(hq, e)
        out[p + "self_attn.k_proj.weight"] = normal(hk, e)
        out[p + "self_attn.v_proj.weight"] = normal(hk, e)
        out[p + "self_attn.o_proj.weight"] = normal(e, hq)
        out[p + "mlp.gate_proj.weight"] = normal(f, e)
        out[p + "mlp.up_proj.weight"] = normal(f, e)
        out[p + "mlp.down_proj.weight"] = normal(e, f)
        out[p + "input_layernorm.weight"] = np.ones(e, np.float32)
        out[p + "post_attention_layernorm.weight"] = np.ones(e, np.float32)
    out["model.norm.weight"] = np.ones(e, np.float32)
    out["lm_head.weight"] = normal(v, e)
    out["score.weight"] = normal(1, e, std=1.0 / np.sqrt(e + 1))
    return out


def num_params(w: Workload, *, reward: bool = False) -> int:
    """Parameter count of the saved model (embeddings included)."""
    e, f, v = w.hidden_size, w.intermediate_size, w.vocab_size
    hq, hk = w.num_heads * w.head_dim, w.num_kv_heads * w.head_dim
    layer = 2 * e * hq + 2 * e * hk + 3 * e * f + 2 * e
    return v * e + w.num_layers * layer + e + (e if reward else v * e)


def flops_per_token(w: Workload, seq_len: int, *, reward: bool = False) -> float:
    """Training FLOPs per token, ``6 N + 6 L T H D`` (same formula as
    ``jaxrlhf.models.modeling.flops_per_token``): ``N`` = matmul parameters (input embedding
    excluded, LM head or score head included), plus attention scores and values without causal
    halving. A DPO step adds ``2 N + 2 L T H D`` per token for the reference forward.
    """
    e, f = w.hidden_size, w.intermediate_size
    hq, hk = w.num_heads * w.head_dim, w.num_kv_heads * w.head_dim
    n = w.num_layers * (2 * e * hq + 2 * e * hk + 3 * e * f) + e * (1 if reward else w.vocab_size)
    return float(6 * n + 6 * w.num_layers * seq_len * hq)


# ----------------------------------------------------------------------------------------- files
def real_tokenizer_words(w: Workload, tok_dir: str) -> tuple[list[str], dict[str, int | None]]:
    """``w.num_words`` lower-case words that the tokenizer in ``tok_dir`` encodes as one token
    with a leading space (its ``"Ġword"`` entries, lowest ids first), and its special ids.
    Raises when the tokenizer's vocabulary exceeds ``w.vocab_size`` or its BOS use is not ``w.bos``."""
    from tokenizers import Tokenizer

    if not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
        raise FileNotFoundError(f"{tok_dir}/tokenizer.json not found (Workload.tokenizer={w.tokenizer!r})")
    tok = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))
    size = tok.get_vocab_size(with_added_tokens=True)
    if size > w.vocab_size:
        raise ValueError(f"tokenizer {tok_dir} has {size} entries > vocab_size={w.vocab_size}")
    vocab = tok.get_vocab(with_added_tokens=False)
    words = sorted(
        (i, t[1:]) for t, i in vocab.items() if t.startswith("\u0120") and t[1:].isascii() and t[1:].isalpha()
        and t[1:].islower() and len(t) >= 4
    )  # fmt: skip
    words = [
        t for _, t in words if tok.encode(" " + t, add_special_tokens=False).ids == [vocab["\u0120" + t]]
    ]
    if len(words) < w.num_words:
        raise ValueError(
            f"tokenizer {tok_dir} has only {len(words)} single-token words < num_words={w.num_words}"
        )
    with open(os.path.join(tok_dir, "tokenizer_config.json")) as f:
        cfg = json.load(f)
    ids = {}
    for key in ("bos", "eos", "pad"):
        name = cfg.get(f"{key}_token")
        name = name.get("content") if isinstance(name, dict) else name
        ids[f"{key}_token_id"] = tok.token_to_id(name) if name else None
    bos = len(tok.encode(" a", add_special_tokens=True).ids) > len(
        tok.encode(" a", add_special_tokens=False).ids
    )
    if bos != w.bos:
        raise ValueError(
            f"tokenizer {tok_dir} {'adds' if bos else 'adds no'} BOS token; the workload says bos={w.bos}"
        )
    return words[: w.num_words], ids


def check_token_counts(w: Workload, tok_dir: str, rows: list[dict[str, Any]]) -> None:
    """Each row's prompt + response encodes to exactly its word counts (plus BOS): a word that
    merged with its neighbour would make the frameworks' token counts disagree with :func:`real_tokens`."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))
    for r in rows:
        for half in ("chosen", "rejected"):
            n = len(tok.encode(r["prompt"] + r[half], add_special_tokens=True).ids)
            want = int(w.bos) + r["n_prompt"] + r[f"n_{half}"]
            if n != want:
                raise ValueError(f"row {r['id']} {half}: {n} tokens, expected {want} (one per word)")


def _save_tokenizer(w: Workload, words: list[str], out_dir: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for word in words:
        vocab[word] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS_ID)]
    )
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "model_max_length": w.max_position_embeddings,
        "padding_side": "right",
        "clean_up_tokenization_spaces": False,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump({k: cfg[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")}, f, indent=2)


def _save_model(
    w: Workload, weights: dict[str, np.ndarray], out_dir: str, *, reward: bool, special=None
) -> None:
    from safetensors.numpy import save_file

    os.makedirs(out_dir, exist_ok=True)
    drop = "lm_head.weight" if reward else "score.weight"
    tensors = {k: v for k, v in weights.items() if k != drop}
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config(w, reward=reward, special=special), f, indent=2)


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tokenizer_dir(w: Workload, workdir: str) -> str:
    """The synthetic tokenizer under ``workdir``, or the real one (a relative path is taken from
    the repository root, e.g. ``../shared/real/tokenizer_qwen2_5_instruct``)."""
    if not w.tokenizer:
        return os.path.join(workdir, "tokenizer")
    return os.path.normpath(os.path.join(REPO, w.tokenizer))


def paths(workdir: str, w: Workload | None = None) -> dict[str, str]:
    """Where :func:`prepare` puts each file under ``workdir`` (the tokenizer: see :func:`tokenizer_dir`)."""
    return {
        "workdir": workdir,
        "tokenizer": tokenizer_dir(w or DEFAULT, workdir),
        "model": os.path.join(workdir, "model"),
        "reward_model": os.path.join(workdir, "reward_model"),
        "data": os.path.join(workdir, "data.jsonl"),
        "workload": os.path.join(workdir, _STAMP),
    }


def prepare(workdir: str, w: Workload = DEFAULT, *, force: bool = False) -> dict[str, str]:
    """Writes the workload's files into ``workdir`` (skipped when already there for the same
    workload) and returns :func:`paths`. Deterministic: the same workload gives byte-identical files.
    """
    w.validate()
    p = paths(workdir, w)
    if not force and os.path.exists(p["workload"]):
        with open(p["workload"]) as f:
            if json.load(f).get("fingerprint") == w.fingerprint():
                return p
    os.makedirs(workdir, exist_ok=True)
    special = None
    if w.tokenizer:
        words, special = real_tokenizer_words(w, p["tokenizer"])
    else:
        words = make_words(w.vocab_size - len(SPECIAL_TOKENS))
        _save_tokenizer(w, words, p["tokenizer"])
    rows = make_rows(w, words)
    if w.tokenizer:
        check_token_counts(w, p["tokenizer"], rows[:32])
    with open(p["data"], "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    weights = init_weights(w)
    _save_model(w, weights, p["model"], reward=False, special=special)
    _save_model(w, weights, p["reward_model"], reward=True, special=special)
    # The stamp is written last: a half-written work dir is rebuilt on the next call.
    with open(p["workload"], "w") as f:
        json.dump({"workload": w.to_dict(), "fingerprint": w.fingerprint(), "paths": p}, f, indent=2)
    return p


def load(workdir: str) -> tuple[Workload, dict[str, str], list[dict[str, Any]]]:
    """Reads back ``(workload, paths, rows)`` from a prepared work dir (what every runner calls)."""
    p = paths(workdir)
    if not os.path.exists(p["workload"]):
        raise FileNotFoundError(
            f"{p['workload']} not found: run jaxrlhf.bench.workload.prepare({workdir!r}) first"
        )
    with open(p["workload"]) as f:
        meta = json.load(f)
    w = Workload.from_dict(meta["workload"])
    p = paths(workdir, w)
    with open(p["data"]) as f:
        rows = [json.loads(line) for line in f]
    return w, p, rows
