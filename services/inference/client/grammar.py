"""JSON Schema -> GBNF on llama.cpp's own converter, bounded so that a base model ends.

One converter serves every constrained decode: the OpenAI layer's
`response_format` and tool calls, and the agent loop's tool calls.

- `check_schema` refuses what the grammar cannot enforce (an unknown or
  unsupported keyword, a remote `$ref`, a pattern the converter cannot
  compile), naming the JSON path, so no keyword is silently dropped.
- `relax_schema` is for schemas that only guide (a tool that is not strict):
  it keeps the keywords the grammar enforces and drops the rest.
- `SchemaGrammar` turns schemas into named rules and composes them with the
  caller's own rules (call markers, a free answer) into one grammar.

A base model that never "wants" to stop must still end its output, so every
string without `maxLength`, `pattern`, `format`, `enum` or `const` gets
`max_string_chars`, every array without `maxItems` gets `max_items`, and the
generic value rules (an object or array of any shape, extra properties) are
bounded the same way. JSON strings never contain raw control characters.
"""
from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from typing import Any

from llama_cpp.llama_grammar import SchemaConverter

from services.common import errors

# Keywords the grammar enforces.
ENFORCED = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems", "maxItems",
    "enum", "const", "oneOf", "anyOf", "allOf", "$ref", "$defs", "definitions",
    "minLength", "maxLength", "pattern", "format",
})
# Keywords that say nothing about which values are valid.
ANNOTATIONS = frozenset({
    "title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated", "readOnly",
    "writeOnly", "$anchor",
})
SUPPORTED_KEYWORDS = ENFORCED | ANNOTATIONS
FORMATS = frozenset({"date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4", "uuid5"})
TYPES = frozenset({"string", "number", "integer", "boolean", "object", "array", "null"})
# A grammar spells each bound out (a length of N is N nested rules), so a caller's bounds are bounded:
# larger ones would make a grammar a node takes long to parse, or cannot.
MAX_LENGTH_BOUND = 1024
MAX_ITEMS_BOUND = 64
MAX_PROPERTIES = 128
# Keywords whose value is a map of subschemas, a list of subschemas, or one subschema.
_SCHEMA_MAPS = ("properties", "$defs", "definitions")
_SCHEMA_LISTS = ("oneOf", "anyOf", "allOf", "prefixItems")
_SCHEMA_ONE = ("items", "additionalProperties")
_UNIONS = ("oneOf", "anyOf")
# What the converter reads from each part of an allOf.
_ALL_OF_PART_KEYS = frozenset({"type", "properties", "required", "$ref", "anyOf"})
_RULE_CHARS = re.compile(r"[^a-zA-Z0-9-]+")
_LITERAL_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def gbnf_literal(text: str) -> str:
    """A GBNF string literal matching ``text`` exactly."""
    return '"' + "".join(_LITERAL_ESCAPES.get(c, c) for c in text) + '"'


# -- checking -------------------------------------------------------------------------------------------------------

