"""The WSS endpoint ``/v1/ws``: a raw ASGI app (the lean path; no framework per frame).

Per socket, in order (see ``PROTOCOL.md``):

1. the ``Origin`` is checked against the allow-list **before** the upgrade (a refusal is the
   server's HTTP 403); a bad ``since`` is refused the same way;
2. authentication: a one-time ``?ticket=`` (verified as ``typ=ws_ticket`` and redeemed once
   on this instance) or a first frame ``{"type":"auth"}`` within ``auth_timeout_s``; tokens
   are verified against the gateway's JWKS (an unknown ``kid`` refreshes it, rate-limited);
3. the hub registers the connection under the token's user (caps: per user, global); with
   ``since`` the gap is queued first; ``welcome`` says what was recovered;
4. then, concurrently: the writer sends the connection's queue; the reader handles
   ``ping``/``subscribe``/``unsubscribe``/``refresh`` under a per-connection rate limit; a
   heartbeat sends ``ping`` frames and closes a peer that answers nothing; the token's expiry
   closes it (4002) unless a ``refresh`` came; a revoked session (4003), a full queue (4009)
   or the service going away (1001) close it with their codes.

Every close carries a code from the documented table; nothing a client sends can crash the
handler (a protocol error is a close code).
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import trio

from common.errors import (
    AuthenticationError,
    SessionRevokedError,
    TokenExpiredError,
    WsCloseCode,
)
from common.httpserver import answer_lifespan
from common.logs import get_logger
from common.ratelimit import GcraLimiter, RatePolicy
from common.tokens import AccessClaims, TokenVerifier, UnknownKeyError
from wsmanager import protocol
from wsmanager.hub import Connection, Hub, Refused
from wsmanager.settings import WsManagerSettings

__all__ = ["TicketLedger", "WsApp", "WsStatistics"]

log = get_logger("wsmanager.app")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
PATH = "/v1/ws"
#: Longest a ticket-opened socket lives without a refresh (the gateway's access-token limit).
ACCESS_LIFETIME_CAP_S = 900
#: Close codes whose reason names the specific problem (the others send the table's text).
_SPECIFIC_REASONS = frozenset(
    {WsCloseCode.INVALID_PAYLOAD, WsCloseCode.POLICY_VIOLATION, WsCloseCode.MESSAGE_TOO_BIG}
)
#: Seconds a close frame may take to go out to a stalled peer.
CLOSE_SEND_S = 1.0


class TicketLedger:
    """Tickets redeemed on this instance, each remembered until it expires (single use)."""

    def __init__(self) -> None:
        self._until: dict[str, float] = {}

    def redeem(self, jti: str, until: float, now: float) -> bool:
        """Redeem ticket ``jti``, remembered until ``until`` (its ``exp`` plus the verifier's
        leeway: as long as the verifier would accept it); False if it was redeemed before."""
        if len(self._until) > 1024:
            self._until = {k: v for k, v in self._until.items() if v > now}
        if jti in self._until:
            return False
        self._until[jti] = until
        return True


@dataclass
class WsStatistics:
    handshakes: int = 0
    refused_origin: int = 0
    auth_failures: int = 0
    closed: dict[int, int] = field(default_factory=dict)

    def count_close(self, code: int) -> None:
        self.closed[code] = self.closed.get(code, 0) + 1


class _Closed(Exception):
    """The peer went away (its disconnect was received)."""


class WsApp:
    def __init__(
        self,
        settings: WsManagerSettings,
        hub: Hub,
        *,
        verifier: TokenVerifier,
        ticket_verifier: TokenVerifier,
        refresh_keys: Callable[[str], Awaitable[bool]],
        wall: Callable[[], float],
        going_away: trio.Event,
        ready: Callable[[], bool],
    ) -> None:
        self.settings = settings
        self.hub = hub
        self.verifier = verifier
        self.ticket_verifier = ticket_verifier
        self.refresh_keys = refresh_keys
        self.wall = wall
        self.going_away = going_away
        self.ready = ready
        self.tickets = TicketLedger()
        self.stats = WsStatistics()
        self._origins = frozenset(settings.allowed_origins)
        self._inbound = RatePolicy(
            "ws-inbound",
            limit=1,
            period_s=1.0 / settings.inbound_rate_per_s,
            burst=settings.inbound_burst,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope.get("type")
        if kind == "websocket":
            await self._socket(scope, receive, send)
        elif kind == "http":
            await _plain(send, 404, b"only the WebSocket endpoint /v1/ws is served here\n")
        elif kind == "lifespan":
            await answer_lifespan(receive, send)

    # -- handshake -----------------------------------------------------------------------------

    def _origin_ok(self, scope: Scope) -> bool:
        origins = [v for k, v in scope.get("headers", ()) if k.lower() == b"origin"]
        if not origins:
            return self.settings.allow_missing_origin
        return len(origins) == 1 and origins[0].decode("latin-1") in self._origins

    async def _socket(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.stats.handshakes += 1
        # Blank values kept: an empty ``since=`` is a malformed resume point (403), not none.
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        connect = await receive()
        if connect.get("type") != "websocket.connect":
            return
        if scope.get("path") != PATH or not self._origin_ok(scope):
            self.stats.refused_origin += scope.get("path") == PATH
            await send({"type": "websocket.close", "code": 1008})  # before accept: HTTP 403
            return
        try:
            since = protocol.parse_since(query["since"][0]) if "since" in query else None
            ticket = query.get("ticket", [None])[0]
        except protocol.ProtocolError:
            await send({"type": "websocket.close", "code": 1008})
            return
        await send({"type": "websocket.accept"})
        socket = _Socket(self, receive, send)
        try:
            await socket.run(ticket, since)
        except _Closed:
            pass
        finally:
            if socket.connection is not None:
                self.hub.unregister(socket.connection)
            self.stats.count_close(socket.close_code)

    async def verify(self, token: str, *, ticket: bool) -> AccessClaims:
        verifier = self.ticket_verifier if ticket else self.verifier
        try:
            return verifier.verify(token, self.wall())
        except UnknownKeyError:
            if not await self.refresh_keys(_kid_of(token)):
                raise
            return verifier.verify(token, self.wall())


def _kid_of(token: str) -> str:
    try:
        head = token.split(".", 1)[0]
        header = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
        kid = header.get("kid", "")
        return kid if isinstance(kid, str) else ""
    except (ValueError, UnicodeDecodeError):
        return ""


async def _plain(send: Send, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _lifetime_end(claims: AccessClaims) -> float:
    """When an authenticated socket expires (4002) unless refreshed: the access token's
    ``exp``; for a ticket, the ``exp`` of the access token it was minted from (never more
    than an access token's longest lifetime after the ticket was issued)."""
    if claims.access_exp is None:
        return float(claims.exp)
    return float(min(claims.access_exp, claims.iat + ACCESS_LIFETIME_CAP_S))


class _Socket:
    """One accepted socket's life.

    Tasks: the handler's own task writes (it drains the connection's queue), one child reads,
    and one child keeps the clocks (heartbeat, token expiry) and watches for the service
    going away. A close asked of the connection (slow consumer, revocation, a reader's
    protocol error) cancels them at once through :meth:`Connection.on_close`.
    """

    def __init__(self, app: WsApp, receive: Receive, send: Send) -> None:
        self.app = app
        self._receive = receive
        self._send = send
        self._send_lock = trio.Lock()
        self.connection: Connection | None = None
        self.close_code: int = int(WsCloseCode.NORMAL)
        self.expires_at = 0.0
        #: Whether a frame came in since the last ``ping`` was due.
        self._heard = False
        #: The clock task's current wait (cancelled to wake it early), else None.
        self._wake: trio.CancelScope | None = None

    async def send_text(self, text: str) -> None:
        # One sender at a time; an uncontended send takes the lock without a checkpoint of
        # its own (the ASGI send has its own), which is the writer's per-frame path.
        lock = self._send_lock
        if lock.locked():
            async with lock:
                await self._send({"type": "websocket.send", "text": text})
            return
        lock.acquire_nowait()
        try:
            await self._send({"type": "websocket.send", "text": text})
        finally:
            lock.release()

    async def close(self, code: WsCloseCode, reason: str) -> None:
        """Close with ``code``; the reason is the table's text (PROTOCOL.md §6) except for
        1007/1008/1009, where ``reason`` names the problem. Shielded from outer cancellation
        but never longer than ``CLOSE_SEND_S`` (a peer that stopped reading is dropped)."""
        self.close_code = int(code)
        text = reason if code in _SPECIFIC_REASONS else protocol.close_reason(code)
        with trio.CancelScope(shield=True, deadline=trio.current_time() + CLOSE_SEND_S):
            async with self._send_lock:
                await self._send(
                    {"type": "websocket.close", "code": int(code), "reason": text[:120]}
                )

    async def next_text(self) -> str:
        message = await self._receive()
        kind = message.get("type")
        if kind == "websocket.disconnect":
            self.close_code = int(message.get("code", 1005))
            raise _Closed
        if kind != "websocket.receive":
            raise _Closed
        text = message.get("text")
        if text is None:
            raise protocol.binary_frame_error()
        assert isinstance(text, str)
        return text

    async def run(self, ticket: str | None, since: protocol.ResumePoint | None) -> None:
        settings = self.app.settings
        try:
            claims = await self._authenticate_unless_going_away(ticket)
        except protocol.ProtocolError as exc:
            self.app.stats.auth_failures += 1
            await self.close(exc.code, exc.reason)
            return
        if claims is None:
            await self.close(WsCloseCode.GOING_AWAY, "server shutting down")
            return
        if not self.app.ready():
            await self.close(WsCloseCode.TRY_AGAIN_LATER, "catching up; retry shortly")
            return
        connection = Connection(
            claims.sub,
            claims.sid,
            queue_frames=settings.send_queue_frames,
            filter=protocol.EVERYTHING,
        )
        try:
            self.app.hub.register(connection)
        except Refused as refused:  # a ticket refused here is not spent: retry with it
            await self.close(refused.code, refused.reason)
            return
        if ticket is not None and not self._redeem(claims):
            self.app.hub.unregister(connection)
            self.app.stats.auth_failures += 1
            log.info("websocket authentication failed", reason="ticket already used")
            await self.close(WsCloseCode.AUTH_FAILED, "ticket already used")
            return
        self.connection = connection
        resume = (
            self.app.hub.resume(connection, since.epoch, since.offset)
            if since is not None
            else None
        )
        self.expires_at = _lifetime_end(claims)
        await self.send_text(
            protocol.welcome(
                connection_id=connection.id,
                user_id=claims.sub,
                expires_at=self.expires_at,
                resume=resume,
            )
        )
        try:
            async with trio.open_nursery() as nursery:
                stop = nursery.cancel_scope.cancel
                connection.on_close(stop)
                nursery.start_soon(self._reader, connection, claims, stop)
                nursery.start_soon(self._clocks, connection, nursery)
                await self._writer(connection)
                stop()
        finally:
            connection.on_close(None)
        if connection.close_code is not None:
            await self.close(connection.close_code, connection.close_reason)

    def _redeem(self, claims: AccessClaims) -> bool:
        """Spend the ticket (no await between this and registering, so two sockets racing
        with one ticket cannot both pass): remembered as long as the verifier accepts it."""
        app = self.app
        until = float(claims.exp) + app.settings.token_leeway_s
        return app.tickets.redeem(claims.jti, until, app.wall())

    async def _authenticate_unless_going_away(self, ticket: str | None) -> AccessClaims | None:
        """The socket's claims, or None if the service started going away first (a socket
        still authenticating is closed with 1001 like the others, not left to its deadline)."""
        claims: AccessClaims | None = None
        refused: protocol.ProtocolError | None = None
        async with trio.open_nursery() as nursery:

            async def authenticate() -> None:
                nonlocal claims, refused
                try:
                    claims = await self._authenticate(ticket)
                except protocol.ProtocolError as exc:  # raised below, outside the nursery
                    refused = exc
                nursery.cancel_scope.cancel()

            async def going_away() -> None:
                await self.app.going_away.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(authenticate)
            nursery.start_soon(going_away)
        if refused is not None:
            raise refused
        return claims

    async def _authenticate(self, ticket: str | None) -> AccessClaims:
        app = self.app
        try:
            if ticket is not None:  # redeemed once the socket is registered (see run)
                return await app.verify(ticket, ticket=True)
            with trio.fail_after(app.settings.auth_timeout_s):
                text = await self.next_text()
            frame = protocol.require_auth(
                protocol.parse_client_frame(text, max_bytes=app.settings.max_frame_bytes)
            )
            return await app.verify(frame.token, ticket=False)
        except trio.TooSlowError:
            raise protocol.ProtocolError(
                WsCloseCode.AUTH_FAILED, "no auth frame within the deadline"
            ) from None
        except TokenExpiredError as exc:  # an expired token 4002; an expired ticket is spent
            code = WsCloseCode.AUTH_FAILED if ticket is not None else exc.ws_close_code
            raise protocol.ProtocolError(code, exc.message) from None
        except SessionRevokedError as exc:  # 4003 (PROTOCOL.md §1)
            raise protocol.ProtocolError(exc.ws_close_code, exc.message) from None
        except AuthenticationError as exc:
            log.info("websocket authentication failed", reason=exc.message)
            raise protocol.ProtocolError(WsCloseCode.AUTH_FAILED, "authentication failed") from None

    async def _writer(self, connection: Connection) -> None:
        """Send the backlog, then the queue until it is closed. Everything queued at a wakeup
        is sent back to back: one ASGI send per frame and no checkpoint between frames other
        than the send's own."""
        if connection.has_backlog():
            backlog = connection.backlog
            while backlog:
                await self.send_text(backlog.popleft())
        outbox = connection.receive
        while True:
            try:
                frame = outbox.receive_nowait()
            except trio.WouldBlock:
                try:
                    frame = await outbox.receive()
                except trio.EndOfChannel:
                    return
            except trio.EndOfChannel:
                return
            await self.send_text(frame)

    async def _reader(
        self, connection: Connection, claims: AccessClaims, stop: Callable[[], None]
    ) -> None:
        with contextlib.suppress(_Closed):  # the peer left: everything else stops
            await self._read(connection, claims)
        stop()

    async def _read(self, connection: Connection, claims: AccessClaims) -> None:
        app = self.app
        limiter = GcraLimiter(app._inbound, max_keys=1)
        while True:
            try:
                text = await self.next_text()
            except protocol.ProtocolError as exc:
                connection.close(exc.code, exc.reason)
                return
            if not self._heard:
                self._heard = True
                self._wake_clocks()
            if not limiter.check("c", trio.current_time()).allowed:
                connection.close(WsCloseCode.RATE_LIMITED, "too many frames")
                return
            try:
                frame = protocol.parse_client_frame(text, max_bytes=app.settings.max_frame_bytes)
            except protocol.ProtocolError as exc:
                connection.close(exc.code, exc.reason)
                return
            if isinstance(frame, protocol.Ping):
                await self.send_text(protocol.pong(frame.nonce))
            elif isinstance(frame, protocol.Subscribe | protocol.Unsubscribe):
                current = connection.filter
                assert isinstance(current, protocol.Filter)
                try:
                    connection.filter = current.apply(frame)
                except protocol.ProtocolError as exc:
                    connection.close(exc.code, exc.reason)
                    return
                await self.send_text(protocol.subscribed(connection.filter))
            elif isinstance(frame, protocol.Refresh):
                await self._refresh(connection, claims, frame.token)
            elif isinstance(frame, protocol.Pong):
                pass  # liveness is any frame (``_heard``)
            else:  # a second auth
                await self.send_text(
                    protocol.error(
                        protocol.ErrorCode.ALREADY_AUTHENTICATED, "already authenticated"
                    )
                )

    async def _refresh(self, connection: Connection, claims: AccessClaims, token: str) -> None:
        try:
            fresh = await self.app.verify(token, ticket=False)
        except AuthenticationError as exc:
            await self.send_text(protocol.error(protocol.ErrorCode.INVALID_TOKEN, exc.detail))
            return
        if fresh.sub != claims.sub:
            await self.send_text(
                protocol.error(protocol.ErrorCode.USER_MISMATCH, "token of another user")
            )
            return
        connection.session_id = fresh.sid
        self.expires_at = max(self.expires_at, float(fresh.exp))
        await self.send_text(protocol.refreshed(self.expires_at))

    async def _clocks(self, connection: Connection, nursery: trio.Nursery) -> None:
        """One task for three waits that were a task each: the token's expiry (4002 unless a
        ``refresh`` came), the heartbeat (``ping`` every ``ping_interval_s`` after the last
        answer; no frame within ``pong_timeout_s`` of a ping closes) and the service going
        away (1001). It waits for ``going_away`` until the nearest deadline; a ping that has
        frame coming in wakes it early. Deadlines are absolute, so an early wake changes no
        time: the expiry is checked ``expires_at - wall()`` after the previous check, the
        next ping is due ``ping_interval_s`` after the answer to the last one, and the answer
        is due ``pong_timeout_s`` after the ping was due. The ping goes out from a
        short-lived task, so expiry and going away are watched while its send waits."""
        app = self.app
        settings = app.settings
        left = self.expires_at - app.wall()
        if left <= 0:
            connection.close(WsCloseCode.TOKEN_EXPIRED, "token expired; refresh in time")
            return
        now = trio.current_time()
        expiry_at = now + left
        next_ping_at = now + settings.ping_interval_s  # inf while a ping is out or awaited
        pong_by = math.inf  # finite while an answer to a ping is awaited
        while True:
            with trio.CancelScope(deadline=min(expiry_at, next_ping_at, pong_by)) as wait:
                self._wake = wait
                try:
                    await app.going_away.wait()
                finally:
                    self._wake = None
            if app.going_away.is_set():
                connection.close(WsCloseCode.GOING_AWAY, "server shutting down")
                return
            now = trio.current_time()
            if now >= expiry_at:
                left = self.expires_at - app.wall()
                if left <= 0:
                    connection.close(WsCloseCode.TOKEN_EXPIRED, "token expired; refresh in time")
                    return
                expiry_at = now + left
            if pong_by < math.inf:
                if self._heard:
                    pong_by = math.inf
                    next_ping_at = now + settings.ping_interval_s
                elif now >= pong_by:
                    connection.close(WsCloseCode.PONG_TIMEOUT, "no answer to ping")
                    return
            elif now >= next_ping_at:
                # The answer is due pong_timeout_s after the ping was due, whether or not it
                # could go out: a peer that stopped reading (its send blocks) is reaped too.
                next_ping_at = math.inf
                pong_by = now + settings.pong_timeout_s
                self._heard = False
                nursery.start_soon(self._ping)

    def _wake_clocks(self) -> None:
        if self._wake is not None:
            self._wake.cancel()

    async def _ping(self) -> None:
        await self.send_text(protocol.server_ping(secrets.token_hex(4)))
