"""The one page-token format: opaque, versioned, bound to its query, bounded in length."""
from __future__ import annotations

import base64

import pytest

from services.common.errors import InvalidArgument
from services.common.paging import MAX_CURSOR, MAX_TOKEN_CHARS, cursor_int, decode_token, encode_token, page_limit


def refused(token: str, scope: str = "events:acme:s1") -> InvalidArgument:
    with pytest.raises(InvalidArgument) as caught:
        decode_token(token, scope)
    assert caught.value.field == "page_token" and caught.value.message.startswith("page_token: ")
    return caught.value


@pytest.mark.parametrize("cursor", [0, 42, MAX_CURSOR, "fs_read", [1700000000000, "s1"], {"after": 3}])
def test_round_trip_of_any_json_cursor(cursor) -> None:
    token = encode_token("events:acme:s1", cursor)
    assert decode_token(token, "events:acme:s1") == cursor
    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def test_empty_token_is_the_first_page() -> None:
    assert decode_token("", "anything") is None


def test_a_token_of_another_tenant_or_query_is_refused() -> None:
    token = encode_token("events:acme:s1", 42)
    refused(token, "events:other:s1")
    refused(token, "messages:acme:s1")


def test_garbage_edits_and_other_versions_are_refused() -> None:
    token = encode_token("events:acme:s1", 42)
    body = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    edited = bytearray(body)
    edited[-1] ^= 1  # the cursor's last digit
    other_version = bytearray(body)
    other_version[0] = 2
    for bad in ("garbage!", "%%%not-base64", "AAAA", "e30", "ÿ", token[:-2], _b64(edited), _b64(other_version),
                base64.urlsafe_b64encode(b'{"s":"events:acme:s1","c":42}').decode()):
        refused(bad)
    assert "version" in refused(_b64(other_version)).message


def test_length_is_bounded_both_ways() -> None:
    refused("A" * (MAX_TOKEN_CHARS + 1))
    with pytest.raises(ValueError):
        encode_token("x", "y" * MAX_TOKEN_CHARS)


def test_integer_cursors_are_range_checked() -> None:
    assert cursor_int(0) == 0 and cursor_int(MAX_CURSOR) == MAX_CURSOR == 2**63 - 1
    for bad in (-1, 2**63, 2**70, 1.5, True, "1", None, [1]):
        with pytest.raises(InvalidArgument) as caught:
            cursor_int(bad)
        assert caught.value.field == "page_token"


def test_page_limit_defaults_clamps_and_refuses_negative() -> None:
    assert page_limit(0) == 100 and page_limit(7) == 7 and page_limit(5000) == 1000
    assert page_limit(0, default=20, maximum=50) == 20 and page_limit(80, default=20, maximum=50) == 50
    with pytest.raises(InvalidArgument) as caught:
        page_limit(-1)
    assert caught.value.field == "page_size"


def _b64(raw: bytes | bytearray) -> str:
    return base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("=")
