"""The Gemma turn format, shared by every prompt builder.

The bundled model's GGUF carries no chat template, so the mesh owns the
format: ``<start_of_turn>{role}\\n{text}<end_of_turn>\\n`` with the roles
``user`` and ``model`` only (Gemma has no system or tool role), and an open
``<start_of_turn>model\\n`` asks for the reply.

Tool calls are decoded under a grammar (services.inference.client.grammar)
so a small base model still writes well-formed JSON; how a whole call is
laid out (the gateway's OpenAI object, the orchestrator's ``<tool_call>``
lines) stays with each service. Pure: no grpc, no llama_cpp.
"""
from __future__ import annotations

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
