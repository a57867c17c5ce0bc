"""Waiting for a condition another task or process makes true.

For a point that code under test reaches, prefer an ``asyncio.Event`` the
code sets (a fake's ``reached`` event, say): it orders tasks without any
clock. ``wait_until`` is for state that can only be observed, such as a
file appearing, a process exiting or a remote service's view changing.
"""
from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable

Predicate = Callable[[], bool | Awaitable[bool]]


async def _holds(predicate: Predicate) -> bool:
    result = predicate()
    if inspect.isawaitable(result):
        result = await result
    return bool(result)


async def wait_until(predicate: Predicate, timeout_s: float = 5.0, *, interval_s: float = 0.02) -> bool:
    """Whether ``predicate()`` (a plain or async callable) held within ``timeout_s``.

    The predicate is checked at once, every ``interval_s`` and one last time
    at the deadline. Callers assert on the result: ``assert await wait_until(...)``.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        if await _holds(predicate):
            return True
        remaining = deadline - loop.time()
        if remaining <= 0:
            return False
        await asyncio.sleep(min(interval_s, remaining))
