"""The client side of the one error table: a failed call back into the domain error the server raised.

``ERROR_TABLE`` (services.common.interceptors) maps each domain error class to
the status code a server answers with; its inverse here maps a status code a
client receives back to that class, keeping the server's ``ErrorInfo`` reason,
field and metadata and its ``RetryInfo`` delay. So an INVALID_ARGUMENT naming
``page_token`` in the store is an ``InvalidArgument`` naming ``page_token`` in
its caller, which its own interceptor answers with the same status again.

A code outside the table (INTERNAL, UNKNOWN, DATA_LOSS, OUT_OF_RANGE) means the
called service broke rather than refused: to the caller that service is
unusable, an ``Unavailable`` whose reason names it (``STORE_FAILED``).
Callers with a policy of their own (which failures another node may retry, an
audit log that reports every store failure alike) wrap this one mapping.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.common import errors
from services.common.interceptors import ERROR_TABLE

CLASS_FOR_CODE: Mapping[grpc.StatusCode, type[errors.DomainError]] = {code: cls for cls, code in ERROR_TABLE.items()}


@dataclass(frozen=True)
class RpcFailure:
    """What a failed call carried: its code, message and the details of its google.rpc.Status."""

    code: grpc.StatusCode
    message: str
    reason: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    retry_after_ms: int | None = None


def rpc_failure(err: grpc.RpcError) -> RpcFailure:
    """The code, message, ErrorInfo and RetryInfo of a failed call (empty where it sent none)."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    code = code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN
    message = (err.details() if hasattr(err, "details") else "") or code.name
    reason, metadata, retry_after_ms = "", {}, None
    try:
        status = rpc_status.from_call(err)
    except (ValueError, AttributeError, TypeError, DecodeError):
        # A status detail that disagrees with the call's code, or a call without trailers.
        status = None
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, metadata = info.reason, dict(info.metadata)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_after_ms = retry.retry_delay.seconds * 1000 + retry.retry_delay.nanos // 1_000_000
    return RpcFailure(code, message, reason, metadata, retry_after_ms)


def domain_error_from_rpc(
    err: grpc.RpcError,
    *,
    service: str,
    passed_on: tuple[type[errors.DomainError], ...] | None = None,
    failed_reason: str = "",
    metadata: Mapping[str, str] | None = None,
) -> errors.DomainError:
    """The domain error matching ``err``, a failed call to ``service``.

    ``passed_on`` limits which classes of the table keep their identity (all
    when None); any other failure becomes ``Unavailable`` with reason
    ``failed_reason`` (default ``<SERVICE>_FAILED``). ``metadata`` is added to
    the server's ErrorInfo metadata.
    """
    failure = rpc_failure(err)
    merged = {**failure.metadata, **(metadata or {})}
    message = f"{service}: {failure.message}"
    cls = CLASS_FOR_CODE.get(failure.code)
    if cls is None or (passed_on is not None and not issubclass(cls, passed_on)):
        if cls is None:
            message = f"{service}: {failure.code.name}: {failure.message}"
        return errors.Unavailable(message, reason=failed_reason or f"{_token(service)}_FAILED",
                                  field=merged.get("field"), metadata=merged, retry_after_ms=failure.retry_after_ms)
    return cls(message, reason=failure.reason or None, field=merged.get("field"), metadata=merged,
               retry_after_ms=failure.retry_after_ms)


@contextlib.contextmanager
def domain_errors(service: str) -> Iterator[None]:
    """Raise a failed call to ``service`` inside the block as its domain error."""
    try:
        yield
    except grpc.RpcError as err:
        raise domain_error_from_rpc(err, service=service) from None


def _token(service: str) -> str:
    """``audit store`` -> ``AUDIT_STORE``: a service name as part of an UPPER_SNAKE_CASE reason."""
    return "_".join("".join(c if c.isalnum() else " " for c in service).upper().split()) or "UPSTREAM"
