"""JSON Schema -> GBNF: what is refused (by JSON path), what is bounded, and that llama.cpp parses the result."""
from __future__ import annotations

import llama_cpp
import pytest

from services.common.errors import InvalidArgument
from services.inference.client.grammar import SchemaGrammar, check_schema, gbnf_literal, relax_schema, schema_grammar


def parses(text: str) -> bool:
    return llama_cpp.LlamaGrammar.from_string(text, verbose=False) is not None


@pytest.mark.parametrize(("schema", "path"), [
    ({"type": "integer", "minimum": 3}, "rf.minimum"),
    ({"type": "object", "properties": {"x": {"type": "string", "format": "email"}}}, "rf.properties.x.format"),
    ({"properties": {"a": {"$ref": "https://example.com/s.json"}}}, "rf.properties.a.$ref"),
    ({"type": "string", "pattern": "abc"}, "rf.pattern"),
    ({"type": "array", "items": {"type": "string", "uniqueItems": True}}, "rf.items.uniqueItems"),
    ({"anyOf": [{"type": "string"}, {"not": {}}]}, "rf.anyOf[1].not"),
    ({"type": "decimal"}, "rf.type"),
    ({"type": "object", "properties": {"p": {"$ref": "#/$defs/Missing"}}}, "rf"),
    # Each bound is spelled out in the grammar: a hostile one would make a grammar no node can parse.
    ({"type": "string", "maxLength": 10_000_000}, "rf.maxLength"),
    ({"type": "array", "items": {"type": "integer"}, "minItems": 100_000}, "rf.minItems"),
    ({"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(129)}}, "rf.properties"),
])
def test_an_unenforceable_schema_is_refused_naming_the_json_path(schema, path):
    with pytest.raises(InvalidArgument) as caught:
        check_schema(schema, "rf")
    assert caught.value.field == path and caught.value.reason == "UNSUPPORTED_SCHEMA"
    assert path in str(caught.value)


def test_annotations_are_allowed_and_relax_keeps_only_what_is_enforced():
    check_schema({"type": "string", "title": "T", "description": "d", "examples": ["x"], "default": "x"}, "rf")
    relaxed = relax_schema({"type": "integer", "minimum": 3, "title": "n",
                            "properties": {"x": {"type": "string", "format": "email", "maxLength": 4}}})
    assert relaxed == {"type": "integer", "properties": {"x": {"type": "string", "maxLength": 4}}}
    assert relax_schema({"type": "string", "maxLength": 10_000_000}) == {"type": "string"}, "the default bound applies"


def test_strings_and_arrays_without_bounds_are_bounded_and_control_characters_refused():
    text = schema_grammar({"type": "object", "properties": {"s": {"type": "string"}, "a": {"type": "array"},
                                                            "o": {"type": "object"}}},
                          max_string_chars=5, max_items=3)
    assert parses(text)
    assert "char*" not in text and ")*" not in text, "every repetition is bounded"
    assert r"\x00-\x1F" in text


def test_unions_absorb_their_siblings_and_type_lists_become_unions():
    schema = {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "string"}},
              "oneOf": [{"required": ["a"]}, {"required": ["b"]}]}
    text = schema_grammar(schema, max_string_chars=5, max_items=3)
    assert parses(text)
    assert text.count('"\\"a\\"" space ":"') == 1, "oneOf: a branch leaves out what only the other requires"
    either = schema_grammar({k: v for k, v in schema.items() if k != "oneOf"} | {"anyOf": schema["oneOf"]},
                            max_string_chars=5, max_items=3)
    assert either.count('"\\"a\\"" space ":"') == 2, "anyOf: each branch has both properties"
    nullable = schema_grammar({"type": ["string", "null"], "maxLength": 4}, max_string_chars=9, max_items=3)
    assert parses(nullable) and '"null"' in nullable and "char{0,9}" not in nullable


def test_references_of_two_schemas_with_the_same_name_stay_apart():
    grammar = SchemaGrammar(8, 3)
    first = grammar.value({"$defs": {"Item": {"enum": ["x"]}}, "$ref": "#/$defs/Item"}, "one")
    second = grammar.value({"$defs": {"Item": {"enum": ["y"]}}, "$ref": "#/$defs/Item"}, "two")
    text = grammar.render(f"{first} | {second}")
    assert parses(text)
    assert '"\\"x\\""' in text and '"\\"y\\""' in text


def test_literals_escape_backslashes_and_quotes():
    assert gbnf_literal('a"b\\c\n') == '"a\\"b\\\\c\\n"'
    text = schema_grammar({"enum": ["b\\c"]}, max_string_chars=5, max_items=3)
    assert parses(text) and '"\\"b\\\\\\\\c\\""' in text


def test_item_counts_apply_to_arrays_of_any_items():
    text = schema_grammar({"type": "array", "minItems": 2, "maxItems": 3}, max_string_chars=5, max_items=8)
    assert parses(text)
    root = next(line for line in text.splitlines() if line.startswith("value-of-schema ::="))
    assert root.count('"," space') == 2, root
