"""The whole mesh as `make run` starts it: reflection, health, shutdown."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.common import authz
from services.common.identity import service_key
from services.launcher import SERVICES, STOP_TIMEOUT_S
from tests.support.auth import TLS, bearer, open_sync_channel
from tests.support.ports import free_launcher_port_base

ROOT = Path(__file__).resolve().parents[1]


def _channel(mesh, target: str) -> grpc.Channel:
    """A channel with no key; in a TLS run (``make run`` with TLS=1) with the mesh's own CA and client certificate."""
    return open_sync_channel(target, Path(mesh["data_dir"]) / "credentials")


def _list_services(mesh, target: str) -> set[str]:
    with _channel(mesh, target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        reply = next(iter(replies))
        return {s.name for s in reply.list_services_response.service}


def _dev_key(mesh) -> str:
    """The client key of tenant ``default`` that ``make run`` prints and keeps for the person running it."""
    return (Path(mesh["data_dir"]) / "dev_api_key").read_text().strip()


def _caller_metadata(mesh, path: str) -> tuple[tuple[str, str], ...]:
    """Credentials of a caller the authorisation table allows for ``path``: agents are driven by a client
    (the dev key); anything else is called as a mesh service that may call it (store as the orchestrator,
    policy decisions as tools, audit reads as the gateway, the store's approvals as policy)."""
    if path.startswith("/llmesh.orchestrator.v1.AgentService/"):
        return bearer(_dev_key(mesh))
    allowed = authz.allowed_callers(path)
    service = next(name for name in ("orchestrator", "tools", "gateway", "policy") if f"service:{name}" in allowed)
    # The launcher keeps the services' keys under <data>/credentials (LLMESH_CREDENTIALS_DIR).
    return bearer(service_key(Path(mesh["data_dir"]) / "credentials", service))


def _health(mesh, target: str, service: str) -> int:
    with _channel(mesh, target) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5).status


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("mesh-data")
    base = free_launcher_port_base(nodes=1, http_offset=9)
    env = {**os.environ, "LLMESH_DATA_DIR": str(data_dir), "LLMESH_PORT_BASE": str(base),
           "LLMESH_HTTP_PORT": str(base + 9), "TLS": "1" if TLS else "0"}
    proc = subprocess.Popen(["make", "-s", "run"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    deadline = time.monotonic() + 240
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "Ctrl-C stops it" in line:
            break
    else:
        proc.kill()
    if proc.poll() is not None or not any("Ctrl-C stops it" in line for line in lines):
        proc.kill()
        pytest.fail("make run did not come up:\n" + "".join(lines[-60:]))
    yield {"proc": proc, "base": base, "data_dir": data_dir, "lines": lines}
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)


def test_every_service_is_listed_by_reflection_and_ready(mesh) -> None:
    for svc in SERVICES:
        target = f"127.0.0.1:{mesh['base'] + svc.port_offset}"
        names = _list_services(mesh, target)
        assert svc.full_name in names, (svc.name, names)
        assert "grpc.health.v1.Health" in names
        assert _health(mesh, target, "") == health_pb2.HealthCheckResponse.SERVING
        assert _health(mesh, target, svc.full_name) == health_pb2.HealthCheckResponse.SERVING


def test_rest_gateway_is_up_with_its_openapi_and_a_dev_key(mesh) -> None:
    import json
    import urllib.error
    import urllib.request

    base_url = f"http://127.0.0.1:{mesh['base'] + 9}"
    with urllib.request.urlopen(base_url + "/openapi.json", timeout=10) as reply:
        spec = json.load(reply)
    assert "/v1/sessions" in spec["paths"]
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(base_url + "/v1/sessions", timeout=10)
    assert caught.value.code == 401
    key = _dev_key(mesh)
    assert oct((Path(mesh["data_dir"]) / "dev_api_key").stat().st_mode & 0o777) == "0o600"
    assert key not in (Path(mesh["data_dir"]) / "credentials" / "api_keys.json").read_text()


def test_logs_are_json_lines_per_service(mesh) -> None:
    for svc in SERVICES:
        log = Path(mesh["data_dir"]) / "logs" / f"{svc.name}.log"
        assert log.exists(), log
        assert '"event": "serving"' in log.read_text()


def _rpcs():
    import llmesh.inference.v1.inference_pb2
    import llmesh.orchestrator.v1.orchestrator_pb2
    import llmesh.policy.v1.policy_pb2
    import llmesh.store.v1.store_pb2
    import llmesh.tools.v1.tools_pb2  # noqa: F401
    from google.protobuf import descriptor_pool

    pool = descriptor_pool.Default()
    for svc in SERVICES:
        service = pool.FindServiceByName(svc.full_name)
        for method in service.methods:
            yield pytest.param(svc, method, id=f"{svc.name}.{method.name}")


def _malformed_requests(method):
    """The empty request, and one with a negative page size where there is one."""
    from google.protobuf import message_factory

    cls = message_factory.GetMessageClass(method.input_type)
    yield cls()
    if "page_size" in method.input_type.fields_by_name:
        yield cls(page_size=-1)


@pytest.mark.parametrize(("svc", "method"), list(_rpcs()))
def test_malformed_request_gets_invalid_argument_naming_the_field(mesh, svc, method) -> None:
    from services.common.interceptors import error_info

    target = f"127.0.0.1:{mesh['base'] + svc.port_offset}"
    path = f"/{svc.full_name}/{method.name}"
    metadata = _caller_metadata(mesh, path)
    with _channel(mesh, target) as channel:
        for request in _malformed_requests(method):
            if method.client_streaming:
                pytest.skip("no client-streaming RPCs in v1")
            if method.server_streaming:
                call = channel.unary_stream(path, request_serializer=type(request).SerializeToString,
                                            response_deserializer=lambda b: b)(request, timeout=10,
                                                                               metadata=metadata)
                try:
                    next(iter(call))
                    code = grpc.StatusCode.OK
                except StopIteration:
                    code = grpc.StatusCode.OK
                except grpc.RpcError as err:
                    code, error = err.code(), err
            else:
                try:
                    channel.unary_unary(path, request_serializer=type(request).SerializeToString,
                                        response_deserializer=lambda b: b)(request, timeout=10,
                                                                           metadata=metadata)
                    code = grpc.StatusCode.OK
                except grpc.RpcError as err:
                    code, error = err.code(), err
            assert code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL,
                                grpc.StatusCode.UNIMPLEMENTED), (path, code)
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                info = error_info(error)
                assert info is not None and info.metadata.get("field"), (path, error.details())
                assert info.metadata["field"].split(".")[0] in error.details(), (path, error.details())
            if request.ByteSize() and "page_size" in method.input_type.fields_by_name:
                assert code == grpc.StatusCode.INVALID_ARGUMENT, (path, "negative page_size accepted")


