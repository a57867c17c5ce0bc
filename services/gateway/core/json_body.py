"""Decoding of untrusted JSON request bodies, with bounded cost and depth.

Every JSON body the REST layer reads goes through ``loads_body``: UTF-8
only, nesting at most ``MAX_JSON_DEPTH`` levels (checked before decoding,
without recursion), no duplicate keys, no NaN/Infinity, no lone surrogates.
Each failure is an InvalidArgument naming ``body``, so bad input is a 400
and never reaches code that could recurse or choke on it.
"""
from __future__ import annotations

import itertools
import json
import operator
import re
from typing import Any

from services.common import errors

MAX_JSON_DEPTH = 64

# A JSON string once escaped backslashes and quotes are gone.
_STRING = re.compile(rb'"[^"]*"')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
# After stripping all but brackets: an opening bracket is +1, a closing one -1 (as 2 and 0, minus 1).
_STEPS = bytes.maketrans(b"[{]}", b"\x02\x02\x00\x00")
_CHUNK = 64 * 1024
# A \uD800-\uDFFF escape: the only way a decoded string can hold a surrogate.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def nesting_exceeds(body: bytes, max_depth: int) -> bool:
    """Whether the brackets of ``body`` (outside strings) nest deeper than ``max_depth``.

    Runs in C-level passes over the bytes, with no recursion, stopping at the
    first chunk that goes too deep; unbalanced input is left to the parser.
    """
    unescaped = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    brackets = _STRING.sub(b"", unescaped).translate(None, _NOT_BRACKETS)
    if brackets.count(b"[") + brackets.count(b"{") <= max_depth:
        return False
    steps = brackets.translate(_STEPS)
    depth = 0
    for start in range(0, len(steps), _CHUNK):
        levels = list(itertools.accumulate(map(operator.sub, steps[start:start + _CHUNK], itertools.repeat(1)),
                                           initial=depth))
        if max(levels) > max_depth:
            return True
        depth = levels[-1]
    return False


def _refuse_constant(name: str) -> Any:
    raise errors.InvalidArgument(f"body: {name} is not a JSON number", field="body")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise errors.InvalidArgument(f"body: duplicate key {key!r}", field="body")
            seen.add(key)
    return result


def _has_lone_surrogate(payload: Any) -> bool:
    try:
        json.dumps(payload, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def loads_body(body: bytes, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """The decoded JSON value of a request body, or InvalidArgument naming ``body``."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise errors.InvalidArgument(f"body: not valid UTF-8 (byte {exc.start})", field="body") from None
    if nesting_exceeds(body, max_depth):
        raise errors.InvalidArgument(f"body: JSON nested deeper than {max_depth} levels", field="body",
                                     reason="JSON_TOO_DEEP")
    try:
        payload = json.loads(text, parse_constant=_refuse_constant, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        raise errors.InvalidArgument(f"body: not valid JSON ({exc})", field="body") from None
    except (ValueError, RecursionError) as exc:
        # e.g. an integer longer than Python converts (int_max_str_digits).
        raise errors.InvalidArgument(f"body: not valid JSON ({exc})", field="body") from None
    if _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(payload):
        raise errors.InvalidArgument("body: a \\u escape encodes a lone surrogate, which is not a character",
                                     field="body")
    return payload
