"""Wiring of the llama.cpp inference node: servicer, resources, lifecycle."""
from __future__ import annotations

import grpc
from llmesh.inference.v1 import inference_pb2_grpc

from services.inference.config import Settings

SERVICE_NAME = "llmesh.inference.v1.InferenceService"


class App:
    service_names = (SERVICE_NAME,)

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def register(self, server: grpc.aio.Server) -> None:
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(inference_pb2_grpc.InferenceServiceServicer(), server)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


def build_app(settings: Settings) -> App:
    return App(settings)
