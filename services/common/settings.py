"""Frozen settings dataclasses filled from the environment and the command line.

A field ``grace_s`` of service ``store`` is read from ``--grace-s`` on the
command line, else ``LLMESH_STORE_GRACE_S``, else ``LLMESH_GRACE_S``, else its
default. Nothing is read at import time.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from services.common.errors import InvalidArgument

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """What every service shares. Service settings subclass this."""

    # Address the gRPC server listens on.
    host: str = "127.0.0.1"
    # Its port; 0 picks a free one.
    port: int = 0
    # Prometheus endpoint; 0 picks a free port, -1 disables it.
    metrics_port: int = -1
    # Seconds in-flight RPCs get to finish on shutdown.
    grace_s: float = 5.0
    # Python logging level of the service (DEBUG, INFO, WARNING, ERROR).
    log_level: str = "INFO"
    # Where the service keeps its files (databases, logs, traces).
    data_dir: str = "data"
    # OTLP gRPC endpoint for traces; empty writes traces to trace_file.
    otlp_endpoint: str = ""
    # JSON-lines trace file, relative to data_dir ({service} is replaced by the
    # service's name); used when no otlp_endpoint is set; empty disables it.
    trace_file: str = "traces/{service}.jsonl"
    # Require an API key (``authorization: Bearer <key>`` metadata) on every
    # RPC but health and reflection, and check the caller against the mesh's
    # authorisation table. Off only for local experiments.
    auth_enabled: bool = True
    # Where the key hashes, this service's own key and the TLS files live
    # (relative to the working directory, not data_dir; a Secret in Kubernetes).
    credentials_dir: str = "data/credentials"
    # The hashed API keys, relative to credentials_dir (``python -m services.common.auth``).
    api_keys_file: str = "api_keys.json"
    # Seconds a verified key is remembered; a disabled key is refused within
    # the key file's reload time (1 s) whatever this says.
    auth_cache_ttl_s: float = 300.0
    # Serve and call with TLS; the files come from credentials_dir/tls
    # (``python -m services.common.identity init-tls``, or ``make run TLS=1``).
    tls_enabled: bool = False
    # With TLS on, refuse clients without a certificate signed by the mesh CA.
    tls_require_client_cert: bool = True
    # gRPC target of the policy service, where refused calls are written to
    # the audit trail; empty keeps them in logs and metrics only.
    audit_target: str = ""

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise InvalidArgument(f"port: {self.port} is not a TCP port", field="port")
        if not -1 <= self.metrics_port < 65536:
            raise InvalidArgument(f"metrics_port: {self.metrics_port} is not a TCP port or -1", field="metrics_port")
        if self.auth_cache_ttl_s < 0:
            raise InvalidArgument("auth_cache_ttl_s: must not be negative", field="auth_cache_ttl_s")

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    @property
    def credentials_path(self) -> Path:
        return Path(self.credentials_dir)


def _parse(value: str, annotation: Any, name: str) -> Any:
    origin = typing.get_origin(annotation)
    if annotation is bool:
        lowered = value.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise InvalidArgument(f"{name}: expected a boolean, got {value!r}", field=name)
    if annotation is int:
        try:
            return int(value)
        except ValueError:
            raise InvalidArgument(f"{name}: expected an integer, got {value!r}", field=name) from None
    if annotation is float:
        try:
            return float(value)
        except ValueError:
            raise InvalidArgument(f"{name}: expected a number, got {value!r}", field=name) from None
    if origin is tuple:
        (item_type, *_rest) = typing.get_args(annotation)
        return tuple(_parse(part.strip(), item_type, name) for part in value.split(",") if part.strip())
    return value


def load_settings(
    cls: type[T],
    service: str,
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> T:
    """Build ``cls`` from defaults, then env, then command-line flags."""
    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    values: dict[str, Any] = {}
    for f in fields:
        for key in (f"LLMESH_{service.upper()}_{f.name.upper()}", f"LLMESH_{f.name.upper()}"):
            if key in environ:
                values[f.name] = _parse(environ[key], hints[f.name], f.name)
                break
    parser = argparse.ArgumentParser(prog=f"python -m services.{service}")
    for f in fields:
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None)
    args = parser.parse_args(list(argv) if argv is not None else [])
    for f in fields:
        raw = getattr(args, f.name)
        if raw is not None:
            values[f.name] = _parse(raw, hints[f.name], f.name)
    return cls(**values)


def json_object(text: str, field_name: str) -> dict:
    """A setting holding a JSON object (empty text is {}); anything else is refused naming the setting."""
    try:
        raw = json.loads(text) if text.strip() else {}
    except ValueError as exc:
        raise InvalidArgument(f"{field_name}: not valid JSON ({exc})", field=field_name) from None
    if not isinstance(raw, dict):
        raise InvalidArgument(f"{field_name}: expected a JSON object", field=field_name)
    return raw
