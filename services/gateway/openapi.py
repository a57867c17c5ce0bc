"""OpenAPI 3.1 document built from the same route table the handler serves.

Message schemas follow the proto JSON mapping: lowerCamelCase names (the
parser also accepts proto names), 64-bit integers as decimal strings or
numbers, enums by name, Timestamp as RFC 3339 text.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from google.protobuf import descriptor as _descriptor

from services.gateway.core import streaming
from services.gateway.routes import Route

FD = _descriptor.FieldDescriptor

_INT32 = {FD.TYPE_INT32: ("int32", -(2**31), 2**31 - 1), FD.TYPE_SINT32: ("int32", -(2**31), 2**31 - 1),
          FD.TYPE_SFIXED32: ("int32", -(2**31), 2**31 - 1), FD.TYPE_UINT32: ("int64", 0, 2**32 - 1),
          FD.TYPE_FIXED32: ("int64", 0, 2**32 - 1)}
_INT64 = {FD.TYPE_INT64: (-(2**63), 2**63 - 1), FD.TYPE_SINT64: (-(2**63), 2**63 - 1),
          FD.TYPE_SFIXED64: (-(2**63), 2**63 - 1), FD.TYPE_UINT64: (0, 2**64 - 1), FD.TYPE_FIXED64: (0, 2**64 - 1)}
_WELL_KNOWN: dict[str, dict[str, Any]] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]{1,9})?s$"},
    "google.protobuf.Struct": {"type": "object"},
    "google.protobuf.Value": {},
    "google.protobuf.Empty": {"type": "object", "additionalProperties": False},
}

ERROR_SCHEMA = {
    "type": "object",
    "properties": {"error": {"type": "object", "properties": {
        "code": {"type": "integer"}, "status": {"type": "string"}, "message": {"type": "string"},
        "details": {"type": "array", "items": {"type": "object"}}}}},
}


class SchemaBuilder:
    def __init__(self) -> None:
        self.schemas: dict[str, Any] = {"Error": ERROR_SCHEMA}

    def ref(self, message: _descriptor.Descriptor, exclude: frozenset[str] = frozenset()) -> dict[str, Any]:
        if message.full_name in _WELL_KNOWN:
            return dict(_WELL_KNOWN[message.full_name])
        if exclude:
            return self._object(message, exclude)  # bodies without their path fields stay inline
        if message.full_name not in self.schemas:
            self.schemas[message.full_name] = {}  # placeholder first: messages may be recursive
            self.schemas[message.full_name] = self._object(message, frozenset())
        return {"$ref": f"#/components/schemas/{message.full_name}"}

    def _object(self, message: _descriptor.Descriptor, exclude: frozenset[str]) -> dict[str, Any]:
        properties = {f.json_name: self.field_schema(f) for f in message.fields if f.name not in exclude}
        return {"type": "object", "properties": properties, "additionalProperties": False}

    def field_schema(self, field: FD) -> dict[str, Any]:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value = field.message_type.fields_by_name["value"]
            return {"type": "object", "additionalProperties": self.scalar_schema(value)}
        item = self.scalar_schema(field)
        if field.is_repeated:
            return {"type": "array", "items": item}
        return item

    def scalar_schema(self, field: FD) -> dict[str, Any]:
        if field.type == FD.TYPE_MESSAGE:
            assert field.message_type is not None, "a message field has a message type"
            return self.ref(field.message_type)
        if field.type in _INT32:
            fmt, low, high = _INT32[field.type]
            return {"type": "integer", "format": fmt, "minimum": low, "maximum": high}
        if field.type in _INT64:
            low, high = _INT64[field.type]
            return {"oneOf": [{"type": "string", "pattern": r"^-?[0-9]{1,19}$"},
                              {"type": "integer", "minimum": low, "maximum": high}]}
        if field.type in (FD.TYPE_FLOAT, FD.TYPE_DOUBLE):
            return {"type": "number", "format": "float" if field.type == FD.TYPE_FLOAT else "double"}
        if field.type == FD.TYPE_BOOL:
            return {"type": "boolean"}
        if field.type == FD.TYPE_ENUM:
            assert field.enum_type is not None, "an enum field has an enum type"
            return {"type": "string", "enum": [v.name for v in field.enum_type.values]}
        if field.type == FD.TYPE_BYTES:
            return {"type": "string", "contentEncoding": "base64"}
        return {"type": "string"}


def _query_parameters(route: Route, builder: SchemaBuilder, path_fields: frozenset[str]) -> list[dict[str, Any]]:
    params = []
    for field in route.input_type.fields:
        if field.name in path_fields or field.type == FD.TYPE_MESSAGE:
            continue
        schema = builder.field_schema(field)
        param: dict[str, Any] = {"name": field.name, "in": "query", "required": False, "schema": schema}
        if field.is_repeated:
            param.update(style="form", explode=True)
        params.append(param)
    return params


def _path_parameters(route: Route, builder: SchemaBuilder) -> list[dict[str, Any]]:
    params = []
    for path in route.template.variables:
        message: _descriptor.Descriptor | None = route.input_type
        field: FD | None = None
        for part in path.split("."):
            assert message is not None, f"{path}: only message fields have sub-fields"
            field = message.fields_by_name[part]
            message = field.message_type
        assert field is not None
        schema = builder.scalar_schema(field)
        if schema.get("type") == "string" and "enum" not in schema:
            # One URL segment: no '/', and not empty.
            schema = {"type": "string", "pattern": "^[^/]+$", "minLength": 1}
        params.append({"name": path, "in": "path", "required": True, "schema": schema})
    return params


def _operation(route: Route, builder: SchemaBuilder) -> dict[str, Any]:
    path_fields = frozenset(v.split(".")[0] for v in route.template.variables)
    parameters = _path_parameters(route, builder)
    operation: dict[str, Any] = {
        "operationId": route.operation_id,
        "tags": [route.method.containing_service.name],
        "summary": f"{route.method.containing_service.full_name}.{route.method.name}",
    }
    if route.body == "*":
        operation["requestBody"] = {"required": False, "content": {
            "application/json": {"schema": builder.ref(route.input_type, exclude=path_fields)}}}
    else:
        if route.body:
            field = route.input_type.fields_by_name[route.body]
            assert field.message_type is not None, f"body field {route.body} must be a message"
            operation["requestBody"] = {"content": {"application/json": {"schema": builder.ref(field.message_type)}}}
        parameters += _query_parameters(route, builder, path_fields | {route.body})
    if route.server_streaming:
        item = builder.ref(route.output_type)
        parameters.append({"name": "Last-Event-ID", "in": "header", "required": False,
                           "description": "Resume after this event seq (SSE reconnects send it).",
                           "schema": {"type": "string", "pattern": "^[0-9]{1,18}$"}})
        ok = {"description": "Server-Sent Events (id: event seq), or NDJSON with Accept: "
                             "application/x-ndjson",
              "content": {streaming.SSE_MEDIA_TYPE: {"schema": {"type": "string"}, "itemSchema": item},
                          streaming.NDJSON_MEDIA_TYPE: {"schema": {"type": "string"}, "itemSchema": item}}}
    else:
        ok = {"description": "OK", "content": {"application/json": {"schema": builder.ref(route.output_type)}}}
    error = {"description": "Error",
             "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    operation["parameters"] = parameters
    operation["responses"] = {"200": ok, "default": error}
    return operation


def build_openapi(routes: Sequence[Route], *, title: str = "llmesh REST API", version: str = "v1",
                  extra_paths: dict[str, Any] | None = None) -> dict[str, Any]:
    builder = SchemaBuilder()
    paths: dict[str, Any] = {}
    for route in routes:
        paths.setdefault(route.template.openapi_path, {})[route.http_method.lower()] = _operation(route, builder)
    for path, item in (extra_paths or {}).items():
        paths.setdefault(path, {}).update(item)
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version,
                 "description": "Generated from the google.api.http annotations of the llmesh protos."},
        "paths": dict(sorted(paths.items())),
        "components": {"schemas": builder.schemas,
                       "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}}},
        "security": [{"apiKey": []}],
    }
