"""Wiring of the store: servicer, resources, lifecycle."""
from __future__ import annotations

import grpc
from llmesh.store.v1 import store_pb2_grpc

from services.store.config import Settings

SERVICE_NAME = "llmesh.store.v1.StoreService"


class App:
    service_names = (SERVICE_NAME,)

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def register(self, server: grpc.aio.Server) -> None:
        store_pb2_grpc.add_StoreServiceServicer_to_server(store_pb2_grpc.StoreServiceServicer(), server)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


def build_app(settings: Settings) -> App:
    return App(settings)
