"""Run a real service on its own event loop thread so hypothesis tests stay sync.

Hypothesis drives plain functions; the service and its gRPC channel live on a
background loop, and every example is one call shipped to that loop. The
service is shared by all examples of a module (starting it per example would
dominate the run time), which also proves the service survives the whole run.
"""
from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping
from concurrent.futures import Future
from typing import Any, TypeVar

import grpc
from google.protobuf import descriptor as d
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.clients import make_channel
from services.common.identity import Identity
from services.common.runtime import RunningService, ServiceApp, start_service
from services.common.settings import ServerSettings

T = TypeVar("T")
# Starts what the service under test depends on (their lifetimes go on the stack)
# and returns that service, wired to them.
MeshBuilder = Callable[[contextlib.AsyncExitStack], Awaitable[tuple[ServiceApp, ServerSettings]]]

# What a service may answer to garbage; UNKNOWN and INTERNAL mean an unmapped failure.
FORBIDDEN_CODES = frozenset({grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL})
# Streams are read for this long: long enough to see the first reply or error.
STREAM_WINDOW_S = 0.3


class ServiceThread:
    """A started service plus a channel to it, on a private loop thread.

    Every call presents ``identity`` (a caller the authorisation table allows),
    or, for the methods named in ``identities``, the identity given there, so
    garbage reaches the servicer rather than stopping at the auth check.
    """

    def __init__(self, app: ServiceApp | None = None, settings: ServerSettings | None = None, *,
                 build: MeshBuilder | None = None, identity: Identity,
                 identities: Mapping[str, Identity] | None = None) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fuzz-service", daemon=True)
        self._thread.start()
        # Dependencies must start on the service's loop: grpc.aio objects are bound to it.
        self._dependencies = contextlib.AsyncExitStack()
        if build is not None:
            app, settings = self.call(build(self._dependencies), timeout_s=60)
        assert app is not None and settings is not None, "pass app and settings, or build"
        self.running: RunningService = self.call(start_service(app, settings), timeout_s=60)
        self.channel: grpc.aio.Channel = self.call(self._open_channel(identity))
        # Method name -> the channel presenting that method's caller.
        self._channels: dict[str, grpc.aio.Channel] = {
            name: self.call(self._open_channel(ident)) for name, ident in (identities or {}).items()}

    async def _open_channel(self, identity: Identity) -> grpc.aio.Channel:
        return make_channel(f"127.0.0.1:{self.running.port}", identity, traced=False)

    def channel_for(self, method: d.MethodDescriptor) -> grpc.aio.Channel:
        return self._channels.get(method.name, self.channel)

    def call(self, coro: Awaitable[T], timeout_s: float = 30.0) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(_as_coroutine(coro), self._loop)
        return future.result(timeout_s)

    def invoke(self, service: d.ServiceDescriptor, method: d.MethodDescriptor, request: Message) -> grpc.StatusCode:
        """One RPC with ``request``; the status code it ended with."""
        return self.call(_invoke(self.channel_for(method), service, method, request))[0]

    def invoke_with_replies(self, service: d.ServiceDescriptor, method: d.MethodDescriptor,
                            request: Message) -> tuple[grpc.StatusCode, list[Message]]:
        return self.call(_invoke(self.channel_for(method), service, method, request))

    def is_serving(self, service_name: str) -> bool:
        async def check() -> bool:
            stub = health_pb2_grpc.HealthStub(self.channel)
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service_name), timeout=5)
            return reply.status == health_pb2.HealthCheckResponse.SERVING

        return self.call(check())

    def close(self) -> None:
        try:
            for channel in (self.channel, *self._channels.values()):
                self.call(channel.close())
            self.call(self.running.stop(grace=0.5))
            self.call(self._dependencies.aclose())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()


async def _as_coroutine(awaitable: Awaitable[T]) -> T:
    return await awaitable


async def _invoke(channel: grpc.aio.Channel, service: d.ServiceDescriptor, method: d.MethodDescriptor,
                  request: Message) -> tuple[grpc.StatusCode, list[Message]]:
    path = f"/{service.full_name}/{method.name}"
    reply_cls = _message_class(method.output_type)
    serialize, deserialize = type(request).SerializeToString, reply_cls.FromString
    replies: list[Message] = []
    try:
        if method.server_streaming:
            call = channel.unary_stream(path, request_serializer=serialize, response_deserializer=deserialize)(
                request, timeout=STREAM_WINDOW_S)
            async for reply in call:
                replies.append(reply)
        else:
            replies.append(await channel.unary_unary(
                path, request_serializer=serialize, response_deserializer=deserialize)(request, timeout=10))
    except grpc.aio.AioRpcError as exc:
        return exc.code(), replies
    return grpc.StatusCode.OK, replies


def _message_class(desc: d.Descriptor) -> type[Message]:
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(desc)


def unary_request_methods(service: d.ServiceDescriptor) -> Iterator[d.MethodDescriptor]:
    """Every RPC a client sends one request to (all of ours)."""
    return (m for m in service.methods if not m.client_streaming)


def request_class(method: d.MethodDescriptor) -> type[Message]:
    return _message_class(method.input_type)


def describe(code: grpc.StatusCode, request: Message) -> str:
    return f"{code.name} for {type(request).__name__}: {request!r}"[:2000]


def check_no_unmapped_status(harness: ServiceThread, service: d.ServiceDescriptor, method: d.MethodDescriptor,
                             request: Message) -> None:
    code = harness.invoke(service, method, request)
    assert code not in FORBIDDEN_CODES, describe(code, request)


def service_descriptor(pb2_module: Any, name: str) -> d.ServiceDescriptor:
    return pb2_module.DESCRIPTOR.services_by_name[name]
