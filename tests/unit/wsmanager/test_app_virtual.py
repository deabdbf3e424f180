"""``WsApp`` driven through its ASGI interface on virtual time (``autojump_clock``).

:class:`Peer` plays Hypercorn's part for one WebSocket: it hands the app ``websocket.connect``,
``websocket.receive`` (``text`` or ``bytes``, the other ``None``) and ``websocket.disconnect``,
and records every message the app sends with the virtual time it was sent, enforcing
Hypercorn's order rules (``hypercorn/protocol/ws_stream.py``: nothing before accept but a
refusal, one close, nothing after it). Tokens and tickets are real EdDSA JWTs checked by a real
:class:`TokenVerifier`; the hub is the real :class:`Hub`; the wall clock the app reads follows
``trio.current_time()``. So the auth deadline, flood limits, caps, heartbeat and token expiry
are asserted at exact virtual times, and every test checks that the app never raised.

Each behaviour that once contradicted ``PROTOCOL.md`` or the code's own contract has its
test here (a client-crashing token header, a close that could hang on a stalled peer, a
ticket replayable within the leeway, a stalled reader never reaped, shutdown ignored while
authenticating, close codes and reasons, a rounded slow rate).
"""

from __future__ import annotations

import base64
import contextlib
import enum
import json
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.errors import WsCloseCode
from common.tokens import KeySet, TokenSigner, TokenVerifier, VerifierPolicy
from wsmanager import protocol
from wsmanager.app import ACCESS_LIFETIME_CAP_S, CLOSE_SEND_S, PATH, WsApp
from wsmanager.hub import Delivery, Hub
from wsmanager.serve import ACCESS_MAX_LIFETIME_S, TICKET_MAX_LIFETIME_S
from wsmanager.settings import WsManagerSettings

Message = dict[str, Any]
MockClock = trio.testing.MockClock
C = WsCloseCode

ORIGIN = "https://app.huleedu.test"
ISSUER, AUDIENCE = "https://gateway.test", "huleedu"
KID = "k-current"
#: Wall-clock seconds at the start of each test (whole seconds, so token times are exact).
WALL0 = 1_000_000.0
#: Hypercorn's ``max_app_queue_size`` default: received frames queued before the client waits.
APP_QUEUE = 10
#: Longest any helper waits for the app, in virtual seconds (no real time under autojump).
WAIT_S = 3600.0
EPOCH = "huleedu.notification.teacher.requested.v1/0"


@dataclass(frozen=True)
class User:
    sub: str
    sid: str


ALICE = User("u-alice", "s-alice")
BOB = User("u-bob", "s-bob")
CAROL = User("u-carol", "s-carol")


# -- the gateway's side: keys, tokens, tickets ---------------------------------------------------


class Keys:
    """Ed25519 signing keys; ``published`` is what the gateway's JWKS serves right now."""

    def __init__(self, wall: Callable[[], float]) -> None:
        self._wall = wall
        self._private: dict[str, Ed25519PrivateKey] = {}
        self._published: set[str] = set()
        self.add(KID)

    def add(self, kid: str, *, published: bool = True) -> None:
        self._private[kid] = Ed25519PrivateKey.generate()
        if published:
            self._published.add(kid)

    def published(self) -> KeySet:
        return KeySet({kid: self._private[kid].public_key() for kid in self._published})

    def token(
        self,
        user: User = ALICE,
        *,
        ttl_s: int = 900,
        typ: str = "access",
        kid: str = KID,
        issued_at: float | None = None,
        extra: dict[str, Any] | None = None,
    ) -> str:
        signer = TokenSigner(self._private[kid], kid, issuer=ISSUER, audience=AUDIENCE, ttl_s=ttl_s)
        now = self._wall() if issued_at is None else issued_at
        return signer.issue(
            sub=user.sub, org="o-1", roles=["teacher"], sid=user.sid, now=now, typ=typ, extra=extra
        )

    def ticket(
        self,
        user: User = ALICE,
        *,
        ttl_s: int = 30,
        access_ttl_s: int | None = 600,
        issued_at: float | None = None,
    ) -> str:
        """A ticket as ``AuthService.ws_ticket`` mints it: ``access_exp`` is the ``exp`` of the
        access token it came from (``access_ttl_s`` from now; None leaves the claim out)."""
        now = self._wall() if issued_at is None else issued_at
        extra = None if access_ttl_s is None else {"access_exp": int(now) + access_ttl_s}
        return self.token(user, ttl_s=ttl_s, typ="ws_ticket", issued_at=now, extra=extra)


def nested_header_token(depth: int = 1500) -> str:
    """A well-shaped JWT whose header is ``depth`` nested JSON arrays (under every size limit)."""
    header = base64.urlsafe_b64encode(b"[" * depth).decode().rstrip("=")
    return f"{header}.e30.c2ln"


# -- the Hypercorn side: one WebSocket ------------------------------------------------------------


class State(enum.Enum):
    HANDSHAKE = "handshake"
    CONNECTED = "connected"
    #: The app closed before accepting: Hypercorn answers the upgrade with HTTP 403.
    REFUSED = "refused"
    #: The app sent its close frame.
    CLOSED = "closed"
    #: The client went away (``websocket.disconnect`` delivered).
    GONE = "gone"


class Stall(enum.Enum):
    """A peer that stopped reading: the app's sends block (until cancelled or unstalled)."""

    NONE = "none"
    FRAMES = "frames"
    EVERYTHING = "everything"


@dataclass(frozen=True)
class Sent:
    at: float
    message: Message

    @property
    def kind(self) -> str:
        kind: str = self.message["type"]
        return kind

    def frame(self) -> dict[str, Any] | None:
        if self.kind != "websocket.send":
            return None
        frame: dict[str, Any] = json.loads(self.message["text"])
        return frame


@dataclass(frozen=True)
class Close:
    code: WsCloseCode
    reason: str
    at: float


