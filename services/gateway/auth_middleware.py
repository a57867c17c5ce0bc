"""ASGI middleware: every request but the public ones needs a valid API key.

A refused request gets 401 (or 429 after too many failures) before any
handler runs, so it touches no backend.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from services.common import errors
from services.common.auth import ApiKeyAuthenticator, principal_var
from services.common.refusals import RefusalReporter
from services.gateway.http_errors import error_response

PUBLIC_PATHS = frozenset({"/openapi.json", "/healthz"})
_HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable, Callable], Awaitable[None]]


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, authenticator: ApiKeyAuthenticator | None,
                 refusals: RefusalReporter | None = None) -> None:
        self.app = app
        self.authenticator = authenticator
        self.refusals = refusals or RefusalReporter("gateway")

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
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
        scope.setdefault("state", {})["principal"] = principal
        # Calls to the mesh made for this request carry the client as their principal.
        token = principal_var.set(principal)
        try:
            await self.app(scope, receive, send)
        finally:
            principal_var.reset(token)
