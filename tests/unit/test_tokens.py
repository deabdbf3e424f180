"""Access-token verification: valid tokens, the S1 malformed-token corpus (14 classes x >= 10
variants, all refused with the identical 401 body, no outbound fetch), S2 mutations, the cache,
revocation and key rotation."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
from collections.abc import Callable, Iterator

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.errors import AuthenticationError, SessionRevokedError, TokenExpiredError, to_problem
from common.tokens import KeySet, TokenSigner, TokenVerifier, UnknownKeyError, VerifierPolicy

NOW = 1_800_000_000.0
POLICY = VerifierPolicy(issuer="https://gateway.huleedu.test", audience="huleedu")
KEY = Ed25519PrivateKey.generate()
OTHER = Ed25519PrivateKey.generate()
SIGNER = TokenSigner(KEY, "k1", issuer=POLICY.issuer, audience=POLICY.audience)


def b64(data: bytes | str) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def verifier(revoked: frozenset[str] = frozenset()) -> TokenVerifier:
    return TokenVerifier(POLICY, KeySet({"k1": KEY.public_key()}), is_revoked=revoked.__contains__)


def claims(**over: object) -> dict[str, object]:
    base: dict[str, object] = {
        "iss": POLICY.issuer,
        "aud": POLICY.audience,
        "sub": "u1",
        "org": "o1",
        "roles": ["teacher"],
        "sid": "s1",
        "jti": "j1",
        "iat": int(NOW),
        "exp": int(NOW) + 900,
        "typ": "access",
    }
    base.update(over)
    return {k: v for k, v in base.items() if v is not DROP}


DROP = object()


def sign(payload: dict[str, object], *, key: Ed25519PrivateKey = KEY, **headers: object) -> str:
    """A correctly signed EdDSA JWS of *any* header and payload (an attacker with a key, or
    our own signer gone wrong, could produce these; PyJWT's encoder refuses odd claims)."""
    h: dict[str, object] = {"alg": "EdDSA", "kid": "k1", "typ": "at+jwt", **headers}
    h = {k: v for k, v in h.items() if v is not DROP}
    signing_input = f"{b64(json.dumps(h))}.{b64(json.dumps(payload))}"
    return f"{signing_input}.{b64(key.sign(signing_input.encode()))}"


def raw(header: object, payload: object, signature: str = "c2ln") -> str:
    return f"{b64(json.dumps(header))}.{b64(json.dumps(payload))}.{signature}"


def test_a_valid_token_verifies() -> None:
    token = SIGNER.issue(sub="u1", org="o1", roles=["teacher"], sid="s1", now=NOW)
    got = verifier().verify(token, NOW + 10)
    assert (got.sub, got.org, got.roles, got.sid) == ("u1", "o1", ("teacher",), "s1")


def _corpus() -> Iterator[tuple[str, str]]:
    good = sign(claims())
    h, p, s = good.split(".")
    public_pem = KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # 1 alg none
    for alg in ["none", "None", "NONE", "nOnE", "", None, "none ", "EdDSA\x00", "eddsa", "ES256"]:
        yield "alg_none", raw({"alg": alg, "kid": "k1"}, claims(), "")
    # 2 alg confusion: HMAC keyed with the public key, RS/PS/ES claims
    for alg, digest in [
        ("HS256", hashlib.sha256),
        ("HS384", hashlib.sha384),
        ("HS512", hashlib.sha512),
    ]:
        for secret in [public_pem, b"k1", public_pem.strip()]:
            # Forged by hand: PyJWT itself refuses to HMAC with a public key.
            signing_input = (
                f"{b64(json.dumps({'alg': alg, 'kid': 'k1'}))}.{b64(json.dumps(claims()))}"
            )
            mac = hmac.new(secret, signing_input.encode(), digest).digest()
            yield "alg_confusion", f"{signing_input}.{b64(mac)}"
    yield "alg_confusion", raw({"alg": "RS256", "kid": "k1"}, claims())
    # 3 bad signature
    yield "bad_signature", sign(claims(), key=OTHER)
    for i in range(9):
        flipped = s[:i] + ("A" if s[i] != "A" else "B") + s[i + 1 :]
        yield "bad_signature", f"{h}.{p}.{flipped}"
    # 4 expired
    for age in [901, 930, 931, 1000, 3600, 86400, 10**6, 10**8, 931.5, 2000]:
        yield "expired", sign(claims(iat=int(NOW - age - 10), exp=int(NOW - age + 900 - 931)))
    # 5 missing claims
    for missing in ["exp", "iat", "jti", "sub", "aud", "iss", "sid", "typ", "org"]:
        yield "missing_claim", sign(claims(**{missing: DROP}))
    yield "missing_claim", sign({})
    # 6 wrong audience
    for aud in [
        "other",
        "",
        "huleedu ",
        "HULEEDU",
        ["other"],
        5,
        None,
        "huleedu.evil",
        "*",
        "hule",
    ]:
        yield "wrong_aud", sign(claims(aud=aud))
    # 7 wrong issuer
    for iss in [
        "https://evil",
        "",
        None,
        1,
        POLICY.issuer + "/",
        POLICY.issuer.upper(),
        "http://gateway.huleedu.test",
        ["x"],
        "gateway",
        POLICY.issuer + "\x00",
    ]:
        yield "wrong_iss", sign(claims(iss=iss))
    # 8 wrong typ (refresh / ticket / id tokens are not access tokens)
    for typ in ["refresh", "ticket", "id", "", "ACCESS", "access ", None, 1, ["access"], "ws"]:
        yield "wrong_typ", sign(claims(typ=typ))
    # 9 hostile kid
    for kid in [
        "unknown",
        "../../etc/passwd",
        "k1' OR '1'='1",
        "k" * 65,
        "",
        None,
        7,
        "k1\n",
        "http://evil/k",
        "k 1",
    ]:
        yield "hostile_kid", sign(claims(), kid=kid if kid is not None else DROP)
    # 10 jku / x5u / jwk / x5c headers (must never be fetched or trusted)
    for name in ["jku", "x5u", "jwk", "x5c", "x5t"]:
        for value in ["http://127.0.0.1:9/keys", {"kty": "OKP"}]:
            yield "hostile_key_header", sign(claims(), **{name: value})
    # 11 crit
    for crit in [["exp"], ["b64"], [], ["x"], "exp", ["kid"], [1], ["crit"], ["jku"], None]:
        yield "crit", sign(claims(), crit=crit)
    # 12 structural junk
    for junk in [
        "",
        ".",
        "..",
        "a.b",
        "a.b.c.d",
        f"{h}.{p}",
        f"{h}.{p}.{s}.",
        f"{h}..{s}",
        "eyJ!.eyJ.c2ln",
        f"{b64('[1,2]')}.{p}.{s}",
        f"{b64('not json')}.{p}.{s}",
        f"{h}.{b64('[]')}.{s}",
        " " + good,
        good + " ",
        "Bearer " + good,
    ]:
        yield "structural", junk
    # 13 oversize
    for size in [4097, 5000, 8192, 16384, 65536, 100_000, 4200, 6000, 7000, 10_000]:
        yield "oversize", sign(claims(pad="x" * size))
    # 14 revoked (checked separately with a verifier that knows the session)
    for i in range(10):
        yield "revoked", sign(claims(sid="revoked-session", jti=f"j{i}"))


CORPUS = list(_corpus())


def test_s1_corpus_has_fourteen_classes_with_ten_variants_each() -> None:
    counts: dict[str, int] = {}
    for cls, _ in CORPUS:
        counts[cls] = counts.get(cls, 0) + 1
    assert len(counts) == 14, counts
    assert all(n >= 10 for n in counts.values()), counts


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    attempts: list[object] = []

    def spy(self: socket.socket, address: object) -> None:
        attempts.append(address)
        raise OSError("outbound connection attempted during verification")

    monkeypatch.setattr(socket.socket, "connect", spy)
    monkeypatch.setattr(socket.socket, "connect_ex", spy)
    return attempts


@pytest.mark.parametrize(
    ("cls", "token"), CORPUS, ids=[f"{c}-{i}" for i, (c, _) in enumerate(CORPUS)]
)
def test_s1_every_malformed_token_is_refused_identically(
    cls: str, token: str, no_network: list[object]
) -> None:
    v = verifier(frozenset({"revoked-session"}))
    with pytest.raises(AuthenticationError) as info:
        v.verify(token, NOW + 10)
    assert to_problem(info.value) == to_problem(AuthenticationError("x")), cls
    assert token not in str(info.value) or not token, "the token leaked into the message"
    assert not no_network, f"{cls}: outbound connection attempted: {no_network}"


def test_reasons_are_specific_for_logs() -> None:
    v = verifier(frozenset({"s1"}))
    with pytest.raises(SessionRevokedError):
        v.verify(sign(claims()), NOW)
    with pytest.raises(TokenExpiredError):
        verifier().verify(sign(claims()), NOW + 900 + 30)
    with pytest.raises(UnknownKeyError):
        verifier().verify(sign(claims(), kid="k2"), NOW)


def test_leeway_and_exact_expiry_instant() -> None:
    token = sign(claims())
    v = verifier()
    assert v.verify(token, NOW + 900 + 29.999).sub == "u1"  # within 30 s leeway (cached)
    with pytest.raises(TokenExpiredError):
        v.verify(token, NOW + 930)
    with pytest.raises(AuthenticationError, match="not valid yet"):
        verifier().verify(sign(claims(iat=int(NOW) + 60)), NOW)


def test_lifetime_ceiling() -> None:
    with pytest.raises(AuthenticationError, match="lifetime"):
        verifier().verify(sign(claims(exp=int(NOW) + 3600)), NOW)


def test_cache_still_honours_revocation_and_expiry() -> None:
    revoked: set[str] = set()
    v = TokenVerifier(POLICY, KeySet({"k1": KEY.public_key()}), is_revoked=revoked.__contains__)
    token = sign(claims())
    v.verify(token, NOW)
    revoked.add("s1")
    with pytest.raises(SessionRevokedError):
        v.verify(token, NOW + 1)


def test_rotation_old_and_new_keys_verify_by_kid() -> None:
    new = Ed25519PrivateKey.generate()
    keys = KeySet({"k1": KEY.public_key(), "k2": new.public_key()})
    v = TokenVerifier(POLICY, keys)
    assert v.verify(sign(claims()), NOW).sub == "u1"
    assert v.verify(sign(claims(jti="j2"), key=new, kid="k2"), NOW).sub == "u1"
    with pytest.raises(AuthenticationError):
        v.verify(sign(claims(jti="j3"), key=new, kid="k1"), NOW)  # right kid, wrong key


def test_jwks_round_trip_keeps_only_ed25519_signing_keys() -> None:
    keys = KeySet({"k1": KEY.public_key()})
    document = keys.to_jwks()
    document["keys"].append({"kty": "RSA", "kid": "r1", "n": "x", "e": "AQAB"})
    document["keys"].append({"kty": "OKP", "crv": "Ed25519", "kid": "bad", "x": "!!"})
    again = KeySet.from_jwks(document)
    assert again.kids() == ["k1"]
    assert TokenVerifier(POLICY, again).verify(sign(claims()), NOW).sub == "u1"


_VALID = sign(claims())


@settings(max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    position=st.integers(0, len(_VALID) - 1),
    replacement=st.characters(codec="ascii"),
    mode=st.sampled_from(["replace", "insert", "delete"]),
)
def test_s2_any_mutation_of_a_valid_token_is_refused(
    position: int, replacement: str, mode: str
) -> None:
    edit: Callable[[str], str] = {
        "replace": lambda t: t[:position] + replacement + t[position + 1 :],
        "insert": lambda t: t[:position] + replacement + t[position:],
        "delete": lambda t: t[:position] + t[position + 1 :],
    }[mode]
    mutated = edit(_VALID)
    v = verifier()
    if mutated == _VALID:
        assert v.verify(mutated, NOW).sub == "u1"
        return
    try:
        v.verify(mutated, NOW)
    except AuthenticationError:
        return
    # Base64 has slack in the last character of a segment: a different string that decodes
    # to the very same bytes is the same token, not a forgery.
    parts_a, parts_b = _VALID.split("."), mutated.split(".")
    decoded = [base64.urlsafe_b64decode(x + "=" * (-len(x) % 4)) for x in parts_b]
    original = [base64.urlsafe_b64decode(x + "=" * (-len(x) % 4)) for x in parts_a]
    assert decoded == original, f"accepted a token that differs from the issued one: {mutated!r}"
