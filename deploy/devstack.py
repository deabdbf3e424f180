"""``huleedu devstack`` (what ``make run`` starts): the whole tier in one Trio program.

One nursery branch per service, all on the embedded defaults unless told otherwise:

* the sandbox IdentityService and the sandbox batch/file backends with the pipeline simulator
  (gRPC on free loopback ports);
* the aggregator (gRPC on a free port, views in ``<state>/aggregator.db``);
* the gateway on ``https://<host>:<gateway_port>`` and the wsmanager on
  ``wss://<host>:<ws_port>/v1/ws``, both with the dev CA and certificate under ``<state>/tls``
  (generated on first start), the gateway's signing keys and sessions under ``<state>``;
* events on one in-process :class:`~common.bus.MemoryBus`, or on a real Kafka broker with
  ``--kafka BOOTSTRAP``.

Once everything is ready it prints the URLs, the CA to trust, the demo accounts and three
commands to try, and writes ``<state>/devstack.json`` (URLs and CA file) which ``huleedu demo``
and ``huleedu ws-tail`` read by default. Ctrl-C (or SIGTERM) shuts down in order: the public
edges first (sockets closed with 1001, in-flight requests finished), then the aggregator, then
the backends. A second Ctrl-C stops at once.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import trio

from aggregator.serve import serve_aggregator
from aggregator.settings import AggregatorSettings
from common.bus import open_service_bus
from common.errors import ConfigurationError, UnavailableError
from common.logs import configure_logging, get_logger
from common.rpc import open_rpc_loop
from common.settings import KafkaSettings, load_settings
from deploy.sandbox.identity import DEMO_USERS, serve_sandbox_identity
from deploy.sandbox.pipeline import PipelineSettings
from deploy.sandbox.serve import SandboxSettings, serve_sandbox_backends
from gateway.backends import BackendSettings
from gateway.serve import serve_gateway
from gateway.settings import GatewaySettings
from wsmanager.serve import serve_wsmanager
from wsmanager.settings import WsManagerSettings

__all__ = [
    "DISCOVERY_FILE",
    "DevstackAddresses",
    "DevstackOptions",
    "add_arguments",
    "banner",
    "main",
    "serve_devstack",
]

log = get_logger("devstack")

#: Written under the state folder once ready; ``huleedu demo`` / ``ws-tail`` read it.
DISCOVERY_FILE = "devstack.json"
DEFAULT_STATE_DIR = Path(".state/devstack")
#: Seconds the wsmanager may take to read the notification topic before the stack is ready.
READY_WITHIN_S = 60.0
#: A pace at which a person can watch a batch progress (seconds per essay / per phase).
WATCHABLE_PIPELINE = PipelineSettings(essay_delay_s=0.25, phase_delay_s=0.5)


@dataclass(frozen=True, slots=True)
class DevstackOptions:
    host: str = "127.0.0.1"
    gateway_port: int = 8443
    ws_port: int = 8444
    state_dir: Path = DEFAULT_STATE_DIR
    #: Kafka bootstrap servers; empty = the in-process memory bus.
    kafka: str = ""
    pipeline: PipelineSettings = WATCHABLE_PIPELINE


@dataclass(frozen=True, slots=True)
class DevstackAddresses:
    gateway_url: str
    ws_url: str
    ca_file: str
    gateway_ops_url: str
    ws_ops_url: str
    aggregator_ops_url: str
    bus: str


@dataclass
class _Branch:
    """One service's nursery branch: its shutdown trigger and when it has returned."""

    name: str
    shutdown: trio.Event
    done: trio.Event

    async def stop(self, within_s: float) -> None:
        self.shutdown.set()
        with trio.move_on_after(within_s) as scope:
            await self.done.wait()
        if scope.cancelled_caught:
            log.warning("service did not stop in time", service=self.name, within_s=within_s)


async def _start(
    nursery: trio.Nursery, name: str, serve: Callable[..., Awaitable[None]]
) -> tuple[_Branch, Any]:
    """Start ``serve(shutdown=..., task_status=...)`` in its own branch of ``nursery``."""
    branch = _Branch(name, trio.Event(), trio.Event())

    async def run(task_status: trio.TaskStatus[Any]) -> None:
        try:
            await serve(shutdown=branch.shutdown, task_status=task_status)
        finally:
            branch.done.set()

    started = await nursery.start(run)
    return branch, started


