"""Bad input to the REST layer is a 4xx naming what was wrong, never a 500.

Routes are enumerated from the served /openapi.json, so a new annotated RPC
is covered without touching this file. Every backend answers every RPC with
an empty reply and counts the calls: refused input must reach none of them.
"""
from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from llmesh.inference.v1 import inference_pb2
from llmesh.orchestrator.v1 import orchestrator_pb2
from llmesh.policy.v1 import policy_pb2
from llmesh.tools.v1 import tools_pb2

from services.common import errors
from services.common.auth import ApiKeyAuthenticator, ApiKeyStore, FailedAttemptLimiter, generate_api_key
from services.common.runtime import running_service
from services.common.settings import ServerSettings
from services.gateway.config import Settings
from services.gateway.core.json_body import MAX_JSON_DEPTH, loads_body
from services.gateway.core.model_catalog import ModelCatalog
from services.gateway.server import build_app, running_gateway
from tests.gateway.conftest import TEST_SCRYPT_N
from tests.gateway.fakes import EmptyReplyApp, ScriptedGenerator

SERVICES = {
    "orchestrator": orchestrator_pb2.DESCRIPTOR.services_by_name["AgentService"],
    "inference": inference_pb2.DESCRIPTOR.services_by_name["InferenceService"],
    "tools": tools_pb2.DESCRIPTOR.services_by_name["ToolService"],
    "policy": policy_pb2.DESCRIPTOR.services_by_name["PolicyService"],
}
OPENAI_PATHS = ("/v1/chat/completions", "/v1/completions")
CHAT = {"model": "gemma-3-270m", "messages": [{"role": "user", "content": "hi"}]}


@dataclass
class Gateway:
    client: httpx.AsyncClient
    backend: EmptyReplyApp
    generator: ScriptedGenerator
    doc: dict[str, Any]

    def operations(self, *, with_body: bool) -> list[tuple[str, str, dict[str, Any]]]:
        """(method, concrete path, operation) for every documented operation."""
        found = []
        for template, methods in self.doc["paths"].items():
            for method, operation in methods.items():
                if with_body == ("requestBody" in operation):
                    found.append((method.upper(), re.sub(r"\{[^}]+\}", "x1", template), operation))
        return found

    def schema(self, ref_or_schema: dict[str, Any]) -> dict[str, Any]:
        ref = ref_or_schema.get("$ref")
        return self.doc["components"]["schemas"][ref.rsplit("/", 1)[1]] if ref else ref_or_schema


@pytest.fixture
async def gateway() -> AsyncIterator[Gateway]:
    key, record = generate_api_key("acme", n=TEST_SCRYPT_N)
    auth = ApiKeyAuthenticator(ApiKeyStore([record]), FailedAttemptLimiter(max_failures=1000))
    backend = EmptyReplyApp(SERVICES.values())
    generator = ScriptedGenerator()
    try:
        async with running_service(backend, ServerSettings(port=0)) as svc:
            target = f"127.0.0.1:{svc.port}"
            app = build_app(Settings(port=0, **{f"{name}_target": target for name in SERVICES}),
                            authenticator=auth, generator=generator)
            async with running_gateway(app) as url:
                async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"},
                                             timeout=30) as client:
                    doc = (await client.get("/openapi.json")).json()
                    yield Gateway(client, backend, generator, doc)
    finally:
        auth.close()


def named_field(response: httpx.Response) -> str | None:
    """The field a 4xx names, in the generic or the OpenAI error shape."""
    error = response.json()["error"]
    if "param" in error:
        return error["param"]
    infos = [d for d in error.get("details", []) if d.get("@type", "").endswith("ErrorInfo")]
    return infos[0]["metadata"].get("field") if infos else None


def assert_refused(response: httpx.Response, field: str, status: int = 400) -> None:
    assert response.status_code == status, f"{response.request.method} {response.request.url}: " \
                                           f"{response.status_code} {response.text[:300]}"
    assert named_field(response) == field, response.text[:300]


def nested(depth: int, inner: bytes = b"1") -> bytes:
    return b'{"a":' * depth + inner + b"}" * depth


def test_depth_limit_is_exact_and_ignores_brackets_in_strings():
    assert loads_body(b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH)
    assert loads_body(b'{"t": "' + b"[{" * 5000 + b'\\"[["}') == {"t": "[{" * 5000 + '"[['}
    with pytest.raises(errors.InvalidArgument) as caught:
        loads_body(b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1))
    assert caught.value.reason == "JSON_TOO_DEEP" and caught.value.metadata["field"] == "body"


async def test_nested_json_is_400_naming_the_body_on_every_post_route(gateway: Gateway):
    operations = gateway.operations(with_body=True)
    # (Policy's Evaluate and RecordApproval and tools' ExecuteTool(s) have no route: the gateway may not call them.)
    assert len(operations) >= 11 and {path for _, path, _ in operations} >= set(OPENAI_PATHS)
    bodies = [b"[" * 100_000 + b"]" * 100_000, nested(50_000), nested(MAX_JSON_DEPTH + 1),
              b'{"title": ' + nested(2_000) + b"}", b'{"messages": [' + b"[" * 5_000 + b"]" * 5_000 + b"]}"]
    for method, path, _ in operations:
        for body in bodies:
            response = await gateway.client.request(method, path, content=body,
                                                    headers={"Content-Type": "application/json"})
            assert_refused(response, "body")
    assert gateway.backend.num_calls == 0 and gateway.generator.requests == []


