"""Webhook delivery end to end: the real store service (SQLite, in process) and a loopback receiver.

The store writes a delivery with each event webhooks are told of; the
orchestrator's DeliveryWorker claims and POSTs them to an HTTP server in a
thread that fails about 30% of requests (500s, 429s with Retry-After, and
hangs past the worker's timeout). Every delivery must arrive, each session's
deliveries in order, repeats carrying the same delivery id; a receiver that
keeps failing fills the dead letters, and a replay sends them again.
"""
from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from llmesh.orchestrator.v1 import orchestrator_pb2 as pb
from llmesh.orchestrator.v1 import orchestrator_pb2_grpc

from services.common.runtime import running_service
from services.orchestrator import config as orchestrator_config
from services.orchestrator import server as orchestrator_server
from services.orchestrator.adapters.grpc_store import GrpcStore
from services.orchestrator.adapters.grpc_webhooks import GrpcWebhooks, HttpxSender
from services.orchestrator.adapters.memory_store import MemoryStore
from services.orchestrator.core import events as ev
from services.orchestrator.core.events import AgentEvent
from services.orchestrator.core.webhooks import (
    EVENT_TYPES,
    DeliveryConfig,
    DeliveryWorker,
    WebhookRegistry,
)
from services.store.config import Settings as StoreSettings
from services.store.server import build_app as build_store
from tests.orchestrator.fakes import FakePolicy, FakeTools, ScriptedInference
from tests.support.auth import client_channel, service_channel
from tests.support.waiting import wait_until
from tests.support.webhook_receiver import Receipt, Receiver, receiving

TENANT = "acme"
TIMEOUT_S = 0.3


@contextlib.asynccontextmanager
async def store_service(tmp_path: Path, **fields) -> AsyncIterator[tuple[str, GrpcStore, GrpcWebhooks]]:
    settings = StoreSettings(port=0, data_dir=str(tmp_path), lease_sweep_interval_ms=50,
                             database_url=f"sqlite+aiosqlite:///{tmp_path / 'store.db'}", **fields)
    async with running_service(build_store(settings), settings) as service, \
            service_channel(f"127.0.0.1:{service.port}", "orchestrator") as channel:
        yield f"127.0.0.1:{service.port}", GrpcStore.for_channel(channel), GrpcWebhooks.for_channel(channel)


async def new_session(store: GrpcStore, name: str) -> str:
    record = await store.create_session(request_id=f"create-{name}", tenant_id=TENANT, title=name, metadata={})
    return record.session_id


async def append(store: GrpcStore, session_id: str, *types: str) -> None:
    events = [AgentEvent(session_id, "r", t, {"text": f"{t} of {session_id}"}) for t in types]
    await store.append_events(request_id=f"{session_id}-{time.monotonic_ns()}", tenant_id=TENANT,
                              session_id=session_id, events=events, idempotency_keys=[""] * len(events))


async def test_every_delivery_arrives_in_session_order_through_failures(tmp_path: Path) -> None:
    receiver = Receiver(fail_rate=0.3, timeout_s=TIMEOUT_S)
    async with store_service(tmp_path, webhook_max_attempts=25) as (_target, store, hooks), \
            contextlib.AsyncExitStack() as stack:
        stack.enter_context(receiving(receiver))
        registry = WebhookRegistry(hooks, allow_private=True)
        created = await registry.create(request_id="w1", tenant_id=TENANT, url=receiver.url,
                                        event_types=list(EVENT_TYPES), secret="")
        receiver.secret = created.secret

        sessions = [await new_session(store, f"s{i}") for i in range(5)]
        # Before the worker starts: a backlog.
        for sid in sessions:
            await append(store, sid, ev.TURN_STARTED, ev.APPROVAL_REQUIRED, ev.TOKEN, ev.FINAL)
        worker = DeliveryWorker(hooks, HttpxSender(), worker_id="w", config=DeliveryConfig(
            workers=4, lease_ms=3000, max_per_destination=2, timeout_s=TIMEOUT_S, backoff_base_ms=20,
            backoff_max_ms=200, idle_wait_s=0.05, stats_interval_s=0, allow_private=True))
        worker.start()
        stack.push_async_callback(worker.sender.aclose)
        stack.push_async_callback(worker.close)
        # While it runs: more turns, and two tasks that end done and dead.
        for sid in sessions:
            await append(store, sid, ev.TURN_STARTED, ev.ERROR)
            await append(store, sid, ev.TURN_STARTED, ev.FINAL)
        for name, done in (("t-done", True), ("t-dead", False)):
            await store.enqueue_task(request_id=name, tenant_id=TENANT, queue="q",
                                     payload_json=json.dumps({"session_id": sessions[0]}), idempotency_key=name,
                                     max_attempts=1)
            [task] = await store.claim_tasks(queue="q", worker_id="w", max_tasks=1, lease_ms=10_000)
            if done:
                await store.ack_task(task_id=task.task_id, lease_token=task.lease_token, result_json='{"text":"ok"}')
            else:
                await store.fail_task(task_id=task.task_id, lease_token=task.lease_token, error="boom",
                                      permanent=True)
        expected = len(sessions) * 4 + 2

        async def all_delivered() -> bool:
            stats = await hooks.outbox_stats()
            return len(receiver.delivered()) >= expected and all(s.pending == 0 for s in stats)

        assert await wait_until(all_delivered, timeout_s=60, interval_s=0.1), \
            (len(receiver.delivered()), expected, await hooks.outbox_stats())

    delivered = receiver.delivered()
    assert len(delivered) == expected and receiver.bad_signatures == 0
    answers = [r.answer for r in receiver.receipts]
    assert answers.count(500) and answers.count(429) and answers.count("late"), answers
    assert {r.event_type for r in delivered.values()} == set(EVENT_TYPES)
    assert sorted(r.body["type"] for r in delivered.values()).count("task.dead") == 1
    # Every request carried its delivery id in the header and the body, the same body on every repeat.
    by_id: dict[str, list[Receipt]] = {}
    for receipt in receiver.receipts:
        assert receipt.body["id"] == receipt.delivery_id and receipt.body["type"] == receipt.event_type
        by_id.setdefault(receipt.delivery_id, []).append(receipt)
    assert all(len({json.dumps(r.body, sort_keys=True) for r in rs}) == 1 for rs in by_id.values())
    # Late answers were processed by the receiver and sent again: duplicates a receiver drops by id.
    late = {r.delivery_id for r in receiver.receipts if r.answer == "late"}
    assert late and all(len(by_id[i]) >= 2 for i in late)
    # Per session, no request for an event came before the previous event of the session was delivered.
    for sid in sessions:
        run_receipts = [r for r in receiver.receipts if r.body["session_id"] == sid and "seq" in r.body["data"]]
        seqs = [r.body["data"]["seq"] for r in run_receipts]
        assert seqs == sorted(seqs), (sid, seqs)
        assert len(set(seqs)) == 4
    # Never more than max_per_destination requests at once (the sender's view: not counting a late answer's wait).
    assert receiver.peak <= 2


