"""Wakes watch streams when what they follow commits (no polling).

A channel is named by a pair of strings: (tenant_id, session_id) for a
session's events (WatchEvents), or ("", feed) for a store-wide feed whose
seqs come from one counter (approvals, session controls; see core/feeds.py).
A watcher subscribes *before* it reads the database, so a commit landing
between its read and its wait is still seen: the subscription remembers the
highest seq published since it was created.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

log = logging.getLogger("llmesh.store.watch")


@dataclass(eq=False)
class _Channel:
    last_seq: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    num_watchers: int = 0


class Subscription:
    def __init__(self, hub: WatchHub, channel: _Channel) -> None:
        self._hub = hub
        self._channel = channel

    @property
    def last_seq(self) -> int:
        """The highest seq published on this channel: a committed one, seen by this process."""
        return self._channel.last_seq

    async def wait_beyond(self, seq: int, timeout_s: float | None) -> bool:
        """True once an event after ``seq`` has committed; False on timeout or close."""
        while not self._hub.closed:
            if self._channel.last_seq > seq:
                return True
            changed = self._channel.changed
            try:
                await asyncio.wait_for(changed.wait(), timeout_s)
            except TimeoutError:
                return False
        return False


class WatchHub:
    def __init__(self) -> None:
        self._channels: dict[tuple[str, str], _Channel] = {}
        # Kept as a count, not summed over the channels: the metrics endpoint
        # reads it from its own thread while the event loop changes the dict.
        self._num_watchers = 0
        self.closed = False

    @contextlib.contextmanager
    def subscribe(self, tenant_id: str, session_id: str) -> Iterator[Subscription]:
        key = (tenant_id, session_id)
        channel = self._channels.setdefault(key, _Channel())
        channel.num_watchers += 1
        self._num_watchers += 1
        try:
            yield Subscription(self, channel)
        finally:
            channel.num_watchers -= 1
            self._num_watchers -= 1
            if channel.num_watchers == 0:
                self._channels.pop(key, None)

    def publish(self, tenant_id: str, session_id: str, last_seq: int) -> None:
        channel = self._channels.get((tenant_id, session_id))
        if channel is None or last_seq <= channel.last_seq:
            return  # nothing new: waking every watcher for it would be wasted work
        channel.last_seq = last_seq
        # Swap the event so later waiters block until the next commit.
        changed, channel.changed = channel.changed, asyncio.Event()
        changed.set()

    def close(self) -> None:
        self.closed = True
        for channel in self._channels.values():
            channel.changed.set()

    def watchers_of(self, tenant_id: str, session_id: str) -> int:
        """Subscriptions of one channel (a single dict read: safe from the metrics thread)."""
        channel = self._channels.get((tenant_id, session_id))
        return channel.num_watchers if channel is not None else 0

    @property
    def num_watched_sessions(self) -> int:
        return len(self._channels)

    def watched(self) -> list[tuple[str, str]]:
        return list(self._channels)

    @property
    def num_watchers(self) -> int:
        return self._num_watchers


class ReplicaCommitPoller:
    """Sees commits of other store replicas, for all watchers of a hub at once.

    Local commits wake watchers through ``publish`` right away. Commits by
    another replica are found by one query per interval that reads the last
    seq of every watched channel (a session's last event seq, a feed's
    counter), so the cost grows with watched channels, not with subscribers,
    and idle watchers never read the tables they follow.
    """

    def __init__(self, hub: WatchHub,
                 last_seqs: Callable[[list[tuple[str, str]]], Awaitable[dict[tuple[str, str], int]]],
                 interval_s: float, name: str = "watch-replica-poller") -> None:
        self._hub = hub
        self._name = name
        self._last_seqs = last_seqs
        self._interval_s = interval_s
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.num_polls = 0

    def start(self) -> None:
        if self._interval_s > 0:
            self._task = asyncio.create_task(self._run(), name=self._name)

    async def close(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    async def poll_once(self) -> None:
        keys = self._hub.watched()
        if not keys:
            return
        self.num_polls += 1
        for (tenant_id, session_id), seq in (await self._last_seqs(keys)).items():
            self._hub.publish(tenant_id, session_id, seq)

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), self._interval_s)
                return
            except TimeoutError:
                pass
            try:
                await self.poll_once()
            except Exception:
                log.warning("watch poll failed", exc_info=True)
