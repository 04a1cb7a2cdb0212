"""Row schemas: detect the layout of a dataset from its columns and normalize rows.

Every schema is turned into one canonical record so tokenization has a single code path:

- ``context``: the prompt, either a string or a list of chat messages ``{"role", "content"}``
  (the messages *before* the response);
- ``response`` (SFT) or ``chosen`` / ``rejected`` (preference): the response text;
- ``margin`` (preference, optional): a float, 0 when the dataset has none;
- ``extras``: every other column of the row (reference answers, test cases, ids, ...).

A missing or ``None`` field raises :class:`SchemaError` naming the key; the caller turns it into a
counted ``schema_error`` drop (or an error in strict mode).
"""

from __future__ import annotations

from typing import Any

HH_HUMAN = "\n\nHuman:"
HH_ASSISTANT = "\n\nAssistant:"

SFT_SCHEMAS = ("prompt_completion", "messages", "text")
PREFERENCE_SCHEMAS = ("preference", "hh_rlhf", "ultrafeedback")
PROMPT_SCHEMAS = ("prompt",)
ALL_SCHEMAS = SFT_SCHEMAS + PREFERENCE_SCHEMAS + PROMPT_SCHEMAS

# Which schemas each dataset kind accepts. SFT on a preference dataset trains on ``chosen``;
# prompt datasets take the prompt of any schema that has one (the rest goes to ``extras``).
KIND_SCHEMAS = {
    "sft": SFT_SCHEMAS + PREFERENCE_SCHEMAS,
    "preference": PREFERENCE_SCHEMAS,
    "prompt": ("prompt", "prompt_completion", "messages") + PREFERENCE_SCHEMAS,
}

# Columns read by each schema (the rest of the row is kept as ``extras``).
_SCHEMA_COLUMNS = {
    "prompt_completion": ("prompt", "completion", "response"),
    "messages": ("messages",),
    "text": ("text",),
    "preference": ("prompt", "chosen", "rejected", "margin"),
    "hh_rlhf": ("chosen", "rejected", "margin"),
    "ultrafeedback": ("prompt", "chosen", "rejected", "margin"),
    "prompt": ("prompt",),
}


class SchemaError(ValueError):
    """A row does not fit its schema; ``key`` names the offending field."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def detect_schema(columns, first_row: dict | None = None) -> str:
    """Names the schema of a dataset from its column names (and its first row, to tell strings
    from message lists).

    Raises:
      ValueError: listing the columns found and the schemas accepted.
    """
    cols = set(columns)
    if {"chosen", "rejected"} <= cols:
        chosen = (first_row or {}).get("chosen")
        if "prompt" not in cols:  # HH-RLHF transcripts, or message lists (trl-lib/ultrafeedback_binarized)
            return "ultrafeedback" if isinstance(chosen, list) else "hh_rlhf"
        return "ultrafeedback" if isinstance(chosen, list) else "preference"
    if "messages" in cols:
        return "messages"
    if "prompt" in cols and ({"completion", "response"} & cols):
        return "prompt_completion"
    if "text" in cols:
        return "text"
    if "prompt" in cols:
        return "prompt"
    raise ValueError(
        f"cannot detect the data schema from columns {sorted(cols)}; accepted schemas: "
        "prompt_completion (prompt, completion|response), messages (messages), text (text), "
        "preference (prompt, chosen, rejected[, margin]), hh_rlhf (chosen, rejected), "
        "ultrafeedback (prompt, chosen/rejected message lists), prompt (prompt[, any extras]). "
        "Set config.data.schema to one of " + ", ".join(ALL_SCHEMAS)
    )


def resolve_schema(name: str, kind: str, columns, first_row: dict | None) -> str:
    """Checks (or auto-detects, for ``name="auto"``) the schema and that ``kind`` can use it."""
    if kind not in KIND_SCHEMAS:
        raise ValueError(f"unknown dataset kind {kind!r}; expected one of {sorted(KIND_SCHEMAS)}")
    schema = detect_schema(columns, first_row) if name in (None, "", "auto") else name
    if schema not in ALL_SCHEMAS:
        raise ValueError(f"unknown config.data.schema {schema!r}; expected 'auto' or one of {ALL_SCHEMAS}")
    if schema not in KIND_SCHEMAS[kind]:
        raise ValueError(
            f"schema {schema!r} cannot feed a {kind!r} dataset (columns {sorted(columns)}); "
            f"{kind!r} accepts {KIND_SCHEMAS[kind]}"
        )
    missing = [c for c in _required_columns(schema) if c not in columns]
    if missing:
        raise ValueError(f"schema {schema!r} needs columns {missing}; found {sorted(columns)}")
    return schema


def _required_columns(schema: str) -> tuple[str, ...]:
    return {
        "prompt_completion": ("prompt",),
        "messages": ("messages",),
        "text": ("text",),
        "preference": ("prompt", "chosen", "rejected"),
        "hh_rlhf": ("chosen", "rejected"),
        "ultrafeedback": ("chosen", "rejected"),
        "prompt": ("prompt",),
    }[schema]


def _get(row: dict, key: str) -> Any:
    value = row.get(key)
    if value is None:
        raise SchemaError(key, f"missing or None field {key!r}")
    return value


def _check_messages(messages: Any, key: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise SchemaError(key, f"field {key!r} must be a non-empty list of messages")
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") is None or m.get("content") is None:
            raise SchemaError(key, f"field {key!r}[{j}] must be a message dict with 'role' and 'content'")
        out.append({"role": str(m["role"]), "content": str(m["content"])})
    return out


def _split_last_assistant(messages: list[dict], key: str) -> tuple[list[dict], str]:
    if messages[-1]["role"] != "assistant":
        raise SchemaError(key, f"the last message of {key!r} must have role 'assistant'")
    return messages[:-1], messages[-1]["content"]


def _response_of(value: Any, key: str) -> tuple[list[dict] | None, str]:
    """A response column is a string, or a message list whose last assistant message is the
    response (anything before it is conversation context)."""
    if isinstance(value, str):
        return None, value
    messages = _check_messages(value, key)
    return _split_last_assistant(messages, key)


def _prompt_of(value: Any, key: str = "prompt") -> str | list[dict]:
    if isinstance(value, str):
        return value
    return _check_messages(value, key)


def _margin(row: dict) -> float:
    value = row.get("margin")
    if value is None:
        return 0.0
    try:
        return float(value)
    except (TypeError, ValueError) as e:
        raise SchemaError("margin", f"field 'margin' must be a number, got {value!r}") from e


def split_hh(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Splits two HH-RLHF transcripts into ``(prompt, chosen_response, rejected_response)``.

    The prompt is the longest common prefix of the two transcripts cut at its last
    ``"\\n\\nAssistant:"`` tag (the tag is part of the prompt); the responses are the remainders,
    leading space included (``" Sure, ..."``).
    """
    n = 0
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        n += 1
    cut = chosen[:n].rfind(HH_ASSISTANT)
    if cut < 0:
        raise SchemaError("chosen", f"no common prefix ending in {HH_ASSISTANT!r} in 'chosen'/'rejected'")
    cut += len(HH_ASSISTANT)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _extras(row: dict, schema: str) -> dict:
    used = _SCHEMA_COLUMNS[schema]
    return {k: v for k, v in row.items() if k not in used}


