"""The one error tree of the interface tier.

Every error we raise on purpose derives from :class:`HuleEduError`. Expected, user-visible
problems (bad input, missing rights, limits) are :class:`ClientError`; trouble with something
we depend on (a gRPC backend, the broker, the store) is :class:`DependencyError`; a broken
invariant of our own is :class:`InternalError`. Anything else that escapes is a bug::

    (class)                              code              HTTP  gRPC                WS close
    HuleEduError                         error              500  INTERNAL            1011
    ├── ConfigurationError               config_invalid     500  INTERNAL            1011
    ├── ClientError                      client_error       400  INVALID_ARGUMENT    1008
    │   ├── ValidationError              validation_failed  422  INVALID_ARGUMENT    1007
    │   ├── AuthenticationError          unauthenticated    401  UNAUTHENTICATED     4001
    │   │   ├── TokenExpiredError        token_expired      401  UNAUTHENTICATED     4002
    │   │   └── SessionRevokedError      session_revoked    401  UNAUTHENTICATED     4003
    │   ├── PermissionDeniedError        permission_denied  403  PERMISSION_DENIED   4004
    │   ├── NotFoundError                not_found          404  NOT_FOUND           1008
    │   ├── ConflictError                conflict           409  ALREADY_EXISTS      1008
    │   ├── PayloadTooLargeError         payload_too_large  413  RESOURCE_EXHAUSTED  1009
    │   ├── UnsupportedMediaTypeError    unsupported_media_type 415 INVALID_ARGUMENT 1003
    │   ├── RequestTimeoutError          request_timeout    408  INVALID_ARGUMENT    1008
    │   ├── HeadersTooLargeError         headers_too_large  431  INVALID_ARGUMENT    1008
    │   ├── MethodNotAllowedError        method_not_allowed 405  INVALID_ARGUMENT    1008
    │   └── RateLimitedError             rate_limited       429  RESOURCE_EXHAUSTED  4029
    ├── DependencyError                  dependency_failed  502  UNAVAILABLE         1011
    │   ├── UnavailableError             unavailable        503  UNAVAILABLE         1013
    │   │   └── CircuitOpenError         circuit_open       503  UNAVAILABLE         1013
    │   ├── DeadlineExceededError        deadline_exceeded  504  DEADLINE_EXCEEDED   1011
    │   ├── BusError                     bus_error          503  UNAVAILABLE         1011
    │   │   └── PublishError             publish_failed     503  UNAVAILABLE         1011
    │   └── StorageError                 storage_error      503  UNAVAILABLE         1011
    └── InternalError                    internal_error     500  INTERNAL            1011

Each error carries structured fields (``field`` for the offending input, ``retry_after`` in
seconds, ``service`` for a dependency) and has exactly one mapping to each face:

* HTTP: :func:`to_problem` builds an RFC 9457 ``application/problem+json`` body (every
  authentication failure gives the same body: expiry and revocation are not told apart);
* WebSocket: :attr:`HuleEduError.ws_close_code` (see :class:`WsCloseCode`);
* gRPC: :attr:`HuleEduError.grpc_status`, and :func:`from_grpc_status` for the way back.

Messages of :class:`DependencyError` and :class:`InternalError` are for logs: the public
``detail`` of those is generic, so a backend's message can never leak to a client.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any, ClassVar

from grpclib.const import Status as GrpcStatus

__all__ = [
    "AuthenticationError",
    "BusError",
    "CircuitOpenError",
    "ClientError",
    "ConfigurationError",
    "ConflictError",
    "DeadlineExceededError",
    "DependencyError",
    "GrpcStatus",
    "HeadersTooLargeError",
    "HuleEduError",
    "InternalError",
    "MethodNotAllowedError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "PublishError",
    "RateLimitedError",
    "RequestTimeoutError",
    "SessionRevokedError",
    "StorageError",
    "TokenExpiredError",
    "UnavailableError",
    "UnsupportedMediaTypeError",
    "ValidationError",
    "WsCloseCode",
    "from_grpc_status",
    "to_problem",
]

PROBLEM_CONTENT_TYPE = "application/problem+json"
PROBLEM_TYPE_BASE = "https://errors.huleedu.dev/"


class WsCloseCode(enum.IntEnum):
    """WebSocket close codes used by the tier (documented in wsmanager/PROTOCOL.md)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    UNSUPPORTED_DATA = 1003
    INVALID_PAYLOAD = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013
    AUTH_FAILED = 4001
    TOKEN_EXPIRED = 4002
    SESSION_REVOKED = 4003
    FORBIDDEN = 4004
    TOO_MANY_CONNECTIONS = 4008
    SLOW_CONSUMER = 4009
    PONG_TIMEOUT = 4010
    RATE_LIMITED = 4029


