"""Paging over the store's ordered rows, with the mesh's one page-token format."""
from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from services.common.paging import cursor_int, decode_token, encode_token, page_limit

__all__ = ["cursor_int", "decode_token", "encode_token", "page_after", "page_limit"]

Row = TypeVar("Row")


async def page_after(scope: str, after: int, page_size: int, page_token: str,
                     fetch: Callable[[int, int], Awaitable[Sequence[Row]]],
                     position: Callable[[Row], int]) -> tuple[list[Row], str]:
    """One page of rows past ``after`` (a seq or position), resuming from ``page_token``.

    ``fetch(after, limit)`` returns rows in order; asking for one more than the
    page tells whether another page follows. The scope (tenant + query) is
    bound into the token, so a token from one tenant's listing cannot be
    replayed against another's.
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
