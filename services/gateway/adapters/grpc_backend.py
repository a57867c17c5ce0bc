"""Generic gRPC calls to the mesh: any annotated method, by its descriptor.

One aio channel per backend, opened in the event loop that serves HTTP (so
it must be built at startup, not at import). gRPC failures become the domain
errors the backend raised (services.common.rpc_errors), so the REST layer
answers them through the same table as its own errors.
"""
from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor

from services.common import errors
from services.common.clients import make_channel
from services.common.identity import Identity
from services.common.rpc_errors import domain_error_from_rpc
from services.gateway.routes import Route


class GrpcBackends:
    """Channels by backend name ("orchestrator", "inference", ...)."""

    def __init__(self, targets: Mapping[str, str], timeout_s: float = 60.0, identity: Identity | None = None) -> None:
        self.targets = {name: target for name, target in targets.items() if target}
        self.identity = identity
        self.timeout_s = timeout_s
        self._channels: dict[str, grpc.aio.Channel] = {}

    def channel(self, backend: str) -> grpc.aio.Channel:
        channel = self._channels.get(backend)
        if channel is None:
            target = self.targets.get(backend)
            if target is None:
                raise errors.Unavailable(f"no {backend} backend is configured", reason="BACKEND_NOT_CONFIGURED",
                                         metadata={"backend": backend})
            channel = self._channels[backend] = make_channel(target, self.identity)
        return channel

    async def unary(self, route: Route, request: Any, metadata: Sequence[tuple[str, str]]) -> Any:
        return await self.call(route.backend, route.method, request, metadata)

    def stream(self, route: Route, request: Any, metadata: Sequence[tuple[str, str]]) -> AsyncGenerator[Any, None]:
        """Messages of a server stream; leaving the loop early cancels the call."""
        return self.open_stream(route.backend, route.method, request, metadata)

    async def call(self, backend: str, method: MethodDescriptor, request: Any,
                   metadata: Sequence[tuple[str, str]] = ()) -> Any:
        """One unary call of ``method`` (by its descriptor) on ``backend``."""
        call = self.channel(backend).unary_unary(
            _grpc_path(method), request_serializer=type(request).SerializeToString,
            response_deserializer=message_factory.GetMessageClass(method.output_type).FromString)
        try:
            return await call(request, metadata=tuple(metadata), timeout=self.timeout_s)
        except grpc.aio.AioRpcError as err:
            raise domain_error_from_rpc(err, service=backend) from None

    async def open_stream(self, backend: str, method: MethodDescriptor, request: Any,
                          metadata: Sequence[tuple[str, str]] = ()) -> AsyncGenerator[Any, None]:
        """Messages of a server-streaming call of ``method``; leaving the loop early cancels the call."""
        call = self.channel(backend).unary_stream(
            _grpc_path(method), request_serializer=type(request).SerializeToString,
            response_deserializer=message_factory.GetMessageClass(method.output_type).FromString,
        )(request, metadata=tuple(metadata))
        try:
            async for message in call:
                yield message
        except grpc.aio.AioRpcError as err:
            raise domain_error_from_rpc(err, service=backend) from None
        finally:
            call.cancel()

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()


def _grpc_path(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"
