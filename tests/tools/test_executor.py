"""ToolExecutor: batches, caps, timeouts, retries, breaker, policy, cache."""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from services.tools.core.executor import ExecutorLimits
from services.tools.core.model import RiskLevel, ToolContext, ToolFailure, ToolOutput, ToolSpec, ToolStatus
from services.tools.core.output import CapturedText
from services.tools.core.ports import PolicyDecision, PolicyUnavailable, PolicyVerdict
from tests.support.waiting import wait_until
from tests.tools.conftest import CTX, FakePolicy, call, make_executor, workspace_of

SLEEP_SCHEMA = {"type": "object", "properties": {"ms": {"type": "integer"}, "tag": {"type": "string"}}}


class SleepTool:
    """Sleeps, tracking how many run at once."""

    def __init__(self) -> None:
        self.running = 0
        self.max_running = 0
        self.num_calls = 0

    async def __call__(self, args: dict[str, Any], ctx: ToolContext) -> ToolOutput:
        self.num_calls += 1
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            await asyncio.sleep(args.get("ms", 50) / 1000)
        finally:
            self.running -= 1
        return ToolOutput(ok=True, content=CapturedText.of(args.get("tag", ""), 100))


class RendezvousTool:
    """Each call waits until ``expected`` calls run at once, then they finish in reverse call order."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.running = 0
        self.max_running = 0
        self.finished: list[int] = []
        self._all_in = asyncio.Event()
        self._done = [asyncio.Event() for _ in range(expected)]

    async def __call__(self, args: dict[str, Any], ctx: ToolContext) -> ToolOutput:
        index = int(args["tag"])
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        if self.running == self.expected:
            self._all_in.set()
        try:
            await self._all_in.wait()
            if index + 1 < self.expected:
                await self._done[index + 1].wait()
        finally:
            self.running -= 1
        self.finished.append(index)
        self._done[index].set()
        return ToolOutput(ok=True, content=CapturedText.of(args["tag"], 100))


class FlakyTool:
    """Fails (as a crash) the first ``num_failures`` times."""

    def __init__(self, num_failures: int) -> None:
        self.num_failures = num_failures
        self.num_calls = 0

    async def __call__(self, args: dict[str, Any], ctx: ToolContext) -> ToolOutput:
        self.num_calls += 1
        if self.num_calls <= self.num_failures:
            raise ToolFailure("backend went away", reason="BACKEND_DOWN")
        return ToolOutput(ok=True, content=CapturedText.of("fine", 100))


def add_tool(executor: Any, name: str, handler: Any, **kwargs: Any) -> None:
    executor.registry.add(ToolSpec(name=name, description="", parameters_schema=SLEEP_SCHEMA, handler=handler,
                                   **kwargs))


async def test_batch_runs_concurrently_and_returns_in_call_order(workspace_base: Path) -> None:
    executor = make_executor(workspace_base)
    tool = RendezvousTool(8)  # all eight must run at once for any to finish
    add_tool(executor, "sleep", tool)
    calls = [call("sleep", call_id=f"c{i}", tag=str(i), timeout_ms=10_000) for i in range(8)]
    outcomes = await executor.execute_batch(CTX, calls)
    assert tool.max_running == 8 and tool.finished == list(reversed(range(8)))
    assert [o.call_id for o in outcomes] == [f"c{i}" for i in range(8)]
    assert [o.content.text for o in outcomes] == [str(i) for i in range(8)]
    assert all(o.status is ToolStatus.OK for o in outcomes)


async def test_session_and_global_caps_bound_concurrency(workspace_base: Path) -> None:
    executor = make_executor(workspace_base, limits=ExecutorLimits(max_concurrent_calls=3,
                                                                   max_concurrent_calls_per_session=2))
    tool = SleepTool()
    add_tool(executor, "sleep", tool)
    other = CTX.__class__("r2", "acme", "s2", "developer")
    await asyncio.gather(executor.execute_batch(CTX, [call("sleep", call_id=f"a{i}", ms=60) for i in range(4)]),
                         executor.execute_batch(other, [call("sleep", call_id=f"b{i}", ms=60) for i in range(4)]))
    assert tool.max_running == 3  # the global cap binds across the two sessions
    tool.max_running = 0
    await executor.execute_batch(CTX, [call("sleep", call_id=f"c{i}", ms=60) for i in range(4)])
    assert tool.max_running == 2  # one session alone is held to its own cap


async def test_each_call_has_its_own_timeout(workspace_base: Path) -> None:
    executor = make_executor(workspace_base)
    add_tool(executor, "sleep", SleepTool())
    # "fast" runs longer than "slow" may: only a timeout of its own lets it finish.
    outcomes = await executor.execute_batch(CTX, [call("sleep", call_id="slow", ms=60_000, timeout_ms=100),
                                                  call("sleep", call_id="fast", ms=300, timeout_ms=30_000)])
    assert outcomes[0].status is ToolStatus.TIMEOUT and outcomes[0].error_reason == "TIMEOUT"
    # Generous on purpose: the 100 ms timeout fired, long before the 60 s sleep would have ended.
    assert outcomes[0].duration_ms < 30_000
    assert outcomes[1].status is ToolStatus.OK


async def test_retryable_tool_is_retried_with_backoff(workspace_base: Path) -> None:
    delays: list[float] = []

    async def record_sleep(seconds: float) -> None:
        delays.append(seconds)

    executor = make_executor(workspace_base, limits=ExecutorLimits(retry_max_attempts=3, retry_base_delay_ms=100))
    executor.sleep = record_sleep
    executor.rand = lambda: 0.5
    flaky = FlakyTool(num_failures=2)
    add_tool(executor, "flaky", flaky, retryable=True)
    outcome = await executor.execute(CTX, call("flaky"))
    assert outcome.status is ToolStatus.OK and outcome.attempts == 3 and flaky.num_calls == 3
    assert delays == pytest.approx([0.1, 0.2])


async def test_non_retryable_tool_fails_once(workspace_base: Path) -> None:
    executor = make_executor(workspace_base)
    flaky = FlakyTool(num_failures=1)
    add_tool(executor, "flaky", flaky, retryable=False)
    outcome = await executor.execute(CTX, call("flaky"))
    assert outcome.status is ToolStatus.ERROR and outcome.error_reason == "BACKEND_DOWN"
    assert outcome.attempts == 1 and flaky.num_calls == 1


async def test_breaker_opens_and_recovers(workspace_base: Path) -> None:
    now = [0.0]
    executor = make_executor(workspace_base, limits=ExecutorLimits(breaker_failure_threshold=2, breaker_window_s=60,
                                                                   breaker_reset_s=30))
    executor.clock = lambda: now[0]
    flaky = FlakyTool(num_failures=3)
    add_tool(executor, "flaky", flaky)
    assert (await executor.execute(CTX, call("flaky"))).status is ToolStatus.ERROR
    assert (await executor.execute(CTX, call("flaky"))).status is ToolStatus.ERROR
    refused = await executor.execute(CTX, call("flaky"))
    assert refused.status is ToolStatus.UNAVAILABLE and refused.error_reason == "BREAKER_OPEN"
    assert flaky.num_calls == 2  # an open breaker does not call the tool
    now[0] += 30
    probe = await executor.execute(CTX, call("flaky"))  # half-open probe fails: open again
    assert probe.status is ToolStatus.ERROR and flaky.num_calls == 3
    assert (await executor.execute(CTX, call("flaky"))).error_reason == "BREAKER_OPEN"
    now[0] += 30
    assert (await executor.execute(CTX, call("flaky"))).status is ToolStatus.OK  # probe succeeds
    assert (await executor.execute(CTX, call("flaky"))).status is ToolStatus.OK
    assert flaky.num_calls == 5


async def test_forbidden_call_is_a_structured_denial_and_never_runs(workspace_base: Path) -> None:
    policy = FakePolicy({"sleep": PolicyVerdict(PolicyDecision.FORBIDDEN, "no sleeping on the job")})
    executor = make_executor(workspace_base, policy)
    tool = SleepTool()
    add_tool(executor, "sleep", tool)
    outcome = await executor.execute(CTX, call("sleep", ms=1))
    assert outcome.status is ToolStatus.DENIED and outcome.error_reason == "POLICY_FORBIDDEN"
    assert outcome.error_message == "no sleeping on the job" and outcome.request_error is None
    assert tool.num_calls == 0
    query = policy.queries[0]
    assert (query.tenant_id, query.session_id, query.role, query.tool_name) == ("acme", "s1", "developer", "sleep")
    assert query.workspace_root == str(workspace_of(workspace_base).resolve())


async def test_approval_required_then_approved_call_runs(workspace_base: Path) -> None:
    policy = FakePolicy({"shell_exec": PolicyVerdict(PolicyDecision.PROMPT, "needs a person", approval_id="ap-7")})
    executor = make_executor(workspace_base, policy)
    first = await executor.execute(CTX, call("shell_exec", command="echo hi > out.txt"))
    assert first.status is ToolStatus.APPROVAL_REQUIRED and first.approval_id == "ap-7"
    assert not (workspace_of(workspace_base) / "out.txt").exists()
    second = await executor.execute(CTX, call("shell_exec", approval_id="ap-7", command="echo hi > out.txt"))
    assert second.status is ToolStatus.OK
    assert policy.queries[-1].approval_id == "ap-7"
    assert (workspace_of(workspace_base) / "out.txt").read_text() == "hi\n"


async def test_policy_unavailable_fails_closed(workspace_base: Path) -> None:
    class DownPolicy:
        async def evaluate(self, query: Any) -> PolicyVerdict:
            raise PolicyUnavailable("connection refused")

    executor = make_executor(workspace_base, DownPolicy())
    tool = SleepTool()
    add_tool(executor, "sleep", tool)
    outcome = await executor.execute(CTX, call("sleep"))
    assert outcome.status is ToolStatus.UNAVAILABLE and outcome.error_reason == "POLICY_UNAVAILABLE"
    assert tool.num_calls == 0


async def test_unknown_tool_and_bad_arguments_do_not_run(workspace_base: Path) -> None:
    executor = make_executor(workspace_base)
    outcomes = await executor.execute_batch(CTX, [call("nope"), call("fs_read", call_id="c2", path=7)])
    assert outcomes[0].status is ToolStatus.INVALID and outcomes[0].error_reason == "TOOL_NOT_FOUND"
    assert outcomes[1].status is ToolStatus.INVALID and "$.path" in outcomes[1].error_message


async def test_fs_read_is_served_from_cache_until_the_file_changes(workspace_base: Path) -> None:
    executor = make_executor(workspace_base)
    await executor.execute(CTX, call("fs_write", path="notes.txt", content="v1"))
    first = await executor.execute(CTX, call("fs_read", path="notes.txt"))
    second = await executor.execute(CTX, call("fs_read", path="notes.txt"))
    assert (first.from_cache, second.from_cache) == (False, True)
    assert second.content.text == "v1"
    await executor.execute(CTX, call("fs_write", path="notes.txt", content="version 2"))
    third = await executor.execute(CTX, call("fs_read", path="notes.txt"))
    assert third.from_cache is False and third.content.text == "version 2"


async def test_cache_hits_are_still_checked_by_policy(workspace_base: Path) -> None:
    policy = FakePolicy()
    executor = make_executor(workspace_base, policy)
    await executor.execute(CTX, call("fs_write", path="a.txt", content="x"))
    await executor.execute(CTX, call("fs_read", path="a.txt"))
    policy.decisions["fs_read"] = PolicyVerdict(PolicyDecision.FORBIDDEN, "revoked")
    outcome = await executor.execute(CTX, call("fs_read", path="a.txt"))
    assert outcome.status is ToolStatus.DENIED and not outcome.from_cache


async def test_batch_cancellation_cancels_every_call(workspace_base: Path) -> None:
    executor = make_executor(workspace_base)
    tool = SleepTool()
    add_tool(executor, "sleep", tool)
    task = asyncio.create_task(executor.execute_batch(CTX, [call("sleep", call_id=f"c{i}", ms=5000)
                                                            for i in range(3)]))
    assert await wait_until(lambda: tool.running == 3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert tool.running == 0


async def test_oversized_batch_is_invalid_argument(workspace_base: Path) -> None:
    from services.common.errors import InvalidArgument
    executor = make_executor(workspace_base, limits=ExecutorLimits(max_batch_calls=2))
    with pytest.raises(InvalidArgument) as err:
        await executor.execute_batch(CTX, [call("fs_list", call_id=f"c{i}") for i in range(3)])
    assert err.value.field == "calls"


def test_risk_levels_of_builtins(workspace_base: Path) -> None:
    executor = make_executor(workspace_base)
    risks = {s.name: s.risk_level for s in executor.registry.list()}
    assert risks["fs_read"] is RiskLevel.READ_ONLY and risks["fs_write"] is RiskLevel.WRITE
    assert risks["shell_exec"] is RiskLevel.DANGEROUS
