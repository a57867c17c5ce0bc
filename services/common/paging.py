"""Page sizes and page tokens of every List RPC (AIP-158).

A page token is opaque to clients: base64url of a version byte, an 8-byte
BLAKE2b tag and the JSON cursor (the last key the page showed). The tag covers
the scope (tenant and query) as well as the cursor, so a token cut, edited or
carried to another tenant's or another query's listing is refused with
INVALID_ARGUMENT naming ``page_token``, before its cursor is looked at. The
tag is a checksum, not a secret: a client that forges one reaches only a
cursor of its own query, which the request's own fields give it anyway.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol, TypeVar

from services.common.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1_000
#: Tokens this module writes are far shorter; a longer one is not ours.
MAX_TOKEN_CHARS = 1024
#: Cursors that are seqs, positions or timestamps fit a BIGINT column.
MAX_CURSOR = 2**63 - 1

TOKEN_VERSION = 1
_TAG_BYTES = 8
_FIELD = "page_token"

T = TypeVar("T")
Reply = TypeVar("Reply", bound="PagedReply")


class PagedReply(Protocol):
    """A List RPC's response, as far as paging goes."""

    @property
    def next_page_token(self) -> str: ...


def page_limit(page_size: int, *, default: int = DEFAULT_PAGE_SIZE, maximum: int = MAX_PAGE_SIZE) -> int:
    """0 means the default; larger than the maximum is clamped; negative is refused."""
    if page_size < 0:
        raise InvalidArgument("page_size: must not be negative", field="page_size")
    if page_size == 0:
        return default
    return min(page_size, maximum)


async def every_page(fetch: Callable[[str], Awaitable[Reply]], items: Callable[[Reply], Iterable[T]]) -> list[T]:
    """The client side: every item of a listing, ``fetch(page_token)`` one page after
    another from the first (empty token) until a reply carries no next token."""
    found: list[T] = []
    token = ""
    while True:
        reply = await fetch(token)
        found.extend(items(reply))
        token = reply.next_page_token
        if not token:
            return found


def encode_token(scope: str, cursor: Any) -> str:
    """The token that resumes ``scope``'s listing after ``cursor`` (any JSON value)."""
    payload = json.dumps(cursor, separators=(",", ":")).encode()
    body = bytes([TOKEN_VERSION]) + _tag(scope, payload) + payload
    token = base64.urlsafe_b64encode(body).decode().rstrip("=")
    if len(token) > MAX_TOKEN_CHARS:
        raise ValueError(f"a page token of {len(token)} characters is longer than {MAX_TOKEN_CHARS}")
    return token


def decode_token(token: str, scope: str) -> Any:
    """The cursor inside ``token``; None for an empty token (the first page)."""
    if not token:
        return None
    if len(token) > MAX_TOKEN_CHARS:
        raise _malformed("longer than any token this service issues")
    try:
        body = base64.urlsafe_b64decode((token + "=" * (-len(token) % 4)).encode("ascii"))
    except (binascii.Error, ValueError, UnicodeError):
        raise _malformed("not a token this service issued") from None
    if len(body) <= 1 + _TAG_BYTES:
        raise _malformed("not a token this service issued")
    if body[0] != TOKEN_VERSION:
        raise _malformed("a token of another version; start again from the first page")
    tag, payload = body[1:1 + _TAG_BYTES], body[1 + _TAG_BYTES:]
    if not hmac.compare_digest(tag, _tag(scope, payload)):
        raise _malformed("not a token of this query (another tenant's or query's, or edited)")
    try:
        return json.loads(payload)
    except (ValueError, UnicodeError, RecursionError):
        raise _malformed("not a token this service issued") from None


def cursor_int(value: Any) -> int:
    """An integer cursor in [0, 2^63) from a decoded token; anything else is a malformed token."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_CURSOR:
        raise _malformed("cursor out of range")
    return value


def _tag(scope: str, payload: bytes) -> bytes:
    digest = hashlib.blake2b(digest_size=_TAG_BYTES, person=b"llmesh-page")
    encoded = scope.encode("utf-8", "surrogatepass")
    digest.update(len(encoded).to_bytes(8, "big"))
    digest.update(encoded)
    digest.update(payload)
    return digest.digest()


def _malformed(why: str) -> InvalidArgument:
    return InvalidArgument(f"page_token: {why}", field=_FIELD)
