"""Access tokens: signing (the gateway) and verification (gateway and WebSocket manager).

Access tokens are JWTs signed with EdDSA (Ed25519), header ``{"alg":"EdDSA","kid":...,
"typ":"at+jwt"}``, claims ``iss aud sub org roles sid jti iat exp typ="access"``.

:class:`TokenVerifier` is strict and cheap on the hot path:

1. size and shape before any decoding (``max_token_bytes``; three base64url segments);
2. the header: ``alg`` exactly ``EdDSA``; ``jku``/``x5u``/``jwk``/``x5c``/``crit`` refused
   (nothing is ever fetched); ``kid`` must name a known key (an unknown one raises
   :class:`UnknownKeyError`, so a JWKS client may refresh once and retry);
3. signature, ``aud``, ``iss``, and every required claim, with PyJWT (algorithms pinned);
4. ``exp``/``iat``/``nbf`` against the caller's ``now`` (wall-clock seconds, injected so tests
   run on exact times) with ``leeway_s``, and a ceiling on ``exp - iat``;
5. the ``typ`` claim is ``access`` (a refresh or ticket token is not an access token);
6. revocation by session id, checked on every call (also for cached tokens).

Verified tokens are cached by SHA-256 of the token until their ``exp``. Every failure raises
an :class:`~common.errors.AuthenticationError` (public text identical for all causes); the
reason is in the message for logs, and the token itself is never in it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.errors import AuthenticationError, SessionRevokedError, TokenExpiredError

__all__ = [
    "AccessClaims",
    "KeySet",
    "TokenSigner",
    "TokenVerifier",
    "UnknownKeyError",
    "VerifierPolicy",
]

ALGORITHM = "EdDSA"
HEADER_TYP = "at+jwt"
REQUIRED_CLAIMS = ("exp", "iat", "jti", "sub", "aud", "iss")
_FORBIDDEN_HEADERS = frozenset({"jku", "x5u", "jwk", "x5c", "x5t", "x5t#S256", "crit"})
_SEGMENT = re.compile(r"[A-Za-z0-9_-]+")
_KID = re.compile(r"[A-Za-z0-9._-]{1,64}")


class UnknownKeyError(AuthenticationError):
    """The token names a ``kid`` not in the key set (the caller may refresh its JWKS)."""


@dataclass(frozen=True, slots=True)
class VerifierPolicy:
    issuer: str
    audience: str
    leeway_s: float = 30.0
    max_token_bytes: int = 4096
    #: Longest accepted lifetime (``exp - iat``); access tokens live <= 15 minutes.
    max_lifetime_s: float = 900.0
    expected_typ: str = "access"


@dataclass(frozen=True, slots=True)
class AccessClaims:
    sub: str
    org: str
    roles: tuple[str, ...]
    sid: str
    jti: str
    iat: int
    exp: int
    #: On a ``ws_ticket``: the ``exp`` of the access token it was minted from (a socket opened
    #: with the ticket lives as long as that token would); None on other tokens.
    access_exp: int | None = None


class KeySet:
    """Public keys by ``kid`` (current and previous, for rotation)."""

    def __init__(self, keys: Mapping[str, Ed25519PublicKey] | None = None) -> None:
        self._keys = dict(keys or {})

    def get(self, kid: str) -> Ed25519PublicKey | None:
        return self._keys.get(kid)

    def kids(self) -> list[str]:
        return list(self._keys)

    @classmethod
    def from_jwks(cls, document: Mapping[str, Any]) -> KeySet:
        """Keys from a JWKS document; anything but Ed25519 OKP signing keys is skipped."""
        keys: dict[str, Ed25519PublicKey] = {}
        for entry in document.get("keys", []):
            if not isinstance(entry, dict):
                continue
            if entry.get("kty") != "OKP" or entry.get("crv") != "Ed25519":
                continue
            if entry.get("use", "sig") != "sig" or not isinstance(entry.get("kid"), str):
                continue
            try:
                raw = base64.urlsafe_b64decode(entry["x"] + "=" * (-len(entry["x"]) % 4))
                keys[entry["kid"]] = Ed25519PublicKey.from_public_bytes(raw)
            except (KeyError, TypeError, ValueError, binascii.Error):
                continue
        return cls(keys)

    def to_jwks(self) -> dict[str, Any]:
        from cryptography.hazmat.primitives import serialization

        out = []
        for kid, key in self._keys.items():
            raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            out.append(
                {
                    "kty": "OKP",
                    "crv": "Ed25519",
                    "use": "sig",
                    "alg": ALGORITHM,
                    "kid": kid,
                    "x": base64.urlsafe_b64encode(raw).decode().rstrip("="),
                }
            )
        return {"keys": out}


class TokenSigner:
    """Issues access tokens with one private key (``kid``)."""

    def __init__(
        self, key: Ed25519PrivateKey, kid: str, *, issuer: str, audience: str, ttl_s: int = 900
    ) -> None:
        if not _KID.fullmatch(kid):
            raise ValueError(f"kid must match {_KID.pattern}, got {kid!r}")
        self._key = key
        self.kid = kid
        self._issuer = issuer
        self._audience = audience
        self._ttl_s = ttl_s

    def public_key(self) -> Ed25519PublicKey:
        return self._key.public_key()

    def issue(
        self,
        *,
        sub: str,
        org: str,
        roles: Iterable[str],
        sid: str,
        now: float,
        typ: str = "access",
        extra: Mapping[str, Any] | None = None,
    ) -> str:
        iat = int(now)
        claims = {
            "iss": self._issuer,
            "aud": self._audience,
            "sub": sub,
            "org": org,
            "roles": list(roles),
            "sid": sid,
            "jti": uuid.uuid4().hex,
            "iat": iat,
            "exp": iat + self._ttl_s,
            "typ": typ,
            **(extra or {}),
        }
        return jwt.encode(
            claims, self._key, algorithm=ALGORITHM, headers={"kid": self.kid, "typ": HEADER_TYP}
        )


def _b64json(segment: str, what: str) -> dict[str, Any]:
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        value = json.loads(raw)
    except (binascii.Error, ValueError, UnicodeDecodeError, RecursionError) as exc:
        # RecursionError: a segment of a few thousand nested brackets (under every size cap).
        raise AuthenticationError(f"{what} is not base64url JSON") from exc
    if not isinstance(value, dict):
        raise AuthenticationError(f"{what} is not a JSON object")
    return value


def _optional_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _int_claim(claims: Mapping[str, Any], name: str) -> int:
    value = claims.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise AuthenticationError(f"{name} must be an integer")
    return value


class TokenVerifier:
    """See the module docstring. One instance per process; not thread-safe (one Trio run)."""

    def __init__(
        self,
        policy: VerifierPolicy,
        keys: KeySet,
        *,
        is_revoked: Callable[[str], bool] | None = None,
        cache_size: int = 10_000,
    ) -> None:
        self.policy = policy
        self.keys = keys
        self._is_revoked = is_revoked or (lambda _sid: False)
        self._cache: OrderedDict[bytes, AccessClaims] = OrderedDict()
        self._cache_size = cache_size

    def verify(self, token: str, now: float) -> AccessClaims:
        """The claims of a valid access token at wall-clock ``now``; else raises."""
        if len(token) > self.policy.max_token_bytes:
            raise AuthenticationError(f"token longer than {self.policy.max_token_bytes} bytes")
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        claims = self._cache.get(digest)
        if claims is None:
            claims = self._verify_uncached(token, now)
            self._cache[digest] = claims
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        elif now >= claims.exp + self.policy.leeway_s:
            del self._cache[digest]
            raise TokenExpiredError("token expired")
        if self._is_revoked(claims.sid):
            raise SessionRevokedError("session revoked")
        return claims

    def _verify_uncached(self, token: str, now: float) -> AccessClaims:
        parts = token.split(".")
        if len(parts) != 3 or not all(_SEGMENT.fullmatch(p) for p in parts):
            raise AuthenticationError("token is not three base64url segments")
        header = _b64json(parts[0], "header")
        if header.get("alg") != ALGORITHM:
            raise AuthenticationError(f"alg {str(header.get('alg'))[:20]!r} is not allowed")
        hostile = _FORBIDDEN_HEADERS & header.keys()
        if hostile:
            raise AuthenticationError(f"header parameters not accepted: {sorted(hostile)}")
        if header.get("typ") not in (HEADER_TYP, None):
            raise AuthenticationError("header typ is not at+jwt")
        kid = header.get("kid")
        if not isinstance(kid, str) or not _KID.fullmatch(kid):
            raise AuthenticationError("kid missing or malformed")
        key = self.keys.get(kid)
        if key is None:
            raise UnknownKeyError(f"unknown kid {kid!r}")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[ALGORITHM],
                audience=self.policy.audience,
                issuer=self.policy.issuer,
                # Times are checked below against the injected clock; everything else here.
                options={
                    "require": list(REQUIRED_CLAIMS),
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                },
            )
        except jwt.PyJWTError as exc:
            raise AuthenticationError(f"token rejected: {type(exc).__name__}") from None
        return self._check_claims(claims, now)

    def _check_claims(self, claims: dict[str, Any], now: float) -> AccessClaims:
        leeway = self.policy.leeway_s
        exp, iat, nbf = _int_claim(claims, "exp"), _int_claim(claims, "iat"), 0
        if "nbf" in claims:
            nbf = _int_claim(claims, "nbf")
        if now >= exp + leeway:
            raise TokenExpiredError("token expired")
        if iat > now + leeway or nbf > now + leeway:
            raise AuthenticationError("token not valid yet")
        if exp - iat > self.policy.max_lifetime_s:
            raise AuthenticationError("token lifetime too long")
        if claims.get("typ") != self.policy.expected_typ:
            raise AuthenticationError("token typ is not access")
        sub, sid, jti, org = (claims.get(k) for k in ("sub", "sid", "jti", "org"))
        roles = claims.get("roles", [])
        if not all(isinstance(v, str) and v for v in (sub, sid, jti)) or not isinstance(org, str):
            raise AuthenticationError("sub, sid, jti and org must be strings")
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise AuthenticationError("roles must be a list of strings")
        return AccessClaims(
            sub=str(sub),
            org=org,
            roles=tuple(roles),
            sid=str(sid),
            jti=str(jti),
            iat=iat,
            exp=exp,
            access_exp=_optional_int(claims.get("access_exp")),
        )

    def forget(self) -> None:
        """Drop the verified-token cache (e.g. after a key was withdrawn)."""
        self._cache.clear()
