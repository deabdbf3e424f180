"""The local cluster: every service as its own process on a real Kafka broker.

``huleedu local-cluster start`` (also ``deploy/local-cluster start``) starts, in order, the
broker (``deploy/kafka/broker.sh``, unless ``--kafka`` names one), the sandbox backends, the
aggregator, two gateways and two wsmanagers, each a ``huleedu <service>`` process configured
only by environment, the way they are deployed. Each one's output goes to
``<state>/logs/<name>.log``; the start waits for every process's ready line (and for the
wsmanagers' ``/readyz``), then writes ``<state>/cluster.json`` and prints the addresses.
``stop`` sends SIGTERM to each in reverse order (edges first) and waits for them, then stops
the broker it started.

The dev CA, server certificate and the gateways' signing key are made once before any process
starts, so the processes share them (both gateways sign with the same key and serve the same
JWKS; the sessions are in one SQLite file both gateways open).

:class:`Cluster` is also what the end-to-end tests drive: they stop and restart single
processes (on the same ports) while a batch runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess  # nosec B404
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from common.tls import ensure_dev_certificates
from gateway.keys import load_signing_keys

__all__ = [
    "Cluster",
    "ClusterPorts",
    "ProcessFailed",
    "Service",
    "add_arguments",
    "free_ports",
    "main",
]

BROKER_SCRIPT = Path(__file__).resolve().parent / "kafka" / "broker.sh"
DEFAULT_STATE_DIR = Path(".state/cluster")
STATE_FILE = "cluster.json"
#: Seconds a process has to print its ready line.
READY_TIMEOUT_S = 60.0
#: Seconds a process has to exit after SIGTERM before it is killed.
STOP_TIMEOUT_S = 30.0


class ProcessFailed(RuntimeError):
    """A cluster process did not start, or did not stop cleanly."""


@dataclass(frozen=True, slots=True)
class ClusterPorts:
    identity: int = 50051
    sandbox: int = 50071
    aggregator: int = 50061
    aggregator_ops: int = 9101
    gateways: tuple[int, ...] = (8443, 8453)
    gateway_ops: tuple[int, ...] = (9100, 9110)
    wsmanagers: tuple[int, ...] = (8444, 8454)
    wsmanager_ops: tuple[int, ...] = (9102, 9112)

    @classmethod
    def free(cls, gateways: int = 2, wsmanagers: int = 2) -> ClusterPorts:
        """Ports nothing listens on right now (for tests running beside other listeners)."""
        ports = iter(free_ports(4 + 2 * gateways + 2 * wsmanagers))
        return cls(
            identity=next(ports),
            sandbox=next(ports),
            aggregator=next(ports),
            aggregator_ops=next(ports),
            gateways=tuple(next(ports) for _ in range(gateways)),
            gateway_ops=tuple(next(ports) for _ in range(gateways)),
            wsmanagers=tuple(next(ports) for _ in range(wsmanagers)),
            wsmanager_ops=tuple(next(ports) for _ in range(wsmanagers)),
        )


def free_ports(count: int) -> list[int]:
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


@dataclass
class Service:
    """One process of the cluster: how it is started, and the running one (if any)."""

    name: str
    kind: str  # the ``huleedu`` sub-command
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    ready: dict[str, Any] = field(default_factory=dict)
    ops_url: str = ""

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def command(self) -> list[str]:
        return [sys.executable, "-m", "deploy.cli", self.kind]


@dataclass
class Cluster:
    """The processes of one local cluster (see the module docstring)."""

    state_dir: Path
    kafka: str
    ports: ClusterPorts = field(default_factory=ClusterPorts)
    #: Seconds the pipeline simulator takes per essay and per phase.
    essay_delay_s: float = 0.25
    phase_delay_s: float = 0.5
    log_level: str = "info"
    #: Whether ``stop`` should stop the broker too (the command started it).
    own_broker: bool = False
    services: dict[str, Service] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.state_dir = self.state_dir.resolve()
        for service in self._layout():
            self.services[service.name] = service

    # -- layout ------------------------------------------------------------------------

    @property
    def ca_file(self) -> Path:
        return self.state_dir / "tls" / "ca.pem"

    def gateway_url(self, index: int = 0) -> str:
        return f"https://127.0.0.1:{self.ports.gateways[index]}"

    def ws_url(self, index: int = 0) -> str:
        return f"wss://127.0.0.1:{self.ports.wsmanagers[index]}/v1/ws"

    def _common(self, prefix: str, client_id: str) -> dict[str, str]:
        return {
            f"{prefix}LOG_JSON": "true",
            f"{prefix}LOG_LEVEL": self.log_level,
            f"{prefix}KAFKA__BOOTSTRAP_SERVERS": self.kafka,
            f"{prefix}KAFKA__CLIENT_ID": client_id,
            # Writers wait out a broker outage of up to two minutes instead of failing.
            f"{prefix}KAFKA__DELIVERY_TIMEOUT_MS": "120000",
        }

    def _layout(self) -> Iterator[Service]:
        ports, state = self.ports, self.state_dir
        logs = state / "logs"
        sandbox = "HULEEDU_SANDBOX_"
        yield Service(
            "sandbox",
            "sandbox",
            {
                **self._common(sandbox, "sandbox"),
                f"{sandbox}GRPC_PORT": str(ports.sandbox),
                f"{sandbox}IDENTITY_PORT": str(ports.identity),
                f"{sandbox}STATE_DIR": str(state / "sandbox"),
                f"{sandbox}PIPELINE__ESSAY_DELAY_S": str(self.essay_delay_s),
                f"{sandbox}PIPELINE__PHASE_DELAY_S": str(self.phase_delay_s),
            },
            logs / "sandbox.log",
        )
        agg = "HULEEDU_AGGREGATOR_"
        yield Service(
            "aggregator",
            "aggregator",
            {
                **self._common(agg, "aggregator"),
                f"{agg}GRPC_PORT": str(ports.aggregator),
                f"{agg}OPS_PORT": str(ports.aggregator_ops),
                f"{agg}DB_PATH": str(state / "aggregator.db"),
            },
            logs / "aggregator.log",
        )
        gw = "HULEEDU_GATEWAY_"
        for index, (port, ops) in enumerate(zip(ports.gateways, ports.gateway_ops, strict=True)):
            name = f"gateway-{index + 1}"
            yield Service(
                name,
                "gateway",
                {
                    **self._common(gw, name),
                    f"{gw}PORT": str(port),
                    f"{gw}OPS_PORT": str(ops),
                    f"{gw}STATE_DIR": str(state),
                    f"{gw}IDENTITY_TARGET": f"127.0.0.1:{ports.identity}",
                    f"{gw}BATCH_BACKEND__TARGET": f"127.0.0.1:{ports.sandbox}",
                    f"{gw}FILE_BACKEND__TARGET": f"127.0.0.1:{ports.sandbox}",
                    f"{gw}RESULT_BACKEND__TARGET": f"127.0.0.1:{ports.aggregator}",
                },
                logs / f"{name}.log",
            )
        ws = "HULEEDU_WSMANAGER_"
        for index, (port, ops) in enumerate(
            zip(ports.wsmanagers, ports.wsmanager_ops, strict=True)
        ):
            name = f"wsmanager-{index + 1}"
            # Each wsmanager reads the JWKS of "its" gateway (any gateway serves the same keys).
            jwks_gateway = self.gateway_url(index % len(ports.gateways))
            yield Service(
                name,
                "wsmanager",
                {
                    **self._common(ws, name),
                    f"{ws}PORT": str(port),
                    f"{ws}OPS_PORT": str(ops),
                    f"{ws}STATE_DIR": str(state),
                    f"{ws}JWKS_URL": f"{jwks_gateway}/.well-known/jwks.json",
                    f"{ws}JWKS_CA_FILE": str(self.ca_file),
                },
                logs / f"{name}.log",
            )

    # -- running -----------------------------------------------------------------------

    def prepare(self) -> None:
        """Make the shared dev certificates and signing key before any process runs."""
        (self.state_dir / "logs").mkdir(parents=True, exist_ok=True)
        ensure_dev_certificates(self.state_dir)
        load_signing_keys(self.state_dir / "gateway-keys")

    def start_all(self) -> None:
        self.prepare()
        try:
            for name in self.services:
                self.start(name)
        except BaseException:
            self.stop_all()
            raise
        self.write_state()

    def start(self, name: str) -> Service:
        """Start one process and wait until it is ready (on the same ports as before)."""
        service = self.services[name]
        if service.running:
            raise ProcessFailed(f"{name} is already running")
        service.log_path.parent.mkdir(parents=True, exist_ok=True)
        offset = service.log_path.stat().st_size if service.log_path.exists() else 0
        env = {**_inherited_env(), **service.env}
        with service.log_path.open("ab") as log:
            service.process = subprocess.Popen(  # noqa: S603  # nosec B603
                service.command(),
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        service.ready = self._wait_ready(service, offset)
        service.ops_url = str(service.ready.get("ops_url", ""))
        if service.kind == "wsmanager":
            self._wait_readyz(service)
        return service

    def _wait_ready(self, service: Service, offset: int) -> dict[str, Any]:
        assert service.process is not None
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            for line in _read_from(service.log_path, offset).splitlines():
                if line.startswith('{"ready"'):
                    ready: dict[str, Any] = json.loads(line)
                    return ready
            if service.process.poll() is not None:
                raise ProcessFailed(
                    f"{service.name} exited with {service.process.returncode} during start-up; "
                    f"its log ({service.log_path}) ends:\n{_tail(service.log_path, offset)}"
                )
            time.sleep(0.05)
        self.stop(service.name)
        raise ProcessFailed(f"{service.name} was not ready within {READY_TIMEOUT_S:.0f} s")

    def _wait_readyz(self, service: Service) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{service.ops_url}/readyz", timeout=2).status_code == 200:
                    return
            time.sleep(0.1)
        raise ProcessFailed(f"{service.name} never became ready (/readyz)")

    def stop(self, name: str, sig: int = signal.SIGTERM) -> int | None:
        """Signal one process and wait for it to exit; its exit code (None: not running)."""
        service = self.services[name]
        process = service.process
        if process is None or process.poll() is not None:
            return None if process is None else process.returncode
        process.send_signal(sig)
        try:
            return process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise ProcessFailed(f"{name} did not exit within {STOP_TIMEOUT_S:.0f} s") from None

    def stop_all(self) -> dict[str, int | None]:
        """SIGTERM every process, edges first; their exit codes."""
        codes: dict[str, int | None] = {}
        for name in reversed(list(self.services)):
            try:
                codes[name] = self.stop(name)
            except ProcessFailed:
                codes[name] = -signal.SIGKILL
        (self.state_dir / STATE_FILE).unlink(missing_ok=True)
        return codes

    def write_state(self) -> None:
        state = {
            "kafka": self.kafka,
            "own_broker": self.own_broker,
            "ca_file": str(self.ca_file),
            "gateway_urls": [self.gateway_url(i) for i in range(len(self.ports.gateways))],
            "ws_urls": [self.ws_url(i) for i in range(len(self.ports.wsmanagers))],
            "processes": {
                name: {"pid": s.process.pid if s.process else None, "log": str(s.log_path)}
                for name, s in self.services.items()
            },
        }
        (self.state_dir / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
        # What ``huleedu demo`` / ``ws-tail`` read by default from a state folder.
        discovery = {
            "gateway_url": self.gateway_url(),
            "ws_url": self.ws_url(),
            "ca_file": str(self.ca_file),
        }
        (self.state_dir / "devstack.json").write_text(json.dumps(discovery, indent=2) + "\n")


def _inherited_env() -> dict[str, str]:
    """The environment without any ``HULEEDU_*`` the caller happens to have set."""
    return {k: v for k, v in os.environ.items() if not k.startswith("HULEEDU_")}


def _read_from(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            return handle.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


def _tail(path: Path, offset: int, lines: int = 20) -> str:
    return "\n".join(_read_from(path, offset).splitlines()[-lines:])


# -- the command ---------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    parser.add_argument(
        "--kafka",
        metavar="BOOTSTRAP",
        default="",
        help="use this broker (default: start deploy/kafka/broker.sh on KAFKA_PORT, 19092)",
    )


def _broker(action: str) -> None:
    subprocess.run(  # noqa: S603  # nosec B603 B607
        ["bash", str(BROKER_SCRIPT), action],  # noqa: S607
        check=True,
    )


def _start(args: argparse.Namespace) -> int:
    own_broker = not args.kafka
    kafka = args.kafka or f"127.0.0.1:{os.environ.get('KAFKA_PORT', '19092')}"
    if own_broker:
        _broker("start")
    cluster = Cluster(args.state_dir, kafka, own_broker=own_broker)
    try:
        cluster.start_all()
    except ProcessFailed as exc:
        print(f"local-cluster: {exc}", file=sys.stderr)
        if own_broker:
            _broker("stop")
        return 1
    state = json.loads((cluster.state_dir / STATE_FILE).read_text())
    print(f"local cluster running on Kafka {kafka} (state and logs in {cluster.state_dir})")
    for name, info in state["processes"].items():
        print(f"  {name:<12} pid {info['pid']:<8} log {info['log']}")
    print("  gateways    " + "  ".join(state["gateway_urls"]))
    print("  websockets  " + "  ".join(state["ws_urls"]))
    print(f"  dev CA      {cluster.ca_file}")
    print(f"try: .venv/bin/huleedu demo --stack {cluster.state_dir / 'devstack.json'}")
    print("stop: deploy/local-cluster stop")
    return 0


def _stop(args: argparse.Namespace) -> int:
    path = args.state_dir.resolve() / STATE_FILE
    if not path.is_file():
        print(f"local-cluster: no cluster recorded in {path}", file=sys.stderr)
        return 1
    state = json.loads(path.read_text())
    failed = False
    for name, info in reversed(list(state["processes"].items())):
        pid = info["pid"]
        if pid is None or not _signal(pid, signal.SIGTERM):
            continue
        if not _wait_gone(pid, STOP_TIMEOUT_S):
            print(f"local-cluster: {name} (pid {pid}) ignored SIGTERM; killing it", file=sys.stderr)
            _signal(pid, signal.SIGKILL)
            failed = True
        print(f"stopped {name}")
    path.unlink()
    if state.get("own_broker"):
        _broker("stop")
    return 1 if failed else 0


def _status(args: argparse.Namespace) -> int:
    path = args.state_dir.resolve() / STATE_FILE
    if not path.is_file():
        print("no local cluster recorded")
        return 1
    state = json.loads(path.read_text())
    alive = 0
    for name, info in state["processes"].items():
        up = info["pid"] is not None and _signal(info["pid"], 0)
        alive += up
        print(f"  {name:<12} {'running' if up else 'gone':<8} pid {info['pid']}")
    return 0 if alive == len(state["processes"]) else 1


def _signal(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def _wait_gone(pid: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if not _signal(pid, 0):
            return True
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.1)
    return False


def main(args: argparse.Namespace) -> int:
    actions = {"start": _start, "stop": _stop, "status": _status}
    return actions[args.action](args)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="local-cluster")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
