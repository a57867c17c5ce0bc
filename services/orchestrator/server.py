"""Wiring of the agent orchestrator: servicer, resources, lifecycle."""
from __future__ import annotations

import grpc
from llmesh.orchestrator.v1 import orchestrator_pb2_grpc

from services.orchestrator.config import Settings

SERVICE_NAME = "llmesh.orchestrator.v1.AgentService"


class App:
    service_names = (SERVICE_NAME,)

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def register(self, server: grpc.aio.Server) -> None:
        orchestrator_pb2_grpc.add_AgentServiceServicer_to_server(orchestrator_pb2_grpc.AgentServiceServicer(), server)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


def build_app(settings: Settings) -> App:
    return App(settings)
