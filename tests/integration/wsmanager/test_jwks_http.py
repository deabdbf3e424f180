"""JwksCache against a real gateway over TLS: the default httpx fetcher verifies the gateway's
dev CA, a token from a real login verifies, and a key added to the gateway's key folder (picked
up by the gateway restarted on the same address) becomes known through ``on_unknown_kid``."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import httpx
import pytest
import trio

from common.errors import UnavailableError
from common.tokens import TokenVerifier, UnknownKeyError, VerifierPolicy
from gateway.keys import generate_key
from tests.integration.gateway.conftest import (  # noqa: F401  (fixtures used by name)
    TEACHER,
    Gateway,
    GatewayFactory,
    identity_port,
    start_gateway,
)
from wsmanager.jwks import FetchedJwks, HttpJwksFetcher, JwksCache

pytestmark = pytest.mark.slow

JWKS_PATH = "/.well-known/jwks.json"


def _kid(token: str) -> str:
    header = token.split(".")[0]
    kid: str = json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))["kid"]
    return kid


def _verifier(gateway: Gateway, cache: JwksCache) -> TokenVerifier:
    policy = VerifierPolicy(issuer=gateway.settings.issuer, audience=gateway.settings.audience)
    return TokenVerifier(policy, cache.keys)


async def _login(gateway: Gateway) -> str:
    async with gateway.client() as client:
        body: dict[str, Any] = await gateway.login(client, TEACHER)
    token: str = body["access_token"]
    return token


async def test_default_fetcher_reads_the_gateway_jwks_over_verified_tls(
    start_gateway: GatewayFactory,  # noqa: F811
) -> None:
    gateway: Gateway = await start_gateway()
    assert gateway.addresses.ca_file is not None
    fetched = await HttpJwksFetcher(gateway.url + JWKS_PATH, ca_file=gateway.addresses.ca_file)()
    assert isinstance(fetched, FetchedJwks)
    assert fetched.max_age_s == 300.0, "the gateway's Cache-Control: max-age is read"
    keys = fetched.document["keys"]
    assert [k["kty"] for k in keys] == ["OKP"] and keys[0]["crv"] == "Ed25519"


async def test_gateway_not_trusted_without_its_ca_fails_start_naming_the_url(
    start_gateway: GatewayFactory,  # noqa: F811
) -> None:
    gateway: Gateway = await start_gateway()
    url = gateway.url + JWKS_PATH
    cache = JwksCache.over_https(url, start_attempts=2)  # system CA store only
    with pytest.raises(UnavailableError) as caught:
        await cache.run()
    assert url in caught.value.message and "ConnectError" in caught.value.message
    assert cache.keys.kids() == [] and cache.statistics().fetches_failed == 2


async def test_login_token_verifies_and_a_rotated_key_is_picked_up_on_unknown_kid(
    nursery: trio.Nursery,
    start_gateway: GatewayFactory,  # noqa: F811
) -> None:
    first: Gateway = await start_gateway()
    url = first.url + JWKS_PATH
    cache = JwksCache.over_https(url, ca_file=first.addresses.ca_file)
    await nursery.start(cache.run)
    verifier = _verifier(first, cache)

    old_token = await _login(first)
    old_kid = _kid(old_token)
    assert cache.keys.kids() == [old_kid]
    claims = verifier.verify(old_token, now=time.time())
    assert claims.sub == TEACHER.user_id and claims.org == TEACHER.org_id

    # Rotate: a new key file in the gateway's folder; the gateway restarted on the same
    # address loads it, signs with it and publishes both keys.
    new_kid = generate_key(first.settings.under_state(first.settings.keys_dir)).stem
    await first.stop()
    second: Gateway = await start_gateway(port=httpx.URL(first.url).port)
    assert second.url == first.url
    new_token = await _login(second)
    assert _kid(new_token) == new_kid != old_kid

    with pytest.raises(UnknownKeyError):
        verifier.verify(new_token, now=time.time())
    assert await cache.on_unknown_kid(new_kid) is True
    assert sorted(cache.keys.kids()) == sorted([old_kid, new_kid])
    assert verifier.verify(new_token, now=time.time()).sub == TEACHER.user_id
    assert verifier.verify(old_token, now=time.time()).sub == TEACHER.user_id, (
        "tokens of the previous key keep verifying"
    )

    # A bogus kid right after that refresh costs the gateway nothing.
    assert await cache.on_unknown_kid("k-does-not-exist") is False
    stats = cache.statistics()
    assert (stats.fetches_ok, stats.fetches_failed) == (2, 0)
    assert (stats.unknown_kid_refreshes, stats.unknown_kid_refused) == (1, 1)
    assert stats.key_count == 2
