"""Settings of the llama.cpp inference node."""
from __future__ import annotations

from dataclasses import dataclass

from services.common.settings import ServerSettings

DEFAULT_PORT = 50051


@dataclass(frozen=True)
class Settings(ServerSettings):
    port: int = DEFAULT_PORT