class HuleEduError(Exception):
    """Base of every error the tier raises on purpose.

    ``message`` is the full, log-facing text; ``detail`` is what a client may see (it defaults
    to ``message`` for client errors and to a generic sentence for everything else).
    """

    code: ClassVar[str] = "error"
    #: The code clients see; differs from ``code`` only where the difference must not leak.
    public_code: ClassVar[str | None] = None
    http_status: ClassVar[int] = 500
    grpc_status: ClassVar[GrpcStatus] = GrpcStatus.INTERNAL
    ws_close_code: ClassVar[WsCloseCode] = WsCloseCode.INTERNAL_ERROR
    title: ClassVar[str] = "Error"
    public_detail: ClassVar[str | None] = "An internal error occurred."

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        retry_after: float | None = None,
        service: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.retry_after = retry_after
        self.service = service
        self.extra: dict[str, Any] = dict(extra or {})

    @property
    def detail(self) -> str:
        """The client-safe description."""
        return self.message if self.public_detail is None else self.public_detail

    def __repr__(self) -> str:
        parts = [repr(self.message)]
        for name in ("field", "retry_after", "service"):
            value = getattr(self, name)
            if value is not None:
                parts.append(f"{name}={value!r}")
        return f"{type(self).__name__}({', '.join(parts)})"


class ConfigurationError(HuleEduError):
    """A setting is missing or invalid; raised at start-up, naming the setting in ``field``."""

    code = "config_invalid"
    title = "Invalid configuration"


class ClientError(HuleEduError):
    """The caller did something we refuse; the message is safe to show them."""

    code = "client_error"
    http_status = 400
    grpc_status = GrpcStatus.INVALID_ARGUMENT
    ws_close_code = WsCloseCode.POLICY_VIOLATION
    title = "Bad request"
    public_detail: ClassVar[str | None] = None


class ValidationError(ClientError):
    """Input failed validation; ``field`` names it (dotted path, e.g. ``files.0.name``)."""

    code = "validation_failed"
    http_status = 422
    ws_close_code = WsCloseCode.INVALID_PAYLOAD
    title = "Validation failed"

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        errors: list[dict[str, str]] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(message, field=field, **kwargs)
        #: Every problem found, each ``{"field": ..., "message": ...}``; at least this one.
        self.errors = errors or [{"field": field or "", "message": message}]


class AuthenticationError(ClientError):
    """No valid credentials. One public text for every cause: the reason stays in logs."""

    code = "unauthenticated"
    http_status = 401
    grpc_status = GrpcStatus.UNAUTHENTICATED
    ws_close_code = WsCloseCode.AUTH_FAILED
    title = "Unauthorized"
    public_detail: ClassVar[str | None] = "Missing or invalid credentials."


class TokenExpiredError(AuthenticationError):
    """Expired token. Clients see the same 401 as for any other authentication failure."""

    code = "token_expired"
    public_code = "unauthenticated"
    ws_close_code = WsCloseCode.TOKEN_EXPIRED


class SessionRevokedError(AuthenticationError):
    code = "session_revoked"
    public_code = "unauthenticated"
    ws_close_code = WsCloseCode.SESSION_REVOKED


class PermissionDeniedError(ClientError):
    code = "permission_denied"
    http_status = 403
    grpc_status = GrpcStatus.PERMISSION_DENIED
    ws_close_code = WsCloseCode.FORBIDDEN
    title = "Forbidden"


class NotFoundError(ClientError):
    code = "not_found"
    http_status = 404
    grpc_status = GrpcStatus.NOT_FOUND
    title = "Not found"


class ConflictError(ClientError):
    code = "conflict"
    http_status = 409
    grpc_status = GrpcStatus.ALREADY_EXISTS
    title = "Conflict"


class PayloadTooLargeError(ClientError):
    """A size limit was exceeded; ``field`` names the limit (e.g. ``max_file_bytes``)."""

    code = "payload_too_large"
    http_status = 413
    grpc_status = GrpcStatus.RESOURCE_EXHAUSTED
    ws_close_code = WsCloseCode.MESSAGE_TOO_BIG
    title = "Payload too large"


class UnsupportedMediaTypeError(ClientError):
    code = "unsupported_media_type"
    http_status = 415
    grpc_status = GrpcStatus.INVALID_ARGUMENT
    ws_close_code = WsCloseCode.UNSUPPORTED_DATA
    title = "Unsupported media type"


class RequestTimeoutError(ClientError):
    """The client did not send its request (body) within the deadline; the connection is cut."""

    code = "request_timeout"
    http_status = 408
    title = "Request timeout"


class HeadersTooLargeError(ClientError):
    """The request headers exceed the size cap (``field`` names the limit)."""

    code = "headers_too_large"
    http_status = 431
    title = "Request header fields too large"


class MethodNotAllowedError(ClientError):
    code = "method_not_allowed"
    http_status = 405
    title = "Method not allowed"


