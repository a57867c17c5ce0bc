"""Messages of the WebSocket transport: what a client may send, checked field by field.

Every client message is a JSON object (a text message) with a ``type``, an
optional ``id`` that is echoed in what answers it, and the fields of its
type. Nothing is silently ignored: a binary message, bad JSON, an unknown
type or a field its type does not have is an InvalidArgument naming it
(``message``, ``type``, the field). The fields of the types that stand for
an orchestrator request are that request's, parsed by the proto JSON
mapping where the transport is (services/gateway/websocket.py).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from services.common import errors
from services.gateway.core.json_body import loads_body

# Types a client may send once authenticated; "auth" is taken only as the first message.
CLIENT_TYPES = ("run", "resume", "cancel", "approve", "ping")
ENVELOPE_FIELDS = ("type", "id")
MAX_ID_CHARS = 128


@dataclass(frozen=True)
class ClientMessage:
    type: str
    id: str | int | None = None
    fields: dict[str, Any] = field(default_factory=dict)

    def with_id(self) -> dict[str, Any]:
        """The ``id`` to echo, as a dict to spread into a reply."""
        return {} if self.id is None else {"id": self.id}


def parse_json_message(message: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON object an ASGI ``websocket.receive`` event carries."""
    text = message.get("text")
    if text is None:
        raise errors.InvalidArgument("message: binary messages are not accepted; send JSON as text",
                                     field="message")
    try:
        payload = loads_body(text.encode("utf-8", "surrogatepass"))
    except errors.InvalidArgument as exc:
        # loads_body names the HTTP body; here the whole message is at fault.
        raise errors.InvalidArgument("message: " + exc.message.removeprefix("body: "), field="message",
                                     reason=exc.reason) from None
    errors.require(isinstance(payload, dict), "message", "expected a JSON object")
    return payload


def check_id(value: Any) -> str | int | None:
    if value is None:
        return None
    is_int = isinstance(value, int) and not isinstance(value, bool) and -(2**53) < value < 2**53
    errors.require(is_int or (isinstance(value, str) and len(value) <= MAX_ID_CHARS), "id",
                   f"must be a string of at most {MAX_ID_CHARS} characters or an integer")
    return value


def parse_client_message(message: Mapping[str, Any], allowed: tuple[str, ...] = CLIENT_TYPES) -> ClientMessage:
    """Split a client message into its type, id and fields; refuses unknown types naming ``type``."""
    payload = parse_json_message(message)
    kind = payload.get("type")
    errors.require(isinstance(kind, str) and bool(kind), "type",
                   f"required: a string, one of {', '.join(allowed)}")
    assert isinstance(kind, str)
    if kind == "auth" and kind not in allowed:
        raise errors.InvalidArgument("type: 'auth' is taken only as the first message of a connection opened "
                                     "without an Authorization header; this one is authenticated already",
                                     field="type", reason="UNEXPECTED_MESSAGE_TYPE")
    if kind not in allowed:
        raise errors.InvalidArgument(f"type: unknown message type {kind[:40]!r}; expected one of "
                                     f"{', '.join(allowed)}", field="type", reason="UNKNOWN_MESSAGE_TYPE")
    message_id = check_id(payload.get("id"))
    fields = {k: v for k, v in payload.items() if k not in ENVELOPE_FIELDS}
    return ClientMessage(kind, message_id, fields)


def refuse_fields(message: ClientMessage, allowed: tuple[str, ...] = ()) -> None:
    """For messages whose fields are not a proto request: anything but ``allowed`` is refused, naming it."""
    for name in message.fields:
        if name not in allowed:
            known = ", ".join((*ENVELOPE_FIELDS, *allowed))
            raise errors.InvalidArgument(f"{name}: not a field of a {message.type!r} message (fields: {known})",
                                         field=name, reason="UNKNOWN_FIELD")

