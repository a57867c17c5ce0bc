"""Webhook subscriptions and the workers that deliver them.

The store writes a delivery row in the same transaction as the event that
triggers it (a transactional outbox), so this side only has to send what it
claims. ``WebhookRegistry`` serves the AgentService webhook RPCs: it
validates a subscription (an http(s) URL whose host resolves to public
addresses only, unless ``allow_private``; known event types; a signing
secret, generated when none is given) and passes it to the store.

``DeliveryWorker`` runs ``workers`` senders per replica. Each claims one due
delivery at a time under a lease, POSTs its body signed with the webhook's
secret, and finishes it in the store: DELIVERED on a 2xx, else RETRY after an
exponential backoff with equal jitter, or after the receiver's Retry-After
when that is longer. The store dead-letters a delivery that ran out of
attempts and never hands out a delivery of a session while an earlier one of
that session to the same webhook is still pending, so order holds per
session and webhook. At most ``max_per_destination`` sends to one
destination (scheme://host:port) run at once on a replica: a destination at
its cap is excluded from claims, so a slow or dead endpoint holds at most
that many senders and never delays deliveries to the others.

Receivers check ``X-Llmesh-Signature`` with ``verify_signature`` (or the
same rule in their own language, docs/webhooks.md) and de-duplicate on
``X-Llmesh-Delivery``: a delivery can arrive twice when a replica stops
between a receiver's 2xx and FinishDelivery, or the answer came after the
lease.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import email.utils
import hashlib
import hmac
import ipaddress
import logging
import random
import secrets
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlsplit

from services.common.errors import DomainError, FailedPrecondition, InvalidArgument, Unavailable, require

log = logging.getLogger("llmesh.orchestrator.webhooks")

#: Event types a webhook may subscribe to.
EVENT_TYPES = ("run.final", "run.error", "approval.required", "task.done", "task.dead")
SECRET_MIN_CHARS = 16
SECRET_MAX_CHARS = 256
URL_MAX_CHARS = 2048
#: A receiver's Retry-After is followed up to this long (a longer one is cut to it).
RETRY_AFTER_MAX_MS = 3_600_000
#: Signatures older or newer than this are refused by verify_signature by default.
SIGNATURE_TOLERANCE_S = 300
#: How long a destination's send-time address check is remembered.
DESTINATION_CHECK_TTL_S = 30.0
#: Characters of a receiver's error answer kept as the delivery's last error.
ERROR_TEXT_CHARS = 200
#: Tries of FinishDelivery while the store is unavailable.
FINISH_ATTEMPTS = 3
#: Seconds between two warnings about failing claims.
CLAIM_WARNING_INTERVAL_S = 60.0
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 50

SIGNATURE_HEADER = "X-Llmesh-Signature"
DELIVERY_HEADER = "X-Llmesh-Delivery"
EVENT_HEADER = "X-Llmesh-Event"


# ---- records and ports -------------------------------------------------------------------------
@dataclass(frozen=True)
class WebhookRecord:
    tenant_id: str
    webhook_id: str
    url: str
    event_types: tuple[str, ...]
    create_time: float = 0.0
    # Set only where the store hands it out (never in listings).
    secret: str = ""


@dataclass(frozen=True)
class DeliveryRecord:
    delivery_id: str
    tenant_id: str
    webhook_id: str
    url: str
    # scheme://host:port of url.
    destination: str
    session_id: str
    event_type: str
    body: bytes
    # PENDING, CLAIMED, DELIVERED or DEAD.
    state: str = "PENDING"
    # Attempts made, this one included once claimed.
    attempts: int = 0
    max_attempts: int = 0
    last_error: str = ""
    last_status: int = 0
    create_time: float = 0.0
    # Claims only: the token FinishDelivery needs, and the webhook's secret.
    claim_token: str = ""
    secret: str = ""


@dataclass(frozen=True)
class DestinationStats:
    destination: str
    pending: int
    oldest_pending_age_s: float
    dead: int = 0


class WebhookStorePort(Protocol):
    """The store's webhook RPCs (adapters/grpc_webhooks.py)."""

    async def create_webhook(self, *, request_id: str, tenant_id: str, webhook_id: str, url: str,
                             event_types: Sequence[str], secret: str) -> WebhookRecord:
        """Store the webhook; one that exists already under (tenant_id, webhook_id) is answered as it is."""
        ...

    async def list_webhooks(self, *, tenant_id: str, page_size: int,
                            page_token: str) -> tuple[list[WebhookRecord], str]: ...

    async def delete_webhook(self, *, tenant_id: str, webhook_id: str) -> int: ...

    async def claim_deliveries(self, *, worker_id: str, max_deliveries: int, lease_ms: int,
                               exclude_destinations: Sequence[str],
                               max_per_destination: int = 0) -> list[DeliveryRecord]: ...

    async def finish_delivery(self, *, delivery_id: str, claim_token: str, delivered: bool, error: str,
                              http_status: int, retry_after_ms: int) -> DeliveryRecord: ...

    async def list_dead_deliveries(self, *, tenant_id: str, page_size: int,
                                   page_token: str) -> tuple[list[DeliveryRecord], str]: ...

    async def replay_deliveries(self, *, tenant_id: str, delivery_ids: Sequence[str]) -> int: ...

    async def outbox_stats(self) -> list[DestinationStats]: ...


