"""Webhooks in the store: subscriptions, outbox rows written with their events, ordered claims, dead letters."""
from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from llmesh.store.v1 import store_pb2 as pb

from tests.store.served import expect_error, new_session, store_replica, stub_for

SECRET = "s" * 32
HOOK = "https://hooks.example.com/in"


@pytest.fixture
async def stub(db_url: str, tmp_path: Path) -> AsyncIterator:
    async with store_replica(db_url, tmp_path / "store", webhook_max_attempts=2) as address, \
            stub_for(address, "orchestrator") as stub:
        for tenant, session in (("acme", "s1"), ("acme", "s2"), ("globex", "s1")):
            await new_session(stub, tenant, session)
        yield stub


async def hook(stub, tenant: str = "acme", url: str = HOOK, types: tuple[str, ...] = ("run.final", "run.error"),
               webhook_id: str = "") -> pb.Webhook:
    reply = await stub.CreateWebhook(pb.CreateWebhookRequest(webhook=pb.Webhook(
        tenant_id=tenant, webhook_id=webhook_id, url=url, event_types=list(types), secret=SECRET)))
    return reply.webhook


async def append(stub, kinds: list[str], tenant: str = "acme", session: str = "s1", **kwargs) -> list[int]:
    reply = await stub.AppendEvents(pb.AppendEventsRequest(tenant_id=tenant, session_id=session, events=[
        pb.Event(type=kind, payload=json.dumps({"n": i}).encode()) for i, kind in enumerate(kinds)], **kwargs))
    return list(reply.seqs)


async def claim(stub, worker: str = "w1", n: int = 10, lease_ms: int = 30_000, exclude=()) -> list[pb.Delivery]:
    reply = await stub.ClaimDeliveries(pb.ClaimDeliveriesRequest(worker_id=worker, max_deliveries=n,
                                                                 lease_ms=lease_ms, exclude_destinations=exclude))
    return list(reply.deliveries)


async def finish(stub, delivery: pb.Delivery, ok: bool = True, retry_after_ms: int = 0, status: int = 200):
    return (await stub.FinishDelivery(pb.FinishDeliveryRequest(
        delivery_id=delivery.delivery_id, claim_token=delivery.claim_token,
        outcome=pb.DELIVERY_OUTCOME_DELIVERED if ok else pb.DELIVERY_OUTCOME_RETRY, error="" if ok else "boom",
        http_status=status, retry_after_ms=retry_after_ms))).delivery


async def test_subscriptions_are_per_tenant_and_never_list_their_secret(stub) -> None:
    created = await hook(stub)
    assert created.webhook_id and created.url == HOOK and list(created.event_types) == ["run.final", "run.error"]
    await hook(stub, tenant="globex")
    listed = (await stub.ListWebhooks(pb.ListWebhooksRequest(tenant_id="acme"))).webhooks
    assert [w.webhook_id for w in listed] == [created.webhook_id] and listed[0].secret == ""
    await expect_error(stub.DeleteWebhook(pb.DeleteWebhookRequest(tenant_id="globex", webhook_id=created.webhook_id)),
                       grpc.StatusCode.NOT_FOUND, "WEBHOOK_NOT_FOUND")
    await append(stub, ["final"])
    dropped = await stub.DeleteWebhook(pb.DeleteWebhookRequest(tenant_id="acme", webhook_id=created.webhook_id))
    assert dropped.num_dropped == 1
    assert (await stub.ListWebhooks(pb.ListWebhooksRequest(tenant_id="acme"))).webhooks == []


@pytest.mark.parametrize(("webhook", "field"), [
    (pb.Webhook(tenant_id="acme", url="ftp://x/y", event_types=["run.final"], secret=SECRET), "webhook.url"),
    (pb.Webhook(tenant_id="acme", url="https:///nohost", event_types=["run.final"], secret=SECRET), "webhook.url"),
    (pb.Webhook(tenant_id="acme", url=HOOK, event_types=[], secret=SECRET), "webhook.event_types"),
    (pb.Webhook(tenant_id="acme", url=HOOK, event_types=["run.final", "token"], secret=SECRET),
     "webhook.event_types[1]"),
    (pb.Webhook(tenant_id="acme", url=HOOK, event_types=["run.final"], secret="short"), "webhook.secret"),
])
async def test_a_bad_subscription_is_refused_naming_the_field(stub, webhook, field) -> None:
    await expect_error(stub.CreateWebhook(pb.CreateWebhookRequest(webhook=webhook)),
                       grpc.StatusCode.INVALID_ARGUMENT, field=field)


