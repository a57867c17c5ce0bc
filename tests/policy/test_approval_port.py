"""The ApprovalPort contract, passed alike by the in-process book and the store-backed one (a real store)."""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from services.common.errors import FailedPrecondition, NotFound
from services.policy.core.approvals import STATE_CHANGED, ApprovalBook, ApprovalPort, ApprovalState
from tests.policy.replicas import running_store, store_approval_book
from tests.support.waiting import wait_until

PENDING, ONCE, CONSUMED = ApprovalState.PENDING, ApprovalState.APPROVED_ONCE, ApprovalState.CONSUMED
SESSION, DENIED = ApprovalState.APPROVED_SESSION, ApprovalState.DENIED

BookFactory = Callable[..., contextlib.AbstractAsyncContextManager[ApprovalPort]]


@pytest.fixture(params=["memory", "store"])
async def books(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BookFactory]:
    """Makes books with a given ttl_s; store books all share one store."""
    if request.param == "memory":
        @contextlib.asynccontextmanager
        async def memory_book(ttl_s: float = 3600.0) -> AsyncIterator[ApprovalPort]:
            yield ApprovalBook(ttl_s=ttl_s)

        yield memory_book
        return
    async with running_store(tmp_path / "store") as store:
        def store_book(ttl_s: float = 3600.0) -> contextlib.AbstractAsyncContextManager[ApprovalPort]:
            return store_approval_book(store.target, ttl_s=ttl_s)

        yield store_book


@pytest.fixture
async def book(books: BookFactory) -> AsyncIterator[ApprovalPort]:
    async with books() as made:
        yield made


async def test_open_reuses_the_pending_approval_of_the_same_call(book: ApprovalPort) -> None:
    first = await book.open("acme", "s1", "shell:make build")
    again = await book.open("acme", "s1", "shell:make build")
    other_call = await book.open("acme", "s1", "shell:make deploy")
    other_session = await book.open("acme", "s2", "shell:make build")
    other_tenant = await book.open("globex", "s1", "shell:make build")
    assert first.state is PENDING and not first.approver and first.audit_seq == 0
    assert again.approval_id == first.approval_id
    ids = {first.approval_id, other_call.approval_id, other_session.approval_id, other_tenant.approval_id}
    assert len(ids) == 4
    got = await book.get("acme", "s1", first.approval_id)
    assert (got.approval_id, got.tenant_id, got.session_id, got.subject_key) == (
        first.approval_id, "acme", "s1", "shell:make build")


async def test_an_id_from_another_session_or_tenant_is_not_found(book: ApprovalPort) -> None:
    asked = await book.open("acme", "s1", "shell:make build")
    for tenant, session, approval_id in (("acme", "s2", asked.approval_id), ("globex", "s1", asked.approval_id),
                                         ("acme", "s1", "no-such-approval")):
        with pytest.raises(NotFound) as caught:
            await book.get(tenant, session, approval_id)
        assert caught.value.field == "approval_id"
        with pytest.raises(NotFound):
            await book.decide(tenant, session, approval_id, PENDING, DENIED, "eve", "r-eve")


async def test_session_grant_covers_its_call_in_its_session_only(book: ApprovalPort) -> None:
    asked = await book.open("acme", "s1", "shell:make build")
    assert not await book.session_allows("acme", "s1", "shell:make build")
    decided = await book.decide("acme", "s1", asked.approval_id, PENDING, SESSION, "ana", "r1")
    assert decided.approval.state is SESSION and decided.approval.approver == "ana" and not decided.replayed
    assert decided.approval.decided_request_id == "r1"
    assert await book.session_allows("acme", "s1", "shell:make build")
    assert not await book.session_allows("acme", "s1", "shell:make deploy")
    assert not await book.session_allows("acme", "s2", "shell:make build")
    assert not await book.session_allows("globex", "s1", "shell:make build")
    # The answered request is no longer pending: the same call opens a new one.
    assert (await book.open("acme", "s1", "shell:make build")).approval_id != asked.approval_id


