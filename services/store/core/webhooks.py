"""Webhook subscriptions and their delivery outbox: the checks in front of the repository.

The repository writes a delivery in the transaction of the event that makes
it; this module validates what callers send and hands out pages. URL policy
(http(s) only, private destinations) is the orchestrator's, which takes the
requests of clients; the store checks only what it needs to stay sound.
"""
from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

from services.common.errors import NotFound, require
from services.store.core import validation as check
from services.store.core.models import WEBHOOK_EVENT_TYPES, DeliveryRecord, DeliveryState, Page, WebhookRecord
from services.store.core.paging import cursor_int, decode_token, encode_token, page_limit
from services.store.core.ports import StoreRepository

MAX_URL_CHARS = 2048
MAX_EXCLUDED = 256


class WebhookBook:
    def __init__(self, repo: StoreRepository, clock: Callable[[], int], max_attempts: int = 8) -> None:
        self.repo = repo
        self.clock = clock
        self.max_attempts = max_attempts

    async def create(self, record: WebhookRecord) -> WebhookRecord:
        check.check_id(record.tenant_id, "webhook.tenant_id")
        check.check_id(record.webhook_id, "webhook.webhook_id", required=False)
        parts = urlsplit(record.url)
        require(len(record.url) <= MAX_URL_CHARS and parts.scheme in ("http", "https") and bool(parts.hostname),
                "webhook.url", "must be an http(s) URL with a host")
        require(bool(record.event_types), "webhook.event_types", "must name at least one event type")
        for i, kind in enumerate(record.event_types):
            require(kind in WEBHOOK_EVENT_TYPES, f"webhook.event_types[{i}]",
                    f"must be one of {', '.join(WEBHOOK_EVENT_TYPES)}")
        require(16 <= len(record.secret) <= 256, "webhook.secret", "must be 16-256 characters")
        check.check_text(record.secret, "webhook.secret")
        record = WebhookRecord(record.tenant_id, record.webhook_id or uuid.uuid4().hex, record.url,
                               tuple(dict.fromkeys(record.event_types)), record.secret, self.max_attempts,
                               self.clock())
        return await self.repo.create_webhook(record)

    async def list_webhooks(self, tenant_id: str, page_size: int, page_token: str) -> Page:
        check.check_id(tenant_id, "tenant_id")
        limit = page_limit(page_size)
        scope = f"webhooks:{tenant_id}"
        cursor = decode_token(page_token, scope)
        rows = await self.repo.list_webhooks(tenant_id, str(cursor or ""), limit + 1)
        token = encode_token(scope, rows[limit - 1].webhook_id) if len(rows) > limit else ""
        return Page(rows[:limit], token)

    async def delete(self, tenant_id: str, webhook_id: str) -> int:
        check.check_id(tenant_id, "tenant_id")
        check.check_id(webhook_id, "webhook_id")
        dropped = await self.repo.delete_webhook(tenant_id, webhook_id)
        if dropped is None:
            raise NotFound(f"webhook {webhook_id!r} not found", reason="WEBHOOK_NOT_FOUND")
        return dropped

    async def claim(self, worker_id: str, max_deliveries: int, lease_ms: int, exclude: Sequence[str],
                    max_per_destination: int = 0) -> list[DeliveryRecord]:
        check.check_id(worker_id, "worker_id")
        require(0 < max_deliveries <= check.MAX_CLAIM, "max_deliveries", f"must be between 1 and {check.MAX_CLAIM}")
        check.check_lease_ms(lease_ms)
        require(len(exclude) <= MAX_EXCLUDED, "exclude_destinations", f"at most {MAX_EXCLUDED}")
        require(0 <= max_per_destination <= check.MAX_CLAIM, "max_per_destination",
                f"must be between 0 and {check.MAX_CLAIM}")
        return await self.repo.claim_deliveries(worker_id, max_deliveries, lease_ms, list(exclude), self.clock(),
                                                max_per_destination)

    async def finish(self, delivery_id: str, claim_token: str, delivered: bool, error: str, http_status: int,
                     retry_after_ms: int) -> DeliveryRecord:
        check.check_id(delivery_id, "delivery_id")
        check.check_id(claim_token, "claim_token")
        require(len(error) <= 4096, "error", "longer than 4096 characters")
        check.check_text(error, "error")
        require(0 <= http_status <= 999, "http_status", "must be 0 or an HTTP status")
        require(0 <= retry_after_ms <= 7 * 24 * 3600 * 1000, "retry_after_ms", "must be between 0 and a week")
        return await self.repo.finish_delivery(delivery_id, claim_token, delivered, error, http_status,
                                               retry_after_ms, self.clock())

    async def list_deliveries(self, tenant_id: str, state: DeliveryState, page_size: int, page_token: str) -> Page:
        check.check_id(tenant_id, "tenant_id")
        limit = page_limit(page_size)
        scope = f"deliveries:{tenant_id}:{int(state)}"
        cursor = decode_token(page_token, scope)
        rows = await self.repo.list_deliveries(tenant_id, state, cursor_int(cursor) if cursor else 0, limit + 1)
        token = encode_token(scope, rows[limit - 1].seq) if len(rows) > limit else ""
        return Page(rows[:limit], token)

    async def replay(self, tenant_id: str, delivery_ids: Sequence[str]) -> int:
        check.check_id(tenant_id, "tenant_id")
        require(len(delivery_ids) <= 1000, "delivery_ids", "at most 1000")
        for i, delivery_id in enumerate(delivery_ids):
            check.check_id(delivery_id, f"delivery_ids[{i}]")
        return await self.repo.replay_deliveries(tenant_id, list(delivery_ids), self.clock())

    async def stats(self) -> list[tuple[str, int, float, int]]:
        return await self.repo.outbox_stats(self.clock())
