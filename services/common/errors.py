"""Domain errors raised by service cores.

Cores raise these and never import grpc; the one error interceptor in
``services.common.interceptors`` maps each class to a gRPC status code and a
``google.rpc.ErrorInfo`` whose reason is ``exc.reason`` (UPPER_SNAKE_CASE).
"""
from __future__ import annotations


class DomainError(Exception):
    """Base of every error a core may raise on purpose."""

    default_reason = "ERROR"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        field: str | None = None,
        metadata: dict[str, str] | None = None,
        retry_after_ms: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.field = field
        self.metadata = dict(metadata or {})
        if field:
            self.metadata.setdefault("field", field)
        self.retry_after_ms = retry_after_ms


class InvalidArgument(DomainError):
    default_reason = "INVALID_ARGUMENT"


class NotFound(DomainError):
    default_reason = "NOT_FOUND"


class AlreadyExists(DomainError):
    default_reason = "ALREADY_EXISTS"


class PermissionDenied(DomainError):
    default_reason = "PERMISSION_DENIED"


class Unauthenticated(DomainError):
    default_reason = "UNAUTHENTICATED"


class FailedPrecondition(DomainError):
    default_reason = "FAILED_PRECONDITION"


class Aborted(DomainError):
    """A concurrent change won; the caller may retry from a fresh read."""

    default_reason = "ABORTED"


class ResourceExhausted(DomainError):
    """Back-pressure: a queue or quota is full; retry after retry_after_ms."""

    default_reason = "RESOURCE_EXHAUSTED"


class Unavailable(DomainError):
    default_reason = "UNAVAILABLE"


class DeadlineExceeded(DomainError):
    default_reason = "DEADLINE_EXCEEDED"


class Cancelled(DomainError):
    default_reason = "CANCELLED"


class Unimplemented(DomainError):
    """The called service does not serve this method (another version of it)."""

    default_reason = "UNIMPLEMENTED"


def require(condition: bool, field: str, message: str) -> None:
    """Raise InvalidArgument naming ``field`` unless ``condition`` holds."""
    if not condition:
        raise InvalidArgument(f"{field}: {message}", field=field)
