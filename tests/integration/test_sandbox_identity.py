"""The sandbox IdentityService over real gRPC (127.0.0.1, port 0): logins, the alike failures
of unknown emails and wrong passwords, disabled users, input limits naming the field, GetUser,
and what the servicer keeps of a password (a salted scrypt hash, never the plaintext)."""

from __future__ import annotations

import dataclasses
import hashlib
import uuid
from collections.abc import AsyncIterator
from functools import partial

import pytest
import trio
import trio.testing

import deploy.sandbox
from common.contracts.huleedu.identity import v1 as identity_v1
from common.errors import (
    AuthenticationError,
    ConfigurationError,
    NotFoundError,
    ValidationError,
)
from common.rpc import RpcChannel, open_channel, open_rpc_loop, serve_grpc
from deploy.sandbox import (
    DEMO_USERS,
    MAX_EMAIL_CHARS,
    MAX_PASSWORD_CHARS,
    DemoUser,
    SandboxIdentity,
    ScryptParams,
    serve_sandbox_identity,
)

pytestmark = pytest.mark.slow

# About 2 ms a hash instead of 40: the behaviour under test does not depend on the cost.
CHEAP = ScryptParams(n=2**10)


def _demo(email: str) -> DemoUser:
    return next(u for u in DEMO_USERS if u.email == email)


TEACHER = _demo("teacher@huleedu.test")
DISABLED = next(u for u in DEMO_USERS if u.disabled)


@pytest.fixture
async def served() -> AsyncIterator[tuple[SandboxIdentity, RpcChannel]]:
    servicer = SandboxIdentity(scrypt=CHEAP)
    async with open_rpc_loop(), trio.open_nursery() as nursery:
        port = await nursery.start(partial(serve_grpc, [servicer]))
        async with open_channel(f"127.0.0.1:{port}", service="identity") as channel:
            yield servicer, channel
        nursery.cancel_scope.cancel()


async def _login(channel: RpcChannel, email: str, password: str) -> identity_v1.User:
    stub = channel.stub(identity_v1.IdentityServiceStub)
    with trio.fail_after(5):
        reply = await channel.call(
            stub.authenticate, identity_v1.AuthenticateRequest(email=email, password=password)
        )
    assert reply.user is not None, "Authenticate answered without a user"
    return reply.user


async def _get_user(channel: RpcChannel, user_id: str) -> identity_v1.User:
    stub = channel.stub(identity_v1.IdentityServiceStub)
    with trio.fail_after(5):
        reply = await channel.call(
            stub.get_user, identity_v1.GetUserRequest(user_id=user_id), idempotent=True
        )
    assert reply.user is not None, "GetUser answered without a user"
    return reply.user


def _as_tuple(user: identity_v1.User) -> tuple[object, ...]:
    return (
        user.user_id,
        user.org_id,
        tuple(user.roles),
        user.display_name,
        user.email,
        user.disabled,
    )


def _expected(demo: DemoUser) -> tuple[object, ...]:
    return (
        demo.user_id,
        demo.org_id,
        demo.roles,
        demo.display_name,
        demo.email,
        demo.disabled,
    )


def test_demo_users_cover_the_cases_the_gateway_needs() -> None:
    by_org = [u for u in DEMO_USERS if u.org_id == "org-demo" and u.roles == ("teacher",)]
    enabled_demo_teachers = [u for u in by_org if not u.disabled]
    assert len(enabled_demo_teachers) >= 2, "two teachers of one org (ownership checks)"
    assert any(u.roles == ("teacher", "admin") and not u.disabled for u in DEMO_USERS)
    assert any(u.org_id == "org-other" and not u.disabled for u in DEMO_USERS)
    assert sum(u.disabled for u in DEMO_USERS) == 1
    assert all(len(u.password) >= 12 for u in DEMO_USERS), "demo passwords are >= 12 chars"
    ids = [u.user_id for u in DEMO_USERS]
    assert len(set(ids)) == len(ids)
    assert all(str(uuid.UUID(i)) == i for i in ids), "user ids are canonical UUID strings"
    emails = [u.email.casefold() for u in DEMO_USERS]
    assert len(set(emails)) == len(emails)
    assert "password" not in repr(TEACHER) and TEACHER.password not in repr(TEACHER)


def test_package_exports() -> None:
    assert set(deploy.sandbox.__all__) == {
        "DEFAULT_SCRYPT",
        "DEMO_USERS",
        "MAX_CONCURRENT_HASHES",
        "MAX_EMAIL_CHARS",
        "MAX_PASSWORD_CHARS",
        "DemoUser",
        "IdentityStatistics",
        "SandboxBackends",
        "SandboxIdentity",
        "SandboxSettings",
        "ScryptParams",
        "serve_sandbox_backends",
        "serve_sandbox_identity",
    }
    assert all(hasattr(deploy.sandbox, name) for name in deploy.sandbox.__all__)


