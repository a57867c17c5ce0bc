"""Evaluate + approvals + audit through the core PolicyService."""
from __future__ import annotations

import json

import pytest

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.policy.core.approvals import ApprovalChoice
from services.policy.core.rules import Decision, RiskLevel
from tests.policy.builders import make_service, shell_call, tool_call


async def test_prompt_opens_an_approval_and_repeats_reuse_it() -> None:
    service, _ = make_service()
    first = await service.evaluate(shell_call("make build"))
    again = await service.evaluate(shell_call("make  'build'"))  # same command, other spelling
    assert first.verdict.decision is Decision.PROMPT
    assert first.approval_id and again.approval_id == first.approval_id


async def test_approve_for_session_covers_the_same_command_only_in_that_session() -> None:
    service, _ = make_service()
    asked = await service.evaluate(shell_call("make build", session="s1"))
    await service.record_approval("acme", "s1", asked.approval_id, ApprovalChoice.APPROVE_SESSION, "ana", "r1")

    same = await service.evaluate(shell_call("make build", session="s1"))
    assert same.verdict.decision is Decision.ALLOW and same.approved_by_cache and not same.approval_id

    different = await service.evaluate(shell_call("make deploy", session="s1"))
    assert different.verdict.decision is Decision.PROMPT and not different.approved_by_cache

    other_session = await service.evaluate(shell_call("make build", session="s2"))
    assert other_session.verdict.decision is Decision.PROMPT and not other_session.approved_by_cache

    other_tenant = await service.evaluate(shell_call("make build", tenant="globex", session="s1"))
    assert other_tenant.verdict.decision is Decision.PROMPT and not other_tenant.approved_by_cache


async def test_session_approval_never_relaxes_forbidden_parts() -> None:
    service, _ = make_service()
    asked = await service.evaluate(shell_call("make build"))
    await service.record_approval("acme", "s1", asked.approval_id, ApprovalChoice.APPROVE_SESSION, "ana", "")
    combined = await service.evaluate(shell_call("make build; sudo reboot"))
    assert combined.verdict.decision is Decision.FORBIDDEN


async def test_approve_once_is_used_up_by_one_call() -> None:
    service, _ = make_service()
    asked = await service.evaluate(shell_call("make build"))
    await service.record_approval("acme", "s1", asked.approval_id, ApprovalChoice.APPROVE_ONCE, "ana", "")
    used = await service.evaluate(shell_call("make build"), approval_id=asked.approval_id)
    assert used.verdict.decision is Decision.ALLOW
    reused = await service.evaluate(shell_call("make build"), approval_id=asked.approval_id)
    assert reused.verdict.decision is Decision.FORBIDDEN
    fresh = await service.evaluate(shell_call("make build"))
    assert fresh.verdict.decision is Decision.PROMPT and fresh.approval_id != asked.approval_id


@pytest.mark.parametrize("choice", [ApprovalChoice.DENY, ApprovalChoice.ABORT])
async def test_denied_approval_forbids_the_call(choice: ApprovalChoice) -> None:
    service, _ = make_service()
    asked = await service.evaluate(shell_call("make build"))
    result = await service.record_approval("acme", "s1", asked.approval_id, choice, "ana", "")
    assert result.choice is choice
    answer = await service.evaluate(shell_call("make build"), approval_id=asked.approval_id)
    assert answer.verdict.decision is Decision.FORBIDDEN and "ana" in answer.verdict.justification


async def test_approval_ids_do_not_cross_sessions_or_tenants() -> None:
    service, _ = make_service()
    asked = await service.evaluate(shell_call("make build", session="s1"))
    with pytest.raises(NotFound):
        await service.record_approval("acme", "s2", asked.approval_id, ApprovalChoice.APPROVE_ONCE, "eve", "")
    with pytest.raises(NotFound):
        await service.record_approval("globex", "s1", asked.approval_id, ApprovalChoice.APPROVE_ONCE, "eve", "")
    with pytest.raises(NotFound):
        await service.evaluate(shell_call("make build", session="s2"), approval_id=asked.approval_id)


async def test_approval_for_one_command_does_not_cover_another() -> None:
    service, _ = make_service()
    asked = await service.evaluate(shell_call("make build"))
    await service.record_approval("acme", "s1", asked.approval_id, ApprovalChoice.APPROVE_ONCE, "ana", "")
    with pytest.raises(FailedPrecondition):
        await service.evaluate(shell_call("make deploy"), approval_id=asked.approval_id)


async def test_record_approval_is_idempotent_by_request_id_and_answers_once() -> None:
    service, log = make_service()
    asked = await service.evaluate(shell_call("make build"))
    first = await service.record_approval("acme", "s1", asked.approval_id, ApprovalChoice.APPROVE_ONCE, "ana", "r1")
    retry = await service.record_approval("acme", "s1", asked.approval_id, ApprovalChoice.APPROVE_ONCE, "ana", "r1")
    assert retry == first
    assert len(log.rows["acme"]) == 2  # one evaluate, one approval
    with pytest.raises(FailedPrecondition):
        await service.record_approval("acme", "s1", asked.approval_id, ApprovalChoice.DENY, "bob", "r2")


