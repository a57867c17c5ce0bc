"""Which fields of an OpenAI request body the gateway honours; the check that refuses the rest.

No input is silently ignored. Each field of a ``/v1/chat/completions`` or
``/v1/completions`` body, and of the nested objects listed here, is
honoured, accepted only at the value the gateway behaves as anyway, or
refused: a 400 naming it (``param``), like a field that is not in the
table at all. ``null`` always counts as absent. The values of honoured
fields are the planners' to validate (``openai_compat.py``,
``chat_format.py``); this module only decides which fields may be present.

``FIELDS`` is the one home of these rules: docs/gateway.md shows the table
``markdown_table()`` renders (``python -m services.gateway.core.openai_fields``
prints it) and a test keeps the two equal.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal, NoReturn

from services.common import errors

Endpoint = Literal["chat", "completion", "responses"]
ENDPOINT_PATHS: dict[str, str] = {"chat": "/v1/chat/completions", "completion": "/v1/completions",
                                  "responses": "/v1/responses"}
# Roles the planners accept; a role-limited rule judges only messages with one of them.
MESSAGE_ROLES = ("system", "developer", "user", "assistant", "tool")
# Longest field name echoed back in an error.
MAX_NAME_CHARS = 64


@dataclass(frozen=True)
class Rule:
    kind: Literal["honoured", "only", "refused"]
    # Why other values are refused (only, refused, role-limited); for honoured fields a note for the docs.
    reason: str = ""
    # "only": the values accepted besides null.
    accepts: tuple[Any, ...] = ()
    # Honoured only on messages with one of these roles; on others only null or an empty value.
    roles: tuple[str, ...] = ()


def honoured(note: str = "", *, roles: tuple[str, ...] = ()) -> Rule:
    """With ``roles``, ``note`` is also the refusal on messages of other roles."""
    return Rule("honoured", note, roles=roles)


def only(*values: Any, reason: str) -> Rule:
    return Rule("only", reason, accepts=values)


def refused(reason: str) -> Rule:
    return Rule("refused", reason)


def both(rule: Rule) -> tuple[Rule, Rule]:
    return rule, rule


def chat(rule: Rule) -> tuple[Rule, None]:
    return rule, None


def completion(rule: Rule) -> tuple[None, Rule]:
    return None, rule


OK = honoured()
NO_LOGPROBS = "log probabilities are not returned yet"
PENALTIES = "presence and frequency penalties are not applied yet"
NO_AUDIO = "audio is not supported"
NO_CUSTOM_TOOLS = "custom (free-form) tools are not supported; use function tools"
END_USER = "end-user ids are not used: the API key's tenant identifies the caller"
CACHE = "prompt caching is automatic (a node reuses the KV cache of a shared prefix) and takes no options"

# Field path (``[]``: each item of a list) -> (chat rule, completions rule); None: not a field there.
FIELDS: dict[str, tuple[Rule | None, Rule | None]] = {
    "model": both(OK),
    "messages": chat(OK),
    "messages[].role": chat(OK),
    "messages[].content": chat(OK),
    "messages[].content[].type": chat(honoured("`text`")),
    "messages[].content[].text": chat(OK),
    "messages[].content[].image_url": chat(refused("images are not supported")),
    "messages[].content[].input_audio": chat(refused(NO_AUDIO)),
    "messages[].content[].file": chat(refused("files are not supported")),
    "messages[].content[].refusal": chat(refused("refusal parts are not shown to the model; send a text part")),
    "messages[].content[].prompt_cache_breakpoint": chat(refused(CACHE)),
    "messages[].name": chat(honoured("only a tool message's name is used (it labels the result); other "
                                     "participants' names are not shown to the model", roles=("tool",))),
    "messages[].tool_calls": chat(honoured("only assistant messages carry tool calls", roles=("assistant",))),
    "messages[].tool_calls[].id": chat(honoured("a tool message's `tool_call_id` refers to it")),
    "messages[].tool_calls[].type": chat(only("function", reason="only function calls are supported")),
    "messages[].tool_calls[].function": chat(OK),
    "messages[].tool_calls[].function.name": chat(OK),
    "messages[].tool_calls[].function.arguments": chat(OK),
    "messages[].tool_calls[].custom": chat(refused(NO_CUSTOM_TOOLS)),
    "messages[].tool_call_id": chat(honoured("only tool messages answer a tool call", roles=("tool",))),
    "messages[].refusal": chat(refused("earlier refusals are not shown to the model; send the text as content")),
    "messages[].audio": chat(refused(NO_AUDIO)),
    "messages[].function_call": chat(refused("deprecated; use tool_calls")),
    "prompt": completion(honoured("a string, or a list holding one string")),
    "max_tokens": both(OK),
    "max_completion_tokens": chat(OK),
    "temperature": both(OK),
    "top_p": both(OK),
    "n": both(honoured("1-8 choices, decoded in parallel after one prefill of the prompt")),
    "stop": both(OK),
    "seed": both(OK),
    "stream": both(OK),
    "stream_options": both(OK),
    "stream_options.include_usage": both(OK),
    "stream_options.include_obfuscation": both(only(False, reason="stream events carry no obfuscation padding")),
    "response_format": both(honoured("`text` is plain output; `json_object` and `json_schema` constrain the output "
                                     "(on completions too, an llmesh extension)")),
    "response_format.type": both(OK),
    "response_format.json_schema": both(OK),
    "response_format.json_schema.name": both(honoured("a label: checked, not shown to the model")),
    "response_format.json_schema.description": both(honoured("shown to the model beside the schema (chat)")),
    "response_format.json_schema.schema": both(OK),
    "response_format.json_schema.strict": both(honoured("the answer decodes under the schema either way")),
    "tools": chat(OK),
    "tools[].type": chat(honoured("`function`")),
    "tools[].function": chat(OK),
    "tools[].function.name": chat(OK),
    "tools[].function.description": chat(OK),
    "tools[].function.parameters": chat(OK),
    "tools[].function.strict": chat(honoured("strict tools decode under a grammar of their schema")),
    "tools[].custom": chat(refused(NO_CUSTOM_TOOLS)),
    "tool_choice": chat(OK),
    "tool_choice.type": chat(only("function", reason="only a function can be named")),
    "tool_choice.function": chat(OK),
    "tool_choice.function.name": chat(OK),
    "tool_choice.allowed_tools": chat(refused("allowed_tools is not supported; send only the allowed tools")),
    "tool_choice.custom": chat(refused(NO_CUSTOM_TOOLS)),
    "parallel_tool_calls": chat(only(True, False, reason="an answer carries at most one tool call, which both "
                                                        "values allow (true permits several, never requires them)")),
    "logprobs": (honoured("true or false: each answer token's log-probability"),
                 honoured("0-5: each token's log-probability and that many likeliest tokens")),
    "top_logprobs": chat(honoured("0-20 likeliest tokens per answer token; needs logprobs")),
    "presence_penalty": both(only(0, reason=PENALTIES)),
    "frequency_penalty": both(only(0, reason=PENALTIES)),
    "logit_bias": both(only({}, reason="token biases are not applied yet")),
    "echo": completion(only(False, reason="the prompt is not echoed back")),
    "best_of": completion(honoured("1-8 candidates decoded after one prefill; the n with the highest log-probability "
                                   "per token come back, and usage counts them all; not with stream")),
    "suffix": completion(refused("insertion (text after the completion) is not supported")),
    "user": both(refused(END_USER)),
    "safety_identifier": chat(refused(END_USER)),
    "prompt_cache_key": chat(refused(CACHE)),
    "prompt_cache_options": chat(refused(CACHE)),
    "prompt_cache_retention": chat(refused(CACHE)),
    "store": chat(only(False, reason="completions are not stored")),
    "metadata": chat(only({}, reason="completions are not stored, so there is nothing to tag")),
    "service_tier": chat(only("auto", "default", reason="there is one service tier")),
    "modalities": chat(only(["text"], reason="output is text only")),
    "audio": chat(refused(NO_AUDIO)),
    "prediction": chat(refused("predicted outputs are not supported")),
    "reasoning_effort": chat(only("none", reason="the served models do not reason")),
    "verbosity": chat(only("medium", reason="the answer's length is not steered beyond max_tokens")),
    "web_search_options": chat(refused("web search is not available")),
    "moderation": chat(refused("moderation is not run")),
    "functions": chat(refused("deprecated; use tools")),
    "function_call": chat(refused("deprecated; use tool_choice")),
}

NOT_STORED_PROMPTS = "stored prompts are not supported; send the instructions and input"
# Field path -> rule, for /v1/responses (create).
RESPONSES_FIELDS: dict[str, Rule] = {
    "model": OK,
    "input": honoured("a string, or a list of message, function_call and function_call_output items"),
    "input[].type": honoured("`message`, `function_call` or `function_call_output`"),
    "input[].id": honoured("ignored on input: the stored item gets an id of its own"),
    "input[].status": OK,
    "input[].role": honoured("`user`, `system`, `developer` or `assistant`"),
    "input[].content": OK,
    "input[].content[].type": honoured("`input_text` (`output_text` on assistant messages)"),
    "input[].content[].text": OK,
    "input[].content[].annotations": only([], reason="annotations are not shown to the model"),
    "input[].content[].image_url": refused("images are not supported"),
    "input[].content[].file_id": refused("files are not supported"),
    "input[].content[].file_data": refused("files are not supported"),
    "input[].call_id": OK,
    "input[].name": OK,
    "input[].arguments": OK,
    "input[].output": OK,
    "instructions": honoured("this response's system message; not carried to follow-ups"),
    "previous_response_id": honoured("continues that response's chain (and its KV cache)"),
    "store": OK,
    "stream": OK,
    "stream_options": OK,
    "stream_options.include_obfuscation": only(False, reason="stream events carry no obfuscation padding"),
    "background": honoured("runs on after the request; needs store"),
    "max_output_tokens": OK,
    "temperature": OK,
    "top_p": OK,
    "tools": OK,
    "tools[].type": honoured("`function`"),
    "tools[].name": OK,
    "tools[].description": OK,
    "tools[].parameters": OK,
    "tools[].strict": honoured("strict (the default) tools decode under a grammar of their schema"),
    "tool_choice": OK,
    "tool_choice.type": only("function", reason="only a function can be named"),
    "tool_choice.name": OK,
    "parallel_tool_calls": only(True, False, reason="an answer carries at most one tool call, which both values "
                                                   "allow"),
    "text": OK,
    "text.format": OK,
    "text.format.type": honoured("`text`, `json_object` or `json_schema`"),
    "text.format.name": OK,
    "text.format.schema": OK,
    "text.format.description": honoured("shown to the model beside the schema"),
    "text.format.strict": honoured("the answer decodes under the schema either way"),
    "text.verbosity": only("medium", reason="the answer's length is not steered beyond max_output_tokens"),
    "metadata": honoured("up to 16 string pairs, stored and echoed"),
    "truncation": only("disabled", reason="the input is never cut: a chain longer than the context is refused"),
    "include": only([], reason="nothing extra can be included yet"),
    "reasoning": only({}, reason="the served models do not reason"),
    "top_logprobs": only(0, reason="log probabilities are returned on chat and completions, not here yet"),
    "max_tool_calls": refused("tool calls are the client's to run: each response carries at most one"),
    "conversation": refused("conversations are not supported; chain responses with previous_response_id"),
    "prompt": refused(NOT_STORED_PROMPTS),
    "prompt_cache_key": refused(CACHE),
    "prompt_cache_retention": refused(CACHE),
    "prompt_cache_options": refused(CACHE),
    "service_tier": only("auto", "default", reason="there is one service tier"),
    "user": refused(END_USER),
    "safety_identifier": refused(END_USER),
    "context_management": refused("context is not compacted here; chains are kept whole"),
    "background_options": refused("background responses take no options"),
    "moderation": refused("moderation is not run"),
}


def _tables() -> dict[str, dict[str, Rule | None]]:
    tables: dict[str, dict[str, Rule | None]] = {
        "chat": {path: rules[0] for path, rules in FIELDS.items()},
        "completion": {path: rules[1] for path, rules in FIELDS.items()}}
    tables["responses"] = dict(RESPONSES_FIELDS)
    return tables


def _children(table: dict[str, Rule | None]) -> dict[str, dict[str, Rule | None]]:
    """Parent pattern ("" for the body) -> {key: rule}; keys match whole, so a key "a.b" is never a path."""
    children: dict[str, dict[str, Rule | None]] = {}
    for path, rule in table.items():
        parent, _, key = path.rpartition(".")
        children.setdefault(parent, {})[key] = rule
    return children


_CHILDREN = {endpoint: _children(table) for endpoint, table in _tables().items()}
_EMPTY: tuple[Any, ...] = ("", [], {})


def check_fields(body: Any, endpoint: Endpoint) -> None:
    """Raise InvalidArgument (``field`` = the path) for the first field the gateway would not honour.

    ``endpoint`` is "chat", "completion" or "responses". A body that is not an object is left
    to the planner, as are nested values that are not the objects or lists the
    API defines.
    """
    if endpoint not in ENDPOINT_PATHS:
        raise ValueError(f"unknown endpoint {endpoint!r}")
    if isinstance(body, dict):
        _check_object(body, "", "", endpoint)


def _check_object(obj: dict[str, Any], pattern: str, path: str, endpoint: Endpoint) -> None:
    every = _CHILDREN[endpoint]
    children = every[pattern]
    role = obj.get("role") if pattern == "messages[]" else None
    for key, value in obj.items():
        name = str(key) if len(str(key)) <= MAX_NAME_CHARS else str(key)[:MAX_NAME_CHARS] + "..."
        field = f"{path}.{name}" if path else name
        if key not in children:
            _fail(field, "unknown field", "UNKNOWN_FIELD")
        rule = children[key]
        if rule is None:
            _fail(field, f"not a field of {ENDPOINT_PATHS[endpoint]}", "UNKNOWN_FIELD")
        _apply(rule, value, field, role)
        key_pattern = f"{pattern}.{key}" if pattern else key
        if isinstance(value, dict) and key_pattern in every:
            _check_object(value, key_pattern, field, endpoint)
        elif isinstance(value, list) and key_pattern + "[]" in every:
            for i, item in enumerate(value):
                if isinstance(item, dict):
                    _check_object(item, key_pattern + "[]", f"{field}[{i}]", endpoint)


def _apply(rule: Rule, value: Any, field: str, role: Any) -> None:
    if value is None:
        return
    if rule.kind == "honoured":
        if rule.roles and role in MESSAGE_ROLES and role not in rule.roles and value not in _EMPTY:
            _fail(field, rule.reason, "UNSUPPORTED_FIELD")
    elif rule.kind == "refused":
        _fail(field, rule.reason, "UNSUPPORTED_FIELD")
    elif not any(_same(value, accepted) for accepted in rule.accepts):
        _fail(field, f"{rule.reason} (accepted: {_values(rule)})", "UNSUPPORTED_VALUE")


def _same(value: Any, accepted: Any) -> bool:
    """JSON equality: false is not 0, but 0 and 0.0 are the same number."""
    if isinstance(value, bool) or isinstance(accepted, bool):
        return value is accepted
    if isinstance(accepted, (int, float)):
        return isinstance(value, (int, float)) and value == accepted
    return type(value) is type(accepted) and bool(value == accepted)


def _values(rule: Rule) -> str:
    return ", ".join(json.dumps(v) for v in rule.accepts) + " or null"


def _fail(field: str, message: str, reason: str) -> NoReturn:
    raise errors.InvalidArgument(f"{field}: {message}", field=field, reason=reason)


def _cell(rule: Rule | None) -> str:
    if rule is None:
        return "-"
    if rule.kind == "only":
        return "only " + ", ".join(f"`{json.dumps(v)}`" for v in rule.accepts)
    if rule.roles:
        return "on " + ", ".join(f"`{r}`" for r in rule.roles) + " messages"
    return rule.kind


def markdown_table() -> str:
    """The table of docs/gateway.md: one row per field, its rule on each endpoint and the reason."""
    rows = ["| field | chat | completions | rule |", "| --- | --- | --- | --- |"]
    for path, rules in FIELDS.items():
        reasons = dict.fromkeys(r.reason for r in rules if r is not None and r.reason)
        rows.append(f"| `{path}` | {_cell(rules[0])} | {_cell(rules[1])} | {'; '.join(reasons)} |")
    return "\n".join(rows) + "\n"


def responses_markdown_table() -> str:
    """The /v1/responses table of docs/gateway.md."""
    rows = ["| field | rule | why |", "| --- | --- | --- |"]
    for path, rule in RESPONSES_FIELDS.items():
        rows.append(f"| `{path}` | {_cell(rule)} | {rule.reason} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    import sys

    print(responses_markdown_table() if sys.argv[1:] == ["--responses"] else markdown_table(), end="")
