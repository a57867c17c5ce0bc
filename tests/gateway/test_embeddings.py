"""``/v1/embeddings``, driven by the official ``openai`` package: on the fake generator, then on a real node."""
from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import openai
import pytest
import pytest_asyncio

from services.common.auth import ApiKeyAuthenticator, ApiKeyStore, FailedAttemptLimiter, generate_api_key
from services.common.runtime import running_service
from services.gateway.config import Settings as GatewaySettings
from services.gateway.core.openai_embeddings import FIELDS
from services.gateway.server import build_app, running_gateway
from services.inference.config import Settings as InferenceSettings
from services.inference.server import build_app as build_inference
from tests.gateway.conftest import Mesh
from tests.gateway.fakes import EMBED_DIM, fake_vector
from tests.gateway.test_openai import client_for
from tests.support.mesh import TEST_SCRYPT_N


def from_base64(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f4")


async def test_a_string_comes_back_as_floats_with_usage(mesh: Mesh):
    async with client_for(mesh) as client:
        reply = await client.embeddings.create(model="gemma-3-270m", input="hello embedded world",
                                               encoding_format="float")
    assert reply.object == "list" and reply.model == "gemma-3-270m"
    [item] = reply.data
    assert item.object == "embedding" and item.index == 0
    assert item.embedding == pytest.approx(fake_vector("hello embedded world"), abs=1e-12)
    assert (reply.usage.prompt_tokens, reply.usage.total_tokens) == (3, 3)
    sent = mesh.generator.embed_requests[0]
    assert sent.inputs == ("hello embedded world",) and sent.tenant_id == "acme" and sent.dimensions == 0


async def test_a_list_comes_back_as_base64_float32_in_order(mesh: Mesh):
    texts = ["first text", "second text", "first text"]
    async with client_for(mesh) as client:
        raw = await client.embeddings.create(model="gemma-3-270m", input=texts, encoding_format="base64",
                                             dimensions=EMBED_DIM)
        # Without encoding_format the SDK asks for base64 itself and hands back floats.
        decoded = await client.embeddings.create(model="gemma-3-270m", input=texts)
    assert [item.index for item in raw.data] == [0, 1, 2]
    vectors = [from_base64(item.embedding) for item in raw.data]
    for vector, text in zip(vectors, texts, strict=True):
        assert np.array_equal(vector, np.asarray(fake_vector(text), dtype=np.float32))
    assert [item.embedding for item in decoded.data] == [v.tolist() for v in vectors]
    assert mesh.generator.embed_requests[0].dimensions == EMBED_DIM


@pytest.mark.parametrize(("kwargs", "param"), [
    (dict(input=[1, 2, 3]), "input"),
    (dict(input=[[1, 2], [3]]), "input"),
    (dict(input=[]), "input"),
    (dict(input=""), "input"),
    (dict(input=["ok", 3]), "input[1]"),
    (dict(input=["ok", ""]), "input[1]"),
    # The node's refusals of inputs[i] come back naming input[i] (input when it was one string).
    (dict(input=["ok", "TOO LONG"]), "input[1]"),
    (dict(input="TOO LONG"), "input"),
    (dict(input="x", dimensions=1536), "dimensions"),
    (dict(input="x", dimensions=0), "dimensions"),
    (dict(input="x", encoding_format="float16"), "encoding_format"),
    (dict(input="x", user="someone"), "user"),
    (dict(input="x", extra_body={"truncate": True}), "truncate"),
    (dict(input="x", model="auto"), "model"),
])
async def test_bad_requests_are_400s_naming_the_parameter(mesh: Mesh, kwargs, param):
    kwargs = {"model": "gemma-3-270m", **kwargs}
    async with client_for(mesh) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.embeddings.create(**kwargs)
    assert caught.value.status_code == 400 and caught.value.param == param
    assert caught.value.type == "invalid_request_error"


async def test_an_unknown_model_is_a_404_and_no_key_is_a_401(mesh: Mesh):
    async with client_for(mesh) as client:
        with pytest.raises(openai.NotFoundError) as caught:
            await client.embeddings.create(model="text-embedding-3-small", input="x")
    assert caught.value.param == "model"
    async with mesh.client(key=None) as anonymous:
        refused = await anonymous.post("/v1/embeddings", json={"model": "gemma-3-270m", "input": "x"})
        listed = await anonymous.get("/openapi.json")
    assert refused.status_code == 401
    assert listed.json()["paths"]["/v1/embeddings"]["post"]["operationId"] == "OpenAI_Embeddings"
    assert mesh.generator.embed_requests == []


def test_the_docs_table_lists_every_field_the_endpoint_accepts():
    docs = (Path(__file__).parents[2] / "docs" / "gateway.md").read_text()
    section = docs.split("## Embeddings", 1)[1].split("\n## ", 1)[0]
    rows = {line.split("`")[1] for line in section.splitlines() if line.startswith("| `")}
    assert rows == set(FIELDS)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def real_node_gateway(tmp_path_factory, model_path) -> AsyncIterator[tuple[str, str]]:
    """A gateway whose balancer reaches one node on the bundled model; (base URL, API key)."""
    node = InferenceSettings(port=0, backend="llama", model_path=str(model_path), n_ctx=512, n_seq_max=2,
                             n_threads=2, n_gpu_layers=0)
    key, record = generate_api_key("acme", n=TEST_SCRYPT_N)
    authenticator = ApiKeyAuthenticator(ApiKeyStore([record]), FailedAttemptLimiter(max_failures=5, window_s=60))
    try:
        async with running_service(build_inference(node), node) as svc:
            app = build_app(GatewaySettings(port=0, inference_nodes=(svc.address,)), authenticator=authenticator)
            async with running_gateway(app) as url:
                yield url, key
    finally:
        authenticator.close()


@pytest.mark.model
@pytest.mark.asyncio(loop_scope="module")
async def test_a_real_node_embeds_through_the_balancer(real_node_gateway):
    url, key = real_node_gateway
    texts = ["The cat sat on the mat.", "Stock prices fell sharply today."]
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0) as client:
        floats = await client.embeddings.create(model="gemma-3-270m", input=texts, encoding_format="float")
        raw = await client.embeddings.create(model="gemma-3-270m", input=texts[0], encoding_format="base64")
        for kwargs, param in [(dict(input=["ok", "word " * 600]), "input[1]"),
                              (dict(input=["x"] * 257), "input"),
                              (dict(input="x", dimensions=1536), "dimensions")]:
            with pytest.raises(openai.BadRequestError) as caught:
                await client.embeddings.create(model="gemma-3-270m", **kwargs)
            assert caught.value.param == param
    vectors = [np.asarray(item.embedding) for item in floats.data]
    assert floats.model == "gemma-3-270m" and [len(v) for v in vectors] == [640, 640]
    assert all(abs(float(np.linalg.norm(v)) - 1.0) < 1e-5 for v in vectors)
    assert float(vectors[0] @ vectors[1]) < 0.99
    assert floats.usage.prompt_tokens > raw.usage.prompt_tokens > 0
    # The same text alone, as base64, is the same float32 vector.
    assert np.array_equal(from_base64(raw.data[0].embedding), vectors[0].astype(np.float32))
