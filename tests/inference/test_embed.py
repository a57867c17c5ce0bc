"""Embed without a model: the runner's limits, groups and engine-thread hand-off, and the RPC on the synthetic node."""
from __future__ import annotations

import asyncio
from collections.abc import Sequence

import grpc
import numpy as np
import pytest
from llmesh.inference.v1 import inference_pb2 as pb
from llmesh.inference.v1 import inference_pb2_grpc

from services.common import authz, errors
from services.common.interceptors import error_info
from services.common.runtime import running_service
from services.inference.core.embedding import EmbeddingRunner, EmbedInput, group_inputs
from services.inference.server import build_app
from tests.inference.test_servicer import synthetic_settings
from tests.support.auth import service_channel


class WordEmbedder:
    """A model-like embedder: one token per word, vectors from the word count; records its groups."""

    runs_model = True
    dim = 4

    def __init__(self, max_input_tokens: int = 8, max_batch_tokens: int = 8) -> None:
        self.max_input_tokens = max_input_tokens
        self.max_batch_tokens = max_batch_tokens
        self.groups: list[list[str]] = []

    def prepare(self, text: str) -> EmbedInput:
        return EmbedInput(text, tuple(range(len(text.split()))))

    def embed_batch(self, inputs: Sequence[EmbedInput]) -> list[np.ndarray]:
        self.groups.append([item.text for item in inputs])
        return [np.array([len(item.tokens), 1.0, 0.0, 0.0], dtype=np.float32) for item in inputs]


class EngineThread:
    """Stands in for ``Engine.call``: counts the calls and how many overlap."""

    def __init__(self) -> None:
        self.num_calls = self.running = self.most_running = 0

    async def call(self, fn):
        self.num_calls += 1
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await asyncio.sleep(0.01)
            return fn()
        finally:
            self.running -= 1


def field_of(caught: pytest.ExceptionInfo) -> str | None:
    return caught.value.field


async def test_inputs_go_to_the_engine_in_token_bounded_groups_and_come_back_normalised_in_order():
    embedder, engine = WordEmbedder(max_batch_tokens=5), EngineThread()
    runner = EmbeddingRunner(embedder, engine.call)
    texts = ["a b c", "d e", "f", "g h i j", "k"]
    result = await runner.embed(texts)
    assert embedder.groups == [["a b c", "d e"], ["f", "g h i j"], ["k"]]
    assert engine.num_calls == 3
    assert result.prompt_tokens == 11
    assert [round(float(v[0] / v[1])) for v in result.vectors] == [3, 2, 1, 4, 1]
    assert all(abs(float(np.linalg.norm(v)) - 1.0) < 1e-6 for v in result.vectors)


async def test_concurrent_requests_never_put_two_groups_on_the_engine_at_once():
    embedder, engine = WordEmbedder(max_batch_tokens=1), EngineThread()
    runner = EmbeddingRunner(embedder, engine.call)
    await asyncio.gather(*(runner.embed(["x", "y", "z"]) for _ in range(4)))
    assert engine.num_calls == 12 and engine.most_running == 1


async def test_bad_inputs_are_refused_naming_the_field_before_the_model_runs():
    embedder, engine = WordEmbedder(max_input_tokens=3), EngineThread()
    runner = EmbeddingRunner(embedder, engine.call, max_inputs=4)
    for texts, dimensions, field in [
        ([], 0, "inputs"),
        (["a"] * 5, 0, "inputs"),
        (["a", ""], 0, "inputs[1]"),
        (["a", "b c", "d e f g"], 0, "inputs[2]"),
        (["a"], 3, "dimensions"),
        (["a"], -1, "dimensions"),
    ]:
        with pytest.raises(errors.InvalidArgument) as caught:
            await runner.embed(texts, dimensions)
        assert field_of(caught) == field, (texts, dimensions)
    assert engine.num_calls == 0
    assert len((await runner.embed(["a b c"], dimensions=4)).vectors) == 1


async def test_too_many_requests_at_once_is_back_pressure():
    gate = asyncio.Event()

    async def stalled(fn):
        await gate.wait()
        return fn()

    runner = EmbeddingRunner(WordEmbedder(), stalled, max_requests=2)
    first = [asyncio.create_task(runner.embed(["a"])) for _ in range(2)]
    await asyncio.sleep(0.05)
    with pytest.raises(errors.ResourceExhausted) as caught:
        await runner.embed(["a"])
    assert caught.value.reason == "EMBED_QUEUE_FULL"
    gate.set()
    await asyncio.gather(*first)
    assert runner.num_requests == 0


def test_a_group_holds_an_input_longer_than_the_budget_alone():
    inputs = [EmbedInput("x", (1,) * n) for n in (2, 9, 1)]
    assert [len(g) for g in group_inputs(inputs, 4)] == [1, 1, 1]


def test_embed_is_authorised_like_generate():
    base = "/llmesh.inference.v1.InferenceService/"
    assert authz.allowed_callers(base + "Embed") == authz.allowed_callers(base + "Generate")
    assert {authz.CLIENT, authz.GATEWAY} <= authz.allowed_callers(base + "Embed")


@pytest.fixture
async def stub():
    settings = synthetic_settings(n_ctx=64)
    async with running_service(build_app(settings), settings) as svc:
        async with service_channel(svc.address, "gateway") as channel:
            yield inference_pb2_grpc.InferenceServiceStub(channel)


async def test_the_synthetic_node_embeds_lexically_over_grpc(stub):
    reply = await stub.Embed(pb.EmbedRequest(inputs=["the cat sat", "the cat sat", "stock prices fell"]))
    vectors = [np.array(e.values) for e in reply.embeddings]
    assert len(vectors) == 3 and all(len(v) == 512 for v in vectors)
    assert np.array_equal(vectors[0], vectors[1]) and not np.array_equal(vectors[0], vectors[2])
    assert abs(float(np.linalg.norm(vectors[0])) - 1.0) < 1e-5
    assert reply.prompt_tokens > 0 and reply.model == "gemma-3-270m" and reply.node_id


async def test_the_rpc_names_the_field_it_refuses(stub):
    for request, code, field in [
        (pb.EmbedRequest(), grpc.StatusCode.INVALID_ARGUMENT, "inputs"),
        (pb.EmbedRequest(inputs=["x"] * 257), grpc.StatusCode.INVALID_ARGUMENT, "inputs"),
        (pb.EmbedRequest(inputs=["ok", "word " * 100]), grpc.StatusCode.INVALID_ARGUMENT, "inputs[1]"),
        (pb.EmbedRequest(inputs=["ok"], dimensions=256), grpc.StatusCode.INVALID_ARGUMENT, "dimensions"),
        (pb.EmbedRequest(inputs=["ok"], model="nope"), grpc.StatusCode.NOT_FOUND, "model"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Embed(request)
        assert caught.value.code() == code
        assert error_info(caught.value).metadata["field"] == field
