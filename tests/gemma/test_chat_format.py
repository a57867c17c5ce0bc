"""The shared Gemma turn format."""
from __future__ import annotations

from services.gemma.chat_format import GENERATION_PROMPT, render_conversation, render_turn


def test_turns_open_and_close_on_special_tokens():
    assert render_turn("user", "hi") == "<start_of_turn>user\nhi<end_of_turn>\n"
    prompt = render_conversation([("user", "hi"), ("model", "hello"), ("user", "bye")])
    assert prompt == ("<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\nhello<end_of_turn>\n"
                      "<start_of_turn>user\nbye<end_of_turn>\n<start_of_turn>model\n")
    assert prompt.endswith(GENERATION_PROMPT)
