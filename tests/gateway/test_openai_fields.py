"""The field rules of the OpenAI endpoints: honoured, accepted at the gateway's own value, or a 400 naming them."""
from __future__ import annotations

import json
import re
import typing
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai.types import completion_create_params as legacy_params
from openai.types.chat import chat_completion_assistant_message_param as assistant_message
from openai.types.chat import chat_completion_content_part_param as content_part
from openai.types.chat import chat_completion_message_param as message_param
from openai.types.chat import chat_completion_message_tool_call_union_param as tool_call_param
from openai.types.chat import chat_completion_stream_options_param as stream_options_param
from openai.types.chat import chat_completion_tool_choice_option_param as tool_choice_param
from openai.types.chat import chat_completion_tool_union_param as tool_param
from openai.types.chat import completion_create_params as chat_params
from openai.types.shared_params import function_definition, response_format_json_schema

from services.common import errors
from services.gateway.core.openai_fields import FIELDS, check_fields, markdown_table, responses_markdown_table
from services.gateway.http_errors import openai_error_response

DOC = Path(__file__).resolve().parents[2] / "docs" / "gateway.md"
CHAT = {"model": "gemma-3-270m", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": "gemma-3-270m", "prompt": "Once"}


def refusal(body: Any, endpoint: str = "chat") -> errors.InvalidArgument:
    with pytest.raises(errors.InvalidArgument) as caught:
        check_fields(body, endpoint)  # type: ignore[arg-type]
    return caught.value


def chat(**fields: Any) -> dict[str, Any]:
    return {**CHAT, **fields}


def completion(**fields: Any) -> dict[str, Any]:
    return {**COMPLETION, **fields}


def test_honoured_fields_pass_whatever_their_value_the_planners_validate_it():
    check_fields(chat(temperature=0.2, top_p=0.9, max_tokens=8, max_completion_tokens=8, stop=["\n"], seed=7,
                      n=1, stream=True, stream_options={"include_usage": True},
                      tools=[{"type": "function", "function": {"name": "f", "description": "d", "strict": True,
                                                               "parameters": {"type": "object"}}}],
                      tool_choice={"type": "function", "function": {"name": "f"}},
                      response_format={"type": "json_schema", "json_schema": {
                          "name": "x", "schema": {"type": "object", "anything": 1},
                          "strict": True}}), "chat")
    check_fields(completion(max_tokens=8, response_format={"type": "json_object"}, n=2, best_of=4), "completion")
    check_fields(chat(temperature="hot", n=5, stream_options={"include_usage": "maybe"}), "chat")


@pytest.mark.parametrize("field, value", [
    ("logprobs", False), ("logprobs", True), ("top_logprobs", 3),
    ("presence_penalty", 0), ("presence_penalty", 0.0), ("frequency_penalty", 0),
    ("logit_bias", {}), ("store", False), ("metadata", {}), ("service_tier", "auto"), ("service_tier", "default"),
    ("modalities", ["text"]), ("reasoning_effort", "none"), ("verbosity", "medium"),
    ("parallel_tool_calls", True), ("parallel_tool_calls", False), ("stream_options", {"include_obfuscation": False}),
])
def test_default_valued_fields_are_accepted_on_chat(field: str, value: Any):
    check_fields(chat(**{field: value}), "chat")


@pytest.mark.parametrize("field, value", [
    ("echo", False), ("presence_penalty", 0), ("frequency_penalty", 0.0), ("logit_bias", {}),
])
def test_default_valued_fields_are_accepted_on_completions(field: str, value: Any):
    check_fields(completion(**{field: value}), "completion")


@pytest.mark.parametrize("endpoint, body, field", [
    ("chat", chat(presence_penalty=0.5), "presence_penalty"),
    ("chat", chat(presence_penalty=False), "presence_penalty"),  # false is not 0
    ("chat", chat(frequency_penalty=-1), "frequency_penalty"),
    ("chat", chat(logit_bias={"50256": -100}), "logit_bias"),
    ("chat", chat(store=True), "store"),
    ("chat", chat(metadata={"k": "v"}), "metadata"),
    ("chat", chat(service_tier="priority"), "service_tier"),
    ("chat", chat(modalities=["text", "audio"]), "modalities"),
    ("chat", chat(reasoning_effort="high"), "reasoning_effort"),
    ("chat", chat(verbosity="low"), "verbosity"),
    ("chat", chat(parallel_tool_calls="yes"), "parallel_tool_calls"),
    ("chat", chat(parallel_tool_calls=1), "parallel_tool_calls"),
    ("completion", completion(echo=True), "echo"),
])
def test_other_values_of_default_only_fields_are_refused(endpoint: str, body: dict, field: str):
    exc = refusal(body, endpoint)
    assert exc.field == field and exc.reason == "UNSUPPORTED_VALUE"
    assert exc.message.startswith(f"{field}: ") and "accepted:" in exc.message


@pytest.mark.parametrize("endpoint, body, field", [
    ("chat", chat(audio={"voice": "alloy", "format": "mp3"}), "audio"),
    ("chat", chat(user="u-1"), "user"),
    ("chat", chat(safety_identifier="h"), "safety_identifier"),
    ("chat", chat(prompt_cache_key="k"), "prompt_cache_key"),
    ("chat", chat(web_search_options={}), "web_search_options"),
    ("chat", chat(prediction={"type": "content", "content": "x"}), "prediction"),
    ("chat", chat(functions=[]), "functions"),
    ("chat", chat(function_call="none"), "function_call"),
    ("completion", completion(suffix=""), "suffix"),
    ("completion", completion(user="u-1"), "user"),
])
def test_refused_fields_are_a_400_for_any_value(endpoint: str, body: dict, field: str):
    exc = refusal(body, endpoint)
    assert exc.field == field and exc.reason == "UNSUPPORTED_FIELD"
    assert exc.message == f"{field}: {FIELDS[field][0 if endpoint == 'chat' else 1].reason}"  # type: ignore[union-attr]


@pytest.mark.parametrize("endpoint", ["chat", "completion"])
def test_null_is_absent_for_every_field(endpoint: str):
    side = 0 if endpoint == "chat" else 1
    body = {path: None for path, rules in FIELDS.items() if "." not in path and "[" not in path and rules[side]}
    check_fields(body, endpoint)  # type: ignore[arg-type]


def test_unknown_fields_and_fields_of_the_other_endpoint_are_refused():
    exc = refusal(chat(top_k=40))
    assert (exc.field, exc.reason, exc.message) == ("top_k", "UNKNOWN_FIELD", "top_k: unknown field")
    for field in ("messages", "tools", "tool_choice", "max_completion_tokens", "store"):
        exc = refusal(completion(**{field: None}), "completion")
        assert (exc.field, exc.message) == (field, f"{field}: not a field of /v1/completions")
    for field in ("prompt", "echo", "suffix", "best_of"):
        exc = refusal(chat(**{field: None}))
        assert (exc.field, exc.message) == (field, f"{field}: not a field of /v1/chat/completions")
    # A dotted key is one unknown name, never a path into a nested object.
    assert refusal(chat(**{"stream_options.include_usage": True})).field == "stream_options.include_usage"
    assert refusal(chat(**{"x" * 500: 1})).field == "x" * 64 + "..."


@pytest.mark.parametrize("body, field, reason", [
    (chat(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                    {"role": "user", "content": "c", "audio": {"id": "a1"}}]), "messages[2].audio",
     "UNSUPPORTED_FIELD"),
    (chat(messages=[{"role": "user", "content": "a", "cache_control": {}}]), "messages[0].cache_control",
     "UNKNOWN_FIELD"),
    (chat(messages=[{"role": "user", "content": [{"type": "text", "text": "a"},
                                                 {"type": "image_url", "image_url": {"url": "x"}}]}]),
     "messages[0].content[1].image_url", "UNSUPPORTED_FIELD"),
    (chat(messages=[{"role": "user", "content": [{"type": "text", "text": "a",
                                                  "prompt_cache_breakpoint": {"mode": "explicit"}}]}]),
     "messages[0].content[0].prompt_cache_breakpoint", "UNSUPPORTED_FIELD"),
    (chat(messages=[{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}", "extra": 1}}]}]),
     "messages[0].tool_calls[0].function.extra", "UNKNOWN_FIELD"),
    (chat(messages=[{"role": "assistant", "tool_calls": [{"id": "c1", "type": "custom", "custom": {}}]}]),
     "messages[0].tool_calls[0].type", "UNSUPPORTED_VALUE"),
    (chat(tools=[{"type": "function", "function": {"name": "f", "strict": True, "examples": []}}]),
     "tools[0].function.examples", "UNKNOWN_FIELD"),
    (chat(tools=[{"type": "custom", "custom": {"name": "g"}}]), "tools[0].custom", "UNSUPPORTED_FIELD"),
    (chat(tool_choice={"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": []}}),
     "tool_choice.type", "UNSUPPORTED_VALUE"),
    (chat(tool_choice={"allowed_tools": {"mode": "auto", "tools": []}}), "tool_choice.allowed_tools",
     "UNSUPPORTED_FIELD"),
    (chat(tool_choice={"type": "function", "function": {"name": "f", "strict": True}}),
     "tool_choice.function.strict", "UNKNOWN_FIELD"),
    (chat(stream=True, stream_options={"include_usage": True, "include_obfuscation": True}),
     "stream_options.include_obfuscation", "UNSUPPORTED_VALUE"),
    (chat(stream_options={"chunk_size": 4}), "stream_options.chunk_size", "UNKNOWN_FIELD"),
    (chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "format": "y"}}),
     "response_format.json_schema.format", "UNKNOWN_FIELD"),
    (chat(response_format={"type": "json_object", "schema": {}}), "response_format.schema", "UNKNOWN_FIELD"),
    (chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "descr": "d"}}),
     "response_format.json_schema.descr", "UNKNOWN_FIELD"),
])
def test_nested_fields_are_checked_and_named_by_their_path(body: dict, field: str, reason: str):
    exc = refusal(body)
    assert (exc.field, exc.reason) == (field, reason)
    assert exc.message.startswith(field + ": ")


