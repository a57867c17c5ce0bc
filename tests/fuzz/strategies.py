"""Hypothesis strategies that build any protobuf message from its descriptor.

Two kinds of draws are mixed. Hostile ones lean toward the edges services
must reject cleanly: empty and very long strings, negative and huge numbers,
unknown enum numbers, odd unicode. Plausible ones use short identifiers,
small non-negative numbers, known enum values and the caller's ``hints``
(values that exist in the service, like a seeded session id), so the fuzzer
also reaches the code behind input validation instead of bouncing off it.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf import descriptor as d
from google.protobuf.message import Message
from hypothesis import strategies as st

F = d.FieldDescriptor
Hints = Mapping[str, st.SearchStrategy[Any]]

_INT32 = st.one_of(st.integers(-(2**31), 2**31 - 1), st.sampled_from([0, -1, 1, 2**31 - 1]))
_INT64 = st.one_of(st.integers(-(2**63), 2**63 - 1), st.sampled_from([0, -1, 1]))
_UINT32 = st.integers(0, 2**32 - 1)
_UINT64 = st.integers(0, 2**64 - 1)
_TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", " ", "../../etc/passwd", "{", "{}", "[]", "null", "a" * 5000, "\x00", "ü✓"]),
)

_HOSTILE: dict[int, st.SearchStrategy[Any]] = {
    F.TYPE_INT32: _INT32, F.TYPE_SINT32: _INT32, F.TYPE_SFIXED32: _INT32,
    F.TYPE_INT64: _INT64, F.TYPE_SINT64: _INT64, F.TYPE_SFIXED64: _INT64,
    F.TYPE_UINT32: _UINT32, F.TYPE_FIXED32: _UINT32,
    F.TYPE_UINT64: _UINT64, F.TYPE_FIXED64: _UINT64,
    F.TYPE_FLOAT: st.floats(allow_nan=True, allow_infinity=True, width=32),
    F.TYPE_DOUBLE: st.floats(allow_nan=True, allow_infinity=True),
    F.TYPE_BOOL: st.booleans(),
    F.TYPE_STRING: _TEXT,
    F.TYPE_BYTES: st.binary(max_size=64),
}

_SMALL = st.integers(0, 1000)
_IDENT = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=12)
_JSONISH = st.sampled_from(["{}", '{"path": "a.txt"}', '{"command": "true"}', '{"x": 1}', "[]"])
_PLAUSIBLE: dict[int, st.SearchStrategy[Any]] = {
    **{t: _SMALL for t in (F.TYPE_INT32, F.TYPE_SINT32, F.TYPE_SFIXED32, F.TYPE_INT64, F.TYPE_SINT64,
                           F.TYPE_SFIXED64, F.TYPE_UINT32, F.TYPE_FIXED32, F.TYPE_UINT64, F.TYPE_FIXED64)},
    F.TYPE_FLOAT: st.floats(0, 100, width=32),
    F.TYPE_DOUBLE: st.floats(0, 100),
    F.TYPE_BOOL: st.booleans(),
    F.TYPE_STRING: st.one_of(_IDENT, _JSONISH),
    F.TYPE_BYTES: st.binary(max_size=16),
}


@dataclass(frozen=True)
class _Profile:
    scalars: Mapping[int, st.SearchStrategy[Any]]
    known_enums_only: bool
    hints: Hints
    # Plausible draws always use a hinted field's hint; hostile ones sometimes.
    always_hint: bool


def _field_value(field: F, depth: int, p: _Profile) -> st.SearchStrategy[Any]:
    hint = p.hints.get(field.name) if field.message_type is None else None
    if hint is not None:
        return hint if p.always_hint else st.one_of(hint, _plain_value(field, depth, p))
    return _plain_value(field, depth, p)


def _plain_value(field: F, depth: int, p: _Profile) -> st.SearchStrategy[Any]:
    if field.type == F.TYPE_ENUM:
        known = [v.number for v in field.enum_type.values]
        return st.sampled_from(known) if p.known_enums_only else st.one_of(st.sampled_from(known),
                                                                          st.integers(-5, 99))
    if field.type == F.TYPE_MESSAGE:
        return _message_dict(field.message_type, depth + 1, p)
    return p.scalars[field.type]


def _message_dict(desc: d.Descriptor, depth: int, p: _Profile) -> st.SearchStrategy[dict[str, Any]]:
    if depth > 3:
        return st.just({})
    parts: dict[str, st.SearchStrategy[Any]] = {}
    for field in desc.fields:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key = _field_value(field.message_type.fields_by_name["key"], depth, p)
            value = _field_value(field.message_type.fields_by_name["value"], depth, p)
            parts[field.name] = st.dictionaries(key, value, max_size=3)
        elif field.is_repeated:
            parts[field.name] = st.lists(_field_value(field, depth, p), max_size=4)
        else:
            parts[field.name] = _field_value(field, depth, p)
    if p.always_hint:
        # Hinted fields (ids) are what a real caller always sends.
        required = {name: parts.pop(name) for name in list(parts) if name in p.hints}
        return st.fixed_dictionaries(required, optional=parts)
    return st.fixed_dictionaries({}, optional=parts)


def _fill(message: Message, values: dict[str, Any]) -> None:
    for name, value in values.items():
        field = message.DESCRIPTOR.fields_by_name[name]
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            target = getattr(message, name)
            value_field = field.message_type.fields_by_name["value"]
            for key, item in value.items():
                if value_field.message_type is not None:
                    _fill(target[key], item)
                else:
                    target[key] = item
        elif field.is_repeated:
            target = getattr(message, name)
            for item in value:
                if field.message_type is not None:
                    _fill(target.add(), item)
                else:
                    target.append(item)
        elif field.message_type is not None:
            _fill(getattr(message, name), value)
        else:
            setattr(message, name, value)


def messages(cls: type[Message], hints: Hints | None = None) -> st.SearchStrategy[Message]:
    """Random instances of ``cls``; ``hints`` maps a scalar field name (at any
    depth) to a strategy of values that exist in the service under test."""
    hints = hints or {}
    hostile = _Profile(_HOSTILE, known_enums_only=False, hints=hints, always_hint=False)
    plausible = _Profile(_PLAUSIBLE, known_enums_only=True, hints=hints, always_hint=True)

    def build(values: dict[str, Any]) -> Message:
        message = cls()
        _fill(message, values)
        return message

    drafts = st.one_of(_message_dict(cls.DESCRIPTOR, 0, hostile), _message_dict(cls.DESCRIPTOR, 0, plausible))
    return drafts.map(build)