@dataclass(frozen=True)
class HttpReply:
    status: int
    # The Retry-After header as sent, empty when absent.
    retry_after: str = ""
    # The start of the answer's body (for the delivery's last error).
    text: str = ""


class SendError(Exception):
    """The request got no HTTP answer (refused, reset, TLS, DNS); the message says what happened."""


class HttpSender(Protocol):
    async def post(self, url: str, body: bytes, headers: Mapping[str, str], timeout_s: float) -> HttpReply:
        """POST without following redirects; raise SendError when no answer came."""
        ...

    async def aclose(self) -> None: ...


#: (host, port) -> the addresses it resolves to.
Resolver = Callable[[str, int], Awaitable[list[str]]]


async def resolve_host(host: str, port: int) -> list[str]:
    """Every address getaddrinfo gives for host (run in a thread: it blocks)."""
    infos = await asyncio.to_thread(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


# ---- URLs and destinations ---------------------------------------------------------------------
@dataclass(frozen=True)
class ParsedUrl:
    scheme: str
    host: str
    port: int

    @property
    def destination(self) -> str:
        """scheme://host:port, as the store names destinations."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def parse_url(url: str, field_name: str = "url") -> ParsedUrl:
    """Check the shape of a webhook URL: http(s), a host, no userinfo; InvalidArgument naming the field."""
    require(bool(url.strip()), field_name, "must not be empty")
    require(len(url) <= URL_MAX_CHARS, field_name, f"must be at most {URL_MAX_CHARS} characters")
    require(url == url.strip() and not any(ord(c) < 33 or ord(c) == 127 for c in url), field_name,
            "must not contain spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InvalidArgument(f"{field_name}: not a valid URL ({exc})", field=field_name) from None
    scheme = parts.scheme.lower()
    require(scheme in ("http", "https"), field_name, "must be an http or https URL")
    require("@" not in parts.netloc, field_name, "must not carry a user name or password")
    host = (parts.hostname or "").lower()
    require(bool(host), field_name, "must name a host")
    return ParsedUrl(scheme, host, port or (443 if scheme == "https" else 80))


def refused_address(address: str) -> str:
    """Why an address may not be called back ("" when it may): private, loopback and the like."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return "not an IP address"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for kind in ("unspecified", "loopback", "link_local", "multicast", "reserved", "private"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    if not ip.is_global:
        # Shared address space (100.64.0.0/10) and the like: not reachable from the internet either.
        return "non-global"
    return ""


async def check_destination(host: str, port: int, resolve: Resolver, field_name: str = "url") -> None:
    """InvalidArgument naming the field unless every address of host is a public one."""
    try:
        addresses = await resolve(host, port)
    except (OSError, UnicodeError) as exc:
        raise InvalidArgument(f"{field_name}: host {host!r} does not resolve ({exc})", field=field_name,
                              reason="WEBHOOK_HOST_UNRESOLVED") from None
    if not addresses:
        raise InvalidArgument(f"{field_name}: host {host!r} does not resolve", field=field_name,
                              reason="WEBHOOK_HOST_UNRESOLVED")
    for address in addresses:
        why = refused_address(address)
        if why:
            raise InvalidArgument(
                f"{field_name}: host {host!r} resolves to {why} address {address}; such destinations "
                "need the orchestrator's webhook_allow_private setting", field=field_name,
                reason="WEBHOOK_DESTINATION_REFUSED")


# ---- signatures, Retry-After, backoff ----------------------------------------------------------
def _as_bytes(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else value


def signature(secret: str, body: bytes | str, timestamp: int) -> str:
    """Hex HMAC-SHA256 of f"{timestamp}." + body under secret."""
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + _as_bytes(body), hashlib.sha256).hexdigest()


def signature_header(secret: str, body: bytes | str, timestamp: int) -> str:
    """The X-Llmesh-Signature value: ``t=<unix seconds>,v1=<hex HMAC-SHA256>``."""
    return f"t={timestamp},v1={signature(secret, body, timestamp)}"


def verify_signature(secret: str, header: str, body: bytes | str, tolerance_s: float = SIGNATURE_TOLERANCE_S,
                     *, now: float | None = None) -> bool:
    """Whether an X-Llmesh-Signature header signs body under secret, made within tolerance_s of now.

    The header is ``t=<unix seconds>,v1=<hex>``; several v1 values are accepted
    (any one may match), unknown keys are ignored. Compare in constant time,
    and check the timestamp: a recorded request replayed later is refused.
    """
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t":
            try:
                timestamp = int(value)
            except ValueError:
                return False
        elif key == "v1" and value:
            candidates.append(value.lower())
    if timestamp is None or not candidates:
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        return False
    expected = signature(secret, body, timestamp)
    return any(hmac.compare_digest(expected, candidate) for candidate in candidates)


def parse_retry_after(value: str, now: float | None = None) -> float | None:
    """Seconds a Retry-After header asks for (delta seconds or an HTTP-date); None when absent or unreadable."""
    value = value.strip()
    if not value:
        return None
    if value.isdigit():
        return float(int(value))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def backoff_ms(attempt: int, base_ms: int, max_ms: int, rng: random.Random) -> int:
    """Equal-jitter exponential backoff after the attempt-th failed attempt (1-based): in [d/2, d],
    d = min(max_ms, base_ms * 2**(attempt-1))."""
    exponent = min(max(attempt, 1) - 1, 62)
    ceiling = min(max_ms, base_ms * 2**exponent)
    half = ceiling / 2
    return int(half + rng.uniform(0, half))


def retry_delay_ms(attempt: int, reply: HttpReply | None, *, base_ms: int, max_ms: int, rng: random.Random,
                   now: float | None = None) -> int:
    """The backoff, or the receiver's Retry-After when that is longer (cut to RETRY_AFTER_MAX_MS)."""
    delay = backoff_ms(attempt, base_ms, max_ms, rng)
    asked = parse_retry_after(reply.retry_after, now) if reply is not None else None
    if asked is not None:
        delay = max(delay, min(RETRY_AFTER_MAX_MS, int(asked * 1000)))
    return delay


# ---- subscriptions -----------------------------------------------------------------------------
@dataclass(frozen=True)
class CreatedWebhook:
    webhook: WebhookRecord
    # Returned once, on create.
    secret: str


class WebhookRegistry:
    """The AgentService webhook RPCs: validation here, records in the store."""

    def __init__(self, store: WebhookStorePort | None, *, allow_private: bool = False,
                 resolve: Resolver = resolve_host) -> None:
        self._store_port = store
        self.allow_private = allow_private
        self._resolve = resolve

    @property
    def _store(self) -> WebhookStorePort:
        if self._store_port is None:
            raise FailedPrecondition("webhooks need a store: the orchestrator has no store_target",
                                     reason="WEBHOOKS_NEED_STORE")
        return self._store_port

    async def validate_url(self, url: str) -> ParsedUrl:
        parsed = parse_url(url)
        if not self.allow_private:
            await check_destination(parsed.host, parsed.port, self._resolve)
        return parsed

    @staticmethod
    def validate_event_types(event_types: Sequence[str]) -> tuple[str, ...]:
        require(bool(event_types), "event_types", f"must name at least one of {', '.join(EVENT_TYPES)}")
        for i, event_type in enumerate(event_types):
            require(event_type in EVENT_TYPES, f"event_types[{i}]",
                    f"unknown event type {event_type!r} (one of {', '.join(EVENT_TYPES)})")
        return tuple(dict.fromkeys(event_types))

    @staticmethod
    def validate_secret(secret: str) -> str:
        if not secret:
            return secrets.token_urlsafe(32)
        require(SECRET_MIN_CHARS <= len(secret) <= SECRET_MAX_CHARS, "secret",
                f"must be {SECRET_MIN_CHARS} to {SECRET_MAX_CHARS} characters (empty: one is generated)")
        return secret

    async def create(self, *, request_id: str, tenant_id: str, url: str, event_types: Sequence[str],
                     secret: str) -> CreatedWebhook:
        require(bool(tenant_id.strip()), "tenant_id", "must not be empty")
        types = self.validate_event_types(event_types)
        secret = self.validate_secret(secret)
        await self.validate_url(url)
        request_id = request_id or uuid.uuid4().hex
        record = await self._store.create_webhook(request_id=request_id, tenant_id=tenant_id,
                                                  webhook_id=webhook_id_for(tenant_id, request_id), url=url,
                                                  event_types=types, secret=secret)
        # A retried create (same request_id, so the same webhook id) answers the stored webhook; its secret
        # is the stored one where the store hands it back.
        return CreatedWebhook(webhook=_without_secret(record), secret=record.secret or secret)

    async def list_webhooks(self, tenant_id: str, page_size: int,
                            page_token: str) -> tuple[list[WebhookRecord], str]:
        require(bool(tenant_id.strip()), "tenant_id", "must not be empty")
        require(page_size >= 0, "page_size", "must not be negative")
        records, token = await self._store.list_webhooks(
            tenant_id=tenant_id, page_size=min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE),
            page_token=page_token)
        return [_without_secret(r) for r in records], token

    async def delete(self, tenant_id: str, webhook_id: str) -> int:
        require(bool(tenant_id.strip()), "tenant_id", "must not be empty")
        require(bool(webhook_id.strip()), "webhook_id", "must not be empty")
        return await self._store.delete_webhook(tenant_id=tenant_id, webhook_id=webhook_id)

    async def list_dead(self, tenant_id: str, page_size: int, page_token: str) -> tuple[list[DeliveryRecord], str]:
        require(bool(tenant_id.strip()), "tenant_id", "must not be empty")
        require(page_size >= 0, "page_size", "must not be negative")
        records, token = await self._store.list_dead_deliveries(
            tenant_id=tenant_id, page_size=min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE),
            page_token=page_token)
        return [_without_delivery_secrets(r) for r in records], token

    async def replay(self, tenant_id: str, delivery_ids: Sequence[str]) -> int:
        require(bool(tenant_id.strip()), "tenant_id", "must not be empty")
        for i, delivery_id in enumerate(delivery_ids):
            require(bool(delivery_id.strip()), f"delivery_ids[{i}]", "must not be empty")
        return await self._store.replay_deliveries(tenant_id=tenant_id, delivery_ids=list(delivery_ids))


