"""Tokenization with exact masks and an explicit, counted length policy.

How a row becomes tokens (docs/data.md has the full story):

1. The schema record (``schemas.normalize``) is rendered to a prompt text and a response text.
   Chat-message rows use the tokenizer's chat template (``prompt = template(context,
   add_generation_prompt=True)``, ``response = template(context + [answer])[len(prompt):]``) or,
   without one, the HH format ``"\\n\\nHuman: ...\\n\\nAssistant:"`` + ``" answer"``.
2. Prompt and response are tokenized **separately** (``add_special_tokens=False``) and the ids
   concatenated, so the tokenized prompt is always a prefix of prompt+response. Where the
   tokenizer would tokenize the joined text differently, the row is counted under
   ``joint_tokenization_mismatch`` and a warning is logged (the separate tokenization is kept).
3. The tokenizer's own start tokens (BOS, found by probing it) are put once at the start of the
   prompt, unless the rendered prompt already starts with them (chat templates often do).
4. EOS is appended to the response exactly once (not when it already ends with EOS).
5. Length policy: prompts longer than ``max_prompt_length`` are cut from the left (BOS kept) or
   dropped; responses that do not fit in ``max_length`` are cut from the right (the EOS is then
   gone, so the model does not learn to stop there) or dropped.

Every drop is counted by reason in ``dataset.drop_stats`` with example source row indices; every
alteration (truncation, tokenization mismatch) in ``dataset.edit_stats``. With ``strict=True`` the
first drop raises :class:`DataError`.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Sequence

import numpy as np

import jaxrlhf.data.schemas as schemas
from jaxrlhf.data.packing import pack_first_fit
from jaxrlhf.data.sources import check_data_config, has_eval, load_rows, option

log = logging.getLogger("jaxrlhf.data")

DROP_REASONS = (
    "schema_error",
    "empty_response",
    "empty_prompt",
    "prompt_too_long",
    "response_too_long",
    "identical_after_truncation",
)
EDIT_REASONS = (
    "prompt_truncated",
    "response_truncated",
    "joint_tokenization_mismatch",
    "template_prefix_mismatch",
)


class DataError(ValueError):
    """A row was dropped in strict mode, or a dataset cannot be built."""


class DropStats(collections.Counter):
    """``Counter`` of reasons, plus ``examples[reason]``: up to 5 ``(source_row, key)`` pairs."""

    max_examples = 5

    def __init__(self):
        super().__init__()
        self.examples: dict[str, list[tuple[int, str]]] = collections.defaultdict(list)

    def add(self, reason: str, row: int, key: str) -> None:
        self[reason] += 1
        if len(self.examples[reason]) < self.max_examples:
            self.examples[reason].append((int(row), key))

    def rows(self, reason: str) -> list[int]:
        return [r for r, _ in self.examples.get(reason, [])]

    def summary(self) -> str:
        return ", ".join(
            f"{reason}={n} (rows {', '.join(f'{r}[{k}]' for r, k in self.examples[reason])})"
            for reason, n in sorted(self.items())
        )


# ---------------------------------------------------------------------------------------------
# Tokenizer facts and rendering
# ---------------------------------------------------------------------------------------------


def start_ids(tokenizer) -> list[int]:
    """The ids the tokenizer adds before the text (``[bos]`` or ``[]``), found by probing."""
    probe = "a b"
    bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for s in range(len(full) - len(bare) + 1):
        if full[s : s + len(bare)] == bare:
            return list(full[:s])
    return []


class Renderer:
    """Renders schema records (string or chat-message contexts) to prompt/response texts."""

    def __init__(self, tokenizer, chat_template: bool | None):
        has = bool(getattr(tokenizer, "chat_template", None))
        if chat_template and not has:
            raise ValueError("config.data.chat_template=True but the tokenizer has no chat template")
        self.tokenizer = tokenizer
        self.use_template = has if chat_template is None else bool(chat_template)
        self.eos_token = tokenizer.eos_token

    def prompt(self, context: str | list[dict]) -> str:
        if isinstance(context, str):
            return context
        if self.use_template:
            return self.tokenizer.apply_chat_template(context, add_generation_prompt=True, tokenize=False)
        return _hh_render(context) + schemas.HH_ASSISTANT

    def response(self, context: str | list[dict], prompt_text: str, answer: str) -> tuple[str, bool]:
        """Returns ``(response_text, ok)``; ``ok`` is False when the chat template's rendering of
        the full conversation does not start with its rendering of the prompt."""
        if isinstance(context, str):
            return answer, True
        if not self.use_template:
            return " " + answer, True
        full = self.tokenizer.apply_chat_template(
            list(context) + [{"role": "assistant", "content": answer}], tokenize=False
        )
        ok = full.startswith(prompt_text)
        text = full[len(prompt_text) :] if ok else answer
        stripped = text.rstrip()
        if self.eos_token and stripped.endswith(self.eos_token):
            text = stripped  # "...<|im_end|>\n": end at the EOS so it is not appended twice
        return text, ok


def _hh_render(messages: list[dict]) -> str:
    parts = []
    for m in messages:
        role = m["role"]
        if role == "system":
            parts.append(m["content"])
        elif role == "assistant":
            parts.append(f"{schemas.HH_ASSISTANT} {m['content']}")
        else:
            parts.append(f"{schemas.HH_HUMAN} {m['content']}")
    return "".join(parts)


def _encode(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(x) for x in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


# ---------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------


class TokenizedDataset:
    """Common fields of the tokenized datasets (numpy token lists, no padding).

    Attributes:
      kind: ``"sft"``, ``"preference"`` or ``"prompt"``.
      schema: the schema the rows were read with.
      source_index: ``[N]`` int64, each example's row index in the source split.
      lengths: ``[N]`` int32, the padded length each example needs (preference: the longer half).
      pad_id, eos_id: from the tokenizer (``pad_id`` may equal ``eos_id``; masks never use it).
      max_length, max_prompt_length: the length policy the examples satisfy.
      drop_stats, edit_stats: :class:`DropStats` of dropped and of altered rows.
      iterator_defaults: ``seed``, ``shuffle``, ``bucket``, ``packing``, ``packed_row_buckets`` from
        ``config.data``; a
        ``BatchIterator`` uses them for the arguments it is not given.
    """

    kind = ""

    def __init__(self, *, schema, source_index, pad_id, eos_id, max_length, max_prompt_length, drop_stats,
                 edit_stats, iterator_defaults=None):  # fmt: skip
        self.schema = schema
        self.source_index = np.asarray(source_index, np.int64)
        self.pad_id = int(pad_id)
        self.eos_id = int(eos_id)
        self.max_length = int(max_length)
        self.max_prompt_length = int(max_prompt_length)
        self.drop_stats = drop_stats
        self.edit_stats = edit_stats
        self.iterator_defaults = dict(iterator_defaults or {})

    def __len__(self) -> int:
        return len(self.source_index)


def _place(row: np.ndarray, values: np.ndarray, T: int, left: bool) -> None:
    n = len(values)
    if left:
        row[T - n :] = values
    else:
        row[:n] = values


class SFTDataset(TokenizedDataset):
    """Prompt+response sequences.

    Attributes:
      ids: list of ``[L_i]`` int32 arrays, prompt then response (EOS included unless truncated).
      prompt_lens: ``[N]`` int32; ``loss_mask`` is 1 on positions ``>= prompt_lens[i]``. At least
        1: the first token of a sequence is never predicted (plain ``text`` rows without BOS).
    """

    kind = "sft"

    def __init__(self, ids, prompt_lens, **kw):
        super().__init__(**kw)
        self.ids = ids
        self.prompt_lens = np.asarray(prompt_lens, np.int32)
        self.lengths = np.asarray([len(x) for x in ids], np.int32)

    def collate(self, indices, T: int, pad_id: int, padding_side: str = "right") -> dict[str, np.ndarray]:
        """``[B, T]`` int32 ``input_ids``, ``attention_mask``, ``loss_mask``, ``positions``.

        An index of -1 gives an all-padding row (masks 0)."""
        B, left = len(indices), padding_side == "left"
        out = _empty(("input_ids", "attention_mask", "loss_mask", "positions"), B, T, pad_id)
        for b, i in enumerate(indices):
            if i < 0:
                continue
            ids, n, pl = self.ids[i], self.lengths[i], self.prompt_lens[i]
            _place(out["input_ids"][b], ids, T, left)
            _place(out["attention_mask"][b], np.ones(n, np.int32), T, left)
            _place(out["loss_mask"][b], (np.arange(n) >= pl).astype(np.int32), T, left)
            _place(out["positions"][b], np.arange(n, dtype=np.int32), T, left)
        return out

    def collate_packed(self, bins, T: int, pad_id: int) -> dict[str, np.ndarray]:
        """Packs each bin (a list of example indices, total length <= T) into one row of ``[B, T]``
        arrays with ``segment_ids`` 1, 2, ... and positions restarting at 0 per segment."""
        keys = ("input_ids", "attention_mask", "loss_mask", "positions", "segment_ids")
        out = _empty(keys, len(bins), T, pad_id)
        for b, members in enumerate(bins):
            t = 0
            for s, i in enumerate(members, start=1):
                n, pl = self.lengths[i], self.prompt_lens[i]
                if t + n > T:
                    raise ValueError(f"packed bin {members} exceeds the row length {T}")
                out["input_ids"][b, t : t + n] = self.ids[i]
                out["attention_mask"][b, t : t + n] = 1
                out["loss_mask"][b, t : t + n] = np.arange(n) >= pl
                out["positions"][b, t : t + n] = np.arange(n)
                out["segment_ids"][b, t : t + n] = s
                t += n
        return out


class PreferenceDataset(TokenizedDataset):
    """Preference pairs sharing one prompt.

    Attributes:
      prompt_ids: list of ``[P_i]`` int32 arrays.
      chosen_ids, rejected_ids: lists of response-only int32 arrays (EOS included unless
        truncated); the sequences are ``prompt + chosen`` and ``prompt + rejected``.
      margin: ``[N]`` float32 (0 where the dataset has none).
    """

    kind = "preference"

    def __init__(self, prompt_ids, chosen_ids, rejected_ids, margin, **kw):
        super().__init__(**kw)
        self.prompt_ids, self.chosen_ids, self.rejected_ids = prompt_ids, chosen_ids, rejected_ids
        self.margin = np.asarray(margin, np.float32)
        p = np.asarray([len(x) for x in prompt_ids], np.int32)
        self.chosen_lengths = p + np.asarray([len(x) for x in chosen_ids], np.int32)
        self.rejected_lengths = p + np.asarray([len(x) for x in rejected_ids], np.int32)
        self.lengths = np.maximum(self.chosen_lengths, self.rejected_lengths)

    def collate(self, indices, T: int, pad_id: int, padding_side: str = "right") -> dict[str, np.ndarray]:
        """``chosen_*`` and ``rejected_*`` ``[B, T]`` int32 arrays (both halves of a pair in the same
        row and the same ``T``) and ``margin [B]`` float32."""
        left = padding_side == "left"
        base = ("input_ids", "attention_mask", "loss_mask", "positions")
        keys = tuple(f"{h}_{k}" for h in ("chosen", "rejected") for k in base)
        out = _empty(keys, len(indices), T, pad_id)
        out["margin"] = np.zeros(len(indices), np.float32)
        for b, i in enumerate(indices):
            if i < 0:
                continue
            prompt = self.prompt_ids[i]
            out["margin"][b] = self.margin[i]
            for half, resp in (("chosen", self.chosen_ids[i]), ("rejected", self.rejected_ids[i])):
                n = len(prompt) + len(resp)
                _place(out[f"{half}_input_ids"][b], np.concatenate([prompt, resp]), T, left)
                _place(out[f"{half}_attention_mask"][b], np.ones(n, np.int32), T, left)
                lm = np.concatenate([np.zeros(len(prompt), np.int32), np.ones(len(resp), np.int32)])
                _place(out[f"{half}_loss_mask"][b], lm, T, left)
                _place(out[f"{half}_positions"][b], np.arange(n, dtype=np.int32), T, left)
        return out

    def sequence(self, i: int, half: str) -> tuple[np.ndarray, int]:
        """Pair ``i``'s ``half`` (``"chosen"`` / ``"rejected"``) sequence and its prompt length."""
        prompt = self.prompt_ids[i]
        resp = self.chosen_ids[i] if half == "chosen" else self.rejected_ids[i]
        return np.concatenate([prompt, resp]), len(prompt)

    def collate_packed(
        self, indices, T: int, pad_id: int, micro_batches: int = 1, row_multiple: int = 1
    ) -> dict[str, np.ndarray]:
        """The ``2 B`` sequences of pairs ``indices`` packed first-fit-decreasing into rows of ``T``.

        Micro-batch ``m`` (pairs ``j`` with ``j % micro_batches == m``, as
        ``jaxrlhf.trainer.step.split_micro_batches`` splits) is packed on its own into rows ``r``
        with ``r % micro_batches == m``; every micro-batch gets the same number of rows, and the
        row count ``R`` is a multiple of ``micro_batches`` and ``row_multiple`` (empty rows pad).

        Returns:
          ``input_ids``, ``attention_mask``, ``loss_mask``, ``positions``, ``segment_ids``
          ``[R, T]`` int32 (segments 1, 2, ... per row, positions restart per segment, the first
          token of a segment never in ``loss_mask``); per pair ``[B]``: ``chosen_index`` and
          ``rejected_index`` int32 (``l * T + s - 1`` for segment ``s`` of the micro-batch's
          ``l``-th row; ``per_mb_rows * T``, a slot no segment uses, for an index of -1),
          ``chosen_response_tokens`` int32 (predicted chosen tokens) and ``margin`` float32.
        """
        B, num = len(indices), int(micro_batches)
        if B % num:
            raise ValueError(f"{B} pairs are not divisible into {num} micro-batches")
        groups = []
        for m in range(num):
            seqs = [(j, h) for j in range(m, B, num) if indices[j] >= 0 for h in ("chosen", "rejected")]
            lengths = np.asarray(
                [getattr(self, f"{h}_lengths")[indices[j]] for j, h in seqs], np.int64
            ).reshape(-1)
            bins = pack_first_fit(lengths, np.arange(len(seqs)), T) if seqs else []
            groups.append([[seqs[k] for k in b] for b in bins])
        per = max(1, max(len(g) for g in groups))
        while (num * per) % max(1, int(row_multiple)):
            per += 1
        keys = ("input_ids", "attention_mask", "loss_mask", "positions", "segment_ids")
        out = _empty(keys, num * per, T, pad_id)
        index = {h: np.full(B, per * T, np.int32) for h in ("chosen", "rejected")}
        out["chosen_response_tokens"] = np.zeros(B, np.int32)
        out["margin"] = np.zeros(B, np.float32)
        for m, bins in enumerate(groups):
            for local, members in enumerate(bins):
                r, t = local * num + m, 0
                for s, (j, h) in enumerate(members, start=1):
                    ids, pl = self.sequence(indices[j], h)
                    n = len(ids)
                    out["input_ids"][r, t : t + n] = ids
                    out["attention_mask"][r, t : t + n] = 1
                    out["loss_mask"][r, t + max(pl, 1) : t + n] = 1
                    out["positions"][r, t : t + n] = np.arange(n)
                    out["segment_ids"][r, t : t + n] = s
                    index[h][j] = local * T + s - 1
                    if h == "chosen":
                        out["chosen_response_tokens"][j] = n - max(pl, 1)
                    t += n
        for j, i in enumerate(indices):
            if i >= 0:
                out["margin"][j] = self.margin[i]
        out["chosen_index"], out["rejected_index"] = index["chosen"], index["rejected"]
        return out