class Peer:
    """One WebSocket as Hypercorn presents it to the app, with the client at the other end."""

    def __init__(self, scope: Message, *, auto_pong: bool, secrets: list[str]) -> None:
        self.scope = scope
        #: Answer every server heartbeat ping at once, the way a browser client does.
        self.auto_pong = auto_pong
        #: Tokens and tickets this client sent: no close reason or frame may echo them.
        self.secrets = secrets
        self.state = State.HANDSHAKE
        self.sent: list[Sent] = []
        #: The message the last :meth:`next_sent` / :meth:`frame` returned.
        self.last: Sent | None = None
        self.opened_at = trio.current_time()
        self.finished = trio.Event()
        self.finished_at: float | None = None
        self.crashed: Exception | None = None
        self._stall = Stall.NONE
        self._unstalled = trio.Event()
        self._read = 0
        self._changed = trio.Event()
        self._to_app, self._inbox = trio.open_memory_channel[Message](APP_QUEUE)
        self._to_app.send_nowait({"type": "websocket.connect"})

    async def run(self, app: WsApp) -> None:
        try:
            await app(self.scope, self.receive, self.send)
        except Exception as exc:  # Hypercorn logs it, then closes 1011 or answers HTTP 500
            self.crashed = exc
        finally:
            self.finished_at = trio.current_time()
            self._inbox.close()
            self.finished.set()
            self._notify()

    # -- the ASGI callables the app gets ---------------------------------------------------------

    async def receive(self) -> Message:
        return await self._inbox.receive()

    async def send(self, message: MutableMapping[str, Any]) -> None:
        kind = message["type"]
        if self.state is State.GONE:
            return  # Hypercorn drops what the app sends after the stream closed
        if kind == "websocket.accept" and self.state is State.HANDSHAKE:
            self.state = State.CONNECTED
        elif kind == "websocket.close" and self.state is State.HANDSHAKE:
            self.state = State.REFUSED
        elif kind.startswith("websocket.http.response.") and self.state is State.HANDSHAKE:
            pass  # a denial response instead of the upgrade
        elif kind == "websocket.close" and self.state is State.CONNECTED:
            if self._stall is Stall.EVERYTHING:
                await self._unstalled.wait()
            self.state = State.CLOSED
        elif kind == "websocket.send" and self.state is State.CONNECTED:
            if not isinstance(message.get("text"), str):
                raise TypeError(f"the app sent a frame without text: {message!r}")
            if self._stall is not Stall.NONE:
                await self._unstalled.wait()
        else:  # Hypercorn raises UnexpectedMessageError into the app
            raise RuntimeError(f"unexpected ASGI message {kind!r} in state {self.state.value}")
        self._record(message)

    def _record(self, message: MutableMapping[str, Any]) -> None:
        sent = Sent(trio.current_time(), dict(message))
        self.sent.append(sent)
        self._notify()
        frame = sent.frame()
        if self.auto_pong and frame is not None and frame["type"] == "ping":
            pong = json.dumps({"type": "pong", "nonce": frame["nonce"]})
            self._to_app.send_nowait({"type": "websocket.receive", "bytes": None, "text": pong})

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # -- the client ------------------------------------------------------------------------------

    async def send_text(self, text: str) -> None:
        await self._deliver({"type": "websocket.receive", "bytes": None, "text": text})

    async def send_bytes(self, data: bytes) -> None:
        await self._deliver({"type": "websocket.receive", "bytes": data, "text": None})

    async def send_json(self, obj: object) -> None:
        await self.send_text(json.dumps(obj))

    async def auth(self, token: str) -> None:
        self.secrets.append(token)
        await self.send_json({"type": "auth", "token": token})

    async def refresh(self, token: str) -> dict[str, Any]:
        """Send a ``refresh`` frame; the app's answer."""
        self.secrets.append(token)
        await self.send_json({"type": "refresh", "token": token})
        return await self.frame()

    async def ping(self, nonce: str = "n") -> None:
        """A client ping, answered with its pong."""
        await self.send_json({"type": "ping", "nonce": nonce})
        assert await self.frame() == {"type": "pong", "nonce": nonce}

    async def disconnect(self, code: int = 1000) -> None:
        self.state = State.GONE
        await self._deliver({"type": "websocket.disconnect", "code": code})
        with trio.fail_after(WAIT_S):
            await self.finished.wait()
        assert self.crashed is None, f"the app raised {self.crashed!r}"

    def stall(self, what: Stall) -> None:
        self._stall = what

    def unstall(self) -> None:
        self._stall = Stall.NONE
        self._unstalled.set()

    async def _deliver(self, message: Message) -> None:
        with contextlib.suppress(trio.BrokenResourceError):  # the app has returned
            await self._to_app.send(message)

    # -- what the app did ------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self.state is State.CONNECTED and not self.finished.is_set()

    def pings(self) -> list[float]:
        """When the app sent its heartbeat pings."""
        return [s.at for s in self.sent if (s.frame() or {}).get("type") == "ping"]

    async def next_sent(self, within_s: float = WAIT_S) -> Sent:
        """The next message the app sent, in order (each is returned once)."""
        with trio.fail_after(within_s):
            while self._read == len(self.sent):
                if self.finished.is_set():
                    raise AssertionError(
                        f"the app returned (raised: {self.crashed!r}); it sent {self.sent}"
                    )
                await self._changed.wait()
        self.last = self.sent[self._read]
        self._read += 1
        return self.last

    async def frame(self, *, pings: bool = False) -> dict[str, Any]:
        """The next text frame (after the accept); heartbeat pings are skipped unless ``pings``."""
        while True:
            sent = await self.next_sent()
            if sent.kind == "websocket.accept":
                continue
            frame = sent.frame()
            if frame is None:
                raise AssertionError(f"expected a frame, the app sent {sent}")
            if pings or frame["type"] != "ping":
                return frame

    async def closed(self, within_s: float = WAIT_S) -> Close:
        """Wait until the app returns; its close frame, checked for what every close needs."""
        with trio.fail_after(within_s):
            await self.finished.wait()
        assert self.crashed is None, f"the app raised {self.crashed!r}"
        kinds = [s.kind for s in self.sent]
        assert kinds[0] == "websocket.accept", f"refused before the upgrade: {self.sent}"
        assert kinds.count("websocket.close") == 1 and kinds[-1] == "websocket.close", kinds
        close = self.sent[-1]
        code, reason = close.message["code"], close.message.get("reason") or ""
        assert code in set(WsCloseCode), f"close code {code} is not in the documented table"
        assert reason, f"close {code} without a reason"
        assert len(reason.encode()) <= protocol.MAX_CLOSE_REASON_BYTES, reason
        for secret in self.secrets:
            assert secret not in reason, "a token or ticket in the close reason"
        return Close(WsCloseCode(code), reason, close.at)

    async def refusal(self) -> int:
        """The HTTP status Hypercorn answers a handshake the app refused before accepting."""
        with trio.fail_after(WAIT_S):
            await self.finished.wait()
        assert self.crashed is None, f"the app raised {self.crashed!r}"
        assert self.sent, "the app neither accepted nor refused"
        first = self.sent[0].message
        assert first["type"] != "websocket.accept", f"accepted: {self.sent}"
        if first["type"] == "websocket.close":
            return 403
        status: int = first["status"]
        return status


# -- one wsmanager instance ------------------------------------------------------------------------


