"""``huleedu demo`` and ``huleedu ws-tail`` against a real tier: the gateway (TLS, sandbox
identity), the sandbox batch/file backends, the real aggregator and the WebSocket manager, on
one memory bus, everything over real sockets.

The demo logs in, connects live updates, registers, uploads, runs spellcheck + CJ and reads
the results; its failures name the step. The tail prints what the teacher's stream carries,
resumes from an ``epoch:offset``, follows a subscription, refreshes its token, and ends
cleanly on a stop, a count or the server going away.
"""

from __future__ import annotations

import datetime as dt
import json
import socket
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import trio

from deploy.client import DEMO_PASSWORD, ClientConfig, open_gateway, open_live_socket
from deploy.demo import DemoResult, run_demo
from deploy.samples import ESSAYS_DIR
from deploy.wstail import TailOptions, TailResult, run_tail
from tests.integration.gateway.conftest import (  # noqa: F401  (fixtures used by name)
    Gateway,
    Stack,
    identity_port,
    stack,
    start_gateway,
)
from tests.integration.wsmanager.conftest import Ws, WsFactory, start_wsmanager  # noqa: F401

SAMPLES = sorted(p.name for p in ESSAYS_DIR.glob("*.txt"))
#: The order a batch's statuses may take.
LIFECYCLE = ["registered", "awaiting_content", "ready", "processing", "completed_successfully"]


@dataclass
class Tier:
    stack: Stack
    ws: Ws
    config: ClientConfig


def config_for(gateway: Gateway, ws: Ws) -> ClientConfig:
    assert gateway.addresses.ca_file == ws.addresses.ca_file, "one dev CA for both listeners"
    assert gateway.addresses.ca_file is not None
    return ClientConfig(
        gateway_url=gateway.url,
        ws_url=f"{ws.addresses.url}/v1/ws",
        ca_file=Path(gateway.addresses.ca_file),
    )


