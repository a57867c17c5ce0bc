"""Refused calls: counted in metrics and written to the audit trail.

Every refusal by authentication or authorisation is counted at once
(``llmesh_auth_refusals_total``). For the audit trail, identical refusals
(same method, reason, caller and peer host) are coalesced for up to
``flush_interval_s`` into one entry with a count, and sent in one batch to
the policy service, which owns the audit chains. A flood of bad calls thus
costs its sender, not the audit trail: the number of distinct entries held
is bounded, and what exceeds it is counted as dropped, never queued.
"""
from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter

log = logging.getLogger("llmesh.auth")

REFUSALS = Counter("llmesh_auth_refusals_total", "Calls refused by authentication or authorisation.",
                   ["service", "method", "reason", "caller"])
AUDIT_DROPPED = Counter("llmesh_auth_refusals_unaudited_total",
                        "Refusals not written to the audit trail (buffer full or policy unreachable).", ["service"])


@dataclass(frozen=True)
class Denial:
    service: str
    method: str
    reason: str
    caller: str
    tenant_id: str
    key_id: str
    peer: str


@dataclass
class DenialCount:
    denial: Denial
    count: int
    first_time: float

    def payload(self) -> dict[str, Any]:
        """The audit entry's fields (the same the policy service makes from the RPC)."""
        d = self.denial
        first = datetime.datetime.fromtimestamp(self.first_time, datetime.UTC).isoformat().replace("+00:00", "Z")
        return {"service": d.service, "method": d.method, "reason": d.reason, "caller": d.caller,
                "tenant_id": d.tenant_id, "key_id": d.key_id, "peer": d.peer, "count": self.count,
                "first_time": first}


Sink = Callable[[list[DenialCount]], Awaitable[None]]


class RefusalReporter:
    """Counts refusals and hands coalesced batches to ``sink`` (policy's RecordAccessDenials)."""

    def __init__(self, service: str, sink: Sink | None = None, *, flush_interval_s: float = 1.0,
                 max_pending: int = 1000, clock: Callable[[], float] = time.time) -> None:
        self.service = service
        self.sink = sink
        self.flush_interval_s = flush_interval_s
        self.max_pending = max_pending
        self._clock = clock
        self._pending: dict[Denial, DenialCount] = {}
        self._task: asyncio.Task[None] | None = None

    def report(self, method: str, reason: str, caller: str = "", tenant_id: str = "", key_id: str = "",
               peer: str = "") -> None:
        REFUSALS.labels(self.service, method, reason, caller or "unauthenticated").inc()
        log.warning("refused %s: %s", method, reason,
                    extra={"event": "auth_refused", "method": method, "reason": reason, "caller": caller,
                           "tenant_id": tenant_id, "peer": peer})
        if self.sink is None:
            return
        denial = Denial(self.service, method, reason, caller, tenant_id, key_id, peer)
        held = self._pending.get(denial)
        if held is not None:
            held.count += 1
        elif len(self._pending) >= self.max_pending:
            AUDIT_DROPPED.labels(self.service).inc()
        else:
            self._pending[denial] = DenialCount(denial, 1, self._clock())

    def start(self) -> None:
        if self.sink is not None and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"refusals-{self.service}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.flush()

    async def flush(self) -> None:
        if not self._pending or self.sink is None:
            return
        batch, self._pending = list(self._pending.values()), {}
        try:
            await self.sink(batch)
        except Exception as exc:  # the audit trail being away must not stop refusing calls
            AUDIT_DROPPED.labels(self.service).inc(sum(d.count for d in batch))
            log.warning("could not write %d refusals to the audit trail: %s", len(batch), exc,
                        extra={"event": "auth_refusals_unaudited"})

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval_s)
            await self.flush()


def grpc_sink(open_channel: Callable[[], Any]) -> Sink:
    """A sink sending batches to the policy service's RecordAccessDenials over a channel opened on first use."""
    from google.protobuf import timestamp_pb2
    from llmesh.policy.v1 import policy_pb2, policy_pb2_grpc

    state: dict[str, Any] = {}

    async def send(batch: list[DenialCount]) -> None:
        if "stub" not in state:
            state["stub"] = policy_pb2_grpc.PolicyServiceStub(open_channel())
        denials = []
        for item in batch:
            d = item.denial
            first = timestamp_pb2.Timestamp()
            first.FromNanoseconds(int(item.first_time * 1e9))
            denials.append(policy_pb2.AccessDenial(service=d.service, method=d.method, reason=d.reason,
                                                   caller=d.caller, tenant_id=d.tenant_id, key_id=d.key_id,
                                                   peer=d.peer, count=item.count, first_time=first))
        await state["stub"].RecordAccessDenials(policy_pb2.RecordAccessDenialsRequest(denials=denials), timeout=5.0)

    return send
