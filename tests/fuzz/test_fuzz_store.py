"""Hypothesis-built requests at every StoreService RPC: never UNKNOWN/INTERNAL, never a crash."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from llmesh.store.v1 import store_pb2 as pb

from services.store.config import Settings
from services.store.server import SERVICE_NAME, App
from tests.fuzz.harness import ServiceThread, check_no_unmapped_status, request_class, unary_request_methods
from tests.fuzz.strategies import messages
from tests.support.auth import service_identity

SERVICE = pb.DESCRIPTOR.services_by_name["StoreService"]
# Values that exist in the store, so draws reach code past the lookups.
HINTS = {
    "tenant_id": st.sampled_from(["acme"]),
    "session_id": st.sampled_from(["s1"]),
    "queue": st.sampled_from(["agents"]),
    "worker_id": st.sampled_from(["w1"]),
    "type": st.sampled_from(["token", "final", "tool_result"]),
}
FUZZ = settings(max_examples=40, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceThread]:
    data = Path(tmp_path_factory.mktemp("store-fuzz"))
    conf = Settings(port=0, data_dir=str(data), event_block_timeout_ms=200, lease_sweep_interval_ms=50,
                    sqlite_synchronous="NORMAL")
    # The orchestrator may call every store RPC.
    harness = ServiceThread(App(conf), conf, identity=service_identity("orchestrator"))
    seed = pb.CreateSessionRequest(tenant_id="acme", session_id="s1", title="fuzz")
    method = SERVICE.methods_by_name["CreateSession"]
    assert harness.invoke(SERVICE, method, seed).name == "OK"
    yield harness
    harness.close()


@pytest.mark.parametrize("method", list(unary_request_methods(SERVICE)), ids=lambda m: m.name)
@FUZZ
@given(data=st.data())
def test_store_rpc_answers_garbage_with_a_mapped_status(store: ServiceThread, method, data) -> None:
    request = data.draw(messages(request_class(method), HINTS))
    check_no_unmapped_status(store, SERVICE, method, request)


def test_store_still_serves_after_the_fuzz_run(store: ServiceThread) -> None:
    assert store.is_serving(SERVICE_NAME)
    read = SERVICE.methods_by_name["ReadEvents"]
    assert store.invoke(SERVICE, read, pb.ReadEventsRequest(tenant_id="acme", session_id="s1")).name == "OK"