class Env:
    """A ``WsApp`` wired the way ``serve_wsmanager`` wires it, minus the network and Kafka."""

    def __init__(self, nursery: trio.Nursery, **settings: Any) -> None:
        self.nursery = nursery
        self.t0 = trio.current_time()
        self.settings = WsManagerSettings(allowed_origins=(ORIGIN,), log_json=False, **settings)
        self.keys = Keys(self.wall)
        self.revoked: set[str] = set()
        self.is_ready = True
        self.going_away = trio.Event()
        #: The ``kid`` of every JWKS refresh the app asked for.
        self.key_requests: list[str] = []
        self.peers: list[Peer] = []
        s = self.settings
        self.hub = Hub(
            max_connections=s.max_connections,
            max_connections_per_user=s.max_connections_per_user,
            replay_events_per_user=s.replay_events_per_user,
            replay_users=s.replay_users,
        )
        self.verifier = self._verifier("access", ACCESS_MAX_LIFETIME_S)
        self.ticket_verifier = self._verifier("ws_ticket", TICKET_MAX_LIFETIME_S)
        self.app = WsApp(
            s,
            self.hub,
            verifier=self.verifier,
            ticket_verifier=self.ticket_verifier,
            refresh_keys=self._refresh_keys,
            wall=self.wall,
            going_away=self.going_away,
            ready=lambda: self.is_ready,
        )

    def wall(self) -> float:
        return WALL0 + (trio.current_time() - self.t0)

    def _verifier(self, typ: str, max_lifetime_s: float) -> TokenVerifier:
        policy = VerifierPolicy(
            issuer=ISSUER,
            audience=AUDIENCE,
            leeway_s=self.settings.token_leeway_s,
            max_lifetime_s=max_lifetime_s,
            expected_typ=typ,
        )
        return TokenVerifier(policy, self.keys.published(), is_revoked=self.revoked.__contains__)

    async def _refresh_keys(self, kid: str) -> bool:
        """``JwksCache.on_unknown_kid`` in memory: fetch what the gateway publishes now."""
        self.key_requests.append(kid)
        keys = self.keys.published()
        if keys.get(kid) is None:
            return False
        self.verifier.keys = self.ticket_verifier.keys = keys
        return True

    def connect(
        self,
        *,
        path: str = PATH,
        origin: str | None = ORIGIN,
        headers: tuple[tuple[bytes, bytes], ...] = (),
        ticket: str | None = None,
        since: str | None = None,
        auto_pong: bool = False,
    ) -> Peer:
        """Open a socket (the handshake reached the app); nothing is sent yet."""
        query, secrets = [], []
        if ticket is not None:
            query.append(f"ticket={ticket}")
            secrets.append(ticket)
        if since is not None:
            query.append(f"since={since}")
        all_headers = [(b"host", b"ws.huleedu.test"), (b"upgrade", b"websocket")]
        if origin is not None:
            all_headers.append((b"origin", origin.encode()))
        all_headers += headers
        scope: Message = {
            "type": "websocket",
            "asgi": {"spec_version": "2.3", "version": "3.0"},
            "scheme": "wss",
            "http_version": "1.1",
            "path": path,
            "raw_path": path.encode(),
            "query_string": "&".join(query).encode(),
            "root_path": "",
            "headers": all_headers,
            "client": ("127.0.0.1", 40000 + len(self.peers)),
            "server": ("127.0.0.1", 8444),
            "state": {},
            "subprotocols": [],
            "extensions": {"websocket.http.response": {}},
        }
        peer = Peer(scope, auto_pong=auto_pong, secrets=secrets)
        self.peers.append(peer)
        self.nursery.start_soon(peer.run, self.app)
        return peer

    async def login(
        self, user: User = ALICE, *, token: str | None = None, **connect: Any
    ) -> tuple[Peer, dict[str, Any]]:
        """An authenticated socket (auth frame) and its welcome."""
        peer = self.connect(**connect)
        await peer.auth(token or self.keys.token(user))
        welcome = await peer.frame()
        assert welcome["type"] == "welcome", welcome
        return peer, welcome

    def publish(self, user: User, offset: int) -> None:
        """An event of ``user``'s, as the notification consumer hands it to the hub."""
        frame = protocol.encode_event(
            offset=offset,
            epoch=EPOCH,
            event_id=f"e-{offset}",
            event_type="batch_status_changed",
            occurred_at=self.wall(),
            batch_id="b1",
            category="batch_progress",
            payload_json='{"status":"processing"}',
        )
        self.hub.dispatch(
            Delivery(EPOCH, offset, user.sub, f"e-{offset}", "b1", "batch_progress", frame)
        )


MakeEnv = Callable[..., Env]


@pytest.fixture
async def make_env(nursery: trio.Nursery) -> AsyncIterator[MakeEnv]:
    """``make_env(**settings)``: a fresh instance whose sockets run in the test's nursery."""
    envs: list[Env] = []

    def make(**settings: Any) -> Env:
        clock = trio.lowlevel.current_clock()
        assert isinstance(clock, MockClock), "these tests must request autojump_clock"
        env = Env(nursery, **settings)
        envs.append(env)
        return env

    yield make
    for env in envs:  # a stalled send could otherwise outlive the test's nursery
        for peer in env.peers:
            peer.unstall()


@pytest.fixture
async def env(make_env: MakeEnv) -> Env:
    return make_env()


# -- handshake and authentication ------------------------------------------------------------------


async def test_an_auth_frame_gets_the_welcome_of_the_tokens_user(
    autojump_clock: MockClock, env: Env
) -> None:
    peer, welcome = await env.login(token=env.keys.token(ALICE, ttl_s=600))
    assert welcome["user_id"] == ALICE.sub
    assert welcome["resume"] is None
    assert welcome["expires_at"] == protocol.rfc3339(WALL0 + 600)
    assert welcome["connection_id"]
    assert peer.last is not None and peer.last.at == peer.opened_at
    assert env.hub.stats.connections == 1
    await peer.ping("n1")
    await peer.auth(env.keys.token())  # a second auth frame is ignored, not fatal
    assert (await peer.frame())["code"] == "already_authenticated"
    assert peer.is_open


@pytest.mark.parametrize(
    "handshake",
    [
        {"origin": "https://evil.test"},
        {"origin": ORIGIN + "/"},
        {"origin": "null"},
        {"headers": ((b"origin", b"https://evil.test"),)},  # a second Origin header
        {"path": "/v1/other"},
        {"path": PATH + "/"},
        {"since": "no-colon"},
        {"since": f"{EPOCH}:-1"},
        {"since": ""},  # an empty resume point is malformed, not "no since"
    ],
    ids=str,
)
async def test_a_bad_origin_path_or_since_is_refused_before_the_upgrade(
    autojump_clock: MockClock, env: Env, handshake: dict[str, Any]
) -> None:
    peer = env.connect(**handshake)
    assert await peer.refusal() == 403
    assert peer.finished_at == peer.opened_at
    assert env.hub.stats.connections == 0


async def test_a_missing_origin_follows_allow_missing_origin(
    autojump_clock: MockClock, make_env: MakeEnv
) -> None:
    assert await make_env(allow_missing_origin=False).connect(origin=None).refusal() == 403
    _, welcome = await make_env().login(origin=None)
    assert welcome["user_id"] == ALICE.sub


@pytest.mark.parametrize("timeout_s", [10.0, 0.5, 120.0])
async def test_no_auth_frame_closes_4001_exactly_at_the_auth_deadline(
    autojump_clock: MockClock, make_env: MakeEnv, timeout_s: float
) -> None:
    env = make_env(auth_timeout_s=timeout_s)
    peer = env.connect()
    await trio.sleep_until(peer.opened_at + timeout_s - 0.01)
    assert peer.is_open, "closed before the auth deadline"
    close = await peer.closed()
    assert close.code == C.AUTH_FAILED
    assert close.at == peer.opened_at + timeout_s
    assert env.app.stats.auth_failures == 1
    assert env.hub.stats.connections == 0


