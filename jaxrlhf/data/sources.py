"""Data sources: tokenizers through ``AutoTokenizer`` and rows through HF ``datasets``.

``config.data.path`` may be a local ``.json``/``.jsonl``/``.parquet``/``.csv`` file, a directory
written by ``Dataset.save_to_disk``/``DatasetDict.save_to_disk``, a directory of data files, or a
hub dataset name (where the network allows).
"""

from __future__ import annotations

import logging
import os

import ml_collections
import numpy as np

from jaxrlhf import paths

log = logging.getLogger("jaxrlhf.data")

_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}

# ``config.data`` keys and their defaults. A missing key takes its default; an unknown key is an
# error (a mistyped option must not be silently ignored).
DATA_DEFAULTS = dict(
    path="",
    split="train",
    eval_split=None,
    eval_fraction=0.0,
    schema="auto",
    max_samples=0,
    max_prompt_length=256,
    max_length=512,
    truncation="left",
    response_truncation="truncate",
    strict=False,
    packing=False,
    # packed preference batches: row counts rounded up to this many fixed buckets (a run compiles at
    # most this many shapes; 0: the exact count of each batch). See jaxrlhf.data.packing.row_buckets.
    packed_row_buckets=4,
    bucket=True,
    shuffle=True,
    seed=0,
    chat_template=None,
)
DATA_CONFIG_KEYS = tuple(DATA_DEFAULTS)


def option(cfg, key: str):
    """``cfg[key]`` or its default from ``DATA_DEFAULTS``."""
    return cfg.get(key, DATA_DEFAULTS[key])


def default_data_config(**overrides) -> ml_collections.ConfigDict:
    """The ``config.data`` section with its defaults (see docs/data.md)."""
    values = {**DATA_DEFAULTS, **overrides}
    cfg = ml_collections.ConfigDict(
        {k: v for k, v in values.items() if k not in ("eval_split", "chat_template") or v is not None}
    )
    if values["eval_split"] is None:
        cfg.eval_split = ml_collections.config_dict.placeholder(str)
    if values["chat_template"] is None:
        cfg.chat_template = ml_collections.config_dict.placeholder(bool)
    check_data_config(cfg)
    return cfg


def check_data_config(cfg) -> None:
    """Validates ``config.data``: unknown keys and bad values raise ``ValueError``."""
    unknown = set(cfg.keys()) - set(DATA_CONFIG_KEYS)
    if unknown:
        raise ValueError(f"config.data: unknown keys {sorted(unknown)}; known keys: {list(DATA_CONFIG_KEYS)}")
    truncation, response_truncation = option(cfg, "truncation"), option(cfg, "response_truncation")
    if truncation not in ("left", "drop"):
        raise ValueError(f"config.data.truncation must be 'left' or 'drop', got {truncation!r}")
    if response_truncation not in ("truncate", "drop"):
        raise ValueError(
            f"config.data.response_truncation must be 'truncate' or 'drop', got {response_truncation!r}"
        )
    frac = float(option(cfg, "eval_fraction"))
    if not 0.0 <= frac < 1.0:
        raise ValueError(f"config.data.eval_fraction must be in [0, 1), got {frac}")
    P, T = int(option(cfg, "max_prompt_length")), int(option(cfg, "max_length"))
    if P < 1 or T <= P:
        raise ValueError(
            "config.data needs 1 <= max_prompt_length < max_length, got "
            f"max_prompt_length={P}, max_length={T}"
        )
    if int(option(cfg, "max_samples")) < 0:
        raise ValueError(f"config.data.max_samples must be >= 0, got {option(cfg, 'max_samples')}")


def load_tokenizer(name_or_path: str, *, config_key: str | None = "tokenizer"):
    """``transformers.AutoTokenizer`` from a local directory or hub id.

    A tokenizer without a pad token gets ``pad_token = eos_token`` (masks never trust pad ids).
    A local-looking path that does not exist raises ``FileNotFoundError`` naming it and
    ``config.<config_key>`` (``jaxrlhf.paths``); only a valid hub id is tried on the hub.
    """
    if paths.classify(name_or_path, config_key) == "local":
        name_or_path = os.path.expanduser(name_or_path)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name_or_path)
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer {name_or_path!r} has no eos_token; jaxrlhf needs one to end responses")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _is_saved_dataset(path: str) -> bool:
    names = set(os.listdir(path))
    return bool({"dataset_info.json", "state.json", "dataset_dict.json"} & names)


