"""Tokens, refresh tokens and passwords never reach the logs, whatever happens."""

from __future__ import annotations

import io
from typing import Any

from common.logs import configure_logging
from deploy.sandbox.identity import DEMO_USERS
from tests.unit.gateway.asgi import call

USER = DEMO_USERS[0]


async def test_a_whole_session_logs_no_secret(make_gateway: Any) -> None:
    out = io.StringIO()
    configure_logging(service="gateway-test", level="debug", json=True, stream=out)
    try:
        gw = await make_gateway()
        app = gw.http.app
        json_h = [("content-type", "application/json")]
        login = await call(
            app,
            "POST",
            "/v1/auth/login",
            headers=json_h,
            body=f'{{"email":"{USER.email}","password":"{USER.password}"}}'.encode(),
        )
        tokens = login.json()
        wrong = await call(
            app,
            "POST",
            "/v1/auth/login",
            headers=json_h,
            body=f'{{"email":"{USER.email}","password":"{USER.password}x"}}'.encode(),
        )
        refreshed = await call(
            app,
            "POST",
            "/v1/auth/refresh",
            headers=json_h,
            body=f'{{"refresh_token":"{tokens["refresh_token"]}"}}'.encode(),
        )
        replay = await call(
            app,
            "POST",
            "/v1/auth/refresh",
            headers=json_h,
            body=f'{{"refresh_token":"{tokens["refresh_token"]}"}}'.encode(),
        )
        tampered = tokens["access_token"][:-4] + "AAAA"
        bad = await call(
            app, "GET", "/v1/auth/me", headers=[("authorization", f"Bearer {tampered}")]
        )
    finally:
        configure_logging(service="tests", level="warning", json=False)
    assert (login.status, wrong.status, refreshed.status, replay.status, bad.status) == (
        200,
        401,
        200,
        401,
        401,
    )
    text = out.getvalue()
    assert "refresh token reuse" in text and "authentication failed" in text  # it did log
    secrets = [
        USER.password,
        tokens["access_token"],
        tokens["refresh_token"],
        refreshed.json()["access_token"],
        refreshed.json()["refresh_token"],
        tampered,
    ]
    for secret in secrets:
        assert secret not in text
        assert secret[:24] not in text  # not even a prefix
