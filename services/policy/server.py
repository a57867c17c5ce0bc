"""Wiring of the exec-policy and audit service: servicer, resources, lifecycle."""
from __future__ import annotations

import grpc
from llmesh.policy.v1 import policy_pb2_grpc

from services.policy.config import Settings

SERVICE_NAME = "llmesh.policy.v1.PolicyService"


class App:
    service_names = (SERVICE_NAME,)

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def register(self, server: grpc.aio.Server) -> None:
        policy_pb2_grpc.add_PolicyServiceServicer_to_server(policy_pb2_grpc.PolicyServiceServicer(), server)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


def build_app(settings: Settings) -> App:
    return App(settings)
