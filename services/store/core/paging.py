"""Opaque page tokens and page sizes shared by every List/Read RPC."""
from __future__ import annotations

import base64
import binascii
import json
from typing import Any, Awaitable, Callable, Sequence, TypeVar

from services.common.errors import InvalidArgument

Row = TypeVar("Row")

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1_000
# Cursors are seqs, positions or timestamps: BIGINT columns.
MAX_CURSOR = 2**63 - 1
# Tokens this module writes are far shorter; a longer one is not ours.
MAX_TOKEN_CHARS = 1024


def page_limit(page_size: int) -> int:
    """0 means the default; larger than the maximum is clamped (AIP-158)."""
    if page_size < 0:
        raise InvalidArgument("page_size: must not be negative", field="page_size")
    if page_size == 0:
        return DEFAULT_PAGE_SIZE
    return min(page_size, MAX_PAGE_SIZE)


def encode_token(scope: str, cursor: Any) -> str:
    raw = json.dumps({"s": scope, "c": cursor}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str, scope: str) -> Any:
    """The cursor inside ``token``; None for an empty token.

    The scope (tenant + query) is part of the token so a token from one
    tenant's listing cannot be replayed against another's.
    """
    if not token:
        return None
    if len(token) > MAX_TOKEN_CHARS:
        raise InvalidArgument("page_token: malformed", field="page_token")
    try:
        padded = token + "=" * (-len(token) % 4)
        body = json.loads(base64.urlsafe_b64decode(padded.encode()))
    except (binascii.Error, ValueError, UnicodeError, RecursionError):
        raise InvalidArgument("page_token: malformed", field="page_token") from None
    if not isinstance(body, dict) or body.get("s") != scope or "c" not in body:
        raise InvalidArgument("page_token: does not belong to this query", field="page_token")
    return body["c"]


def cursor_int(value: Any) -> int:
    """An integer cursor from a decoded token; anything a BIGINT cannot hold is a malformed token."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_CURSOR:
        raise InvalidArgument("page_token: malformed", field="page_token")
    return value


async def page_after(scope: str, after: int, page_size: int, page_token: str,
                     fetch: Callable[[int, int], Awaitable[Sequence[Row]]],
                     position: Callable[[Row], int]) -> tuple[list[Row], str]:
    """One page of rows past ``after`` (a seq or position), resuming from ``page_token``.

    ``fetch(after, limit)`` returns rows in order; asking for one more than the
    page tells whether another page follows.
    """
    limit = page_limit(page_size)
    cursor = decode_token(page_token, scope)
    if cursor is not None:
        after = max(after, cursor_int(cursor))
    rows = list(await fetch(after, limit + 1))
    if len(rows) <= limit:
        return rows, ""
    rows = rows[:limit]
    return rows, encode_token(scope, position(rows[-1]))
