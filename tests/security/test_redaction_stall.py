"""A huge hostile command cannot stall the policy service, for its tenant or any other.

The secret-redaction patterns used to backtrack quadratically (a 31 KB command
took ~9 s in Evaluate, on the event loop). Every pattern's worst input is run
here at 64 KiB, and the service is checked to judge calls off the loop, within
a budget, with other tenants still served.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from llmesh.policy.v1 import policy_pb2, policy_pb2_grpc

from bench.security_policy import hostile_commands, measure_policy
from services.common.errors import DeadlineExceeded, InvalidArgument
from services.common.interceptors import error_info
from services.common.runtime import running_service
from services.policy.adapters.memory_audit_log import MemoryAuditLog
from services.policy.config import Settings
from services.policy.core.approvals import ApprovalBook
from services.policy.core.audit import AuditChain
from services.policy.core.evaluator import MAX_COMMAND_CHARS, PolicyEvaluator, ToolCall
from services.policy.core.policy_service import EvaluationLimits, PolicyService
from services.policy.core.redaction import REDACTED, redact_text, redact_value
from services.policy.core.rules import Decision
from services.policy.server import App
from tests.policy.builders import TEST_KEY, WORKSPACE, default_policy, make_service, shell_call
from tests.support.auth import service_channel

SIZE = 64 * 1024
GENEROUS_S = 1.0
# The worst input of each redaction pattern: a run it could start at everywhere, or a near miss.
PATHOLOGICAL = {
    "assignment name run": "a" * SIZE,
    "assignment dashes": "-" * SIZE,
    "name=value pairs": "a=" * (SIZE // 2),
    "unclosed quotes after =": "x='" * (SIZE // 3),
    "secret flag, no value": "--password" + " " * SIZE,
    "secret flag of dashes": "-" + "-pass" * (SIZE // 5),
    "auth header without colon": "cookie" * (SIZE // 6),
    "auth header, spaces": "authorization:" + " " * SIZE,
    "url scheme run": "a" * SIZE + ":",
    "url without @": "a://b:" + "c" * SIZE,
    "url repeated": "a://b:" * (SIZE // 6),
    "jwt without dots": "eyJ" + "a" * SIZE,
    "jwt starts repeated": "eyJ-" * (SIZE // 4),
    "pem without end": "-----BEGIN PRIVATE KEY-----" * (SIZE // 27),
    "pem header run": "-----BEGIN " + "A " * (SIZE // 2),
    "token prefixes": "sk-xoxa-ghp_" * (SIZE // 12),
    "mysql -p": "mysql" + " -p" * (SIZE // 3),
}


@pytest.mark.parametrize("text", PATHOLOGICAL.values(), ids=PATHOLOGICAL.keys())
def test_each_pattern_handles_its_worst_64k_input_fast(text: str) -> None:
    started = time.perf_counter()
    redact_text(text)
    redact_value({"command": text, "argv": text.split(" ")[:4096]})
    assert time.perf_counter() - started < GENEROUS_S


def test_rewritten_patterns_still_find_the_secrets() -> None:
    text = ("TOKEN=abc123 curl -H 'Authorization: Bearer zzz' https://u:pw@x.example --password hunter2 "
            "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.c2lnbmF0dXJlMTIz "
            "-----BEGIN RSA PRIVATE KEY-----\nMIIB\n-----END RSA PRIVATE KEY----- tail")
    out = redact_text(text)
    for secret in ("abc123", "zzz", ":pw@", "hunter2", "eyJzdWIi", "MIIB"):
        assert secret not in out
    assert out.endswith(" tail") and out.count(REDACTED) == 6
    cut = redact_text("key: -----BEGIN PRIVATE KEY-----\nMIIEsecret")
    assert "MIIEsecret" not in cut


@pytest.mark.parametrize("name", list(hostile_commands()))
async def test_each_hostile_64k_command_is_judged_fast(name: str) -> None:
    service, _ = make_service()
    command = hostile_commands()[name]
    assert len(command) == MAX_COMMAND_CHARS
    started = time.perf_counter()
    result = await service.evaluate(shell_call(command))
    assert time.perf_counter() - started < GENEROUS_S
    assert result.audit_seq == 1 and result.evaluation_s > 0
    service.close()


async def test_a_command_over_the_cap_is_refused_naming_the_field() -> None:
    service, _ = make_service()
    with pytest.raises(InvalidArgument) as err:
        await service.evaluate(shell_call("echo " + "a" * MAX_COMMAND_CHARS))
    assert err.value.field == "arguments_json.command"
    service.close()


async def test_over_the_budget_the_rest_is_left_to_a_person() -> None:
    verdict = PolicyEvaluator(default_policy()).evaluate(shell_call("ls; ls; rm -rf /"),
                                                          deadline=time.monotonic() - 1)
    assert verdict.decision is Decision.PROMPT
    assert "default:evaluation-budget" in {m.rule_id for m in verdict.matches}


class _SlowEvaluator:
    """Holds the thread that judges, like a command that takes long to parse."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.real = PolicyEvaluator(default_policy())

    def evaluate(self, call: ToolCall, deadline: float | None = None):
        time.sleep(self.seconds)
        return self.real.evaluate(call)