async def test_a_change_needs_the_state_it_expects_and_replays_by_request_id(book: ApprovalPort) -> None:
    asked = await book.open("acme", "s1", "shell:make build")
    first = await book.decide("acme", "s1", asked.approval_id, PENDING, DENIED, "ana", "r1")
    retry = await book.decide("acme", "s1", asked.approval_id, PENDING, DENIED, "ana", "r1")
    assert retry.replayed and retry.approval.state is DENIED and retry.approval.approver == "ana"
    assert first.approval.state is DENIED
    with pytest.raises(FailedPrecondition) as caught:
        await book.decide("acme", "s1", asked.approval_id, PENDING, SESSION, "bob", "r2")
    assert caught.value.reason == STATE_CHANGED
    assert (await book.get("acme", "s1", asked.approval_id)).approver == "ana"


async def test_an_approve_once_grant_is_used_up_by_one_of_racing_calls(book: ApprovalPort) -> None:
    asked = await book.open("acme", "s1", "shell:make build")
    await book.decide("acme", "s1", asked.approval_id, PENDING, ONCE, "ana", "r1")
    results = await asyncio.gather(
        *(book.decide("acme", "s1", asked.approval_id, ONCE, CONSUMED, "", "") for _ in range(4)),
        return_exceptions=True)
    won = [r for r in results if not isinstance(r, BaseException)]
    lost = [r for r in results if isinstance(r, BaseException)]
    assert len(won) == 1 and won[0].approval.state is CONSUMED
    assert won[0].approval.approver == "ana"  # an empty approver keeps the one who answered
    assert all(isinstance(e, FailedPrecondition) and e.reason == STATE_CHANGED for e in lost)
    # Used up without a request_id: the answer's stays, so a retry of the answer is still recognised.
    stored = await book.get("acme", "s1", asked.approval_id)
    assert stored.state is CONSUMED and stored.decided_request_id == "r1"
    retry = await book.decide("acme", "s1", asked.approval_id, PENDING, ONCE, "ana", "r1")
    assert retry.replayed and retry.approval.state is ONCE


async def test_note_audit_keeps_the_seq_of_the_entry_that_logged_the_answer(book: ApprovalPort) -> None:
    asked = await book.open("acme", "s1", "shell:make build")
    await book.decide("acme", "s1", asked.approval_id, PENDING, SESSION, "ana", "r1")
    noted = await book.note_audit("acme", "s1", asked.approval_id, 42)
    assert noted.audit_seq == 42
    stored = await book.get("acme", "s1", asked.approval_id)
    assert (stored.state, stored.audit_seq, stored.decided_request_id) == (SESSION, 42, "r1")


async def test_an_unanswered_request_expires(books: BookFactory) -> None:
    async with books(ttl_s=0.2) as book:
        asked = await book.open("acme", "s1", "shell:make build")

        async def expired() -> bool:
            try:
                await book.get("acme", "s1", asked.approval_id)
            except NotFound:
                return True
            return False

        assert await wait_until(expired, timeout_s=10.0)
        with pytest.raises(NotFound):
            await book.decide("acme", "s1", asked.approval_id, PENDING, SESSION, "ana", "r1")
        assert (await book.open("acme", "s1", "shell:make build")).approval_id != asked.approval_id


async def test_a_book_sees_what_another_book_of_the_same_place_recorded(books: BookFactory) -> None:
    """Two store books are two replicas; the memory book is one process, so it is its own other."""
    async with books() as first:
        second_cm = books() if not isinstance(first, ApprovalBook) else contextlib.nullcontext(first)
        async with second_cm as second:
            asked = await first.open("acme", "s1", "shell:make build")
            assert (await second.open("acme", "s1", "shell:make build")).approval_id == asked.approval_id
            await second.decide("acme", "s1", asked.approval_id, PENDING, SESSION, "ana", "r1")
            assert await first.session_allows("acme", "s1", "shell:make build")
            assert (await first.get("acme", "s1", asked.approval_id)).state is SESSION
