"""Store-wide feeds: replay after a seq, then follow, across store replicas.

A feed is a table whose rows carry a seq handed out by one counter row
(``store_counters``), taken with a row lock in the writing transaction, so
seqs follow commit order: once seq N is known committed, every seq below N
is committed too. Watchers of a feed share one `WatchHub` channel,
``("", feed)``; this process's commits publish on it at once, and the
`ReplicaCommitPoller` of the feed hub publishes the counter's value as
another replica moves it.
"""
from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeVar

from services.store.core.watch_hub import WatchHub

#: The channel tenant of every feed (a tenant id is never empty).
FEED_CHANNEL = ""
#: Feed names; each is also the name of its counter row.
APPROVALS_FEED = "approvals"
CONTROLS_FEED = "session_controls"

Row = TypeVar("Row")


async def follow_feed(hub: WatchHub, feed: str, head: Callable[[], Awaitable[int]],
                      read_after: Callable[[int, int], Awaitable[Sequence[Row]]], seq_of: Callable[[Row], int],
                      after: int, from_now: bool, batch: int = 500) -> AsyncIterator[tuple[Row | None, int]]:
    """``(None, current seq)`` once the watch is live, then ``(row, its seq)`` in seq order until closed.

    ``head()`` reads the feed's counter; ``read_after(seq, limit)`` the rows
    past ``seq`` (a filtered watch reads only its own). Replays the rows after
    ``after``, or none with ``from_now``, then follows.
    """
    with hub.subscribe(FEED_CHANNEL, feed) as subscription:
        current = await head()
        hub.publish(FEED_CHANNEL, feed, current)  # committed: other watchers may rely on it too
        cursor = current if from_now else after
        yield None, current
        while not hub.closed:
            # Every seq up to a published one is committed (seqs follow commit
            # order), so once the rows past the cursor are read, the cursor may
            # move up to it even where no row of this watch (or none left by
            # retention) carries that seq.
            known = subscription.last_seq
            rows = await read_after(cursor, batch)
            for row in rows:
                yield row, seq_of(row)
                cursor = seq_of(row)
            if len(rows) == batch:
                continue
            cursor = max(cursor, known)
            await subscription.wait_beyond(cursor, None)