async def test_hostile_json_is_400_on_every_post_route(gateway: Gateway):
    bodies = [b'{"a": 1, "a": 2}', b'{"a": NaN}', b'{"a": "\\ud800"}', b'\xff\xfe{}', b'{"a": "\xed\xa0\x80"}',
              b'{"a": ' + b"9" * 5_000 + b"}", b'{"a": 1e999999}', b"[1, 2", b'"\\u0000"', b"[]"]
    for method, path, _ in gateway.operations(with_body=True):
        for body in bodies:
            response = await gateway.client.request(method, path, content=body)
            assert 400 <= response.status_code < 500, f"{path} {body[:40]!r}: {response.status_code} {response.text}"
    assert gateway.backend.num_calls == 0 and gateway.generator.requests == []


async def test_huge_last_event_id_is_400_naming_the_header(gateway: Gateway):
    resumable = [(method, path, op) for method, path, op in gateway.operations(with_body=False)
                 + gateway.operations(with_body=True)
                 if any(p["name"] == "Last-Event-ID" for p in op.get("parameters", []))]
    assert len(resumable) >= 2
    for method, path, operation in resumable:
        body = {} if "requestBody" in operation else None
        for value in ["99999999999999999999999", "9223372036854775808", "-1", "1e3", "+5", "0x10", "1" * 5000]:
            response = await gateway.client.request(method, path, json=body, headers={"Last-Event-ID": value})
            assert_refused(response, "Last-Event-ID")
    assert gateway.backend.num_calls == 0
    fine = await gateway.client.get("/v1/sessions/x1/events", headers={"Last-Event-ID": "9223372036854775807"})
    assert fine.status_code == 200 and gateway.backend.num_calls == 1


def _integer_bounds(schema: dict[str, Any]) -> tuple[int, int] | None:
    for option in [schema, *schema.get("oneOf", [])]:
        if option.get("type") == "integer" and "maximum" in option:
            return option["minimum"], option["maximum"]
    return None


async def test_out_of_range_integers_are_400_naming_the_field(gateway: Gateway):
    num_checked = 0
    for method, path, operation in gateway.operations(with_body=False):
        for parameter in operation.get("parameters", []):
            bounds = _integer_bounds(parameter.get("schema", {}))
            if parameter["in"] != "query" or bounds is None:
                continue
            low, high = bounds
            for value in [high + 1, low - 1, 10**40, "1" * 5000, "1_0", "\u00b2", "0x10", " 7"]:
                response = await gateway.client.request(method, path, params={parameter["name"]: str(value)})
                assert_refused(response, parameter["name"])
                num_checked += 1
    for method, path, operation in gateway.operations(with_body=True):
        content = operation["requestBody"]["content"]["application/json"]["schema"]
        for name, prop in gateway.schema(content).get("properties", {}).items():
            bounds = _integer_bounds(prop)
            if bounds is None:
                continue
            for value in [bounds[1] + 1, bounds[0] - 1]:
                response = await gateway.client.request(method, path, content=f'{{"{name}": {value}}}')
                assert_refused(response, name)
                num_checked += 1
            response = await gateway.client.request(method, path, content=f'{{"{name}": {"7" * 5000}}}')
            assert_refused(response, "body")
    assert num_checked >= 20
    assert gateway.backend.num_calls == 0
    for path in OPENAI_PATHS:
        base = CHAT if "chat" in path else {"model": "gemma-3-270m", "prompt": "hi"}
        for name, value in [("max_tokens", 10**30), ("max_tokens", -1), ("n", 10**30), ("n", True),
                            ("seed", 2**64), ("temperature", 10**400), ("top_p", -(10**40))]:
            response = await gateway.client.post(path, json={**base, name: value})
            assert_refused(response, name)
        response = await gateway.client.post(path, content=b'{"max_tokens": ' + b"9" * 5000 + b"}")
        assert_refused(response, "body")
    assert gateway.generator.requests == []


@pytest.mark.parametrize("stream", [False, True])
async def test_unknown_model_is_404_naming_the_model(gateway: Gateway, stream: bool):
    for path in OPENAI_PATHS:
        base = CHAT if "chat" in path else {"model": "gemma-3-270m", "prompt": "hi"}
        response = await gateway.client.post(path, json={**base, "model": "no-such-model", "stream": stream})
        assert_refused(response, "model", status=404)
        assert response.json()["error"]["code"] == "MODEL_NOT_FOUND"
    assert gateway.generator.requests == []
    served = await gateway.client.post(OPENAI_PATHS[0], json={**CHAT, "stream": stream})
    assert served.status_code == 200 and len(gateway.generator.requests) == 1


async def test_unknown_model_names_cost_at_most_one_listing_per_interval():
    generator = ScriptedGenerator(models=("gemma-3-270m",))
    num_listings = 0
    original = generator.list_models

    async def counted() -> list[str]:
        nonlocal num_listings
        num_listings += 1
        return await original()

    generator.list_models = counted
    now = [0.0]
    catalog = ModelCatalog(generator, ttl_s=30, min_refresh_s=1, clock=lambda: now[0])
    await catalog.require("gemma-3-270m")
    for i in range(50):
        with pytest.raises(errors.NotFound):
            await catalog.require(f"made-up-{i}")
    assert num_listings == 1
    generator.models = ("gemma-3-270m", "new-model")  # a node serving another model joined
    now[0] = 1.5
    await catalog.require("new-model")
    assert num_listings == 2
