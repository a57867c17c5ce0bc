"""Outbound RPC failures as domain errors, so the core can tell transient from final."""
from __future__ import annotations

import contextlib
from typing import Iterator

import grpc

from services.common import errors
from services.common.interceptors import error_info

_BY_CODE: dict[grpc.StatusCode, type[errors.DomainError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExists,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDenied,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
    grpc.StatusCode.ABORTED: errors.Aborted,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: errors.Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.Unavailable,
    grpc.StatusCode.CANCELLED: errors.Cancelled,
    grpc.StatusCode.UNIMPLEMENTED: errors.FailedPrecondition,
}


def to_domain(err: grpc.RpcError, service: str) -> errors.DomainError:
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    cls = _BY_CODE.get(code, errors.Unavailable if code == grpc.StatusCode.UNKNOWN else errors.FailedPrecondition)
    info = None
    with contextlib.suppress(Exception):
        info = error_info(err)
    reason = info.reason if info is not None and info.reason else None
    if code == grpc.StatusCode.UNIMPLEMENTED:
        reason = f"{service.upper()}_NOT_IMPLEMENTED"
    details = err.details() if hasattr(err, "details") else str(err)
    return cls(f"{service}: {details}", reason=reason, metadata=dict(info.metadata) if info else None)


@contextlib.contextmanager
def mapped(service: str) -> Iterator[None]:
    try:
        yield
    except grpc.RpcError as err:
        raise to_domain(err, service) from None
