"""S3: refresh rotation against a model, on hypothesis-drawn programs of login, refresh (of the
current or of any earlier token: replays), logout, access-token use and clock jumps.

The real :class:`~gateway.auth.AuthService` on a real SQLite session store and the sandbox
IdentityService servicer; time is a wall clock the program moves. Invariants after every step:
at most one live refresh token per family; a replay revokes the family (and is announced);
logout revokes; nothing outlives the absolute session lifetime; access tokens of a revoked
session are refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.contracts.huleedu.identity import v1 as identity_v1
from common.errors import AuthenticationError
from common.revocations import Revocations
from common.tokens import KeySet, TokenSigner, TokenVerifier, VerifierPolicy
from deploy.sandbox.identity import DEMO_USERS, SandboxIdentity, ScryptParams
from gateway.auth import AuthService
from gateway.sessions import SqliteSessionStore, open_sqlite_session_store

ACCESS_TTL = 900
IDLE = 3600
LIFETIME = 4 * 3600
LEEWAY = 30
T0 = 1_800_000_000.0
USER = DEMO_USERS[0]
IDENTITY = SandboxIdentity(DEMO_USERS, scrypt=ScryptParams(n=2**4, r=1))
KEY = Ed25519PrivateKey.generate()


@dataclass
class Family:
    sid: str
    created: float
    tokens: list[str]
    live: str | None
    live_expires: float
    access: list[tuple[str, float]] = field(default_factory=list)
    revoked: bool = False


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


async def _authenticate(email: str, password: str) -> identity_v1.User:
    reply = await IDENTITY.authenticate(
        identity_v1.AuthenticateRequest(email=email, password=password)
    )
    assert reply.user is not None
    return reply.user


def _service(store: SqliteSessionStore, clock: Clock, announced: list[str]) -> AuthService:
    policy = VerifierPolicy(issuer="iss", audience="aud", leeway_s=LEEWAY)
    revocations = Revocations(clock)
    verifier = TokenVerifier(
        policy, KeySet({"k": KEY.public_key()}), is_revoked=revocations.__contains__
    )

    async def publish(topic: str, key: bytes, value: bytes, headers: object) -> None:
        announced.append(key.decode())

    return AuthService(
        signer=TokenSigner(KEY, "k", issuer="iss", audience="aud", ttl_s=ACCESS_TTL),
        ticket_signer=TokenSigner(KEY, "k", issuer="iss", audience="aud", ttl_s=30),
        verifier=verifier,
        store=store,
        authenticate=_authenticate,
        publish=publish,  # records what goes to the bus; fan-out is tested on Kafka (S4)
        revocations=revocations,
        wall=clock,
        access_ttl_s=ACCESS_TTL,
        refresh_idle_s=IDLE,
        session_lifetime_s=LIFETIME,
        ticket_ttl_s=30,
    )


STEP = st.one_of(
    st.tuples(st.just("login")),
    st.tuples(st.just("refresh"), st.integers(0, 7), st.integers(0, 20)),
    st.tuples(st.just("logout"), st.integers(0, 7)),
    st.tuples(st.just("use"), st.integers(0, 7), st.integers(0, 20)),
    st.tuples(st.just("wait"), st.sampled_from([1, 59, 600, 950, 3000, 3700, 9000])),
)


async def _live_tokens(store: SqliteSessionStore, sid: str) -> int:
    conn = store._conn  # the invariant is about what is stored, so read the table itself
    row = conn.execute(
        "SELECT count(*) FROM refresh_tokens WHERE sid = ? AND spent_at IS NULL", (sid,)
    ).fetchone()
    return int(row[0])


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(program=st.lists(STEP, min_size=1, max_size=30))
async def test_s3_rotation_matches_the_model(program: list[tuple[object, ...]]) -> None:
    store = await open_sqlite_session_store(":memory:")
    clock = Clock()
    announced: list[str] = []
    auth = _service(store, clock, announced)
    families: list[Family] = []
    try:
        for step in program:
            kind = step[0]
            if kind == "login":
                pair, _ = await auth.login(USER.email, USER.password)
                families.append(
                    Family(
                        sid=pair.session_id,
                        created=clock.now,
                        tokens=[pair.refresh_token],
                        live=pair.refresh_token,
                        live_expires=clock.now + IDLE,
                        access=[(pair.access_token, clock.now)],
                    )
                )
            elif kind == "wait":
                clock.now += float(step[1])  # type: ignore[arg-type]
            elif not families:
                continue
            elif kind == "refresh":
                fam = families[int(step[1]) % len(families)]  # type: ignore[call-overload]
                token = fam.tokens[int(step[2]) % len(fam.tokens)]  # type: ignore[call-overload]
                is_replay = token != fam.live and not fam.revoked
                expired = clock.now >= fam.created + LIFETIME or clock.now >= fam.live_expires
                should_work = not fam.revoked and token == fam.live and not expired
                try:
                    pair = await auth.refresh(token)
                except AuthenticationError:
                    assert not should_work, "a valid refresh was refused"
                    if is_replay:
                        fam.revoked = True
                        fam.live = None
                        assert announced[-1] == fam.sid, "reuse not announced"
                else:
                    assert should_work, f"refresh accepted: replay={is_replay} expired={expired}"
                    fam.tokens.append(pair.refresh_token)
                    fam.live = pair.refresh_token
                    fam.live_expires = min(clock.now + IDLE, fam.created + LIFETIME)
                    fam.access.append((pair.access_token, clock.now))
            elif kind == "logout":
                fam = families[int(step[1]) % len(families)]  # type: ignore[call-overload]
                token, issued = fam.access[-1]
                usable = not fam.revoked and clock.now < issued + ACCESS_TTL + LEEWAY
                try:
                    claims = auth.verify(token)
                except AuthenticationError:
                    assert not usable
                else:
                    assert usable
                    await auth.logout(claims)
                    fam.revoked = True
                    fam.live = None
                    assert announced[-1] == fam.sid
            elif kind == "use":
                fam = families[int(step[1]) % len(families)]  # type: ignore[call-overload]
                token, issued = fam.access[int(step[2]) % len(fam.access)]  # type: ignore[call-overload]
                usable = not fam.revoked and clock.now < issued + ACCESS_TTL + LEEWAY
                try:
                    auth.verify(token)
                except AuthenticationError:
                    assert not usable, "a valid access token was refused"
                else:
                    assert usable, "an access token of a revoked or expired session worked"
            for fam in families:
                assert await _live_tokens(store, fam.sid) <= 1
                if fam.revoked:
                    with pytest.raises(AuthenticationError):
                        await auth.refresh(fam.tokens[-1])
    finally:
        await store.close()
