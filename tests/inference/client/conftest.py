"""Builders for balancer tests: fake nodes plus a started Balancer."""
from __future__ import annotations

from dataclasses import replace

from llmesh.inference.v1 import inference_pb2

from services.inference.client import Balancer, BalancerSettings
from tests.support.auth import service_identity

# start() returns once every node has answered health (and a serving one its models), so a long
# start_timeout_s costs nothing when the machine is quick; a short one, on a busy machine, let the
# first requests go out before the balancer knew which node serves which model.
FAST_SETTINGS = BalancerSettings(health_interval_s=0.3, load_interval_s=0.05, start_timeout_s=30.0,
                                 ejection_base_s=1.0, ejection_max_s=4.0)


def make_balancer(addresses: list[str], **overrides: object) -> Balancer:
    # Nodes authenticate every call: the balancer presents the orchestrator's key, as in the mesh.
    return Balancer(addresses, replace(FAST_SETTINGS, **overrides), identity=service_identity("orchestrator"))


def gen_request(prompt: str = "hello there", session_id: str = "",
                max_tokens: int = 0) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(prompt=prompt, session_id=session_id,
                                         sampling=inference_pb2.SamplingParams(max_tokens=max_tokens))


async def collect(balancer: Balancer, request: inference_pb2.GenerateRequest) -> list[inference_pb2.GenerateResponse]:
    return [reply async for reply in balancer.generate(request)]

