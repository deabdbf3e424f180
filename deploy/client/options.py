"""Options and discovery: where the tier is and who logs in.

:func:`add_connection_arguments` adds the options both tools share; :func:`resolve_config`
turns them into a :class:`ClientConfig`: an explicit option wins, then the dev stack's discovery
file (``--stack``, by default :data:`DEFAULT_STACK_FILE` if it exists: ``{"gateway_url",
"ws_url", "ca_file"}``), then the built-in defaults (the devstack's ports, the sandbox's demo
teacher). Bad options raise :class:`OptionsError`. The password is kept out of ``repr``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

__all__ = [
    "DEFAULT_GATEWAY_URL",
    "DEFAULT_STACK_FILE",
    "DEFAULT_WS_URL",
    "DEMO_EMAIL",
    "DEMO_PASSWORD",
    "PASSWORD_ENV",
    "ClientConfig",
    "OptionsError",
    "add_connection_arguments",
    "resolve_config",
]

DEFAULT_GATEWAY_URL = "https://127.0.0.1:8443"
DEFAULT_WS_URL = "wss://127.0.0.1:8444/v1/ws"
#: Where ``huleedu devstack`` writes its discovery file (relative to the working directory).
DEFAULT_STACK_FILE = Path(".state/devstack/devstack.json")
#: The sandbox identity service's demo teacher (public, documented test data).
DEMO_EMAIL = "teacher@huleedu.test"
DEMO_PASSWORD = "correct horse battery staple"  # public demo data  # noqa: S105  # nosec B105
#: Read when ``--password`` is not given (keeps a real password out of the process list).
PASSWORD_ENV = "HULEEDU_DEMO_PASSWORD"  # a variable name  # noqa: S105  # nosec B105
_STACK_KEYS = ("gateway_url", "ws_url", "ca_file")


class OptionsError(Exception):
    """The options (or the discovery file) are unusable; the message names the option."""


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """Where the tier is and who logs in. ``ca_file`` None: the system trust store."""

    gateway_url: str = DEFAULT_GATEWAY_URL
    ws_url: str = DEFAULT_WS_URL
    ca_file: Path | None = None
    email: str = DEMO_EMAIL
    password: str = field(default=DEMO_PASSWORD, repr=False)
    #: ``Origin`` header for the WebSocket handshake; None sends none (a non-browser client).
    origin: str | None = None


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--stack --gateway --ws --ca --email --password --origin`` (defaults: None, so
    :func:`resolve_config` can tell an explicit option from a default)."""
    group = parser.add_argument_group("connection")
    group.add_argument(
        "--stack",
        type=Path,
        metavar="FILE",
        help=f"devstack discovery file to take defaults from (default: {DEFAULT_STACK_FILE} "
        "if it exists)",
    )
    group.add_argument("--gateway", metavar="URL", help=f"default {DEFAULT_GATEWAY_URL}")
    group.add_argument("--ws", metavar="URL", help=f"default {DEFAULT_WS_URL}")
    group.add_argument(
        "--ca", type=Path, metavar="FILE", help="CA bundle to trust (default: system trust)"
    )
    group.add_argument("--email", help=f"default {DEMO_EMAIL}")
    group.add_argument(
        "--password", help=f"default: ${PASSWORD_ENV}, else the demo account's password"
    )
    group.add_argument("--origin", help="Origin header for the WebSocket (default: none)")


def _read_stack_file(path: Path) -> dict[str, str]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise OptionsError(f"--stack {path}: cannot read: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise OptionsError(f"--stack {path}: not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise OptionsError(f"--stack {path}: expected a JSON object")
    found: dict[str, str] = {}
    for key in _STACK_KEYS:
        value = raw.get(key)
        if value is not None and not isinstance(value, str):
            raise OptionsError(f"--stack {path}: {key} must be a string")
        if value:
            found[key] = value
    return found


def _stack_defaults(stack: Path | None) -> dict[str, str]:
    if stack is not None:
        return _read_stack_file(stack)
    return _read_stack_file(DEFAULT_STACK_FILE) if DEFAULT_STACK_FILE.is_file() else {}


def _check_url(value: str, option: str, schemes: tuple[str, ...]) -> str:
    parts = urlsplit(value)
    if parts.scheme not in schemes or not parts.hostname:
        raise OptionsError(f"{option} {value!r}: expected a {' or '.join(schemes)} URL")
    if parts.query or parts.fragment:
        raise OptionsError(f"{option} {value!r}: must not have a query or fragment")
    return value


def resolve_config(args: argparse.Namespace, environ: Mapping[str, str]) -> ClientConfig:
    """The effective configuration: explicit options, then the discovery file, then defaults.

    A relative ``ca_file`` in the discovery file is taken relative to that file's folder.
    Raises :class:`OptionsError` naming the option or file at fault.
    """
    stack_path: Path | None = args.stack
    found = _stack_defaults(stack_path)
    ca: Path | None = args.ca
    source = "--ca"
    if ca is None and "ca_file" in found:
        stack_file = stack_path or DEFAULT_STACK_FILE
        ca, source = stack_file.parent / found["ca_file"], f"--stack {stack_file}: ca_file"
    if ca is not None and not ca.is_file():
        raise OptionsError(f"{source} {ca}: no such file")
    gateway = args.gateway or found.get("gateway_url") or DEFAULT_GATEWAY_URL
    ws = args.ws or found.get("ws_url") or DEFAULT_WS_URL
    password = args.password or environ.get(PASSWORD_ENV) or DEMO_PASSWORD
    return ClientConfig(
        gateway_url=_check_url(gateway, "--gateway", ("https", "http")).rstrip("/"),
        ws_url=_check_url(ws, "--ws", ("wss", "ws")),
        ca_file=ca,
        email=args.email or DEMO_EMAIL,
        password=password,
        origin=args.origin,
    )
