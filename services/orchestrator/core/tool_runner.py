"""ToolOrchestrator: one turn's tool calls, in parallel, with retries and approvals.

All calls of a turn go to the tools service in one `ExecuteTools` batch (it
runs them concurrently, each under its own timeout). Afterwards:
- a retryable tool that timed out or was unavailable runs again, with
  exponential backoff and jitter, up to the retry policy's attempts; so
  does any call that did not start because policy could not be checked;
- a call the policy wants approved emits `approval_required` and waits for
  `SubmitApproval`; approve-once/-session runs it again, deny turns it into
  a DENIED result, abort stops the run. Calls sharing an approval id (the
  same call repeated) emit one `approval_required` and wait on one answer.
Calls waiting for approval do not hold up the results of the others.
Cancelling the run cancels the outstanding RPCs and approval waits.
"""
from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from services.common.errors import Aborted, Unavailable
from services.orchestrator.core import events as ev
from services.orchestrator.core.approvals import ApprovalBook
from services.orchestrator.core.ports import (
    ABORT,
    DENY,
    STATUS_APPROVAL_REQUIRED,
    STATUS_DENIED,
    STATUS_TIMEOUT,
    STATUS_UNAVAILABLE,
    ToolInvocation,
    ToolOutcome,
    ToolSpec,
    ToolsPort,
)
from services.orchestrator.core.retry import RetryPolicy, with_retries

TRANSIENT_STATUSES = frozenset({STATUS_TIMEOUT, STATUS_UNAVAILABLE})
# Reasons the tools service gives when a call did not start: retrying cannot run it twice,
# so these are retried whether or not the tool is marked retryable.
NOT_STARTED_REASONS = frozenset({"POLICY_UNAVAILABLE"})
DEFAULT_RETRY = RetryPolicy()


class RunAborted(Aborted):
    default_reason = "APPROVAL_ABORTED"


@dataclass(frozen=True)
class ToolTurnContext:
    tenant_id: str
    session_id: str
    run_id: str
    step: int
    emit: Callable[[str, dict], object]


class ToolOrchestrator:
    def __init__(self, tools: ToolsPort, approvals: ApprovalBook, *, retry: RetryPolicy = DEFAULT_RETRY,
                 approval_timeout_s: float = 600.0, rng: random.Random | None = None) -> None:
        self._tools = tools
        self._approvals = approvals
        self._retry = retry
        self._approval_timeout_s = approval_timeout_s
        self._rng = rng or random.Random()

    async def run_calls(self, ctx: ToolTurnContext, calls: Sequence[ToolInvocation],
                        specs: dict[str, ToolSpec]) -> list[ToolOutcome]:
        for call in calls:
            ctx.emit(ev.TOOL_CALL, {"tool_call_id": call.call_id, "name": call.name,
                                    "arguments_json": call.arguments_json})
        first = await self._execute(ctx, list(calls), attempt=0)
        outcomes = await asyncio.gather(*(self._settle(ctx, call, outcome, specs.get(call.name))
                                          for call, outcome in zip(calls, first, strict=True)))
        return list(outcomes)

    async def _execute(self, ctx: ToolTurnContext, calls: list[ToolInvocation], attempt: int) -> list[ToolOutcome]:
        # The tools service dedups by request_id, so a retried batch after a lost reply is safe.
        request_id = f"{ctx.run_id}:{ctx.step}:{','.join(c.call_id for c in calls)}:{attempt}"
        return await with_retries(lambda: self._tools.execute_tools(
            request_id=request_id, tenant_id=ctx.tenant_id, session_id=ctx.session_id, calls=calls),
            self._retry, retry_on=(Unavailable,), rng=self._rng)

    async def _settle(self, ctx: ToolTurnContext, call: ToolInvocation, outcome: ToolOutcome,
                      spec: ToolSpec | None) -> ToolOutcome:
        attempts = 1
        while True:
            if self._retry_again(outcome, spec) and attempts < self._retry.max_attempts:
                await asyncio.sleep(self._retry.delay_s(attempts - 1, self._rng))
                attempts += 1
                (outcome,) = await self._execute(ctx, [call], attempt=attempts)
                continue
            if outcome.status == STATUS_APPROVAL_REQUIRED and outcome.approval_id:
                decision = await self._ask(ctx, call, outcome)
                if decision == ABORT:
                    raise RunAborted(f"approval {outcome.approval_id} was answered with abort")
                if decision == DENY:
                    outcome = replace(outcome, status=STATUS_DENIED, output="denied by a person",
                                      error_reason="APPROVAL_DENIED")
                    break
                attempts += 1
                (outcome,) = await self._execute(ctx, [replace(call, approval_id=outcome.approval_id)],
                                                 attempt=attempts)
                if outcome.status == STATUS_APPROVAL_REQUIRED:
                    # Approved yet asked again: do not loop on a confused policy.
                    outcome = replace(outcome, status=STATUS_DENIED, error_reason="APPROVAL_NOT_APPLIED")
                    break
                continue
            break
        outcome = replace(outcome, attempts=attempts)
        ctx.emit(ev.TOOL_RESULT, {"tool_call_id": call.call_id, "name": call.name, "status": outcome.status,
                                  "output": outcome.output, "truncated": outcome.truncated,
                                  "duration_ms": outcome.duration_ms, "from_cache": outcome.from_cache})
        return outcome

    @staticmethod
    def _retry_again(outcome: ToolOutcome, spec: ToolSpec | None) -> bool:
        if outcome.status not in TRANSIENT_STATUSES:
            return False
        return outcome.error_reason in NOT_STARTED_REASONS or (spec is not None and spec.retryable)

    async def _ask(self, ctx: ToolTurnContext, call: ToolInvocation, outcome: ToolOutcome) -> str:
        pending = self._approvals.open(ctx.tenant_id, ctx.session_id, outcome.approval_id)
        if pending.num_waiters == 1:
            # Policy gives identical calls of a session one approval id (a base model often repeats
            # a call in one reply): the person is asked once, and that answer releases them all.
            ctx.emit(ev.APPROVAL_REQUIRED, {"tool_call_id": call.call_id, "approval_id": outcome.approval_id,
                                            "name": call.name, "arguments_json": call.arguments_json,
                                            "justification": outcome.justification})
        try:
            # Shielded: calls sharing an approval id share the future; one timing out
            # or being cancelled must not decide for the others.
            return await asyncio.wait_for(asyncio.shield(pending.future), self._approval_timeout_s)
        except TimeoutError:
            return DENY
        finally:
            self._approvals.close(pending)
