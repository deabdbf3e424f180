"""The gateway's HTTP app (quart-trio): auth routes and the JWKS, behind :mod:`gateway.edge`.

Routes are thin: parse and validate (pydantic, unknown fields refused), rate-limit, call
:class:`~gateway.auth.AuthService`, shape the JSON. Every error, raised anywhere, leaves as an
RFC 9457 problem document; authentication failures all look the same (401, one body,
``WWW-Authenticate: Bearer error="invalid_token"``), whatever the cause.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import wraps
from typing import Any, TypeVar

import pydantic
from opentelemetry.trace import TracerProvider
from quart import Response, g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from common.errors import (
    AuthenticationError,
    ClientError,
    HuleEduError,
    InternalError,
    MethodNotAllowedError,
    NotFoundError,
    ValidationError,
)
from common.logs import get_logger
from common.tokens import AccessClaims
from gateway.auth import AuthService, TokenPair
from gateway.edge import EdgeConfig, EdgeMiddleware, EdgeStatistics
from gateway.http import Strict, asgi_scope, json_response, problem, read_body
from gateway.limits import Limited, RateLimits
from gateway.openapi import api, install_openapi

__all__ = [
    "API_VERSION",
    "GatewayApp",
    "JwksResponse",
    "LoginRequest",
    "MeResponse",
    "RefreshRequest",
    "RouteSet",
    "TicketResponse",
    "TokenResponse",
    "UserOut",
    "create_app",
]

log = get_logger("gateway.app")

M = TypeVar("M", bound=pydantic.BaseModel)
#: RFC 6750 b64token after exactly one space (stricter than the RFC's 1*SP on purpose).
_B64TOKEN = re.compile(r"[A-Za-z0-9._~+/-]+=*")
#: The API's version in the OpenAPI document.
API_VERSION = "1.0.0"
Handler = Callable[..., Awaitable[Response]]
#: Adds routes to the app; gets the ``protected`` decorator for authenticated ones.
RouteSet = Callable[[QuartTrio, Callable[[Handler], Handler]], None]


class LoginRequest(Strict):
    email: str = pydantic.Field(min_length=3, max_length=254)
    password: str = pydantic.Field(min_length=1, max_length=1024)


class RefreshRequest(Strict):
    refresh_token: str = pydantic.Field(min_length=1, max_length=256)


class UserOut(pydantic.BaseModel):
    user_id: str
    org_id: str
    roles: list[str]
    display_name: str


class TokenResponse(pydantic.BaseModel):
    """A token pair. Send ``access_token`` as ``Authorization: Bearer ...``; trade
    ``refresh_token`` (once) for a new pair before ``refresh_expires_in`` runs out."""

    access_token: str
    token_type: str = pydantic.Field(description="Always `Bearer`.")
    expires_in: int = pydantic.Field(description="Seconds the access token is valid.")
    refresh_token: str
    refresh_expires_in: int
    session_id: str
    user: UserOut | None = pydantic.Field(default=None, description="On login only.")


class MeResponse(pydantic.BaseModel):
    user_id: str
    org_id: str
    roles: list[str]
    session_id: str
    expires_at: int = pydantic.Field(description="When the access token expires (Unix time).")


class TicketResponse(pydantic.BaseModel):
    """A one-time ticket for the WebSocket handshake."""

    ticket: str
    expires_in: int


class JwksResponse(pydantic.BaseModel):
    """The public keys access tokens are signed with (current and previous), by ``kid``."""

    keys: list[dict[str, Any]]


@dataclass
class GatewayApp:
    app: QuartTrio
    asgi: EdgeMiddleware
    stats: EdgeStatistics


def _token_response(pair: TokenPair, limited: Limited, **more: Any) -> Response:
    payload = {
        "access_token": pair.access_token,
        "token_type": "Bearer",
        "expires_in": pair.expires_in,
        "refresh_token": pair.refresh_token,
        "refresh_expires_in": pair.refresh_expires_in,
        "session_id": pair.session_id,
        **more,
    }
    return json_response(payload, headers=limited.headers())


def create_app(
    auth: AuthService,
    limits: RateLimits,
    edge: EdgeConfig,
    *,
    jwks: Callable[[], dict[str, Any]],
    tracer_provider: TracerProvider | None = None,
    routes: Sequence[RouteSet] = (),
) -> GatewayApp:
    """The app with the auth routes, plus each of ``routes`` (called with the app and the
    ``protected`` decorator that authenticates and rate-limits a handler)."""
    app = QuartTrio("gateway")
    app.config["MAX_CONTENT_LENGTH"] = edge.max_body_bytes
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False

    def client() -> str:
        return str(asgi_scope().get("huleedu.client", ""))

    def protected(handler: Handler) -> Handler:
        """Verify the bearer token, then count the request against the user's limit.

        A request without a valid token counts against its address (and gets 429 before 401
        once that budget is spent, so a token-guessing client is slowed down too).
        """

        @wraps(handler)
        async def wrapper(*args: Any, **kwargs: Any) -> Response:
            header = request.headers.get("authorization", "")
            scheme, _, token = header.partition(" ")
            try:
                if scheme.lower() != "bearer" or not _B64TOKEN.fullmatch(token):
                    raise AuthenticationError("no bearer token")
                claims = auth.verify(token)
            except AuthenticationError as exc:
                log.info("authentication failed", reason=exc.message, route=request.path)
                g.limited = limits.check(limits.address, client())
                raise
            g.claims = claims
            g.limited = limits.check(limits.user, claims.sub)
            response = await handler(*args, **kwargs)
            for name, value in g.limited.headers().items():
                response.headers.setdefault(name, value)
            return response

        return wrapper

    @app.before_request
    async def route_template() -> None:
        rule = request.url_rule
        asgi_scope()["huleedu.route"] = rule.rule if rule is not None else None

    @app.errorhandler(HuleEduError)
    async def on_error(error: HuleEduError) -> Response:
        if not isinstance(error, ClientError):
            log.error("request failed", code=error.code, reason=error.message)
        return problem(error)

    @app.errorhandler(HTTPException)
    async def on_http_exception(error: HTTPException) -> Response:
        status = error.code or 500
        mapped: HuleEduError
        if status == 404:
            mapped = NotFoundError(f"no route {request.path}", field="path")
        elif status == 405:
            mapped = MethodNotAllowedError(
                f"{request.method} is not allowed on {request.path}", field="method"
            )
        elif status == 413:
            mapped = ValidationError("request body too large", field="max_body_bytes")
        elif 400 <= status < 500:
            mapped = ClientError(error.description or "bad request")
        else:
            mapped = InternalError(f"HTTP {status}")
        response = problem(mapped)
        allowed = getattr(error, "valid_methods", None)
        if status == 405 and allowed:  # RFC 9110: a 405 lists what the resource allows
            response.headers["Allow"] = ", ".join(sorted(set(allowed)))
        return response

    @app.errorhandler(Exception)
    async def on_unexpected(error: Exception) -> Response:
        log.exception("unhandled error", error_type=type(error).__name__)
        return problem(InternalError(type(error).__name__))

    @app.post("/v1/auth/login")
    @api(
        "login",
        "auth",
        request=LoginRequest,
        response=TokenResponse,
        errors=(401, 415, 422, 503),
        auth=False,
    )
    async def login() -> Response:
        body = await read_body(LoginRequest)
        account = body.email.strip().casefold()
        limited = limits.check_all(
            [(limits.login_address, client()), (limits.login_account, account)]
        )
        g.limited = limited
        pair, session = await auth.login(body.email, body.password)
        limits.refund(limits.login_account, account)  # only failed attempts count
        user = {
            "user_id": session.user_id,
            "org_id": session.org_id,
            "roles": list(session.roles),
            "display_name": session.display_name,
        }
        return _token_response(pair, limited, user=user)

    @app.post("/v1/auth/refresh")
    @api(
        "refresh",
        "auth",
        request=RefreshRequest,
        response=TokenResponse,
        errors=(401, 408, 415, 422),
        auth=False,
    )
    async def refresh() -> Response:
        limited = g.limited = limits.check(limits.refresh, client())
        body = await read_body(RefreshRequest)
        pair = await auth.refresh(body.refresh_token)
        return _token_response(pair, limited)

    @app.post("/v1/auth/logout")
    @api("logout", "auth", ok=204)
    @protected
    async def logout() -> Response:
        claims: AccessClaims = g.claims
        await auth.logout(claims)
        return Response("", status=204)

    @app.get("/v1/auth/me")
    @api("get_me", "auth", response=MeResponse)
    @protected
    async def me() -> Response:
        claims: AccessClaims = g.claims
        return json_response(
            {
                "user_id": claims.sub,
                "org_id": claims.org,
                "roles": list(claims.roles),
                "session_id": claims.sid,
                "expires_at": claims.exp,
            }
        )

    @app.post("/v1/auth/ws-ticket")
    @api("create_ws_ticket", "auth", response=TicketResponse)
    @protected
    async def ws_ticket() -> Response:
        claims: AccessClaims = g.claims
        ticket = auth.ws_ticket(claims)
        return json_response({"ticket": ticket.ticket, "expires_in": ticket.expires_in})

    @app.get("/.well-known/jwks.json")
    @api("get_jwks", "auth", response=JwksResponse, auth=False)
    async def jwks_document() -> Response:
        limited = limits.check(limits.address, client())
        headers = {"Cache-Control": "public, max-age=300", **limited.headers()}
        return json_response(jwks(), headers=headers)

    for add_routes in routes:
        add_routes(app, protected)
    install_openapi(
        app,
        title="HuleEdu API",
        version=API_VERSION,
        description=(
            "The HuleEdu interface tier's HTTPS API. Every error is an RFC 9457 problem "
            "document (`application/problem+json`) with `code` and `correlation_id`."
        ),
    )

    stats = EdgeStatistics()
    asgi = EdgeMiddleware(
        app.asgi_app,  # type: ignore[arg-type]
        edge,
        stats,
        tracer_provider=tracer_provider,
    )
    app.asgi_app = asgi  # type: ignore[assignment]
    return GatewayApp(app=app, asgi=asgi, stats=stats)