def webhook_id_for(tenant_id: str, request_id: str) -> str:
    """The webhook id a create request makes: the same for a retried request, so it makes one webhook."""
    return "wh-" + hashlib.sha256(f"{tenant_id}\0{request_id}".encode()).hexdigest()[:24]


def _without_secret(record: WebhookRecord) -> WebhookRecord:
    return WebhookRecord(record.tenant_id, record.webhook_id, record.url, record.event_types, record.create_time)


def _without_delivery_secrets(record: DeliveryRecord) -> DeliveryRecord:
    return dataclasses.replace(record, secret="", claim_token="")


# ---- delivery ----------------------------------------------------------------------------------
def _nothing(*_args: object) -> None:
    return None


@dataclass(frozen=True)
class DeliverySignals:
    """Hooks the server points at its metrics; each returns at once and never raises."""

    # An attempt to a destination began.
    attempt: Callable[[str], None] = _nothing
    # An attempt failed: (destination, kind), kind one of "timeout", "network", "http", "refused", "error".
    failure: Callable[[str, str], None] = _nothing
    # A delivery ran out of attempts (the store dead-lettered it).
    dead: Callable[[str], None] = _nothing
    # Fresh outbox statistics, every destination with pending or dead deliveries.
    stats: Callable[[list[DestinationStats]], None] = _nothing