def _triggered(serve: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    """Adapt a ``shutdown_trigger=`` server to the ``shutdown=`` event shape."""

    async def adapted(*, shutdown: trio.Event, task_status: trio.TaskStatus[Any]) -> None:
        await serve(shutdown_trigger=shutdown.wait, task_status=task_status)

    return adapted


def _kafka(options: DevstackOptions, client_id: str) -> KafkaSettings:
    return KafkaSettings(bootstrap_servers=options.kafka, client_id=client_id)


async def serve_devstack(
    options: DevstackOptions,
    *,
    shutdown: trio.Event,
    task_status: trio.TaskStatus[DevstackAddresses] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run every service until ``shutdown`` is set, then stop them edges first."""
    state = options.state_dir.resolve()
    state.mkdir(parents=True, exist_ok=True)
    loop = "127.0.0.1"
    async with (
        open_rpc_loop(),
        open_service_bus(_kafka(options, "devstack")) as bus,
        trio.open_nursery() as nursery,
    ):
        identity, identity_port = await _start(
            nursery, "identity", _triggered(partial(serve_sandbox_identity, host=loop, port=0))
        )
        sandbox_settings = load_settings(
            SandboxSettings,
            grpc_host=loop,
            grpc_port=0,
            state_dir=state / "sandbox",
            pipeline=options.pipeline,
        )
        backends, sandbox = await _start(
            nursery,
            "sandbox",
            _triggered(partial(serve_sandbox_backends, sandbox_settings, bus=bus)),
        )
        aggregator_settings = load_settings(
            AggregatorSettings,
            grpc_host=loop,
            grpc_port=0,
            ops_port=0,
            db_path=state / "aggregator.db",
            kafka=_kafka(options, "aggregator"),
        )
        aggregator, aggregated = await _start(
            nursery, "aggregator", partial(serve_aggregator, aggregator_settings, bus=bus)
        )
        sandbox_target = BackendSettings(target=f"{loop}:{sandbox.port}")
        gateway_settings = load_settings(
            GatewaySettings,
            host=options.host,
            port=options.gateway_port,
            ops_port=0,
            state_dir=state,
            identity_target=f"{loop}:{identity_port}",
            batch_backend=sandbox_target,
            file_backend=sandbox_target,
            result_backend=BackendSettings(target=f"{loop}:{aggregated.grpc_port}"),
            kafka=_kafka(options, "gateway"),
        )
        gateway, gateway_addresses = await _start(
            nursery, "gateway", partial(serve_gateway, gateway_settings, bus=bus)
        )
        ca_file = gateway_addresses.ca_file
        ws_settings = load_settings(
            WsManagerSettings,
            host=options.host,
            port=options.ws_port,
            ops_port=0,
            state_dir=state,
            jwks_url=f"{gateway_addresses.url}/.well-known/jwks.json",
            jwks_ca_file=Path(ca_file) if ca_file else None,
            kafka=_kafka(options, "wsmanager"),
        )
        ws_caught_up = trio.Event()
        wsmanager, ws_addresses = await _start(
            nursery,
            "wsmanager",
            partial(serve_wsmanager, ws_settings, bus=bus, caught_up=ws_caught_up),
        )
        # Ready means a socket opened now is served: the wsmanager has read the topic.
        with trio.fail_after(READY_WITHIN_S):
            await ws_caught_up.wait()
        addresses = DevstackAddresses(
            gateway_url=gateway_addresses.url,
            ws_url=f"{ws_addresses.url}/v1/ws",
            ca_file=ws_addresses.ca_file or ca_file or "",
            gateway_ops_url=gateway_addresses.ops_url,
            ws_ops_url=ws_addresses.ops_url,
            aggregator_ops_url=aggregated.ops_url,
            bus=f"kafka {options.kafka}" if options.kafka else "in-process memory bus",
        )
        discovery = state / DISCOVERY_FILE
        _write_discovery(discovery, addresses)
        task_status.started(addresses)
        try:
            await shutdown.wait()
        finally:
            discovery.unlink(missing_ok=True)
        log.info("devstack shutting down")
        # Clients of the backends first, so nothing is cut mid-request.
        async with trio.open_nursery() as edges:
            edges.start_soon(gateway.stop, gateway_settings.shutdown_grace_s + 5)
            edges.start_soon(wsmanager.stop, ws_settings.shutdown_grace_s + 5)
        await aggregator.stop(aggregator_settings.shutdown_grace_s + 5)
        await backends.stop(sandbox_settings.shutdown_grace_s + 5)
        await identity.stop(10)
        nursery.cancel_scope.cancel()


def _write_discovery(path: Path, addresses: DevstackAddresses) -> None:
    fields = {"gateway_url": addresses.gateway_url, "ws_url": addresses.ws_url}
    payload = json.dumps({**fields, "ca_file": addresses.ca_file, "pid": os.getpid()}, indent=2)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(payload + "\n")
    temporary.replace(path)


def banner(addresses: DevstackAddresses, *, seconds: float) -> str:
    """What a person sees once the stack is ready: where it is and how to try it."""
    teacher = DEMO_USERS[0]
    ca = addresses.ca_file
    login = json.dumps({"email": teacher.email, "password": teacher.password})
    accounts = "\n".join(
        f"    {user.email:<24} {user.password!r}{'  (disabled)' if user.disabled else ''}"
        for user in DEMO_USERS
    )
    return f"""
HuleEdu interface tier is ready ({seconds:.1f} s)

  gateway     {addresses.gateway_url}   (OpenAPI: {addresses.gateway_url}/openapi.json)
  websocket   {addresses.ws_url}
  dev CA      {ca}
  events      {addresses.bus}
  ops         gateway {addresses.gateway_ops_url}  wsmanager {addresses.ws_ops_url}
              aggregator {addresses.aggregator_ops_url}   (/livez /readyz /metrics)

  demo accounts (sandbox identity):
{accounts}

Try it (in another terminal, from this folder):
  1. log in:
     curl --cacert {ca} -H 'content-type: application/json' \\
       -d '{login}' {addresses.gateway_url}/v1/auth/login
  2. watch your events live:
     .venv/bin/huleedu ws-tail
  3. run a batch of sample essays through spellcheck and CJ assessment:
     .venv/bin/huleedu demo

Ctrl-C stops everything.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = DevstackOptions()
    parser.add_argument(
        "--host", default=defaults.host, help="address the gateway and wsmanager bind"
    )
    parser.add_argument("--gateway-port", type=int, default=defaults.gateway_port)
    parser.add_argument("--ws-port", type=int, default=defaults.ws_port)
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=defaults.state_dir,
        help="where certificates, keys, sessions and views are kept",
    )
    parser.add_argument(
        "--kafka",
        metavar="BOOTSTRAP",
        default="",
        help="use this Kafka broker instead of the in-process bus",
    )
    parser.add_argument(
        "--fast",
        action="store_true",
        help="run the pipeline simulator without its watchable delays (tests, smoke runs)",
    )
    parser.add_argument(
        "--log-level", default="warning", choices=["debug", "info", "warning", "error"]
    )


def _options(args: argparse.Namespace) -> DevstackOptions:
    for name in ("gateway_port", "ws_port"):
        port = getattr(args, name)
        if not 0 <= port <= 65535:
            raise ConfigurationError(f"--{name.replace('_', '-')} {port} is not a port", field=name)
    pipeline = (
        PipelineSettings(essay_delay_s=0.01, phase_delay_s=0.02)
        if args.fast
        else WATCHABLE_PIPELINE
    )
    return DevstackOptions(
        host=args.host,
        gateway_port=args.gateway_port,
        ws_port=args.ws_port,
        state_dir=args.state_dir,
        kafka=args.kafka,
        pipeline=pipeline,
    )


async def _run(options: DevstackOptions) -> None:
    began = time.monotonic()
    shutdown = trio.Event()

    async def on_signals(cancel: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                if shutdown.is_set():  # the second one: stop at once
                    cancel.cancel()
                    return
                print("\nshutting down (Ctrl-C again to stop at once) ...", flush=True)
                shutdown.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(on_signals, nursery.cancel_scope)

        async def stack(task_status: trio.TaskStatus[DevstackAddresses]) -> None:
            await serve_devstack(options, shutdown=shutdown, task_status=task_status)
            nursery.cancel_scope.cancel()  # stopped: no more signals to watch

        addresses = await nursery.start(stack)
        print(banner(addresses, seconds=time.monotonic() - began), flush=True)
        print(json.dumps({"ready": True, **asdict(addresses)}), flush=True)
    print("stopped", flush=True)


def _startup_failure(error: BaseException) -> BaseException | None:
    """The configuration or dependency error that stopped start-up, inside any groups."""
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            found = _startup_failure(inner)
            if found is not None:
                return found
        return None
    return error if isinstance(error, ConfigurationError | UnavailableError | OSError) else None


def main(args: argparse.Namespace) -> int:
    try:
        options = _options(args)
    except ConfigurationError as exc:
        print(f"devstack: {exc}", file=sys.stderr)
        return 2
    configure_logging(service="devstack", level=args.log_level, json=False)
    try:
        trio.run(_run, options)
    except Exception as exc:
        failure = _startup_failure(exc)
        if failure is None:
            raise
        print(f"devstack: {failure}", file=sys.stderr)
        return 2
    return 0
