"""Builders for balancer tests: fake nodes plus a started Balancer."""
from __future__ import annotations

import asyncio
import time
from dataclasses import replace

from llmesh.inference.v1 import inference_pb2

from services.inference.client import Balancer, BalancerSettings

FAST_SETTINGS = BalancerSettings(health_interval_s=0.3, load_interval_s=0.05, start_timeout_s=3.0,
                                 ejection_base_s=1.0, ejection_max_s=4.0)


def make_balancer(addresses: list[str], **overrides: object) -> Balancer:
    return Balancer(addresses, replace(FAST_SETTINGS, **overrides))


def gen_request(prompt: str = "hello there", session_id: str = "",
                max_tokens: int = 0) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(prompt=prompt, session_id=session_id,
                                         sampling=inference_pb2.SamplingParams(max_tokens=max_tokens))


async def collect(balancer: Balancer, request: inference_pb2.GenerateRequest) -> list[inference_pb2.GenerateResponse]:
    return [reply async for reply in balancer.generate(request)]


async def wait_until(condition, timeout_s: float) -> float:
    """Seconds until ``condition()`` held; fails the test after ``timeout_s``."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"condition not met within {timeout_s}s")
        await asyncio.sleep(0.01)
    return time.monotonic() - start
