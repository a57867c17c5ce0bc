"""gRPC status code name -> HTTP status, as google.rpc.Code documents it."""
from __future__ import annotations

HTTP_STATUS_BY_CODE: dict[str, int] = {
    "OK": 200,
    "CANCELLED": 499,
    "UNKNOWN": 500,
    "INVALID_ARGUMENT": 400,
    "DEADLINE_EXCEEDED": 504,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "PERMISSION_DENIED": 403,
    "UNAUTHENTICATED": 401,
    "RESOURCE_EXHAUSTED": 429,
    "FAILED_PRECONDITION": 400,
    "ABORTED": 409,
    "OUT_OF_RANGE": 400,
    "UNIMPLEMENTED": 501,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DATA_LOSS": 500,
}

# The numeric google.rpc.Code values, for the "code" of a JSON error body.
RPC_CODE_NUMBER: dict[str, int] = {
    name: number for number, name in enumerate([
        "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
        "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
        "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"])
}


def http_status_for(code_name: str) -> int:
    return HTTP_STATUS_BY_CODE.get(code_name, 500)


def error_body(code_name: str, message: str, details: list[dict] | None = None) -> dict:
    """The JSON error body (the google.rpc.Status shape Google's HTTP APIs use)."""
    return {"error": {"code": http_status_for(code_name), "status": code_name, "message": message,
                      "details": details or []}}