@pytest.mark.parametrize("demo", [u for u in DEMO_USERS if not u.disabled], ids=lambda u: u.email)
async def test_correct_password_returns_the_user_with_org_and_roles(
    served: tuple[SandboxIdentity, RpcChannel], demo: DemoUser
) -> None:
    _, channel = served
    user = await _login(channel, demo.email, demo.password)
    assert _as_tuple(user) == _expected(demo)


async def test_email_is_matched_case_insensitively_and_without_surrounding_spaces(
    served: tuple[SandboxIdentity, RpcChannel],
) -> None:
    _, channel = served
    user = await _login(channel, "  TEACHER@HuleEdu.Test\t", TEACHER.password)
    assert user.user_id == TEACHER.user_id
    assert user.email == TEACHER.email


async def test_unknown_email_and_wrong_password_fail_alike(
    served: tuple[SandboxIdentity, RpcChannel],
) -> None:
    servicer, channel = served
    failures: dict[str, AuthenticationError] = {}
    runs: dict[str, int] = {}
    attempts = {
        "unknown email": ("nobody@huleedu.test", TEACHER.password),
        "wrong password": (TEACHER.email, "not the right password"),
        # Passwords are exact: only the email is case-folded.
        "password in other case": (TEACHER.email, TEACHER.password.upper()),
    }
    for what, (email, password) in attempts.items():
        before = servicer.statistics().kdf_runs
        with pytest.raises(AuthenticationError) as info:
            await _login(channel, email, password)
        failures[what] = info.value
        runs[what] = servicer.statistics().kdf_runs - before
    seen = {(type(e), e.code, e.detail, e.message, e.field) for e in failures.values()}
    assert len(seen) == 1, f"failures are told apart: {seen}"
    # Same work too: an unknown email still costs one scrypt derivation.
    assert runs == dict.fromkeys(attempts, 1), runs


async def test_disabled_user_is_returned_disabled_only_with_the_right_password(
    served: tuple[SandboxIdentity, RpcChannel],
) -> None:
    _, channel = served
    user = await _login(channel, DISABLED.email, DISABLED.password)
    assert user.disabled is True
    assert user.user_id == DISABLED.user_id
    with pytest.raises(AuthenticationError):
        await _login(channel, DISABLED.email, DISABLED.password + "x")


_LONGEST_EMAIL = "a" * (MAX_EMAIL_CHARS - len("@huleedu.test")) + "@huleedu.test"


@pytest.mark.parametrize(
    ("email", "password", "field"),
    [
        ("", TEACHER.password, "email"),
        ("   ", TEACHER.password, "email"),
        (TEACHER.email, "", "password"),
        ("", "", "email"),
        ("a" + _LONGEST_EMAIL, TEACHER.password, "email"),
        (TEACHER.email, "x" * (MAX_PASSWORD_CHARS + 1), "password"),
    ],
    ids=["empty email", "blank email", "empty password", "both empty", "long email", "long pw"],
)
async def test_invalid_input_is_refused_naming_the_field_before_any_hashing(
    served: tuple[SandboxIdentity, RpcChannel], email: str, password: str, field: str
) -> None:
    servicer, channel = served
    with pytest.raises(ValidationError) as info:
        await _login(channel, email, password)
    assert info.value.field == field
    assert field in info.value.detail
    assert servicer.statistics().kdf_runs == 0, "refused input must not cost a hash"


async def test_inputs_at_the_limits_are_checked_not_refused(
    served: tuple[SandboxIdentity, RpcChannel],
) -> None:
    _, channel = served
    assert len(_LONGEST_EMAIL) == MAX_EMAIL_CHARS
    with pytest.raises(AuthenticationError):
        await _login(channel, _LONGEST_EMAIL, TEACHER.password)
    with pytest.raises(AuthenticationError):
        await _login(channel, TEACHER.email, "x" * MAX_PASSWORD_CHARS)


async def test_get_user_returns_the_user_or_not_found(
    served: tuple[SandboxIdentity, RpcChannel],
) -> None:
    _, channel = served
    for demo in DEMO_USERS:
        assert _as_tuple(await _get_user(channel, demo.user_id)) == _expected(demo)
    with pytest.raises(NotFoundError) as missing:
        await _get_user(channel, str(uuid.UUID(int=0)))
    assert missing.value.field == "user_id"
    with pytest.raises(ValidationError) as empty:
        await _get_user(channel, "")
    assert empty.value.field == "user_id"


