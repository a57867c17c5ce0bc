"""The Python examples of docs/openai.md run against the gateway (fake backends), so the page stays true."""
from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from tests.gateway.conftest import ResponsesMesh
from tests.gateway.test_openai import client_for

PAGE = Path(__file__).resolve().parents[2] / "docs" / "openai.md"
BLOCKS = re.findall(r"```python\n(.*?)```", PAGE.read_text(), re.S)
# What the scripted model answers for each kind of example.
ANSWERS = {"function_call_output": '{"name": "get_weather", "arguments": {"city": "Paris"}}',
           "tools=": '{"name": "get_weather", "arguments": {"city": "Paris"}}',
           "response_format": '{"name": "Ada", "age": 36}'}


def test_the_page_has_its_examples():
    assert len(BLOCKS) >= 8 and "AsyncOpenAI" in BLOCKS[0]


@pytest.mark.parametrize("code", BLOCKS[1:], ids=lambda code: code.splitlines()[0][:40])
async def test_each_example_runs(rmesh: ResponsesMesh, code: str, capsys):
    mesh = rmesh
    mesh.generator.text = next((text for marker, text in ANSWERS.items() if marker in code), "Hello from llmesh")
    namespace: dict = {}
    exec("async def example(client):\n" + textwrap.indent(code, "    "), namespace)  # the page's own code
    async with client_for(mesh) as client:
        await namespace["example"](client)
    assert capsys.readouterr().out.strip(), "each example prints what it got"
