"""``devicegw simulate``: simulated devices on pseudo-terminals or BLE, or recorded
in virtual time (``--record``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from devicegw.cli.common import EXIT_CONFIG, SubParsers, make_clock, run_until_signalled
from devicegw.runtime.logging_setup import configure_logging


def register(sub: SubParsers) -> None:
    from devicegw.cli.replay import add_simulate_record_args

    sim = sub.add_parser("simulate", help="run simulated devices on pseudo-terminals")
    sim.add_argument(
        "--scenario", action="append", required=True, help="scenario TOML (repeatable)"
    )
    sim.add_argument(
        "--link-dir", default="/tmp/devicegw-sim", help="where the stable port links go"
    )
    sim.add_argument("--time-scale", type=float, default=1.0)
    sim.add_argument(
        "--ble",
        action="store_true",
        help="no ptys: BLE peripherals on a private bus with bluezoo (needs dbus-daemon, bluezoo)",
    )
    sim.add_argument(
        "--oximeter",
        action="append",
        metavar="FILE",
        help="with --ble: a PLX or BerryMed oximeter scenario TOML, sharing the clock; with "
        "--record: a Nonin scenario, on the bed of the --scenario its vm1_scenario names "
        "(repeatable)",
    )
    add_simulate_record_args(sim)
    sim.set_defaults(func=cmd_simulate)


def cmd_simulate(args: argparse.Namespace) -> int:
    if args.record is not None:  # virtual time, no ptys: devicegw/cli/replay.py
        from devicegw.cli.replay import simulate_record_cli

        configure_logging(args.log_level or "WARNING", "text")
        return simulate_record_cli(args)
    if args.ble:  # BLE peripherals in a private virtual Bluetooth world: simulators/ble_sandbox.py
        from simulators.ble_sandbox import simulate_ble_main

        configure_logging(args.log_level or "INFO", "text")
        return run_until_signalled(
            simulate_ble_main(
                [Path(p) for p in args.scenario],
                oximeter_paths=[Path(p) for p in args.oximeter or []],
                clock=make_clock(args.time_scale),
            )
        )
    if args.oximeter:
        print(
            "devicegw simulate: --oximeter needs --ble (BLE oximeters) or --record (Nonin)",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    from simulators.run import simulate_main

    configure_logging(args.log_level or "INFO", "text")
    link_dir = Path(args.link_dir)
    link_dir.mkdir(parents=True, exist_ok=True)
    return run_until_signalled(
        simulate_main(
            [Path(p) for p in args.scenario], clock=make_clock(args.time_scale), link_dir=link_dir
        )
    )