def _reachable(root: object) -> list[object]:
    """Every object reachable from ``root`` through attributes, slots and containers."""
    seen: set[int] = set()
    found: list[object] = []
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        found.append(obj)
        if isinstance(obj, str | bytes | int | float | bool | None):
            continue
        if isinstance(obj, dict):
            stack += [*obj.keys(), *obj.values()]
        elif isinstance(obj, list | tuple | set | frozenset):
            stack += list(obj)
        elif dataclasses.is_dataclass(obj):
            stack += [getattr(obj, f.name) for f in dataclasses.fields(obj)]
        elif hasattr(obj, "__dict__"):
            stack += list(vars(obj).values())
    return found


def test_the_servicer_keeps_no_plaintext_password() -> None:
    servicer = SandboxIdentity(scrypt=CHEAP)
    values = _reachable(servicer)
    texts = [v for v in values if isinstance(v, str)]
    blobs = [v for v in values if isinstance(v, bytes)]
    # The walk reaches the accounts (else this test could not fail).
    assert {u.email for u in DEMO_USERS} <= set(texts)
    assert not [v for v in values if isinstance(v, DemoUser)], "DemoUser objects are kept"
    for demo in DEMO_USERS:
        assert not [t for t in texts if demo.password in t], f"{demo.email}'s password is kept"
        encoded = demo.password.encode()
        assert not [b for b in blobs if encoded in b], f"{demo.email}'s password bytes kept"


def test_each_user_gets_its_own_salt_and_a_real_scrypt_hash() -> None:
    same = "one shared password"
    users = [
        DemoUser(f"u{i}", "org-demo", f"u{i}@huleedu.test", f"U {i}", ("teacher",), same)
        for i in range(3)
    ]
    servicer = SandboxIdentity(users, scrypt=CHEAP)
    accounts = list(servicer._by_id.values())
    assert len({a.salt for a in accounts}) == len(users), "salts are reused"
    assert all(len(a.salt) == 16 for a in accounts)
    assert len({a.hashed for a in accounts}) == len(users), "one password, one hash"
    for account in accounts:
        expected = hashlib.scrypt(same.encode(), salt=account.salt, n=2**10, r=8, p=1, dklen=32)
        assert account.hashed == expected
    rebuilt = SandboxIdentity(users, scrypt=CHEAP)
    assert rebuilt._by_id["u0"].salt != servicer._by_id["u0"].salt, "salts are not random"


def test_duplicate_users_and_bad_scrypt_parameters_are_refused() -> None:
    twin = dataclasses.replace(TEACHER, user_id="another-id", email="Teacher@HuleEdu.test ")
    with pytest.raises(ConfigurationError) as dup:
        SandboxIdentity([TEACHER, twin], scrypt=CHEAP)
    assert dup.value.field == "users"
    for bad, field in [({"n": 1000}, "scrypt.n"), ({"r": 0}, "scrypt.r"), ({"p": 0}, "scrypt.p")]:
        with pytest.raises(ConfigurationError) as info:
            ScryptParams(**bad)
        assert info.value.field == field


async def test_hashing_runs_in_threads_bounded_by_the_limiter() -> None:
    # Default cost (~40 ms a hash) so the derivations are surely still running when we look.
    servicer = SandboxIdentity([TEACHER], max_concurrent_hashes=4)
    request = identity_v1.AuthenticateRequest(email=TEACHER.email, password=TEACHER.password)
    replies: list[identity_v1.AuthenticateResponse] = []

    async def login() -> None:
        replies.append(await servicer.authenticate(request))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for _ in range(6):
                nursery.start_soon(login)
            # Every login task is parked: four on their threads, two on the limiter. Had a
            # hash run on the event loop, we could not be here while it was in progress.
            await trio.testing.wait_all_tasks_blocked()
            during = servicer.statistics()
    assert (during.hashing, during.waiting) == (4, 2), during
    after = servicer.statistics()
    assert (after.hashing, after.waiting, after.kdf_runs) == (0, 0, 6), after
    assert [r.user.user_id if r.user else None for r in replies] == [TEACHER.user_id] * 6


async def test_serve_sandbox_identity_with_default_parameters_serves_and_stops() -> None:
    stop = trio.Event()
    with trio.fail_after(10):
        async with open_rpc_loop(), trio.open_nursery() as nursery:
            port = await nursery.start(partial(serve_sandbox_identity, shutdown_trigger=stop.wait))
            async with open_channel(f"127.0.0.1:{port}", service="identity") as channel:
                user = await _login(channel, TEACHER.email, TEACHER.password)
                with pytest.raises(AuthenticationError):
                    await _login(channel, "nobody@huleedu.test", TEACHER.password)
            stop.set()  # the nursery then exits only if the server really stops
    assert _as_tuple(user) == _expected(TEACHER)
