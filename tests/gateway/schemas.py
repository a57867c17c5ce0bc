"""JSON schemas for structured outputs, shared by the tests and `make bench-gateway`."""
from __future__ import annotations

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer"}}, "required": ["name", "age"],
          "additionalProperties": False}

# Twenty schemas a client might send: nested objects, arrays, enums, required and optional
# members, numbers, and strings with maxLength (kept short so a 270M model answers quickly).
S = {"type": "string", "maxLength": 10}
SCHEMAS: list[dict] = [
    {"type": "object", "properties": {"name": S}, "required": ["name"]},
    PERSON,
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    {"type": "object", "properties": {"score": {"type": "number"}}, "required": ["score"]},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": S, "maxItems": 3}}, "required": ["tags"]},
    {"type": "object", "properties": {"city": S, "country": S}, "required": ["city"]},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {
        "x": {"type": "integer"}, "y": {"type": "integer"}}, "required": ["x", "y"]}}, "required": ["point"]},
    {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 4},
    {"type": "object", "properties": {"items": {"type": "array", "items": {
        "type": "object", "properties": {"sku": S, "qty": {"type": "integer"}}, "required": ["sku", "qty"]},
        "maxItems": 2}}, "required": ["items"]},
    {"type": "object", "properties": {"title": {"type": "string", "maxLength": 20},
                                      "year": {"type": "integer"}}, "required": ["title"]},
    {"type": "object", "properties": {"status": {"const": "done"}, "note": S}, "required": ["status", "note"]},
    {"type": "object", "properties": {"when": {"type": "string", "format": "date"}}, "required": ["when"]},
    {"type": "object", "properties": {"id": {"type": "string", "format": "uuid"}}, "required": ["id"]},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}$"}}, "required": ["code"]},
    {"type": "object", "properties": {"value": {"anyOf": [{"type": "integer"}, S]}}, "required": ["value"]},
    {"type": "object", "properties": {"maybe": {"type": ["string", "null"], "maxLength": 8}}, "required": ["maybe"]},
    {"$defs": {"pair": {"type": "object", "properties": {"k": S, "v": S}, "required": ["k", "v"]}},
     "type": "object", "properties": {"first": {"$ref": "#/$defs/pair"}}, "required": ["first"]},
    {"type": "object", "properties": {"level": {"enum": [1, 2, 3]}, "label": S}, "required": ["level", "label"]},
    {"type": "object", "properties": {"a": S, "b": {"type": "array", "items": {"type": "number"}, "maxItems": 2},
                                      "c": {"type": "object", "properties": {"d": {"type": "boolean"}}}},
     "required": ["a", "b", "c"]},
]