@dataclass(frozen=True)
class DeliveryConfig:
    workers: int = 4
    lease_ms: int = 30_000
    max_per_destination: int = 2
    timeout_s: float = 5.0
    backoff_base_ms: int = 500
    backoff_max_ms: int = 60_000
    idle_wait_s: float = 0.2
    stats_interval_s: float = 5.0
    allow_private: bool = False

    def __post_init__(self) -> None:
        require(self.workers >= 0, "webhook_workers", "must be >= 0")
        require(self.max_per_destination >= 1, "webhook_max_per_destination", "must be >= 1")
        require(self.timeout_s > 0, "webhook_timeout_s", "must be > 0")
        require(self.lease_ms > self.timeout_s * 1000, "webhook_lease_ms", "must be longer than webhook_timeout_s")
        require(self.backoff_base_ms >= 1, "webhook_backoff_base_ms", "must be >= 1")
        require(self.backoff_max_ms >= self.backoff_base_ms, "webhook_backoff_max_ms",
                "must be >= webhook_backoff_base_ms")
        require(self.idle_wait_s > 0, "webhook_idle_wait_s", "must be > 0")
        require(self.stats_interval_s >= 0, "webhook_stats_interval_s", "must be >= 0")


@dataclass
class _Outcome:
    delivered: bool
    error: str = ""
    status: int = 0
    retry_after_ms: int = 0
    kind: str = ""