class _SlowSource:
    def __init__(self, seconds: float) -> None:
        self.evaluator = _SlowEvaluator(seconds)


def _slow_service(seconds: float, limits: EvaluationLimits | None = None) -> PolicyService:
    return PolicyService(_SlowSource(seconds), ApprovalBook(), AuditChain(MemoryAuditLog(), TEST_KEY),  # type: ignore[arg-type]
                         limits)


async def test_judging_runs_off_the_event_loop() -> None:
    service = _slow_service(0.5)
    gaps, last = [], time.perf_counter()

    async def tick() -> None:
        nonlocal last
        while True:
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticker = asyncio.ensure_future(tick())
    result = await service.evaluate(shell_call("ls"))
    ticker.cancel()
    assert result.verdict.decision is Decision.ALLOW and result.evaluation_s >= 0.5
    assert len(gaps) > 10 and max(gaps) < 0.25, max(gaps)
    service.close()


async def test_a_judgement_past_the_timeout_is_deadline_exceeded() -> None:
    service = _slow_service(1.0, EvaluationLimits(num_workers=2, timeout_s=0.2))
    with pytest.raises(DeadlineExceeded) as err:
        await service.evaluate(shell_call("ls"))
    assert err.value.reason == "POLICY_EVALUATION_TIMEOUT"
    service.close()


async def test_one_tenant_cannot_take_every_worker() -> None:
    service = _slow_service(0.3, EvaluationLimits(num_workers=2))
    flood = [asyncio.ensure_future(service.evaluate(shell_call(f"ls {k}", tenant="noisy"))) for k in range(6)]
    await asyncio.sleep(0.05)
    started = time.perf_counter()
    await service.evaluate(shell_call("ls", tenant="quiet"))
    # The noisy tenant holds one worker for 6 x 0.3 s; the quiet one waits for at most one judgement.
    assert time.perf_counter() - started < 0.9
    await asyncio.gather(*flood)
    service.close()


@pytest.fixture
async def stub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[policy_pb2_grpc.PolicyServiceStub]:
    monkeypatch.delenv("LLMESH_AUDIT_KEY", raising=False)
    settings = Settings(port=0, data_dir=str(tmp_path / "data"), audit_backend="memory")
    async with running_service(App(settings, audit_log=MemoryAuditLog()), settings) as svc, \
            service_channel(svc.address, "tools") as channel:  # tools asks for decisions
        yield policy_pb2_grpc.PolicyServiceStub(channel)


def _request(tenant: str, arguments: dict | str) -> policy_pb2.EvaluateRequest:
    body = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return policy_pb2.EvaluateRequest(tenant_id=tenant, session_id="s1", tool_name="shell_exec",
                                      workspace_root=WORKSPACE, arguments_json=body, risk_level=3)


async def test_other_tenants_are_served_while_huge_commands_are_judged(
        stub: policy_pb2_grpc.PolicyServiceStub) -> None:
    # Each of these took tens of seconds on the event loop with the old patterns.
    huge = [hostile_commands()[name] for name in ("dash-run", "assignment-name-run", "url-scheme-run",
                                                  "secret-flag-parts", "jwt-repeated", "many-options")]
    in_flight = [asyncio.ensure_future(stub.Evaluate(_request("noisy", {"command": c}), timeout=10))
                 for c in huge * 3]
    await asyncio.sleep(0)
    started = time.perf_counter()
    reply = await stub.Evaluate(_request("quiet", {"command": "git status"}), timeout=5)
    assert reply.decision == policy_pb2.DECISION_ALLOW
    assert time.perf_counter() - started < 5
    replies = await asyncio.gather(*in_flight)
    assert all(r.audit_seq > 0 for r in replies)


async def test_oversized_arguments_are_invalid_argument_over_grpc(stub: policy_pb2_grpc.PolicyServiceStub) -> None:
    for arguments, field in (({"command": "ls", "stdin": "x" * (1024 * 1024)}, "arguments_json"),
                             ('{"command": "ls", "x": ' + "[" * 5000 + "]" * 5000 + "}", "arguments_json"),
                             ({"command": "ls", "x": json.loads("[" * 40 + "]" * 40)}, "arguments_json"),
                             ({"command": "echo " + "a" * SIZE}, "arguments_json.command")):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Evaluate(_request("acme", arguments))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        info = error_info(err.value)
        assert info is not None and info.metadata["field"] == field


def test_the_benchmark_reports_the_three_numbers() -> None:
    result = measure_policy(30)
    assert set(result) == {"policy_evaluate_p99_ms_64k", "redteam_commands_allowed_wrongly", "redteam_commands"}
    assert result["redteam_commands_allowed_wrongly"] == 0 and result["redteam_commands"] >= 150
    assert 0 < result["policy_evaluate_p99_ms_64k"] < GENEROUS_S * 1000