@pytest.fixture
async def tier(stack: Stack, start_wsmanager: WsFactory) -> Tier:  # noqa: F811
    ws: Ws = await start_wsmanager(gateway=stack.gateway, bus=stack.bus)
    return Tier(stack, ws, config_for(stack.gateway, ws))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Lines:
    """An ``out`` callback: keeps the lines; :meth:`wait_for` waits for matching ones."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._waits: list[tuple[str, int, trio.Event]] = []

    def count(self, wanted: str) -> int:
        return sum(wanted in line for line in self.lines)

    def __call__(self, line: str) -> None:
        self.lines.append(line)
        for wanted, times, event in self._waits:
            if self.count(wanted) >= times:
                event.set()

    async def wait_for(self, wanted: str, times: int = 1, within_s: float = 20) -> None:
        """Until ``times`` lines contain ``wanted``."""
        event = trio.Event()
        self._waits.append((wanted, times, event))
        if self.count(wanted) >= times:
            event.set()
        with trio.fail_after(within_s):
            await event.wait()


async def demo(config: ClientConfig, **kwargs: Any) -> tuple[DemoResult, Lines]:
    out = Lines()
    result = await run_demo(config, out=out, timeout_s=30, **kwargs)
    return result, out


async def test_the_demo_runs_the_sample_batch_to_completion(tier: Tier) -> None:
    result, out = await demo(tier.config)
    assert result.error is None, result.error
    assert result.ok and result.exit_code == 0
    assert result.status == "completed_successfully"
    assert result.batch_id

    # One row per sample essay, ranked 1..n by CJ, each spellchecked.
    assert sorted(r.filename for r in result.rows) == SAMPLES
    assert [r.cj_rank for r in result.rows] == list(range(1, len(SAMPLES) + 1))
    assert {r.spellcheck for r in result.rows} == {"succeeded"}
    assert all(r.corrections is not None and r.cj_grade for r in result.rows)

    # The live events came in stream order, ending with the results.
    progress = result.progress
    offsets = [p.offset for p in progress]
    assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets), offsets
    kinds = [p.event_type for p in progress]
    assert kinds.count("file_uploaded") == len(SAMPLES), kinds
    assert kinds[-1] == "batch_results_ready", kinds
    statuses = [p.status for p in progress if p.event_type == "batch_status_changed"]
    assert "processing" in statuses and statuses[-1] == "completed_successfully", statuses
    steps = [LIFECYCLE.index(s) for s in statuses if s is not None]
    assert steps == sorted(steps), f"statuses out of lifecycle order: {statuses}"

    # Every progress line was printed, then the table: a header and one line per essay.
    assert all(p.line in out.lines for p in progress)
    header = next(i for i, line in enumerate(out.lines) if line.startswith("rank"))
    table = out.lines[header + 1 :]
    assert len(table) == len(SAMPLES) and all(any(n in row for n in SAMPLES) for row in table)
    text = "\n".join(out.lines)
    assert DEMO_PASSWORD not in text and "eyJ" not in text, "no secret is ever printed"

    async with tier.stack.gateway.client() as client:
        await tier.stack.gateway.login(client)  # the demo's logout left the account usable


async def test_a_wrong_password_fails_at_login(tier: Tier) -> None:
    result, out = await demo(replace(tier.config, password="not the password"))
    assert not result.ok and result.exit_code == 1
    assert result.error is not None and result.error.startswith("login failed: 401 "), result.error
    assert result.batch_id is None and result.progress == []
    assert "not the password" not in "\n".join([*out.lines, result.error])


async def test_an_unreachable_gateway_is_named_with_its_url(tier: Tier) -> None:
    url = f"https://127.0.0.1:{closed_port()}"
    result, _ = await demo(replace(tier.config, gateway_url=url))
    assert result.exit_code == 1
    assert result.error == f"login failed: cannot reach {url}: connection refused"


async def test_an_unreachable_wsmanager_fails_before_any_batch(tier: Tier) -> None:
    url = f"wss://127.0.0.1:{closed_port()}/v1/ws"
    result, _ = await demo(replace(tier.config, ws_url=url))
    assert result.error == f"ws connect failed: cannot reach {url}: connection refused"
    assert result.batch_id is None


async def test_an_untrusted_certificate_says_how_to_trust_it(tier: Tier) -> None:
    result, _ = await demo(replace(tier.config, ca_file=None))
    assert result.error is not None
    assert result.error.startswith(f"login failed: cannot reach {tier.config.gateway_url}: ")
    assert "certificate not trusted" in result.error and "--ca" in result.error


async def test_an_empty_essay_folder_fails_before_login(tier: Tier, tmp_path: Path) -> None:
    result, out = await demo(tier.config, essays_dir=tmp_path)
    assert result.error == f"essays failed: no .txt files in {tmp_path}"
    assert out.lines == []


async def test_the_demo_deadline_names_the_step_it_stopped_in(tier: Tier) -> None:
    # A listener that never answers (the kernel completes the TCP handshakes): the login
    # request waits for a reply until the deadline. Plain HTTP, because httpcore 1.0.9 does
    # not close its socket when a TLS handshake is cancelled (its trio backend catches
    # ``Exception`` there, not ``trio.Cancelled``), which would leak a socket.
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen()
    with listener:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        out = Lines()
        result = await run_demo(replace(tier.config, gateway_url=url), out=out, timeout_s=0.5)
    assert result.error == "login failed: timed out (0.5 s for the whole demo)"


@dataclass
class Tail:
    """A tail running in the test's nursery."""

    out: Lines
    stop: trio.Event
    finished: trio.Event
    result: TailResult | None = None

    async def ended(self, within_s: float = 10) -> TailResult:
        with trio.fail_after(within_s):
            await self.finished.wait()
        assert self.result is not None
        return self.result


async def tail_in(
    nursery: trio.Nursery, config: ClientConfig, options: TailOptions | None = None, **kw: Any
) -> Tail:
    """Start a tail and wait for its welcome line."""
    tail = Tail(Lines(), trio.Event(), trio.Event())
    options = options or TailOptions()

    async def run() -> None:
        try:
            tail.result = await run_tail(
                config, options, out=tail.out, note=tail.out, stop=tail.stop, **kw
            )
        finally:
            tail.finished.set()

    nursery.start_soon(run)
    await tail.out.wait_for("welcome")
    return tail


async def test_ws_tail_prints_the_batch_events_and_stops_cleanly(
    tier: Tier, nursery: trio.Nursery
) -> None:
    running = await tail_in(nursery, tier.config)
    out = running.out
    welcome = out.lines[0]
    assert welcome.startswith("welcome: connection ") and "user " in welcome
    # A ticket connection lives as long as the access token it came from (15 min), not 30 s.
    expires = dt.datetime.fromisoformat(welcome.rsplit(" ", 1)[1])
    assert expires > dt.datetime.now(dt.UTC) + dt.timedelta(minutes=14), welcome

    result, _ = await demo(tier.config)
    assert result.ok, result.error
    await out.wait_for(f"batch_results_ready {result.batch_id}")
    running.stop.set()
    tail = await running.ended()
    assert tail.error is None and tail.stopped and tail.exit_code == 0
    assert tail.closed is not None and tail.closed.code == 1000
    mine = [line.split() for line in out.lines[1:] if f" {result.batch_id} " in line]
    assert [fields[1] for fields in mine] == [p.event_type for p in result.progress]
    assert tail.events >= len(result.progress)
    last = result.progress[-1]
    assert tail.last == f"{last.epoch}:{last.offset}"
    assert "stopped; " in tail.summary() and f"--since {tail.last}" in tail.summary()