def normalize(row: dict, schema: str) -> dict:
    """Turns one raw row into the canonical record described in the module docstring.

    Raises:
      SchemaError: a missing/``None``/malformed field (``err.key`` names it).
    """
    extras = _extras(row, schema)
    if schema == "prompt_completion":
        key = "completion" if row.get("completion") is not None or "response" not in row else "response"
        context = _prompt_of(_get(row, "prompt"))
        prior, response = _response_of(_get(row, key), key)
        if prior:
            context = _as_messages(context) + prior
        return {"context": context, "response": response, "response_key": key,
                "extras": {**extras, "completion": response}}  # fmt: skip
    if schema == "messages":
        messages = _check_messages(_get(row, "messages"), "messages")
        if messages[-1]["role"] == "assistant":
            context, response = _split_last_assistant(messages, "messages")
        else:  # prompt-only conversation (a prompt dataset); SFT rejects it later
            context, response = messages, None
        return {"context": context, "response": response, "extras": extras}
    if schema == "text":
        return {"context": "", "response": str(_get(row, "text")), "extras": extras}
    if schema == "prompt":
        return {"context": _prompt_of(_get(row, "prompt")), "response": None, "extras": extras}
    if schema == "hh_rlhf":
        prompt, chosen, rejected = split_hh(str(_get(row, "chosen")), str(_get(row, "rejected")))
        return {"context": prompt, "chosen": chosen, "rejected": rejected, "margin": _margin(row),
                "extras": extras}  # fmt: skip
    if schema in ("preference", "ultrafeedback"):
        c_prior, chosen = _response_of(_get(row, "chosen"), "chosen")
        r_prior, rejected = _response_of(_get(row, "rejected"), "rejected")
        if c_prior != r_prior:
            raise SchemaError(
                "chosen", "'chosen' and 'rejected' conversations differ before the last message"
            )
        if c_prior:  # UltraFeedback: the conversation before the last message is the prompt
            context = c_prior
            if not any(m["role"] == "user" for m in c_prior) and row.get("prompt") is not None:
                context = _as_messages(_prompt_of(row["prompt"])) + c_prior
        else:
            context = _prompt_of(_get(row, "prompt"))
            if isinstance(row["chosen"], list):
                context = _as_messages(context)
        return {"context": context, "chosen": chosen, "rejected": rejected, "margin": _margin(row),
                "extras": extras}  # fmt: skip
    raise ValueError(f"unknown schema {schema!r}")


def _as_messages(context: str | list[dict]) -> list[dict]:
    return [{"role": "user", "content": context}] if isinstance(context, str) else list(context)
