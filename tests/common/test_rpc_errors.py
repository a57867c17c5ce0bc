"""Client side of the error table: what a server raised is what its caller gets back.

Each domain error goes through a real in-process server with the one error
interceptor and comes back through ``domain_error_from_rpc`` as the same
class, reason, field, metadata and retry delay.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest

from services.common import errors
from services.common.interceptors import ERROR_TABLE, ErrorInterceptor
from services.common.rpc_errors import CLASS_FOR_CODE, domain_error_from_rpc, domain_errors, rpc_failure

SERVICE = "test.Errors"


class Raiser:
    """A server whose one method runs whatever the test put in ``behaviour``."""

    def __init__(self) -> None:
        self.behaviour: Callable[[grpc.aio.ServicerContext], Any] = lambda context: b""

    async def call(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        result = self.behaviour(context)
        if asyncio.iscoroutine(result):
            result = await result
        return result


@pytest.fixture
async def remote() -> AsyncIterator[tuple[Raiser, Callable[..., Any]]]:
    raiser = Raiser()
    server = grpc.aio.server(interceptors=[ErrorInterceptor()])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        SERVICE, {"Raise": grpc.unary_unary_rpc_method_handler(raiser.call)})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield raiser, lambda method="Raise", **kw: channel.unary_unary(f"/{SERVICE}/{method}")(b"", **kw)
    finally:
        await server.stop(0)


async def failed_call(call: Callable[..., Any], **kw: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(**kw)
    return caught.value


def test_the_inverse_covers_every_code_of_the_table_once() -> None:
    assert len(set(ERROR_TABLE.values())) == len(ERROR_TABLE)
    assert {CLASS_FOR_CODE[code]: code for code in CLASS_FOR_CODE} == ERROR_TABLE


@pytest.mark.parametrize("cls", list(ERROR_TABLE), ids=lambda cls: cls.__name__)
async def test_every_error_of_the_table_comes_back_as_the_server_raised_it(remote, cls) -> None:
    raiser, call = remote

    def fail(context: Any) -> None:
        raise cls("it broke", reason="SOMETHING_SPECIFIC", field="spec.name", metadata={"k": "v"},
                  retry_after_ms=1500)

    raiser.behaviour = fail
    err = await failed_call(call)
    assert err.code() == ERROR_TABLE[cls]
    error = domain_error_from_rpc(err, service="store")
    assert type(error) is cls
    assert error.reason == "SOMETHING_SPECIFIC"
    assert error.field == "spec.name"
    assert error.metadata == {"k": "v", "field": "spec.name"}
    assert error.retry_after_ms == 1500
    assert error.message == "store: it broke"


async def test_a_status_without_error_info_gets_the_class_default_reason(remote) -> None:
    raiser, call = remote

    async def abort_by_hand(context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.NOT_FOUND, "gone")

    raiser.behaviour = abort_by_hand
    error = domain_error_from_rpc(await failed_call(call), service="store")
    assert type(error) is errors.NotFound and error.reason == "NOT_FOUND" and error.metadata == {}
    unimplemented = domain_error_from_rpc(await failed_call(call, method="Missing"), service="store")
    assert isinstance(unimplemented, errors.Unimplemented) and unimplemented.reason == "UNIMPLEMENTED"
    assert unimplemented.message.startswith("store: ")


async def test_unimplemented_and_deadline_exceeded_are_what_the_server_table_says(remote) -> None:
    raiser, call = remote
    missing = await failed_call(call, method="Missing")
    assert missing.code() == grpc.StatusCode.UNIMPLEMENTED
    assert type(domain_error_from_rpc(missing, service="tools")) is errors.Unimplemented
    assert ERROR_TABLE[errors.Unimplemented] == grpc.StatusCode.UNIMPLEMENTED

    raiser.behaviour = lambda context: asyncio.sleep(5)
    late = await failed_call(call, timeout=0.05)
    assert late.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    error = domain_error_from_rpc(late, service="tools")
    assert type(error) is errors.DeadlineExceeded and error.reason == "DEADLINE_EXCEEDED"
    assert ERROR_TABLE[errors.DeadlineExceeded] == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_a_broken_server_is_unavailable_naming_the_service(remote) -> None:
    raiser, call = remote

    def crash(context: Any) -> None:
        raise ZeroDivisionError("bug")

    raiser.behaviour = crash
    err = await failed_call(call)
    assert err.code() == grpc.StatusCode.INTERNAL
    error = domain_error_from_rpc(err, service="audit store")
    assert type(error) is errors.Unavailable and error.reason == "AUDIT_STORE_FAILED"
    assert "INTERNAL" in error.message
    named = domain_error_from_rpc(err, service="inference node 10.0.0.1:5", failed_reason="INFERENCE_NODE_FAILED",
                                  metadata={"node": "10.0.0.1:5"})
    assert named.reason == "INFERENCE_NODE_FAILED" and named.metadata["node"] == "10.0.0.1:5"


async def test_passed_on_keeps_only_the_listed_classes(remote) -> None:
    raiser, call = remote

    def moved(context: Any) -> None:
        raise errors.Aborted("chain moved", reason="AUDIT_HEAD_MOVED")

    def bad(context: Any) -> None:
        raise errors.InvalidArgument("entry: too long", field="entry")

    raiser.behaviour = moved
    kept = domain_error_from_rpc(await failed_call(call), service="audit store", passed_on=(errors.Aborted,))
    assert type(kept) is errors.Aborted and kept.reason == "AUDIT_HEAD_MOVED"
    raiser.behaviour = bad
    other = domain_error_from_rpc(await failed_call(call), service="audit store", passed_on=(errors.Aborted,))
    assert type(other) is errors.Unavailable and other.reason == "AUDIT_STORE_FAILED"
    assert other.field == "entry"


async def test_the_context_manager_raises_the_domain_error_and_the_failure_keeps_the_details(remote) -> None:
    raiser, call = remote

    def full(context: Any) -> None:
        raise errors.ResourceExhausted("queue full", retry_after_ms=250)

    raiser.behaviour = full
    with pytest.raises(errors.ResourceExhausted) as caught, domain_errors("inference"):
        await call()
    assert caught.value.retry_after_ms == 250 and caught.value.reason == "RESOURCE_EXHAUSTED"
    failure = rpc_failure(await failed_call(call))
    assert (failure.code, failure.message, failure.reason, failure.retry_after_ms) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full", "RESOURCE_EXHAUSTED", 250)


async def test_a_call_to_nobody_is_unavailable() -> None:
    async with grpc.aio.insecure_channel("127.0.0.1:1") as channel:
        err = await failed_call(lambda: channel.unary_unary(f"/{SERVICE}/Raise")(b"", timeout=5))
    error = domain_error_from_rpc(err, service="store")
    assert type(error) is errors.Unavailable and error.reason == "UNAVAILABLE"
