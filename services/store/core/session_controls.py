"""Session controls: requests for a session's run (cancel, an approval's answer), wherever it runs.

Any orchestrator replica posts them; the replica running the session follows
them with WatchSessionControls. Seqs come from one store-wide counter, so
watches replay and follow in commit order across store replicas
(core/feeds.py).
"""
from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from services.common.errors import PermissionDenied, require
from services.store.core import validation as check
from services.store.core.feeds import CONTROLS_FEED, FEED_CHANNEL, follow_feed
from services.store.core.models import NewSessionControl, SessionControlRecord
from services.store.core.ports import StoreRepository
from services.store.core.watch_hub import WatchHub


class SessionControlBoard:
    def __init__(self, repo: StoreRepository, hub: WatchHub, clock: Callable[[], int]) -> None:
        self.repo = repo
        self.hub = hub
        self.clock = clock

    async def post(self, request_id: str, tenant_id: str, session_id: str, kind: str, run_id: str,
                   payload_json: str, *, seq: int = 0, create_time_set: bool = False,
                   caller_tenant: str | None = None) -> SessionControlRecord:
        """Store a control (the first one, for a repeated ``request_id`` of the tenant).

        ``seq`` and the create time are the store's to assign: a request setting
        them is refused. ``caller_tenant``: the tenant of a client the call
        acts for (None for a mesh service acting for itself): it fills an
        empty ``control.tenant_id`` and may not be contradicted by it.
        """
        check.check_id(request_id, "request_id", required=False)
        require(seq == 0, "control.seq", "is assigned by the store; leave it 0")
        require(not create_time_set, "control.create_time", "is assigned by the store; leave it unset")
        if caller_tenant is not None:
            if tenant_id and tenant_id != caller_tenant:
                raise PermissionDenied("control.tenant_id names another tenant than the caller's",
                                       reason="TENANT_MISMATCH", field="control.tenant_id")
            tenant_id = caller_tenant
        check.check_id(tenant_id, "control.tenant_id")
        check.check_id(session_id, "control.session_id")
        control_kind = check.check_control_kind(kind, "control.kind")
        check.check_id(run_id, "control.run_id", required=False)
        check.check_json_object(payload_json, "control.payload_json")
        new = NewSessionControl(tenant_id, session_id, control_kind, run_id, payload_json, request_id)
        record, created = await self.repo.post_session_control(new, self.clock())
        if created:
            self.hub.publish(FEED_CHANNEL, CONTROLS_FEED, record.seq)
        return record

    async def watch(self, after_seq: int, from_now: bool, tenant_id: str, session_id: str, *,
                    all_tenants_allowed: bool) -> AsyncIterator[tuple[SessionControlRecord | None, int]]:
        """``(None, current seq)`` once live, then the matching controls after ``after_seq`` in order.

        An empty ``tenant_id`` follows every tenant's controls: only for mesh
        services (``all_tenants_allowed``), never for a client a call acts for.
        """
        check.check_seq(after_seq, "after_seq")
        require(not (from_now and after_seq), "after_seq", "must be 0 with from_now")
        if not tenant_id:
            if not all_tenants_allowed:
                raise PermissionDenied("an empty tenant_id follows every tenant: mesh services only",
                                       reason="ALL_TENANTS_NOT_ALLOWED", field="tenant_id")
            require(not session_id, "session_id", "needs tenant_id")
        else:
            check.check_id(tenant_id, "tenant_id")
        check.check_id(session_id, "session_id", required=False)

        async def head() -> int:
            return (await self.repo.feed_heads([(FEED_CHANNEL, CONTROLS_FEED)])).get((FEED_CHANNEL, CONTROLS_FEED), 0)

        async def read_after(seq: int, limit: int) -> list[SessionControlRecord]:
            return await self.repo.session_controls_after(seq, tenant_id, session_id, limit)

        async for item in follow_feed(self.hub, CONTROLS_FEED, head, read_after, lambda r: r.seq, after_seq,
                                      from_now):
            yield item
