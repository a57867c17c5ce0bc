"""Webhooks on the orchestrator side: subscription checks, signing, retry timing and the delivery worker.

The store is a fake WebhookStorePort that keeps the store's rules (claims
oldest first, per session and webhook in order, excluded destinations passed
over, attempts counted on claim, dead after max_attempts); HTTP is a scripted
sender. The real store and a real receiver: test_webhooks_store.py.
"""
from __future__ import annotations

import asyncio
import email.utils
import itertools
import json
import random
import re
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace

import grpc
import pytest
from llmesh.orchestrator.v1 import orchestrator_pb2 as pb
from llmesh.orchestrator.v1 import orchestrator_pb2_grpc
from prometheus_client import REGISTRY

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from services.common.interceptors import error_info
from services.common.runtime import running_service
from services.orchestrator import metrics
from services.orchestrator.adapters.memory_store import MemoryStore
from services.orchestrator.config import Settings
from services.orchestrator.core import webhooks as wh
from services.orchestrator.core.webhooks import (
    DeliveryConfig,
    DeliveryRecord,
    DeliverySignals,
    DeliveryWorker,
    DestinationStats,
    HttpReply,
    SendError,
    WebhookRecord,
    WebhookRegistry,
)
from services.orchestrator.server import build_app
from tests.orchestrator.fakes import FakePolicy, FakeTools, ScriptedInference
from tests.support.auth import client_channel
from tests.support.waiting import wait_until

PUBLIC = "93.184.216.34"


# ---- fakes -------------------------------------------------------------------------------------
def resolver(table: Mapping[str, list[str]]) -> Callable[[str, int], Awaitable[list[str]]]:
    calls: list[str] = []

    async def resolve(host: str, port: int) -> list[str]:
        calls.append(host)
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return table[host]

    resolve.calls = calls  # type: ignore[attr-defined]
    return resolve


@dataclass
class _Row:
    record: DeliveryRecord
    seq: int
    state: str = "PENDING"
    due: float = 0.0
    claim_expire: float = 0.0


@dataclass
class FakeWebhookStore:
    """The store's webhook rules, in memory."""

    max_attempts: int = 5
    webhooks: dict[tuple[str, str], WebhookRecord] = field(default_factory=dict)
    rows: list[_Row] = field(default_factory=list)
    claims: list[list[str]] = field(default_factory=list)
    finishes: list[dict] = field(default_factory=list)
    num_stats: int = 0
    _ids: itertools.count = field(default_factory=itertools.count)

    # -- subscriptions
    async def create_webhook(self, *, request_id, tenant_id, webhook_id, url, event_types, secret) -> WebhookRecord:
        # Like the store: a retried create answers the stored webhook (and here its secret).
        record = self.webhooks.setdefault(
            (tenant_id, webhook_id), WebhookRecord(tenant_id, webhook_id, url, tuple(event_types), time.time(), secret))
        return record

    async def list_webhooks(self, *, tenant_id, page_size, page_token):
        return [w for (t, _), w in sorted(self.webhooks.items()) if t == tenant_id][:page_size], ""

    async def delete_webhook(self, *, tenant_id, webhook_id) -> int:
        if self.webhooks.pop((tenant_id, webhook_id), None) is None:
            raise NotFound(f"webhook {webhook_id!r} not found", reason="WEBHOOK_NOT_FOUND")
        dropped = [r for r in self.rows if r.record.webhook_id == webhook_id and r.state != "DELIVERED"]
        self.rows = [r for r in self.rows if r not in dropped]
        return len(dropped)

    # -- outbox
    def add(self, *, url: str, session_id: str = "s1", event_type: str = "run.final", secret: str = "s" * 20,
            webhook_id: str = "wh-1", tenant_id: str = "acme") -> DeliveryRecord:
        seq = next(self._ids)
        record = DeliveryRecord(
            delivery_id=f"d{seq}", tenant_id=tenant_id, webhook_id=webhook_id, url=url,
            destination=wh.parse_url(url).destination, session_id=session_id, event_type=event_type,
            body=json.dumps({"id": f"d{seq}", "type": event_type, "session_id": session_id, "n": seq}).encode(),
            max_attempts=self.max_attempts, secret=secret, create_time=time.time())
        self.rows.append(_Row(record, seq, due=time.monotonic()))
        return record

    def state(self, delivery_id: str) -> str:
        return next(r.state for r in self.rows if r.record.delivery_id == delivery_id)

    async def claim_deliveries(self, *, worker_id, max_deliveries, lease_ms, exclude_destinations,
                               max_per_destination=0):
        self.claims.append(list(exclude_destinations))
        taken: dict[str, int] = {}
        now = time.monotonic()
        open_ = {"PENDING", "CLAIMED"}
        out = []
        for row in sorted(self.rows, key=lambda r: r.seq):
            due = (row.state == "PENDING" and row.due <= now) or (row.state == "CLAIMED" and row.claim_expire < now)
            behind = any(o.seq < row.seq and o.state in open_ and o.record.webhook_id == row.record.webhook_id
                         and o.record.session_id == row.record.session_id for o in self.rows)
            if not due or behind or row.record.destination in exclude_destinations:
                continue
            if max_per_destination and taken.get(row.record.destination, 0) >= max_per_destination:
                continue
            taken[row.record.destination] = taken.get(row.record.destination, 0) + 1
            row.state = "CLAIMED"
            row.claim_expire = now + lease_ms / 1000
            row.record = replace(row.record, attempts=row.record.attempts + 1, claim_token=f"tok-{row.seq}-{now}",
                                 state="CLAIMED")
            out.append(row.record)
            if len(out) >= max_deliveries:
                break
        return out

    async def finish_delivery(self, *, delivery_id, claim_token, delivered, error, http_status, retry_after_ms):
        self.finishes.append({"delivery_id": delivery_id, "delivered": delivered, "error": error,
                              "http_status": http_status, "retry_after_ms": retry_after_ms})
        row = next(r for r in self.rows if r.record.delivery_id == delivery_id)
        if row.state != "CLAIMED" or row.record.claim_token != claim_token:
            raise FailedPrecondition("claim lost", reason="CLAIM_LOST", field="claim_token")
        if delivered:
            row.state = "DELIVERED"
        else:
            row.state = "DEAD" if row.record.attempts >= row.record.max_attempts else "PENDING"
            row.due = time.monotonic() + retry_after_ms / 1000
        row.record = replace(row.record, state=row.state, claim_token="", last_error=error, last_status=http_status)
        return row.record

    async def list_dead_deliveries(self, *, tenant_id, page_size, page_token):
        return [r.record for r in self.rows if r.state == "DEAD" and r.record.tenant_id == tenant_id], ""

    async def replay_deliveries(self, *, tenant_id, delivery_ids) -> int:
        n = 0
        for row in self.rows:
            if row.state == "DEAD" and row.record.tenant_id == tenant_id and (
                    not delivery_ids or row.record.delivery_id in delivery_ids):
                row.state, row.due = "PENDING", 0.0
                row.record = replace(row.record, attempts=0, state="PENDING")
                n += 1
        return n

    async def outbox_stats(self) -> list[DestinationStats]:
        self.num_stats += 1
        return [DestinationStats("https://a.example:443", 3, 1.5, 1)]


