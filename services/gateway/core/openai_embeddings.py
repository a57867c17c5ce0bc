"""OpenAI-compatible ``/v1/embeddings`` over an EmbeddingSource.

The body is checked here (every field honoured or refused with a 400 naming
it, as ``openai_fields.py`` does for the completion endpoints), the texts go
to a node's Embed RPC, and the vectors come back in OpenAI's shape: JSON
floats, or with ``encoding_format: base64`` the little-endian float32 bytes
of each vector, base64-encoded (what the official SDKs ask for by default).
Limits on the texts (how many, how long) are the node's: its refusal naming
``inputs[i]`` comes back naming ``input[i]``.
"""
from __future__ import annotations

import array
import base64
import secrets
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from services.common import errors
from services.gateway.core.model_catalog import ModelCatalog
from services.gateway.core.openai_fields import END_USER, MAX_NAME_CHARS, Rule, honoured, only, refused
from services.gateway.core.ports import EmbeddingParams, EmbeddingSource

ENCODINGS = ("float", "base64")
#: The fields of an embeddings body and what becomes of each (docs/gateway.md).
FIELDS: dict[str, Rule] = {
    "model": honoured("a served model or alias; empty: the node's default"),
    "input": honoured("a string or a list of strings; token-id lists are refused"),
    "encoding_format": only(*ENCODINGS, reason="vectors are sent as floats or base64"),
    "dimensions": honoured("must equal the model's dimension: vectors are not truncated"),
    "user": refused(END_USER),
}
# The balancer's router picks "auto" for generation; vectors of different models do not compare.
ROUTED_MODEL = "auto"
# The node's name for the texts, and ours.
NODE_FIELD, OPENAI_FIELD = "inputs", "input"


@dataclass(frozen=True)
class EmbeddingPlan:
    params: EmbeddingParams
    encoding_format: str = "float"
    # ``input`` was one string (a node refusing inputs[0] refuses ``input``).
    single: bool = False


def check_fields(body: dict[str, Any]) -> None:
    """Raise InvalidArgument naming the first field of ``body`` that is unknown or refused (null is absent)."""
    for key, value in body.items():
        name = str(key) if len(str(key)) <= MAX_NAME_CHARS else str(key)[:MAX_NAME_CHARS] + "..."
        rule = FIELDS.get(key)
        if rule is None:
            raise errors.InvalidArgument(f"{name}: unknown field", field=name, reason="UNKNOWN_FIELD")
        if value is None or rule.kind == "honoured":
            continue
        if rule.kind == "refused":
            raise errors.InvalidArgument(f"{name}: {rule.reason}", field=name, reason="UNSUPPORTED_FIELD")
        if not any(type(value) is type(accepted) and value == accepted for accepted in rule.accepts):
            accepted = ", ".join(repr(a) for a in rule.accepts)
            raise errors.InvalidArgument(f"{name}: {rule.reason} (accepted: {accepted} or null)", field=name,
                                         reason="UNSUPPORTED_VALUE")


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_input(value: Any) -> tuple[tuple[str, ...], bool]:
    """(the texts, whether ``input`` was one string)."""
    errors.require(value is not None, OPENAI_FIELD, "is required: a string or a list of strings")
    if isinstance(value, str):
        errors.require(value != "", OPENAI_FIELD, "must not be empty")
        return (value,), True
    errors.require(isinstance(value, list), OPENAI_FIELD, "must be a string or a list of strings")
    errors.require(len(value) > 0, OPENAI_FIELD, "must not be an empty list")
    if all(_is_token_ids(item) for item in value) or any(isinstance(item, list) for item in value):
        raise errors.InvalidArgument(f"{OPENAI_FIELD}: token-id input is not supported; send the text",
                                     field=OPENAI_FIELD, reason="UNSUPPORTED_VALUE")
    for i, item in enumerate(value):
        errors.require(isinstance(item, str) and item != "", f"{OPENAI_FIELD}[{i}]", "must be a non-empty string")
    return tuple(value), False


def plan_embedding(body: Any) -> EmbeddingPlan:
    errors.require(isinstance(body, dict), "body", "expected a JSON object")
    check_fields(body)
    model = body.get("model")
    model = "" if model is None else model
    errors.require(isinstance(model, str), "model", "must be a string")
    errors.require(model != ROUTED_MODEL, "model", "'auto' routes generation; name the model to embed with")
    texts, single = parse_input(body.get("input"))
    encoding = body.get("encoding_format")
    dimensions = body.get("dimensions")
    if dimensions is None:
        dimensions = 0
    else:
        errors.require(_is_token_ids(dimensions) and 0 < dimensions < 2**31, "dimensions",
                       "must be a positive integer")
    return EmbeddingPlan(EmbeddingParams(inputs=texts, model=model, dimensions=dimensions),
                         "float" if encoding is None else encoding, single)


def base64_vector(values: Sequence[float]) -> str:
    """OpenAI's base64 encoding: the vector as little-endian float32, base64."""
    packed = array.array("f", values)
    if sys.byteorder == "big":
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode("ascii")


def openai_field(exc: errors.DomainError, single: bool) -> errors.DomainError:
    """A node's refusal naming ``inputs[i]``, naming ``input[i]`` (``input`` when it was one string)."""
    field = exc.metadata.get("field", "")
    if not field.startswith(NODE_FIELD):
        return exc
    name = OPENAI_FIELD if single else OPENAI_FIELD + field[len(NODE_FIELD):]
    renamed = type(exc)(exc.message.replace(f"{field}: ", f"{name}: ", 1), reason=exc.reason, field=name,
                        metadata={**exc.metadata, "field": name}, retry_after_ms=exc.retry_after_ms)
    return renamed


class OpenAIEmbeddings:
    def __init__(self, source: EmbeddingSource, catalog: ModelCatalog) -> None:
        self.source = source
        self.catalog = catalog

    async def create(self, plan: EmbeddingPlan, *, tenant_id: str = "",
                     metadata: tuple[tuple[str, str], ...] = ()) -> dict[str, Any]:
        params = replace(plan.params, request_id="emb-" + secrets.token_hex(12), tenant_id=tenant_id,
                         metadata=metadata)
        await self.catalog.require(params.model)
        try:
            result = await self.source.embed(params)
        except errors.InvalidArgument as exc:
            raise openai_field(exc, plan.single) from None
        encode = base64_vector if plan.encoding_format == "base64" else list
        return {"object": "list",
                "data": [{"object": "embedding", "index": i, "embedding": encode(vector)}
                         for i, vector in enumerate(result.vectors)],
                "model": result.model or params.model or "default",
                "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}}
