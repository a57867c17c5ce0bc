"""Embed on the real model over gRPC: stable vectors, batch = singles, bounds, the engine thread, one embedder."""
from __future__ import annotations

import threading
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest
import pytest_asyncio
from llmesh.inference.v1 import inference_pb2 as pb
from llmesh.inference.v1 import inference_pb2_grpc

from services.common.interceptors import error_info
from services.common.runtime import running_service
from services.inference.config import Settings
from services.inference.server import build_app
from tests.support.auth import service_channel

pytestmark = [pytest.mark.model, pytest.mark.asyncio(loop_scope="module")]

TEXTS = ["The cat sat on the mat.", "Stock prices fell sharply today.", "How do I bake bread?"]


class Node:
    def __init__(self, app, stub: inference_pb2_grpc.InferenceServiceStub) -> None:
        self.app = app
        self.stub = stub

    async def embed(self, *texts: str, **kw) -> list[np.ndarray]:
        reply = await self.stub.Embed(pb.EmbedRequest(inputs=list(texts), **kw))
        assert reply.model == "gemma-3-270m"
        return [np.array(e.values, dtype=np.float32) for e in reply.embeddings]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def node(model_path) -> AsyncIterator[Node]:
    # The semantic cache is on, with the model's embedder: Embed must share it, not open a second one.
    settings = Settings(port=0, backend="llama", model_path=str(model_path), n_ctx=512, n_seq_max=2,
                        n_threads=2, n_gpu_layers=0, semantic_cache_entries=4)
    async with running_service(build_app(settings), settings) as svc:
        async with service_channel(svc.address, "gateway") as channel:
            yield Node(svc.app, inference_pb2_grpc.InferenceServiceStub(channel))


async def test_the_embedder_is_shared_opened_on_first_use_and_run_on_the_engine_thread(node: Node):
    embedder = node.app.embeddings.embedder
    assert embedder is node.app.front.semantic.embedder
    assert not embedder.is_open, "the embedding context must not slow the node's start"
    embed_batch, threads = embedder.embed_batch, []

    def recording(inputs):
        threads.append(threading.current_thread().name)
        return embed_batch(inputs)

    embedder.embed_batch = recording
    try:
        [vector] = await node.embed(TEXTS[0])
    finally:
        del embedder.embed_batch
    assert embedder.is_open and threads == ["llmesh-engine-0"]
    assert len(vector) == embedder.dim == 640
    assert abs(float(np.linalg.norm(vector)) - 1.0) < 1e-5


async def test_a_text_gets_the_same_vector_alone_twice_or_in_a_batch_and_another_text_another(node: Node):
    singles = [(await node.embed(text))[0] for text in TEXTS]
    again = (await node.embed(TEXTS[0]))[0]
    batch = await node.embed(*TEXTS)
    assert np.array_equal(singles[0], again)
    assert all(np.array_equal(a, b) for a, b in zip(singles, batch, strict=True))
    assert float(singles[0] @ singles[1]) < 0.99 and float(singles[1] @ singles[2]) < 0.99


async def test_bounds_are_refused_naming_the_field(node: Node):
    limit = node.app.embeddings.embedder.max_input_tokens
    for request, field in [
        (pb.EmbedRequest(inputs=["ok", "word " * limit]), "inputs[1]"),
        (pb.EmbedRequest(inputs=["x"] * 257), "inputs"),
        (pb.EmbedRequest(inputs=["ok", ""]), "inputs[1]"),
        (pb.EmbedRequest(inputs=["ok"], dimensions=1536), "dimensions"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await node.stub.Embed(request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(caught.value).metadata["field"] == field
    # The limit is the embedding prompt's tokens, and prompt_tokens counts them.
    reply = await node.stub.Embed(pb.EmbedRequest(inputs=["ok"], dimensions=640))
    assert 1 < reply.prompt_tokens < 32
