"""Wiring of the tool executor: servicer, resources, lifecycle."""
from __future__ import annotations

import grpc
from llmesh.tools.v1 import tools_pb2_grpc

from services.tools.config import Settings

SERVICE_NAME = "llmesh.tools.v1.ToolService"


class App:
    service_names = (SERVICE_NAME,)

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def register(self, server: grpc.aio.Server) -> None:
        tools_pb2_grpc.add_ToolServiceServicer_to_server(tools_pb2_grpc.ToolServiceServicer(), server)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


def build_app(settings: Settings) -> App:
    return App(settings)