async def test_an_auth_frame_half_a_second_before_the_deadline_is_accepted(
    autojump_clock: MockClock, env: Env
) -> None:
    peer = env.connect()
    deadline = peer.opened_at + env.settings.auth_timeout_s
    await trio.sleep_until(deadline - 0.5)
    await peer.auth(env.keys.token())
    assert (await peer.frame())["type"] == "welcome"
    assert peer.last is not None and peer.last.at == deadline - 0.5
    await trio.sleep_until(deadline + 5)
    assert peer.is_open, "the auth deadline must not apply once authenticated"
    await peer.ping()


FIRST_FRAMES: dict[str, tuple[Callable[[Keys], str | bytes], WsCloseCode]] = {
    "ping first": (lambda k: json.dumps({"type": "ping"}), C.AUTH_FAILED),
    "refresh first": (
        lambda k: json.dumps({"type": "refresh", "token": k.token()}),
        C.AUTH_FAILED,
    ),
    "not a JWT": (lambda k: json.dumps({"type": "auth", "token": "not.a.jwt"}), C.AUTH_FAILED),
    "a ticket is no access token": (
        lambda k: json.dumps({"type": "auth", "token": k.ticket()}),
        C.AUTH_FAILED,
    ),
    "a refresh-typed token": (
        lambda k: json.dumps({"type": "auth", "token": k.token(typ="refresh")}),
        C.AUTH_FAILED,
    ),
    "lifetime over 15 minutes": (
        lambda k: json.dumps({"type": "auth", "token": k.token(ttl_s=901)}),
        C.AUTH_FAILED,
    ),
    "not JSON": (lambda k: "{auth", C.INVALID_PAYLOAD),
    "token not a string": (lambda k: '{"type": "auth", "token": 7}', C.INVALID_PAYLOAD),
    "binary": (lambda k: b"\x00auth", C.UNSUPPORTED_DATA),
    "over max_frame_bytes": (
        lambda k: json.dumps({"type": "auth", "token": "x" * (64 * 1024)}),
        C.MESSAGE_TOO_BIG,
    ),
}


@pytest.mark.parametrize("case", FIRST_FRAMES)
async def test_a_first_frame_that_is_not_a_valid_auth_closes_at_once(
    autojump_clock: MockClock, env: Env, case: str
) -> None:
    make_frame, code = FIRST_FRAMES[case]
    peer = env.connect()
    await trio.sleep(1.5)
    frame = make_frame(env.keys)
    if isinstance(frame, bytes):
        await peer.send_bytes(frame)
    else:
        peer.secrets.append(frame)  # nothing of the frame (token included) in the reason
        await peer.send_text(frame)
    close = await peer.closed()
    assert close.code == code
    assert close.at == peer.opened_at + 1.5
    assert [s.kind for s in peer.sent] == ["websocket.accept", "websocket.close"]
    assert env.hub.stats.connections == 0


async def test_an_unknown_kid_refreshes_the_jwks_once_then_verifies(
    autojump_clock: MockClock, env: Env
) -> None:
    env.keys.add("k-next")  # the gateway rotated after the wsmanager fetched its JWKS
    _, welcome = await env.login(token=env.keys.token(kid="k-next"))
    assert welcome["user_id"] == ALICE.sub
    assert env.key_requests == ["k-next"]


async def test_a_kid_the_jwks_does_not_have_closes_4001(
    autojump_clock: MockClock, env: Env
) -> None:
    env.keys.add("k-rogue", published=False)
    peer = env.connect()
    await peer.auth(env.keys.token(kid="k-rogue"))
    assert (await peer.closed()).code == C.AUTH_FAILED
    assert env.key_requests == ["k-rogue"]


@pytest.mark.parametrize("case", ["expired", "revoked"])
async def test_an_expired_or_revoked_token_closes_with_the_code_protocol_md_names(
    autojump_clock: MockClock, env: Env, case: str
) -> None:
    if case == "expired":  # past exp + leeway
        token = env.keys.token(ttl_s=60, issued_at=WALL0 - 60 - env.settings.token_leeway_s)
        expected = C.TOKEN_EXPIRED
    else:
        env.revoked.add(ALICE.sid)
        token = env.keys.token()
        expected = C.SESSION_REVOKED
    peer = env.connect()
    await peer.auth(token)
    assert (await peer.closed()).code == expected


# -- tickets ---------------------------------------------------------------------------------------


async def test_a_ticket_authenticates_without_an_auth_frame_and_only_once(
    autojump_clock: MockClock, env: Env
) -> None:
    ticket = env.keys.ticket()
    first = env.connect(ticket=ticket)
    welcome = await first.frame()
    assert welcome["type"] == "welcome" and welcome["user_id"] == ALICE.sub
    again = env.connect(ticket=ticket)
    close = await again.closed()  # the upgrade is accepted, then closed (browsers see a code)
    assert close.code == C.AUTH_FAILED and close.at == again.opened_at
    assert first.is_open
    await first.disconnect()
    await trio.sleep(10)
    assert (await env.connect(ticket=ticket).closed()).code == C.AUTH_FAILED


BAD_TICKETS: dict[str, Callable[[Keys], str]] = {
    "access token": lambda k: k.token(),
    "expired": lambda k: k.ticket(issued_at=WALL0 - 30 - 30),  # past exp + the 30 s leeway
    "unknown key": lambda k: k.token(typ="ws_ticket", ttl_s=30, kid="k-rogue"),
    "lifetime over 120 s": lambda k: k.ticket(ttl_s=121),
    "garbage": lambda k: "a.b.c",
}


@pytest.mark.parametrize("case", BAD_TICKETS)
async def test_a_bad_ticket_closes_4001_after_the_upgrade(
    autojump_clock: MockClock, env: Env, case: str
) -> None:
    env.keys.add("k-rogue", published=False)
    peer = env.connect(ticket=BAD_TICKETS[case](env.keys))
    close = await peer.closed()
    assert close.code == C.AUTH_FAILED and close.at == peer.opened_at


async def test_a_ticket_socket_lives_as_long_as_the_access_token_it_was_minted_from(
    autojump_clock: MockClock, env: Env
) -> None:
    plain = env.connect(ticket=env.keys.ticket(ttl_s=30, access_ttl_s=120), auto_pong=True)
    assert (await plain.frame())["expires_at"] == protocol.rfc3339(WALL0 + 120)
    refreshed = env.connect(ticket=env.keys.ticket(ttl_s=30, access_ttl_s=120), auto_pong=True)
    await refreshed.frame()
    await trio.sleep_until(env.t0 + 100)
    answer = await refreshed.refresh(env.keys.token(ttl_s=300))
    assert answer == {"type": "refreshed", "expires_at": protocol.rfc3339(WALL0 + 400)}
    await trio.sleep_until(env.t0 + 120 - 0.01)
    assert plain.is_open, "the ticket's own 30 s must not end the socket"
    close = await plain.closed()
    assert close.code == C.TOKEN_EXPIRED and close.at == plain.opened_at + 120
    assert refreshed.is_open


