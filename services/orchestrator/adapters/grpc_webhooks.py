"""WebhookStorePort over llmesh.store.v1, and the HTTP sender of deliveries over httpx."""
from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence

import grpc
import httpx
from llmesh.store.v1 import store_pb2, store_pb2_grpc

from services.common.rpc_errors import domain_errors
from services.orchestrator.core.webhooks import (
    DeliveryRecord,
    DestinationStats,
    HttpReply,
    SendError,
    WebhookRecord,
)

#: Bytes of a receiver's answer read (for the delivery's last error); the rest is dropped unread.
MAX_ANSWER_BYTES = 1024
USER_AGENT = "llmesh-webhooks/1"


def _time(ts) -> float:
    return ts.seconds + ts.nanos / 1e9


def _webhook(msg: store_pb2.Webhook) -> WebhookRecord:
    return WebhookRecord(tenant_id=msg.tenant_id, webhook_id=msg.webhook_id, url=msg.url,
                         event_types=tuple(msg.event_types), create_time=_time(msg.create_time), secret=msg.secret)


def _delivery(msg: store_pb2.Delivery) -> DeliveryRecord:
    return DeliveryRecord(
        delivery_id=msg.delivery_id, tenant_id=msg.tenant_id, webhook_id=msg.webhook_id, url=msg.url,
        destination=msg.destination, session_id=msg.session_id, event_type=msg.event_type, body=msg.body,
        state=store_pb2.DeliveryState.Name(msg.state).removeprefix("DELIVERY_STATE_"), attempts=msg.attempts,
        max_attempts=msg.max_attempts, last_error=msg.last_error, last_status=msg.last_status,
        create_time=_time(msg.create_time), claim_token=msg.claim_token, secret=msg.secret)


class GrpcWebhooks:
    """The store's webhook and outbox RPCs."""

    def __init__(self, client) -> None:
        self._c = client

    @classmethod
    def for_channel(cls, channel: grpc.aio.Channel) -> GrpcWebhooks:
        return cls(store_pb2_grpc.StoreServiceStub(channel))

    async def create_webhook(self, *, request_id: str, tenant_id: str, webhook_id: str, url: str,
                             event_types: Sequence[str], secret: str) -> WebhookRecord:
        with domain_errors("store"):
            reply = await self._c.CreateWebhook(store_pb2.CreateWebhookRequest(
                request_id=request_id, webhook=store_pb2.Webhook(tenant_id=tenant_id, webhook_id=webhook_id, url=url,
                                                                 event_types=list(event_types), secret=secret)))
        return _webhook(reply.webhook)

    async def list_webhooks(self, *, tenant_id: str, page_size: int,
                            page_token: str) -> tuple[list[WebhookRecord], str]:
        with domain_errors("store"):
            reply = await self._c.ListWebhooks(store_pb2.ListWebhooksRequest(
                tenant_id=tenant_id, page_size=page_size, page_token=page_token))
        return [_webhook(w) for w in reply.webhooks], reply.next_page_token

    async def delete_webhook(self, *, tenant_id: str, webhook_id: str) -> int:
        with domain_errors("store"):
            reply = await self._c.DeleteWebhook(store_pb2.DeleteWebhookRequest(tenant_id=tenant_id,
                                                                               webhook_id=webhook_id))
        return reply.num_dropped

    async def claim_deliveries(self, *, worker_id: str, max_deliveries: int, lease_ms: int,
                               exclude_destinations: Sequence[str],
                               max_per_destination: int = 0) -> list[DeliveryRecord]:
        with domain_errors("store"):
            reply = await self._c.ClaimDeliveries(store_pb2.ClaimDeliveriesRequest(
                request_id=uuid.uuid4().hex, worker_id=worker_id, max_deliveries=max_deliveries, lease_ms=lease_ms,
                exclude_destinations=list(exclude_destinations), max_per_destination=max_per_destination))
        return [_delivery(d) for d in reply.deliveries]

    async def finish_delivery(self, *, delivery_id: str, claim_token: str, delivered: bool, error: str,
                              http_status: int, retry_after_ms: int) -> DeliveryRecord:
        outcome = store_pb2.DELIVERY_OUTCOME_DELIVERED if delivered else store_pb2.DELIVERY_OUTCOME_RETRY
        with domain_errors("store"):
            reply = await self._c.FinishDelivery(store_pb2.FinishDeliveryRequest(
                delivery_id=delivery_id, claim_token=claim_token, outcome=outcome, error=error,
                http_status=http_status, retry_after_ms=retry_after_ms))
        return _delivery(reply.delivery)

    async def list_dead_deliveries(self, *, tenant_id: str, page_size: int,
                                   page_token: str) -> tuple[list[DeliveryRecord], str]:
        with domain_errors("store"):
            reply = await self._c.ListDeliveries(store_pb2.ListDeliveriesRequest(
                tenant_id=tenant_id, state=store_pb2.DELIVERY_STATE_DEAD, page_size=page_size,
                page_token=page_token))
        return [_delivery(d) for d in reply.deliveries], reply.next_page_token

    async def replay_deliveries(self, *, tenant_id: str, delivery_ids: Sequence[str]) -> int:
        with domain_errors("store"):
            reply = await self._c.ReplayDeliveries(store_pb2.ReplayDeliveriesRequest(
                tenant_id=tenant_id, delivery_ids=list(delivery_ids)))
        return reply.num_replayed

    async def outbox_stats(self) -> list[DestinationStats]:
        with domain_errors("store"):
            reply = await self._c.GetOutboxStats(store_pb2.GetOutboxStatsRequest())
        return [DestinationStats(destination=d.destination, pending=d.pending,
                                 oldest_pending_age_s=d.oldest_pending_age_s, dead=d.dead) for d in reply.destinations]


class HttpxSender:
    """POSTs deliveries through one httpx.AsyncClient: no redirects followed, no proxy from the environment."""

    def __init__(self, client: httpx.AsyncClient | None = None, *, max_connections: int = 100) -> None:
        self._client = client or httpx.AsyncClient(
            follow_redirects=False, trust_env=False, headers={"User-Agent": USER_AGENT},
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections))

    async def post(self, url: str, body: bytes, headers: Mapping[str, str], timeout_s: float) -> HttpReply:
        try:
            async with self._client.stream("POST", url, content=body, headers=dict(headers),
                                           timeout=httpx.Timeout(timeout_s)) as response:
                answer = b""
                async for chunk in response.aiter_bytes():
                    answer += chunk
                    if len(answer) >= MAX_ANSWER_BYTES:
                        break
                return HttpReply(status=response.status_code, retry_after=response.headers.get("retry-after", ""),
                                 text=answer[:MAX_ANSWER_BYTES].decode("utf-8", "replace"))
        except httpx.TimeoutException as exc:
            raise TimeoutError(f"timed out ({type(exc).__name__})") from None
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise SendError(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__) from None

    async def aclose(self) -> None:
        await self._client.aclose()
