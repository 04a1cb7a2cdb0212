"""Embedded tasks that need no download: synthetic reviews and verifiable answers.

- ``jaxrlhf.tasks.reviews``: review generator, openings as prompts, gold sentiment scorer, reward.
- ``jaxrlhf.tasks.verifiable``: prompts with checkable answers, checker, pass@k, reward.
- ``jaxrlhf.tasks.tokenizer``: the word-level HF tokenizer shared by both (shipped in ``assets/``).
- ``jaxrlhf.tasks.common``: answer convention, JSONL writers, best/worst preference pairs.

Command line: ``python -m jaxrlhf.tasks --help`` writes datasets as JSONL and rebuilds the tokenizer.
Pure Python/numpy; ``transformers``/``tokenizers`` are imported only to build or load the tokenizer.
"""

from jaxrlhf.tasks import common, reviews, verifiable
from jaxrlhf.tasks.tokenizer import build_tokenizer, load_tokenizer, tokenizer_path

__all__ = ["build_tokenizer", "common", "load_tokenizer", "reviews", "tokenizer_path", "verifiable"]
