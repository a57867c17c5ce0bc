"""Pure pieces of the core: paging tokens, retry policy, watch hub, validation."""
from __future__ import annotations

import asyncio

import pytest

from services.common.errors import InvalidArgument
from services.common.paging import decode_token, encode_token, page_limit
from services.store.core import validation
from services.store.core.models import NewEvent, TaskState
from services.store.core.task_policy import RetryPolicy
from services.store.core.watch_hub import WatchHub


def test_page_token_round_trip_and_scope() -> None:
    token = encode_token("events:a:s", 42)
    assert decode_token(token, "events:a:s") == 42
    with pytest.raises(InvalidArgument) as err:
        decode_token(token, "events:b:s")
    assert err.value.field == "page_token"
    with pytest.raises(InvalidArgument):
        decode_token("%%%not-base64", "x")
    assert page_limit(0) == 100 and page_limit(5000) == 1000
    with pytest.raises(InvalidArgument):
        page_limit(-1)


def test_retry_policy_backs_off_exponentially_then_dead_letters() -> None:
    policy = RetryPolicy(base_backoff_ms=100, max_backoff_ms=350)
    assert [policy.backoff_ms(a) for a in (1, 2, 3, 4)] == [100, 200, 350, 350]
    assert policy.after_failure(1, 3, False, 1000) == (TaskState.READY, 1100)
    assert policy.after_failure(3, 3, False, 1000) == (TaskState.DEAD, 1000)
    assert policy.after_failure(1, 3, True, 1000) == (TaskState.DEAD, 1000)


async def test_watch_hub_sees_commit_between_read_and_wait() -> None:
    hub = WatchHub()
    with hub.subscribe("t", "s") as sub:
        hub.publish("t", "s", 5)  # lands after the watcher's read of seq <= 4
        assert await sub.wait_beyond(4, timeout_s=0.01)
        waiter = asyncio.create_task(sub.wait_beyond(5, timeout_s=5))
        await asyncio.sleep(0.01)
        assert not waiter.done()
        hub.publish("t", "other", 9)
        await asyncio.sleep(0.01)
        assert not waiter.done()
        hub.publish("t", "s", 6)
        assert await waiter
    assert hub.num_watched_sessions == 0


def test_watcher_count_reads_safely_from_another_thread_while_watchers_come_and_go() -> None:
    """The metrics endpoint reads the count from its own thread while the event loop subscribes."""
    import contextlib
    import threading

    hub = WatchHub()
    errors: list[BaseException] = []
    done = threading.Event()

    def read_metrics() -> None:
        while not done.is_set():
            try:
                assert hub.num_watchers >= 0
            except BaseException as exc:
                errors.append(exc)
                return

    reader = threading.Thread(target=read_metrics)
    reader.start()
    try:
        for _ in range(20):
            with contextlib.ExitStack() as stack:
                for i in range(2_000):
                    stack.enter_context(hub.subscribe("t", f"s{i}"))
                assert hub.num_watchers == 2_000
            assert hub.num_watchers == 0
    finally:
        done.set()
        reader.join()
    assert errors == []
    assert hub.num_watched_sessions == 0


def test_event_validation_names_the_field() -> None:
    with pytest.raises(InvalidArgument) as err:
        validation.check_events([NewEvent("token", b"x" * (validation.MAX_EVENT_PAYLOAD_BYTES + 1), "", 1)])
    assert err.value.field == "events[0].payload"
    with pytest.raises(InvalidArgument) as err:
        validation.check_events([NewEvent("a", b"", "k", 1), NewEvent("b", b"", "k", 1)])
    assert err.value.field == "events[1].idempotency_key"
    with pytest.raises(InvalidArgument) as err:
        validation.check_json_object("[1]", "metadata_json")
    assert "JSON object" in err.value.message
    with pytest.raises(InvalidArgument):
        validation.check_id("bad id with spaces", "tenant_id")
