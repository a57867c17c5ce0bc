"""The store-backed book's watch: live marker, resuming after the last change seen, starting over when refused.

The store's side is a scripted stub here, so each reconnect can be checked
request by request; the real stream is covered by test_shared_approvals.
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
from llmesh.store.v1 import store_pb2

from services.policy.adapters.store_approvals import StoreApprovalBook
from tests.support.waiting import wait_until

WAIT_S = 10.0
#: In a script: the stream stays open (until the test ends).
FOREVER = object()


def _grant(approval_id: str, change_seq: int, subject_key: str) -> store_pb2.WatchApprovalsResponse:
    return store_pb2.WatchApprovalsResponse(change_seq=change_seq, approval=store_pb2.Approval(
        tenant_id="acme", session_id="s1", approval_id=approval_id, subject_key=subject_key,
        state="approved_session", approver="ana", change_seq=change_seq))


def _failure(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="scripted")


class _ScriptedCall:
    def __init__(self, replies: list[object]) -> None:
        self.replies = replies

    def __aiter__(self) -> AsyncIterator[store_pb2.WatchApprovalsResponse]:
        return self._replies()

    async def _replies(self) -> AsyncIterator[store_pb2.WatchApprovalsResponse]:
        for reply in self.replies:
            if isinstance(reply, BaseException):
                raise reply
            if isinstance(reply, asyncio.Event):
                await reply.wait()
                continue
            assert isinstance(reply, store_pb2.WatchApprovalsResponse)
            yield reply

    def cancel(self) -> bool:
        return True


class _ScriptedStore:
    """WatchApprovals answers from a script, one list of replies per connection."""

    def __init__(self, scripts: list[list[object]]) -> None:
        self.scripts = scripts
        self.requests: list[store_pb2.WatchApprovalsRequest] = []
        self.connected = asyncio.Event()

    def WatchApprovals(self, request: store_pb2.WatchApprovalsRequest) -> _ScriptedCall:
        self.requests.append(request)
        if len(self.requests) == len(self.scripts):
            self.connected.set()
        return _ScriptedCall(self.scripts[min(len(self.requests), len(self.scripts)) - 1])


@contextlib.asynccontextmanager
async def _followed(scripts: list[list[object]]) -> AsyncIterator[tuple[StoreApprovalBook, _ScriptedStore]]:
    """A book following the scripted store, once it made its last scripted connection."""
    forever = asyncio.Event()
    scripts = [[forever if reply is FOREVER else reply for reply in script] for script in scripts]
    async with grpc.aio.insecure_channel("127.0.0.1:1") as channel:
        book = StoreApprovalBook(channel)
        store = _ScriptedStore(scripts)
        book._stub = store
        book.start()
        try:
            await asyncio.wait_for(store.connected.wait(), WAIT_S)
            yield book, store
        finally:
            forever.set()
            await book.close()


async def test_the_watch_resumes_after_the_last_change_it_saw() -> None:
    async with _followed([
        [store_pb2.WatchApprovalsResponse(change_seq=5), _grant("a1", 6, "command:make build"),
         _failure(grpc.StatusCode.UNAVAILABLE)],
        [store_pb2.WatchApprovalsResponse(change_seq=6), _grant("a2", 9, "command:make test"), FOREVER],
    ]) as (book, store):
        await asyncio.wait_for(book.watch_live.wait(), WAIT_S)
        first, second = store.requests
        assert first.from_now and first.after_change_seq == 0
        assert not second.from_now and second.after_change_seq == 6
        assert book.grants.covers("acme", "s1", "command:make build")
        assert await wait_until(lambda: book.grants.covers("acme", "s1", "command:make test"), WAIT_S)
        assert book.watched_change_seq == 9


async def test_a_refused_position_starts_over_at_the_current_end() -> None:
    async with _followed([
        [store_pb2.WatchApprovalsResponse(change_seq=5), _grant("a1", 6, "command:make build"),
         _failure(grpc.StatusCode.UNAVAILABLE)],
        [_failure(grpc.StatusCode.INVALID_ARGUMENT)],
        [store_pb2.WatchApprovalsResponse(change_seq=40), FOREVER],
    ]) as (book, store):
        await asyncio.wait_for(book.watch_live.wait(), WAIT_S)
        assert [(r.from_now, r.after_change_seq) for r in store.requests] == [(True, 0), (False, 6), (True, 0)]
        assert book.watched_change_seq == 40
