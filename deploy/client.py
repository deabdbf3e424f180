"""The client side of the tier, for the command-line tools (``huleedu demo``, ``huleedu ws-tail``).

* **Options and discovery.** :func:`add_connection_arguments` adds the options both tools
  share; :func:`resolve_config` turns them into a :class:`ClientConfig`: an explicit option
  wins, then the dev stack's discovery file (``--stack``, by default
  :data:`DEFAULT_STACK_FILE` if it exists: ``{"gateway_url", "ws_url", "ca_file"}``), then the
  built-in defaults (the devstack's ports, the sandbox's demo teacher). Bad options raise
  :class:`OptionsError`.
* **The gateway.** :func:`open_gateway` yields a :class:`GatewayClient` (httpx over HTTP/1.1
  with a fresh verifying TLS context) whose calls raise :class:`StepError` naming the step and
  saying what went wrong: the problem document's status and detail, ``cannot reach <url>:
  connection refused``, an untrusted certificate, or no answer in time.
* **Live updates.** :func:`open_live_socket` connects to the WebSocket manager with a one-time
  ticket (never a token in the URL), waits for ``welcome``, extends the connection to the
  access token's expiry and yields a :class:`LiveSocket`; :meth:`LiveSocket.receive`
  answers server heartbeats itself and reports the close code.
* :func:`event_summary` renders an ``event`` frame's data as one short line.

Nothing here prints or logs a token, ticket or password: they are kept out of ``repr`` and out
of every error message (the WebSocket URL in messages is the one without the ticket).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import ssl
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx
import trio
import trio_websocket

from common.tls import client_context

__all__ = [
    "DEFAULT_GATEWAY_URL",
    "DEFAULT_STACK_FILE",
    "DEFAULT_WS_URL",
    "DEMO_EMAIL",
    "DEMO_PASSWORD",
    "PASSWORD_ENV",
    "ClientConfig",
    "CloseInfo",
    "Frame",
    "GatewayClient",
    "LiveSocket",
    "OptionsError",
    "Session",
    "StepError",
    "add_connection_arguments",
    "clock_time",
    "describe_failure",
    "event_data",
    "event_summary",
    "open_gateway",
    "open_live_socket",
    "resolve_config",
]

DEFAULT_GATEWAY_URL = "https://127.0.0.1:8443"
DEFAULT_WS_URL = "wss://127.0.0.1:8444/v1/ws"
#: Where ``huleedu devstack`` writes its discovery file (relative to the working directory).
DEFAULT_STACK_FILE = Path(".state/devstack/devstack.json")
#: The sandbox identity service's demo teacher (public, documented test data).
DEMO_EMAIL = "teacher@huleedu.test"
DEMO_PASSWORD = "correct horse battery staple"  # public demo data  # noqa: S105  # nosec B105
#: Read when ``--password`` is not given (keeps a real password out of the process list).
PASSWORD_ENV = "HULEEDU_DEMO_PASSWORD"  # a variable name  # noqa: S105  # nosec B105
#: Seconds one HTTP request may take (connect, send, wait, read).
HTTP_TIMEOUT_S = 10.0
#: Seconds the WebSocket handshake (TCP, TLS, upgrade) may take, and then ``welcome``.
WS_CONNECT_TIMEOUT_S = 10.0
#: Seconds a closing handshake may take before the connection is dropped.
WS_CLOSE_TIMEOUT_S = 2.0
#: Seconds a best-effort logout at exit may take (it runs shielded from cancellation).
LOGOUT_TIMEOUT_S = 2.0
_STACK_KEYS = ("gateway_url", "ws_url", "ca_file")


class OptionsError(Exception):
    """The options (or the discovery file) are unusable; the message names the option."""


class StepError(Exception):
    """One step of a client run failed; ``str()`` is ``"<step> failed: <message>"``."""

    def __init__(self, step: str, message: str) -> None:
        super().__init__(f"{step} failed: {message}")
        self.step = step
        self.message = message


# -- options and discovery ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """Where the tier is and who logs in. ``ca_file`` None: the system trust store."""

    gateway_url: str = DEFAULT_GATEWAY_URL
    ws_url: str = DEFAULT_WS_URL
    ca_file: Path | None = None
    email: str = DEMO_EMAIL
    password: str = field(default=DEMO_PASSWORD, repr=False)
    #: ``Origin`` header for the WebSocket handshake; None sends none (a non-browser client).
    origin: str | None = None


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--stack --gateway --ws --ca --email --password --origin`` (defaults: None, so
    :func:`resolve_config` can tell an explicit option from a default)."""
    group = parser.add_argument_group("connection")
    group.add_argument(
        "--stack",
        type=Path,
        metavar="FILE",
        help=f"devstack discovery file to take defaults from (default: {DEFAULT_STACK_FILE} "
        "if it exists)",
    )
    group.add_argument("--gateway", metavar="URL", help=f"default {DEFAULT_GATEWAY_URL}")
    group.add_argument("--ws", metavar="URL", help=f"default {DEFAULT_WS_URL}")
    group.add_argument(
        "--ca", type=Path, metavar="FILE", help="CA bundle to trust (default: system trust)"
    )
    group.add_argument("--email", help=f"default {DEMO_EMAIL}")
    group.add_argument(
        "--password", help=f"default: ${PASSWORD_ENV}, else the demo account's password"
    )
    group.add_argument("--origin", help="Origin header for the WebSocket (default: none)")


