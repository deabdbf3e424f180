"""The sandbox identity backend: ``huleedu.identity.v1.IdentityService`` for development and tests.

It holds a fixed set of users (:data:`DEMO_USERS` unless told otherwise) in memory and serves
them over real gRPC, so the gateway's login path runs against the same wire contract as in
production. Passwords are hashed with scrypt when the servicer is built; only the salt and the
hash are kept.

What the contract promises, and how it is kept here:

* an unknown email and a wrong password fail alike: the same :class:`AuthenticationError` and
  the same work, because an unknown email is still run through scrypt against a decoy salt and
  hash; hashes are compared with :func:`hmac.compare_digest`;
* a disabled user with the right password is returned with ``disabled = true`` (the gateway
  refuses the login), with a wrong one the call fails like any other;
* scrypt is CPU-bound and holds ``128 * r * n`` bytes while it runs, so it runs in worker
  threads, at most :data:`MAX_CONCURRENT_HASHES` at once: the event loop stays free and memory
  stays bounded however many logins arrive together.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

import trio

from common.contracts.huleedu.identity import v1 as identity_v1
from common.errors import AuthenticationError, ConfigurationError, NotFoundError, ValidationError
from common.logs import get_logger
from common.rpc import serve_grpc

__all__ = [
    "DEFAULT_SCRYPT",
    "DEMO_USERS",
    "MAX_CONCURRENT_HASHES",
    "MAX_EMAIL_CHARS",
    "MAX_PASSWORD_CHARS",
    "DemoUser",
    "IdentityStatistics",
    "SandboxIdentity",
    "ScryptParams",
    "serve_sandbox_identity",
]

log = get_logger("deploy.sandbox.identity")

#: Longest email accepted, in characters (the longest address SMTP can carry, RFC 5321).
MAX_EMAIL_CHARS = 254
#: Longest password accepted, in characters; longer input is refused before any hashing.
MAX_PASSWORD_CHARS = 1024
#: Key derivations running at once. Each holds ``128 * r * n`` bytes (16 MiB at the default
#: parameters) in its own thread, so memory stays under 64 MiB and a burst of logins queues
#: instead of starving the CPU.
MAX_CONCURRENT_HASHES = 4

_SALT_BYTES = 16
_HASH_BYTES = 32
# The log-facing message; clients see AuthenticationError's one public detail either way.
_INVALID_CREDENTIALS = "invalid email or password"


@dataclass(frozen=True, slots=True)
class ScryptParams:
    """scrypt cost parameters: ``n`` (CPU/memory cost, a power of two), ``r`` (block size) and
    ``p`` (parallelism). The defaults cost about 40 ms and 16 MiB per hash; tests pass a
    smaller ``n``. Invalid values raise :class:`ConfigurationError` naming the parameter."""

    n: int = 2**14
    r: int = 8
    p: int = 1

    def __post_init__(self) -> None:
        if self.n < 2 or self.n & (self.n - 1):
            raise ConfigurationError(
                f"scrypt n must be a power of two >= 2, not {self.n}", field="scrypt.n"
            )
        if self.r < 1:
            raise ConfigurationError(f"scrypt r must be >= 1, not {self.r}", field="scrypt.r")
        if self.p < 1:
            raise ConfigurationError(f"scrypt p must be >= 1, not {self.p}", field="scrypt.p")

    @property
    def memory_bytes(self) -> int:
        """Bytes one derivation holds (OpenSSL's own bound, passed to it as ``maxmem``)."""
        return 128 * self.r * (self.n + self.p + 2)


DEFAULT_SCRYPT = ScryptParams()


@dataclass(frozen=True, slots=True)
class DemoUser:
    """A seeded account. ``password`` is plaintext so a developer can be shown what to type;
    it is left out of ``repr`` and never kept by :class:`SandboxIdentity`."""

    user_id: str
    org_id: str
    email: str
    display_name: str
    roles: tuple[str, ...]
    password: str = field(repr=False)
    disabled: bool = False


# Demo credentials are meant to be printed and typed: hard-coding them is the point (S106).
DEMO_USERS: tuple[DemoUser, ...] = (
    DemoUser(
        user_id="5b0e7a52-3c1f-4d8e-9a61-0f2b7c4d1e01",
        org_id="org-demo",
        email="teacher@huleedu.test",
        display_name="Astrid Lindqvist",
        roles=("teacher",),
        password="correct horse battery staple",  # noqa: S106
    ),
    DemoUser(
        user_id="5b0e7a52-3c1f-4d8e-9a61-0f2b7c4d1e02",
        org_id="org-demo",
        email="teacher2@huleedu.test",
        display_name="Erik Nyberg",
        roles=("teacher",),
        password="purple otter lantern meadow",  # noqa: S106
    ),
    DemoUser(
        user_id="5b0e7a52-3c1f-4d8e-9a61-0f2b7c4d1e03",
        org_id="org-demo",
        email="admin@huleedu.test",
        display_name="Maja Holm",
        roles=("teacher", "admin"),
        password="granite compass willow thunder",  # noqa: S106
    ),
    DemoUser(
        user_id="5b0e7a52-3c1f-4d8e-9a61-0f2b7c4d1e04",
        org_id="org-other",
        email="teacher@other.test",
        display_name="Olof Berg",
        roles=("teacher",),
        password="silver kettle morning fjord",  # noqa: S106
    ),
    DemoUser(
        user_id="5b0e7a52-3c1f-4d8e-9a61-0f2b7c4d1e05",
        org_id="org-demo",
        email="disabled@huleedu.test",
        display_name="Sven Dahl",
        roles=("teacher",),
        password="quiet harbor paper kite",  # noqa: S106
        disabled=True,
    ),
)


@dataclass(frozen=True, slots=True)
class IdentityStatistics:
    """``hashing``: derivations running in threads now; ``waiting``: logins queued for a
    thread; ``kdf_runs``: derivations finished since start (one per login that got past
    validation, known email or not)."""

    hashing: int
    waiting: int
    kdf_runs: int


@dataclass(frozen=True, slots=True)
class _Account:
    """What the servicer keeps of a user: the profile, the salt and the scrypt hash."""

    user_id: str
    org_id: str
    email: str
    display_name: str
    roles: tuple[str, ...]
    disabled: bool
    salt: bytes = field(repr=False)
    hashed: bytes = field(repr=False)


def _normalize_email(email: str) -> str:
    return email.strip().casefold()


class SandboxIdentity(identity_v1.IdentityServiceBase):
    """The IdentityService over an in-memory set of ``users``; serve it with
    :func:`common.rpc.serve_grpc` or :func:`serve_sandbox_identity`.

    Building it hashes every password (about 40 ms each at :data:`DEFAULT_SCRYPT`) in the
    calling thread. Raises :class:`ConfigurationError` (``field="users"``) for two users with
    the same id or the same email (compared case-insensitively).
    """

    def __init__(
        self,
        users: Iterable[DemoUser] = DEMO_USERS,
        *,
        scrypt: ScryptParams = DEFAULT_SCRYPT,
        max_concurrent_hashes: int = MAX_CONCURRENT_HASHES,
    ) -> None:
        self._scrypt = scrypt
        self._limiter = trio.CapacityLimiter(max_concurrent_hashes)
        self._kdf_runs = 0
        self._by_email: dict[str, _Account] = {}
        self._by_id: dict[str, _Account] = {}
        for user in users:
            email = _normalize_email(user.email)
            if email in self._by_email or user.user_id in self._by_id:
                raise ConfigurationError(f"duplicate user {user.user_id} / {email}", field="users")
            salt = secrets.token_bytes(_SALT_BYTES)
            account = _Account(
                user_id=user.user_id,
                org_id=user.org_id,
                email=email,
                display_name=user.display_name,
                roles=tuple(user.roles),
                disabled=user.disabled,
                salt=salt,
                hashed=self._derive(user.password, salt),
            )
            self._by_email[email] = account
            self._by_id[user.user_id] = account
        # An unknown email is checked against this, so it costs exactly what a known one does.
        self._decoy_salt = secrets.token_bytes(_SALT_BYTES)
        self._decoy_hash = secrets.token_bytes(_HASH_BYTES)

    def statistics(self) -> IdentityStatistics:
        limiter = self._limiter.statistics()
        return IdentityStatistics(
            hashing=limiter.borrowed_tokens,
            waiting=limiter.tasks_waiting,
            kdf_runs=self._kdf_runs,
        )

    async def authenticate(
        self, message: identity_v1.AuthenticateRequest
    ) -> identity_v1.AuthenticateResponse:
        """The user whose email and password these are.

        Raises :class:`ValidationError` naming ``email`` or ``password`` when one is empty or
        too long, and :class:`AuthenticationError` for an unknown email or a wrong password
        (one message for both). A disabled user with the right password is returned.
        """
        email = _normalize_email(message.email)
        password = message.password
        if not email:
            raise ValidationError("email is required", field="email")
        if len(email) > MAX_EMAIL_CHARS:
            raise ValidationError(
                f"email is longer than {MAX_EMAIL_CHARS} characters", field="email"
            )
        if not password:
            raise ValidationError("password is required", field="password")
        if len(password) > MAX_PASSWORD_CHARS:
            raise ValidationError(
                f"password is longer than {MAX_PASSWORD_CHARS} characters", field="password"
            )
        account = self._by_email.get(email)
        if account is None:
            salt, expected = self._decoy_salt, self._decoy_hash
        else:
            salt, expected = account.salt, account.hashed
        candidate = await self._derive_in_thread(password, salt)
        # The comparison runs for the decoy too: both failures take the same path to here.
        matches = hmac.compare_digest(candidate, expected)
        if account is None or not matches:
            if account is None:
                log.info("login rejected", reason="unknown email")
            else:
                log.info("login rejected", reason="wrong password", user_id=account.user_id)
            raise AuthenticationError(_INVALID_CREDENTIALS)
        return identity_v1.AuthenticateResponse(user=_user_message(account))

    async def get_user(self, message: identity_v1.GetUserRequest) -> identity_v1.GetUserResponse:
        """The user with ``message.user_id``; :class:`NotFoundError` if there is none,
        :class:`ValidationError` (``field="user_id"``) if it is empty."""
        await trio.lowlevel.checkpoint()
        if not message.user_id:
            raise ValidationError("user_id is required", field="user_id")
        account = self._by_id.get(message.user_id)
        if account is None:
            raise NotFoundError(f"user {message.user_id} not found", field="user_id")
        return identity_v1.GetUserResponse(user=_user_message(account))

    def _derive(self, password: str, salt: bytes) -> bytes:
        params = self._scrypt
        return hashlib.scrypt(
            password.encode("utf-8"),
            salt=salt,
            n=params.n,
            r=params.r,
            p=params.p,
            maxmem=params.memory_bytes,
            dklen=_HASH_BYTES,
        )

    async def _derive_in_thread(self, password: str, salt: bytes) -> bytes:
        # Not abandoned on cancel: a cancelled caller waits out its derivation (tens of ms),
        # so the limiter bounds the threads that really run, not just the tasks waiting.
        derived = await trio.to_thread.run_sync(self._derive, password, salt, limiter=self._limiter)
        self._kdf_runs += 1
        return derived


def _user_message(account: _Account) -> identity_v1.User:
    # A fresh message per reply: betterproto messages are mutable.
    return identity_v1.User(
        user_id=account.user_id,
        org_id=account.org_id,
        roles=list(account.roles),
        display_name=account.display_name,
        email=account.email,
        disabled=account.disabled,
    )


class _LogWhenStarted:
    """Forwards ``started(port)`` after logging the address actually bound."""

    def __init__(self, inner: trio.TaskStatus[int], host: str, users: int) -> None:
        self._inner = inner
        self._host = host
        self._users = users

    def started(self, value: int | None = None) -> None:
        assert value is not None, "serve_grpc reports its port"
        log.info("sandbox identity serving", host=self._host, port=value, users=self._users)
        self._inner.started(value)


async def serve_sandbox_identity(
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    users: Iterable[DemoUser] = DEMO_USERS,
    scrypt: ScryptParams = DEFAULT_SCRYPT,
    shutdown_trigger: Callable[[], Awaitable[object]] | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve a :class:`SandboxIdentity` over ``users`` on ``host:port`` (0: any free port).

    Reports the bound port through ``task_status`` once listening. Runs until
    ``shutdown_trigger`` returns or until cancelled, then drains like
    :func:`common.rpc.serve_grpc`. The seeded passwords are hashed in a worker thread first,
    so the event loop is not held up. Opens the gRPC loop itself when none is open; open one
    with :func:`common.rpc.open_rpc_loop` around this and its clients to share it.
    """
    users = tuple(users)
    log.info(
        "sandbox identity starting",
        host=host,
        port=port,
        users=len(users),
        scrypt_n=scrypt.n,
        scrypt_r=scrypt.r,
        scrypt_p=scrypt.p,
    )
    servicer = await trio.to_thread.run_sync(lambda: SandboxIdentity(users, scrypt=scrypt))
    await serve_grpc(
        [servicer],
        host=host,
        port=port,
        shutdown_trigger=shutdown_trigger,
        task_status=_LogWhenStarted(task_status, host, len(users)),
    )