@pytest.mark.parametrize(
    ("access_ttl_s", "lives_s"),
    [(None, 30), (ACCESS_LIFETIME_CAP_S + 600, ACCESS_LIFETIME_CAP_S)],
    ids=["no access_exp: the ticket's exp", "access_exp capped"],
)
async def test_a_ticket_socket_without_or_with_an_overlong_access_exp(
    autojump_clock: MockClock, env: Env, access_ttl_s: int | None, lives_s: int
) -> None:
    peer = env.connect(ticket=env.keys.ticket(access_ttl_s=access_ttl_s), auto_pong=True)
    assert (await peer.frame())["expires_at"] == protocol.rfc3339(WALL0 + lives_s)
    close = await peer.closed()
    assert close.code == C.TOKEN_EXPIRED and close.at == peer.opened_at + lives_s


async def test_a_spent_ticket_stays_spent_for_as_long_as_it_verifies(
    autojump_clock: MockClock, env: Env
) -> None:
    for offset in (10, 11, 12):
        env.publish(ALICE, offset)
    ticket = env.keys.ticket(ttl_s=30)
    first = env.connect(ticket=ticket)
    assert (await first.frame())["type"] == "welcome"
    await first.disconnect()
    for i in range(1100):  # a busy instance: other clients' tickets redeemed meanwhile
        assert env.app.tickets.redeem(f"other-{i}", env.wall() + 30, env.wall())
    await trio.sleep_until(env.t0 + 31)  # past the ticket's exp, inside the verifier's leeway
    replay = env.connect(ticket=ticket, since=f"{EPOCH}:10")  # e.g. the URL from a log
    with trio.move_on_after(5):
        await replay.finished.wait()
    assert [s.frame() for s in replay.sent if s.frame()] == [], "a spent ticket got frames"
    assert (await replay.closed()).code == C.AUTH_FAILED


# -- floods ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("rate", "burst"), [(10.0, 30), (0.5, 3)])
async def test_a_burst_passes_and_the_next_frame_closes_4029(
    autojump_clock: MockClock, make_env: MakeEnv, rate: float, burst: int
) -> None:
    env = make_env(inbound_rate_per_s=rate, inbound_burst=burst)
    peer, _ = await env.login()
    start = trio.current_time()
    for i in range(burst):
        await peer.ping(f"b{i}")
    await peer.send_json({"type": "ping", "nonce": "one too many"})
    close = await peer.closed()
    assert close.code == C.RATE_LIMITED
    assert close.at == start
    assert env.hub.stats.connections == 0


@pytest.mark.parametrize(("rate", "burst"), [(10.0, 30), (0.5, 3)])
async def test_after_a_burst_one_more_frame_passes_each_one_over_rate_seconds(
    autojump_clock: MockClock, make_env: MakeEnv, rate: float, burst: int
) -> None:
    env = make_env(inbound_rate_per_s=rate, inbound_burst=burst)
    peer, _ = await env.login()
    start = trio.current_time()
    for i in range(burst):
        await peer.ping(f"b{i}")
    for k in (1, 2):
        await trio.sleep_until(start + k / rate)
        await peer.ping(f"refilled-{k}")
    await peer.send_json({"type": "ping", "nonce": "too soon"})
    close = await peer.closed()
    assert close.code == C.RATE_LIMITED and close.at == start + 2 / rate


@pytest.mark.parametrize(("rate", "burst"), [(10.0, 30), (0.5, 3)])
async def test_a_frame_just_before_the_bucket_refills_closes_4029(
    autojump_clock: MockClock, make_env: MakeEnv, rate: float, burst: int
) -> None:
    env = make_env(inbound_rate_per_s=rate, inbound_burst=burst)
    peer, _ = await env.login()
    start = trio.current_time()
    for i in range(burst):
        await peer.ping(f"b{i}")
    await trio.sleep_until(start + 1 / rate - 0.001)
    await peer.send_json({"type": "ping", "nonce": "early"})
    close = await peer.closed()
    assert close.code == C.RATE_LIMITED and close.at == start + 1 / rate - 0.001


async def test_frames_at_the_sustained_rate_are_never_limited(
    autojump_clock: MockClock, env: Env
) -> None:
    peer, _ = await env.login()
    start = trio.current_time()
    rate = env.settings.inbound_rate_per_s
    for i in range(1, int(60 * rate) + 1):
        await trio.sleep_until(start + i / rate)
        await peer.ping(f"s{i}")
    assert peer.is_open
    # The client never sent a pong, but any frame is a sign of life for the heartbeat.
    assert len(peer.pings()) == 2


async def test_a_slow_inbound_rate_is_not_rounded_up(
    autojump_clock: MockClock, make_env: MakeEnv
) -> None:
    env = make_env(
        inbound_rate_per_s=0.01, inbound_burst=1, ping_interval_s=600, pong_timeout_s=600
    )
    peer, _ = await env.login()
    start = trio.current_time()
    await peer.ping("first")
    await trio.sleep_until(start + 99)  # one frame per 100 s: the bucket is still empty
    await peer.send_json({"type": "ping", "nonce": "too soon"})
    sent = await peer.next_sent()
    assert sent.kind == "websocket.close" and sent.message["code"] == C.RATE_LIMITED, sent


# -- connection caps -------------------------------------------------------------------------------


async def test_the_per_user_cap_refuses_the_next_socket_and_a_disconnect_frees_a_slot(
    autojump_clock: MockClock, make_env: MakeEnv
) -> None:
    env = make_env(max_connections_per_user=2)
    a, _ = await env.login(ALICE)
    b, _ = await env.login(ALICE)
    bob, _ = await env.login(BOB)  # other users do not count
    third = env.connect()
    await trio.sleep(1)
    await third.auth(env.keys.token(ALICE))
    close = await third.closed()
    assert close.code == C.TOO_MANY_CONNECTIONS and close.at == third.opened_at + 1
    for peer in (a, b, bob):
        assert peer.is_open
        await peer.ping()
    assert env.hub.stats.refused_user_cap == 1 and env.hub.stats.connections == 3
    await a.disconnect()
    assert env.hub.stats.connections == 2
    again, welcome = await env.login(ALICE)
    assert welcome["user_id"] == ALICE.sub and b.is_open and again.is_open


async def test_a_ticket_refused_by_the_cap_is_not_spent(
    autojump_clock: MockClock, make_env: MakeEnv
) -> None:
    env = make_env(max_connections_per_user=1)
    first, _ = await env.login(ALICE)
    ticket = env.keys.ticket()
    refused = await env.connect(ticket=ticket).closed()
    assert refused.code == C.TOO_MANY_CONNECTIONS
    await first.disconnect()
    retried = env.connect(ticket=ticket)
    assert (await retried.frame())["type"] == "welcome"
    await retried.disconnect()
    assert (await env.connect(ticket=ticket).closed()).code == C.AUTH_FAILED  # now it is


