"""Tool names as agent runtimes accept them: ^[a-zA-Z0-9_-]{1,64}$."""
from __future__ import annotations

import hashlib
import re

MAX_NAME_LEN = 64
VALID_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_INVALID_CHARS = re.compile(r"[^a-zA-Z0-9_-]")
_HASH_LEN = 8


def sanitize(part: str) -> str:
    cleaned = _INVALID_CHARS.sub("_", part)
    return cleaned or "_"


def mcp_qualified(server: str, tool: str) -> str:
    """``mcp__<server>__<tool>`` before length and collision handling."""
    return f"mcp__{sanitize(server)}__{sanitize(tool)}"


def with_hash_suffix(name: str, original: str) -> str:
    """Cut ``name`` and append a short hash of ``original`` so it fits and is unique."""
    digest = hashlib.sha256(original.encode("utf-8")).hexdigest()[:_HASH_LEN]
    return f"{name[: MAX_NAME_LEN - _HASH_LEN - 1]}_{digest}"


def normalize(candidate: str, original: str, taken: set[str]) -> str:
    """A valid name for ``candidate``, unique among ``taken``.

    ``original`` (what the tool is called where it lives, plus its origin)
    seeds the hash so the same tool keeps the same name across refreshes.
    """
    name = sanitize(candidate)
    if len(name) > MAX_NAME_LEN or name in taken:
        name = with_hash_suffix(name, original)
    salt = 0
    while name in taken:  # a hash collision or a clash with a name that already carries a suffix
        salt += 1
        name = with_hash_suffix(sanitize(candidate), f"{original}#{salt}")
    assert VALID_NAME.match(name), name
    return name
