"""``huleedu ws-tail``: follow a teacher's live updates in the terminal.

Logs in at the gateway, connects to ``/v1/ws`` with a one-time ticket and prints the
``welcome``, then one line per frame (``time event_type batch_id summary`` for events;
``--json`` prints each frame's text exactly as received). Server heartbeats are answered and
not shown. ``--since EPOCH:OFFSET`` resumes after an event printed before (the exit line
prints the point to resume from); ``--batch`` / ``--category`` send a ``subscribe`` frame and
filter on the client too, since events routed before the server processed it may still come
(PROTOCOL.md §4). The connection is extended to the access token's expiry at once (see
:func:`~deploy.client.open_live_socket`), and the token is refreshed over REST and on the
socket when :data:`REFRESH_AT` of its lifetime has passed, so the tail outlives it.

:func:`run_tail` runs until ``stop`` is set (Ctrl-C in :func:`main`), ``max_events`` events
were printed, or the server closes the socket; it returns a :class:`TailResult` whose
``exit_code`` is 0 for a stop or a 1000/1001 close, 1 for any other close or a failed step.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import trio

from deploy.client import (
    ClientConfig,
    CloseInfo,
    Frame,
    GatewayClient,
    LiveSocket,
    OptionsError,
    Session,
    StepError,
    add_connection_arguments,
    clock_time,
    event_data,
    event_summary,
    open_gateway,
    open_live_socket,
    resolve_config,
)
from wsmanager.protocol import CATEGORIES, ProtocolError, parse_since

__all__ = [
    "CLEAN_CLOSES",
    "REFRESH_AT",
    "TailOptions",
    "TailResult",
    "add_arguments",
    "frame_line",
    "main",
    "run_tail",
]

#: Close codes after which the tail has done nothing wrong: a normal close, the server going away.
CLEAN_CLOSES = frozenset({1000, 1001})
#: Share of the access token's lifetime after which it is refreshed (PROTOCOL.md §2: 80 %).
REFRESH_AT = 0.8
#: Never refresh more often than this (seconds), whatever the token's lifetime.
MIN_REFRESH_S = 1.0


@dataclass(frozen=True, slots=True)
class TailOptions:
    since: str | None = None
    batch_ids: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    json_output: bool = False
    #: Stop (cleanly, exit 0) after this many events; None: run until stopped or closed.
    max_events: int | None = None


@dataclass(slots=True)
class TailResult:
    welcome: dict[str, Any] | None = None
    events: int = 0
    #: ``epoch:offset`` of the last event received: pass it as ``--since`` to resume.
    last: str | None = None
    closed: CloseInfo | None = None
    #: True when the tail ended itself (stop event, Ctrl-C, ``max_events``).
    stopped: bool = False
    error: str | None = None

    @property
    def exit_code(self) -> int:
        if self.error is not None:
            return 1
        clean = self.stopped or self.closed is None or self.closed.code in CLEAN_CLOSES
        return 0 if clean else 1

    def summary(self) -> str:
        """The exit line: how it ended, how many events, where to resume."""
        if self.error is not None:
            return self.error
        how = "stopped" if self.stopped else f"closed by the server: {self.closed}"
        resume = f"; resume with --since {self.last}" if self.last else ""
        return f"{how}; {self.events} events{resume}"


class _Stopper:
    """Where a stop lands: on the whole run until the socket is open, then only on the
    reading, so that the socket still closes cleanly (with 1000) and the session is logged
    out (the socket's reader task runs in an outer scope and must not be cancelled)."""

    def __init__(self, run_scope: trio.CancelScope) -> None:
        self.scope = run_scope
        self.requested = False

    def request(self) -> None:
        self.requested = True
        self.scope.cancel()

    @contextmanager
    def narrowed(self) -> Iterator[None]:
        with trio.CancelScope() as reading:
            outer, self.scope = self.scope, reading
            if self.requested:
                reading.cancel()
            try:
                yield
            finally:
                self.scope = outer


class _Tokens:
    """The newest session (the refresher replaces it; logout uses the latest)."""

    def __init__(self, session: Session) -> None:
        self.session = session


def _welcome_line(body: dict[str, Any]) -> str:
    line = (
        f"welcome: connection {body.get('connection_id')}, user {body.get('user_id')}, "
        f"expires {body.get('expires_at')}"
    )
    resume = body.get("resume")
    if isinstance(resume, dict):
        line += (
            f"; resumed, {resume.get('replayed')} replayed"
            if resume.get("recovered")
            else "; resume NOT recovered: events were lost, re-fetch over REST"
        )
    return line


def _names(values: Any) -> str:
    return "all" if values is None else ",".join(map(str, values)) or "none"


def frame_line(frame: Frame) -> str:
    """One compact line for a server frame."""
    body = frame.body
    if frame.type == "event":
        data = event_data(body)
        event_type = str(body.get("event_type"))
        return (
            f"{clock_time(body.get('occurred_at'))} {event_type} {body.get('batch_id') or '-'} "
            f"{event_summary(event_type, data)}"
        ).rstrip()
    if frame.type == "subscribed":
        return (
            f"subscribed: batches={_names(body.get('batch_ids'))} "
            f"categories={_names(body.get('categories'))}"
        )
    if frame.type == "error":
        return f"error: {body.get('code')}: {body.get('message')}"
    if frame.type == "refreshed":
        return f"refreshed: connection now expires {body.get('expires_at')}"
    return f"{frame.type}: {frame.text[:200]}"


def _wanted(frame: Frame, options: TailOptions) -> bool:
    if frame.type != "event":
        return True
    batch, category = frame.body.get("batch_id"), frame.body.get("category")
    if options.batch_ids and batch is not None and batch not in options.batch_ids:
        return False
    return not (options.categories and category not in options.categories)


async def _print_frames(
    live: LiveSocket, options: TailOptions, result: TailResult, out: Callable[[str], None]
) -> None:
    while (frame := await live.receive()) is not None:
        if not _wanted(frame, options):
            continue
        if frame.type == "event":
            result.events += 1
            result.last = f"{frame.body.get('epoch')}:{frame.body.get('offset')}"
        out(frame.text if options.json_output else frame_line(frame))
        if options.max_events is not None and result.events >= options.max_events:
            result.stopped = True
            return


async def _keep_fresh(
    gateway: GatewayClient,
    tokens: _Tokens,
    live: LiveSocket,
    note: Callable[[str], None],
    refresh_at: float,
) -> None:
    """Refresh the token before it expires and hand it to the socket; never raises a step
    error (without a refresh the server closes with 4002 at expiry, which the tail reports)."""
    while True:
        await trio.sleep(max(tokens.session.expires_in * refresh_at, MIN_REFRESH_S))
        try:
            tokens.session = await gateway.refresh(tokens.session)
        except StepError as exc:
            note(f"ws-tail: {exc}; the connection closes when the token expires")
            return
        await live.send({"type": "refresh", "token": tokens.session.access_token})


@dataclass(frozen=True, slots=True)
class _Context:
    """What one tail run works with besides the socket."""

    config: ClientConfig
    options: TailOptions
    result: TailResult
    out: Callable[[str], None]
    note: Callable[[str], None]
    stopper: _Stopper
    refresh_at: float


async def _follow(live: LiveSocket, gateway: GatewayClient, tokens: _Tokens, run: _Context) -> None:
    options = run.options
    run.result.welcome = live.welcome.body
    run.out(live.welcome.text if options.json_output else _welcome_line(live.welcome.body))
    with run.stopper.narrowed():
        if options.batch_ids or options.categories:
            await live.send(
                {
                    "type": "subscribe",
                    "batch_ids": list(options.batch_ids) or None,
                    "categories": list(options.categories) or None,
                }
            )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_keep_fresh, gateway, tokens, live, run.note, run.refresh_at)
            await _print_frames(live, options, run.result, run.out)
            nursery.cancel_scope.cancel()


