"""The store port's parts for several orchestrator replicas: fenced appends and session controls.

`ReplicaStoreContract` is mixed into the contract test module beside
`StoreContract`, so it runs against the same stores.
"""
from __future__ import annotations

import asyncio

import pytest

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.orchestrator.core.ports import ControlsLive, MessageRecord, SessionControl, StorePort
from tests.orchestrator.store_contract import DEADLINE_S, OTHER_TENANT, TENANT, event, lock, new_session, unlock


class ReplicaStoreContract:
    # ---- fencing -------------------------------------------------------------------------------
    async def test_appends_of_a_holder_whose_lock_changed_hands_are_refused_and_write_nothing(self, store: StorePort):
        sid = await new_session(store)
        old = await lock(store, sid, "owner-a")
        assert await store.append_events(request_id="", tenant_id=TENANT, session_id=sid,
                                          events=[event("turn_started")], idempotency_keys=["a1"],
                                          fencing_token=old.fencing_token) == [1]
        assert await store.append_messages(request_id="m1", tenant_id=TENANT, session_id=sid,
                                           messages=[MessageRecord(role="user", content="hi")],
                                           fencing_token=old.fencing_token) == [1]
        assert await unlock(store, sid, "owner-a")
        new = await lock(store, sid, "owner-b")
        stale_writes = [
            store.append_events(request_id="", tenant_id=TENANT, session_id=sid, events=[event("final", "late")],
                                idempotency_keys=["a2"], fencing_token=old.fencing_token),
            store.append_messages(request_id="m2", tenant_id=TENANT, session_id=sid,
                                  messages=[MessageRecord(role="assistant", content="late")],
                                  fencing_token=old.fencing_token)]
        for stale in stale_writes:
            with pytest.raises(FailedPrecondition) as err:
                await stale
            assert err.value.reason == "STALE_LOCK_OWNER" and err.value.field == "fencing_token"
        assert await store.append_events(request_id="", tenant_id=TENANT, session_id=sid,
                                          events=[event("error", run_id="run-2")], idempotency_keys=["b1"],
                                          fencing_token=new.fencing_token) == [2]
        # A writer that names no token is not fenced (stores older than fencing, tools).
        assert await store.append_events(request_id="", tenant_id=TENANT, session_id=sid,
                                          events=[event("token")], idempotency_keys=["c1"]) == [3]
        stored = await store.read_events(tenant_id=TENANT, session_id=sid, after_seq=0)
        assert [(e.seq, e.type) for e in stored] == [(1, "turn_started"), (2, "error"), (3, "token")]
        messages = await store.list_messages(tenant_id=TENANT, session_id=sid, after_position=0)
        assert [m.content for m in messages] == ["hi"]

    async def test_a_token_of_a_session_never_locked_is_stale(self, store: StorePort):
        sid = await new_session(store)
        with pytest.raises(FailedPrecondition) as err:
            await store.append_events(request_id="", tenant_id=TENANT, session_id=sid, events=[event("token")],
                                      idempotency_keys=["k"], fencing_token=1)
        assert err.value.reason == "STALE_LOCK_OWNER"
        assert await store.read_events(tenant_id=TENANT, session_id=sid, after_seq=0) == []

    async def test_a_refused_lock_names_its_holder(self, store: StorePort):
        sid = await new_session(store)
        await lock(store, sid, "owner-a")
        refused = await lock(store, sid, "owner-b")
        assert not refused.acquired and refused.holder_id == "owner-a"

    # ---- session controls ----------------------------------------------------------------------
    async def test_a_control_is_stored_once_per_request_and_followed_from_now(self, store: StorePort):
        sid = await new_session(store)
        watch = store.watch_session_controls(from_now=True)
        try:
            live = await asyncio.wait_for(anext(watch), DEADLINE_S)
            assert isinstance(live, ControlsLive)
            first = await store.post_session_control(request_id="cancel-1", control=SessionControl(
                tenant_id=TENANT, session_id=sid, kind="cancel", run_id="run-1", payload={"reason": "user"}))
            assert first.seq > live.seq and first.create_time > 0
            assert (first.kind, first.run_id, first.payload) == ("cancel", "run-1", {"reason": "user"})
            again = await store.post_session_control(request_id="cancel-1", control=SessionControl(
                tenant_id=TENANT, session_id=sid, kind="cancel", payload={"reason": "retried"}))
            assert again == first
            followed = await asyncio.wait_for(anext(watch), DEADLINE_S)
            assert followed == first
        finally:
            await watch.aclose()

    async def test_a_watch_after_a_seq_replays_then_follows_filtered_by_tenant_and_session(self, store: StorePort):
        sid, other_sid = await new_session(store), await new_session(store)
        elsewhere = await new_session(store, OTHER_TENANT)
        posted = [await store.post_session_control(request_id="", control=SessionControl(
            tenant_id=tenant, session_id=session, kind="approval", payload={"approval_id": f"a{i}"}))
            for i, (tenant, session) in enumerate([(TENANT, sid), (OTHER_TENANT, elsewhere), (TENANT, other_sid),
                                                   (TENANT, sid)])]
        everything = store.watch_session_controls(after_seq=posted[0].seq)
        one_session = store.watch_session_controls(after_seq=posted[0].seq, tenant_id=TENANT, session_id=sid)
        try:
            for watch in (everything, one_session):
                live = await asyncio.wait_for(anext(watch), DEADLINE_S)
                assert isinstance(live, ControlsLive) and live.seq >= posted[-1].seq
            assert [await asyncio.wait_for(anext(everything), DEADLINE_S) for _ in range(3)] == posted[1:]
            assert await asyncio.wait_for(anext(one_session), DEADLINE_S) == posted[3]
            later = await store.post_session_control(request_id="", control=SessionControl(
                tenant_id=TENANT, session_id=sid, kind="cancel", payload={}))
            assert await asyncio.wait_for(anext(one_session), DEADLINE_S) == later
            assert await asyncio.wait_for(anext(everything), DEADLINE_S) == later
        finally:
            await everything.aclose()
            await one_session.aclose()

    async def test_a_control_of_an_unknown_kind_or_session_is_refused(self, store: StorePort):
        sid = await new_session(store)
        with pytest.raises(InvalidArgument) as err:
            await store.post_session_control(request_id="", control=SessionControl(
                tenant_id=TENANT, session_id=sid, kind="pause"))
        assert err.value.field == "control.kind"
        with pytest.raises(NotFound):
            await store.post_session_control(request_id="", control=SessionControl(
                tenant_id=OTHER_TENANT, session_id=sid, kind="cancel"))