async def test_a_dead_socket_is_reaped_by_the_heartbeat_and_frees_its_slot(
    autojump_clock: MockClock, make_env: MakeEnv
) -> None:
    env = make_env(max_connections_per_user=1)
    dead, _ = await env.login()  # answers nothing from now on
    reaped_at = dead.opened_at + env.settings.ping_interval_s + env.settings.pong_timeout_s
    await trio.sleep_until(reaped_at - 0.01)
    early = env.connect()
    await early.auth(env.keys.token())
    assert (await early.closed()).code == C.TOO_MANY_CONNECTIONS
    close = await dead.closed()
    assert close.code == C.PONG_TIMEOUT and close.at == reaped_at
    _, welcome = await env.login()
    assert welcome["type"] == "welcome"


async def test_a_peer_that_stopped_reading_is_reaped_too(
    autojump_clock: MockClock, make_env: MakeEnv
) -> None:
    env = make_env(max_connections_per_user=1)
    stuck, _ = await env.login()
    welcomed = stuck.opened_at
    stuck.stall(Stall.FRAMES)  # its TCP window is full: no frame goes out any more
    env.publish(ALICE, 1)
    s = env.settings
    await trio.sleep_until(welcomed + s.ping_interval_s + s.pong_timeout_s + CLOSE_SEND_S)
    _, welcome = await env.login()
    assert welcome["type"] == "welcome"


async def test_the_global_cap_refuses_1013_and_a_disconnect_frees_a_slot(
    autojump_clock: MockClock, make_env: MakeEnv
) -> None:
    env = make_env(max_connections=2)
    a, _ = await env.login(ALICE)
    b, _ = await env.login(BOB)
    third = env.connect()
    await third.auth(env.keys.token(CAROL))
    close = await third.closed()
    assert close.code == C.TRY_AGAIN_LATER and close.at == third.opened_at
    assert a.is_open and b.is_open
    assert env.hub.stats.refused_global_cap == 1
    await a.disconnect()
    _, welcome = await env.login(CAROL)
    assert welcome["user_id"] == CAROL.sub
    await b.ping()


async def test_an_instance_still_catching_up_refuses_1013(
    autojump_clock: MockClock, env: Env
) -> None:
    env.is_ready = False
    peer = env.connect()
    await peer.auth(env.keys.token())
    assert (await peer.closed()).code == C.TRY_AGAIN_LATER
    assert env.hub.stats.connections == 0
    env.is_ready = True
    await env.login()


# -- malformed and oversize frames -----------------------------------------------------------------

MALFORMED: dict[str, tuple[str, str]] = {  # frame text, the field the reason starts with
    "not JSON": ("{nope", "frame"),
    "JSON array": ("[1, 2]", "frame"),
    "JSON string": ('"ping"', "frame"),
    "NaN": ('{"type": "ping", "nonce": NaN}', "frame"),
    "deep nesting": ("[" * 20_000, "frame"),
    "no type": ('{"nonce": "x"}', "type"),
    "type not a string": ('{"type": 1}', "type"),
    "unknown type": ('{"type": "hello"}', "type"),
    "duplicate key": ('{"type": "ping", "type": "pong"}', "type"),
    "unknown field": ('{"type": "ping", "extra": 1}', "extra"),
    "nonce not a string": ('{"type": "ping", "nonce": 7}', "nonce"),
    "batch_ids not an array": ('{"type": "subscribe", "batch_ids": "b1"}', "batch_ids"),
    "bad batch id": ('{"type": "subscribe", "batch_ids": ["b 1"]}', "batch_ids[0]"),
    "unknown category": ('{"type": "subscribe", "categories": ["grades"]}', "categories[0]"),
    "empty unsubscribe": ('{"type": "unsubscribe"}', "batch_ids"),
    "refresh token not a string": ('{"type": "refresh", "token": 5}', "token"),
}


@pytest.mark.parametrize("case", MALFORMED)
async def test_a_malformed_frame_closes_1007_naming_the_field(
    autojump_clock: MockClock, env: Env, case: str
) -> None:
    text, field = MALFORMED[case]
    peer, _ = await env.login()
    await trio.sleep(3)
    await peer.send_text(text)
    close = await peer.closed()
    assert close.code == C.INVALID_PAYLOAD
    assert close.reason.startswith(f"{field}:"), close.reason
    assert close.at == peer.opened_at + 3
    assert env.app.stats.closed == {int(C.INVALID_PAYLOAD): 1}
    assert env.hub.stats.connections == 0


async def test_a_binary_frame_closes_1003(autojump_clock: MockClock, env: Env) -> None:
    peer, _ = await env.login()
    await peer.send_bytes(json.dumps({"type": "ping"}).encode())
    close = await peer.closed()
    assert close.code == C.UNSUPPORTED_DATA
    assert close.reason == protocol.BINARY_FRAME_REASON


async def test_a_frame_of_exactly_max_frame_bytes_passes(
    autojump_clock: MockClock, make_env: MakeEnv
) -> None:
    env = make_env(max_frame_bytes=2048)
    peer, _ = await env.login()
    head = '{"type":"ping","nonce":"edge"'
    await peer.send_text(head + " " * (2048 - len(head) - 1) + "}")
    assert await peer.frame() == {"type": "pong", "nonce": "edge"}
    await peer.send_text("é" * 1024)  # 2048 UTF-8 bytes: within the limit, so judged as JSON
    assert (await peer.closed()).code == C.INVALID_PAYLOAD


@pytest.mark.parametrize(
    "text",
    [
        '{"type":"ping"}' + " " * (2049 - 15),  # one byte over
        "é" * 1025,  # 1025 characters (Hypercorn's count passes) but 2050 UTF-8 bytes
        '{"type":"ping","nonce":"' + "x" * 70_000 + '"}',
    ],
    ids=["one byte over", "multibyte", "far over"],
)
async def test_a_frame_over_max_frame_bytes_closes_1009(
    autojump_clock: MockClock, make_env: MakeEnv, text: str
) -> None:
    env = make_env(max_frame_bytes=2048)
    peer, _ = await env.login()
    await peer.send_text(text)
    close = await peer.closed()
    assert close.code == C.MESSAGE_TOO_BIG
    assert "2048" in close.reason


async def test_a_filter_over_100_batch_ids_closes_1008(autojump_clock: MockClock, env: Env) -> None:
    peer, _ = await env.login()
    ids = [f"b{i}" for i in range(protocol.MAX_FILTER_BATCH_IDS)]
    await peer.send_json({"type": "subscribe", "batch_ids": ids})
    assert (await peer.frame())["batch_ids"] == sorted(ids)
    await peer.send_json({"type": "subscribe", "batch_ids": ["one-more"]})
    close = await peer.closed()
    assert close.code == C.POLICY_VIOLATION and close.reason.startswith("batch_ids")


