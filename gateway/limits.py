"""The gateway's rate limits (GCRA from :mod:`common.ratelimit`, in process, per instance).

* ``user``: every authenticated request, keyed by the token's ``sub`` (teachers behind one
  school NAT do not share a budget);
* ``address``: every request that is not (yet) authenticated, keyed by client address;
* ``login_address`` and ``login_account``: login attempts per address and per account (the
  email, case-folded, known or not: an attacker learns nothing from the limit). An attempt is
  counted against the account when it starts, so concurrent guesses are bounded too, and given
  back when it succeeds: a teacher logging in from several tabs is never locked out, only
  failed attempts use up the account's budget;
* ``refresh``: refresh attempts per address.

The client address is the peer, or, when the peer is a configured trusted proxy, the right-most
``X-Forwarded-For`` entry that is not itself a trusted proxy.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from common.errors import RateLimitedError
from common.ratelimit import Decision, GcraLimiter, RatePolicy
from gateway.settings import GatewaySettings

__all__ = ["ClientAddress", "Limited", "RateLimits"]

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ClientAddress:
    """Resolves the client address of a request (see the module docstring)."""

    def __init__(self, trusted: Iterable[str]) -> None:
        self._trusted: tuple[IpNetwork, ...] = tuple(
            ipaddress.ip_network(t, strict=False) for t in trusted
        )

    def _is_trusted(self, address: str) -> bool:
        if not self._trusted:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self._trusted)

    def resolve(self, peer: str, forwarded_for: Sequence[str]) -> str:
        """``forwarded_for``: every ``X-Forwarded-For`` header value, in order."""
        if not forwarded_for or not self._is_trusted(peer):
            return peer
        hops = [h.strip() for value in forwarded_for for h in value.split(",")]
        for hop in reversed(hops):
            if not hop:
                continue
            try:
                ipaddress.ip_address(hop)
            except ValueError:
                return peer  # a garbled chain is not believed at all
            if not self._is_trusted(hop):
                return hop
        return peer


@dataclass(frozen=True, slots=True)
class Limited:
    """A decision together with the policy it was made under (for the headers)."""

    policy: RatePolicy
    decision: Decision

    def headers(self) -> dict[str, str]:
        return self.decision.headers(self.policy)

    def raise_if_denied(self) -> None:
        if not self.decision.allowed:
            raise RateLimitedError(
                f"rate limit {self.policy.name} exceeded",
                retry_after=max(1.0, self.decision.retry_after_s),
                extra={"headers": self.headers()},
            )


class RateLimits:
    def __init__(self, settings: GatewaySettings, now: Callable[[], float]) -> None:
        self._now = now
        self.user = GcraLimiter(settings.limit_user.policy("user"))
        self.address = GcraLimiter(settings.limit_address.policy("address"))
        self.login_address = GcraLimiter(settings.limit_login_address.policy("login-address"))
        self.login_account = GcraLimiter(settings.limit_login_account.policy("login-account"))
        self.refresh = GcraLimiter(settings.limit_refresh.policy("refresh"))

    def all(self) -> dict[str, GcraLimiter]:
        return {
            "user": self.user,
            "address": self.address,
            "login_address": self.login_address,
            "login_account": self.login_account,
            "refresh": self.refresh,
        }

    def check(self, limiter: GcraLimiter, key: str) -> Limited:
        """Count one request of ``key``; raises :class:`RateLimitedError` when refused."""
        limited = Limited(limiter.policy, limiter.check(key, self._now()))
        limited.raise_if_denied()
        return limited

    def refund(self, limiter: GcraLimiter, key: str) -> None:
        """Give back one request of ``key`` that :meth:`check` counted."""
        limiter.refund(key, self._now())

    def check_all(self, checks: Sequence[tuple[GcraLimiter, str]]) -> Limited:
        """Every check in order (stopping at the first refusal); the tightest one admitted."""
        admitted = [self.check(limiter, key) for limiter, key in checks]
        return min(admitted, key=lambda lim: lim.decision.remaining)