def test_a_session_runs_two_turns_through_the_mesh(mesh) -> None:
    """The basic user path: create a session, run twice; the second turn reuses
    the session (its KV stays on the node the balancer keeps it on)."""
    from llmesh.orchestrator.v1 import orchestrator_pb2 as pb
    from llmesh.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc

    target = f"127.0.0.1:{mesh['base'] + 1}"
    auth = bearer(_dev_key(mesh))  # a client of tenant "default", as someone trying `make run` would be
    with _channel(mesh, target) as channel:
        stub = pb_grpc.AgentServiceStub(channel)
        session = stub.CreateSession(pb.CreateSessionRequest(tenant_id="default", title="two turns",
                                                             tools=["fs_list"]), timeout=30, metadata=auth).session
        finals = []
        for turn in range(2):
            events = [r.event for r in stub.Run(pb.RunRequest(
                tenant_id="default", session_id=session.session_id, user_message=f"turn {turn}: say hi",
                options=pb.RunOptions(max_steps=1, max_tokens=8, tool_choice="none", seed=1)), timeout=120,
                metadata=auth)]
            assert events[-1].type == pb.EVENT_TYPE_FINAL, events[-1]
            finals.append(events[-1])
    assert finals[1].seq > finals[0].seq
    assert finals[1].final.usage.cached_tokens > 0, finals[1].final.usage


# Runs last: it stops the mesh the other tests share.
def test_sigterm_to_make_run_stops_every_child_quickly(mesh) -> None:
    proc = mesh["proc"]
    tree = psutil.Process(proc.pid).children(recursive=True)
    assert len(tree) >= len(SERVICES) + 1, [p.cmdline() for p in tree]
    proc.send_signal(signal.SIGTERM)
    # The launcher SIGKILLs a child still running STOP_TIMEOUT_S after its SIGTERM, so make run ends
    # without help. The limits here are generous on purpose: they only catch a stop that never comes.
    proc.wait(timeout=STOP_TIMEOUT_S + 60)
    _gone, alive = psutil.wait_procs(tree, timeout=30)
    assert not alive, [p.cmdline() for p in alive]


def _trace_ids(path: Path) -> set[str]:
    import json

    return {json.loads(line)["context"]["trace_id"] for line in path.read_text().splitlines() if line.strip()}


def test_stopped_services_flushed_their_traces_and_a_turn_spans_services(mesh) -> None:
    """Runs after the SIGTERM test: every service wrote traces/<svc>.jsonl on
    its way out, and the two-turn session's traces cross service lines."""
    traces = Path(mesh["data_dir"]) / "traces"
    files = {svc.name: traces / f"{svc.name}.jsonl" for svc in SERVICES}
    for name, path in files.items():
        assert path.exists() and path.stat().st_size > 0, name
    shared = _trace_ids(files["orchestrator"]) & _trace_ids(files["inference"]) & _trace_ids(files["store"])
    assert shared, "one agent turn is one trace across orchestrator, inference and store"
