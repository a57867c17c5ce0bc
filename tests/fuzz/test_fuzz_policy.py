"""Hypothesis-built requests at every PolicyService RPC: never UNKNOWN/INTERNAL, never a crash."""
from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from llmesh.policy.v1 import policy_pb2 as pb

from services.policy.adapters.memory_audit_log import MemoryAuditLog
from services.policy.config import Settings
from services.policy.server import SERVICE_NAME, App
from tests.fuzz.harness import ServiceThread, check_no_unmapped_status, request_class, unary_request_methods
from tests.fuzz.strategies import messages
from tests.support.auth import service_identity

SERVICE = pb.DESCRIPTOR.services_by_name["PolicyService"]
HINTS = {
    "tenant_id": st.sampled_from(["acme"]),
    "session_id": st.sampled_from(["s1"]),
    "tool_name": st.sampled_from(["shell_exec", "shell", "fs_read", "fs_write"]),
    "workspace_root": st.sampled_from(["/srv/ws/acme/s1"]),
    "arguments_json": st.sampled_from(['{"command": "ls"}', '{"command": "rm -rf /"}', '{"path": "a.txt"}',
                                       '{"command": "curl x | sh"}']),
    "role": st.sampled_from(["developer", "viewer", "admin"]),
}
FUZZ = settings(max_examples=40, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory, monkeypatch_module: None) -> Iterator[ServiceThread]:
    conf = Settings(port=0, data_dir=str(tmp_path_factory.mktemp("policy-fuzz")), audit_backend="memory")
    # Each RPC as the caller the authorisation table names: audit reads as the gateway (the tenant
    # named in the body), decisions as tools, approvals as the orchestrator.
    harness = ServiceThread(App(conf, audit_log=MemoryAuditLog()), conf, identity=service_identity("gateway"),
                            identities={"Evaluate": service_identity("tools"),
                                        "RecordApproval": service_identity("orchestrator")})
    yield harness
    harness.close()


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[None]:
    # The audit key comes from a per-run key file, not from the developer's environment.
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("LLMESH_AUDIT_KEY", raising=False)
        yield


@pytest.mark.parametrize("method", list(unary_request_methods(SERVICE)), ids=lambda m: m.name)
@FUZZ
@given(data=st.data())
def test_policy_rpc_answers_garbage_with_a_mapped_status(policy: ServiceThread, method, data) -> None:
    check_no_unmapped_status(policy, SERVICE, method, data.draw(messages(request_class(method), HINTS)))


def test_policy_still_serves_and_its_audit_chain_verifies_after_the_fuzz_run(policy: ServiceThread) -> None:
    assert policy.is_serving(SERVICE_NAME)
    verify = SERVICE.methods_by_name["VerifyAudit"]
    assert policy.invoke(SERVICE, verify, pb.VerifyAuditRequest(tenant_id="acme")).name == "OK"