async def test_dead_letters_and_replay_through_the_agent_service(tmp_path: Path) -> None:
    receiver = Receiver(always_fail=True)
    async with store_service(tmp_path, webhook_max_attempts=2) as (target, store, _hooks), \
            contextlib.AsyncExitStack() as stack:
        stack.enter_context(receiving(receiver))
        tools = FakeTools()
        settings = orchestrator_config.Settings(
            port=0, store_target=target, max_workers=0, webhook_allow_private=True, webhook_timeout_s=TIMEOUT_S,
            webhook_lease_ms=3000, webhook_backoff_base_ms=10, webhook_backoff_max_ms=20, webhook_idle_wait_s=0.05,
            webhook_stats_interval_s=0.1)
        app = orchestrator_server.build_app(settings, inference=ScriptedInference(), tools=tools,
                                            policy=FakePolicy(tools))
        svc = await stack.enter_async_context(running_service(app, settings))
        channel = await stack.enter_async_context(client_channel(f"127.0.0.1:{svc.port}", TENANT))
        agent = orchestrator_pb2_grpc.AgentServiceStub(channel)
        assert app.deliveries is not None and not isinstance(app.orchestrator.store, MemoryStore)

        created = await agent.CreateWebhook(pb.CreateWebhookRequest(request_id="c1", url=receiver.url,
                                                                    event_types=["run.final"]))
        receiver.secret = created.secret
        sid = await new_session(store, "dead")
        await append(store, sid, ev.TURN_STARTED, ev.FINAL)

        async def dead_listed() -> list[pb.DeadDelivery]:
            return list((await agent.ListDeadDeliveries(pb.ListDeadDeliveriesRequest())).deliveries)

        assert await wait_until(lambda: _nonempty(dead_listed), timeout_s=20)
        [dead] = await dead_listed()
        assert (dead.attempts, dead.last_status, dead.event_type, dead.webhook_id) == (
            2, 500, "run.final", created.webhook.webhook_id)
        assert dead.last_error.startswith("HTTP 500")
        assert len(receiver.receipts) == 2 and receiver.delivered() == {}

        with receiver.lock:
            receiver.always_fail = False
        replayed = await agent.ReplayDeliveries(pb.ReplayDeliveriesRequest(delivery_ids=[dead.delivery_id]))
        assert replayed.num_replayed == 1
        assert await wait_until(lambda: dead.delivery_id in receiver.delivered(), timeout_s=20)
        assert await dead_listed() == []
        assert [w.webhook_id for w in (await agent.ListWebhooks(pb.ListWebhooksRequest())).webhooks] == [
            created.webhook.webhook_id]
        assert (await agent.DeleteWebhook(pb.DeleteWebhookRequest(
            webhook_id=created.webhook.webhook_id))).num_dropped == 0


async def _nonempty(listing) -> bool:
    return bool(await listing())


pytestmark = pytest.mark.timeout(120)