def schema_problems(schema: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """(JSON path, what is wrong) for each part of ``schema`` the grammar cannot enforce."""
    if isinstance(schema, bool):
        if not schema:
            yield path, "a false schema admits no value"
        return
    if not isinstance(schema, dict):
        yield path, "a schema must be an object"
        return
    for key, value in schema.items():
        where = f"{path}.{key}" if path else key
        if key not in SUPPORTED_KEYWORDS:
            yield where, f"the JSON Schema keyword {key!r} is not supported (supported: " \
                         f"{', '.join(sorted(ENFORCED))}; annotations are allowed)"
        elif key in _SCHEMA_MAPS:
            if not isinstance(value, dict):
                yield where, "must be an object of schemas"
                continue
            if key == "properties" and len(value) > MAX_PROPERTIES:
                yield where, f"at most {MAX_PROPERTIES} properties"
                continue
            for name, sub in value.items():
                yield from schema_problems(sub, f"{where}.{name}")
        elif key in _SCHEMA_LISTS:
            if not isinstance(value, list) or not value:
                yield where, "must be a non-empty list of schemas"
                continue
            for i, sub in enumerate(value):
                yield from schema_problems(sub, f"{where}[{i}]")
        elif key in _SCHEMA_ONE:
            if not (key == "additionalProperties" and isinstance(value, bool)):
                yield from schema_problems(value, where)
        else:
            yield from _value_problems(key, value, where)
    if "allOf" in schema and isinstance(schema["allOf"], list):
        for i, part in enumerate(schema["allOf"]):
            if isinstance(part, dict) and not set(part) <= _ALL_OF_PART_KEYS | ANNOTATIONS:
                yield f"{path}.allOf[{i}]" if path else f"allOf[{i}]", \
                    "allOf is supported for object schemas of properties, required and $ref only"


def _value_problems(key: str, value: Any, where: str) -> Iterator[tuple[str, str]]:
    if key == "type":
        kinds = value if isinstance(value, list) else [value]
        if not kinds or not all(isinstance(k, str) and k in TYPES for k in kinds):
            yield where, f"must be one of {', '.join(sorted(TYPES))} or a list of them"
    elif key == "required":
        if not isinstance(value, list) or not all(isinstance(name, str) for name in value):
            yield where, "must be a list of property names"
    elif key in ("minItems", "maxItems", "minLength", "maxLength"):
        bound = MAX_LENGTH_BOUND if key.endswith("Length") else MAX_ITEMS_BOUND
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= bound:
            yield where, f"must be an integer between 0 and {bound}"
    elif key == "enum":
        if not isinstance(value, list) or not value:
            yield where, "must be a non-empty list"
    elif key == "format":
        if value not in FORMATS:
            yield where, f"the format {value!r} is not supported (supported: {', '.join(sorted(FORMATS))})"
    elif key == "pattern":
        yield from _pattern_problems(value, where)
    elif key == "$ref":
        if not isinstance(value, str) or not value.startswith("#/"):
            yield where, "only local references (#/...) are supported"


def _pattern_problems(pattern: Any, where: str) -> Iterator[tuple[str, str]]:
    if not isinstance(pattern, str) or not (pattern.startswith("^") and pattern.endswith("$")):
        yield where, "must be a regular expression anchored with ^ and $"
        return
    try:
        _Converter()._visit_pattern(pattern, "pattern")
    except (AssertionError, ValueError, IndexError, KeyError) as exc:
        yield where, f"this pattern cannot be compiled to a grammar: {exc}"


def check_schema(schema: Any, field: str) -> None:
    """InvalidArgument naming ``field`` plus the JSON path of the first part the grammar cannot enforce."""
    for path, problem in schema_problems(schema):
        raise errors.InvalidArgument(f"{field}.{path}: {problem}" if path else f"{field}: {problem}",
                                     field=f"{field}.{path}" if path else field, reason="UNSUPPORTED_SCHEMA")
    for ref in _refs(schema):
        if _lookup(schema, ref) is None:
            raise errors.InvalidArgument(f"{field}: $ref {ref!r} points at nothing", field=field,
                                         reason="UNSUPPORTED_SCHEMA")


def relax_schema(schema: Any) -> Any:
    """``schema`` without the keywords the grammar cannot enforce (for schemas that only guide)."""
    if not isinstance(schema, dict):
        return {}
    relaxed: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            if key == "properties" and len(value) > MAX_PROPERTIES:
                continue  # only guides: the grammar leaves the members open
            relaxed[key] = {name: relax_schema(sub) for name, sub in value.items()}
        elif key in _SCHEMA_LISTS and isinstance(value, list) and value:
            relaxed[key] = [relax_schema(sub) for sub in value]
        elif key in _SCHEMA_ONE:
            relaxed[key] = value if isinstance(value, bool) else relax_schema(value)
        elif key in ENFORCED and not list(_value_problems(key, value, key)):
            relaxed[key] = value
    if "allOf" in relaxed:
        # What allOf cannot carry is dropped from its parts rather than the part refused.
        relaxed["allOf"] = [{k: v for k, v in part.items() if k in _ALL_OF_PART_KEYS}
                            for part in relaxed["allOf"] if isinstance(part, dict)]
    if "$ref" in relaxed and _lookup(schema, relaxed["$ref"]) is None:
        del relaxed["$ref"]
    return relaxed


def _refs(schema: Any) -> Iterator[str]:
    if isinstance(schema, dict):
        if isinstance(schema.get("$ref"), str):
            yield schema["$ref"]
        for value in schema.values():
            yield from _refs(value)
    elif isinstance(schema, list):
        for item in schema:
            yield from _refs(item)


def _lookup(root: Any, ref: str) -> Any:
    target = root
    for part in ref.removeprefix("#/").split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(target, dict) or part not in target:
            return None
        target = target[part]
    return target


# -- bounding and normalising ---------------------------------------------------------------------------------------

def _bounded(schema: Any, max_string_chars: int, max_items: int) -> Any:
    """A copy the converter renders faithfully and a base model ends: unions absorb their siblings,
    type lists become unions, strings and arrays get length bounds."""
    if not isinstance(schema, dict):
        return {}  # true (or a false that relax_schema let through: it only guides)

    def sub(value: Any) -> Any:
        return _bounded(value, max_string_chars, max_items)

    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in ANNOTATIONS:
            continue
        if key in _SCHEMA_MAPS:
            out[key] = {name: sub(s) for name, s in value.items()}
        elif key in _SCHEMA_LISTS:
            out[key] = [sub(s) for s in value]
        elif key in _SCHEMA_ONE:
            out[key] = value if isinstance(value, bool) else sub(value)
        else:
            out[key] = value
    union_key = next((k for k in _UNIONS if k in out), None)
    siblings = {k: v for k, v in out.items() if k not in (*_UNIONS, "$defs", "definitions")}
    if union_key and siblings:
        # The converter renders a union and nothing beside it: fold the siblings into each branch.
        branches = [_merge(siblings, branch) for branch in out[union_key]]
        if union_key == "oneOf":
            _exclude_others_required(branches)
        out = {k: v for k, v in out.items() if k in ("$defs", "definitions")}
        out["anyOf"] = [_bounded(b, max_string_chars, max_items) for b in branches]
        return out
    kinds = out.get("type")
    if isinstance(kinds, list):
        rest = {k: v for k, v in out.items() if k not in ("type", "$defs", "definitions")}
        defs = {k: v for k, v in out.items() if k in ("$defs", "definitions")}
        return {**defs, "anyOf": [_bounded({**rest, "type": kind}, max_string_chars, max_items) for kind in kinds]}
    if kinds == "string" and not ({"enum", "const", "pattern", "format", "maxLength"} & out.keys()):
        out["maxLength"] = max(max_string_chars, out.get("minLength", 0))
    if out.get("items") == {}:
        del out["items"]  # items of any shape: the generic (bounded) array rule
    if kinds == "array" and "items" not in out and "prefixItems" not in out and {"minItems", "maxItems"} & out.keys():
        # The generic array rule has no counts: spell the items out so the counts apply.
        out["items"] = _bounded({"type": sorted(TYPES)}, max_string_chars, max_items)
    if "items" in out and "maxItems" not in out:
        out["maxItems"] = max(max_items, out.get("minItems", 0))
    return out


def _exclude_others_required(branches: list[dict[str, Any]]) -> None:
    """oneOf: exactly one branch holds, so a branch leaves out what only the others require."""
    required = [set(b.get("required", [])) for b in branches]
    for i, branch in enumerate(branches):
        others = set().union(*(r for j, r in enumerate(required) if j != i)) - required[i]
        if others and isinstance(branch.get("properties"), dict):
            branch["properties"] = {k: v for k, v in branch["properties"].items() if k not in others}


def _merge(siblings: dict[str, Any], branch: Any) -> dict[str, Any]:
    branch = branch if isinstance(branch, dict) else {}
    merged = {**siblings, **branch}
    if "properties" in siblings or "properties" in branch:
        merged["properties"] = {**siblings.get("properties", {}), **branch.get("properties", {})}
    if "required" in siblings or "required" in branch:
        merged["required"] = list(dict.fromkeys([*siblings.get("required", []), *branch.get("required", [])]))
    return merged


# -- the grammar ----------------------------------------------------------------------------------------------------

class _Converter(SchemaConverter):
    """llama.cpp's converter with literals escaped in full and references named per schema."""

    def __init__(self) -> None:
        super().__init__(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)

    def _format_literal(self, literal: str) -> str:
        return gbnf_literal(literal)

    def _resolve_ref(self, ref: str) -> str:
        # Two schemas may both define "#/$defs/Item": name the rule after the whole reference.
        ref_name = _RULE_CHARS.sub("-", ref).strip("-")
        if ref_name not in self._rules and ref not in self._refs_being_resolved:
            self._refs_being_resolved.add(ref)
            ref_name = self.visit(self._refs[ref], ref_name)
            self._refs_being_resolved.remove(ref)
        return ref_name


class SchemaGrammar:
    """Rules for schema-shaped JSON values plus the caller's rules, rendered as one grammar."""

    def __init__(self, max_string_chars: int, max_items: int) -> None:
        self.max_string_chars = max_string_chars
        self.max_items = max_items
        self._converter = _Converter()
        self._num_schemas = 0

    def value(self, schema: Any, name: str, field: str = "schema") -> str:
        """The name of a rule matching one JSON value of ``schema`` (checked or relaxed first)."""
        self._num_schemas += 1
        bounded = _bounded(copy.deepcopy(schema), self.max_string_chars, self.max_items)
        try:
            resolved = self._converter.resolve_refs(bounded, f"s{self._num_schemas}")
            rule: str = self._converter.visit(resolved, _RULE_CHARS.sub("-", name))
        except (AssertionError, KeyError, ValueError, TypeError, RecursionError) as exc:
            raise errors.InvalidArgument(f"{field}: this schema cannot be compiled to a grammar: {exc}",
                                         field=field, reason="UNSUPPORTED_SCHEMA") from None
        return rule

    def add(self, name: str, body: str) -> str:
        """Adds a rule written by the caller; returns its (possibly suffixed) name."""
        rule: str = self._converter._add_rule(name, body)
        return rule

    def render(self, root: str) -> str:
        """The grammar text with ``root ::= root``."""
        rules = dict(self._converter._rules)
        rules["root"] = root
        self._bound_generic_rules(rules)
        lines = [f"root ::= {root}"] + [f"{name} ::= {body}" for name, body in rules.items() if name != "root"]
        return "\n".join(lines) + "\n"

    def _bound_generic_rules(self, rules: dict[str, str]) -> None:
        more = max(self.max_items - 1, 0)
        generic = {
            "char": r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})',
            "string": f'"\\"" char{{0,{self.max_string_chars}}} "\\"" space',
            "object": f'"{{" space ( string ":" space value ( "," space string ":" space value ){{0,{more}}} )? '
                      f'"}}" space',
            "array": f'"[" space ( value ( "," space value ){{0,{more}}} )? "]" space',
        }
        for name, body in generic.items():
            if name in rules:
                rules[name] = body
        for name, body in rules.items():
            if name.endswith("additional-kvs") and body.endswith(" )*"):
                rules[name] = body[:-1] + f"{{0,{more}}}"


def tool_call_schema(name: str, parameters: Any) -> dict[str, Any]:
    """The schema of one ``{"name": name, "arguments": {...}}`` call.

    Keywords of ``parameters`` the grammar cannot enforce only guide the model
    (it is shown the whole schema): a strict tool's schema is checked instead.
    """
    return {"type": "object", "properties": {"name": {"const": name}, "arguments": relax_schema(parameters)},
            "required": ["name", "arguments"]}


def schema_grammar(schema: Any, *, max_string_chars: int, max_items: int) -> str:
    """A grammar whose whole output is one JSON value of ``schema`` (check it first)."""
    grammar = SchemaGrammar(max_string_chars, max_items)
    return grammar.render(grammar.value(schema, "value-of-schema"))
