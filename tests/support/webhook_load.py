"""Webhook delivery under load, for the acceptance test and ``make bench-delivery``.

A store process (killable), ``destinations`` tenants each with one webhook to
its own loopback receiver, ``events`` run events appended at a steady rate
over ``sessions`` sessions, and the orchestrator's DeliveryWorker sending
them. Receivers fail a ``fail_rate`` share of requests (500, 429 with
Retry-After, answers after the sender's timeout); a delivery is dead-lettered
after ``max_attempts`` (20: a healthy receiver failing 30% of requests
practically never exhausts them); the first ``dead`` of them
refuse connections until the run revives them and replays their dead
letters. With ``kill_store`` the store is SIGKILLed once a third of the events
are delivered, and restarted on the same port and database half a second later.

``delivery_load`` returns plain numbers: what was delivered (a receiver's
first in-time 2xx per delivery id), lost, repeated, out of session order,
and how long events waited from being stored to being accepted.
"""
from __future__ import annotations

import asyncio
import contextlib
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from services.common.errors import DomainError
from services.orchestrator.adapters.grpc_store import GrpcStore
from services.orchestrator.adapters.grpc_webhooks import GrpcWebhooks, HttpxSender
from services.orchestrator.core import events as ev
from services.orchestrator.core.events import AgentEvent
from services.orchestrator.core.webhooks import DeliveryConfig, DeliveryWorker, WebhookRegistry
from tests.support.auth import CREDENTIALS, service_channel
from tests.support.ports import free_port
from tests.support.waiting import wait_until
from tests.support.webhook_receiver import Receiver, receiving

ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def store_process(db_url: str, data_dir: Path, port: int, **settings: Any) -> Iterator[list[subprocess.Popen]]:
    """The store as its own process on ``port``; the yielded list ends with the current one (see _restart)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, "-m", "services.store", "--port", str(port), "--data-dir", str(data_dir),
            "--database-url", db_url, "--credentials-dir", str((ROOT / CREDENTIALS).resolve())]
    for name, value in settings.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    log = (data_dir / "store-0.log").open("w")
    procs = [subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=log)]
    try:
        yield procs
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


async def _wait_serving(store: GrpcWebhooks, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await store.outbox_stats()
            return
        except DomainError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def delivery_load(db_url: str, data_dir: Path, *, events: int = 2000, sessions: int = 50,
                        destinations: int = 5, fail_rate: float = 0.3, dead: int = 0, kill_store: bool = False,
                        rate_per_s: float = 400.0, max_attempts: int = 20, timeout_s: float = 0.3,
                        deadline_s: float = 180.0) -> dict[str, Any]:
    port = free_port()
    dead_ports = [free_port() for _ in range(dead)]
    receivers = [Receiver(fail_rate=fail_rate, timeout_s=timeout_s) for _ in range(destinations - dead)]
    revived = [Receiver(timeout_s=timeout_s) for _ in range(dead)]
    with store_process(db_url, data_dir / "store", port, webhook_max_attempts=max_attempts,
                       lease_sweep_interval_ms=200) as procs, contextlib.ExitStack() as serving:
        for receiver in receivers:
            serving.enter_context(receiving(receiver))
        async with service_channel(f"127.0.0.1:{port}", "orchestrator") as channel:
            store, hooks = GrpcStore.for_channel(channel), GrpcWebhooks.for_channel(channel)
            await _wait_serving(hooks)
            registry = WebhookRegistry(hooks, allow_private=True)
            tenants = [f"load-{i}" for i in range(destinations)]
            urls = [f"http://127.0.0.1:{p}/hook" for p in dead_ports] + [r.url for r in receivers]
            by_tenant: dict[str, Receiver] = {}
            for tenant, url, receiver in zip(tenants, urls, revived + receivers, strict=True):
                created = await registry.create(request_id=f"hook-{tenant}", tenant_id=tenant, url=url,
                                                event_types=["run.final"], secret="")
                receiver.secret = created.secret
                by_tenant[tenant] = receiver
            session_ids = []
            for i in range(sessions):
                tenant = tenants[i % destinations]
                record = await store.create_session(request_id=f"s-{i}", tenant_id=tenant, title=f"s{i}",
                                                    metadata={})
                session_ids.append((tenant, record.session_id))
            worker = DeliveryWorker(hooks, HttpxSender(), worker_id="load", config=DeliveryConfig(
                workers=8, lease_ms=3000, max_per_destination=4, timeout_s=timeout_s, backoff_base_ms=100,
                backoff_max_ms=1000, idle_wait_s=0.05, stats_interval_s=0, allow_private=True))
            worker.start()
            appended: dict[tuple[str, int], float] = {}
            healthy_expected = sum(1 for k in range(events) if session_ids[k % sessions][0] in tenants[dead:])
            start = time.monotonic()
            gate = asyncio.Semaphore(32)

            async def produce(k: int) -> None:
                # Many sessions produce events at once: appends overlap, each stored at its own time.
                tenant, session_id = session_ids[k % sessions]
                async with gate:
                    seq = await _append(store, tenant, session_id, k)
                appended[(session_id, seq)] = time.monotonic()

            async def kill_and_restart() -> float:
                """SIGKILL the store once a third of the events are delivered; start it again on the same port."""
                await wait_until(lambda: sum(len(r.delivered()) for r in receivers) >= healthy_expected / 3,
                                 deadline_s, interval_s=0.05)
                procs[-1].send_signal(signal.SIGKILL)
                procs[-1].wait()
                killed = time.monotonic()
                await asyncio.sleep(0.5)
                _restart(procs, data_dir / "store")
                return killed

            producers = []
            killer = asyncio.create_task(kill_and_restart()) if kill_store else None
            try:
                for k in range(events):
                    await asyncio.sleep(max(0.0, start + k / rate_per_s - time.monotonic()))
                    producers.append(asyncio.create_task(produce(k)))
                await asyncio.gather(*producers)
                appended_s = time.monotonic() - start
                await wait_until(lambda: sum(len(r.delivered()) for r in receivers) >= healthy_expected, deadline_s,
                                 interval_s=0.1)
                healthy_done = time.monotonic() - start

                async def all_dead() -> bool:
                    return await _dead_count(hooks, tenants[:dead]) >= events - healthy_expected

                await wait_until(all_dead, deadline_s, interval_s=0.2)
                dead_letters = await _dead_count(hooks, tenants[:dead])
                killed_at = await killer if killer is not None else None
                # Bring the dead destinations back and replay what they missed.
                for receiver, dead_port in zip(revived, dead_ports, strict=True):
                    serving.enter_context(receiving(receiver, port=dead_port))
                for tenant in tenants[:dead]:
                    await hooks.replay_deliveries(tenant_id=tenant, delivery_ids=[])
                await wait_until(lambda: sum(len(r.delivered()) for r in revived) >= events - healthy_expected,
                                 deadline_s, interval_s=0.2)
            finally:
                for producer in [*producers, *([killer] if killer is not None else [])]:
                    producer.cancel()
                await worker.close()
                await worker.sender.aclose()
    return _summary(receivers, revived, appended, events, healthy_expected, dead_letters, start, appended_s,
                    healthy_done, killed_at)


def _restart(procs: list[subprocess.Popen], data_dir: Path) -> None:
    args = procs[-1].args
    log = (data_dir / f"store-{len(procs)}.log").open("w")
    procs.append(subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=log))


async def _append(store: GrpcStore, tenant: str, session_id: str, k: int) -> int:
    """Append event ``k``, retrying through a store restart (the request id makes a retry a no-op)."""
    event = AgentEvent(session_id, "load", ev.FINAL, {"text": f"event {k}", "reason": "stop"})
    for _ in range(300):
        try:
            seqs = await store.append_events(request_id=f"load-{k}", tenant_id=tenant, session_id=session_id,
                                             events=[event], idempotency_keys=[""])
            return seqs[0]
        except DomainError:
            await asyncio.sleep(0.1)
    raise RuntimeError(f"event {k} could not be appended")


async def _dead_count(hooks: GrpcWebhooks, tenants: list[str]) -> int:
    total = 0
    for tenant in tenants:
        token = ""
        while True:
            try:
                page, token = await hooks.list_dead_deliveries(tenant_id=tenant, page_size=1000, page_token=token)
            except DomainError:
                return 0
            total += len(page)
            if not token:
                break
    return total


def _accepted(receivers: list[Receiver], appended: dict[tuple[str, int], float]
              ) -> tuple[set[tuple[str, int]], int, list[float]]:
    """(events accepted, accepted out of their session's order, stored-to-accepted delays) over ``receivers``."""
    accepted_events: set[tuple[str, int]] = set()
    violations = 0
    delays: list[float] = []
    for receiver in receivers:
        last_seq: dict[str, int] = {}
        for receipt in sorted(receiver.delivered().values(), key=lambda r: r.at):
            key = (receipt.body["session_id"], receipt.body["data"]["seq"])
            accepted_events.add(key)
            violations += key[1] < last_seq.get(key[0], 0)
            last_seq[key[0]] = max(key[1], last_seq.get(key[0], 0))
            if key in appended:
                delays.append(receipt.at - appended[key])
    return accepted_events, violations, sorted(delays)


def _summary(receivers: list[Receiver], revived: list[Receiver], appended: dict[tuple[str, int], float],
             events: int, healthy_expected: int, dead_letters: int, start: float, appended_s: float,
             healthy_done: float, killed_at: float | None) -> dict[str, Any]:
    healthy, healthy_violations, delays = _accepted(receivers, appended)
    last_accepted = max((r.at for receiver in receivers for r in receiver.delivered().values()), default=start)
    replayed, replayed_violations, _ = _accepted(revived, appended)
    requests = sum(len(r.receipts) for r in receivers + revived)
    unique = sum(len(r.delivered()) for r in receivers + revived)
    return {
        "events": events, "delivered": len(healthy | replayed), "events_lost": events - len(healthy | replayed),
        "order_violations": healthy_violations + replayed_violations,
        "healthy_events": healthy_expected, "healthy_delivered": len(healthy),
        "dead_letters": dead_letters, "replayed_delivered": len(replayed),
        "requests": requests, "repeated_requests": requests - unique,
        "bad_signatures": sum(r.bad_signatures for r in receivers + revived),
        # Accepted deliveries per second, from the first event to the last healthy acceptance.
        "deliveries_per_s": round(len(healthy) / max(last_accepted - start, 1e-9), 1),
        "append_s": round(appended_s, 2), "healthy_done_s": round(healthy_done, 2),
        "delay_p50_ms": round(statistics.median(delays) * 1000, 1) if delays else None,
        "delay_p95_ms": round(delays[int(0.95 * (len(delays) - 1))] * 1000, 1) if delays else None,
        "store_killed_at_s": round(killed_at - start, 2) if killed_at is not None else None,
        "late_answers": sum(1 for r in receivers for x in r.receipts if x.answer == "late"),
        "answers_429": sum(1 for r in receivers for x in r.receipts if x.answer == 429),
    }
