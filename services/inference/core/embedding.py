"""Embed: vectors of untrusted texts from the node's own model, between generation steps.

The texts are checked (how many, each non-empty and within the embedder's
context, naming ``inputs[i]``), tokenized off the event loop, then embedded
in groups of at most ``max_batch_tokens`` tokens. A group is one call on the
engine thread (``run_model``, as for the semantic cache), and only one
group of the whole node is in flight at a time, so between two generation
steps the engine runs at most one group: a long Embed request stretches
the streams' inter-token latency by one group's decode, never by the whole
request. Each input is decoded on its own: packing several into one
llama.cpp decode changes the numerics (cosine 0.999 to the same text
decoded alone, measured on Gemma 3 270M), and a text's vector must not
depend on what else the request carried.

Vectors are L2-normalised (a dot product is the cosine similarity).
"""
from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from services.common.errors import InvalidArgument, ResourceExhausted, require
from services.inference.core.semantic_cache import HashingEmbedder

#: Most texts one Embed request may carry.
MAX_INPUTS = 256

Vector = npt.NDArray[np.float32]


@dataclass(frozen=True)
class EmbedInput:
    """One text as the embedder reads it."""

    text: str
    #: The tokens the model reads for the text (a model embedder's prompt around it).
    tokens: tuple[int, ...]


class BatchEmbedder(Protocol):
    #: True when ``embed_batch`` runs the node's model (and so belongs on its engine thread).
    runs_model: bool
    #: Length of every vector.
    dim: int
    #: Most tokens one input may take.
    max_input_tokens: int
    #: Most tokens one ``embed_batch`` call is given (at least ``max_input_tokens``).
    max_batch_tokens: int

    def prepare(self, text: str) -> EmbedInput:
        """The tokens of ``text`` as the embedder will read them; any thread."""

    def embed_batch(self, inputs: Sequence[EmbedInput]) -> list[Vector]:
        """One vector per input, in order (blocking: may run the model)."""


class LexicalBatchEmbedder:
    """``HashingEmbedder`` behind the batch interface, for nodes without a model (the synthetic backend).

    Token counts come from the node's tokenizer, so usage and limits read as on a model.
    """

    runs_model = False

    def __init__(self, tokenize: Callable[[str], list[int]], max_input_tokens: int, dim: int = 512) -> None:
        self._tokenize = tokenize
        self._hashing = HashingEmbedder(dim)
        self.dim = dim
        self.max_input_tokens = self.max_batch_tokens = max_input_tokens

    def prepare(self, text: str) -> EmbedInput:
        return EmbedInput(text, tuple(self._tokenize(text)))

    def embed_batch(self, inputs: Sequence[EmbedInput]) -> list[Vector]:
        return [np.asarray(self._hashing.embed(item.text), dtype=np.float32) for item in inputs]


@dataclass(frozen=True)
class EmbedResult:
    #: One L2-normalised vector per input, in the request's order.
    vectors: list[Vector]
    #: Tokens the model read for all inputs.
    prompt_tokens: int


def normalised(vector: Vector) -> Vector:
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 and math.isfinite(norm) else vector


def group_inputs(inputs: Sequence[EmbedInput], max_tokens: int) -> list[list[EmbedInput]]:
    """Consecutive inputs in groups of at most ``max_tokens`` tokens (an input alone may reach it)."""
    groups: list[list[EmbedInput]] = []
    size = 0
    for item in inputs:
        if not groups or size + len(item.tokens) > max_tokens:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += len(item.tokens)
    return groups


class EmbeddingRunner:
    """Embeds requests' texts with one embedder; ``run_model`` runs model work on the engine thread."""

    def __init__(self, embedder: BatchEmbedder, run_model: Callable[[Callable[[], Any]], Awaitable[Any]],
                 *, max_inputs: int = MAX_INPUTS, max_requests: int = 64) -> None:
        self.embedder = embedder
        self._run_model = run_model
        self.max_inputs = max_inputs
        #: Embed requests admitted at once; more get RESOURCE_EXHAUSTED.
        self.max_requests = max_requests
        self.num_requests = 0
        # One group of the node at a time (see the module docstring).
        self._turn = asyncio.Lock()

    def check(self, texts: Sequence[str], dimensions: int = 0) -> None:
        """What can be refused before any tokenizing: the count, empty texts, ``dimensions``."""
        require(len(texts) > 0, "inputs", "give at least one text")
        require(len(texts) <= self.max_inputs, "inputs",
                f"at most {self.max_inputs} texts per request, got {len(texts)}")
        for i, text in enumerate(texts):
            require(text != "", f"inputs[{i}]", "must not be empty")
        dim = self.embedder.dim
        require(dimensions in (0, dim), "dimensions",
                f"this model's embeddings have {dim} dimensions (0 or {dim}; vectors are not truncated)")

    async def embed(self, texts: Sequence[str], dimensions: int = 0) -> EmbedResult:
        """Raises InvalidArgument naming the field, ResourceExhausted when too many requests are admitted."""
        self.check(texts, dimensions)
        if self.num_requests >= self.max_requests:
            raise ResourceExhausted(f"{self.num_requests} embed requests are already running on this node",
                                    reason="EMBED_QUEUE_FULL", retry_after_ms=250)
        self.num_requests += 1
        try:
            embedder = self.embedder
            inputs = await asyncio.to_thread(lambda: [embedder.prepare(text) for text in texts])
            limit = embedder.max_input_tokens
            for i, item in enumerate(inputs):
                if len(item.tokens) > limit:
                    raise InvalidArgument(
                        f"inputs[{i}]: {len(item.tokens)} tokens (with the embedding prompt), more than the "
                        f"{limit} one input may take", field=f"inputs[{i}]")
            vectors: list[Vector] = []
            for group in group_inputs(inputs, embedder.max_batch_tokens):
                async with self._turn:
                    vectors.extend(await self._run(group))
            return EmbedResult([normalised(v) for v in vectors], sum(len(item.tokens) for item in inputs))
        finally:
            self.num_requests -= 1

    async def _run(self, group: list[EmbedInput]) -> list[Vector]:
        embedder = self.embedder
        if embedder.runs_model:
            vectors: list[Vector] = await self._run_model(lambda: embedder.embed_batch(group))
            return vectors
        return await asyncio.to_thread(embedder.embed_batch, group)