class PromptDataset(TokenizedDataset):
    """Prompts for rollouts (PPO, DPO-Iter).

    Attributes:
      prompt_ids: list of ``[P_i]`` int32 arrays (BOS and chat generation prompt included).
      extras: list of dicts, the row's other columns (reference answer, test cases, ...);
        ``dataset.extras[batch["index"][b]]`` finds them for a batch row.
      texts: the rendered prompt strings.
    """

    kind = "prompt"

    def __init__(self, prompt_ids, extras, texts, **kw):
        super().__init__(**kw)
        self.prompt_ids, self.extras, self.texts = prompt_ids, extras, texts
        self.lengths = np.asarray([len(x) for x in prompt_ids], np.int32)

    def row(self, index: int) -> dict:
        """The extra fields of example ``index`` (a batch's ``index`` entry) plus ``prompt`` (the
        rendered prompt text) and ``source_index`` (its row in the source split)."""
        return {
            **self.extras[index],
            "prompt": self.texts[index],
            "source_index": int(self.source_index[index]),
        }

    def collate(self, indices, T: int, pad_id: int, padding_side: str = "left") -> dict[str, np.ndarray]:
        """``prompt_ids [B, T]`` int32 **left-padded**, ``prompt_mask [B, T]``, ``index [B]`` int32
        (-1 for an all-padding row)."""
        if padding_side != "left":
            raise ValueError("prompt batches are always left-padded")
        out = {
            "prompt_ids": np.full((len(indices), T), pad_id, np.int32),
            "prompt_mask": np.zeros((len(indices), T), np.int32),
            "index": np.asarray(indices, np.int32),
        }
        for b, i in enumerate(indices):
            if i < 0:
                continue
            _place(out["prompt_ids"][b], self.prompt_ids[i], T, True)
            _place(out["prompt_mask"][b], np.ones(self.lengths[i], np.int32), T, True)
        return out


