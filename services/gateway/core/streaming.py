"""Framing of server-streaming replies: Server-Sent Events or NDJSON."""
from __future__ import annotations

import json
import re
from typing import Any

SSE_MEDIA_TYPE = "text/event-stream"
NDJSON_MEDIA_TYPE = "application/x-ndjson"
# Event seqs are int64 on the wire.
MAX_EVENT_SEQ = 2**63 - 1
_DIGITS = re.compile(r"[0-9]{1,19}")


def choose_stream_format(accept: str | None) -> str:
    """NDJSON only when asked for; SSE is the default (what browsers and old clients expect)."""
    accept = (accept or "").lower()
    if NDJSON_MEDIA_TYPE in accept or "application/jsonl" in accept:
        return NDJSON_MEDIA_TYPE
    return SSE_MEDIA_TYPE


def _compact(payload: Any) -> str:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False)


def sse_frame(payload: Any, *, event_id: str | None = None, event: str | None = None) -> bytes:
    """One SSE event. JSON has no raw newlines, so ``data:`` is a single line."""
    lines = []
    if event_id is not None:
        lines.append(f"id: {event_id}")
    if event is not None:
        lines.append(f"event: {event}")
    lines.append("data: " + _compact(payload))
    return ("\n".join(lines) + "\n\n").encode()


def sse_comment(text: str) -> bytes:
    return f": {text}\n\n".encode()


def ndjson_line(payload: Any) -> bytes:
    return (_compact(payload) + "\n").encode()


def find_seq(payload: Any) -> str | None:
    """The event seq of a streamed message, for SSE ``id:``.

    Looks at ``seq`` on the message and on its direct sub-messages (e.g.
    ``RunResponse.event.seq``); int64 is a string in proto JSON.
    """
    if not isinstance(payload, dict):
        return None
    if "seq" in payload:
        return str(payload["seq"])
    for value in payload.values():
        if isinstance(value, dict) and "seq" in value:
            return str(value["seq"])
    return None


def parse_last_event_id(value: str | None) -> int | None:
    """Last-Event-ID as a seq, or None when absent; anything but a seq in [0, 2^63) is a client error."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    if not _DIGITS.fullmatch(text) or int(text) > MAX_EVENT_SEQ:
        raise ValueError(f"Last-Event-ID: must be an event seq between 0 and {MAX_EVENT_SEQ}, got {text[:40]!r}")
    return int(text)
