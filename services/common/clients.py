"""Outbound gRPC channels with tracing, keepalive and sane limits."""
from __future__ import annotations

import grpc
from opentelemetry.instrumentation.grpc import aio_client_interceptors

from services.common.runtime import MAX_MESSAGE_BYTES


def channel_options() -> list[tuple[str, int | str]]:
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def make_channel(target: str) -> grpc.aio.Channel:
    """An insecure aio channel to ``target`` (host:port) with OTel propagation."""
    return grpc.aio.insecure_channel(target, options=channel_options(), interceptors=aio_client_interceptors())
