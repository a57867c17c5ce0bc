"""The shared runtime: health, reflection, the error table, drain."""
from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from llmesh.inference.v1 import inference_pb2, inference_pb2_grpc

from services.common import errors
from services.common.identity import init_tls
from services.common.interceptors import error_info
from services.common.runtime import running_service, start_service
from services.common.settings import ServerSettings
from tests.support.auth import CREDENTIALS, TLS, open_channel, service_channel
from tests.support.ports import free_port

SERVICE = "llmesh.inference.v1.InferenceService"


class ScriptedServicer(inference_pb2_grpc.InferenceServiceServicer):
    """Raises whatever the test put in ``raise_next``."""

    def __init__(self) -> None:
        self.raise_next: BaseException | None = None

    async def GetLoad(self, request, context):
        if self.raise_next is not None:
            raise self.raise_next
        return inference_pb2.GetLoadResponse(node_id="n1", queue_depth=3)

    async def Generate(self, request, context):
        yield inference_pb2.GenerateResponse(text="a")
        if self.raise_next is not None:
            raise self.raise_next
        yield inference_pb2.GenerateResponse(text="b", finish_reason=inference_pb2.FINISH_REASON_STOP)


class ScriptedApp:
    service_names = (SERVICE,)

    def __init__(self, started: asyncio.Event | None = None) -> None:
        self.servicer = ScriptedServicer()
        self.started = started
        self.closed = False

    def register(self, server: grpc.aio.Server) -> None:
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(self.servicer, server)

    async def start(self) -> None:
        if self.started is not None:
            await self.started.wait()

    async def close(self) -> None:
        self.closed = True


async def _health(target: str, service: str, credentials: Path = CREDENTIALS) -> int:
    async with open_channel(target, credentials) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service))
        return reply.status


async def test_liveness_answers_at_once_and_readiness_only_after_start() -> None:
    gate = asyncio.Event()
    app = ScriptedApp(started=gate)
    settings = ServerSettings(port=free_port())
    target = f"127.0.0.1:{settings.port}"
    starting = asyncio.ensure_future(start_service(app, settings))
    for _ in range(100):  # wait until it listens
        try:
            live = await _health(target, "")
            break
        except grpc.aio.AioRpcError:
            await asyncio.sleep(0.05)
    assert live == health_pb2.HealthCheckResponse.SERVING
    assert await _health(target, SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING
    assert not starting.done(), "start_service must wait for app.start()"
    gate.set()
    running = await starting
    assert await _health(target, SERVICE) == health_pb2.HealthCheckResponse.SERVING
    await running.health.enter_graceful_shutdown()
    assert await _health(target, SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING
    await running.stop(grace=0.1)
    assert app.closed


async def test_reflection_lists_the_service_health_and_reflection() -> None:
    async with running_service(ScriptedApp(), ServerSettings(port=0)) as svc:
        async with open_channel(svc.address) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)

            async def requests():
                yield reflection_pb2.ServerReflectionRequest(list_services="")

            async for reply in stub.ServerReflectionInfo(requests()):
                names = {s.name for s in reply.list_services_response.service}
                break
    assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names


@pytest.mark.parametrize(
    ("exc", "code", "reason"),
    [
        (errors.InvalidArgument("max_tokens: must be > 0", field="max_tokens"), grpc.StatusCode.INVALID_ARGUMENT,
         "INVALID_ARGUMENT"),
        (errors.NotFound("session s1 not found", reason="SESSION_NOT_FOUND"), grpc.StatusCode.NOT_FOUND,
         "SESSION_NOT_FOUND"),
        (errors.ResourceExhausted("queue full", reason="QUEUE_FULL", retry_after_ms=250),
         grpc.StatusCode.RESOURCE_EXHAUSTED, "QUEUE_FULL"),
        (errors.Unavailable("node down"), grpc.StatusCode.UNAVAILABLE, "UNAVAILABLE"),
        (RuntimeError("boom"), grpc.StatusCode.INTERNAL, "INTERNAL"),
    ],
)
async def test_error_table_maps_exceptions_to_status_and_error_info(exc, code, reason) -> None:
    app = ScriptedApp()
    app.servicer.raise_next = exc
    async with running_service(app, ServerSettings(port=0)) as svc:
        async with service_channel(svc.address, "orchestrator") as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.GetLoad(inference_pb2.GetLoadRequest())
    assert caught.value.code() == code
    info = error_info(caught.value)
    assert info is not None and info.reason == reason and info.domain == "llmesh"
    if isinstance(exc, errors.DomainError) and exc.field:
        assert info.metadata["field"] == exc.field
        assert exc.field in caught.value.details()
    if isinstance(exc, RuntimeError):
        assert "boom" not in caught.value.details(), "internal details must not leak to clients"


async def test_stream_error_after_first_message_keeps_what_was_sent() -> None:
    app = ScriptedApp()
    app.servicer.raise_next = errors.Cancelled("client went away", reason="CANCELLED")
    async with running_service(app, ServerSettings(port=0)) as svc:
        async with service_channel(svc.address, "orchestrator") as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            received = []
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for reply in stub.Generate(inference_pb2.GenerateRequest(prompt="x")):
                    received.append(reply.text)
    assert received == ["a"]
    assert caught.value.code() == grpc.StatusCode.CANCELLED
    assert error_info(caught.value).reason == "CANCELLED"


async def test_health_watch_streams_through_the_interceptor() -> None:
    """Watch writes with context.write rather than being an async generator."""
    async with running_service(ScriptedApp(), ServerSettings(port=0)) as svc:
        async with open_channel(svc.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            call = stub.Watch(health_pb2.HealthCheckRequest(service=SERVICE))
            first = await call.read()
            assert first.status == health_pb2.HealthCheckResponse.SERVING
            await svc.health.enter_graceful_shutdown()
            second = await call.read()
            assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
            call.cancel()


async def test_auth_enabled_service_rejects_calls_without_a_valid_key(tmp_path) -> None:
    from services.common.auth import ApiKeyStore, generate_api_key

    key, record = generate_api_key("acme", n=2**10)
    ApiKeyStore([record]).save(tmp_path / "api_keys.json")
    if TLS:
        init_tls(tmp_path)
    settings = ServerSettings(port=0, data_dir=str(tmp_path), auth_enabled=True, credentials_dir=str(tmp_path))
    app = ScriptedApp()
    async with running_service(app, settings) as svc:
        async with open_channel(svc.address, tmp_path) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            for metadata in [(), (("authorization", "Bearer wrong"),)]:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.GetLoad(inference_pb2.GetLoadRequest(), metadata=metadata)
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            reply = await stub.GetLoad(inference_pb2.GetLoadRequest(), metadata=(("authorization", f"Bearer {key}"),))
            assert reply.node_id == "n1"
        # Health stays open to probes without a key.
        assert await _health(svc.address, SERVICE, tmp_path) == health_pb2.HealthCheckResponse.SERVING