class DestinationRefused(Exception):
    """The destination resolves to an address webhooks may not call."""


@dataclass
class _DestinationGuard:
    """The send-time address check (a host may resolve elsewhere than when it was subscribed)."""

    resolve: Resolver
    clock: Callable[[], float]
    ttl_s: float = DESTINATION_CHECK_TTL_S
    # (host, port) -> (when checked, why refused or "", whether it did not resolve at all).
    _checked: dict[tuple[str, int], tuple[float, str, bool]] = field(default_factory=dict)

    async def check(self, url: str) -> None:
        """DestinationRefused for a non-public address; SendError for a host that does not resolve."""
        parsed = parse_url(url)
        key = (parsed.host, parsed.port)
        cached = self._checked.get(key)
        if cached is None or self.clock() - cached[0] > self.ttl_s:
            why, unresolved = "", False
            try:
                await check_destination(parsed.host, parsed.port, self.resolve)
            except InvalidArgument as exc:
                why, unresolved = exc.message.removeprefix("url: "), exc.reason == "WEBHOOK_HOST_UNRESOLVED"
            if len(self._checked) > 4096:
                self._checked.clear()
            cached = self._checked[key] = (self.clock(), why, unresolved)
        if cached[2]:
            raise SendError(cached[1])
        if cached[1]:
            raise DestinationRefused(cached[1])


