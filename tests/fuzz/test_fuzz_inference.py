"""Hypothesis-built requests at every InferenceService RPC (synthetic backend): never UNKNOWN/INTERNAL."""
from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from llmesh.inference.v1 import inference_pb2 as pb

from services.inference.config import Settings
from services.inference.server import SERVICE_NAME, build_app
from tests.fuzz.harness import ServiceThread, check_no_unmapped_status, request_class, unary_request_methods
from tests.fuzz.strategies import messages
from tests.support.auth import service_identity

SERVICE = pb.DESCRIPTOR.services_by_name["InferenceService"]
HINTS = {
    "prompt": st.sampled_from(["hello", "a b c", ""]),
    "session_id": st.sampled_from(["s1", ""]),
    "text": st.sampled_from(["hello", ""]),
    "max_tokens": st.integers(1, 8),
    "grammar": st.sampled_from(["", 'root ::= "a"', "not a grammar"]),
}
FUZZ = settings(max_examples=40, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def inference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceThread]:
    conf = Settings(port=0, data_dir=str(tmp_path_factory.mktemp("inference-fuzz")), backend="synthetic",
                    n_ctx=1024, n_seq_max=4, synthetic_tokens_per_s=0.0, max_queue=16)
    # The orchestrator may call every inference RPC (ReleaseSession only it).
    harness = ServiceThread(build_app(conf), conf, identity=service_identity("orchestrator"))
    yield harness
    harness.close()


@pytest.mark.parametrize("method", list(unary_request_methods(SERVICE)), ids=lambda m: m.name)
@FUZZ
@given(data=st.data())
def test_inference_rpc_answers_garbage_with_a_mapped_status(inference: ServiceThread, method, data) -> None:
    check_no_unmapped_status(inference, SERVICE, method, data.draw(messages(request_class(method), HINTS)))


def test_inference_still_generates_after_the_fuzz_run(inference: ServiceThread) -> None:
    assert inference.is_serving(SERVICE_NAME)
    generate = SERVICE.methods_by_name["Generate"]
    request = pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(max_tokens=2))
    assert inference.invoke(SERVICE, generate, request).name == "OK"