def test_nested_fields_of_completions_use_the_same_rules():
    exc = refusal(completion(stream_options={"include_obfuscation": True}), "completion")
    assert exc.field == "stream_options.include_obfuscation"
    assert refusal(completion(response_format={"type": "json_schema", "json_schema": {"nme": "x"}}),
                   "completion").field == "response_format.json_schema.nme"


def test_role_limited_message_fields():
    conversation = [
        {"role": "system", "content": "Be brief.", "name": None},
        {"role": "user", "content": "Weather?", "tool_calls": [], "tool_call_id": ""},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "sunny"},
    ]
    check_fields(chat(messages=conversation), "chat")
    for message, field in [
        ({"role": "user", "content": "hi", "name": "alice"}, "messages[1].name"),
        ({"role": "system", "content": "hi", "name": "boss"}, "messages[1].name"),
        ({"role": "user", "content": "hi", "tool_calls": [{"id": "x"}]}, "messages[1].tool_calls"),
        ({"role": "assistant", "content": "hi", "tool_call_id": "call_1"}, "messages[1].tool_call_id"),
    ]:
        exc = refusal(chat(messages=[{"role": "user", "content": "x"}, message]))
        assert (exc.field, exc.reason) == (field, "UNSUPPORTED_FIELD")
    # A role the planner refuses is left to it, so the error names the role, not a field that depends on it.
    check_fields(chat(messages=[{"role": "wizard", "content": "x", "name": "merlin"}]), "chat")


