"""Session controls: Cancel and approval decisions for a run on whichever replica runs it.

A replica that receives Cancel or SubmitApproval for a session whose run is
not here posts a control record to the store. Every replica keeps one watch
on the store's controls (every tenant, from the end at start, resumed after
the last seq it saw when the stream breaks, with backoff) and applies those
meant for its own runs: a cancel fires the run's token, an approval resolves
the waiting call's future. Controls for runs elsewhere are ignored, so every
replica sees every control and exactly the one running the turn acts on it.

A cancel names the run (the client's run_id) or the lock holder the posting
replica saw, so a control that arrives late (after a reconnect) never stops
a later turn that took the lock anew.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections.abc import Callable

from services.common.errors import DomainError
from services.orchestrator.core.approvals import ApprovalBook
from services.orchestrator.core.ports import (
    APPROVAL_DECISIONS,
    CONTROL_APPROVAL,
    CONTROL_CANCEL,
    ControlsLive,
    SessionControl,
    StorePort,
)
from services.orchestrator.core.retry import RetryPolicy
from services.orchestrator.core.signals import NO_SIGNALS, Signals

log = logging.getLogger("llmesh.orchestrator.controls")

# Reconnects of the watch: 50 ms doubling to 2 s, full jitter.
WATCH_BACKOFF = RetryPolicy(max_attempts=1, base_delay_s=0.05, max_delay_s=2.0)


def _request_key(request_id: str, control: SessionControl) -> str:
    """The store's idempotency key of a control: the client's request_id (any text) with what it asks, hashed."""
    if not request_id:
        return ""
    asked = "\n".join([request_id, control.session_id, control.kind, control.run_id,
                        *(f"{k}={v}" for k, v in sorted(control.payload.items()) if k != "holder_id")])
    return f"{control.kind}:{hashlib.sha256(asked.encode()).hexdigest()[:40]}"


class SessionControls:
    def __init__(self, store: StorePort, *, cancel_run: Callable[[SessionControl], bool], approvals: ApprovalBook,
                 signals: Signals = NO_SIGNALS, backoff: RetryPolicy = WATCH_BACKOFF,
                 rng: random.Random | None = None) -> None:
        self._store = store
        self._cancel_run = cancel_run
        self._approvals = approvals
        self._signals = signals
        self._backoff = backoff
        self._rng = rng or random.Random()
        # Set while the watch is connected and following.
        self.live = asyncio.Event()
        # Set once the first connection attempt is over, live or not.
        self.first_attempt_done = asyncio.Event()
        # Seq of the last control seen; 0 until the watch was first live.
        self.cursor = 0
        self._ever_live = False
        self._task: asyncio.Task | None = None

    # ---- posting -------------------------------------------------------------------------------
    async def post_cancel(self, *, request_id: str, tenant_id: str, session_id: str, run_id: str,
                          holder_id: str) -> SessionControl:
        control = SessionControl(tenant_id=tenant_id, session_id=session_id, kind=CONTROL_CANCEL, run_id=run_id,
                                 payload={"reason": "cancelled by request", "holder_id": holder_id})
        return await self._post(request_id, control)

    async def post_approval(self, *, request_id: str, tenant_id: str, session_id: str, approval_id: str,
                            decision: str) -> SessionControl:
        control = SessionControl(tenant_id=tenant_id, session_id=session_id, kind=CONTROL_APPROVAL,
                                 payload={"approval_id": approval_id, "decision": decision})
        return await self._post(request_id, control)

    async def _post(self, request_id: str, control: SessionControl) -> SessionControl:
        posted = await self._store.post_session_control(request_id=_request_key(request_id, control),
                                                        control=control)
        self._signals.control(control.kind, "posted", None)
        return posted

    # ---- applying ------------------------------------------------------------------------------
    def apply(self, control: SessionControl) -> bool:
        """Act on a control if its run is here; whether it was."""
        if control.kind == CONTROL_CANCEL:
            applied = self._cancel_run(control)
        elif control.kind == CONTROL_APPROVAL:
            applied = self._resolve_approval(control)
        else:
            log.info("unknown session control kind ignored", extra={"kind": control.kind, "seq": control.seq})
            return False
        delay_s = max(0.0, time.time() - control.create_time) if applied and control.create_time else None
        self._signals.control(control.kind, "applied" if applied else "not_here", delay_s)
        if applied:
            log.info("session control applied", extra={"session_id": control.session_id, "kind": control.kind,
                                                       "seq": control.seq})
        return applied

    def _resolve_approval(self, control: SessionControl) -> bool:
        approval_id = str(control.payload.get("approval_id", ""))
        decision = str(control.payload.get("decision", ""))
        if not approval_id or decision not in APPROVAL_DECISIONS:
            return False
        pending = self._approvals.waiting(control.tenant_id, control.session_id, approval_id)
        if pending is None or pending.decided:
            return False
        self._approvals.resolve(pending, decision)
        return True

    # ---- the watch -----------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._follow(), name="session-controls")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self.live.clear()

    async def wait_first_attempt(self, timeout_s: float) -> bool:
        """Whether the watch got live within `timeout_s` (False: it went on trying in the background)."""
        try:
            await asyncio.wait_for(self.first_attempt_done.wait(), timeout_s)
        except TimeoutError:
            pass
        return self.live.is_set()

    async def _follow(self) -> None:
        num_failures = 0
        while True:
            try:
                await self._watch_once()
                reason = "the watch ended"
            except DomainError as exc:
                reason = exc.reason
            except Exception as exc:  # never let the one watch of the replica die
                log.exception("session control watch failed")
                reason = type(exc).__name__
            if self.live.is_set():
                num_failures = 0  # it was live: start the backoff over
            self.live.clear()
            self.first_attempt_done.set()
            if num_failures == 0:
                log.warning("session control watch lost; reconnecting", extra={"reason": reason,
                                                                               "after_seq": self.cursor})
            delay_s = self._backoff.delay_s(min(num_failures, 16), self._rng)
            num_failures += 1
            await asyncio.sleep(delay_s)

    async def _watch_once(self) -> None:
        from_now = not self._ever_live
        watch = self._store.watch_session_controls(after_seq=0 if from_now else self.cursor, from_now=from_now)
        try:
            async for item in watch:
                if isinstance(item, ControlsLive):
                    if from_now:
                        self.cursor = item.seq
                    self._ever_live = True
                    self.live.set()
                    self.first_attempt_done.set()
                    continue
                if item.seq <= self.cursor:
                    continue  # replayed twice across a reconnect
                self.cursor = item.seq
                try:
                    self.apply(item)
                except Exception:
                    log.exception("session control failed to apply", extra={"seq": item.seq})
        finally:
            aclose = getattr(watch, "aclose", None)
            if aclose is not None:
                await aclose()