class RateLimitedError(ClientError):
    """A rate limit said no; ``retry_after`` (seconds) says when to try again."""

    code = "rate_limited"
    http_status = 429
    grpc_status = GrpcStatus.RESOURCE_EXHAUSTED
    ws_close_code = WsCloseCode.RATE_LIMITED
    title = "Too many requests"


class DependencyError(HuleEduError):
    """Something we depend on failed; ``service`` names it. Detail is generic for clients."""

    code = "dependency_failed"
    http_status = 502
    grpc_status = GrpcStatus.UNAVAILABLE
    title = "Bad gateway"
    public_detail = "A backend service failed."


class UnavailableError(DependencyError):
    code = "unavailable"
    http_status = 503
    ws_close_code = WsCloseCode.TRY_AGAIN_LATER
    title = "Service unavailable"
    public_detail = "A backend service is unavailable; try again later."


class CircuitOpenError(UnavailableError):
    """The circuit breaker for ``service`` is open; ``retry_after`` is when it half-opens."""

    code = "circuit_open"


class DeadlineExceededError(DependencyError):
    code = "deadline_exceeded"
    http_status = 504
    grpc_status = GrpcStatus.DEADLINE_EXCEEDED
    title = "Gateway timeout"
    public_detail = "A backend service did not answer in time."


class BusError(DependencyError):
    """The event bus (Kafka or the in-memory bus) failed."""

    code = "bus_error"
    http_status = 503
    title = "Event bus unavailable"
    public_detail = "The event bus is unavailable; try again later."


class PublishError(BusError):
    """An event was not acknowledged by the broker; it may not have been written."""

    code = "publish_failed"


class StorageError(DependencyError):
    code = "storage_error"
    http_status = 503
    title = "Storage unavailable"
    public_detail = "Storage is unavailable; try again later."


class InternalError(HuleEduError):
    """A broken invariant of our own. The message is for logs only."""

    code = "internal_error"
    title = "Internal server error"


def to_problem(
    error: HuleEduError,
    *,
    correlation_id: str | None = None,
    instance: str | None = None,
) -> dict[str, Any]:
    """The RFC 9457 problem+json body for ``error`` (serve with ``PROBLEM_CONTENT_TYPE``)."""
    code = error.public_code or error.code
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE_BASE + code,
        "title": error.title,
        "status": error.http_status,
        "detail": error.detail,
        "code": code,
    }
    if instance is not None:
        body["instance"] = instance
    if correlation_id is not None:
        body["correlation_id"] = correlation_id
    if isinstance(error, ClientError) and error.field is not None:
        body["field"] = error.field
    if isinstance(error, ValidationError):
        body["errors"] = list(error.errors)
    if error.retry_after is not None:
        body["retry_after"] = max(0, round(error.retry_after))
    return body


_FROM_GRPC: dict[GrpcStatus, type[HuleEduError]] = {
    GrpcStatus.INVALID_ARGUMENT: ValidationError,
    GrpcStatus.OUT_OF_RANGE: ValidationError,
    GrpcStatus.FAILED_PRECONDITION: ConflictError,
    GrpcStatus.ALREADY_EXISTS: ConflictError,
    GrpcStatus.ABORTED: ConflictError,
    GrpcStatus.UNAUTHENTICATED: AuthenticationError,
    GrpcStatus.PERMISSION_DENIED: PermissionDeniedError,
    GrpcStatus.NOT_FOUND: NotFoundError,
    GrpcStatus.RESOURCE_EXHAUSTED: RateLimitedError,
    GrpcStatus.UNAVAILABLE: UnavailableError,
    GrpcStatus.DEADLINE_EXCEEDED: DeadlineExceededError,
    GrpcStatus.CANCELLED: DependencyError,
    GrpcStatus.UNKNOWN: DependencyError,
    GrpcStatus.INTERNAL: DependencyError,
    GrpcStatus.UNIMPLEMENTED: DependencyError,
    GrpcStatus.DATA_LOSS: DependencyError,
}

#: Field-name metadata key a server sets for INVALID_ARGUMENT, so the client can name it.
GRPC_FIELD_METADATA_KEY = "x-huleedu-field"


def from_grpc_status(
    status: GrpcStatus,
    message: str | None,
    *,
    service: str,
    field: str | None = None,
) -> HuleEduError:
    """Map a gRPC status received from ``service`` onto the tree.

    Client-class statuses keep the backend's message (the backend is ours and writes
    client-safe messages for them); dependency-class ones keep it for logs only.
    """
    cls = _FROM_GRPC.get(status, DependencyError)
    if status is GrpcStatus.RESOURCE_EXHAUSTED and field is not None:
        cls = PayloadTooLargeError  # a named limit (file size, count), not a request rate
    text = message or status.name
    if issubclass(cls, ClientError):
        return cls(text, field=field, service=service)
    return cls(f"{service}: {status.name}: {text}", service=service)