def test_values_that_are_not_the_defined_objects_are_left_to_the_planners():
    for body in ([], "x", None, 3, [{"logprobs": True}]):
        check_fields(body, "chat")
        check_fields(body, "completion")
    check_fields(chat(messages="hi", tools=[1, "f"], stream_options="x", response_format="json",
                      tool_choice="required"), "chat")
    check_fields(chat(messages=[None, "hi", {"role": "user", "content": [1, {"type": "text", "text": "a"}]}]), "chat")
    with pytest.raises(ValueError):
        check_fields(CHAT, "embeddings")  # type: ignore[arg-type]


def test_the_first_offending_field_is_named_in_an_openai_400():
    exc = refusal(chat(presence_penalty=1, user="u"))
    response = openai_error_response(exc)
    body = json.loads(bytes(response.body))
    assert response.status_code == 400
    assert body["error"]["param"] == "presence_penalty" and body["error"]["type"] == "invalid_request_error"
    assert body["error"]["code"] == "UNSUPPORTED_VALUE"
    assert body["error"]["message"].startswith("presence_penalty: ")


_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
_json = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=20)
_known = st.sampled_from(sorted({p.split(".")[0].split("[")[0] for p in FIELDS}) + ["role", "content", "type"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=st.dictionaries(_known, _json, max_size=6), endpoint=st.sampled_from(["chat", "completion"]))
def test_any_json_passes_or_is_one_invalid_argument_naming_a_field(body: dict, endpoint: str):
    try:
        check_fields(body, endpoint)  # type: ignore[arg-type]
    except errors.InvalidArgument as exc:
        assert exc.field and exc.message.startswith(exc.field + ": ")
        assert exc.reason in ("UNKNOWN_FIELD", "UNSUPPORTED_FIELD", "UNSUPPORTED_VALUE")


# --- the table itself -------------------------------------------------------------------------------------------

def _keys(*types: Any) -> set[str]:
    """Field names of TypedDicts and unions of them (literal members of a union have none)."""
    names: set[str] = set()
    for t in types:
        for member in typing.get_args(t) or (t,):
            names |= set(getattr(member, "__required_keys__", ())) | set(getattr(member, "__optional_keys__", ()))
    return names


def _children(parent: str, side: int) -> set[str]:
    prefix = parent + "." if parent else ""
    return {p[len(prefix):] for p, rules in FIELDS.items()
            if p.startswith(prefix) and "." not in p[len(prefix):] and (parent or "[" not in p) and rules[side]}


def test_the_table_covers_exactly_the_fields_of_the_openai_api():
    """Against the pinned openai package's request types; the one extension is response_format on completions."""
    assert _children("", 0) == _keys(chat_params.CompletionCreateParamsBase) | {"stream"}
    assert _children("", 1) == _keys(legacy_params.CompletionCreateParamsBase) | {"stream", "response_format"}
    assert _children("stream_options", 0) == _keys(stream_options_param.ChatCompletionStreamOptionsParam)
    assert _children("messages[]", 0) == _keys(message_param.ChatCompletionMessageParam)
    assert _children("messages[].content[]", 0) == _keys(content_part.ChatCompletionContentPartParam,
                                                         assistant_message.ContentArrayOfContentPart)
    assert _children("messages[].tool_calls[]", 0) == _keys(tool_call_param.ChatCompletionMessageToolCallUnionParam)
    assert _children("messages[].tool_calls[].function", 0) == {"name", "arguments"}
    assert _children("tools[]", 0) == _keys(tool_param.ChatCompletionToolUnionParam)
    assert _children("tools[].function", 0) == _keys(function_definition.FunctionDefinition)
    assert _children("tool_choice", 0) == _keys(tool_choice_param.ChatCompletionToolChoiceOptionParam)
    assert _children("tool_choice.function", 0) == {"name"}
    assert _children("response_format", 0) == _keys(chat_params.ResponseFormat)
    assert _children("response_format.json_schema", 0) == _keys(response_format_json_schema.JSONSchema)


def test_every_rule_is_complete():
    for path, rules in FIELDS.items():
        assert any(rules), path
        parent = path.rpartition(".")[0].removesuffix("[]")
        if parent:  # a nested field lives where its parent does
            assert parent in FIELDS, path
            assert all(bool(p) >= bool(r) for p, r in zip(FIELDS[parent], rules, strict=True)), path
        for rule in filter(None, rules):
            assert "|" not in rule.reason, path
            if rule.kind == "refused" or rule.roles:
                assert rule.reason, path
            if rule.kind == "only":
                assert rule.accepts and rule.reason and None not in rule.accepts, path
            else:
                assert not rule.accepts, path
            assert not rule.roles or path.startswith("messages[]."), path


def test_the_docs_table_is_the_rule_table():
    text = DOC.read_text()
    found = re.search(r"<!-- openai-fields -->\n(.*?)<!-- /openai-fields -->", text, re.S)
    assert found, "docs/gateway.md lacks the <!-- openai-fields --> table"
    assert found.group(1) == markdown_table(), (
        "the OpenAI request fields table is stale: paste the output of python -m services.gateway.core.openai_fields")


def test_the_docs_responses_table_is_the_rule_table():
    found = re.search(r"<!-- responses-fields -->\n(.*?)<!-- /responses-fields -->", DOC.read_text(), re.S)
    assert found, "docs/gateway.md lacks the <!-- responses-fields --> table"
    assert found.group(1) == responses_markdown_table(), (
        "the /v1/responses fields table is stale: paste the output of "
        "python -m services.gateway.core.openai_fields --responses")
