"""Inputs of the analyses: HF models, datasets through the data pipeline, fixed-shape batches, rewards.

Everything runs unsharded on the default device (analysis models are small; a model must fit one
device). Batches have one shape per dataset (rows padded to the longest example, the last batch
filled with padding rows of index -1), so each jitted function compiles once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrlhf import data as data_lib
from jaxrlhf import models
from jaxrlhf.data import schemas
from jaxrlhf.rollout import decode_texts, load_reward_fn


def load_model(path: str, *, head: str | None = None) -> tuple[Any, Any]:
    """``(graphdef, params)`` of an HF-format directory, float32 compute and parameters."""
    model = models.from_pretrained(path, head=head, dtype=jnp.float32, param_dtype=jnp.float32)
    return nnx.split(model)


def data_config(path: str, **overrides):
    """``config.data`` for reading ``path`` in file order (no shuffling)."""
    return data_lib.default_data_config(path=path, shuffle=False, bucket=False, **overrides)


@dataclasses.dataclass
class Examples:
    """A tokenized dataset (``SFTDataset`` or ``PromptDataset``) and each example's label."""

    dataset: Any
    labels: list[str] | None


def load_examples(data_cfg, tokenizer, *, kind: str = "auto", label: str | None = None) -> Examples:
    """Reads ``data_cfg.path`` through the data pipeline as ``kind`` examples.

    Args:
      data_cfg: a ``config.data`` section (``data_config``).
      tokenizer: a ``transformers`` tokenizer.
      kind: ``"sft"`` (prompt + response sequences), ``"prompt"`` (prompts only), or ``"auto"``:
        ``"sft"`` when the rows have a response (prompt/completion, messages, text or preference
        schemas; preference rows use ``chosen``), else ``"prompt"``.
      label: a column whose value (as a string) groups the examples, e.g. ``"label"``.
    """
    rows, source_index = data_lib.load_rows(data_cfg, "train")
    if kind == "auto":
        first = rows[0] if len(rows) else None
        cols = rows.column_names
        schema = data_cfg.schema if data_cfg.schema != "auto" else schemas.detect_schema(cols, first)
        kind = "prompt" if schema == "prompt" else "sft"
        if schema == "messages" and first is not None and first["messages"][-1]["role"] != "assistant":
            kind = "prompt"
    if kind not in ("sft", "prompt"):
        raise ValueError(f"kind must be 'auto', 'sft' or 'prompt', got {kind!r}")
    ds = data_lib.tokenize_rows(
        rows, data_cfg, tokenizer, kind, source_index=source_index, name=data_cfg.path
    )
    labels = None
    if label:
        if label not in rows.column_names:
            raise ValueError(f"{data_cfg.path}: no column {label!r} to group by; columns {rows.column_names}")
        position = {int(s): i for i, s in enumerate(source_index)}
        column = rows[label]
        labels = [str(column[position[int(s)]]) for s in ds.source_index]
    return Examples(ds, labels)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _chunks(n: int, batch_size: int) -> Iterator[np.ndarray]:
    """Index arrays of ``batch_size`` covering ``range(n)``, the last one filled with -1."""
    b = min(batch_size, n)
    for s in range(0, n, b):
        idx = np.arange(s, min(s + b, n))
        yield np.concatenate([idx, np.full(b - len(idx), -1)]).astype(np.int64)


def sequence_batches(ds, batch_size: int) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
    """``(seq, index)`` batches of full sequences: ``input_ids``, ``attention_mask``, ``loss_mask``,
    ``positions`` ``[B, T]`` int32 and ``index [B]`` (the example of each row, -1 for padding).

    ``SFTDataset``: right-padded prompt + response, ``loss_mask`` on the response. ``PromptDataset``:
    left-padded prompts, ``loss_mask`` on every real token but the first (nothing predicts it).
    """
    width = _round_up(int(np.max(ds.lengths)), 8)
    for idx in _chunks(len(ds), batch_size):
        if ds.kind == "sft":
            seq = ds.collate(idx.tolist(), width, ds.pad_id)
        elif ds.kind == "prompt":
            p = ds.collate(idx.tolist(), width, ds.pad_id)
            mask = p["prompt_mask"]
            seq = {
                "input_ids": p["prompt_ids"],
                "attention_mask": mask,
                "loss_mask": (mask * (np.cumsum(mask, axis=1) > 1)).astype(np.int32),
                "positions": np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32),
            }
        else:
            raise ValueError(f"sequence_batches: a {ds.kind!r} dataset has no single sequences")
        yield seq, idx


def prompt_batches(ds, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """``prompt_ids``, ``prompt_mask`` ``[B, P]`` (left-padded) and ``index [B]`` of a
    ``PromptDataset``, every batch the same shape."""
    if ds.kind != "prompt":
        raise ValueError(f"prompt_batches needs a prompt dataset, got {ds.kind!r}")
    width = _round_up(int(np.max(ds.lengths)), 8)
    for idx in _chunks(len(ds), batch_size):
        yield ds.collate(idx.tolist(), width, ds.pad_id)


# ------------------------------------------------------------------------------------ rewards


def make_reward(
    tokenizer, prompts_ds, *, fn: str | None = None, model_dir: str | None = None
) -> Callable[[Any, np.ndarray], np.ndarray]:
    """``reward(gen, index) -> float [B]`` for a ``generation.GenerationOutput`` and its rows.

    ``fn``: a programmatic reward ``fn(prompts, responses, rows) -> [B]`` on decoded texts, with
    ``rows[b] = prompts_ds.row(index[b])`` (as PPO's ``config.reward.fn``). ``model_dir``: an HF
    Bradley-Terry reward model (scalar head) scoring the whole sequence at its last real token; it
    must share the policy's tokenizer.
    """
    if (fn is None) == (model_dir is None):
        raise ValueError("give exactly one of a reward function and a reward-model directory")
    if fn is not None:
        call = load_reward_fn(fn)

        def programmatic(gen, index):
            ids = np.asarray(gen.prompt_ids), np.asarray(gen.response_ids)
            masks = np.asarray(gen.prompt_mask), np.asarray(gen.response_mask)
            prompts = decode_texts(tokenizer, ids[0], masks[0])
            responses = decode_texts(tokenizer, ids[1], masks[1])
            rows = [prompts_ds.row(int(i)) if i >= 0 else {} for i in index]
            scores = np.asarray(call(prompts, responses, rows), np.float32).reshape(-1)
            if scores.shape[0] != len(prompts):
                raise ValueError(f"reward function {fn} returned {scores.shape[0]} scores for {len(prompts)}")
            return scores

        return programmatic
    graphdef, params = load_model(model_dir, head="scalar")

    @jax.jit
    def score(params, seq):
        out = nnx.merge(graphdef, params)(seq["input_ids"], seq["attention_mask"], positions=seq["positions"])
        t = seq["attention_mask"].shape[1]
        last = t - 1 - jnp.argmax(seq["attention_mask"][:, ::-1] > 0, axis=-1)  # [B]
        return jnp.take_along_axis(out, last[:, None], axis=1)[:, 0]

    return lambda gen, index: np.asarray(score(params, gen.to_batch()))


def eos_ids(tokenizer) -> Sequence[int]:
    eos = tokenizer.eos_token_id
    return tuple(eos) if isinstance(eos, list | tuple) else (eos,)
