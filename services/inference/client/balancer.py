"""Client-side balancer over N inference nodes.

    balancer = Balancer(["127.0.0.1:50051", "127.0.0.1:50062"])
    await balancer.start()
    async for reply in balancer.generate(request, session_id="s-1"):
        ...
    reply = await balancer.unary("CountTokens", request)
    await balancer.close()

A request goes to a healthy, non-ejected node chosen by the Picker (session
affinity, then the node holding its prompt's prefix, then power of two
choices on cost). A call that fails before its
first streamed message is retried on a node not yet tried; once a message
reached the caller the failure is the caller's, since replaying would
duplicate tokens. With no usable node the call fails at once with
UNAVAILABLE (reason NO_HEALTHY_NODE) instead of waiting.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import grpc
from llmesh.inference.v1 import inference_pb2, inference_pb2_grpc
from prometheus_client import Counter

from services.common import errors
from services.common.identity import Identity
from services.inference.client.config import BalancerSettings
from services.inference.client.core.node_state import EjectionPolicy, Health, NodeState
from services.inference.client.core.picker import NoNodeAvailable, Picker, PickerConfig, PrefixQuery
from services.inference.client.discovery import Resolver, has_dns_entries, resolve_dns, resolve_entries
from services.inference.client.node_link import NodeLink
from services.inference.client.router import Router, remaining_s
from services.inference.client.routing import ModelRegistry
from services.inference.client.rpc_errors import is_node_fault, is_retryable, to_domain_error

log = logging.getLogger("llmesh.balancer")

PICKS = Counter("llmesh_balancer_picks_total", "Requests sent to a node.", ["node", "reason"])
RETRIES = Counter("llmesh_balancer_retries_total", "Requests retried on another node before the first token.",
                  ["code"])
EJECTIONS = Counter("llmesh_balancer_ejections_total", "Nodes ejected after consecutive failures.", ["node"])
NO_NODE = Counter("llmesh_balancer_no_node_total", "Requests failed fast because no node was usable.")


@dataclass(frozen=True)
class PickedNode:
    """A node chosen for a call the caller makes itself (see ``pick``)."""

    address: str
    stub: inference_pb2_grpc.InferenceServiceStub
    state: NodeState


class Balancer:
    def __init__(
        self,
        nodes: Sequence[str] | str | None = None,
        settings: BalancerSettings | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        resolver: Resolver = resolve_dns,
        identity: Identity | None = None,
    ) -> None:
        settings = settings or BalancerSettings()
        if nodes is not None:
            settings = replace(settings, nodes=(nodes,) if isinstance(nodes, str) else tuple(nodes))
        errors.require(bool(settings.nodes), "nodes", "at least one inference node (host:port or dns:host:port)")
        self.settings = settings
        self._clock = clock
        self._resolver = resolver
        # What this balancer presents to the nodes: its service's key (and certificate).
        self.identity = identity
        self._policy = EjectionPolicy(settings.eject_after_failures, settings.ejection_base_s, settings.ejection_max_s)
        self._picker = Picker(PickerConfig(
            strategy=settings.strategy, initial_ttft_ms=settings.initial_ttft_ms, itl_weight=settings.itl_weight,
            kv_weight=settings.kv_weight, affinity_max_queue_depth=settings.affinity_max_queue_depth,
            affinity_max_kv_usage=settings.affinity_max_kv_usage,
            affinity_latency_ratio=settings.affinity_latency_ratio,
            prefix_affinity_chars=settings.prefix_affinity_chars, prefix_routed_max=settings.prefix_routed_max,
            prefix_routed_ttl_s=settings.prefix_routed_ttl_s, affinity_table_size=settings.affinity_table_size,
        ), rng=rng)
        self._links: dict[str, NodeLink] = {}
        self._refresh_task: asyncio.Task[None] | None = None
        # Model chains and cascades, over this transport's per-model streams.
        self.router = Router(settings, self._generate_on_model, lambda: self.nodes, clock)

    # -- lifecycle --------------------------------------------------------
    async def start(self) -> None:
        """Connect to every node and wait (bounded) for their first health answer."""
        await self._sync_nodes(await resolve_entries(self.settings.nodes, self._resolver))
        if has_dns_entries(self.settings.nodes):
            self._refresh_task = asyncio.create_task(self._refresh_dns(), name="balancer-dns")
        await self.wait_for_health(self.settings.start_timeout_s)

    async def close(self) -> None:
        if self._refresh_task is not None:
            self._refresh_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresh_task
        links, self._links = list(self._links.values()), {}
        await asyncio.gather(*(link.close() for link in links))

    async def __aenter__(self) -> Balancer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def wait_for_health(self, timeout_s: float) -> None:
        """Until every node reported health once (and a serving one its models), or ``timeout_s`` passed."""
        async def known(link: NodeLink) -> None:
            await link.health_known.wait()
            if link.state.health is Health.SERVING:
                await link.models_listed.wait()

        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(known(link) for link in self._links.values())), timeout_s)

    async def _sync_nodes(self, addresses: set[str]) -> None:
        for address in sorted(addresses - self._links.keys()):
            link = NodeLink(address, self.settings, self.identity)
            link.start()
            self._links[address] = link
        gone = [self._links.pop(address) for address in sorted(self._links.keys() - addresses)]
        await asyncio.gather(*(link.close() for link in gone))
        if gone:
            log.info("nodes removed", extra={"event": "nodes_removed", "nodes": [g.address for g in gone]})

    async def _refresh_dns(self) -> None:
        while True:
            await asyncio.sleep(self.settings.dns_refresh_s)
            try:
                addresses = await resolve_entries(self.settings.nodes, self._resolver)
            except OSError as exc:
                # Keep the nodes we know: a DNS hiccup must not empty the pool.
                log.warning("node lookup failed", extra={"event": "dns_failed", "error": str(exc)})
                continue
            if addresses:
                await self._sync_nodes(addresses)

    # -- state for callers, tests and metrics -----------------------------
    @property
    def nodes(self) -> Mapping[str, NodeState]:
        return {address: link.state for address, link in self._links.items()}

    def holder_of(self, session_id: str) -> str | None:
        """The node a session is sticking to, if any."""
        return self._picker.holder_of("session:" + session_id)

    # -- choosing ---------------------------------------------------------
    def _choose(self, key: str | None, exclude: set[str], model: str = "",
                prefix: PrefixQuery | None = None) -> NodeLink:
        try:
            pick = self._picker.choose(self.nodes, self._clock(), key, exclude, model, prefix)
        except NoNodeAvailable:
            NO_NODE.inc()
            serving = f" serving model {model!r}" if model else ""
            raise errors.Unavailable(
                f"no healthy inference node{serving} (of {len(self._links)}; tried {len(exclude)})",
                reason="NO_HEALTHY_NODE", metadata={"num_nodes": str(len(self._links))}) from None
        PICKS.labels(pick.node.address, pick.reason).inc()
        pick.node.num_picked += 1
        return self._links[pick.node.address]

    def pick(self, session_id: str | None = None, prompt: str = "", *, tenant_id: str = "") -> PickedNode:
        """A node for a call made directly on its stub; prefer ``unary``, which also counts outcomes.

        ``prompt`` and ``tenant_id`` (the request's) let a new session go where its prefix is cached.
        """
        link = self._choose(self._picker.affinity_key(session_id), set(),
                            prefix=self._picker.prefix_query(tenant_id, prompt))
        return PickedNode(link.address, link.inference, link.state)

    def _record_failure(self, link: NodeLink, err: grpc.aio.AioRpcError) -> None:
        if is_node_fault(err) and link.state.record_failure(self._clock(), self._policy):
            EJECTIONS.labels(link.address).inc()
            log.warning("node ejected", extra={"event": "node_ejected", "node": link.address,
                                               "until_s": round(link.state.ejected_until - self._clock(), 3)})

    def _remaining(self, deadline: float | None) -> float | None:
        return remaining_s(deadline, self._clock())

    # -- calls --------------------------------------------------------------
    def _next_link(self, key: str | None, tried: set[str], last: errors.DomainError | None,
                   model: str = "", prefix: PrefixQuery | None = None) -> NodeLink:
        """The next node to try; with none left, the last node's error (or UNAVAILABLE)."""
        try:
            link = self._choose(key, tried, model, prefix)
        except errors.Unavailable:
            if last is not None:
                raise last from None
            raise
        tried.add(link.address)
        return link

    async def unary(self, method: str, request: Any, *, session_id: str | None = None,
                    timeout: float | None = None, tenant_id: str | None = None) -> Any:
        """Call a unary InferenceService method (Tokenize, CountTokens, ...) with retries elsewhere.

        ``tenant_id`` defaults to the request's own: prefix hashes are per tenant.
        """
        key = self._picker.affinity_key(session_id)
        tenant = getattr(request, "tenant_id", "") if tenant_id is None else tenant_id
        prefix = self._picker.prefix_query(tenant or "", getattr(request, "prompt", "") or "")
        deadline = None if timeout is None else self._clock() + timeout
        tried: set[str] = set()
        last: errors.DomainError | None = None
        model = getattr(request, "model", "")
        for _attempt in range(self.settings.max_attempts):
            link = self._next_link(key, tried, last, model, prefix)
            link.state.num_inflight += 1
            try:
                reply = await getattr(link.inference, method)(request, timeout=self._remaining(deadline))
            except grpc.aio.AioRpcError as err:
                self._record_failure(link, err)
                last = to_domain_error(err, link.address)
                if not is_retryable(err):
                    raise last from None
                RETRIES.labels(err.code().name).inc()
                continue
            finally:
                link.state.num_inflight -= 1
            link.state.record_success(self._clock(), self._policy)
            return reply
        assert last is not None
        raise last

    # -- models -------------------------------------------------------------
    def registry(self) -> ModelRegistry:
        """The model names healthy nodes serve now, with their configured profiles."""
        return self.router.registry()

    def model_chain(self, request: inference_pb2.GenerateRequest) -> list[str]:
        """Models to try for a request, in order (see ``Router.model_chain``)."""
        return self.router.model_chain(request)

    def generate(self, request: inference_pb2.GenerateRequest, *, session_id: str | None = None,
                 timeout: float | None = None) -> AsyncGenerator[inference_pb2.GenerateResponse, None]:
        """Stream a generation: through the router's cascades and model chains, each model
        served by ``_generate_on_model`` (retrying on another node until the first token)."""
        return self.router.generate(request, session_id=session_id, timeout=timeout)

    async def _generate_on_model(self, request: inference_pb2.GenerateRequest, session_id: str | None,
                                 timeout: float | None) -> AsyncGenerator[inference_pb2.GenerateResponse, None]:
        """Stream from the best node serving ``request.model``, retrying elsewhere until the first message."""
        session = request.session_id if session_id is None else session_id
        key = self._picker.affinity_key(session)
        # Token-id prompts leave request.prompt empty: no prefix routing for them.
        prefix = self._picker.prefix_query(request.tenant_id, request.prompt)
        deadline = None if timeout is None else self._clock() + timeout
        tried: set[str] = set()
        last: errors.DomainError | None = None
        for _attempt in range(self.settings.max_attempts):
            link = self._next_link(key, tried, last, request.model, prefix)
            num_streamed = 0
            failed: grpc.aio.AioRpcError | None = None
            async with contextlib.aclosing(self._stream_from(link, request, deadline)) as stream:
                async for reply in stream:
                    if isinstance(reply, grpc.aio.AioRpcError):
                        failed = reply
                        break
                    num_streamed += 1
                    yield reply
            if failed is None:
                return
            last = to_domain_error(failed, link.address, num_streamed)
            if num_streamed or not is_retryable(failed):
                raise last from None
            RETRIES.labels(failed.code().name).inc()
        assert last is not None
        raise last

    async def _stream_from(self, link: NodeLink, request: inference_pb2.GenerateRequest,
                           deadline: float | None
                           ) -> AsyncGenerator[inference_pb2.GenerateResponse | grpc.aio.AioRpcError, None]:
        """One attempt: yields replies, then the call's error (as a value) if it failed."""
        state = link.state
        state.num_inflight += 1
        started = self._clock()
        last_token_at: float | None = None
        call = link.inference.Generate(request, timeout=self._remaining(deadline))
        try:
            async for reply in call:
                now = self._clock()
                num_tokens = len(reply.token_ids) or (1 if reply.text else 0)
                if num_tokens:
                    if last_token_at is None:
                        state.record_ttft((now - started) * 1000)
                    else:
                        state.record_itl((now - last_token_at) * 1000 / num_tokens)
                    last_token_at = now
                yield reply
        except grpc.aio.AioRpcError as err:
            self._record_failure(link, err)
            yield err
            return
        finally:
            state.num_inflight -= 1
            # The caller may stop reading early: free the node's sequence.
            call.cancel()
        state.record_success(self._clock(), self._policy)
