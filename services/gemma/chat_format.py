"""The Gemma turn format and JSON-schema -> GBNF pieces, shared by every prompt builder.

The bundled model's GGUF carries no chat template, so the mesh owns the
format: ``<start_of_turn>{role}\\n{text}<end_of_turn>\\n`` with the roles
``user`` and ``model`` only (Gemma has no system or tool role), and an open
``<start_of_turn>model\\n`` asks for the reply.

Tool calls are decoded under a grammar so a small base model still writes
well-formed JSON. `JsonGrammar` holds the generic JSON rules (bounded so the
output always ends) and turns a property's JSON schema into a rule
expression; how a whole call is laid out (the gateway's OpenAI object, the
orchestrator's ``<tool_call>`` lines) stays with each service.
Pure: no grpc, no llama_cpp.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

BOS = "<bos>"
START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"
USER = "user"
MODEL = "model"
GENERATION_PROMPT = f"{START_OF_TURN}{MODEL}\n"


@dataclass(frozen=True)
class FunctionSpec:
    """A callable function as the model is told about it."""
    name: str
    description: str
    parameters: dict[str, Any]


def render_turn(role: str, text: str) -> str:
    """One closed turn; every turn starts and ends on a special token."""
    return f"{START_OF_TURN}{role}\n{text}{END_OF_TURN}\n"


def render_conversation(turns: list[tuple[str, str]]) -> str:
    """Closed turns followed by the open model turn that asks for the reply."""
    return "".join(render_turn(role, text) for role, text in turns) + GENERATION_PROMPT


def gbnf_literal(text: str) -> str:
    """A GBNF string literal matching ``text`` exactly."""
    return json.dumps(text)


def json_literal(value: Any) -> str:
    """A GBNF literal matching the JSON encoding of ``value``."""
    return gbnf_literal(json.dumps(value))


class JsonGrammar:
    """Generic bounded JSON rules plus schema-shaped value expressions.

    ``max_string_chars`` and ``max_items`` bound strings, arrays and generic
    objects: a base model that never "wants" to stop still ends.
    """

    def __init__(self, max_string_chars: int, max_items: int) -> None:
        self.max_items = max_items
        more = max_items - 1
        self.rules: dict[str, str] = {
            "ws": "[ ]?",
            "char": r'[^"\\\x00-\x1f] | "\\" ["\\/bfnrt]',
            "string": f'"\\"" char{{0,{max_string_chars}}} "\\""',
            "string1": f'"\\"" char{{1,{max_string_chars}}} "\\""',
            "integer": '"-"? ([0-9] | [1-9] [0-9]{1,15})',
            "number": 'integer ("." [0-9]{1,8})?',
            "boolean": '"true" | "false"',
            "value": 'object | array | string | number | boolean | "null"',
            "object": f'"{{" ws ( string ws ":" ws value ( ws "," ws string ws ":" ws value ){{0,{more}}} )? ws "}}"',
            "array": f'"[" ws ( value ( ws "," ws value ){{0,{more}}} )? ws "]"',
        }
        self._num_added = 0

    def add(self, body: str, prefix: str = "r") -> str:
        """Adds a rule with a fresh name and returns the name."""
        self._num_added += 1
        name = f"{prefix}{self._num_added}"
        self.rules[name] = body
        return name

    def value(self, schema: Any) -> str:
        """A rule expression for a value of ``schema``; unknown shapes are any JSON value."""
        if not isinstance(schema, dict):
            return "value"
        if schema.get("enum"):
            return "(" + " | ".join(json_literal(v) for v in schema["enum"]) + ")"
        kind = schema.get("type")
        if kind == "string":
            return "string1" if schema.get("minLength", 0) >= 1 else "string"
        if kind in ("integer", "number", "boolean"):
            return kind
        if kind == "array":
            item = self.value(schema.get("items"))
            body = f'{item} ( ws "," ws {item} ){{0,{self.max_items - 1}}}'
            return f'("[" ws {body} ws "]")' if schema.get("minItems", 0) >= 1 else f'("[" ws ( {body} )? ws "]")'
        if kind == "object" and isinstance(schema.get("properties"), dict):
            return self.add(self.object_body(schema["properties"]))
        return "value"

    def object_body(self, properties: dict[str, Any]) -> str:
        """Every property, in schema order, with flexible spacing."""
        members = [f'{json_literal(name)} ws ":" ws {self.value(prop)}' for name, prop in properties.items()]
        return '"{" ws ' + ' ws "," ws '.join(members) + ' ws "}"' if members else '"{" ws "}"'

    def render(self, root: str, extra: list[str] | None = None) -> str:
        """The grammar text: ``root``, the caller's extra rule lines, then the JSON rules."""
        lines = [f"root ::= {root}", *(extra or ())]
        lines += [f"{name} ::= {body}" for name, body in self.rules.items()]
        return "\n".join(lines) + "\n"