async def test_every_decision_and_approval_is_audited_with_secrets_redacted() -> None:
    service, log = make_service()
    asked = await service.evaluate(shell_call("API_TOKEN=abc123secret make deploy --password hunter2"))
    await service.record_approval("acme", "s1", asked.approval_id, ApprovalChoice.DENY, "ana", "")
    rows = log.rows["acme"]
    assert [r.seq for r in rows] == [1, 2]
    assert asked.audit_seq == 1
    evaluate_entry, approval_entry = (json.loads(r.payload_json) for r in rows)
    assert evaluate_entry["type"] == "evaluate" and evaluate_entry["decision"] == "prompt"
    assert approval_entry["type"] == "approval" and approval_entry["decision"] == "deny"
    for row in rows:
        assert "abc123secret" not in row.payload_json and "hunter2" not in row.payload_json
    assert "[REDACTED]" in rows[0].payload_json
    assert (await service.verify_audit("acme")).ok


async def test_roles_limit_which_tools_may_be_called() -> None:
    service, _ = make_service()
    denied = await service.evaluate(tool_call("shell", {"command": "ls"}, role="viewer"))
    assert denied.verdict.decision is Decision.FORBIDDEN
    assert denied.verdict.matches[0].rule_id == "role:viewer"
    allowed = await service.evaluate(tool_call("read_file", {"path": "a"}, role="viewer",
                                                risk=RiskLevel.READ_ONLY))
    assert allowed.verdict.decision is Decision.ALLOW
    unknown = await service.evaluate(tool_call("read_file", {"path": "a"}, role="intruder"))
    assert unknown.verdict.decision is Decision.FORBIDDEN


@pytest.mark.parametrize(("risk", "expected"), [
    (RiskLevel.READ_ONLY, Decision.ALLOW), (RiskLevel.WRITE, Decision.PROMPT),
    (RiskLevel.DANGEROUS, Decision.PROMPT), (RiskLevel.UNSPECIFIED, Decision.PROMPT),
])
async def test_risk_level_decides_tools_without_rules(risk: RiskLevel, expected: Decision) -> None:
    service, _ = make_service()
    result = await service.evaluate(tool_call("web_search", {"q": "x"}, risk=risk))
    assert result.verdict.decision is expected


@pytest.mark.parametrize(("path", "expected"), [
    ("src/app.py", Decision.PROMPT), ("/srv/work/project/docs/a.md", Decision.PROMPT),
    ("/etc/passwd", Decision.FORBIDDEN), ("../sibling/x", Decision.FORBIDDEN),
    ("src/../../escape.txt", Decision.FORBIDDEN), (".git/hooks/post-checkout", Decision.FORBIDDEN),
])
async def test_file_writes_follow_path_rules(path: str, expected: Decision) -> None:
    service, _ = make_service()
    result = await service.evaluate(tool_call("write_file", {"path": path, "content": "x"},
                                              risk=RiskLevel.WRITE))
    assert result.verdict.decision is expected


@pytest.mark.parametrize(("call", "field"), [
    (shell_call("ls", tenant=""), "tenant_id"),
    (shell_call("ls", session=""), "session_id"),
    (shell_call("ls", workspace="relative/dir"), "workspace_root"),
    (tool_call("shell", {"cmd": "ls"}), "arguments_json.command"),
    (tool_call("write_file", {"content": "x"}), "arguments_json.path"),
])
async def test_bad_calls_name_the_field(call, field: str) -> None:
    service, _ = make_service()
    with pytest.raises(InvalidArgument) as err:
        await service.evaluate(call)
    assert err.value.field == field


async def test_the_tool_services_own_tool_names_are_covered() -> None:
    service, _ = make_service()
    shell = await service.evaluate(tool_call("shell_exec", {"argv": ["/bin/sh", "-c", "rm -rf /"]},
                                             risk=RiskLevel.DANGEROUS))
    assert shell.verdict.decision is Decision.FORBIDDEN
    write = await service.evaluate(tool_call("fs_write", {"path": "/etc/cron.d/x", "content": "x"},
                                             risk=RiskLevel.WRITE))
    assert write.verdict.decision is Decision.FORBIDDEN
    read = await service.evaluate(tool_call("fs_read", {"path": "a.txt"}, role="viewer", risk=RiskLevel.READ_ONLY))
    assert read.verdict.decision is Decision.ALLOW


async def test_a_call_with_a_long_key_is_approved_under_its_digest() -> None:
    service, log = make_service()
    call = tool_call("web_search", {"q": "x" * 40_000}, risk=RiskLevel.WRITE)
    asked = await service.evaluate(call)
    approval = await service.approvals.get("acme", "s1", asked.approval_id)
    assert approval.subject_key.startswith("sha256:") and len(approval.subject_key) == 71
    request_id = "retry key with spaces " + "y" * 200
    first = await service.record_approval("acme", "s1", asked.approval_id, ApprovalChoice.APPROVE_SESSION, "ana",
                                          request_id)
    assert await service.record_approval("acme", "s1", asked.approval_id, ApprovalChoice.APPROVE_SESSION, "ana",
                                         request_id) == first
    again = await service.evaluate(call)
    assert again.verdict.decision is Decision.ALLOW and again.approved_by_cache
    other = await service.evaluate(tool_call("web_search", {"q": "x" * 40_001}, risk=RiskLevel.WRITE))
    assert other.verdict.decision is Decision.PROMPT
    assert [json.loads(r.payload_json)["type"] for r in log.rows["acme"]] == [
        "evaluate", "approval", "evaluate", "evaluate"]
