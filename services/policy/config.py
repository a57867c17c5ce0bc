"""Settings of the exec-policy and audit service."""
from __future__ import annotations

from dataclasses import dataclass

from services.common.settings import ServerSettings

DEFAULT_PORT = 50054


@dataclass(frozen=True)
class Settings(ServerSettings):
    port: int = DEFAULT_PORT
