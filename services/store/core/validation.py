"""Input checks: every bad field becomes INVALID_ARGUMENT naming it, before any write."""
from __future__ import annotations

import json
import re

from services.common.errors import InvalidArgument, require
from services.store.core.models import ApprovalState, ControlKind, NewEvent, NewMessage

MAX_ID_CHARS = 128
MAX_TITLE_CHARS = 512
MAX_JSON_BYTES = 256 * 1024
MAX_CONTENT_BYTES = 1024 * 1024
MAX_EVENT_PAYLOAD_BYTES = 1024 * 1024
MAX_REQUEST_BYTES = 4 * 1024 * 1024
MAX_EVENTS_PER_APPEND = 1_000
MAX_MESSAGES_PER_APPEND = 500
MAX_EVENT_TYPE_CHARS = 64
MAX_LEASE_MS = 24 * 3600 * 1000
MAX_CLAIM = 1_000
# Approvals: a subject key is the policy's normalised call (a whole script, say).
MAX_SUBJECT_KEY_BYTES = 64 * 1024
MAX_APPROVER_CHARS = 256
MAX_APPROVAL_TTL_MS = 30 * 24 * 3600 * 1000
MESSAGE_ROLES = frozenset({"user", "assistant", "system", "tool", "summary"})
# Column ranges: a number past them would fail in SQL (INTERNAL) instead of here.
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1

# Ids travel in URLs, logs and SQL; keep them to a safe printable alphabet.
_ID_RE = re.compile(r"^[A-Za-z0-9._:@/+=-]+$")
# Stored text is any Unicode text except NUL (PostgreSQL text cannot hold it,
# SQLite would keep it and hand it to every reader) and lone surrogates (not
# characters: they have no UTF-8 form).
_DISALLOWED_CHAR = re.compile("[\x00\ud800-\udfff]")


def check_text(value: str, field: str) -> None:
    """Refuse text that some backend cannot store, naming the field and the offending character."""
    found = _DISALLOWED_CHAR.search(value)
    if found is not None:
        raise InvalidArgument(f"{field}: character U+{ord(found.group()):04X} at offset {found.start()} "
                              "is not allowed in stored text", field=field)


def check_int(value: int, field: str, low: int, high: int) -> None:
    require(low <= value <= high, field, f"must be between {low} and {high}")


def check_id(value: str, field: str, *, required: bool = True) -> None:
    if not value:
        require(not required, field, "is required")
        return
    require(len(value) <= MAX_ID_CHARS, field, f"longer than {MAX_ID_CHARS} characters")
    require(bool(_ID_RE.match(value)), field, "may only contain letters, digits and . _ : @ / + = -")


def _json_error(exc: ValueError) -> str:
    """The message of a json.loads failure: JSONDecodeError has ``msg``; a plain
    ValueError (an integer past the digit limit) has only its text."""
    return exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)


def _parse_json(value: str, field: str, max_bytes: int) -> object:
    """``value`` parsed, once it is text of at most ``max_bytes`` bytes that is valid JSON."""
    check_text(value, field)
    require(len(value.encode()) <= max_bytes, field, f"larger than {max_bytes} bytes")
    try:
        return json.loads(value)
    except ValueError as exc:
        raise InvalidArgument(f"{field}: not valid JSON ({_json_error(exc)})", field=field) from None


def check_json_object(value: str, field: str, *, max_bytes: int = MAX_JSON_BYTES) -> None:
    """Empty is allowed (means {}); anything else must be a JSON object."""
    if value:
        require(isinstance(_parse_json(value, field, max_bytes), dict), field, "must be a JSON object")


def check_json_value(value: str, field: str, *, max_bytes: int = MAX_JSON_BYTES) -> None:
    """Empty is allowed; anything else must be valid JSON."""
    if value:
        _parse_json(value, field, max_bytes)


def check_title(title: str) -> None:
    require(len(title) <= MAX_TITLE_CHARS, "title", f"longer than {MAX_TITLE_CHARS} characters")
    check_text(title, "title")


