"""The Python examples of docs/openai.md run against the gateway (fake backends), so the page stays true."""
from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from tests.gateway.conftest import Mesh
from tests.gateway.test_openai import client_for

PAGE = Path(__file__).resolve().parents[2] / "docs" / "openai.md"
BLOCKS = re.findall(r"```python\n(.*?)```", PAGE.read_text(), re.S)
# What the scripted model answers for each kind of example.
ANSWERS = {"tools=": '{"name": "get_weather", "arguments": {"city": "Paris"}}',
           "response_format": '{"name": "Ada", "age": 36}'}


def test_the_page_has_its_examples():
    assert len(BLOCKS) >= 8 and "AsyncOpenAI" in BLOCKS[0]


@pytest.mark.parametrize("code", BLOCKS[1:], ids=lambda code: code.splitlines()[0][:40])
async def test_each_example_runs(mesh: Mesh, code: str, capsys):
    mesh.generator.text = next((text for marker, text in ANSWERS.items() if marker in code), "Hello from llmesh")
    namespace: dict = {}
    exec("async def example(client):\n" + textwrap.indent(code, "    "), namespace)  # the page's own code
    async with client_for(mesh) as client:
        await namespace["example"](client)
    assert capsys.readouterr().out.strip(), "each example prints what it got"


async def test_what_the_page_says_is_not_served_yet(mesh: Mesh):
    async with mesh.client() as http:
        responses = await http.post("/v1/responses", json={"model": "gemma-3-270m", "input": "hi"})
    assert responses.status_code == 404
