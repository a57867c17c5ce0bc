"""Normalised history items and how each renders in the Gemma turn format (services.gemma.chat_format).

Gemma has no system or tool role, so the system prompt, tool results and
summaries render as user turns; what they are is kept here, in `kind`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from services.gemma.chat_format import MODEL, render_turn
from services.gemma.chat_format import USER as USER_ROLE
from services.orchestrator.core.tool_format import ParsedCall, format_calls

SYSTEM = "system"
USER = "user"
ASSISTANT = "assistant"
TOOL_OUTPUT = "tool"
SUMMARY = "summary"


@dataclass(frozen=True)
class CallRef:
    call_id: str
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class HistoryItem:
    kind: str
    text: str = ""
    # Assistant turns that call tools.
    calls: tuple[CallRef, ...] = ()
    # Tool outputs: which call this answers.
    call_id: str = ""
    name: str = ""
    status: str = ""
    # Real token count of `render()` from the inference tokenizer; 0 = not counted yet.
    num_tokens: int = 0
    # Position in the store's message log; 0 = not stored yet.
    position: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)
    # Token ids of render(), kept once known so building a prompt is a concatenation.
    tokens: tuple[int, ...] = field(default=(), compare=False, repr=False)

    def render(self) -> str:
        if self.kind == ASSISTANT:
            body = format_calls([ParsedCall(c.name, c.arguments) for c in self.calls]) if self.calls else self.text
            return render_turn(MODEL, body)
        if self.kind == TOOL_OUTPUT:
            return render_turn(USER_ROLE, f'<tool_result name="{self.name}" id="{self.call_id}" '
                                          f'status="{self.status}">\n'
                                          f"{self.text}\n</tool_result>")
        if self.kind == SUMMARY:
            return render_turn(USER_ROLE, f"<summary of earlier conversation>\n{self.text}\n</summary>")
        return render_turn(USER_ROLE, self.text)

    def counted(self, tokens: tuple[int, ...]) -> HistoryItem:
        return replace(self, num_tokens=len(tokens), tokens=tokens)

    def stored(self, position: int) -> HistoryItem:
        return replace(self, position=position)


def system_item(system_prompt: str, tool_text: str) -> HistoryItem:
    text = "\n\n".join(part for part in (system_prompt.strip(), tool_text) if part)
    return HistoryItem(kind=SYSTEM, text=text)


def group_by_user_turn(items: list[HistoryItem]) -> list[list[HistoryItem]]:
    """Split non-system items into exchanges that start at a user message.

    An assistant turn that calls tools and the outputs answering it always
    fall in the same group, so dropping a group never orphans a call.
    """
    groups: list[list[HistoryItem]] = []
    for item in items:
        if item.kind == SYSTEM:
            continue
        if item.kind in (USER, SUMMARY) or not groups:
            groups.append([item])
        else:
            groups[-1].append(item)
    return groups
