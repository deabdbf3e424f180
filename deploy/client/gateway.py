"""The gateway over REST: :func:`open_gateway` yields a :class:`GatewayClient`.

httpx over HTTP/1.1 with a fresh verifying TLS context; every call raises :class:`StepError`
naming the step and saying what went wrong: the problem document's status and detail,
``cannot reach <url>: connection refused``, an untrusted certificate, or no answer in time.
The tokens of a :class:`Session` are kept out of ``repr`` and out of every error message.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import httpx
import trio

from common.tls import client_context
from deploy.client.failures import StepError, _problem_text, describe_failure
from deploy.client.options import ClientConfig

__all__ = ["GatewayClient", "Session", "open_gateway"]

#: Seconds one HTTP request may take (connect, send, wait, read).
HTTP_TIMEOUT_S = 10.0
#: Seconds a best-effort logout at exit may take (it runs shielded from cancellation).
LOGOUT_TIMEOUT_S = 2.0


@dataclass(frozen=True, slots=True)
class Session:
    """A login: the tokens (kept out of ``repr``) and who it is."""

    access_token: str = field(repr=False)
    refresh_token: str = field(repr=False)
    expires_in: int
    user_id: str
    display_name: str


class GatewayClient:
    """Calls on the gateway; every failure is a :class:`StepError` naming the step."""

    def __init__(self, http: httpx.AsyncClient, url: str) -> None:
        self.http = http
        self.url = url

    async def call(
        self,
        step: str,
        method: str,
        path: str,
        *,
        session: Session | None = None,
        expect: int = 200,
        **kwargs: Any,
    ) -> Any:
        """One request; returns the decoded JSON body (None when empty)."""
        headers = dict(kwargs.pop("headers", None) or {})
        if session is not None:
            headers["authorization"] = f"Bearer {session.access_token}"
        try:
            reply = await self.http.request(method, path, headers=headers, **kwargs)
        except httpx.TimeoutException:
            raise StepError(
                step, f"no answer from {self.url} within {HTTP_TIMEOUT_S:g} s"
            ) from None
        except httpx.TransportError as exc:
            raise StepError(step, f"cannot reach {self.url}: {describe_failure(exc)}") from None
        if reply.status_code != expect:
            raise StepError(step, _problem_text(reply))
        if not reply.content:
            return None
        try:
            return reply.json()
        except ValueError:
            raise StepError(
                step, f"{self.url} answered {path} with a body that is not JSON"
            ) from None

    async def login(self, email: str, password: str) -> Session:
        body = await self.call(
            "login", "POST", "/v1/auth/login", json={"email": email, "password": password}
        )
        return _session(body, None)

    async def refresh(self, session: Session) -> Session:
        body = await self.call(
            "token refresh",
            "POST",
            "/v1/auth/refresh",
            json={"refresh_token": session.refresh_token},
        )
        return _session(body, session)

    async def ws_ticket(self, session: Session) -> str:
        body = await self.call("ws ticket", "POST", "/v1/auth/ws-ticket", session=session)
        return str(body["ticket"])

    async def logout_quietly(self, session: Session) -> None:
        """End the session, best effort: shielded, at most :data:`LOGOUT_TIMEOUT_S`, and any
        failure is ignored (the tokens expire anyway)."""
        with trio.move_on_after(LOGOUT_TIMEOUT_S, shield=True):
            with suppress(StepError):
                await self.call("logout", "POST", "/v1/auth/logout", session=session, expect=204)


def _session(body: Any, before: Session | None) -> Session:
    user = body.get("user") or {}
    return Session(
        access_token=str(body["access_token"]),
        refresh_token=str(body["refresh_token"]),
        expires_in=int(body["expires_in"]),
        user_id=str(user.get("user_id") or (before.user_id if before else "")),
        display_name=str(user.get("display_name") or (before.display_name if before else "")),
    )


@asynccontextmanager
async def open_gateway(config: ClientConfig) -> AsyncIterator[GatewayClient]:
    """An HTTP/1.1 client for the gateway (closed on exit), trusting ``config.ca_file``."""
    async with httpx.AsyncClient(
        base_url=config.gateway_url,
        verify=client_context(config.ca_file),
        timeout=HTTP_TIMEOUT_S,
        headers={"user-agent": "huleedu-cli"},
    ) as http:
        yield GatewayClient(http, config.gateway_url)
