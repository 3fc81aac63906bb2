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
    demo.add_argument("--scenario", default=None, help="scenario TOML (default: the demo session)")
    demo.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from devicegw.cli.demo import run_demo

    # The live view shows what matters; only errors go to the log.
    configure_logging(args.log_level or "ERROR", "text")
    try:
        return asyncio.run(run_demo(time_scale=args.time_scale, scenario=args.scenario))
    except KeyboardInterrupt:
        return 130
