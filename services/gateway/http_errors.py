"""Exceptions -> JSON error responses (one table: the gRPC status of each error).

A backend's failure arrives here as the domain error it raised
(services.common.rpc_errors), so its HTTP status comes from the same table.
"""
from __future__ import annotations

import logging

from starlette.responses import JSONResponse

from services.common import errors
from services.common.interceptors import ERROR_DOMAIN, status_code_for
from services.gateway.core.http_status import error_body, http_status_for

log = logging.getLogger("llmesh.gateway")


def describe_error(exc: BaseException) -> tuple[str, str, list[dict], int | None]:
    """(status code name, message, details, retry_after_ms) for any exception."""
    if isinstance(exc, errors.DomainError):
        details: list[dict] = [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": exc.reason,
                                "domain": ERROR_DOMAIN, "metadata": exc.metadata}]
        if exc.retry_after_ms is not None:
            details.append({"@type": "type.googleapis.com/google.rpc.RetryInfo",
                            "retryDelay": f"{exc.retry_after_ms / 1000:.3f}s"})
        return status_code_for(exc).name, exc.message, details, exc.retry_after_ms
    log.exception("unexpected error in the REST layer", exc_info=exc)
    return "INTERNAL", "internal error", [], None


def error_payload(exc: BaseException) -> dict:
    code, message, details, _retry = describe_error(exc)
    return error_body(code, message, details)


def _headers(code: str, retry_after_ms: int | None) -> dict[str, str]:
    headers = {}
    if retry_after_ms:
        headers["Retry-After"] = str(max(1, -(-retry_after_ms // 1000)))
    if code == "UNAUTHENTICATED":
        headers["WWW-Authenticate"] = 'Bearer realm="llmesh"'
    return headers


def error_response(exc: BaseException) -> JSONResponse:
    code, message, details, retry_after_ms = describe_error(exc)
    return JSONResponse(error_body(code, message, details), status_code=http_status_for(code),
                        headers=_headers(code, retry_after_ms))


def openai_error_response(exc: BaseException) -> JSONResponse:
    """The error shape OpenAI clients parse: {"error": {"message", "type", "param", "code"}}."""
    code, message, details, retry_after_ms = describe_error(exc)
    status = http_status_for(code)
    info = next((d for d in details if d.get("@type", "").endswith("ErrorInfo")), {})
    kind = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
            404: "not_found_error", 429: "rate_limit_error"}.get(status, "api_error")
    body = {"error": {"message": message, "type": kind, "param": info.get("metadata", {}).get("field"),
                      "code": info.get("reason", code)}}
    return JSONResponse(body, status_code=status, headers=_headers(code, retry_after_ms))