async def _session(run: _Context) -> None:
    config = run.config
    async with open_gateway(config) as gateway:
        tokens = _Tokens(await gateway.login(config.email, config.password))
        try:
            ticket = await gateway.ws_ticket(tokens.session)
            live: LiveSocket | None = None
            try:
                async with open_live_socket(config, ticket, since=run.options.since) as live:
                    await _follow(live, gateway, tokens, run)
            finally:
                # After the socket's exit, so a tail that stopped itself reports its own close.
                if live is not None:
                    run.result.closed = live.closed
        finally:
            await gateway.logout_quietly(tokens.session)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


async def run_tail(
    config: ClientConfig,
    options: TailOptions = TailOptions(),
    *,
    out: Callable[[str], None] = print,
    note: Callable[[str], None] = _stderr,
    stop: trio.Event | None = None,
    refresh_at: float = REFRESH_AT,
) -> TailResult:
    """Follow the live updates of ``config``'s user; ``out`` gets one line per frame,
    ``note`` the warnings. Setting ``stop`` ends the tail cleanly (the socket is closed with
    1000, the session logged out). Never raises for a failed step: see ``result.error``."""
    result = TailResult()
    body_error: BaseException | None = None
    with trio.CancelScope() as scope:
        run = _Context(config, options, result, out, note, _Stopper(scope), refresh_at)
        async with trio.open_nursery() as nursery:
            if stop is not None:
                nursery.start_soon(_stop_on, stop, run)
            try:
                await _session(run)
            except StepError as exc:
                result.error = str(exc)
            except trio.Cancelled:
                raise  # a stop: ``scope`` absorbs it
            except BaseException as exc:  # re-raised below, never inside an ExceptionGroup
                body_error = exc
            nursery.cancel_scope.cancel()
    if body_error is not None:
        raise body_error
    return result


