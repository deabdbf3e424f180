"""The gateway as token authority: login, refresh rotation, logout, tickets, verification.

No HTTP here: :class:`AuthService` takes plain values and raises errors of the tree, so the
routes stay thin and the whole flow is testable on a virtual clock. Wall-clock time (token
``iat``/``exp``) comes from the injected ``wall`` function (see :func:`trio_wall_clock`).

Revocation: :class:`Revocations` is the in-process set of revoked session ids, each kept until
the last access token of that session has expired. A logout or a detected refresh-token reuse
adds to it at once and publishes ``session.revoked``; every gateway instance consumes that topic
(:func:`run_revocation_consumer`, its own consumer group) and adds it to its own set, so the
session's access tokens are refused everywhere within the consumer's latency.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from common.contracts.huleedu.events import v1 as events_v1
from common.contracts.huleedu.identity import v1 as identity_v1
from common.errors import AuthenticationError, BusError, SessionRevokedError
from common.events import (
    Topic,
    envelope_headers,
    make_envelope,
)
from common.logs import get_logger
from common.revocations import Revocations
from common.tokens import AccessClaims, TokenSigner, TokenVerifier, UnknownKeyError
from gateway.sessions import (
    REFRESH_TOKEN_CHARS,
    RotateOutcome,
    Session,
    SessionStore,
    hash_refresh_token,
    new_refresh_token,
)

__all__ = [
    "AuthService",
    "Authenticator",
    "Publisher",
    "TokenPair",
    "WsTicket",
    "rebuild_revocations",
]

log = get_logger("gateway.auth")

#: ``authenticate(email, password)`` -> the user (raises AuthenticationError otherwise).
Authenticator = Callable[[str, str], Awaitable[identity_v1.User]]
#: ``publish(topic, key, value, headers)``.
Publisher = Callable[[str, bytes, bytes, list[tuple[str, bytes]]], Awaitable[object]]

_REASONS = {
    "logout": events_v1.RevocationReason.LOGOUT,
    "refresh_reuse": events_v1.RevocationReason.REFRESH_REUSE,
    "admin": events_v1.RevocationReason.ADMIN,
    "user_disabled": events_v1.RevocationReason.USER_DISABLED,
}
_B64URL = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


@dataclass(frozen=True, slots=True)
class TokenPair:
    access_token: str
    expires_in: int
    refresh_token: str
    refresh_expires_in: int
    session_id: str


@dataclass(frozen=True, slots=True)
class WsTicket:
    ticket: str
    expires_in: int


def _valid_refresh_shape(token: str) -> bool:
    return len(token) == REFRESH_TOKEN_CHARS and all(c in _B64URL for c in token)


class AuthService:
    def __init__(
        self,
        *,
        signer: TokenSigner,
        ticket_signer: TokenSigner,
        verifier: TokenVerifier,
        store: SessionStore,
        authenticate: Authenticator,
        publish: Publisher,
        revocations: Revocations,
        wall: Callable[[], float],
        access_ttl_s: int,
        refresh_idle_s: int,
        session_lifetime_s: int,
        ticket_ttl_s: int,
    ) -> None:
        self.signer = signer
        self.ticket_signer = ticket_signer
        self.verifier = verifier
        self.store = store
        self._authenticate = authenticate
        self._publish = publish
        self.revocations = revocations
        self.wall = wall
        self.access_ttl_s = access_ttl_s
        self.refresh_idle_s = refresh_idle_s
        self.session_lifetime_s = session_lifetime_s
        self.ticket_ttl_s = ticket_ttl_s

    # -- verification ----------------------------------------------------------------------------

    def verify(self, token: str) -> AccessClaims:
        """The claims of a valid, unrevoked access token; else AuthenticationError."""
        try:
            return self.verifier.verify(token, self.wall())
        except UnknownKeyError:
            # The gateway is the key authority: an unknown kid is simply invalid (no fetch).
            raise AuthenticationError("unknown kid") from None

    # -- login -----------------------------------------------------------------------------------

    async def login(self, email: str, password: str) -> tuple[TokenPair, Session]:
        user = await self._authenticate(email, password)
        if user.disabled:
            raise AuthenticationError("user is disabled")
        now = self.wall()
        session = Session(
            sid=uuid.uuid4().hex,
            user_id=user.user_id,
            org_id=user.org_id,
            roles=tuple(user.roles),
            display_name=user.display_name,
            created_at=now,
            expires_at=now + self.session_lifetime_s,
        )
        refresh = new_refresh_token()
        refresh_expires = min(now + self.refresh_idle_s, session.expires_at)
        await self.store.create(session, hash_refresh_token(refresh), refresh_expires)
        log.info("login", user_id=user.user_id, session_id=session.sid)
        return self._pair(session, refresh, now, refresh_expires), session

    def _pair(
        self, session: Session, refresh: str, now: float, refresh_expires: float
    ) -> TokenPair:
        access = self.signer.issue(
            sub=session.user_id, org=session.org_id, roles=session.roles, sid=session.sid, now=now
        )
        return TokenPair(
            access_token=access,
            expires_in=self.access_ttl_s,
            refresh_token=refresh,
            refresh_expires_in=max(0, int(refresh_expires - now)),
            session_id=session.sid,
        )

    # -- refresh ---------------------------------------------------------------------------------

    async def refresh(self, refresh_token: str) -> TokenPair:
        if not _valid_refresh_shape(refresh_token):
            raise AuthenticationError("refresh token malformed")
        now = self.wall()
        new = new_refresh_token()
        refresh_expires = now + self.refresh_idle_s
        outcome, session = await self.store.rotate(
            hash_refresh_token(refresh_token),
            hash_refresh_token(new),
            now=now,
            refresh_expires_at=refresh_expires,
        )
        if outcome is RotateOutcome.ROTATED and session is not None:
            return self._pair(session, new, now, min(refresh_expires, session.expires_at))
        if outcome is RotateOutcome.REUSED and session is not None:
            log.warning("refresh token reuse: session revoked", session_id=session.sid)
            await self._announce(session, "refresh_reuse", now)
            raise SessionRevokedError("refresh token reused; session revoked")
        if outcome is RotateOutcome.REVOKED:
            raise SessionRevokedError("refresh of a revoked session")
        raise AuthenticationError(f"refresh refused: {outcome.value}")

    # -- logout and revocation -------------------------------------------------------------------

    async def logout(self, claims: AccessClaims) -> None:
        now = self.wall()
        session = await self.store.revoke(claims.sid, now=now, reason="logout")
        if session is None:
            raise AuthenticationError("session unknown")
        log.info("logout", user_id=claims.sub, session_id=claims.sid)
        await self._announce(session, "logout", now)

    async def _announce(self, session: Session, reason: str, now: float) -> None:
        # Access tokens issued up to now live at most access_ttl_s (+ verifier leeway).
        until = now + self.access_ttl_s + self.verifier.policy.leeway_s
        self.revocations.add(session.sid, until)
        event = events_v1.SessionRevoked(
            user_id=session.user_id,
            session_id=session.sid,
            reason=_REASONS.get(reason, events_v1.RevocationReason.UNSPECIFIED),
            access_expires_at=dt.datetime.fromtimestamp(until, dt.UTC),
        )
        envelope = make_envelope(event, source_service="gateway", user_id=session.user_id)
        try:
            await self._publish(
                Topic.SESSION_REVOKED,
                session.sid.encode(),
                bytes(envelope),
                envelope_headers(envelope),
            )
        except BusError:
            # The store and this instance already refuse the session; other instances learn it
            # when the publish is retried by the next revocation of it or rebuild at start.
            log.exception("session.revoked not published", session_id=session.sid)
            raise

    # -- WebSocket tickets -----------------------------------------------------------------------

    def ws_ticket(self, claims: AccessClaims) -> WsTicket:
        """A signed ticket (``typ=ws_ticket``, 30 s); the WebSocket manager redeems it once."""
        ticket = self.ticket_signer.issue(
            sub=claims.sub,
            org=claims.org,
            roles=claims.roles,
            sid=claims.sid,
            now=self.wall(),
            typ="ws_ticket",
            # The socket the ticket opens lives as long as the access token would have.
            extra={"access_exp": claims.exp},
        )
        return WsTicket(ticket=ticket, expires_in=self.ticket_ttl_s)


async def rebuild_revocations(
    store: SessionStore, revocations: Revocations, *, wall: Callable[[], float], horizon_s: float
) -> int:
    """Load sessions revoked within ``horizon_s`` from the store (shared store deployments)."""
    now = wall()
    sessions = await store.revoked_since(now - horizon_s)
    for session in sessions:
        revocations.add(session.sid, (session.revoked_at or now) + horizon_s)
    return len(sessions)
