"""The semantic cache on the real model: the node's own embeddings match a paraphrase, not another question."""
from __future__ import annotations

import threading

import numpy as np
import pytest
from llmesh.inference.v1 import inference_pb2 as pb
from llmesh.inference.v1 import inference_pb2_grpc

from services.common.runtime import running_service
from services.inference.adapters.llama_backend import LlamaBackend
from services.inference.adapters.llama_embedder import LlamaEmbedder
from services.inference.config import Settings
from services.inference.server import build_app
from tests.support.auth import service_channel

pytestmark = pytest.mark.model

ASKED = "What is the capital of France?"
PARAPHRASE = "Which city is the capital of France?"
UNRELATED = "How do I bake sourdough bread at home?"


def cosine(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_model_embeddings_put_a_paraphrase_nearer_than_another_question(model_path):
    backend = LlamaBackend(model_path, n_ctx=256, n_seq_max=1, n_batch=64, n_threads=2)
    embedder = LlamaEmbedder(backend, n_threads=2)
    try:
        asked, paraphrase, unrelated = (embedder.embed(t) for t in (ASKED, PARAPHRASE, UNRELATED))
        assert len(asked) == embedder.dim > 0
        assert cosine(asked, paraphrase) >= 0.75 > cosine(asked, unrelated)
        # The same text embeds the same way: the context is cleared between calls.
        assert cosine(asked, embedder.embed(ASKED)) > 0.999
    finally:
        embedder.close()
        backend.close()


def request(prompt: str) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=f"<start_of_turn>user\n{prompt}<end_of_turn>\n<start_of_turn>model\n",
                              semantic_cache=True, sampling=pb.SamplingParams(max_tokens=6, temperature=0.0))


async def answer(stub, prompt: str) -> list[pb.GenerateResponse]:
    return [reply async for reply in stub.Generate(request(prompt))]


async def test_a_paraphrase_is_answered_from_the_semantic_cache_on_the_node(model_path):
    settings = Settings(port=0, backend="llama", model_path=str(model_path), n_ctx=1024, n_seq_max=2,
                        n_threads=2, n_gpu_layers=0, semantic_cache_entries=16)
    async with running_service(build_app(settings), settings) as svc:
        embedder = svc.app.front.semantic.embedder
        assert type(embedder).__name__ == "LlamaEmbedder"
        # The embeddings run on the engine thread: one thread drives all of the model's compute.
        embed, threads = embedder.embed, []
        embedder.embed = lambda text: threads.append(threading.current_thread().name) or embed(text)
        async with service_channel(svc.address, "orchestrator") as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            first = await answer(stub, ASKED)
            again = await answer(stub, PARAPHRASE)
            other = await answer(stub, UNRELATED)
    assert not any(r.cached for r in first)
    assert all(r.cached for r in again) and "".join(r.text for r in again) == "".join(r.text for r in first)
    assert not any(r.cached for r in other)
    assert threads == ["llmesh-engine-0"] * 3
