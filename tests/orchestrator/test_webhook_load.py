"""The webhook outbox under load and failures, over 50 sessions and 5 destinations.

Two runs of tests/support/webhook_load.py (make bench-delivery runs the same
scenarios on PostgreSQL too):

- 2,000 events; receivers fail 30% of requests (500, 429 with Retry-After,
  answers after the sender's timeout) and the store process is SIGKILLed and
  restarted mid-delivery: every event is accepted by its receiver, each
  session's in order, repeats told apart by their delivery id.
- One destination refuses every connection: its deliveries end as dead
  letters after their attempts while the others are delivered, and once it is
  back a replay delivers them, in order.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.webhook_load import delivery_load

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


async def test_every_event_arrives_in_order_through_failures_and_a_store_kill(tmp_path: Path):
    result = await delivery_load(f"sqlite+aiosqlite:///{tmp_path / 'store.db'}", tmp_path, events=2000, sessions=50,
                                 destinations=5, fail_rate=0.3, kill_store=True, rate_per_s=200, deadline_s=400)
    shown = json.dumps(result)
    assert result["store_killed_at_s"] is not None, shown
    assert (result["events_lost"], result["order_violations"], result["bad_signatures"]) == (0, 0, 0), shown
    assert result["healthy_delivered"] == result["delivered"] == 2000, shown
    # Failures and the kill made the sender repeat deliveries; receivers tell repeats by their delivery id.
    assert result["repeated_requests"] > 0 and result["late_answers"] > 0 and result["answers_429"] > 0, shown


async def test_a_dead_destination_fills_the_dead_letters_and_a_replay_delivers_them(tmp_path: Path):
    result = await delivery_load(f"sqlite+aiosqlite:///{tmp_path / 'store.db'}", tmp_path, events=500, sessions=50,
                                 destinations=5, dead=1, fail_rate=0.0, max_attempts=3, rate_per_s=100,
                                 deadline_s=400)
    shown = json.dumps(result)
    assert (result["events_lost"], result["order_violations"], result["bad_signatures"]) == (0, 0, 0), shown
    assert result["healthy_delivered"] == result["healthy_events"] == 400, shown
    assert result["dead_letters"] == result["replayed_delivered"] == 100, shown
