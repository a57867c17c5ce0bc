"""Server interceptors: API-key authentication, the one error table, and RPC metrics.

Every known failure leaves a service as a gRPC status with a
``google.rpc.Status`` detail carrying ``ErrorInfo`` (AIP-193); an unexpected
exception becomes INTERNAL with reason INTERNAL and is logged with its trace.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from opentelemetry import trace
from prometheus_client import Counter, Histogram

from services.common import authz, errors
from services.common.auth import ApiKeyAuthenticator, principal_var
from services.common.logs import session_id_var
from services.common.refusals import RefusalReporter

log = logging.getLogger("llmesh.rpc")

ERROR_DOMAIN = "llmesh"

#: What a server interceptor calls to get the method's handler.
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]]

# One table from domain exception to status code; subclasses inherit.
ERROR_TABLE: dict[type[errors.DomainError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Aborted: grpc.StatusCode.ABORTED,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Cancelled: grpc.StatusCode.CANCELLED,
    errors.Unimplemented: grpc.StatusCode.UNIMPLEMENTED,
}

RPC_DURATION = Histogram(
    "llmesh_rpc_duration_seconds",
    "Server-side RPC duration (for streams: until the stream ends).",
    ["method", "code"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
RPC_ERRORS = Counter("llmesh_rpc_errors_total", "RPCs that ended with a non-OK status.", ["method", "code", "reason"])


def status_code_for(exc: errors.DomainError) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        code = ERROR_TABLE.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


def to_status(code: grpc.StatusCode, message: str, reason: str, metadata: dict[str, str] | None = None,
              retry_after_ms: int | None = None) -> grpc.Status:
    detail = status_pb2.Status(code=getattr(code_pb2, code.name), message=message)
    info = error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=metadata or {})
    detail.details.add().Pack(info)
    if retry_after_ms is not None:
        retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(
            seconds=retry_after_ms // 1000, nanos=(retry_after_ms % 1000) * 1_000_000))
        detail.details.add().Pack(retry)
    return rpc_status.to_status(detail)


def status_for_exception(exc: BaseException) -> tuple[grpc.Status, str]:
    if isinstance(exc, errors.DomainError):
        code = status_code_for(exc)
        return to_status(code, exc.message, exc.reason, exc.metadata, exc.retry_after_ms), exc.reason
    if isinstance(exc, NotImplementedError):
        # What generated servicer bases raise for an RPC the service does not implement.
        return to_status(grpc.StatusCode.UNIMPLEMENTED, "method not implemented", "UNIMPLEMENTED"), "UNIMPLEMENTED"
    return to_status(grpc.StatusCode.INTERNAL, "internal error", "INTERNAL"), "INTERNAL"


async def _abort(context: grpc.aio.ServicerContext, method: str, exc: BaseException) -> None:
    status, reason = status_for_exception(exc)
    if reason == "INTERNAL":
        log.exception("unexpected error in %s", method, exc_info=exc)
    RPC_ERRORS.labels(method, status.code.name, reason).inc()
    await context.abort(status.code, status.details, trailing_metadata=status.trailing_metadata)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps domain exceptions to status + ErrorInfo and times every RPC."""

    async def intercept_service(self, continuation: Continuation,
                                handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        return rewrap_handler(handler, lambda fn: _wrap_unary(fn, method), lambda fn: _wrap_stream(fn, method))


def rewrap_handler(
    handler: grpc.RpcMethodHandler,
    wrap_unary: Callable[[Callable[..., Any]], Callable[..., Any]],
    wrap_stream: Callable[[Callable[..., Any]], Callable[..., Any]],
) -> grpc.RpcMethodHandler:
    """The same handler with its behaviour wrapped: unary-response behaviours by
    ``wrap_unary``, streaming-response ones by ``wrap_stream``."""
    kinds = (
        ("unary_unary", wrap_unary, grpc.unary_unary_rpc_method_handler),
        ("unary_stream", wrap_stream, grpc.unary_stream_rpc_method_handler),
        ("stream_unary", wrap_unary, grpc.stream_unary_rpc_method_handler),
        ("stream_stream", wrap_stream, grpc.stream_stream_rpc_method_handler),
    )
    for attr, wrap, build in kinds:
        fn = getattr(handler, attr)
        if fn:
            return build(wrap(fn), request_deserializer=handler.request_deserializer,
                         response_serializer=handler.response_serializer)
    return handler


async def iterate_responses(result: Any) -> AsyncIterator[Any]:
    """Responses of a streaming handler, whether it is an async generator or a
    coroutine that writes with context.write (as grpc_health's Watch does)."""
    if hasattr(result, "__aiter__"):
        async for item in result:
            yield item
    else:
        await result


def _bind_session(request: Any) -> None:
    """Carry the request's session_id into logs and the current span."""
    session_id = getattr(request, "session_id", "")
    if session_id and isinstance(session_id, str):
        session_id_var.set(session_id)
        trace.get_current_span().set_attribute("session_id", session_id)


@contextlib.asynccontextmanager
async def _observed(method: str, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    """One RPC's handling: binds its session, times it under its final status
    code and turns an exception from the block into that status (an abort)."""
    start = time.perf_counter()
    _bind_session(request)
    code = "OK"
    try:
        yield
    except grpc.aio.AbortError:
        code = _context_code(context)
        raise
    except Exception as exc:
        code = status_for_exception(exc)[0].code.name
        await _abort(context, method, exc)
    finally:
        RPC_DURATION.labels(method, code).observe(time.perf_counter() - start)


def _wrap_unary(fn: Callable[..., Any], method: str) -> Callable[..., Awaitable[Any]]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
        async with _observed(method, request, context):
            result = fn(request, context)
            return await result if hasattr(result, "__await__") else result
        return None  # the error was turned into an abort that did not raise

    return wrapper


def _wrap_stream(fn: Callable[..., AsyncIterator[Any]], method: str) -> Callable[..., AsyncIterator[Any]]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async with _observed(method, request, context):
            async for item in iterate_responses(fn(request, context)):
                yield item

    return wrapper


def _context_code(context: grpc.aio.ServicerContext) -> str:
    code = context.code() if hasattr(context, "code") else None
    return code.name if isinstance(code, grpc.StatusCode) else "ABORTED_BY_HANDLER"


def error_info(err: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """The ErrorInfo detail of a failed call, for clients and tests."""
    status = rpc_status.from_call(err)
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates every call, authorises it against ``authz.TABLE`` and binds
    its tenant and role to the caller; health and reflection are exempt.

    The key is checked when the call starts and the request is bound as soon as
    it is decoded, before the servicer runs: a refused call never reaches it.
    Refusals are counted and reported to ``refusals`` (the audit trail). The
    effective principal (the caller, or the client a service acts for) is left
    in ``auth.principal_var`` for the servicer and for onward calls.
    """

    EXEMPT_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")

    def __init__(self, authenticator: ApiKeyAuthenticator, exempt_prefixes: tuple[str, ...] = EXEMPT_PREFIXES,
                 *, refusals: RefusalReporter | None = None, authorize: bool = True) -> None:
        self.authenticator = authenticator
        self.exempt_prefixes = exempt_prefixes
        self.refusals = refusals or RefusalReporter("unnamed")
        self.authorize = authorize

    async def intercept_service(self, continuation: Continuation,
                                handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(self.exempt_prefixes):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        headers = (metadata.get("authorization"), metadata.get(authz.PRINCIPAL_HEADER))
        return rewrap_handler(handler, lambda fn: self._unary(fn, method, headers),
                              lambda fn: self._stream(fn, method, headers))

    async def _admit(self, method: str, headers: tuple[Any, Any], request: Any,
                     context: grpc.aio.ServicerContext) -> None:
        authorization, forwarded = headers
        client = peer_host(context.peer())
        caller = None
        try:
            if not isinstance(authorization, str | None) or not isinstance(forwarded, str | None):
                raise errors.Unauthenticated("authorization metadata must be text", reason="API_KEY_INVALID")
            caller = await self.authenticator.authenticate(authorization, client)
            if self.authorize:
                authz.authorize(method, caller)
            principal = authz.effective_principal(caller, forwarded)
            authz.bind_request(request, principal)
        except errors.DomainError as exc:
            self.refusals.report(method, exc.reason, caller.name if caller else "",
                                 caller.tenant_id if caller else "", caller.key_id if caller else "", client)
            status, _reason = status_for_exception(exc)
            await context.abort(status.code, status.details, trailing_metadata=status.trailing_metadata)
        principal_var.set(principal)

    def _unary(self, fn: Callable[..., Any], method: str, headers: tuple[Any, Any]) -> Callable[..., Awaitable[Any]]:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await self._admit(method, headers, request, context)
            result = fn(request, context)
            return await result if hasattr(result, "__await__") else result
        return call

    def _stream(self, fn: Callable[..., Any], method: str,
                headers: tuple[Any, Any]) -> Callable[..., AsyncIterator[Any]]:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await self._admit(method, headers, request, context)
            async for item in iterate_responses(fn(request, context)):
                yield item
        return call


def peer_host(peer: str) -> str:
    """The host of a gRPC peer, so a client cannot dodge a per-address limit by new ports.

    ``ipv4:127.0.0.1:5000`` -> ``127.0.0.1``; ``ipv6:[::1]:5000`` -> ``::1``.
    """
    kind, _, rest = peer.partition(":")
    if kind == "ipv6" and rest.startswith("["):
        return rest[1:rest.find("]")]
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    return peer
