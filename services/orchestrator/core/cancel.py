"""Cancellation tokens: a run stops because someone asked, not because a loop looked."""
from __future__ import annotations

import asyncio
from collections.abc import Callable


class CancelToken:
    def __init__(self) -> None:
        self._event = asyncio.Event()
        self._callbacks: list[Callable[[], object]] = []
        self.reason = ""

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def cancel(self, reason: str = "cancelled") -> bool:
        """Fire once; returns False if the token had already fired."""
        if self._event.is_set():
            return False
        self.reason = reason
        self._event.set()
        for callback in self._callbacks:
            callback()
        return True

    def on_cancel(self, callback: Callable[[], object]) -> None:
        """Run `callback` when the token fires (at once if it already has)."""
        if self._event.is_set():
            callback()
        else:
            self._callbacks.append(callback)

    async def wait(self) -> None:
        await self._event.wait()
