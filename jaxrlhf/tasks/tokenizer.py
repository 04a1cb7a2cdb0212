"""The word-level tokenizer shared by both embedded tasks (synthetic reviews and verifiable answers).

``build_tokenizer(out_dir)`` builds a ``tokenizers`` WordLevel model with a ``Whitespace``
pre-tokenizer over a deterministic vocabulary, wraps it in ``transformers.PreTrainedTokenizerFast``
and saves it so that ``transformers.AutoTokenizer.from_pretrained(out_dir)`` loads it. The package
ships the result in ``jaxrlhf/tasks/assets/reviews_tokenizer`` (``tokenizer_path()``); rebuild it
with ``python -m jaxrlhf.tasks tokenizer``.

Ids: ``<pad>`` = 0, ``<bos>`` = 1, ``<eos>`` = 2, ``<unk>`` = 3 (pad != eos), then the punctuation
and symbols, the numbers ``0..MAX_NUMBER`` in numeric order, then the words of both tasks sorted.
Encoding with ``add_special_tokens=True`` prepends ``<bos>`` (as Llama tokenizers do) and never
appends ``<eos>`` (the data pipeline appends it exactly once). Decoding joins tokens with single
spaces, so every generated text round-trips exactly:
``tok.decode(tok(text).input_ids, skip_special_tokens=True) == text``.
"""

from __future__ import annotations

import json
import os

import jaxrlhf.tasks.reviews as reviews
import jaxrlhf.tasks.verifiable as verifiable
from jaxrlhf.tasks.common import BOS, EOS, PAD, SPECIAL_TOKENS, UNK

ASSET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "reviews_tokenizer")
MODEL_MAX_LENGTH = 256


def vocabulary() -> list[str]:
    """The full token list in id order: special tokens, symbols, numbers, then words (deterministic)."""
    words = set(reviews.vocabulary()) | set(verifiable.vocabulary())
    symbols = sorted(w for w in words if not w.isalnum())
    numbers = sorted((w for w in words if w.isdigit()), key=int)
    rest = sorted(words - set(symbols) - set(numbers))
    return list(SPECIAL_TOKENS) + symbols + numbers + rest


def build_tokenizer(out_dir: str | os.PathLike | None = None):
    """Builds the shared word-level tokenizer; saves it to ``out_dir`` when given.

    Args:
      out_dir: directory to write (``tokenizer.json``, ``tokenizer_config.json``, ...); created
        if missing. ``None`` only builds.

    Returns:
      A ``transformers.PreTrainedTokenizerFast`` with ``pad_token="<pad>"``, ``bos_token="<bos>"``,
      ``eos_token="<eos>"``, ``unk_token="<unk>"``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
        padding_side="right",
    )
    if out_dir is not None:
        out_dir = os.fspath(out_dir)
        os.makedirs(out_dir, exist_ok=True)
        fast.save_pretrained(out_dir)
        # Name the class that both transformers 4.x and 5.x resolve (5.x may write its own backend name).
        config_file = os.path.join(out_dir, "tokenizer_config.json")
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        with open(config_file, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
    return fast


def tokenizer_path() -> str:
    """Directory of the shipped tokenizer: ``AutoTokenizer.from_pretrained(tokenizer_path())``."""
    if not os.path.isfile(os.path.join(ASSET_DIR, "tokenizer.json")):
        raise FileNotFoundError(
            f"shipped tokenizer missing at {ASSET_DIR}; rebuild it with `python -m jaxrlhf.tasks tokenizer`"
        )
    return ASSET_DIR


def load_tokenizer():
    """``AutoTokenizer.from_pretrained(tokenizer_path())``."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_path())