def check_messages(messages: list[NewMessage]) -> None:
    require(len(messages) > 0, "messages", "at least one message is required")
    require(len(messages) <= MAX_MESSAGES_PER_APPEND, "messages", f"more than {MAX_MESSAGES_PER_APPEND}")
    total = 0
    for i, msg in enumerate(messages):
        prefix = f"messages[{i}]"
        require(msg.role in MESSAGE_ROLES, f"{prefix}.role", f"must be one of {sorted(MESSAGE_ROLES)}")
        check_text(msg.content, f"{prefix}.content")
        size = len(msg.content.encode())
        require(size <= MAX_CONTENT_BYTES, f"{prefix}.content", f"larger than {MAX_CONTENT_BYTES} bytes")
        check_json_object(msg.metadata_json, f"{prefix}.metadata_json")
        check_int(msg.num_tokens, f"{prefix}.num_tokens", 0, INT32_MAX)
        total += size + len(msg.metadata_json)
    require(total <= MAX_REQUEST_BYTES, "messages", f"request larger than {MAX_REQUEST_BYTES} bytes")


def check_events(events: list[NewEvent]) -> None:
    require(len(events) > 0, "events", "at least one event is required")
    require(len(events) <= MAX_EVENTS_PER_APPEND, "events", f"more than {MAX_EVENTS_PER_APPEND}")
    total = 0
    keys: set[str] = set()
    for i, event in enumerate(events):
        prefix = f"events[{i}]"
        require(bool(event.type), f"{prefix}.type", "is required")
        require(len(event.type) <= MAX_EVENT_TYPE_CHARS, f"{prefix}.type", f"longer than {MAX_EVENT_TYPE_CHARS}")
        check_text(event.type, f"{prefix}.type")
        require(len(event.payload) <= MAX_EVENT_PAYLOAD_BYTES, f"{prefix}.payload",
                f"larger than {MAX_EVENT_PAYLOAD_BYTES} bytes")
        check_int(event.schema_version, f"{prefix}.schema_version", 0, INT32_MAX)
        if event.idempotency_key:
            require(len(event.idempotency_key) <= 2 * MAX_ID_CHARS, f"{prefix}.idempotency_key", "too long")
            check_text(event.idempotency_key, f"{prefix}.idempotency_key")
            require(event.idempotency_key not in keys, f"{prefix}.idempotency_key", "repeated within the request")
            keys.add(event.idempotency_key)
        total += len(event.payload)
    require(total <= MAX_REQUEST_BYTES, "events", f"request larger than {MAX_REQUEST_BYTES} bytes")


def check_lease_ms(lease_ms: int) -> None:
    require(0 < lease_ms <= MAX_LEASE_MS, "lease_ms", f"must be between 1 and {MAX_LEASE_MS}")


def check_seq(value: int, field: str) -> None:
    require(value >= 0, field, "must not be negative")
    require(value <= INT64_MAX, field, f"must be at most {INT64_MAX}")


def check_fencing_token(value: int) -> None:
    """0 means unfenced; a token is what AcquireSessionLock handed out, never negative."""
    check_int(value, "fencing_token", 0, INT64_MAX)


def check_approval_state(value: str, field: str) -> ApprovalState:
    states = [s.value for s in ApprovalState]
    require(value in states, field, f"must be one of {states}")
    return ApprovalState(value)


def check_control_kind(value: str, field: str) -> ControlKind:
    kinds = [k.value for k in ControlKind]
    require(value in kinds, field, f"must be one of {kinds}")
    return ControlKind(value)


def check_subject_key(value: str, field: str = "subject_key") -> None:
    require(bool(value), field, "is required")
    check_text(value, field)
    require(len(value.encode()) <= MAX_SUBJECT_KEY_BYTES, field, f"larger than {MAX_SUBJECT_KEY_BYTES} bytes")


def check_approver(value: str, field: str = "approver") -> None:
    require(len(value) <= MAX_APPROVER_CHARS, field, f"longer than {MAX_APPROVER_CHARS} characters")
    check_text(value, field)
