"""The ``huleedu`` command.

Sub-commands are added as the services land; each says plainly what it does. Until the dev
stack exists, ``huleedu devstack`` (what ``make run`` starts) says so and exits non-zero rather
than pretending to run something.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _devstack(_args: argparse.Namespace) -> int:
    print(
        "huleedu devstack: the all-in-one dev stack (gateway, wsmanager, aggregator and the\n"
        "sandbox backends in one Trio program) is not built yet.\n"
        "What works today:\n"
        "  make test          the whole suite against a real Kafka broker\n"
        "  make kafka-start   a single-node Apache Kafka broker on 127.0.0.1:19092\n"
        "  make perf          the benchmarks (results in perf/results/)\n"
        "  make proto         regenerate common/contracts from proto/",
        file=sys.stderr,
    )
    return 2


def _aggregator(_args: argparse.Namespace) -> int:
    from aggregator.__main__ import main as aggregator_main

    return aggregator_main()


def _gateway(_args: argparse.Namespace) -> int:
    from gateway.__main__ import main as gateway_main

    return gateway_main()


def _wsmanager(_args: argparse.Namespace) -> int:
    from wsmanager.__main__ import main as wsmanager_main

    return wsmanager_main()


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="huleedu", description="HuleEdu interface tier")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    dev = sub.add_parser("devstack", help="run the whole tier on embedded defaults")
    dev.set_defaults(func=_devstack)
    agg = sub.add_parser("aggregator", help="run the result aggregator (HULEEDU_AGGREGATOR_*)")
    agg.set_defaults(func=_aggregator)
    gw = sub.add_parser("gateway", help="run the HTTPS API gateway (HULEEDU_GATEWAY_*)")
    gw.set_defaults(func=_gateway)
    ws = sub.add_parser("wsmanager", help="run the WSS WebSocket manager (HULEEDU_WSMANAGER_*)")
    ws.set_defaults(func=_wsmanager)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