async def test_deliveries_are_written_with_the_events_they_announce(stub) -> None:
    await hook(stub, types=("run.final", "approval.required"))
    await hook(stub, tenant="globex", types=("run.final",))
    seqs = await append(stub, ["turn_started", "token", "approval_required", "final"])
    await append(stub, ["error"])  # not subscribed
    stale = stub.AppendEvents(pb.AppendEventsRequest(tenant_id="acme", session_id="s2", fencing_token=99,
                                                     events=[pb.Event(type="final", payload=b"{}")]))
    await expect_error(stale, grpc.StatusCode.FAILED_PRECONDITION)
    first = await claim(stub)
    # One at a time per session: the final waits behind the approval.
    assert [d.event_type for d in first] == ["approval.required"]
    body = json.loads(first[0].body)
    assert body["id"] == first[0].delivery_id and body["type"] == "approval.required"
    assert body["tenant_id"] == "acme" and body["session_id"] == "s1"
    assert body["data"]["seq"] == seqs[2] and body["data"]["event"] == {"n": 2}
    assert first[0].secret == SECRET and first[0].attempts == 1 and first[0].destination == \
        "https://hooks.example.com:443"
    await finish(stub, first[0])
    (second,) = await claim(stub)
    assert second.event_type == "run.final" and json.loads(second.body)["data"]["seq"] == seqs[3]
    await finish(stub, second)
    assert await claim(stub) == [], "the refused append made no delivery, the other tenant's hook saw nothing"


async def test_sessions_and_destinations_are_independent(stub) -> None:
    await hook(stub, url="https://a.example/in")
    await hook(stub, url="https://b.example/in")
    await append(stub, ["final"], session="s1")
    await append(stub, ["final"], session="s2")
    claimed = await claim(stub)
    assert len(claimed) == 4
    only_b = await claim(stub, exclude=["https://a.example:443"])
    assert only_b == []
    for delivery in claimed:
        await finish(stub, delivery)


async def test_retries_wait_their_delay_then_go_dead_and_replay(stub) -> None:
    await hook(stub)
    await append(stub, ["final", "final"])
    (first,) = await claim(stub)
    retried = await finish(stub, first, ok=False, retry_after_ms=300, status=503)
    assert retried.state == pb.DELIVERY_STATE_PENDING and retried.last_status == 503
    assert await claim(stub) == [], "neither the delayed one nor the one behind it is due"
    await asyncio.sleep(0.4)
    (again,) = await claim(stub)
    assert again.delivery_id == first.delivery_id and again.attempts == 2
    dead = await finish(stub, again, ok=False)
    assert dead.state == pb.DELIVERY_STATE_DEAD and dead.last_error == "boom"
    (behind,) = await claim(stub)  # a dead letter no longer holds its session back
    assert behind.delivery_id != first.delivery_id
    await finish(stub, behind)
    letters = (await stub.ListDeliveries(pb.ListDeliveriesRequest(tenant_id="acme",
                                                                  state=pb.DELIVERY_STATE_DEAD))).deliveries
    assert [d.delivery_id for d in letters] == [first.delivery_id]
    assert (await stub.ListDeliveries(pb.ListDeliveriesRequest(tenant_id="globex",
                                                               state=pb.DELIVERY_STATE_DEAD))).deliveries == []
    stats = (await stub.GetOutboxStats(pb.GetOutboxStatsRequest())).destinations
    assert [(s.destination, s.pending, s.dead) for s in stats] == [("https://hooks.example.com:443", 0, 1)]
    replayed = await stub.ReplayDeliveries(pb.ReplayDeliveriesRequest(tenant_id="acme"))
    assert replayed.num_replayed == 1
    (replay,) = await claim(stub)
    assert replay.delivery_id == first.delivery_id and replay.attempts == 1


