"""Contract tests: schemathesis fuzzes every operation of the committed OpenAPI document
against the real gateway (TLS on 127.0.0.1), backed by the sandbox backends and the real
aggregator. Every response must be documented and conform to the document (status, content
type, headers, body schema), and no request may ever get a 5xx.

``logout`` is fuzzed with its own session (a success would end the session the other
operations use).
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings

from deploy.openapi import SPEC_PATH
from deploy.sandbox.identity import DEMO_USERS
from gateway.settings import LimitSettings
from tests.integration.gateway._thread_stack import ThreadStack, thread_stack

pytestmark = pytest.mark.slow

TEACHER = DEMO_USERS[0]
#: Examples per operation: enough to reach every documented status in CI time.
EXAMPLES = 100
ROOMY = LimitSettings(limit=1_000_000, period_s=60, burst=1_000_000)


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadStack]:
    with thread_stack(
        Path(tmp_path_factory.mktemp("contract")),
        limit_user=ROOMY,
        limit_address=ROOMY,
        limit_login_address=ROOMY,
        limit_login_account=ROOMY,
        limit_refresh=ROOMY,
    ) as stack:
        yield stack


def login(stack: ThreadStack) -> str:
    reply = httpx.post(
        f"{stack.url}/v1/auth/login",
        json={"email": TEACHER.email, "password": TEACHER.password},
        verify=ssl.create_default_context(cafile=stack.ca_file),
    )
    assert reply.status_code == 200, reply.text
    token: str = reply.json()["access_token"]
    return token


@pytest.fixture(scope="module")
def session(running: ThreadStack) -> Iterator[requests.Session]:
    with requests.Session() as http:
        http.verify = running.ca_file
        yield http


#: The committed document (a test elsewhere keeps it equal to what the app generates).
schema = schemathesis.openapi.from_dict(json.loads(SPEC_PATH.read_text()))


@schema.exclude(operation_id="logout").parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_every_response_conforms_and_nothing_is_a_5xx(
    case: Any, running: ThreadStack, session: requests.Session, token: str
) -> None:
    response = case.call_and_validate(
        base_url=running.url,
        session=session,
        headers=_auth(case, token),
        verify=running.ca_file,
    )
    assert response.status_code < 500, response.text


@schema.include(operation_id="logout").parametrize()
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_logout_conforms(case: Any, running: ThreadStack, session: requests.Session) -> None:
    response = case.call_and_validate(
        base_url=running.url,
        session=session,
        headers=_auth(case, login(running)),
        verify=running.ca_file,
    )
    assert response.status_code < 500, response.text


@pytest.fixture(scope="module")
def token(running: ThreadStack) -> str:
    return login(running)


def _auth(case: Any, token: str) -> dict[str, str]:
    # Operations with a security requirement get a valid token unless schemathesis is
    # deliberately testing the missing one (it sets its own header then).
    if case.headers and any(k.lower() == "authorization" for k in case.headers):
        return {}
    return {"Authorization": f"Bearer {token}"}
