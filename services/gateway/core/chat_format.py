"""OpenAI chat messages -> the Gemma turn format (services.gemma.chat_format), tool calls via a grammar.

Gemma has no system role, so system text opens the first user turn. Tool
results go back to the model as a user turn. A forced tool call (and any call
to a strict tool) is decoded under a GBNF grammar built from the tools' JSON
schemas (services.inference.client.grammar), so even a small base model
answers with a well-formed ``{"name": ..., "arguments": {...}}``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from services.common import errors
from services.gemma.chat_format import FunctionSpec as ToolSpec
from services.gemma.chat_format import render_conversation
from services.inference.client.grammar import SchemaGrammar, check_schema, tool_call_schema

ROLES = ("system", "developer", "user", "assistant", "tool")
# Bounds keep grammar-constrained output finite even if the model never "wants" to stop:
# strings and arrays with no maxLength / maxItems of their own, in tool calls and in answers
# shaped by response_format.
MAX_STRING_CHARS = 48
MAX_ARRAY_ITEMS = 4
ANSWER_MAX_STRING_CHARS = 256
ANSWER_MAX_ARRAY_ITEMS = 16


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str
    name: str = ""
    tool_call_id: str = ""
    tool_calls: tuple[dict[str, Any], ...] = ()


def message_text(content: Any, field: str) -> str:
    """Content as text: a string, null, or a list of {"type": "text", "text": ...} parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    errors.require(isinstance(content, list), field, "must be a string or a list of content parts")
    texts = []
    for i, part in enumerate(content):
        errors.require(isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str),
                       f"{field}[{i}]", "only text parts are supported")
        texts.append(part["text"])
    return "".join(texts)


def parse_messages(raw: Any) -> list[ChatMessage]:
    errors.require(isinstance(raw, list) and len(raw) > 0, "messages", "must be a non-empty list")
    messages = []
    for i, item in enumerate(raw):
        field = f"messages[{i}]"
        errors.require(isinstance(item, dict), field, "must be an object")
        role = item.get("role")
        errors.require(role in ROLES, f"{field}.role", f"must be one of {', '.join(ROLES)}")
        tool_calls = item.get("tool_calls") or ()
        errors.require(isinstance(tool_calls, (list, tuple)), f"{field}.tool_calls", "must be a list")
        messages.append(ChatMessage(role=role, content=message_text(item.get("content"), f"{field}.content"),
                                    name=str(item.get("name") or ""), tool_call_id=str(item.get("tool_call_id") or ""),
                                    tool_calls=tuple(tool_calls)))
    return messages


def parse_tools(raw: Any) -> list[ToolSpec]:
    if raw is None:
        return []
    errors.require(isinstance(raw, list), "tools", "must be a list")
    tools = []
    for i, item in enumerate(raw):
        field = f"tools[{i}]"
        errors.require(isinstance(item, dict) and item.get("type", "function") == "function", f"{field}.type",
                       "only function tools are supported")
        function = item.get("function")
        errors.require(isinstance(function, dict), f"{field}.function", "must be an object")
        name = function.get("name")
        errors.require(isinstance(name, str) and name.replace("_", "a").replace("-", "a").isalnum() and len(name) <= 64,
                       f"{field}.function.name", "must be 1-64 letters, digits, '_' or '-'")
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        errors.require(isinstance(parameters, dict), f"{field}.function.parameters", "must be a JSON schema object")
        strict = function.get("strict")
        errors.require(strict is None or isinstance(strict, bool), f"{field}.function.strict", "must be a boolean")
        if strict:
            # A strict tool's calls are decoded under its schema: every keyword must be enforceable.
            check_schema(parameters, f"{field}.function.parameters")
        tools.append(ToolSpec(name, str(function.get("description") or ""), parameters))
    errors.require(len({t.name for t in tools}) == len(tools), "tools", "function names must be unique")
    return tools


def _tool_preamble(tools: list[ToolSpec]) -> str:
    listing = json.dumps([{"name": t.name, "description": t.description, "parameters": t.parameters}
                          for t in tools], separators=(",", ":"))
    return ("You can call these functions:\n" + listing + "\nTo call one, answer with only a JSON object "
            '{"name": <function name>, "arguments": <arguments object>}.')


def render_prompt(messages: list[ChatMessage], tools: list[ToolSpec]) -> str:
    """The Gemma prompt, ending with an open model turn."""
    system = [m.content for m in messages if m.role in ("system", "developer") and m.content]
    if tools:
        system.append(_tool_preamble(tools))
    turns: list[tuple[str, str]] = []
    for m in messages:
        if m.role in ("system", "developer"):
            continue
        if m.role == "assistant":
            text = m.content
            for call in m.tool_calls:
                function = call.get("function") or {}
                args = function.get("arguments") or "{}"
                text += json.dumps({"name": function.get("name", ""), "arguments": _loads_or_text(args)})
            turns.append(("model", text))
        elif m.role == "tool":
            label = m.name or m.tool_call_id or "tool"
            turns.append(("user", f"Result of {label}:\n{m.content}"))
        else:
            turns.append(("user", m.content))
    if system:
        preamble = "\n\n".join(system)
        if turns and turns[0][0] == "user":
            turns[0] = ("user", preamble + "\n\n" + turns[0][1])
        else:
            turns.insert(0, ("user", preamble))
    return render_conversation(turns)


def _loads_or_text(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def tool_call_grammar(tools: list[ToolSpec], *, answer: dict[str, Any] | None = None,
                      free_answer: bool = False) -> str:
    """GBNF accepting one call of one of ``tools`` with schema-shaped arguments; or else, when asked,
    a JSON value of the ``answer`` schema, or a free answer that cannot be mistaken for a call."""
    grammar = SchemaGrammar(MAX_STRING_CHARS, MAX_ARRAY_ITEMS) if answer is None else \
        SchemaGrammar(ANSWER_MAX_STRING_CHARS, ANSWER_MAX_ARRAY_ITEMS)
    alternatives = [grammar.value(tool_call_schema(tool.name, tool.parameters), f"call-{tool.name}") for tool in tools]
    if answer is not None:
        alternatives.append(grammar.value(answer, "answer"))
    elif free_answer:
        alternatives.append(grammar.add("free-answer", '[^{ \\t\\n\\x00] [^\\x00]*'))
    return grammar.render(" | ".join(alternatives))


def parse_tool_call(text: str, tools: list[ToolSpec]) -> tuple[str, str] | None:
    """(name, arguments JSON) if ``text`` is one call of a known tool, else None."""
    stripped = text.strip()
    if not stripped.startswith("{"):
        return None
    try:
        payload = json.loads(stripped)
    except json.JSONDecodeError:
        return None
    if not isinstance(payload, dict) or payload.get("name") not in {t.name for t in tools}:
        return None
    arguments = payload.get("arguments", {})
    if not isinstance(arguments, dict):
        return None
    return payload["name"], json.dumps(arguments, separators=(",", ":"))
