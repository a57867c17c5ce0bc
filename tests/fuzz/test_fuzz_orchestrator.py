"""Hypothesis-built requests at every AgentService RPC: never UNKNOWN/INTERNAL, still serving after.

The orchestrator is wired to real store, policy and tools services and a
synthetic inference node, all in process on the harness loop, so garbage
travels through the real ports (store writes, policy checks, Generate calls)
and any failure a dependency returns must come back mapped, not as INTERNAL.
"""
from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from llmesh.orchestrator.v1 import orchestrator_pb2 as pb
from llmesh.orchestrator.v1 import orchestrator_pb2_grpc

from services.common.runtime import running_service
from services.inference.config import Settings as InferenceSettings
from services.inference.server import build_app as build_inference
from services.orchestrator.config import Settings as OrchestratorSettings
from services.orchestrator.server import SERVICE_NAME
from services.orchestrator.server import build_app as build_orchestrator
from services.policy.config import Settings as PolicySettings
from services.policy.server import build_app as build_policy
from services.store.config import Settings as StoreSettings
from services.store.server import build_app as build_store
from services.tools.config import Settings as ToolsSettings
from services.tools.server import build_app as build_tools
from tests.fuzz.harness import FORBIDDEN_CODES, ServiceThread, describe, request_class, unary_request_methods
from tests.fuzz.strategies import messages
from tests.support.auth import service_identity

SERVICE = pb.DESCRIPTOR.services_by_name["AgentService"]
SEEDED_SESSIONS: list[str] = []  # filled by the fixture, before any example is drawn
FUZZ = settings(max_examples=40, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])


def hints() -> dict[str, st.SearchStrategy]:
    return {
        "tenant_id": st.sampled_from(["acme", "globex"]),
        # Existing sessions reach the agent loop; the rest test lookups.
        "session_id": st.sampled_from(SEEDED_SESSIONS + ["no-such-session"]),
        "user_message": st.sampled_from(["list the files", "", "x" * 300]),
        "tools": st.sampled_from(["fs_list", "shell_exec", "nope"]),
        "max_steps": st.integers(1, 2),
        "max_tokens": st.integers(1, 8),
        "approval_id": st.sampled_from(["a1", ""]),
        "task_id": st.sampled_from(["t1", ""]),
    }


async def start_mesh(stack: contextlib.AsyncExitStack, base: Path):
    async def serve(app, conf) -> str:
        svc = await stack.enter_async_context(running_service(app, conf))
        return f"127.0.0.1:{svc.port}"

    conf = StoreSettings(port=0, data_dir=str(base / "store"), sqlite_synchronous="NORMAL")
    store = await serve(build_store(conf), conf)
    conf = PolicySettings(port=0, data_dir=str(base / "policy"), store_target=store, audit_backend="store")
    policy = await serve(build_policy(conf), conf)
    conf = ToolsSettings(port=0, data_dir=str(base / "tools"), policy_target=policy, sandbox="none",
                         sandbox_uid=-1, sandbox_gid=-1, workspace_root=str(base / "ws"), shell_timeout_ms=2_000)
    tools = await serve(build_tools(conf), conf)
    conf = InferenceSettings(port=0, backend="synthetic", n_ctx=4096, n_seq_max=4, synthetic_tokens_per_s=0.0,
                             max_queue=16)
    node = await serve(build_inference(conf), conf)
    conf = OrchestratorSettings(port=0, store_target=store, policy_target=policy, tools_target=tools,
                                inference_target=node, event_batch_ms=5, max_workers=0, retry_attempts=1,
                                default_max_steps=2, default_max_tokens=8)
    return build_orchestrator(conf), conf


@pytest.fixture(scope="module")
def orchestrator() -> Iterator[ServiceThread]:
    # Not under pytest's tmp_path (0700 parents): keep the layout the tools workspace expects.
    base = Path(tempfile.mkdtemp(prefix="llmesh-orchestrator-fuzz-"))
    # As the gateway: the tenant named in the body (acme or globex) is honoured.
    harness = ServiceThread(build=lambda stack: start_mesh(stack, base), identity=service_identity("gateway"))
    create = SERVICE.methods_by_name["CreateSession"]
    for tenant in ("acme", "globex"):
        code, (reply,) = harness.invoke_with_replies(SERVICE, create, pb.CreateSessionRequest(
            tenant_id=tenant, tools=["fs_list"]))
        assert code.name == "OK"
        SEEDED_SESSIONS.append(reply.session.session_id)
    yield harness
    harness.close()
    SEEDED_SESSIONS.clear()
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("method", list(unary_request_methods(SERVICE)), ids=lambda m: m.name)
@FUZZ
@given(data=st.data())
def test_orchestrator_rpc_answers_garbage_with_a_mapped_status(orchestrator: ServiceThread, method, data) -> None:
    request = data.draw(messages(request_class(method), hints()))
    code, replies = orchestrator.invoke_with_replies(SERVICE, method, request)
    # Outcome mix, shown by --hypothesis-show-statistics: proves garbage reaches the agent loop too.
    event(f"{code.name}, {len(replies)} replies")
    assert code not in FORBIDDEN_CODES, describe(code, request)
    # A run that failed inside reports an error event; an unmapped failure shows as INTERNAL there.
    run_errors = [r.event.error for r in replies
                  if hasattr(r, "event") and r.event.HasField("error") and r.event.error.reason == "INTERNAL"]
    assert not run_errors, describe(code, request) + f" run error: {run_errors[0]}"


def test_orchestrator_still_runs_a_turn_after_the_fuzz_run(orchestrator: ServiceThread) -> None:
    assert orchestrator.is_serving(SERVICE_NAME)
    code, (created,) = orchestrator.invoke_with_replies(SERVICE, SERVICE.methods_by_name["CreateSession"],
                                                        pb.CreateSessionRequest(tenant_id="acme"))
    assert code.name == "OK"
    run = pb.RunRequest(tenant_id="acme", session_id=created.session.session_id, user_message="hello",
                        options=pb.RunOptions(max_steps=1, max_tokens=4))
    replies = orchestrator.call(_run_to_end(orchestrator, run), timeout_s=30)
    assert replies and replies[-1].event.HasField("final"), replies[-1:]


async def _run_to_end(harness: ServiceThread, request: pb.RunRequest) -> list[pb.RunResponse]:
    """A Run read to its end (the harness's short stream window is for garbage only)."""
    stub = orchestrator_pb2_grpc.AgentServiceStub(harness.channel)
    return [reply async for reply in stub.Run(request, timeout=20)]