class DeliveryWorker:
    """``config.workers`` senders claiming deliveries from the store and POSTing them."""

    def __init__(self, store: WebhookStorePort, sender: HttpSender, *, worker_id: str = "",
                 config: DeliveryConfig = DeliveryConfig(), signals: DeliverySignals = DeliverySignals(),
                 resolve: Resolver = resolve_host, rng: random.Random | None = None,
                 clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self.sender = sender
        self.worker_id = worker_id or uuid.uuid4().hex[:12]
        self.config = config
        self._signals = signals
        self._rng = rng or random.Random()
        self._clock = clock
        self._wall_clock = wall_clock
        self._guard = None if config.allow_private else _DestinationGuard(resolve, clock)
        #: Sends in flight here, by destination.
        self.in_flight: dict[str, int] = {}
        # Claimed in one batch, waiting for a free sender (counted in flight already).
        self._ready: collections.deque[DeliveryRecord] = collections.deque()
        self._claim_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        # Bumped on anything that may make a claim find work: skips repeated empty claims in one idle wait.
        self._generation = 0
        self._empty: tuple[int, float] | None = None
        self._claim_warned = -CLAIM_WARNING_INTERVAL_S
        self._tasks: list[asyncio.Task] = []
        #: Attempts made here since start, and how many ended delivered.
        self.num_attempts = 0
        self.num_delivered = 0

    # -- lifecycle
    def start(self) -> None:
        for i in range(self.config.workers):
            self._tasks.append(asyncio.create_task(self._work(), name=f"webhook-sender-{self.worker_id}-{i}"))
        if self.config.workers and self.config.stats_interval_s > 0:
            self._tasks.append(asyncio.create_task(self._refresh_stats(), name=f"webhook-stats-{self.worker_id}"))

    async def close(self) -> None:
        """Stop at once: a send cut short is sent again once its lease expires (same delivery id)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    def wake(self) -> None:
        self._generation += 1
        self._wake.set()

    # -- claiming
    def excluded_destinations(self) -> list[str]:
        """Destinations at their cap here: claims pass them over."""
        cap = self.config.max_per_destination
        return sorted(d for d, n in self.in_flight.items() if n >= cap)

    async def claim_one(self) -> DeliveryRecord | None:
        """One due delivery to a destination with room, counted in flight until ``release``.

        A claim asks for as many deliveries as there are free senders, at most one per destination, so
        a destination below its cap never goes over it; the others wait here for a sender.
        """
        async with self._claim_lock:
            if self._ready:
                return self._ready.popleft()
            if self._empty is not None and self._empty[0] == self._generation \
                    and self._clock() - self._empty[1] < self.config.idle_wait_s:
                # Another sender found nothing a moment ago, and nothing happened here since.
                return None
            generation = self._generation
            try:
                room = max(1, self.config.workers - sum(self.in_flight.values()))
                claimed = await self._store.claim_deliveries(
                    worker_id=self.worker_id, max_deliveries=room, lease_ms=self.config.lease_ms,
                    exclude_destinations=self.excluded_destinations(), max_per_destination=1)
            except DomainError as exc:
                # Unavailable, or a store without webhooks (UNIMPLEMENTED): found empty, told now and then.
                if self._clock() - self._claim_warned >= CLAIM_WARNING_INTERVAL_S:
                    self._claim_warned = self._clock()
                    log.warning("could not claim webhook deliveries: %s", exc.message)
                claimed = []
            if not claimed:
                self._empty = (generation, self._clock())
                return None
            self._empty = None
            for delivery in claimed:
                self.in_flight[delivery.destination] = self.in_flight.get(delivery.destination, 0) + 1
            self._ready.extend(claimed[1:])
            return claimed[0]

    def release(self, delivery: DeliveryRecord) -> None:
        left = self.in_flight.get(delivery.destination, 0) - 1
        if left > 0:
            self.in_flight[delivery.destination] = left
        else:
            self.in_flight.pop(delivery.destination, None)
        # The next delivery of its session, or one to a destination that was at its cap, may be due now.
        self.wake()

    async def _work(self) -> None:
        while True:
            generation = self._generation
            try:
                delivery = await self.claim_one()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("webhook claim failed unexpectedly")
                delivery = None
            if delivery is None:
                if generation != self._generation:
                    continue  # something happened while it looked: look again now
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), self.config.idle_wait_s)
                except TimeoutError:
                    pass
                continue
            # There may be more: idle senders look at once.
            self.wake()
            try:
                await self.deliver(delivery)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("webhook delivery failed unexpectedly", extra={"delivery_id": delivery.delivery_id})
            finally:
                self.release(delivery)

    # -- sending
    def headers(self, delivery: DeliveryRecord, timestamp: int) -> dict[str, str]:
        return {"Content-Type": "application/json", DELIVERY_HEADER: delivery.delivery_id,
                EVENT_HEADER: delivery.event_type,
                SIGNATURE_HEADER: signature_header(delivery.secret, delivery.body, timestamp)}

    async def attempt(self, delivery: DeliveryRecord) -> _Outcome:
        """One POST of a claimed delivery, and what to tell the store about it."""
        reply: HttpReply | None = None
        self.num_attempts += 1
        self._signals.attempt(delivery.destination)
        try:
            async with asyncio.timeout(self.config.timeout_s):
                if self._guard is not None:
                    await self._guard.check(delivery.url)
                headers = self.headers(delivery, int(self._wall_clock()))
                reply = await self.sender.post(delivery.url, delivery.body, headers, self.config.timeout_s)
        except TimeoutError:
            outcome = _Outcome(False, f"timed out after {self.config.timeout_s:g}s", kind="timeout")
        except DestinationRefused as exc:
            outcome = _Outcome(False, f"destination refused: {exc}", kind="refused")
        except SendError as exc:
            outcome = _Outcome(False, str(exc) or type(exc).__name__, kind="network")
        except OSError as exc:
            outcome = _Outcome(False, f"{type(exc).__name__}: {exc}", kind="network")
        except Exception as exc:
            # A sender that broke in some other way: still a failed attempt, so it is retried and can go dead.
            log.warning("webhook sender failed: %r", exc, extra={"delivery_id": delivery.delivery_id})
            outcome = _Outcome(False, f"{type(exc).__name__}: {exc}", kind="error")
        else:
            if 200 <= reply.status < 300:
                return _Outcome(True, status=reply.status)
            text = " ".join(reply.text.split())[:ERROR_TEXT_CHARS]
            outcome = _Outcome(False, f"HTTP {reply.status}" + (f": {text}" if text else ""), status=reply.status,
                               kind="http")
        outcome.retry_after_ms = retry_delay_ms(
            delivery.attempts, reply, base_ms=self.config.backoff_base_ms, max_ms=self.config.backoff_max_ms,
            rng=self._rng, now=self._wall_clock())
        self._signals.failure(delivery.destination, outcome.kind)
        return outcome

    async def deliver(self, delivery: DeliveryRecord) -> None:
        outcome = await self.attempt(delivery)
        finished = await self._finish(delivery, outcome)
        if finished is None:
            return
        if outcome.delivered:
            self.num_delivered += 1
        elif finished.state == "DEAD":
            self._signals.dead(delivery.destination)
            log.warning("webhook delivery dead after %d attempts: %s", finished.attempts, outcome.error,
                        extra={"delivery_id": delivery.delivery_id})

    async def _finish(self, delivery: DeliveryRecord, outcome: _Outcome) -> DeliveryRecord | None:
        """Tell the store; None when it could not be told (the lease then expires and the delivery is sent again)."""
        for attempt in range(FINISH_ATTEMPTS):
            try:
                return await self._store.finish_delivery(
                    delivery_id=delivery.delivery_id, claim_token=delivery.claim_token, delivered=outcome.delivered,
                    error=outcome.error, http_status=outcome.status, retry_after_ms=outcome.retry_after_ms)
            except Unavailable as exc:
                if attempt == FINISH_ATTEMPTS - 1:
                    log.warning("could not finish webhook delivery (its lease will expire): %s", exc.message,
                                extra={"delivery_id": delivery.delivery_id})
                    return None
                await asyncio.sleep(0.05 * 2**attempt)
            except DomainError as exc:
                # CLAIM_LOST: the lease expired and another sender has it (or the webhook was deleted).
                log.warning("webhook delivery not finished: %s", exc.message,
                            extra={"delivery_id": delivery.delivery_id})
                return None
        return None

    # -- statistics
    async def _refresh_stats(self) -> None:
        while True:
            try:
                self._signals.stats(await self._store.outbox_stats())
            except asyncio.CancelledError:
                raise
            except DomainError as exc:
                log.debug("no outbox statistics: %s", exc.message)
            except Exception:
                log.exception("outbox statistics failed unexpectedly")
            await asyncio.sleep(self.config.stats_interval_s)