@pytest.mark.parametrize("how", ["auth frame", "ticket", "refresh frame"])
async def test_a_token_with_a_deeply_nested_header_is_refused_not_a_crash(
    autojump_clock: MockClock, env: Env, how: str
) -> None:
    hostile = nested_header_token()
    if how == "ticket":
        peer = env.connect(ticket=hostile)
        assert (await peer.closed()).code == C.AUTH_FAILED
    elif how == "auth frame":
        peer = env.connect()
        await peer.auth(hostile)
        assert (await peer.closed()).code == C.AUTH_FAILED
    else:
        peer, _ = await env.login()
        assert (await peer.refresh(hostile))["code"] == "invalid_token"
        await peer.ping()
    assert peer.crashed is None


# -- heartbeat -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("interval_s", "timeout_s"), [(25.0, 10.0), (5.0, 2.5)])
async def test_a_silent_client_is_pinged_once_and_closed_4010_at_interval_plus_timeout(
    autojump_clock: MockClock, make_env: MakeEnv, interval_s: float, timeout_s: float
) -> None:
    env = make_env(ping_interval_s=interval_s, pong_timeout_s=timeout_s)
    peer, _ = await env.login()
    welcomed = peer.opened_at
    await trio.sleep_until(welcomed + interval_s + timeout_s - 0.01)
    assert peer.is_open
    assert peer.pings() == [welcomed + interval_s]
    close = await peer.closed()
    assert close.code == C.PONG_TIMEOUT
    assert close.at == welcomed + interval_s + timeout_s


async def test_answering_every_ping_keeps_the_socket_open_for_many_intervals(
    autojump_clock: MockClock, env: Env
) -> None:
    peer, _ = await env.login(auto_pong=True)
    welcomed = peer.opened_at
    await trio.sleep_until(welcomed + 30 * 25 + 1)
    assert peer.is_open
    assert peer.pings() == [welcomed + 25 * k for k in range(1, 31)]
    peer.auto_pong = False
    close = await peer.closed()
    assert close.code == C.PONG_TIMEOUT and close.at == welcomed + 31 * 25 + 10


async def test_any_frame_just_inside_the_pong_timeout_counts_as_the_answer(
    autojump_clock: MockClock, env: Env
) -> None:
    peer, _ = await env.login()
    welcomed = peer.opened_at
    await trio.sleep_until(welcomed + 25 + 10 - 0.01)
    await peer.ping("late")  # a client ping, not a pong
    await trio.sleep_until(welcomed + 25 + 10 + 1)
    assert peer.is_open
    close = await peer.closed()
    first, second = peer.pings()
    assert first == welcomed + 25
    assert close.code == C.PONG_TIMEOUT and close.at == second + 10


# -- token expiry and refresh ----------------------------------------------------------------------


async def test_without_a_refresh_the_socket_closes_4002_exactly_at_exp(
    autojump_clock: MockClock, env: Env
) -> None:
    peer, welcome = await env.login(token=env.keys.token(ttl_s=60), auto_pong=True)
    assert welcome["expires_at"] == protocol.rfc3339(WALL0 + 60)
    await trio.sleep_until(peer.opened_at + 60 - 0.01)
    assert peer.is_open
    close = await peer.closed()
    assert close.code == C.TOKEN_EXPIRED and close.at == peer.opened_at + 60
    assert env.hub.stats.connections == 0


async def test_the_expiry_has_no_leeway_a_token_inside_the_verifiers_leeway_closes_at_once(
    autojump_clock: MockClock, env: Env
) -> None:
    # exp was 10 s ago: the verifier still accepts it (leeway 30 s), the socket does not live on.
    token = env.keys.token(ttl_s=60, issued_at=WALL0 - 70)
    peer, welcome = await env.login(token=token)
    assert welcome["expires_at"] == protocol.rfc3339(WALL0 - 10)
    close = await peer.closed()
    assert close.code == C.TOKEN_EXPIRED and close.at == peer.opened_at


async def test_each_refresh_extends_to_the_new_tokens_exp(
    autojump_clock: MockClock, env: Env
) -> None:
    peer, _ = await env.login(token=env.keys.token(ttl_s=60), auto_pong=True)
    start = peer.opened_at
    for at, new_exp in ((30, 90), (80, 140)):
        await trio.sleep_until(start + at)
        answer = await peer.refresh(env.keys.token(ttl_s=60))
        assert answer == {"type": "refreshed", "expires_at": protocol.rfc3339(WALL0 + new_exp)}
    await trio.sleep_until(start + 140 - 0.01)
    assert peer.is_open
    close = await peer.closed()
    assert close.code == C.TOKEN_EXPIRED and close.at == start + 140


async def test_a_refresh_with_an_earlier_exp_does_not_shorten_the_connection(
    autojump_clock: MockClock, env: Env
) -> None:
    peer, _ = await env.login(token=env.keys.token(ttl_s=300), auto_pong=True)
    answer = await peer.refresh(env.keys.token(ttl_s=60))
    assert answer["expires_at"] == protocol.rfc3339(WALL0 + 300)
    close = await peer.closed()
    assert close.code == C.TOKEN_EXPIRED and close.at == peer.opened_at + 300


REFUSED_REFRESHES: dict[str, tuple[Callable[[Keys], str], str]] = {
    "another user": (lambda k: k.token(BOB, ttl_s=600), "user_mismatch"),
    "not a JWT": (lambda k: "x.y.z", "invalid_token"),
    "a ticket": (lambda k: k.ticket(), "invalid_token"),
    "expired": (lambda k: k.token(ttl_s=60, issued_at=WALL0 - 200), "invalid_token"),
    "revoked session": (lambda k: k.token(User(ALICE.sub, "s-revoked")), "invalid_token"),
}


@pytest.mark.parametrize("case", REFUSED_REFRESHES)
async def test_a_refused_refresh_is_an_error_frame_and_the_old_expiry_stands(
    autojump_clock: MockClock, env: Env, case: str
) -> None:
    env.revoked.add("s-revoked")
    make_token, code = REFUSED_REFRESHES[case]
    peer, _ = await env.login(token=env.keys.token(ttl_s=60), auto_pong=True)
    await trio.sleep(10)
    token = make_token(env.keys)
    answer = await peer.refresh(token)
    assert answer["type"] == "error" and answer["code"] == code
    assert answer["message"] and token not in json.dumps(answer)
    close = await peer.closed()
    assert close.code == C.TOKEN_EXPIRED and close.at == peer.opened_at + 60


# -- server-side closes ----------------------------------------------------------------------------


async def test_going_away_closes_every_authenticated_socket_1001_at_once(
    autojump_clock: MockClock, env: Env
) -> None:
    a, _ = await env.login(ALICE)
    b, _ = await env.login(BOB)
    await trio.sleep(3)
    env.going_away.set()
    for peer in (a, b):
        close = await peer.closed()
        assert close.code == C.GOING_AWAY and close.at == env.t0 + 3
    assert env.hub.stats.connections == 0


