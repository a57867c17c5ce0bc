"""Settings of the REST layer (env ``LLMESH_GATEWAY_<FIELD>`` or ``--field-name``)."""
from __future__ import annotations

from dataclasses import dataclass

from services.common.errors import InvalidArgument
from services.common.settings import ServerSettings

DEFAULT_PORT = 8080


@dataclass(frozen=True)
class Settings(ServerSettings):
    # HTTP port
    port: int = DEFAULT_PORT
    # gRPC targets (host:port) of the annotated services; empty ones answer 503.
    orchestrator_target: str = ""
    # gRPC target of the inference service.
    inference_target: str = ""
    # gRPC target of the tools service.
    tools_target: str = ""
    # gRPC target of the policy service.
    policy_target: str = ""
    # gRPC target of the store service: /v1/responses keeps its response chains there
    # (empty: /v1/responses answers 503).
    store_target: str = ""
    # Inference nodes for the OpenAI endpoints, through the client-side load
    # balancer (host:port or dns:host:port); empty falls back to inference_target.
    inference_nodes: tuple[str, ...] = ()
    # Failed authentication attempts a client may make per window before 429.
    auth_max_failures: int = 10
    auth_failure_window_s: float = 60.0
    # Models listed by GET /v1/models when the inference pool cannot say.
    default_models: tuple[str, ...] = ("gemma-3-270m",)
    # Largest request body; larger ones are refused with 413 while they arrive. Also the largest
    # WebSocket message: a larger one closes the socket with 1009.
    max_body_bytes: int = 4 * 1024 * 1024
    # Deadline of unary backend calls; streams have none (a run can wait on an approval).
    backend_timeout_s: float = 60.0
    # WebSocket keep-alive: seconds between the server's ping frames, and how long a pong may take before the
    # peer counts as dead and the connection is closed with 1011 (0 turns pings off).
    ws_ping_interval_s: float = 20.0
    ws_ping_timeout_s: float = 20.0
    # Messages queued for a WebSocket client that reads slowly; once that many wait, the orchestrator's
    # event stream is not read further until the client catches up (nothing is dropped).
    ws_send_queue: int = 64
    # Seconds a WebSocket opened without an Authorization header has to send its {"type": "auth"} message.
    ws_auth_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("ws_ping_interval_s", "ws_ping_timeout_s"):
            if getattr(self, name) < 0:
                raise InvalidArgument(f"{name}: must not be negative", field=name)
        if self.ws_send_queue < 1:
            raise InvalidArgument("ws_send_queue: must be at least 1", field="ws_send_queue")
        if self.ws_auth_timeout_s <= 0:
            raise InvalidArgument("ws_auth_timeout_s: must be positive", field="ws_auth_timeout_s")

    @property
    def backend_targets(self) -> dict[str, str]:
        return {"orchestrator": self.orchestrator_target, "inference": self.inference_target,
                "tools": self.tools_target, "policy": self.policy_target,
                "store": self.store_target}
