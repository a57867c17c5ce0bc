"""How a failed call to a node is judged and handed on.

Callers of the balancer (orchestrator, REST layer) get domain errors, so the
one error interceptor of their own server maps them to a status with the
node's ErrorInfo reason kept: an INVALID_ARGUMENT from a node stays an
INVALID_ARGUMENT naming the same field, never an INTERNAL.
"""
from __future__ import annotations

import grpc

from services.common import errors
from services.common.rpc_errors import domain_error_from_rpc

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

def is_retryable(err: grpc.aio.AioRpcError) -> bool:
    return err.code() in RETRYABLE_CODES


def is_node_fault(err: grpc.aio.AioRpcError) -> bool:
    return err.code() in NODE_FAULT_CODES


def to_domain_error(err: grpc.aio.AioRpcError, address: str, num_streamed: int = 0) -> errors.DomainError:
    """The domain error matching a node's failed call, naming the node.

    INTERNAL, UNKNOWN or DATA_LOSS from a node means the node is broken, which
    for our caller means no usable node answered: UNAVAILABLE.
    """
    metadata = {"node": address}
    if num_streamed:
        metadata["num_streamed"] = str(num_streamed)
    error = domain_error_from_rpc(err, service=f"inference node {address}", failed_reason="INFERENCE_NODE_FAILED",
                                  metadata=metadata)
    if err.code() is grpc.StatusCode.CANCELLED:
        # CANCELLED here came from the node side (our caller cancelling is an
        # asyncio.CancelledError instead): to the caller the node went away.
        error = errors.Unavailable(error.message, reason="INFERENCE_NODE_CANCELLED", metadata=error.metadata)
    if num_streamed and isinstance(error, errors.Unavailable):
        error.reason = "STREAM_BROKEN"
    return error