async def test_a_lost_claim_cannot_finish_and_an_expired_one_is_claimed_again(stub) -> None:
    await hook(stub)
    await append(stub, ["final"])
    (first,) = await claim(stub, lease_ms=200)
    await asyncio.sleep(0.3)
    (second,) = await claim(stub, worker="w2")
    assert second.delivery_id == first.delivery_id and second.claim_token != first.claim_token
    await expect_error(stub.FinishDelivery(pb.FinishDeliveryRequest(
        delivery_id=first.delivery_id, claim_token=first.claim_token, outcome=pb.DELIVERY_OUTCOME_DELIVERED)),
        grpc.StatusCode.FAILED_PRECONDITION, "CLAIM_LOST", "claim_token")
    assert (await finish(stub, second)).state == pb.DELIVERY_STATE_DELIVERED


async def test_task_outcomes_are_delivered(stub) -> None:
    await hook(stub, types=("task.done", "task.dead"))
    for payload in ('{"session_id": "s1"}', '{"session_id": "s2"}'):
        await stub.EnqueueTask(pb.EnqueueTaskRequest(tenant_id="acme", queue="q", payload_json=payload,
                                                     max_attempts=1))
    tasks = (await stub.ClaimTasks(pb.ClaimTasksRequest(queue="q", worker_id="w", max_tasks=2, lease_ms=5000))).tasks
    await stub.AckTask(pb.AckTaskRequest(task_id=tasks[0].task_id, lease_token=tasks[0].lease_token,
                                         result_json='{"text": "ok"}'))
    await stub.FailTask(pb.FailTaskRequest(task_id=tasks[1].task_id, lease_token=tasks[1].lease_token,
                                           error="broke", permanent=True))
    claimed = await claim(stub)
    bodies = sorted((json.loads(d.body) for d in claimed), key=lambda b: b["type"])
    assert [(b["type"], b["data"]["task_id"]) for b in bodies] == [("task.dead", tasks[1].task_id),
                                                                   ("task.done", tasks[0].task_id)]
    assert bodies[1]["data"]["result"] == {"text": "ok"} and bodies[0]["data"]["error"] == "broke"


async def test_concurrent_claimers_never_share_a_delivery(stub) -> None:
    await hook(stub)
    for i in range(40):
        await stub.CreateSession(pb.CreateSessionRequest(tenant_id="acme", session_id=f"c{i}", title="t"))
        await append(stub, ["final"], session=f"c{i}")
    batches = await asyncio.gather(*(claim(stub, worker=f"w{i}", n=5) for i in range(8)))
    ids = [d.delivery_id for batch in batches for d in batch]
    assert len(ids) == len(set(ids)) == 40


async def test_retention_deletes_old_delivered_rows_only(repo) -> None:
    from services.store.adapters.webhook_repository import outbox_rows
    from services.store.core.models import DeliveryState, WebhookRecord

    await repo.create_webhook(WebhookRecord("acme", "w1", HOOK, ("run.final",), SECRET, 1, 1))

    def queue(s):
        return outbox_rows(s, "acme", [("run.final", f"s{i}", {"i": i}) for i in range(4)], 100)

    await repo.db.write(queue)
    claimed = await repo.claim_deliveries("w", 10, 10_000, [], 200)
    assert len(claimed) == 4
    for delivery, (delivered, at) in zip(claimed, [(True, 300), (True, 300), (True, 5_000), (False, 300)],
                                         strict=True):
        await repo.finish_delivery(delivery.delivery_id, delivery.claim_token, delivered, "boom", 500, 0, at)
    assert await repo.delete_delivered(1_000, 1) == 1
    assert await repo.delete_delivered(1_000, 10) == 1
    assert await repo.delete_delivered(1_000, 10) == 0
    left = await repo.list_deliveries("acme", DeliveryState.DELIVERED, 0, 10)
    assert [d.delivered_ms for d in left] == [5_000]
    assert len(await repo.list_deliveries("acme", DeliveryState.DEAD, 0, 10)) == 1