def _read_stack_file(path: Path) -> dict[str, str]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise OptionsError(f"--stack {path}: cannot read: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise OptionsError(f"--stack {path}: not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise OptionsError(f"--stack {path}: expected a JSON object")
    found: dict[str, str] = {}
    for key in _STACK_KEYS:
        value = raw.get(key)
        if value is not None and not isinstance(value, str):
            raise OptionsError(f"--stack {path}: {key} must be a string")
        if value:
            found[key] = value
    return found


def _stack_defaults(stack: Path | None) -> dict[str, str]:
    if stack is not None:
        return _read_stack_file(stack)
    return _read_stack_file(DEFAULT_STACK_FILE) if DEFAULT_STACK_FILE.is_file() else {}


def _check_url(value: str, option: str, schemes: tuple[str, ...]) -> str:
    parts = urlsplit(value)
    if parts.scheme not in schemes or not parts.hostname:
        raise OptionsError(f"{option} {value!r}: expected a {' or '.join(schemes)} URL")
    if parts.query or parts.fragment:
        raise OptionsError(f"{option} {value!r}: must not have a query or fragment")
    return value


def resolve_config(args: argparse.Namespace, environ: Mapping[str, str]) -> ClientConfig:
    """The effective configuration: explicit options, then the discovery file, then defaults.

    A relative ``ca_file`` in the discovery file is taken relative to that file's folder.
    Raises :class:`OptionsError` naming the option or file at fault.
    """
    stack_path: Path | None = args.stack
    found = _stack_defaults(stack_path)
    ca: Path | None = args.ca
    source = "--ca"
    if ca is None and "ca_file" in found:
        stack_file = stack_path or DEFAULT_STACK_FILE
        ca, source = stack_file.parent / found["ca_file"], f"--stack {stack_file}: ca_file"
    if ca is not None and not ca.is_file():
        raise OptionsError(f"{source} {ca}: no such file")
    gateway = args.gateway or found.get("gateway_url") or DEFAULT_GATEWAY_URL
    ws = args.ws or found.get("ws_url") or DEFAULT_WS_URL
    password = args.password or environ.get(PASSWORD_ENV) or DEMO_PASSWORD
    return ClientConfig(
        gateway_url=_check_url(gateway, "--gateway", ("https", "http")).rstrip("/"),
        ws_url=_check_url(ws, "--ws", ("wss", "ws")),
        ca_file=ca,
        email=args.email or DEMO_EMAIL,
        password=password,
        origin=args.origin,
    )


# -- failures -----------------------------------------------------------------------------------


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc``, its causes and contexts, and the members of exception groups among them."""
    seen: list[BaseException] = []
    todo = [exc]
    while todo:
        current = todo.pop(0)
        if any(current is s for s in seen):
            continue
        seen.append(current)
        if isinstance(current, BaseExceptionGroup):
            todo.extend(current.exceptions)
        todo.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    return seen


def _explain(exc: BaseException) -> str | None:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted ({exc.verify_message}); pass --ca FILE or --stack FILE"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or exc}"
    if isinstance(exc, OSError) and exc.errno is not None:
        text = os.strerror(exc.errno) if exc.errno >= 0 else exc.strerror or str(exc)
        return text.lower()
    return None


def describe_failure(exc: BaseException) -> str:
    """A short reason for a network failure: ``connection refused``, an untrusted certificate,
    a name that does not resolve... (the root causes, not the library's wrapper text)."""
    reasons: list[str] = []
    for cause in _causes(exc):
        reason = _explain(cause)
        if reason and reason not in reasons:
            reasons.append(reason)
    return "; ".join(reasons) or str(exc) or type(exc).__name__


def _problem_text(reply: httpx.Response) -> str:
    """``"<status> <detail>"`` from a problem document (or the reason phrase), with the
    field at fault, when to retry, and for server errors the id to quote."""
    try:
        body = reply.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return f"{reply.status_code} {reply.reason_phrase}".rstrip()
    extras = []
    if body.get("field"):
        extras.append(f"field {body['field']}")
    if body.get("retry_after") is not None:
        extras.append(f"retry after {body['retry_after']} s")
    if reply.status_code >= 500 and body.get("correlation_id"):
        extras.append(f"correlation id {body['correlation_id']}")
    detail = body.get("detail") or body.get("title") or reply.reason_phrase
    return f"{reply.status_code} {detail}" + (f" ({'; '.join(extras)})" if extras else "")


# -- the gateway --------------------------------------------------------------------------------


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


# -- live updates -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CloseInfo:
    """How the WebSocket ended; code 1006 means no close frame came (the network broke)."""

    code: int
    reason: str | None

    def __str__(self) -> str:
        return f"{self.code} {self.reason}" if self.reason else str(self.code)


@dataclass(frozen=True, slots=True)
class Frame:
    """A server frame: the text as received and the decoded object."""

    text: str
    body: dict[str, Any]

    @property
    def type(self) -> str:
        return str(self.body.get("type", ""))


class LiveSocket:
    """An authenticated ``/v1/ws`` connection (after ``welcome``)."""

    def __init__(self, ws: trio_websocket.WebSocketConnection, welcome: Frame) -> None:
        self._ws = ws
        self.welcome = welcome
        #: Set once the connection has closed.
        self.closed: CloseInfo | None = None
        #: Server heartbeats answered so far.
        self.pings_answered = 0

    async def receive(self) -> Frame | None:
        """The next frame that is not a server ``ping`` (those are answered with ``pong``
        here); None once the connection is closed (see :attr:`closed`). A frame that is not
        a JSON object closes the connection with 1007."""
        while True:
            try:
                message = await self._ws.get_message()
            except trio_websocket.ConnectionClosed as exc:
                self._record(exc)
                return None
            frame = _decode(message)
            if frame is None:
                await self.close(1007, "frame is not a JSON object")
                return None
            if frame.type == "ping":
                await self.send({"type": "pong", "nonce": frame.body.get("nonce")})
                self.pings_answered += 1
                continue
            return frame

    async def send(self, frame: Mapping[str, Any]) -> None:
        """Send one frame; on a closed connection nothing is sent (``receive`` says why)."""
        try:
            await self._ws.send_message(json.dumps(frame, separators=(",", ":")))
        except trio_websocket.ConnectionClosed as exc:
            self._record(exc)

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        """Close with ``code`` (a no-op if closed already), waiting at most
        :data:`WS_CLOSE_TIMEOUT_S` for the server's answer.

        In a cancelled scope nothing is sent: the socket's reader task is cancelled too, so
        no closing handshake could complete; the connection is just dropped (the server sees
        1006). To close cleanly, stop reading without cancelling the socket's own scope.
        """
        if trio.current_effective_deadline() == -math.inf:
            self._note(trio_websocket.CloseReason(1006, "dropped by a cancelled client"))
            return
        with trio.move_on_after(WS_CLOSE_TIMEOUT_S):
            await self._ws.aclose(code, reason)
        self._note(self._ws.closed or trio_websocket.CloseReason(code, reason))

    def _record(self, exc: trio_websocket.ConnectionClosed) -> None:
        self._note(exc.reason or trio_websocket.CloseReason(1006, None))

    def _note(self, reason: trio_websocket.CloseReason) -> None:
        if self.closed is None:
            self.closed = CloseInfo(reason.code, reason.reason)


def _decode(message: str | bytes) -> Frame | None:
    if isinstance(message, bytes):
        return None
    try:
        body = json.loads(message)
    except ValueError:
        return None
    return Frame(message, body) if isinstance(body, dict) else None


def _ws_url(base: str, ticket: str, since: str | None) -> str:
    query = {"ticket": ticket, **({"since": since} if since else {})}
    return f"{base}?{urlencode(query, safe='/:')}"


async def _welcome(ws: trio_websocket.WebSocketConnection, where: str) -> Frame:
    step = "ws connect"
    try:
        with trio.fail_after(WS_CONNECT_TIMEOUT_S):
            message = await ws.get_message()
    except trio.TooSlowError:
        raise StepError(
            step, f"no welcome from {where} within {WS_CONNECT_TIMEOUT_S:g} s"
        ) from None
    except trio_websocket.ConnectionClosed as exc:
        raise StepError(step, f"{where} closed the connection: {_close_text(exc)}") from None
    frame = _decode(message)
    if frame is None or frame.type != "welcome":
        raise StepError(step, f"{where} sent something other than welcome first")
    return frame


def _close_text(exc: trio_websocket.ConnectionClosed) -> str:
    if exc.reason is None or exc.reason.code == 1006:
        return "1006 (no close frame: TLS or network failure)"
    return str(CloseInfo(exc.reason.code, exc.reason.reason))


@asynccontextmanager
async def open_live_socket(
    config: ClientConfig, ticket: str, *, since: str | None = None
) -> AsyncIterator[LiveSocket]:
    """Connect with a one-time ``ticket`` (and ``since=<epoch>:<offset>`` to resume), wait for
    ``welcome``, yield the socket; on exit close it (1000) and drop the TCP stream.

    The socket lives as long as the access token the ticket was minted from
    (``welcome.expires_at``); send ``refresh`` frames with newer tokens to keep it longer.

    Raises :class:`StepError` (step ``ws connect``) when the server cannot be reached, refuses
    the upgrade (a refused Origin or a bad ``since`` is HTTP 403) or closes before ``welcome``
    (4001: the ticket was refused).
    """
    step, where = "ws connect", config.ws_url
    headers = [(b"origin", config.origin.encode())] if config.origin else []
    tls = client_context(config.ca_file, alpn=["http/1.1"]) if where.startswith("wss:") else None
    try:
        async with trio_websocket.open_websocket_url(
            _ws_url(where, ticket, since),
            tls,
            extra_headers=headers,
            connect_timeout=WS_CONNECT_TIMEOUT_S,
            disconnect_timeout=WS_CLOSE_TIMEOUT_S,
        ) as ws:
            live: LiveSocket | None = None
            try:
                live = LiveSocket(ws, await _welcome(ws, where))
                yield live
            finally:
                if live is not None:
                    await live.close()
                # trio-websocket 0.12 leaves its TCP stream open when the server closed
                # first (its EOF path never closes it): close it ourselves.
                await trio.aclose_forcefully(ws._stream)
    except trio_websocket.ConnectionRejected as exc:
        raise StepError(step, f"{where} refused the upgrade: HTTP {exc.status_code}") from None
    except trio_websocket.ConnectionTimeout:
        raise StepError(step, f"no answer from {where} within {WS_CONNECT_TIMEOUT_S:g} s") from None
    except trio_websocket.HandshakeError as exc:
        raise StepError(step, f"cannot reach {where}: {describe_failure(exc)}") from None


# -- rendering ----------------------------------------------------------------------------------


def _phases_text(phases: Any) -> str:
    parts = []
    for item in phases if isinstance(phases, list) else []:
        if not isinstance(item, dict):
            continue
        done = int(item.get("succeeded") or 0) + int(item.get("failed") or 0)
        failed = f" ({item['failed']} failed)" if item.get("failed") else ""
        parts.append(f"{item.get('phase')} {done}/{item.get('total')}{failed}")
    return ", ".join(parts)


def event_data(body: Mapping[str, Any]) -> dict[str, Any]:
    """An ``event`` frame's ``data`` object (``{}`` if it is missing or not an object)."""
    data = body.get("data")
    return data if isinstance(data, dict) else {}


def event_summary(event_type: str, data: Mapping[str, Any], *, limit: int = 100) -> str:
    """One line for an event's ``data``: status, phase and per-phase progress for batch
    notifications, the file for uploads, else its scalar fields (cut to ``limit``)."""
    if event_type == "file_uploaded" and "filename" in data:
        text = f"{data['filename']} ({data.get('size_bytes', '?')} bytes)"
    elif "status" in data:
        phase = f" phase={data['current_phase']}" if data.get("current_phase") else ""
        progress = _phases_text(data.get("phases"))
        text = f"status={data['status']}{phase}" + (f" [{progress}]" if progress else "")
    else:
        text = " ".join(
            f"{k}={v}"
            for k, v in data.items()
            if k != "batch_id" and not isinstance(v, dict | list)
        )
    return text if len(text) <= limit else text[: limit - 3] + "..."


def clock_time(occurred_at: Any) -> str:
    """``12:03:07.418`` from an RFC 3339 timestamp (the input itself if it is not one)."""
    try:
        when = dt.datetime.fromisoformat(str(occurred_at))
    except ValueError:
        return str(occurred_at)
    return when.strftime("%H:%M:%S.") + f"{when.microsecond // 1000:03d}"
