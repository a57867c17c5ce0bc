"""Request merging: one engine stream broadcast to every identical request.

A ``SharedDecode`` pumps one engine handle into a replay log; each waiter
reads the log from the start at its own pace, so a request that joins late
still sees the whole stream. A waiter that leaves stops reading; the engine
request is cancelled only when the last waiter has left.
"""
from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from services.inference.core.types import Delta, FinishReason, Priority


class DeltaStream(Protocol):
    """What the servicer iterates: deltas until one carries finish_reason; cancel() when leaving."""

    def __aiter__(self) -> AsyncIterator[Delta]: ...

    def cancel(self) -> None: ...


class SharedDecode:
    def __init__(self, upstream: DeltaStream, on_done: Callable[[SharedDecode], None]) -> None:
        self.deltas: list[Delta] = []
        self.error: BaseException | None = None
        self.done = False
        #: No waiter is left and the engine request was cancelled: nobody may join.
        self.abandoned = False
        self.num_waiters = 0
        self._upstream = upstream
        self._on_done = on_done
        self._done_callbacks: list[Callable[[SharedDecode], None]] = []
        #: Set once a semantic-cache store is registered, so joiners do not store it again.
        self.semantic_store_registered = False
        self._changed = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._pump())

    @property
    def completed(self) -> bool:
        """Finished normally (stop or length): the answer is whole and may be reused."""
        return (self.done and self.error is None and bool(self.deltas)
                and self.deltas[-1].finish_reason in (FinishReason.STOP, FinishReason.LENGTH))

    def join(self, merged: bool, priority: Priority | None = None) -> MergedWaiter:
        """A new waiter; a more urgent one lifts the shared request's class while it still waits."""
        self.num_waiters += 1
        promote = getattr(self._upstream, "promote", None)
        if priority is not None and promote is not None and not self.done:
            promote(priority)
        return MergedWaiter(self, merged)

    async def _pump(self) -> None:
        try:
            async for delta in self._upstream:
                self.deltas.append(delta)
                self._publish()
        except Exception as exc:
            self.error = exc
        finally:
            self.done = True
            self._publish()
            self._on_done(self)
            for callback in self._done_callbacks:
                callback(self)

    def add_done_callback(self, callback: Callable[[SharedDecode], None]) -> None:
        """Call ``callback(self)`` when the stream ends (at once if it already has)."""
        if self.done:
            callback(self)
        else:
            self._done_callbacks.append(callback)

    def _publish(self) -> None:
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    async def changed(self) -> None:
        await self._changed.wait()

    def leave(self) -> None:
        self.num_waiters -= 1
        if self.num_waiters == 0 and not self.done:
            self.abandoned = True
            self._upstream.cancel()


class MergedWaiter:
    """One request's view of a shared decode, from the first delta on."""

    def __init__(self, shared: SharedDecode, merged: bool) -> None:
        self._shared = shared
        self._merged = merged
        self._position = 0
        self._finished = False
        self._left = False

    @property
    def shared(self) -> SharedDecode:
        return self._shared

    def __aiter__(self) -> MergedWaiter:
        return self

    async def __anext__(self) -> Delta:
        shared = self._shared
        while not self._finished:
            if self._position < len(shared.deltas):
                delta = shared.deltas[self._position]
                self._position += 1
                self._finished = delta.finish_reason is not None
                return dataclasses.replace(delta, merged=True) if self._merged else delta
            if shared.done:
                self._finished = True
                if shared.error is not None:
                    raise shared.error
                break
            await shared.changed()
        raise StopAsyncIteration

    def cancel(self) -> None:
        if not self._left:
            self._left = True
            self._finished = True
            self._shared.leave()
