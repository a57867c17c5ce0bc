"""The tool-call format: grammar llama.cpp accepts, parser, prompt rendering."""
from __future__ import annotations

import pytest

from services.orchestrator.core.history import HistoryItem, system_item
from services.orchestrator.core.ports import ToolSpec
from services.orchestrator.core.tool_format import (
    MalformedReply,
    build_grammar,
    describe_tools,
    format_calls,
    parse_reply,
)
from tests.orchestrator.fakes import FS_LIST, FS_READ, SHELL

ODD = ToolSpec("mcp.search-v2", "Search.", {"type": "object", "properties": {
    "query": {"type": "string"}, "limit": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}},
    "mode": {"enum": ["fast", "deep"]}, "exact": {"type": "boolean"}}, "required": ["query", "mode"]})
ONE_OF = ToolSpec("run", "Run.", {"type": "object", "properties": {
    "command": {"type": "string", "minLength": 1}, "argv": {"type": "array", "items": {"type": "string"},
                                                            "minItems": 1}},
    "oneOf": [{"required": ["command"]}, {"required": ["argv"]}]})
NO_REQUIRED = ToolSpec("status", "Status.", {"type": "object", "properties": {"verbose": {"type": "boolean"},
                                                                              "name": {"type": "string"}}})


@pytest.mark.parametrize("tools", [[FS_READ, FS_LIST], [SHELL, ODD, NO_REQUIRED, ONE_OF], []])
def test_llama_cpp_accepts_the_grammar(tools):
    llama_cpp = pytest.importorskip("llama_cpp")
    grammar = build_grammar(tools)
    assert llama_cpp.LlamaGrammar.from_string(grammar, verbose=False) is not None
    for tool in tools:
        assert f'\\"{tool.name}\\"' in grammar


def test_one_of_branches_become_alternatives_with_their_required_members():
    lines = build_grammar([ONE_OF]).splitlines()
    branches = [line for line in lines if line.split(" ::= ")[0] in ("tool-run-arguments-0", "tool-run-arguments-1")]
    assert len(branches) == 2, branches
    # oneOf: each branch has its own required member and not the other's.
    assert "command-kv" in branches[0] and "argv" not in branches[0]
    assert "argv-kv" in branches[1] and "command" not in branches[1]
    assert 'tool-run-arguments-0-command ::= "\\"" char (char' in "\n".join(lines), "minLength 1 holds"
    assert '{"command": "."}' in describe_tools([ONE_OF])


def test_grammar_without_answer_forces_a_call():
    grammar = build_grammar([FS_READ], require_call=True)
    assert grammar.splitlines()[0] == "root ::= calls"


def test_parse_final_answer_and_calls():
    assert parse_reply("  The answer is 4.\n").text == "The answer is 4."
    reply = parse_reply('<tool_call>{"name": "fs_read", "arguments": {"path": "a"}}</tool_call>\n'
                        '<tool_call>{"name": "fs_list", "arguments": {"path": "."}}</tool_call>')
    assert [(c.name, c.arguments) for c in reply.calls] == [("fs_read", {"path": "a"}), ("fs_list", {"path": "."})]
    assert parse_reply(format_calls(reply.calls)).calls == reply.calls


@pytest.mark.parametrize("text", [
    '<tool_call>{"name": "fs_read", "arguments": {"pa',
    '<tool_call>{"name": "fs_read", "arguments": [1]}</tool_call>',
    '<tool_call>{"name": "nope", "arguments": {}}</tool_call>',
    '<tool_call>{"name": "fs_read", "arguments": {}}</tool_call> trailing words',
])
def test_broken_calls_are_reported(text):
    with pytest.raises(MalformedReply):
        parse_reply(text, allowed=["fs_read", "fs_list"])


def test_gemma_turn_format_and_tool_descriptions():
    system = system_item("You are terse.", describe_tools([FS_READ]))
    rendered = system.render()
    assert rendered.startswith("<start_of_turn>user\nYou are terse.\n\nYou can call these tools:")
    assert rendered.endswith("<end_of_turn>\n")
    assert '<tool_call>{"name": "fs_read", "arguments": {"path": "."}}</tool_call>' in rendered
    assert HistoryItem(kind="assistant", text="hi").render() == "<start_of_turn>model\nhi<end_of_turn>\n"
