"""Generic gRPC calls to the mesh: any annotated method, by its descriptor.

One aio channel per backend, opened in the event loop that serves HTTP (so
it must be built at startup, not at import). gRPC failures become
``BackendError`` carrying what the HTTP error body needs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Mapping, Sequence

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.common.clients import make_channel
from services.gateway.convert import status_details_to_json
from services.gateway.routes import Route


@dataclass
class BackendError(Exception):
    code_name: str
    message: str
    details: list[dict[str, Any]] = field(default_factory=list)
    retry_after_ms: int | None = None

    def __str__(self) -> str:
        return f"{self.code_name}: {self.message}"


def backend_error_from_rpc(err: grpc.aio.AioRpcError) -> BackendError:
    details: list[dict[str, Any]] = []
    retry_after_ms = None
    try:
        status = rpc_status.from_call(err)  # type: ignore[arg-type]
    except ValueError:
        status = None
    if status is not None:
        details = status_details_to_json(status.details)
        for detail in status.details:
            if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
                retry_after_ms = retry.retry_delay.seconds * 1000 + retry.retry_delay.nanos // 1_000_000
    return BackendError(err.code().name, err.details() or err.code().name.lower(), details, retry_after_ms)


class GrpcBackends:
    """Channels by backend name ("orchestrator", "inference", ...)."""

    def __init__(self, targets: Mapping[str, str], timeout_s: float = 60.0) -> None:
        self.targets = {name: target for name, target in targets.items() if target}
        self.timeout_s = timeout_s
        self._channels: dict[str, grpc.aio.Channel] = {}

    def channel(self, backend: str) -> grpc.aio.Channel:
        channel = self._channels.get(backend)
        if channel is None:
            target = self.targets.get(backend)
            if target is None:
                raise BackendError("UNAVAILABLE", f"no {backend} backend is configured",
                                   [{"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                                     "reason": "BACKEND_NOT_CONFIGURED", "domain": "llmesh",
                                     "metadata": {"backend": backend}}])
            channel = self._channels[backend] = make_channel(target)
        return channel

    async def unary(self, route: Route, request: Any, metadata: Sequence[tuple[str, str]]) -> Any:
        call = self.channel(route.backend).unary_unary(
            route.grpc_path, request_serializer=type(request).SerializeToString,
            response_deserializer=route.response_class().FromString)
        try:
            return await call(request, metadata=tuple(metadata), timeout=self.timeout_s)
        except grpc.aio.AioRpcError as err:
            raise backend_error_from_rpc(err) from None

    async def stream(self, route: Route, request: Any, metadata: Sequence[tuple[str, str]]) -> AsyncIterator[Any]:
        """Messages of a server stream; leaving the loop early cancels the call."""
        call = self.channel(route.backend).unary_stream(
            route.grpc_path, request_serializer=type(request).SerializeToString,
            response_deserializer=route.response_class().FromString)(request, metadata=tuple(metadata))
        try:
            async for message in call:
                yield message
        except grpc.aio.AioRpcError as err:
            raise backend_error_from_rpc(err) from None
        finally:
            call.cancel()

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
