"""The client side of the tier, for the command-line tools (``huleedu demo``, ``huleedu ws-tail``).

* **Options and discovery** (:mod:`deploy.client.options`). :func:`add_connection_arguments`
  adds the options both tools share; :func:`resolve_config` turns them into a
  :class:`ClientConfig`: an explicit option wins, then the dev stack's discovery file
  (``--stack``, by default :data:`DEFAULT_STACK_FILE` if it exists: ``{"gateway_url",
  "ws_url", "ca_file"}``), then the built-in defaults (the devstack's ports, the sandbox's demo
  teacher). Bad options raise :class:`OptionsError`.
* **Failures** (:mod:`deploy.client.failures`). :class:`StepError` names the step that failed;
  :func:`describe_failure` says why a network call failed, in a few words.
* **The gateway** (:mod:`deploy.client.gateway`). :func:`open_gateway` yields a
  :class:`GatewayClient` (httpx over HTTP/1.1 with a fresh verifying TLS context) whose calls
  raise :class:`StepError` naming the step and saying what went wrong: the problem document's
  status and detail, ``cannot reach <url>: connection refused``, an untrusted certificate, or
  no answer in time.
* **Live updates** (:mod:`deploy.client.live`). :func:`open_live_socket` connects to the
  WebSocket manager with a one-time ticket (never a token in the URL), waits for ``welcome``,
  extends the connection to the access token's expiry and yields a :class:`LiveSocket`;
  :meth:`LiveSocket.receive` answers server heartbeats itself and reports the close code.
* **Rendering** (:mod:`deploy.client.render`). :func:`event_summary` renders an ``event``
  frame's data as one short line.

Nothing here prints or logs a token, ticket or password: they are kept out of ``repr`` and out
of every error message (the WebSocket URL in messages is the one without the ticket).
"""

from __future__ import annotations

from deploy.client.failures import StepError, describe_failure
from deploy.client.gateway import GatewayClient, Session, open_gateway
from deploy.client.live import CloseInfo, Frame, LiveSocket, open_live_socket
from deploy.client.options import (
    DEFAULT_GATEWAY_URL,
    DEFAULT_STACK_FILE,
    DEFAULT_WS_URL,
    DEMO_EMAIL,
    DEMO_PASSWORD,
    PASSWORD_ENV,
    ClientConfig,
    OptionsError,
    add_connection_arguments,
    resolve_config,
)
from deploy.client.render import clock_time, event_data, event_summary

__all__ = [
    "DEFAULT_GATEWAY_URL",
    "DEFAULT_STACK_FILE",
    "DEFAULT_WS_URL",
    "DEMO_EMAIL",
    "DEMO_PASSWORD",
    "PASSWORD_ENV",
    "ClientConfig",
    "CloseInfo",
    "Frame",
    "GatewayClient",
    "LiveSocket",
    "OptionsError",
    "Session",
    "StepError",
    "add_connection_arguments",
    "clock_time",
    "describe_failure",
    "event_data",
    "event_summary",
    "open_gateway",
    "open_live_socket",
    "resolve_config",
]
