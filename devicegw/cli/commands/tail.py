"""``devicegw tail``: MQTT messages checked against the contract, and the reference
EDC client (``--dose-events``)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from devicegw.cli.common import EXIT_CONFIG, SubParsers, run_until_signalled


def register(sub: SubParsers) -> None:
    tail = sub.add_parser(
        "tail", help="print MQTT messages, checked against the contract; the reference EDC client"
    )
    tail.add_argument("--host", required=True)
    tail.add_argument("--port", type=int, default=1883)
    tail.add_argument(
        "--topic", action="append", help="subscription (repeatable; default devicegw/v2/#)"
    )
    tail.add_argument("--json", action="store_true", help="one JSON object per line")
    tail.add_argument("--username", default=None)
    tail.add_argument("--password-env", default=None, metavar="VAR", help="password from $VAR")
    tail.add_argument("--tls", action="store_true", help="TLS with the system's CAs")
    tail.add_argument("--ca-file", default=None, help="TLS with this CA bundle")
    tail.add_argument("--count", type=int, default=None, help="exit after N messages")
    tail.add_argument("--timeout", type=float, default=None, help="exit after S seconds")
    tail.add_argument(
        "--no-seq-check", action="store_true", help="do not flag sequence gaps (filtered topics)"
    )
    tail.add_argument(
        "--dose-events",
        action="store_true",
        help="reference EDC client: dose events, QoS 1, persistent session (needs --ack-store)",
    )
    tail.add_argument(
        "--ack-store", default=None, metavar="FILE", help="JSON lines: first copy of each event"
    )
    tail.add_argument(
        "--client-id", default="edc-reference", help="persistent session id (--dose-events)"
    )
    tail.set_defaults(func=cmd_tail)


def cmd_tail(args: argparse.Namespace) -> int:
    from devicegw.edc.ack_store import AckStore
    from devicegw.edc.client import run_edc_client
    from devicegw.edc.tail import ALL_TOPICS, Printer, TailOptions, run_tail

    password = None
    if args.password_env:
        password = os.environ.get(args.password_env)
        if password is None:
            print(f"devicegw: environment variable {args.password_env} is not set", file=sys.stderr)
            return EXIT_CONFIG
    if args.dose_events != (args.ack_store is not None):
        print("devicegw: --dose-events and --ack-store go together", file=sys.stderr)
        return EXIT_CONFIG
    options = TailOptions(
        host=args.host,
        port=args.port,
        topics=tuple(args.topic or [ALL_TOPICS]),
        username=args.username,
        password=password,
        tls=args.tls,
        ca_file=Path(args.ca_file) if args.ca_file else None,
        count=args.count,
        timeout=args.timeout,
        check_sequence=not args.no_seq_check,
        client_id=args.client_id,
    )
    printer = Printer(as_json=args.json)
    if args.dose_events:
        store = AckStore(Path(args.ack_store))
        return run_until_signalled(run_edc_client(options, printer, store=store))
    return run_until_signalled(run_tail(options, printer))
