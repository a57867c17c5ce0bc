"""request_id idempotency: a retried RPC gets the first attempt's answer, not a second run."""
from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class RequestReplay(Generic[T]):
    """Remembers the last ``max_entries`` answers by key; joins a run still in flight."""

    def __init__(self, max_entries: int = 1024) -> None:
        self.max_entries = max_entries
        self.done: OrderedDict[Hashable, T] = OrderedDict()
        self.in_flight: dict[Hashable, asyncio.Future[T]] = {}

    async def run(self, key: Hashable | None, work: Callable[[], Awaitable[T]]) -> T:
        if key is None:
            return await work()
        if key in self.done:
            self.done.move_to_end(key)
            return self.done[key]
        if key in self.in_flight:
            return await asyncio.shield(self.in_flight[key])
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self.in_flight[key] = future
        try:
            result = await work()
        except BaseException as exc:
            # A failed or cancelled attempt is not remembered: the retry runs afresh.
            if isinstance(exc, Exception):
                future.set_exception(exc)
                future.exception()  # joiners re-raise it; nobody else needs to
            else:
                future.cancel()
            raise
        finally:
            self.in_flight.pop(key, None)
        future.set_result(result)
        self.done[key] = result
        while len(self.done) > self.max_entries:
            self.done.popitem(last=False)
        return result
