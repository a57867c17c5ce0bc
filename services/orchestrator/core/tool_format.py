"""The tool-call format the model writes, its GBNF grammar and its parser.

A model reply is either a final answer (plain text that does not start with
"<") or one to `MAX_CALLS_PER_TURN` tool calls, one per line:

    <tool_call>{"name": "fs_read", "arguments": {"path": "notes.txt"}}</tool_call>
    <tool_call>{"name": "fs_list", "arguments": {"path": "."}}</tool_call>

The grammar built by `build_grammar` only admits the session's tools, with
arguments shaped by each tool's JSON schema (services.inference.client.grammar:
required members first, bounded strings and arrays), so the sampled text
always parses; the only way to get a broken call is to cut it
with max_tokens, which `parse_reply` reports as `MalformedReply`.
"""
from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from services.inference.client.grammar import SchemaGrammar, gbnf_literal, tool_call_schema
from services.orchestrator.core.ports import ToolSpec

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
MAX_CALLS_PER_TURN = 4
# Bounds keep a base model that never stops from filling the context.
MAX_STRING_CHARS = 96
MAX_JSON_ITEMS = 8

_CALL_RE = re.compile(re.escape(CALL_OPEN) + r"(.*?)" + re.escape(CALL_CLOSE), re.S)

class MalformedReply(ValueError):
    """The reply started a tool call but did not finish a valid one."""


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: dict[str, Any]

    @property
    def arguments_json(self) -> str:
        return json.dumps(self.arguments, separators=(",", ":"), sort_keys=True)


@dataclass(frozen=True)
class ParsedReply:
    calls: tuple[ParsedCall, ...]
    text: str

    @property
    def is_final(self) -> bool:
        return not self.calls


def format_calls(calls: Sequence[ParsedCall]) -> str:
    """The text a reply with these calls has (used to render history)."""
    return "\n".join(CALL_OPEN + json.dumps({"name": c.name, "arguments": c.arguments}) + CALL_CLOSE
                     for c in calls)


def parse_reply(text: str, allowed: Sequence[str] | None = None) -> ParsedReply:
    stripped = text.strip()
    if not stripped.startswith("<"):
        return ParsedReply(calls=(), text=stripped)
    calls: list[ParsedCall] = []
    for raw in _CALL_RE.findall(stripped):
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise MalformedReply(f"tool call is not JSON: {exc.msg}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            raise MalformedReply("tool call needs a string 'name'")
        args = obj.get("arguments", {})
        if not isinstance(args, dict):
            raise MalformedReply("tool call 'arguments' must be an object")
        if allowed is not None and obj["name"] not in allowed:
            raise MalformedReply(f"tool {obj['name']!r} is not available")
        calls.append(ParsedCall(obj["name"], args))
    if not calls or _CALL_RE.sub("", stripped).strip():
        raise MalformedReply("reply starts a tool call but is not a list of complete calls")
    return ParsedReply(calls=tuple(calls), text="")


def _required_sets(parameters: dict[str, Any]) -> list[list[str]]:
    """Required property lists; a oneOf/anyOf of `required` lists gives one per branch."""
    props = parameters.get("properties", {}) or {}
    base = [p for p in parameters.get("required", []) if p in props]
    branches = parameters.get("oneOf") or parameters.get("anyOf") or []
    sets = [base + [p for p in b.get("required", []) if p in props and p not in base]
            for b in branches if isinstance(b, dict) and b.get("required")]
    return sets or [base]


def build_grammar(tools: Sequence[ToolSpec], *, allow_answer: bool = True, require_call: bool = False) -> str:
    """GBNF admitting a final answer or well-formed calls to `tools` only."""
    grammar = SchemaGrammar(MAX_STRING_CHARS, MAX_JSON_ITEMS)
    alternatives = []
    if tools:
        bodies = " | ".join(grammar.value(tool_call_schema(t.name, t.parameters), f"tool-{t.name}") for t in tools)
        call = grammar.add("call", f"{gbnf_literal(CALL_OPEN)} ( {bodies} ) {gbnf_literal(CALL_CLOSE)}")
        alternatives.append(grammar.add("calls", f'{call} ( "\\n" {call} ){{0,{MAX_CALLS_PER_TURN - 1}}}'))
    if allow_answer and not (require_call and tools):
        alternatives.append(grammar.add("answer", '[^<\\x00] [^\\x00]*'))
    if not alternatives:
        raise ValueError("a grammar needs tools or an answer")
    return grammar.render(" | ".join(alternatives))


def describe_tools(tools: Sequence[ToolSpec]) -> str:
    """Tool descriptions and the call format, for the system turn."""
    if not tools:
        return ""
    lines = ["You can call these tools:"]
    for t in tools:
        schema = json.dumps(t.parameters or {"type": "object"}, sort_keys=True)
        lines.append(f"- {t.name}: {t.description.strip()} Arguments (JSON schema): {schema}")
    example = [ParsedCall(t.name, _example_arguments(t.parameters)) for t in tools[:2]]
    lines += [
        "To call tools, reply only with one line per call, for example:",
        format_calls(example),
        "Tool results come back in <tool_result> blocks. When you are done, reply with the answer as plain text.",
    ]
    return "\n".join(lines)


def _example_arguments(parameters: dict[str, Any]) -> dict[str, Any]:
    props = parameters.get("properties", {}) or {}
    out: dict[str, Any] = {}
    for name in _required_sets(parameters)[0] or list(props)[:1]:
        kind = (props.get(name) or {}).get("type", "")
        out[name] = {"integer": 1, "number": 1, "boolean": True, "array": ["."]}.get(kind, ".")
    return out