async def test_ws_tail_resumes_a_subscribed_batch_as_raw_json(tier: Tier) -> None:
    result, _ = await demo(tier.config)
    assert result.ok, result.error
    first, rest = result.progress[0], result.progress[1:]
    options = TailOptions(
        since=f"{first.epoch}:{first.offset}",
        batch_ids=(result.batch_id or "",),
        categories=("batch_progress", "processing_results"),
        json_output=True,
        max_events=len([p for p in rest if p.event_type != "file_uploaded"]),
    )
    out = Lines()
    with trio.fail_after(10):
        tail = await run_tail(tier.config, options, out=out, note=out)
    assert tail.error is None and tail.exit_code == 0 and tail.stopped
    frames = [json.loads(line) for line in out.lines]
    assert frames[0]["type"] == "welcome"
    assert frames[0]["resume"]["recovered"] is True
    events = [f for f in frames if f["type"] == "event"]
    wanted = [p for p in rest if p.event_type != "file_uploaded"]
    assert [e["offset"] for e in events] == [p.offset for p in wanted]
    assert {e["batch_id"] for e in events} == {result.batch_id}
    # The replay follows welcome at once, so the tail may reach its count before the
    # server's `subscribed` answer; when that came, it names the batch.
    for ack in (f for f in frames if f["type"] == "subscribed"):
        assert ack["batch_ids"] == [result.batch_id]


async def test_ws_tail_reports_the_server_going_away_as_a_clean_end(
    tier: Tier, nursery: trio.Nursery
) -> None:
    running = await tail_in(nursery, tier.config)
    tier.ws.shutdown.set()
    tail = await running.ended()
    assert tail.closed is not None and tail.closed.code == 1001, tail.closed
    assert not tail.stopped and tail.exit_code == 0
    assert tail.summary().startswith("closed by the server: 1001 ")


async def test_ws_tail_with_a_wrong_password_fails_at_login(tier: Tier) -> None:
    out = Lines()
    with trio.fail_after(10):
        tail = await run_tail(replace(tier.config, password="nope"), out=out, note=out)
    assert tail.exit_code == 1 and tail.welcome is None
    assert tail.error is not None and tail.error.startswith("login failed: 401 ")
    assert out.lines == []


@pytest.mark.slow
async def test_ws_tail_refreshes_its_token_on_the_socket(
    stack: Stack,  # noqa: F811
    start_wsmanager: WsFactory,  # noqa: F811
    nursery: trio.Nursery,
) -> None:
    gateway = await stack.another_gateway(access_ttl_s=30)
    ws: Ws = await start_wsmanager(gateway=gateway, bus=stack.bus)
    # 30 s tokens, refreshed after 3 % of their life: the floor of 1 s applies; each
    # `refreshed` answers a token refreshed over REST and sent on the socket.
    running = await tail_in(nursery, config_for(gateway, ws), refresh_at=0.03)
    await running.out.wait_for("refreshed: connection now expires", times=2, within_s=10)
    running.stop.set()
    tail = await running.ended()
    assert tail.exit_code == 0, tail.summary()
    problems = [line for line in running.out.lines if line.startswith(("error:", "ws-tail:"))]
    assert not problems, running.out.lines


async def test_server_heartbeats_are_answered_so_the_socket_stays_open(
    stack: Stack,  # noqa: F811
    start_wsmanager: WsFactory,  # noqa: F811
    nursery: trio.Nursery,
) -> None:
    # A ping every 50 ms; a client that did not answer would be closed (4010) 200 ms after one.
    ws: Ws = await start_wsmanager(
        gateway=stack.gateway, bus=stack.bus, ping_interval_s=0.05, pong_timeout_s=0.2
    )
    config = config_for(stack.gateway, ws)
    async with open_gateway(config) as gateway:
        session = await gateway.login(config.email, config.password)
        ticket = await gateway.ws_ticket(session)
        async with open_live_socket(config, ticket) as live:
            frames = []

            async def read() -> None:
                while (frame := await live.receive()) is not None:
                    frames.append(frame.type)

            nursery.start_soon(read)
            with trio.fail_after(10):
                while live.pings_answered < 10 and live.closed is None:
                    await trio.sleep(0.01)
            assert live.closed is None and live.pings_answered >= 10
            assert frames == [], "pings are answered, not handed to the caller"
        assert live.closed is not None and live.closed.code == 1000
        await gateway.logout_quietly(session)
