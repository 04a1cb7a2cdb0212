"""Local path or hub id: the one rule every loader (tokenizer, model, reward model, data) uses.

- A string that names an existing file or directory is local.
- A string that *looks local* and does not exist is an error naming it ("no such file or
  directory: <path> (config.<key>)"): it starts with ``/``, ``./``, ``../`` or ``~``, has more than
  one path separator (a hub id is ``name`` or ``org/name``), or ends with a file extension
  (``.jsonl``, ``.safetensors``, ...).
- Otherwise it is tried on the hub only if it is a valid hub id (``huggingface_hub``'s
  ``validate_repo_id``: ``[org/]name`` of letters, digits, ``-``, ``_``, ``.``, at most 96
  characters per part); anything else is an error saying it is neither.
"""

from __future__ import annotations

import errno
import os
import re

FILE_EXTENSIONS = (
    ".json", ".jsonl", ".parquet", ".csv", ".tsv", ".arrow", ".txt", ".gz", ".zip", ".tar",
    ".safetensors", ".bin", ".pt", ".pth", ".pkl", ".model", ".npz", ".npy", ".yaml", ".yml",
)  # fmt: skip
# huggingface_hub's REPO_ID_REGEX (used when huggingface_hub is not installed).
_REPO_ID = re.compile(r"(\b[\w\-.]{1,96}\b/)?\b[\w\-.]{1,96}\b")


def looks_local(path: str) -> bool:
    """Whether ``path`` has the shape of a filesystem path rather than of a hub id."""
    p = str(path)
    separators = p.count("/") + (p.count(os.sep) if os.sep != "/" else 0)
    return (
        p.startswith(("/", "./", "../", "~"))
        or separators > 1
        or p.lower().endswith(FILE_EXTENSIONS)
        or (os.sep != "/" and os.sep in p)
    )


def looks_like_hub_id(path: str) -> bool:
    """Whether ``path`` is worth trying on the HF hub: not local-looking and a valid repo id."""
    p = str(path)
    if not p or looks_local(p):
        return False
    try:
        from huggingface_hub.utils import HFValidationError, validate_repo_id
    except ImportError:
        return bool(_REPO_ID.fullmatch(p)) and "--" not in p and ".." not in p and not p.endswith(".git")
    try:
        validate_repo_id(p)
    except HFValidationError:
        return False
    return True


def _where(config_key: str | None) -> str:
    return f" (config.{config_key})" if config_key else ""


def missing(path: str, config_key: str | None = None) -> FileNotFoundError:
    """The error for a local path that does not exist."""
    return FileNotFoundError(errno.ENOENT, f"no such file or directory: {path}{_where(config_key)}")


def classify(path: str, config_key: str | None = None) -> str:
    """``"local"`` (exists) or ``"hub"`` (a hub id); raises for a missing local-looking path.

    Raises:
      FileNotFoundError: ``path`` looks local and does not exist.
      ValueError: ``path`` is empty, or neither an existing path nor a valid hub id.
    """
    p = str(path)
    if not p:
        raise ValueError(f"empty path{_where(config_key)}")
    if os.path.exists(os.path.expanduser(p)):
        return "local"
    if looks_local(p):
        raise missing(p, config_key)
    if looks_like_hub_id(p):
        return "hub"
    raise ValueError(
        f"{p!r}{_where(config_key)} is neither an existing file or directory nor a hub id "
        "(name or org/name of letters, digits, '-', '_', '.')"
    )
