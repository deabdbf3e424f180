"""The ``huleedu`` command.

``huleedu devstack`` (what ``make run`` starts) runs the whole tier in one program on the
embedded defaults; ``gateway``, ``wsmanager``, ``aggregator`` and ``sandbox`` run one service
each as a process configured by environment (multi-process mode, on a real Kafka broker).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _devstack(args: argparse.Namespace) -> int:
    from deploy.devstack import main as devstack_main

    return devstack_main(args)


def _sandbox(_args: argparse.Namespace) -> int:
    from deploy.sandbox.__main__ import main as sandbox_main

    return sandbox_main()


def _cluster(args: argparse.Namespace) -> int:
    from deploy.cluster import main as cluster_main

    return cluster_main(args)


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
    from deploy.devstack import add_arguments as devstack_arguments

    devstack_arguments(dev)
    dev.set_defaults(func=_devstack)
    box = sub.add_parser(
        "sandbox", help="run the sandbox identity/batch/file backends (HULEEDU_SANDBOX_*)"
    )
    box.set_defaults(func=_sandbox)
    from deploy.cluster import add_arguments as cluster_arguments

    cluster = sub.add_parser(
        "local-cluster",
        help="every service as its own process on Kafka (2 gateways, 2 wsmanagers)",
    )
    cluster_arguments(cluster)
    cluster.set_defaults(func=_cluster)
    from deploy import demo, wstail

    run_demo = sub.add_parser(
        "demo", help="run the sample essays through the tier, live, and print the results"
    )
    demo.add_arguments(run_demo)
    run_demo.set_defaults(func=demo.main)
    tail = sub.add_parser("ws-tail", help="follow a teacher's live updates over the WebSocket")
    wstail.add_arguments(tail)
    tail.set_defaults(func=wstail.main)
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
