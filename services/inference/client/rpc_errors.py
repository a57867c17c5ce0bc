"""How a failed call to a node is judged and handed on.

Callers of the balancer (orchestrator, REST layer) get domain errors, so the
one error interceptor of their own server maps them to a status with the
node's ErrorInfo reason kept: an INVALID_ARGUMENT from a node stays an
INVALID_ARGUMENT naming the same field, never an INTERNAL.
"""
from __future__ import annotations

import grpc

from services.common import errors
from services.common.interceptors import ERROR_TABLE, error_info

# Worth another node when nothing was streamed yet: the node is down,
# draining, overloaded or dropped the call; another node may well succeed.
RETRYABLE_CODES = frozenset({
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.ABORTED,
})

# Count toward ejecting the node: the node itself misbehaved. Bad requests
# and back-pressure (RESOURCE_EXHAUSTED) do not make a node an outlier.
NODE_FAULT_CODES = frozenset({
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.DATA_LOSS,
})

_CLASS_FOR_CODE: dict[grpc.StatusCode, type[errors.DomainError]] = {code: cls for cls, code in ERROR_TABLE.items()}


def is_retryable(err: grpc.aio.AioRpcError) -> bool:
    return err.code() in RETRYABLE_CODES


def is_node_fault(err: grpc.aio.AioRpcError) -> bool:
    return err.code() in NODE_FAULT_CODES


def to_domain_error(err: grpc.aio.AioRpcError, address: str, num_streamed: int = 0) -> errors.DomainError:
    """The domain error matching a node's failed call, naming the node."""
    code = err.code()
    info = error_info(err)
    metadata = dict(info.metadata) if info is not None else {}
    metadata["node"] = address
    if num_streamed:
        metadata["num_streamed"] = str(num_streamed)
    # CANCELLED here came from the node side (our caller cancelling is an
    # asyncio.CancelledError instead): to the caller the node went away.
    cls = errors.Unavailable if code is grpc.StatusCode.CANCELLED else _CLASS_FOR_CODE.get(code)
    message = f"inference node {address}: {err.details() or code.name}"
    if cls is None:
        # INTERNAL/UNKNOWN/DATA_LOSS from a node: the node is broken, which
        # for our caller means no usable node answered.
        cls, reason = errors.Unavailable, "INFERENCE_NODE_FAILED"
    else:
        reason = info.reason if info is not None and info.reason else None
        if code is grpc.StatusCode.CANCELLED:
            reason = "INFERENCE_NODE_CANCELLED"
    if num_streamed and cls is errors.Unavailable:
        reason = "STREAM_BROKEN"
    return cls(message, reason=reason, field=metadata.get("field"), metadata=metadata)