def _load_split(path: str, split: str, config_key: str = "data.path"):
    """One split of a source as a ``datasets.Dataset`` (a local file or directory, or a hub dataset)."""
    import datasets

    if paths.classify(path, config_key) == "local":
        path = os.path.expanduser(path)
    if os.path.isfile(path):
        ext = os.path.splitext(path)[1].lower()
        if ext not in _FILE_BUILDERS:
            raise ValueError(f"unsupported data file {path!r}; expected one of {sorted(_FILE_BUILDERS)}")
        return datasets.load_dataset(_FILE_BUILDERS[ext], data_files=path, split="train")
    if os.path.isdir(path):
        if _is_saved_dataset(path):
            ds = datasets.load_from_disk(path)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ValueError(f"split {split!r} not in {path!r}; available: {sorted(ds)}")
                return ds[split]
            return ds
        return datasets.load_dataset(path, split=split)
    return datasets.load_dataset(path, split=split)


def _subsample(n: int, k: int, seed: int, salt: int) -> np.ndarray:
    idx = np.arange(n)
    if 0 < k < n:
        idx = np.sort(np.random.default_rng([seed, salt]).permutation(n)[:k])
    return idx


def has_eval(data_cfg) -> bool:
    """Whether ``config.data`` defines eval rows (``eval_split`` or ``eval_fraction > 0``)."""
    return bool(option(data_cfg, "eval_split")) or float(option(data_cfg, "eval_fraction")) > 0


def load_rows(data_cfg, split: str = "train"):
    """Loads the rows of one split.

    ``split`` is a role: ``"train"`` reads ``data_cfg.split``; ``"eval"`` reads
    ``data_cfg.eval_split`` (a split name, or a path to another file/directory) or, when that is
    unset and ``eval_fraction > 0``, a held-out fraction of the train split (chosen with
    ``data_cfg.seed``; the train role then excludes it). Any other string is a literal split name.
    ``max_samples > 0`` keeps a seeded random subset (in source order).

    Returns:
      ``(rows, source_index)``: a ``datasets.Dataset`` and an int array ``[len(rows)]`` with each
      row's index in the source split (drop reports name these indices).
    """
    check_data_config(data_cfg)
    path, seed = option(data_cfg, "path"), int(option(data_cfg, "seed"))
    if not path:
        raise ValueError("config.data.path is empty")
    frac, eval_split = float(option(data_cfg, "eval_fraction")), option(data_cfg, "eval_split")
    train_split = option(data_cfg, "split")
    if split == "eval":
        if eval_split:
            rows = (
                _load_split(eval_split, "train", "data.eval_split")
                if os.path.exists(os.path.expanduser(eval_split)) or paths.looks_local(eval_split)
                else _load_split(path, eval_split)
            )
            index = np.arange(len(rows))
        elif frac > 0:
            rows = _load_split(path, train_split)
            index = _holdout(len(rows), frac, seed)[1]
        else:
            raise ValueError("config.data has no eval_split and eval_fraction == 0: no eval rows")
    else:
        rows = _load_split(path, train_split if split == "train" else split)
        index = np.arange(len(rows))
        if split == "train" and not eval_split and frac > 0:
            index = _holdout(len(rows), frac, seed)[0]
    max_samples = int(option(data_cfg, "max_samples"))
    index = index[_subsample(len(index), max_samples, seed, 1 if split == "eval" else 0)]
    if len(index) != len(rows):
        rows = rows.select(index.tolist())
    log.info("data: %d rows from %s (split role %r)", len(rows), path, split)
    return rows, index


def _holdout(n: int, frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, eval) row indices with ``max(1, round(n * frac))`` eval rows."""
    perm = np.random.default_rng([seed, 2]).permutation(n)
    k = max(1, int(round(n * frac)))
    if k >= n:
        raise ValueError(f"eval_fraction={frac} leaves no train rows out of {n}")
    return np.sort(perm[k:]), np.sort(perm[:k])