async def test_going_away_also_closes_a_socket_that_has_not_authenticated_yet(
    autojump_clock: MockClock, env: Env
) -> None:
    peer = env.connect()
    await trio.sleep(1)
    env.going_away.set()
    close = await peer.closed()
    assert close.code == C.GOING_AWAY and close.at == peer.opened_at + 1


async def test_a_revoked_session_closes_only_its_sockets_4003(
    autojump_clock: MockClock, env: Env
) -> None:
    a, _ = await env.login(ALICE)
    other_session, _ = await env.login(User(ALICE.sub, "s-alice-2"))
    bob, _ = await env.login(BOB)
    await trio.sleep(2)
    assert env.hub.close_session(ALICE.sid, C.SESSION_REVOKED, "session revoked") == 1
    close = await a.closed()
    assert close.code == C.SESSION_REVOKED and close.at == env.t0 + 2
    await other_session.ping()
    await bob.ping()


async def test_a_slow_consumer_is_closed_4009_and_its_other_tab_gets_every_event(
    autojump_clock: MockClock, make_env: MakeEnv
) -> None:
    env = make_env(send_queue_frames=4)
    slow, _ = await env.login()
    fast, _ = await env.login()
    slow.stall(Stall.FRAMES)
    env.publish(ALICE, 1)
    await trio.sleep(1)  # the slow tab's writer now hangs sending event 1
    for offset in range(2, 7):  # 2..5 fill its queue of 4; 6 overflows it
        env.publish(ALICE, offset)
    close = await slow.closed()
    assert close.code == C.SLOW_CONSUMER and close.at == env.t0 + 1
    assert [(s.frame() or {}).get("type") for s in slow.sent[1:-1]] == ["welcome"]
    assert [(await fast.frame())["offset"] for _ in range(6)] == [1, 2, 3, 4, 5, 6]
    assert env.hub.stats.slow_consumers == 1 and fast.is_open


async def test_a_close_to_a_stalled_peer_is_given_up_after_close_send_s(
    autojump_clock: MockClock, env: Env
) -> None:
    peer, _ = await env.login()
    await trio.sleep(2)
    peer.stall(Stall.EVERYTHING)
    env.hub.close_session(ALICE.sid, C.SESSION_REVOKED, "session revoked")
    try:
        with trio.move_on_after(10 * CLOSE_SEND_S):
            await peer.finished.wait()
        assert peer.finished_at == env.t0 + 2 + CLOSE_SEND_S
        assert peer.crashed is None
        assert env.hub.stats.connections == 0, "the stalled socket still holds its hub slot"
    finally:
        peer.unstall()


async def test_a_resume_replays_the_gap_after_welcome_then_live_events(
    autojump_clock: MockClock, env: Env
) -> None:
    for offset in (10, 11, 12):
        env.publish(ALICE, offset)
    env.publish(BOB, 13)
    peer, welcome = await env.login(since=f"{EPOCH}:10")
    assert welcome["resume"] == {"recovered": True, "replayed": 2}
    assert [(await peer.frame())["offset"] for _ in range(2)] == [11, 12]
    env.publish(ALICE, 14)
    assert (await peer.frame())["offset"] == 14


# -- the close reasons -----------------------------------------------------------------------------


async def _rate_limited(env: Env) -> Peer:
    peer, _ = await env.login()
    for i in range(env.settings.inbound_burst + 1):
        await peer.send_json({"type": "ping", "nonce": str(i)})
    return peer


async def _expired(env: Env) -> Peer:
    peer, _ = await env.login(token=env.keys.token(ttl_s=20))
    return peer


async def _silent(env: Env) -> Peer:
    peer, _ = await env.login()
    return peer


async def _no_auth(env: Env) -> Peer:
    return env.connect()


async def _first_frame_ping(env: Env) -> Peer:
    peer = env.connect()
    await peer.send_json({"type": "ping"})
    return peer


async def _bad_token(env: Env) -> Peer:
    peer = env.connect()
    await peer.auth("not.a.jwt")
    return peer


async def _second_of_one(env: Env) -> Peer:
    await env.login(ALICE)
    peer = env.connect()
    await peer.auth(env.keys.token(ALICE))
    return peer


async def _over_global_cap(env: Env) -> Peer:
    await env.login(ALICE)
    peer = env.connect()
    await peer.auth(env.keys.token(BOB))
    return peer


async def _not_ready(env: Env) -> Peer:
    env.is_ready = False
    peer = env.connect()
    await peer.auth(env.keys.token())
    return peer


async def _going_away(env: Env) -> Peer:
    peer, _ = await env.login()
    env.going_away.set()
    return peer


async def _slow_consumer(env: Env) -> Peer:
    peer, _ = await env.login()
    for offset in (1, 2, 3):  # the waiting writer takes 1, the queue holds 2, 3 overflows
        env.publish(ALICE, offset)
    return peer


async def _binary(env: Env) -> Peer:
    peer, _ = await env.login()
    await peer.send_bytes(b"\x01")
    return peer


@pytest.mark.parametrize(
    ("scenario", "code", "settings"),
    [
        pytest.param(_silent, C.PONG_TIMEOUT, {}, id="4010"),
        pytest.param(_going_away, C.GOING_AWAY, {}, id="1001"),
        pytest.param(_slow_consumer, C.SLOW_CONSUMER, {"send_queue_frames": 1}, id="4009"),
        pytest.param(_binary, C.UNSUPPORTED_DATA, {}, id="1003"),
        pytest.param(_bad_token, C.AUTH_FAILED, {}, id="4001-bad-token"),
        pytest.param(
            _over_global_cap, C.TRY_AGAIN_LATER, {"max_connections": 1}, id="1013-global-cap"
        ),
        pytest.param(
            _rate_limited,
            C.RATE_LIMITED,
            {},
            id="4029",
        ),
        pytest.param(
            _expired,
            C.TOKEN_EXPIRED,
            {},
            id="4002",
        ),
        pytest.param(
            _no_auth,
            C.AUTH_FAILED,
            {},
            id="4001-deadline",
        ),
        pytest.param(
            _first_frame_ping,
            C.AUTH_FAILED,
            {},
            id="4001-first-frame",
        ),
        pytest.param(
            _second_of_one,
            C.TOO_MANY_CONNECTIONS,
            {"max_connections_per_user": 1},
            id="4008",
        ),
        pytest.param(
            _not_ready,
            C.TRY_AGAIN_LATER,
            {},
            id="1013-catching-up",
        ),
    ],
)
async def test_the_close_reason_is_the_documented_text(
    autojump_clock: MockClock,
    make_env: MakeEnv,
    scenario: Callable[[Env], Awaitable[Peer]],
    code: WsCloseCode,
    settings: dict[str, Any],
) -> None:
    peer = await scenario(make_env(**settings))
    close = await peer.closed()
    assert close.code == code
    assert close.reason == protocol.close_reason(code)