def _empty(keys, B: int, T: int, pad_id: int) -> dict[str, np.ndarray]:
    return {k: np.full((B, T), pad_id if k.endswith("input_ids") else 0, np.int32) for k in keys}


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------


def build_dataset(data_cfg, tokenizer, kind: str, split: str = "train") -> TokenizedDataset:
    """Loads ``split`` (a role, see :func:`jaxrlhf.data.load_rows`) and tokenizes it.

    Args:
      data_cfg: the ``config.data`` section.
      tokenizer: a ``transformers`` tokenizer (see :func:`jaxrlhf.data.load_tokenizer`).
      kind: ``"sft"``, ``"preference"`` or ``"prompt"``.
      split: ``"train"``, ``"eval"`` or a literal split name.

    Returns:
      An :class:`SFTDataset`, :class:`PreferenceDataset` or :class:`PromptDataset`.
    """
    rows, source_index = load_rows(data_cfg, split)
    return tokenize_rows(rows, data_cfg, tokenizer, kind, source_index=source_index, name=split)


def build_datasets(data_cfg, tokenizer, kind: str) -> tuple[TokenizedDataset, TokenizedDataset | None]:
    """``(train, eval)`` datasets; ``eval`` is None unless ``config.data`` defines eval rows."""
    train = build_dataset(data_cfg, tokenizer, kind, "train")
    return train, build_dataset(data_cfg, tokenizer, kind, "eval") if has_eval(data_cfg) else None