async def _stop_on(stop: trio.Event, run: _Context) -> None:
    await stop.wait()
    run.result.stopped = True
    run.stopper.request()


# -- command line -------------------------------------------------------------------------------


def _since(text: str) -> str:
    try:
        return str(parse_since(text))
    except ProtocolError as exc:
        raise argparse.ArgumentTypeError(exc.reason) from None


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number: {text!r}")
    return int(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``huleedu ws-tail``."""
    add_connection_arguments(parser)
    parser.add_argument(
        "--since", type=_since, metavar="EPOCH:OFFSET", help="resume after this event"
    )
    parser.add_argument(
        "--batch", action="append", default=[], metavar="ID", help="only this batch (repeatable)"
    )
    parser.add_argument(
        "--category",
        action="append",
        default=[],
        choices=sorted(CATEGORIES),
        help="only this category (repeatable)",
    )
    parser.add_argument("--json", action="store_true", help="print the raw frames (JSON lines)")
    parser.add_argument("--count", type=_count, metavar="N", help="stop after N events")


async def _until_interrupted(config: ClientConfig, options: TailOptions) -> TailResult:
    stop = trio.Event()

    async def watch_sigint() -> None:
        # Kept open until the tail has ended: a second Ctrl-C during the (bounded) clean-up
        # is absorbed here instead of raising KeyboardInterrupt in the middle of it.
        with trio.open_signal_receiver(signal.SIGINT) as signals:
            async for _ in signals:
                stop.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_sigint)
        result = await run_tail(config, options, out=partial(print, flush=True), stop=stop)
        nursery.cancel_scope.cancel()
    return result


def main(args: argparse.Namespace) -> int:
    """Run ``huleedu ws-tail``: 0 after Ctrl-C, ``--count`` or a 1000/1001 close; 1 after a
    failed step (login, ticket, connect) or any other close code; 2 for unusable options."""
    try:
        config = resolve_config(args, os.environ)
    except OptionsError as exc:
        print(f"ws-tail: {exc}", file=sys.stderr)
        return 2
    options = TailOptions(
        since=args.since,
        batch_ids=tuple(args.batch),
        categories=tuple(args.category),
        json_output=args.json,
        max_events=args.count,
    )
    result = trio.run(_until_interrupted, config, options)
    print(f"ws-tail: {result.summary()}", file=sys.stderr)
    return result.exit_code