@dataclass
class Sent:
    url: str
    body: bytes
    headers: dict[str, str]


class ScriptedSender:
    """Answers each POST with ``answer(url, sent)``: an HttpReply, or an exception, or a coroutine."""

    def __init__(self, answer: Callable[[str, Sent], object] | None = None) -> None:
        self.answer = answer or (lambda url, sent: HttpReply(200))
        self.sent: list[Sent] = []
        self.in_flight: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.closed = False

    async def post(self, url: str, body: bytes, headers: Mapping[str, str], timeout_s: float) -> HttpReply:
        sent = Sent(url, body, dict(headers))
        self.sent.append(sent)
        dest = wh.parse_url(url).destination
        self.in_flight[dest] = self.in_flight.get(dest, 0) + 1
        self.peak[dest] = max(self.peak.get(dest, 0), self.in_flight[dest])
        try:
            result = self.answer(url, sent)
            if asyncio.iscoroutine(result):
                result = await result
            if isinstance(result, BaseException):
                raise result
            assert isinstance(result, HttpReply)
            return result
        finally:
            self.in_flight[dest] -= 1

    async def aclose(self) -> None:
        self.closed = True


class Recorder:
    def __init__(self) -> None:
        self.attempts: list[str] = []
        self.failures: list[tuple[str, str]] = []
        self.dead: list[str] = []
        self.stats: list[list[DestinationStats]] = []

    def signals(self) -> DeliverySignals:
        return DeliverySignals(attempt=self.attempts.append, failure=lambda d, k: self.failures.append((d, k)),
                               dead=self.dead.append, stats=self.stats.append)


def fast_config(**kw) -> DeliveryConfig:
    base = {"workers": 4, "lease_ms": 10_000, "timeout_s": 1.0, "backoff_base_ms": 1, "backoff_max_ms": 2,
            "idle_wait_s": 0.02, "stats_interval_s": 0, "allow_private": True}
    return DeliveryConfig(**{**base, **kw})


def _field(exc: pytest.ExceptionInfo) -> str | None:
    return exc.value.field


# ---- URLs --------------------------------------------------------------------------------------
@pytest.mark.parametrize("url,dest", [
    ("https://hooks.example.com/in", "https://hooks.example.com:443"),
    ("HTTP://Hooks.Example.com:8080/x?y=1", "http://hooks.example.com:8080"),
    ("http://[2606:4700::1]/h", "http://[2606:4700::1]:80"),
])
def test_parse_url_accepts_http_and_https_and_names_the_destination(url: str, dest: str) -> None:
    assert wh.parse_url(url).destination == dest


