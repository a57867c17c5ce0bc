"""The shared Gemma turn format and JSON-schema grammar pieces."""
from __future__ import annotations

import json

import pytest

from services.gemma.chat_format import GENERATION_PROMPT, JsonGrammar, json_literal, render_conversation, render_turn

WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "minLength": 1}, "days": {"type": "integer"}, "unit": {"enum": ["c", "f", 3]},
    "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1},
    "where": {"type": "object", "properties": {"lat": {"type": "number"}, "exact": {"type": "boolean"}}}}}


def test_turns_open_and_close_on_special_tokens():
    assert render_turn("user", "hi") == "<start_of_turn>user\nhi<end_of_turn>\n"
    prompt = render_conversation([("user", "hi"), ("model", "hello"), ("user", "bye")])
    assert prompt == ("<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\nhello<end_of_turn>\n"
                      "<start_of_turn>user\nbye<end_of_turn>\n<start_of_turn>model\n")
    assert prompt.endswith(GENERATION_PROMPT)


def test_schema_values_map_to_bounded_rules():
    grammar = JsonGrammar(max_string_chars=10, max_items=3)
    props = WEATHER["properties"]
    assert grammar.value(props["city"]) == "string1"
    assert grammar.value({"type": "string"}) == "string"
    assert grammar.value(props["days"]) == "integer"
    assert grammar.value(props["unit"]) == '("\\"c\\"" | "\\"f\\"" | "3")'
    assert grammar.value(props["tags"]).startswith('("[" ws string ( ws "," ws string ){0,2}')
    assert grammar.value({"type": "object"}) == grammar.value(None) == "value"
    nested = grammar.value(props["where"])
    assert '"\\"lat\\"" ws ":" ws number' in grammar.rules[nested]
    assert "char{1,10}" in grammar.rules["string1"]


def test_json_literal_matches_the_encoded_value():
    assert json.loads(json_literal("a\"b")) == json.dumps("a\"b")


def test_llama_cpp_accepts_a_rendered_grammar():
    llama_cpp = pytest.importorskip("llama_cpp")
    grammar = JsonGrammar(max_string_chars=48, max_items=4)
    root = grammar.add(grammar.object_body(WEATHER["properties"]))
    text = grammar.render(root, ['unused ::= "x"'])
    assert text.splitlines()[:2] == [f"root ::= {root}", 'unused ::= "x"']
    assert llama_cpp.LlamaGrammar.from_string(text, verbose=False) is not None