def tokenize_rows(rows, data_cfg, tokenizer, kind: str, *, source_index=None, name: str = "rows"):
    """Tokenizes rows (a ``datasets.Dataset`` or a list of dicts); see :func:`build_dataset`."""
    check_data_config(data_cfg)
    if isinstance(rows, list):
        columns = list(dict.fromkeys(k for r in rows for k in r))
        first = rows[0] if rows else None
    else:
        columns = list(rows.column_names)
        first = rows[0] if len(rows) else None
    schema = schemas.resolve_schema(option(data_cfg, "schema"), kind, columns, first)
    source_index = np.arange(len(rows)) if source_index is None else np.asarray(source_index)
    b = _Builder(data_cfg, tokenizer, kind, schema, name)
    for i, row in enumerate(rows):
        b.add(int(source_index[i]), row)
    return b.finish()


class _Builder:
    def __init__(self, cfg, tokenizer, kind, schema, name):
        self.cfg, self.tok, self.kind, self.schema, self.name = cfg, tokenizer, kind, schema, name
        self.renderer = Renderer(tokenizer, option(cfg, "chat_template"))
        self.opt = {
            k: option(cfg, k)
            for k in ("max_prompt_length", "max_length", "truncation", "response_truncation", "strict")
        }
        keys = ("seed", "shuffle", "bucket", "packing", "packed_row_buckets")
        self.iter_defaults = {k: option(cfg, k) for k in keys}
        self.start = start_ids(tokenizer)
        self.eos = tokenizer.eos_token_id
        if self.eos is None:
            raise DataError("the tokenizer has no eos_token")
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        self.drops, self.edits = DropStats(), DropStats()
        self.items: list[dict] = []  # rendered rows that passed the text-level checks

    def drop(self, row: int, reason: str, key: str, detail: str = "") -> None:
        if self.opt["strict"]:
            raise DataError(
                f"{self.name}: row {row} dropped ({reason}) at key {key!r}"
                + (f": {detail}" if detail else "")
                + " [config.data.strict=True]"
            )
        self.drops.add(reason, row, key)

    def add(self, row: int, raw: dict) -> None:
        try:
            rec = schemas.normalize(dict(raw), self.schema)
        except schemas.SchemaError as e:
            self.drop(row, "schema_error", e.key, str(e))
            return
        prompt_text = self.renderer.prompt(rec["context"])
        item = {"row": row, "prompt": prompt_text, "extras": rec["extras"], "margin": rec.get("margin", 0.0)}
        if self.kind == "prompt":
            if not prompt_text.strip():
                self.drop(row, "empty_prompt", "prompt")
                return
            self.items.append(item)
            return
        if self.kind == "sft":
            if "chosen" in rec:
                halves = (("response", rec["chosen"], "chosen"),)
            elif rec["response"] is None:
                self.drop(row, "schema_error", "messages", "no final assistant message to train on")
                return
            else:
                key = rec.get("response_key", {"text": "text"}.get(self.schema, "messages"))
                halves = (("response", rec["response"], key),)
        else:
            halves = (("chosen", rec["chosen"], "chosen"), ("rejected", rec["rejected"], "rejected"))
        for half, answer, key in halves:
            if not str(answer).strip():
                self.drop(row, "empty_response", key)
                return
            text, ok = self.renderer.response(rec["context"], prompt_text, str(answer))
            if not ok:
                self.edits.add("template_prefix_mismatch", row, half)
            item[half] = text
        self.items.append(item)

    def _prompt_ids(self, body: list[int]) -> list[int]:
        if self.start and body[: len(self.start)] == self.start:
            return body
        return self.start + body

    def _fit_prompt(self, row: int, ids: list[int]) -> list[int] | None:
        P = int(self.opt["max_prompt_length"])
        if len(ids) <= P:
            return ids
        if self.opt["truncation"] == "drop":
            self.drop(row, "prompt_too_long", "prompt", f"{len(ids)} tokens > max_prompt_length={P}")
            return None
        keep = len(self.start) if self.start and ids[: len(self.start)] == self.start else 0
        self.edits.add("prompt_truncated", row, "prompt")
        return ids[:keep] + ids[len(ids) - (P - keep) :]

    def _fit_response(self, row: int, key: str, prompt_len: int, ids: list[int]) -> list[int] | None:
        room = int(self.opt["max_length"]) - prompt_len
        if len(ids) <= room:
            return ids
        if self.opt["response_truncation"] == "drop":
            self.drop(row, "response_too_long", key, f"{prompt_len}+{len(ids)} tokens > max_length")
            return None
        self.edits.add("response_truncated", row, key)
        return ids[:room]

    def finish(self) -> TokenizedDataset:
        items = self.items
        prompt_body = _encode(self.tok, [it["prompt"] for it in items])
        halves = {"sft": ("response",), "preference": ("chosen", "rejected"), "prompt": ()}[self.kind]
        resp = {h: _encode(self.tok, [it[h] for it in items]) for h in halves}
        joint = {
            h: _encode(self.tok, [it["prompt"] + it[h] if it["prompt"] else "" for it in items])
            for h in halves
        }
        kept: list[dict] = []
        for k, it in enumerate(items):
            row, body = it["row"], prompt_body[k]
            for h in halves:
                if it["prompt"] and joint[h][k] != body + resp[h][k]:
                    self.edits.add("joint_tokenization_mismatch", row, h)
            prompt = self._fit_prompt(row, self._prompt_ids(body))
            if prompt is None:
                continue
            out = {"row": row, "prompt": prompt, "it": it}
            for h in halves:
                ids = resp[h][k]
                ids = ids if ids and ids[-1] == self.eos else ids + [self.eos]
                ids = self._fit_response(row, h, len(prompt), ids)
                if ids is None:
                    break
                out[h] = ids
            else:
                if self.kind == "preference" and out["chosen"] == out["rejected"]:
                    self.drop(row, "identical_after_truncation", "chosen/rejected")
                    continue
                kept.append(out)
        return self._dataset(kept)

    def _dataset(self, kept: list[dict]) -> TokenizedDataset:
        common = dict(
            schema=self.schema,
            source_index=[o["row"] for o in kept],
            pad_id=self.pad,
            eos_id=self.eos,
            max_length=self.opt["max_length"],
            max_prompt_length=self.opt["max_prompt_length"],
            iterator_defaults=self.iter_defaults,
            drop_stats=self.drops,
            edit_stats=self.edits,
        )
        arr = lambda x: np.asarray(x, np.int32)
        if self.kind == "sft":
            ds = SFTDataset(
                [arr(o["prompt"] + o["response"]) for o in kept],
                [max(1, len(o["prompt"])) for o in kept],
                **common,
            )
        elif self.kind == "preference":
            ds = PreferenceDataset(
                [arr(o["prompt"]) for o in kept],
                [arr(o["chosen"]) for o in kept],
                [arr(o["rejected"]) for o in kept],
                [o["it"]["margin"] for o in kept],
                **common,
            )
        else:
            ds = PromptDataset(
                [arr(o["prompt"]) for o in kept],
                [o["it"]["extras"] for o in kept],
                [o["it"]["prompt"] for o in kept],
                **common,
            )
        self._log(ds)
        if not len(ds):
            raise DataError(f"{self.name}: no examples left after the length policy ({self.drops.summary()})")
        return ds

    def _log(self, ds: TokenizedDataset) -> None:
        total = len(ds) + sum(self.drops.values())
        log.info(
            "data[%s]: %s dataset, schema %s: kept %d of %d rows; mean length %.1f, max %d",
            self.name, ds.kind, ds.schema, len(ds), total,
            float(np.mean(ds.lengths)) if len(ds) else 0.0, int(np.max(ds.lengths)) if len(ds) else 0,
        )  # fmt: skip
        if self.drops:
            log.warning("data[%s]: dropped rows: %s", self.name, self.drops.summary())
        if self.edits:
            log.warning("data[%s]: altered rows: %s", self.name, self.edits.summary())