@pytest.mark.parametrize("url", [
    "", "ftp://hooks.example.com/", "file:///etc/passwd", "hooks.example.com/in", "https:///path",
    "https://user:pw@hooks.example.com/", "https://user@hooks.example.com/", "https://hooks.example.com:99999/",
    "https://hooks.example.com/a b", " https://hooks.example.com/", "https://hooks.example.com/\n",
    "javascript:alert(1)", "https://" + "a" * 3000 + ".com/",
])
def test_parse_url_refuses_other_shapes_naming_url(url: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        wh.parse_url(url)
    assert _field(exc) == "url"


@pytest.mark.parametrize("address,why", [
    ("127.0.0.1", "loopback"), ("10.1.2.3", "private"), ("172.16.0.9", "private"), ("192.168.1.1", "private"),
    ("169.254.169.254", "link-local"), ("224.0.0.1", "multicast"), ("0.0.0.0", "unspecified"),
    ("240.0.0.1", "reserved"), ("100.64.0.1", "non-global"), ("::1", "loopback"), ("fe80::1%eth0", "link-local"),
    ("fc00::1", "private"), ("::ffff:127.0.0.1", "loopback"), ("::ffff:10.0.0.1", "private"), ("::", "unspecified"),
    (PUBLIC, ""), ("2606:4700:4700::1111", ""), ("8.8.8.8", ""),
])
def test_refused_address_kinds(address: str, why: str) -> None:
    assert wh.refused_address(address) == why


# ---- the registry ------------------------------------------------------------------------------
def registry(store: FakeWebhookStore | None = None, **kw) -> WebhookRegistry:
    table = {"hooks.example.com": [PUBLIC, "2606:4700:4700::1111"], "internal.example": ["10.0.0.5"],
             "mixed.example": [PUBLIC, "127.0.0.1"], "meta.example": ["169.254.169.254"]}
    return WebhookRegistry(FakeWebhookStore() if store is None else store, resolve=resolver(table), **kw)


async def test_create_stores_the_subscription_and_returns_the_secret_once() -> None:
    store = FakeWebhookStore()
    created = await registry(store).create(request_id="r1", tenant_id="acme", url="https://hooks.example.com/in",
                                           event_types=["run.final", "task.dead", "run.final"], secret="")
    assert created.webhook.url == "https://hooks.example.com/in"
    assert created.webhook.event_types == ("run.final", "task.dead")
    assert created.webhook.secret == ""
    # Generated: secrets.token_urlsafe(32), 43 URL-safe characters, and it is the one the store keeps.
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", created.secret)
    assert store.webhooks[("acme", created.webhook.webhook_id)].secret == created.secret
    again = await registry(store).create(request_id="r2", tenant_id="acme", url="https://hooks.example.com/in",
                                         event_types=["run.final"], secret="")
    assert again.secret != created.secret
    given = await registry(store).create(request_id="r3", tenant_id="acme", url="https://hooks.example.com/in",
                                         event_types=["run.error"], secret="x" * 16)
    assert given.secret == "x" * 16


async def test_a_retried_create_makes_one_webhook() -> None:
    store = FakeWebhookStore()
    kw = {"tenant_id": "acme", "url": "https://hooks.example.com/in", "event_types": ["run.final"], "secret": ""}
    first = await registry(store).create(request_id="same", **kw)
    again = await registry(store).create(request_id="same", **kw)
    other = await registry(store).create(request_id="same", **{**kw, "tenant_id": "globex"})
    assert again.webhook.webhook_id == first.webhook.webhook_id != other.webhook.webhook_id
    assert again.secret == first.secret
    assert len(store.webhooks) == 2
    assert re.fullmatch(r"wh-[0-9a-f]{24}", first.webhook.webhook_id)


@pytest.mark.parametrize("url", ["https://internal.example/h", "https://mixed.example/h", "http://meta.example/",
                                 "http://127.0.0.1:8080/h", "http://[::1]/h", "https://nowhere.example/h"])
async def test_create_refuses_destinations_that_are_not_public(url: str) -> None:
    reg = registry()
    reg._resolve = resolver({"internal.example": ["10.0.0.5"], "mixed.example": [PUBLIC, "127.0.0.1"],
                             "meta.example": ["169.254.169.254"], "127.0.0.1": ["127.0.0.1"], "::1": ["::1"]})
    with pytest.raises(InvalidArgument) as exc:
        await reg.create(request_id="r", tenant_id="acme", url=url, event_types=["run.final"], secret="")
    assert _field(exc) == "url"
    assert exc.value.reason in ("WEBHOOK_DESTINATION_REFUSED", "WEBHOOK_HOST_UNRESOLVED")


async def test_the_real_resolver_refuses_localhost() -> None:
    reg = WebhookRegistry(FakeWebhookStore())
    for url in ("http://localhost:9000/h", "http://127.0.0.1/h", "http://[::1]:8080/h", "http://0.0.0.0/"):
        with pytest.raises(InvalidArgument) as exc:
            await reg.create(request_id="r", tenant_id="acme", url=url, event_types=["run.final"], secret="")
        assert _field(exc) == "url"


async def test_allow_private_accepts_loopback_without_resolving() -> None:
    reg = registry(allow_private=True)
    created = await reg.create(request_id="r", tenant_id="acme", url="http://127.0.0.1:8080/h",
                               event_types=["approval.required"], secret="")
    assert created.webhook.url == "http://127.0.0.1:8080/h"
    assert reg._resolve.calls == []  # type: ignore[attr-defined]
    with pytest.raises(InvalidArgument) as exc:  # the shape is still checked
        await reg.create(request_id="r", tenant_id="acme", url="ftp://127.0.0.1/", event_types=["run.final"],
                         secret="")
    assert _field(exc) == "url"


@pytest.mark.parametrize("types,field_name", [
    ([], "event_types"), (["run.final", "run.done"], "event_types[1]"), (["RUN.FINAL"], "event_types[0]"),
    (["task.done", "task.dead", "final"], "event_types[2]"), ([""], "event_types[0]"),
])
async def test_event_types_must_be_known(types: list[str], field_name: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        await registry().create(request_id="r", tenant_id="acme", url="https://hooks.example.com/",
                                event_types=types, secret="")
    assert _field(exc) == field_name


@pytest.mark.parametrize("secret", ["short", "x" * 15, "y" * 257])
async def test_secret_length_is_checked(secret: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        await registry().create(request_id="r", tenant_id="acme", url="https://hooks.example.com/",
                                event_types=["run.final"], secret=secret)
    assert _field(exc) == "secret"


async def test_list_never_returns_secrets_and_delete_list_dead_replay_pass_through() -> None:
    store = FakeWebhookStore()
    reg = registry(store)
    created = await reg.create(request_id="r1", tenant_id="acme", url="https://hooks.example.com/in",
                               event_types=["run.final"], secret="z" * 20)
    await reg.create(request_id="r2", tenant_id="other", url="https://hooks.example.com/in",
                     event_types=["run.final"], secret="")
    listed, _ = await reg.list_webhooks("acme", 0, "")
    assert [w.webhook_id for w in listed] == [created.webhook.webhook_id]
    assert all(w.secret == "" for w in listed)
    dead = store.add(url="https://hooks.example.com/in", webhook_id=created.webhook.webhook_id)
    store.rows[-1].state = "DEAD"
    dead_listed, _ = await reg.list_dead("acme", 10, "")
    assert [d.delivery_id for d in dead_listed] == [dead.delivery_id]
    assert dead_listed[0].secret == "" and dead_listed[0].claim_token == ""
    assert await reg.replay("acme", [dead.delivery_id]) == 1
    assert store.state(dead.delivery_id) == "PENDING"
    with pytest.raises(InvalidArgument) as exc:
        await reg.replay("acme", ["ok", " "])
    assert _field(exc) == "delivery_ids[1]"
    assert await reg.delete("acme", created.webhook.webhook_id) == 1
    with pytest.raises(NotFound):
        await reg.delete("acme", created.webhook.webhook_id)
    with pytest.raises(InvalidArgument) as exc:
        await reg.delete("acme", "")
    assert _field(exc) == "webhook_id"
    with pytest.raises(InvalidArgument) as exc:
        await reg.list_webhooks("acme", -1, "")
    assert _field(exc) == "page_size"


async def test_without_a_store_webhooks_are_failed_precondition() -> None:
    with pytest.raises(FailedPrecondition) as exc:
        await WebhookRegistry(None).list_webhooks("acme", 0, "")
    assert exc.value.reason == "WEBHOOKS_NEED_STORE"


# ---- signatures --------------------------------------------------------------------------------
def test_signature_header_is_t_and_v1_and_verifies() -> None:
    body = b'{"id":"d1","type":"run.final"}'
    header = wh.signature_header("sekrit-sekrit-16", body, 1_700_000_000)
    assert re.fullmatch(r"t=1700000000,v1=[0-9a-f]{64}", header)
    import hashlib
    import hmac
    expected = hmac.new(b"sekrit-sekrit-16", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert header.endswith(expected)
    now = 1_700_000_000 + 10
    assert wh.verify_signature("sekrit-sekrit-16", header, body, now=now)
    assert wh.verify_signature("sekrit-sekrit-16", header, body.decode(), now=now)
    assert not wh.verify_signature("another-secret-16", header, body, now=now)
    assert not wh.verify_signature("sekrit-sekrit-16", header, body + b" ", now=now)
    # Outside the tolerance, either way.
    assert not wh.verify_signature("sekrit-sekrit-16", header, body, now=1_700_000_000 + 301)
    assert not wh.verify_signature("sekrit-sekrit-16", header, body, now=1_700_000_000 - 301)
    assert wh.verify_signature("sekrit-sekrit-16", header, body, tolerance_s=1000, now=1_700_000_000 + 900)
    # A rotated secret: either v1 may match; unknown keys and spaces are ignored.
    two = f"t=1700000000, v1={'0' * 64}, v0=abc, v1={expected}"
    assert wh.verify_signature("sekrit-sekrit-16", two, body, now=now)
    for bad in ("", "v1=" + expected, "t=1700000000", "t=abc,v1=" + expected, "garbage", "t=1700000000,v1="):
        assert not wh.verify_signature("sekrit-sekrit-16", bad, body, now=now)


def test_verify_signature_uses_the_clock_by_default() -> None:
    t = int(time.time())
    assert wh.verify_signature("k" * 16, wh.signature_header("k" * 16, b"{}", t), b"{}")
    assert not wh.verify_signature("k" * 16, wh.signature_header("k" * 16, b"{}", t - 3600), b"{}")


# ---- retry timing ------------------------------------------------------------------------------
def test_parse_retry_after_seconds_and_http_dates() -> None:
    now = 1_700_000_000.0
    assert wh.parse_retry_after("120", now) == 120
    assert wh.parse_retry_after(" 0 ", now) == 0
    assert wh.parse_retry_after(email.utils.formatdate(now + 30, usegmt=True), now) == pytest.approx(30, abs=1)
    assert wh.parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now) == 0
    assert wh.parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now) == 0
    for bad in ("", "-5", "1.5", "soon", "Wed, 99 Foo 2015"):
        assert wh.parse_retry_after(bad, now) is None


def test_backoff_stays_within_equal_jitter_bounds_and_the_cap() -> None:
    rng = random.Random(7)
    for attempt in range(0, 40):
        ceiling = min(60_000, 500 * 2 ** max(attempt - 1, 0))
        values = [wh.backoff_ms(attempt, 500, 60_000, rng) for _ in range(200)]
        assert all(ceiling / 2 - 1 <= v <= ceiling for v in values), (attempt, min(values), max(values))
        assert max(values) - min(values) > ceiling / 10  # jittered
    assert wh.backoff_ms(10**6, 500, 60_000, rng) <= 60_000


def test_a_longer_retry_after_wins_and_is_capped() -> None:
    rng = random.Random(1)
    kw = {"base_ms": 500, "max_ms": 60_000, "rng": rng, "now": 1_700_000_000.0}
    assert wh.retry_delay_ms(1, HttpReply(429, retry_after="30"), **kw) == 30_000
    assert 250 <= wh.retry_delay_ms(1, HttpReply(429, retry_after="0"), **kw) <= 500
    assert wh.retry_delay_ms(1, HttpReply(503, retry_after="999999"), **kw) == wh.RETRY_AFTER_MAX_MS
    date = email.utils.formatdate(1_700_000_000 + 90, usegmt=True)
    assert wh.retry_delay_ms(1, HttpReply(503, retry_after=date), **kw) == pytest.approx(90_000, abs=1000)
    assert 250 <= wh.retry_delay_ms(1, None, **kw) <= 500


def test_delivery_config_is_checked() -> None:
    with pytest.raises(InvalidArgument) as exc:
        DeliveryConfig(lease_ms=1000, timeout_s=5)
    assert _field(exc) == "webhook_lease_ms"
    with pytest.raises(InvalidArgument) as exc:
        DeliveryConfig(max_per_destination=0)
    assert _field(exc) == "webhook_max_per_destination"
    with pytest.raises(InvalidArgument) as exc:
        DeliveryConfig(backoff_base_ms=1000, backoff_max_ms=10)
    assert _field(exc) == "webhook_backoff_max_ms"


# ---- the worker --------------------------------------------------------------------------------
async def test_a_delivery_is_posted_signed_and_finished_delivered() -> None:
    store = FakeWebhookStore()
    sender = ScriptedSender()
    rec = Recorder()
    worker = DeliveryWorker(store, sender, config=fast_config(), signals=rec.signals(),
                            wall_clock=lambda: 1_700_000_000)
    d = store.add(url="https://hooks.example.com/in", event_type="approval.required", secret="the-secret-123456")
    worker.start()
    try:
        assert await wait_until(lambda: store.state(d.delivery_id) == "DELIVERED", timeout_s=5)
    finally:
        await worker.close()
    [sent] = sender.sent
    assert sent.body == d.body
    assert sent.headers["Content-Type"] == "application/json"
    assert sent.headers["X-Llmesh-Delivery"] == d.delivery_id
    assert sent.headers["X-Llmesh-Event"] == "approval.required"
    assert sent.headers["X-Llmesh-Signature"].startswith("t=1700000000,v1=")
    assert wh.verify_signature("the-secret-123456", sent.headers["X-Llmesh-Signature"], sent.body,
                               now=1_700_000_000)
    assert store.finishes == [{"delivery_id": d.delivery_id, "delivered": True, "error": "", "http_status": 200,
                               "retry_after_ms": 0}]
    assert rec.attempts == ["https://hooks.example.com:443"] and rec.failures == []
    assert worker.num_delivered == 1 and worker.in_flight == {}


async def test_failures_are_retried_with_status_error_and_delay() -> None:
    store = FakeWebhookStore()
    answers = iter([HttpReply(503, retry_after="120", text="busy\nnow"), SendError("ConnectError: refused"),
                    HttpReply(500), HttpReply(204)])
    sender = ScriptedSender(lambda url, sent: next(answers))
    rec = Recorder()
    worker = DeliveryWorker(store, sender, config=fast_config(workers=1, backoff_base_ms=1, backoff_max_ms=1),
                            signals=rec.signals())
    d = store.add(url="http://hooks.example.com/in")
    # The 120 s Retry-After is honoured by the store: move the row's due time to now to go on.
    worker.start()
    try:
        assert await wait_until(lambda: len(store.finishes) >= 1, timeout_s=5)
        first = store.finishes[0]
        assert first["delivered"] is False and first["http_status"] == 503
        assert first["error"] == "HTTP 503: busy now" and first["retry_after_ms"] == 120_000
        store.rows[0].due = 0
        assert await wait_until(lambda: store.state(d.delivery_id) == "DELIVERED", timeout_s=5)
    finally:
        await worker.close()
    second, third, last = store.finishes[1:]
    assert second["error"] == "ConnectError: refused" and second["http_status"] == 0
    assert third["error"] == "HTTP 500" and third["http_status"] == 500 and third["retry_after_ms"] <= 1
    assert last["delivered"] is True and last["http_status"] == 204
    assert [k for _, k in rec.failures] == ["http", "network", "http"]
    # The delivery id and body are the same on every attempt; the signature is made afresh.
    assert {s.headers["X-Llmesh-Delivery"] for s in sender.sent} == {d.delivery_id}
    assert {s.body for s in sender.sent} == {d.body}


async def test_a_hanging_receiver_times_out() -> None:
    store = FakeWebhookStore()
    hang = asyncio.Event()
    sender = ScriptedSender(lambda url, sent: hang.wait())
    rec = Recorder()
    worker = DeliveryWorker(store, sender, config=fast_config(workers=1, timeout_s=0.05), signals=rec.signals())
    store.add(url="https://slow.example/in")
    worker.start()
    try:
        assert await wait_until(lambda: len(store.finishes) >= 1, timeout_s=5)
    finally:
        await worker.close()
    assert store.finishes[0]["error"] == "timed out after 0.05s" and store.finishes[0]["http_status"] == 0
    assert rec.failures[0] == ("https://slow.example:443", "timeout")


async def test_a_sender_that_breaks_otherwise_still_counts_as_a_failed_attempt() -> None:
    store = FakeWebhookStore(max_attempts=2)
    rec = Recorder()
    worker = DeliveryWorker(store, ScriptedSender(lambda url, sent: ValueError("bad")),
                            config=fast_config(workers=1), signals=rec.signals())
    d = store.add(url="https://hooks.example.com/in")
    worker.start()
    try:
        assert await wait_until(lambda: store.state(d.delivery_id) == "DEAD", timeout_s=5)
    finally:
        await worker.close()
    assert store.finishes[0]["error"] == "ValueError: bad"
    assert {k for _, k in rec.failures} == {"error"}


async def test_out_of_attempts_the_store_dead_letters_and_the_signal_fires() -> None:
    store = FakeWebhookStore(max_attempts=3)
    sender = ScriptedSender(lambda url, sent: HttpReply(500))
    rec = Recorder()
    worker = DeliveryWorker(store, sender, config=fast_config(workers=2), signals=rec.signals())
    d = store.add(url="https://hooks.example.com/in")
    worker.start()
    try:
        assert await wait_until(lambda: store.state(d.delivery_id) == "DEAD", timeout_s=5)
        assert await wait_until(lambda: rec.dead == ["https://hooks.example.com:443"], timeout_s=5)
    finally:
        await worker.close()
    assert len(sender.sent) == 3


async def test_a_destination_at_its_cap_is_excluded_and_never_delays_the_others() -> None:
    store = FakeWebhookStore()
    release = asyncio.Event()

    async def slow_then_ok() -> HttpReply:
        await release.wait()
        return HttpReply(200)

    sender = ScriptedSender(lambda url, sent: slow_then_ok() if "slow" in url else HttpReply(200))
    worker = DeliveryWorker(store, sender, config=fast_config(workers=4, max_per_destination=2, timeout_s=30,
                                                              lease_ms=60_000))
    # Different sessions, so the store's per-session order does not hold them back.
    slow = [store.add(url="https://slow.example/in", session_id=f"s{i}") for i in range(6)]
    fast = [store.add(url="https://fast.example/in", session_id=f"f{i}") for i in range(20)]
    worker.start()
    try:
        assert await wait_until(lambda: all(store.state(d.delivery_id) == "DELIVERED" for d in fast), timeout_s=5)
        # Two sends to the slow destination hang; the other senders delivered everything else.
        assert sender.in_flight["https://slow.example:443"] == 2
        assert worker.in_flight == {"https://slow.example:443": 2}
        assert ["https://slow.example:443"] in store.claims
        release.set()
        assert await wait_until(lambda: all(store.state(d.delivery_id) == "DELIVERED" for d in slow), timeout_s=5)
    finally:
        await worker.close()
    assert sender.peak["https://slow.example:443"] == 2
    assert sender.peak["https://fast.example:443"] <= 2
    assert worker.excluded_destinations() == []


async def test_per_session_order_holds_through_retries() -> None:
    store = FakeWebhookStore()
    failed_once: set[bytes] = set()

    def flaky(url: str, sent: Sent) -> HttpReply:
        if sent.body not in failed_once and random.random() < 0.5:
            failed_once.add(sent.body)
            return HttpReply(500)
        return HttpReply(200)

    sender = ScriptedSender(flaky)
    worker = DeliveryWorker(store, sender, config=fast_config(workers=4, max_per_destination=4))
    sessions = {f"s{i}": [store.add(url="https://hooks.example.com/in", session_id=f"s{i}") for _ in range(8)]
                for i in range(4)}
    worker.start()
    try:
        assert await wait_until(lambda: all(r.state == "DELIVERED" for r in store.rows), timeout_s=10)
    finally:
        await worker.close()
    delivered_order = [f["delivery_id"] for f in store.finishes if f["delivered"]]
    for session, records in sessions.items():
        ids = [r.delivery_id for r in records]
        assert [i for i in delivered_order if i in ids] == ids, session


async def test_idle_senders_share_empty_claims_and_wake_when_work_arrives() -> None:
    store = FakeWebhookStore()
    worker = DeliveryWorker(store, ScriptedSender(), config=fast_config(workers=4, idle_wait_s=0.1))
    worker.start()
    try:
        await asyncio.sleep(0.55)
        # About one claim per idle wait, not one per sender per idle wait.
        assert len(store.claims) <= 10, len(store.claims)
        d = store.add(url="https://hooks.example.com/in")
        assert await wait_until(lambda: store.state(d.delivery_id) == "DELIVERED", timeout_s=2)
    finally:
        await worker.close()


async def test_send_time_check_refuses_a_host_that_now_resolves_private() -> None:
    store = FakeWebhookStore()
    sender = ScriptedSender()
    rec = Recorder()
    worker = DeliveryWorker(store, sender, config=fast_config(workers=1, allow_private=False),
                            signals=rec.signals(), resolve=resolver({"rebind.example": ["10.0.0.7"]}))
    store.add(url="https://rebind.example/in")
    worker.start()
    try:
        assert await wait_until(lambda: len(store.finishes) >= 1, timeout_s=5)
    finally:
        await worker.close()
    assert sender.sent == []
    assert store.finishes[0]["delivered"] is False
    assert store.finishes[0]["error"].startswith("destination refused: host 'rebind.example' resolves to private")
    assert rec.failures[0] == ("https://rebind.example:443", "refused")


async def test_send_time_check_of_a_host_that_no_longer_resolves_is_a_network_failure() -> None:
    store = FakeWebhookStore()
    sender = ScriptedSender()
    rec = Recorder()
    worker = DeliveryWorker(store, sender, config=fast_config(workers=1, allow_private=False),
                            signals=rec.signals(), resolve=resolver({"ok.example": [PUBLIC]}))
    store.add(url="https://gone.example/in")
    ok = store.add(url="https://ok.example/in", session_id="s2")
    worker.start()
    try:
        assert await wait_until(lambda: store.state(ok.delivery_id) == "DELIVERED", timeout_s=5)
        assert await wait_until(lambda: len(rec.failures) >= 1, timeout_s=5)
    finally:
        await worker.close()
    assert [s.url for s in sender.sent] == ["https://ok.example/in"]
    assert rec.failures[0] == ("https://gone.example:443", "network")
    assert "does not resolve" in store.finishes[0]["error"]


class _FlakyClaims(FakeWebhookStore):
    fail_claims: int = 0
    fail_finishes: int = 0

    async def claim_deliveries(self, **kw):
        if self.fail_claims:
            self.fail_claims -= 1
            raise Unavailable("store down")
        return await super().claim_deliveries(**kw)

    async def finish_delivery(self, **kw):
        if self.fail_finishes:
            self.fail_finishes -= 1
            raise Unavailable("store down")
        return await super().finish_delivery(**kw)


async def test_store_outages_are_ridden_out() -> None:
    store = _FlakyClaims()
    store.fail_claims, store.fail_finishes = 3, 2
    worker = DeliveryWorker(store, ScriptedSender(), config=fast_config(workers=1))
    d = store.add(url="https://hooks.example.com/in")
    worker.start()
    try:
        assert await wait_until(lambda: store.state(d.delivery_id) == "DELIVERED", timeout_s=5)
    finally:
        await worker.close()


async def test_a_lost_claim_is_not_fatal() -> None:
    store = FakeWebhookStore()

    def steal(url: str, sent: Sent) -> HttpReply:
        store.rows[0].record = replace(store.rows[0].record, claim_token="someone-else")
        return HttpReply(200)

    worker = DeliveryWorker(store, ScriptedSender(steal), config=fast_config(workers=1))
    store.add(url="https://hooks.example.com/in")
    worker.start()
    try:
        assert await wait_until(lambda: len(store.finishes) >= 1, timeout_s=5)
    finally:
        await worker.close()
    assert worker.num_delivered == 0 and worker.in_flight == {}


async def test_outbox_stats_reach_the_signal_and_the_gauges() -> None:
    store = FakeWebhookStore()
    rec = Recorder()
    worker = DeliveryWorker(store, ScriptedSender(), config=fast_config(workers=1, stats_interval_s=0.02),
                            signals=rec.signals())
    worker.start()
    try:
        assert await wait_until(lambda: len(rec.stats) >= 2, timeout_s=5)
    finally:
        await worker.close()
    assert rec.stats[0] == [DestinationStats("https://a.example:443", 3, 1.5, 1)]

    metrics.observe_outbox_stats([DestinationStats("https://a.example:443", 3, 1.5, 1),
                                  DestinationStats("https://b.example:443", 1, 0.25, 0)])

    def value(name: str, dest: str) -> float | None:
        return REGISTRY.get_sample_value(name, {"destination": dest})

    assert value("llmesh_orchestrator_webhook_pending", "https://a.example:443") == 3
    assert value("llmesh_orchestrator_webhook_oldest_pending_age_seconds", "https://b.example:443") == 0.25
    assert value("llmesh_orchestrator_webhook_dead", "https://a.example:443") == 1
    metrics.observe_outbox_stats([DestinationStats("https://b.example:443", 0, 0.0, 0)])
    assert value("llmesh_orchestrator_webhook_pending", "https://a.example:443") is None
    assert value("llmesh_orchestrator_webhook_pending", "https://b.example:443") == 0
    signals = metrics.webhook_signals()
    before = value("llmesh_orchestrator_webhook_attempts_total", "https://c.example:443") or 0
    signals.attempt("https://c.example:443")
    signals.failure("https://c.example:443", "timeout")
    assert value("llmesh_orchestrator_webhook_attempts_total", "https://c.example:443") == before + 1
    assert REGISTRY.get_sample_value("llmesh_orchestrator_webhook_failures_total",
                                     {"destination": "https://c.example:443", "kind": "timeout"}) >= 1


# ---- the RPCs ----------------------------------------------------------------------------------
@pytest.fixture
async def agent(request: pytest.FixtureRequest):
    """AgentService in process with the fake webhook store (or none: param "no-store")."""
    inference, tools = ScriptedInference(), FakeTools()
    hooks = None if getattr(request, "param", "") == "no-store" else FakeWebhookStore()
    sender = ScriptedSender()
    app = build_app(Settings(port=0, max_workers=0, webhook_idle_wait_s=0.02), store=MemoryStore(),
                    inference=inference, tools=tools, policy=FakePolicy(tools), webhooks=hooks,
                    webhook_sender=sender)
    async with running_service(app, Settings(port=0)) as svc:
        async with client_channel(f"127.0.0.1:{svc.port}", "acme") as channel:
            yield orchestrator_pb2_grpc.AgentServiceStub(channel), hooks, sender, app
    assert sender.closed is False  # an injected sender belongs to its owner


async def test_webhook_rpcs(agent) -> None:
    stub, hooks, sender, app = agent
    assert app.deliveries is not None
    reply = await stub.CreateWebhook(pb.CreateWebhookRequest(request_id="c1", url=f"https://{PUBLIC}/hook",
                                                             event_types=["run.final", "task.done"]))
    assert reply.webhook.url == f"https://{PUBLIC}/hook" and list(reply.webhook.event_types) == ["run.final",
                                                                                                   "task.done"]
    assert len(reply.secret) == 43
    assert hooks.webhooks[("acme", reply.webhook.webhook_id)].secret == reply.secret
    listed = await stub.ListWebhooks(pb.ListWebhooksRequest())
    assert [w.webhook_id for w in listed.webhooks] == [reply.webhook.webhook_id]
    assert not any(f.name == "secret" for f in pb.Webhook.DESCRIPTOR.fields)

    # The worker of the app delivers what the store holds.
    d = hooks.add(url=f"https://{PUBLIC}/hook", webhook_id=reply.webhook.webhook_id, secret=reply.secret)
    assert await wait_until(lambda: hooks.state(d.delivery_id) == "DELIVERED", timeout_s=5)
    assert sender.sent[0].headers["X-Llmesh-Delivery"] == d.delivery_id

    dead = hooks.add(url=f"https://{PUBLIC}/hook", webhook_id=reply.webhook.webhook_id)
    hooks.rows[-1].state = "DEAD"
    hooks.rows[-1].record = replace(dead, attempts=5, last_error="HTTP 500", last_status=500)
    dead_list = await stub.ListDeadDeliveries(pb.ListDeadDeliveriesRequest())
    [one] = dead_list.deliveries
    assert (one.delivery_id, one.attempts, one.last_error, one.last_status) == (dead.delivery_id, 5, "HTTP 500", 500)
    assert (await stub.ReplayDeliveries(pb.ReplayDeliveriesRequest(delivery_ids=[dead.delivery_id]))).num_replayed == 1
    assert await wait_until(lambda: hooks.state(dead.delivery_id) == "DELIVERED", timeout_s=5)
    dropped = await stub.DeleteWebhook(pb.DeleteWebhookRequest(webhook_id=reply.webhook.webhook_id))
    assert dropped.num_dropped == 0

    for request, field_name in [
        (pb.CreateWebhookRequest(url="http://127.0.0.1:9/h", event_types=["run.final"]), "url"),
        (pb.CreateWebhookRequest(url=f"https://{PUBLIC}/", event_types=["run.final", "nope"]), "event_types[1]"),
        (pb.CreateWebhookRequest(url=f"https://{PUBLIC}/", event_types=[]), "event_types"),
        (pb.CreateWebhookRequest(url=f"https://{PUBLIC}/", event_types=["run.final"], secret="short"), "secret"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.CreateWebhook(request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(err.value).metadata["field"] == field_name
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.DeleteWebhook(pb.DeleteWebhookRequest(webhook_id="missing"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("agent", ["no-store"], indirect=True)
async def test_without_a_store_there_are_no_webhooks(agent) -> None:
    stub, _hooks, _sender, app = agent
    assert app.deliveries is None
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ListWebhooks(pb.ListWebhooksRequest())
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(err.value).reason == "WEBHOOKS_NEED_STORE"


def test_adapter_conversions() -> None:
    from llmesh.store.v1 import store_pb2

    from services.orchestrator.adapters import grpc_webhooks

    msg = store_pb2.Delivery(delivery_id="d1", tenant_id="acme", webhook_id="w1", url="https://a.example/x",
                             destination="https://a.example:443", session_id="s1", event_type="task.dead",
                             body=b"{}", state=store_pb2.DELIVERY_STATE_DEAD, attempts=5, max_attempts=5,
                             last_error="HTTP 500", last_status=500, claim_token="t", secret="k")
    record = grpc_webhooks._delivery(msg)
    assert (record.state, record.attempts, record.destination, record.secret) == ("DEAD", 5,
                                                                                 "https://a.example:443", "k")
    hook = grpc_webhooks._webhook(store_pb2.Webhook(tenant_id="acme", webhook_id="w1", url="https://a.example/x",
                                                    event_types=["run.final"], secret="k"))
    assert hook.event_types == ("run.final",) and hook.secret == "k"


async def test_httpx_sender_reports_status_retry_after_and_timeouts() -> None:
    import httpx

    from services.orchestrator.adapters.grpc_webhooks import HttpxSender

    seen: list[httpx.Request] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/busy":
            return httpx.Response(429, headers={"Retry-After": "7"}, text="x" * 5000)
        if request.url.path == "/slow":
            raise httpx.ReadTimeout("slow", request=request)
        if request.url.path == "/down":
            raise httpx.ConnectError("refused", request=request)
        if request.url.path == "/moved":
            return httpx.Response(302, headers={"Location": "http://169.254.169.254/"})
        return httpx.Response(200)

    sender = HttpxSender(httpx.AsyncClient(transport=httpx.MockTransport(handler), follow_redirects=False))
    try:
        ok = await sender.post("https://a.example/ok", b'{"a":1}', {"X-Llmesh-Delivery": "d1"}, 1.0)
        assert ok.status == 200 and seen[0].content == b'{"a":1}' and seen[0].headers["x-llmesh-delivery"] == "d1"
        busy = await sender.post("https://a.example/busy", b"{}", {}, 1.0)
        assert (busy.status, busy.retry_after, len(busy.text)) == (429, "7", 1024)
        assert (await sender.post("https://a.example/moved", b"{}", {}, 1.0)).status == 302
        with pytest.raises(TimeoutError):
            await sender.post("https://a.example/slow", b"{}", {}, 1.0)
        with pytest.raises(SendError, match="ConnectError: refused"):
            await sender.post("https://a.example/down", b"{}", {}, 1.0)
    finally:
        await sender.aclose()

