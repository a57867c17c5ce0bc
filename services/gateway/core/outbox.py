"""What one streaming client is sent, in order, with back-pressure and once per event seq.

A bounded queue sits between the producers (an event stream of the
orchestrator, replies to the client's requests) and the one writer that
hands messages to the connection. When the client stops reading, the
connection's send blocks, the queue fills, and a producer's ``put`` waits:
the event stream is not read further until the client catches up. Nothing
is ever dropped to make room.

The outbox also keeps the seq of the last event it queued (the cursor), so
that an event already queued for this client (a replay overlapping a live
stream) is not sent twice.
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any


def encode(payload: Any) -> str:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False)


class Outbox:
    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError("an outbox holds at least one message")
        self._queue: asyncio.Queue[str] = asyncio.Queue(maxsize)
        # Seq of the last event queued; None until the client has a position in the session's log.
        self.cursor: int | None = None

    def qsize(self) -> int:
        return self._queue.qsize()

    async def put(self, payload: Any) -> None:
        """Queue a message; waits while the queue is full."""
        await self._queue.put(encode(payload))

    async def put_event(self, seq: int, payload: Any) -> bool:
        """Queue an event unless one at or before ``seq`` was queued already (False then).

        The cursor moves only once the event is queued, so a put cancelled
        while it waits leaves no gap. One producer of events at a time.
        """
        if self.cursor is not None and seq <= self.cursor:
            return False
        await self._queue.put(encode(payload))
        self.cursor = seq
        return True

    async def drain(self, send: Callable[[str], Awaitable[None]]) -> None:
        """Hand every queued message to ``send``, in order, one at a time; runs until cancelled or send fails."""
        while True:
            text = await self._queue.get()
            await send(text)
