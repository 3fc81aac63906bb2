"""``devicegw demo``: broker, simulated devices and the gateway, live in the terminal."""

from __future__ import annotations

import argparse
import asyncio

from devicegw.cli.common import SubParsers
from devicegw.runtime.logging_setup import configure_logging


def register(sub: SubParsers) -> None:
    demo = sub.add_parser(
        "demo", help="broker + simulated nebulizer + gateway, live in the terminal"
    )
    demo.add_argument("--time-scale", type=float, default=8.0)
    demo.add_argument(
        "--scenario", default=None, help="one bed with this scenario TOML (default: three beds)"
    )
    demo.add_argument(
        "--http-port",
        type=int,
        default=8080,
        help="the ward dashboard's port on 127.0.0.1 (busy: any free port; 0: any)",
    )
    demo.add_argument("--no-http", action="store_true", help="no dashboard, terminal only")
    demo.add_argument(
        "--hold", action="store_true", help="after the doses, keep the dashboard up until Ctrl-C"
    )
    demo.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from devicegw.cli.demo import run_demo

    # The live view shows what matters; only errors go to the log.
    configure_logging(args.log_level or "ERROR", "text")
    try:
        return asyncio.run(
            run_demo(
                time_scale=args.time_scale,
                scenario=args.scenario,
                http_port=None if args.no_http else args.http_port,
                hold=args.hold,
            )
        )
    except KeyboardInterrupt:
        return 130
