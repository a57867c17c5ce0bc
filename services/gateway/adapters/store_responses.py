"""ResponseLog over llmesh.store.v1: a /v1/responses chain is a store session of the caller's tenant.

Calls run in the request's context, so the channel forwards the client's
principal and the store binds ``tenant_id`` to it: a chain id of another
tenant is simply not found. Items are the session's messages (the item as the
API shows it and the raw text the model saw ride in ``metadata_json``);
events are the session's events, appended with ``no_drop`` because live
readers have already seen them.
"""
from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from llmesh.store.v1 import store_pb2, store_pb2_grpc

from services.common.rpc_errors import domain_error_from_rpc
from services.gateway.core.ports import ChainLock, StoredEvent, StoredItem

PAGE = 500


def _item_message(item: StoredItem) -> store_pb2.Message:
    meta = {"response_id": item.response_id, "item": item.item, "input": item.is_input, "raw": item.raw}
    return store_pb2.Message(role=item.role, content=item.content,
                             metadata_json=json.dumps(meta, separators=(",", ":"), ensure_ascii=False))


def _message_item(message: store_pb2.Message) -> StoredItem:
    meta = json.loads(message.metadata_json or "{}")
    return StoredItem(role=message.role, content=message.content, response_id=str(meta.get("response_id", "")),
                      item=meta.get("item") or {}, is_input=bool(meta.get("input")), raw=str(meta.get("raw", "")))


def _event(event: store_pb2.Event) -> StoredEvent:
    return StoredEvent(event.seq, event.type, json.loads(event.payload or b"{}"))


class StoreResponseLog:
    def __init__(self, channel: grpc.aio.Channel, timeout_s: float = 30.0) -> None:
        self.stub = store_pb2_grpc.StoreServiceStub(channel)
        self.timeout_s = timeout_s

    async def _call(self, method: str, request: Any) -> Any:
        try:
            return await getattr(self.stub, method)(request, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as err:
            raise domain_error_from_rpc(err, service="store") from None

    async def create_chain(self, chain_id: str) -> None:
        await self._call("CreateSession", store_pb2.CreateSessionRequest(
            session_id=chain_id, title="responses", metadata_json='{"api":"responses"}'))

    async def lock(self, chain_id: str, owner: str, lease_ms: int) -> ChainLock:
        reply = await self._call("AcquireSessionLock", store_pb2.AcquireSessionLockRequest(
            session_id=chain_id, owner_id=owner, lease_ms=lease_ms))
        return ChainLock(reply.acquired, reply.fencing_token)

    async def unlock(self, chain_id: str, owner: str) -> None:
        await self._call("ReleaseSessionLock", store_pb2.ReleaseSessionLockRequest(session_id=chain_id,
                                                                                  owner_id=owner))

    async def append_items(self, chain_id: str, items: Sequence[StoredItem], fencing_token: int = 0) -> None:
        if items:
            await self._call("AppendMessages", store_pb2.AppendMessagesRequest(
                request_id="msgs-" + secrets.token_hex(8), session_id=chain_id,
                messages=[_item_message(i) for i in items], fencing_token=fencing_token))

    async def list_items(self, chain_id: str) -> list[StoredItem]:
        items: list[StoredItem] = []
        token = ""
        while True:
            reply = await self._call("ListMessages", store_pb2.ListMessagesRequest(
                session_id=chain_id, page_size=PAGE, page_token=token))
            items.extend(_message_item(m) for m in reply.messages)
            token = reply.next_page_token
            if not token:
                return items

    async def append_events(self, chain_id: str, events: Sequence[tuple[str, dict[str, Any]]]) -> list[int]:
        if not events:
            return []
        reply = await self._call("AppendEvents", store_pb2.AppendEventsRequest(
            request_id="evts-" + secrets.token_hex(8), session_id=chain_id, no_drop=True,
            events=[store_pb2.Event(type=kind, payload=json.dumps(payload, separators=(",", ":"),
                                                                  ensure_ascii=False).encode())
                    for kind, payload in events]))
        return list(reply.seqs)

    async def read_events(self, chain_id: str, after_seq: int = 0) -> list[StoredEvent]:
        events: list[StoredEvent] = []
        token = ""
        while True:
            reply = await self._call("ReadEvents", store_pb2.ReadEventsRequest(
                session_id=chain_id, after_seq=after_seq, page_size=PAGE, page_token=token))
            events.extend(_event(e) for e in reply.events)
            token = reply.next_page_token
            if not token:
                return events

    async def watch_events(self, chain_id: str, after_seq: int) -> AsyncIterator[StoredEvent]:
        call = self.stub.WatchEvents(store_pb2.WatchEventsRequest(session_id=chain_id, after_seq=after_seq))
        try:
            async for reply in call:
                yield _event(reply.event)
        except grpc.aio.AioRpcError as err:
            raise domain_error_from_rpc(err, service="store") from None
        finally:
            call.cancel()
