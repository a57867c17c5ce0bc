"""HTTP request pieces <-> protobuf messages, by the standard proto JSON mapping.

With ``servicer``-like ``http_api`` this is the only code touching messages.
Path variables and query parameters name fields by proto name or JSON name,
dotted for sub-messages (``options.max_steps``); every conversion failure is
an InvalidArgument naming the field.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any, cast

from google.protobuf import descriptor as _descriptor
from google.protobuf import json_format
from google.protobuf.message import Message

from services.common import errors
from services.gateway.core.json_body import MAX_JSON_DEPTH, loads_body

FD = _descriptor.FieldDescriptor
_INT_TYPES = {FD.TYPE_INT32, FD.TYPE_SINT32, FD.TYPE_SFIXED32, FD.TYPE_INT64, FD.TYPE_SINT64, FD.TYPE_SFIXED64,
              FD.TYPE_UINT32, FD.TYPE_FIXED32, FD.TYPE_UINT64, FD.TYPE_FIXED64}
_INT_RANGES = {
    FD.TYPE_INT32: (-(2**31), 2**31 - 1), FD.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FD.TYPE_UINT32: (0, 2**32 - 1), FD.TYPE_FIXED32: (0, 2**32 - 1),
    FD.TYPE_INT64: (-(2**63), 2**63 - 1), FD.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FD.TYPE_UINT64: (0, 2**64 - 1), FD.TYPE_FIXED64: (0, 2**64 - 1),
}
# Plain decimal integers only: int() would also take "1_000", " 7 " and non-ASCII digits.
_INTEGER = re.compile(r"[+-]?[0-9]{1,20}")
_PARSE_FIELD = re.compile(r'Failed to parse (\w+) field|has no field named "([^"]+)"|for field (\w+)')


def _descriptor_of(message: Message) -> _descriptor.Descriptor:
    # types-protobuf types Message.DESCRIPTOR as the pure-Python or the upb
    # Descriptor; both have the reflection interface used here.
    return cast(_descriptor.Descriptor, message.DESCRIPTOR)


def _field_by_name(message_type: _descriptor.Descriptor, name: str) -> FD | None:
    field = message_type.fields_by_name.get(name)
    if field is None:
        field = next((f for f in message_type.fields if f.json_name == name), None)
    return field


def _convert_scalar(field: FD, raw: str, name: str) -> Any:
    if field.type in _INT_TYPES:
        errors.require(bool(_INTEGER.fullmatch(raw)), name, f"expected an integer, got {raw[:40]!r}")
        integer = int(raw)
        low, high = _INT_RANGES[field.type]
        errors.require(low <= integer <= high, name, f"{integer} is out of range [{low}, {high}]")
        return integer
    if field.type in (FD.TYPE_FLOAT, FD.TYPE_DOUBLE):
        try:
            value = float(raw)
        except ValueError:
            raise errors.InvalidArgument(f"{name}: expected a number, got {raw[:40]!r}", field=name) from None
        errors.require(math.isfinite(value), name, "must be a finite number")
        return value
    if field.type == FD.TYPE_BOOL:
        lowered = raw.lower()
        errors.require(lowered in ("true", "false", "1", "0"), name, f"expected true or false, got {raw!r}")
        return lowered in ("true", "1")
    if field.type == FD.TYPE_ENUM:
        enum_type = field.enum_type
        assert enum_type is not None, "an enum field has an enum type"
        enum_value = enum_type.values_by_name.get(raw)
        if enum_value is None and _INTEGER.fullmatch(raw):
            enum_value = enum_type.values_by_number.get(int(raw))
        if enum_value is None:
            names = ", ".join(v.name for v in enum_type.values)
            raise errors.InvalidArgument(f"{name}: unknown value {raw[:40]!r}; expected one of {names}", field=name)
        return enum_value.number
    if field.type == FD.TYPE_STRING:
        return raw
    raise errors.InvalidArgument(f"{name}: this field cannot be set from the URL", field=name)


def set_field_path(message: Message, path: str, raw: str) -> None:
    """Set the (dotted) field ``path`` of ``message`` from a URL string."""
    target = message
    parts = path.split(".")
    for i, part in enumerate(parts):
        field = _field_by_name(_descriptor_of(target), part)
        errors.require(field is not None, path, f"no such field in {_descriptor_of(message).name}")
        assert field is not None
        if i < len(parts) - 1:
            errors.require(field.type == FD.TYPE_MESSAGE and not _is_repeated(field), path,
                           "only singular message fields can be traversed")
            target = getattr(target, field.name)
            continue
        errors.require(field.type != FD.TYPE_MESSAGE, path, "a message field cannot be set from the URL")
        value = _convert_scalar(field, raw, path)
        if _is_repeated(field):
            getattr(target, field.name).append(value)
        else:
            setattr(target, field.name, value)


def _is_repeated(field: FD) -> bool:
    return field.is_repeated


def parse_json_body(body: bytes, message: Message, *, into_field: str = "") -> None:
    """Merge a JSON body into ``message`` (or into one of its fields when the rule says ``body: "field"``)."""
    if not body.strip():
        return
    payload = loads_body(body)
    target = message
    if into_field:
        field = _field_by_name(_descriptor_of(message), into_field)
        assert field is not None and field.type == FD.TYPE_MESSAGE, "body field must be a message"
        target = getattr(message, field.name)
    errors.require(isinstance(payload, dict), "body", "expected a JSON object")
    merge_json_object(payload, target)


def merge_json_object(payload: dict[str, Any], target: Message, *, source: str = "body") -> None:
    """Merge decoded JSON into ``target`` by the proto JSON mapping; failures name the field (else ``source``)."""
    try:
        json_format.ParseDict(payload, target, max_recursion_depth=MAX_JSON_DEPTH)
    except json_format.ParseError as exc:
        raise _invalid_from_parse_error(exc) from None
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise errors.InvalidArgument(f"{source}: {exc}", field=source) from None


def _invalid_from_parse_error(exc: Exception) -> errors.InvalidArgument:
    text = str(exc)
    names = _PARSE_FIELD.findall(text)
    # The innermost field named is the one at fault.
    field = next((n for group in reversed(names) for n in group if n), "body")
    return errors.InvalidArgument(f"{field}: {text}", field=field)


def build_request(route_input: _descriptor.Descriptor, request_class: type[Message], *, body_rule: str, body: bytes,
                  path_vars: dict[str, str], query: Iterable[tuple[str, str]]) -> Message:
    """The request message for one HTTP call: body first, then query, then path (path wins)."""
    message = request_class()
    if body_rule == "*":
        parse_json_body(body, message)
    elif body_rule:
        parse_json_body(body, message, into_field=body_rule)
    for key, raw in query:
        # With body "*" every field comes from the body; grpc-gateway rejects query fields then too.
        errors.require(body_rule != "*", key, "query parameters are not accepted here; put fields in the JSON body")
        errors.require(key.split(".")[0] not in path_vars, key, "is bound by the URL path")
        set_field_path(message, key, raw)
    for path, raw in path_vars.items():
        set_field_path(message, path, raw)
    return message


def apply_resume_point(message: Message, after_seq: int | None) -> None:
    """Last-Event-ID becomes ``after_seq`` on requests that have one (the later of the two wins)."""
    field = _descriptor_of(message).fields_by_name.get("after_seq")
    if after_seq is None or field is None:
        return
    low, high = _INT_RANGES.get(field.type, (0, 0))
    errors.require(low <= after_seq <= high, "Last-Event-ID", f"{after_seq} is out of range [{low}, {high}]")
    setattr(message, field.name, max(after_seq, getattr(message, field.name)))


def message_to_json(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message, always_print_fields_with_no_presence=True)
