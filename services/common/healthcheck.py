"""Ask a service of this pod for its health: exit 0 when SERVING, 1 otherwise.

    python -m services.common.healthcheck --port 50055 --service llmesh.store.v1.StoreService --identity store
    python -m services.common.healthcheck --port 50055 --identity store        # liveness: the empty name

For Kubernetes exec probes: kubelet's ``grpc`` probe cannot speak TLS, and
with ``tls_enabled`` every port of the mesh serves mutual TLS. This check
reads the same settings as the service it probes (``LLMESH_TLS_ENABLED``,
``LLMESH_CREDENTIALS_DIR``, or their ``LLMESH_<IDENTITY>_`` forms) and, with
TLS on, presents the pod's own certificate (``tls/<identity>.pem``) and
trusts the mesh CA. The health service answers without an API key, so none
is sent.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Mapping, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.clients import make_channel
from services.common.errors import InvalidArgument
from services.common.identity import Identity, tls_files
from services.common.runtime import short_name
from services.common.settings import ServerSettings, load_settings

SERVING = 0
NOT_SERVING = 1


async def check(target: str, service: str, identity: Identity | None, timeout_s: float) -> int:
    """0 when ``service`` at ``target`` answers SERVING, else 1 (with the reason on stderr)."""
    try:
        async with make_channel(target, identity, traced=False) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
    except grpc.aio.AioRpcError as exc:
        print(f"{target} {service or '(liveness)'}: {exc.code().name} {exc.details()}", file=sys.stderr)
        return NOT_SERVING
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"{target} {service or '(liveness)'}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}",
              file=sys.stderr)
        return NOT_SERVING
    return SERVING


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.common.healthcheck",
                                     description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="the service's address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--service", default="",
                        help="full name to ask for, e.g. llmesh.store.v1.StoreService; empty asks whether "
                             "the process answers (liveness)")
    parser.add_argument("--identity", default="",
                        help="the pod's own service (store, policy, ...): its settings and TLS certificate; "
                             "default: the short name of --service")
    parser.add_argument("--timeout-s", type=float, default=3.0)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    identity = args.identity or (short_name(args.service) if args.service else "")
    try:
        settings = load_settings(ServerSettings, identity or "healthcheck", [],
                                 os.environ if environ is None else environ)
    except InvalidArgument as exc:
        print(f"settings: {exc}", file=sys.stderr)
        return NOT_SERVING
    caller: Identity | None = None
    if settings.tls_enabled:
        if not identity:
            parser.error("with TLS on, --identity names the certificate to present")
        files = tls_files(settings.credentials_path, identity)
        missing = [str(p) for p in (files.ca, files.cert, files.key) if not p.is_file()]
        if missing:
            print(f"TLS files missing: {', '.join(missing)}", file=sys.stderr)
            return NOT_SERVING
        caller = Identity(identity, None, files)
    host = f"[{args.host}]" if ":" in args.host else args.host
    return asyncio.run(check(f"{host}:{args.port}", args.service, caller, args.timeout_s))


if __name__ == "__main__":
    sys.exit(main())
