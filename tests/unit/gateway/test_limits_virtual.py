"""Rate limits at the gateway on Trio's virtual clock: exact refusal times and header values."""

from __future__ import annotations

from typing import Any

import trio

from deploy.sandbox.identity import DEMO_USERS
from gateway.settings import LimitSettings
from tests.unit.gateway.asgi import Reply, call

USER, OTHER = DEMO_USERS[0], DEMO_USERS[1]


def login_body(email: str, password: str) -> bytes:
    return f'{{"email":"{email}","password":"{password}"}}'.encode()


async def login(app: Any, email: str, password: str, address: str = "203.0.113.7") -> Reply:
    return await call(
        app,
        "POST",
        "/v1/auth/login",
        headers=[("content-type", "application/json")],
        body=login_body(email, password),
        client=(address, 40000),
    )


async def test_login_per_address_exact_retry_after_and_headers(
    make_gateway: Any, autojump_clock: Any
) -> None:
    gw = await make_gateway(limit_login_address=LimitSettings(limit=10, period_s=60, burst=5))
    app = gw.http.app
    start = trio.current_time()
    for i in range(5):  # distinct accounts: only the address budget is spent
        reply = await login(app, f"user{i}@x.test", "wrong")
        assert reply.status == 401
    assert reply.headers["ratelimit-policy"] == '"login-address";q=10;w=60'
    assert reply.headers["ratelimit"] == '"login-address";r=0;t=30'
    refused = await login(app, "user5@x.test", "wrong")
    assert refused.status == 429
    assert refused.headers["retry-after"] == "6"  # one emission interval (60 s / 10)
    assert refused.headers["ratelimit"] == '"login-address";r=0;t=30'
    assert refused.headers["ratelimit-limit"] == "10"
    assert refused.headers["ratelimit-remaining"] == "0"
    assert refused.headers["ratelimit-reset"] == "30"
    assert refused.json()["code"] == "rate_limited" and refused.json()["retry_after"] == 6
    await trio.sleep_until(start + 5.999)
    assert (await login(app, "user6@x.test", "wrong")).status == 429
    await trio.sleep_until(start + 6.0)
    assert (await login(app, "user7@x.test", "wrong")).status == 401
    # Another address is not affected.
    assert (await login(app, "user8@x.test", "wrong", address="198.51.100.1")).status == 401


async def test_login_per_account_spans_addresses_and_ignores_case(
    make_gateway: Any, autojump_clock: Any
) -> None:
    gw = await make_gateway()  # default: 5 per 300 s per account, burst 5
    app = gw.http.app
    start = trio.current_time()
    for i in range(5):
        email = OTHER.email.upper() if i % 2 else OTHER.email
        reply = await login(app, email, "wrong", address=f"198.51.100.{i}")
        assert reply.status == 401
    refused = await login(app, f"  {OTHER.email}  ", OTHER.password, address="192.0.2.1")
    assert refused.status == 429  # even the right password: the account is being attacked
    assert refused.headers["ratelimit-policy"] == '"login-account";q=5;w=300'
    assert refused.headers["retry-after"] == "60"
    await trio.sleep_until(start + 60)
    ok = await login(app, OTHER.email, OTHER.password, address="192.0.2.1")
    assert ok.status == 200


async def test_successful_logins_do_not_use_up_the_account_budget(
    make_gateway: Any, autojump_clock: Any
) -> None:
    gw = await make_gateway()  # 5 per 300 s per account, burst 5
    app = gw.http.app
    for i in range(12):  # a teacher opening tab after tab: never locked out
        reply = await login(app, OTHER.email, OTHER.password, address=f"198.51.100.{i}")
        assert reply.status == 200, (i, reply.status)
    for i in range(5):  # failures still count, whatever the address
        reply = await login(app, OTHER.email, "wrong", address=f"203.0.113.{i}")
        assert reply.status == 401
    refused = await login(app, OTHER.email, OTHER.password, address="192.0.2.7")
    assert refused.status == 429


async def test_per_user_limit_keys_by_subject_not_address(
    make_gateway: Any, autojump_clock: Any
) -> None:
    gw = await make_gateway(limit_user=LimitSettings(limit=2, period_s=1, burst=2))
    app = gw.http.app
    tokens = {}
    for user in (USER, OTHER):
        reply = await login(app, user.email, user.password)
        tokens[user.email] = reply.json()["access_token"]

    async def me(email: str, address: str) -> Reply:
        return await call(
            app,
            "GET",
            "/v1/auth/me",
            headers=[("authorization", f"Bearer {tokens[email]}")],
            client=(address, 1),
        )

    start = trio.current_time()
    assert (await me(USER.email, "10.0.0.1")).status == 200
    second = await me(USER.email, "10.0.0.2")  # another address, same user: same budget
    assert second.status == 200 and second.headers["ratelimit"] == '"user";r=0;t=1'
    third = await me(USER.email, "10.0.0.3")
    assert third.status == 429 and third.headers["retry-after"] == "1"
    assert third.headers["ratelimit-policy"] == '"user";q=2;w=1'
    assert (await me(OTHER.email, "10.0.0.1")).status == 200  # another user: own budget
    await trio.sleep_until(start + 0.499)
    assert (await me(USER.email, "10.0.0.1")).status == 429
    await trio.sleep_until(start + 0.5)
    assert (await me(USER.email, "10.0.0.1")).status == 200


async def test_bad_tokens_spend_the_address_budget(make_gateway: Any, autojump_clock: Any) -> None:
    gw = await make_gateway(limit_address=LimitSettings(limit=3, period_s=60, burst=3))
    app = gw.http.app
    statuses = []
    for _ in range(5):
        reply = await call(app, "GET", "/v1/auth/me", headers=[("authorization", "Bearer a.b.c")])
        statuses.append(reply.status)
    assert statuses == [401, 401, 401, 429, 429]
    assert reply.headers["retry-after"] == "20"


async def test_refresh_is_limited_per_address(make_gateway: Any, autojump_clock: Any) -> None:
    gw = await make_gateway(limit_refresh=LimitSettings(limit=2, period_s=10, burst=2))
    app = gw.http.app
    statuses = []
    for _ in range(3):
        reply = await call(
            app,
            "POST",
            "/v1/auth/refresh",
            headers=[("content-type", "application/json")],
            body=b'{"refresh_token":"' + b"A" * 43 + b'"}',
        )
        statuses.append(reply.status)
    assert statuses == [401, 401, 429]
    assert reply.headers["retry-after"] == "5"
    assert reply.headers["ratelimit-policy"] == '"refresh";q=2;w=10'


async def test_access_tokens_expire_on_the_virtual_clock(
    make_gateway: Any, autojump_clock: Any
) -> None:
    gw = await make_gateway(access_ttl_s=60, token_leeway_s=5)
    app = gw.http.app
    token = (await login(app, USER.email, USER.password)).json()["access_token"]
    start = trio.current_time()

    async def me() -> int:
        reply = await call(
            app, "GET", "/v1/auth/me", headers=[("authorization", f"Bearer {token}")]
        )
        return reply.status

    assert await me() == 200
    await trio.sleep_until(start + 64.0)
    assert await me() == 200  # inside the leeway
    await trio.sleep_until(start + 66.0)
    assert await me() == 401
