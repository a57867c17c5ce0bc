"""Wakes WatchEvents streams when their session's events commit (no polling).

A watcher subscribes *before* it reads the database, so a commit landing
between its read and its wait is still seen: the subscription remembers the
highest seq published since it was created.
"""
from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Iterator


@dataclass(eq=False)
class _Channel:
    last_seq: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    num_watchers: int = 0


class Subscription:
    def __init__(self, hub: "WatchHub", channel: _Channel) -> None:
        self._hub = hub
        self._channel = channel

    async def wait_beyond(self, seq: int, timeout_s: float | None) -> bool:
        """True once an event after ``seq`` has committed; False on timeout or close."""
        while not self._hub.closed:
            if self._channel.last_seq > seq:
                return True
            changed = self._channel.changed
            try:
                await asyncio.wait_for(changed.wait(), timeout_s)
            except asyncio.TimeoutError:
                return False
        return False


class WatchHub:
    def __init__(self) -> None:
        self._channels: dict[tuple[str, str], _Channel] = {}
        self.closed = False

    @contextlib.contextmanager
    def subscribe(self, tenant_id: str, session_id: str) -> Iterator[Subscription]:
        key = (tenant_id, session_id)
        channel = self._channels.setdefault(key, _Channel())
        channel.num_watchers += 1
        try:
            yield Subscription(self, channel)
        finally:
            channel.num_watchers -= 1
            if channel.num_watchers == 0:
                self._channels.pop(key, None)

    def publish(self, tenant_id: str, session_id: str, last_seq: int) -> None:
        channel = self._channels.get((tenant_id, session_id))
        if channel is None:
            return
        channel.last_seq = max(channel.last_seq, last_seq)
        # Swap the event so later waiters block until the next commit.
        changed, channel.changed = channel.changed, asyncio.Event()
        changed.set()

    def close(self) -> None:
        self.closed = True
        for channel in self._channels.values():
            channel.changed.set()

    @property
    def num_watched_sessions(self) -> int:
        return len(self._channels)
