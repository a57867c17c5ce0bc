"""ASGI middleware: every request but the public ones needs a valid API key.

A refused HTTP request gets 401 (or 429 after too many failures) before any
handler runs, so it touches no backend. A WebSocket is authenticated the
same way, by the ``Authorization`` header of its upgrade request or, for
browsers (which cannot set headers), by a first message
``{"type": "auth", "api_key": ...}``; a refused one gets an error message
and is closed with 1008 (policy violation) before any handler runs. Both
kinds of refusal are counted and audited alike.
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from services.common import errors
from services.common.auth import ApiKeyAuthenticator, Principal, principal_var
from services.common.refusals import RefusalReporter
from services.gateway.core.outbox import encode
from services.gateway.core.ws_messages import check_id, parse_json_message
from services.gateway.http_errors import error_payload, error_response

PUBLIC_PATHS = frozenset({"/openapi.json", "/healthz"})
_HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Close code of a WebSocket refused for its key (RFC 6455: policy violation).
WS_POLICY_VIOLATION = 1008
WS_REFUSAL_METHOD = "WebSocket"
_AUTH_MESSAGE_FIELDS = ("type", "api_key", "id")

Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable, Callable], Awaitable[None]]


class _Gone(Exception):
    """The WebSocket client went away before it was authenticated."""


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, authenticator: ApiKeyAuthenticator | None,
                 refusals: RefusalReporter | None = None, ws_auth_timeout_s: float = 10.0) -> None:
        self.app = app
        self.authenticator = authenticator
        self.refusals = refusals or RefusalReporter("gateway")
        self.ws_auth_timeout_s = ws_auth_timeout_s

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] == "websocket" and self.authenticator is not None:
            await self._websocket(scope, receive, send, self.authenticator)
            return
        if scope["type"] != "http" or self.authenticator is None or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        client = (scope.get("client") or ("unknown", 0))[0]
        try:
            principal = await self.authenticator.authenticate(headers.get("authorization"), client)
        except errors.DomainError as exc:
            # The caller picks the path (and even the method token): neither may grow a metric's labels.
            method = scope.get("method", "")
            self.refusals.report(f"REST {method if method in _HTTP_METHODS else 'OTHER'}", exc.reason, peer=client)
            await error_response(exc)(scope, receive, send)
            return
        await self._call_as(principal, scope, receive, send)

    async def _call_as(self, principal: Principal, scope: Scope, receive: Callable, send: Callable) -> None:
        scope.setdefault("state", {})["principal"] = principal
        # Calls to the mesh made for this request carry the client as their principal.
        token = principal_var.set(principal)
        try:
            await self.app(scope, receive, send)
        finally:
            principal_var.reset(token)

    async def _websocket(self, scope: Scope, receive: Callable, send: Callable,
                         authenticator: ApiKeyAuthenticator) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        client = (scope.get("client") or ("unknown", 0))[0]
        authorization = headers.get("authorization")
        accepted, message_id = False, None
        try:
            if authorization is None:
                # No header (a browser): accept, and read the key from the first message.
                if not await _accept(receive, send):
                    return
                accepted = True
                authorization, message_id = await self._key_message(receive)
            principal = await authenticator.authenticate(authorization, client)
        except _Gone:
            return  # left before sending anything: nothing was refused
        except errors.DomainError as exc:
            self.refusals.report(WS_REFUSAL_METHOD, exc.reason, peer=client)
            # OSError: the client left meanwhile (uvicorn's ClientDisconnected).
            with contextlib.suppress(OSError):
                if accepted or await _accept(receive, send):
                    await _send_json(send, {"type": "error", "for": "auth", **error_payload(exc)})
                    await send({"type": "websocket.close", "code": WS_POLICY_VIOLATION, "reason": exc.reason[:120]})
            return
        if not accepted:
            await self._call_as(principal, scope, receive, send)
            return
        try:
            await _send_json(send, {"type": "authenticated", "tenant_id": principal.tenant_id,
                                    **_with_id(message_id)})
        except OSError:
            return
        # The handler accepts as usual: it gets its connect event, and its accept is already done.
        replayed = False

        async def receive_after_auth() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "websocket.connect"}
            return await receive()

        async def send_after_auth(message: dict[str, Any]) -> None:
            if message["type"] != "websocket.accept":
                await send(message)

        await self._call_as(principal, scope, receive_after_auth, send_after_auth)

    async def _key_message(self, receive: Callable) -> tuple[str, Any]:
        """``Bearer <key>`` from the first message, and the message's ``id``; refused if it is not an auth message."""
        try:
            message = await asyncio.wait_for(receive(), self.ws_auth_timeout_s)
        except TimeoutError:
            raise errors.Unauthenticated(
                f"no API key: send 'Authorization: Bearer <key>' on the upgrade request, or "
                f'{{"type": "auth", "api_key": "<key>"}} within {self.ws_auth_timeout_s:g} s',
                reason="API_KEY_MISSING") from None
        if message["type"] == "websocket.disconnect":
            raise _Gone()
        payload = parse_json_message(message)
        kind = payload.get("type")
        if kind != "auth":
            raise errors.Unauthenticated(
                "no API key: send 'Authorization: Bearer <key>' on the upgrade request, or "
                f'{{"type": "auth", "api_key": "<key>"}} as the first message (got type {str(kind)[:40]!r})',
                reason="API_KEY_MISSING")
        for name in payload:
            errors.require(name in _AUTH_MESSAGE_FIELDS, name,
                           f"not a field of an auth message (fields: {', '.join(_AUTH_MESSAGE_FIELDS)})")
        message_id = check_id(payload.get("id"))
        key = payload.get("api_key")
        errors.require(isinstance(key, str) and bool(key.strip()), "api_key", "must be a non-empty string")
        assert isinstance(key, str)
        return f"Bearer {key.strip()}", message_id


def _with_id(message_id: Any) -> dict[str, Any]:
    return {} if message_id is None else {"id": message_id}


async def _accept(receive: Callable, send: Callable) -> bool:
    """Complete the handshake; False when the client left first."""
    message = await receive()
    if message["type"] != "websocket.connect":
        return False
    await send({"type": "websocket.accept"})
    return True


async def _send_json(send: Callable, payload: Any) -> None:
    await send({"type": "websocket.send", "text": encode(payload)})
