"""``devicegw assign``: assign, change or end a bed's subject and kit in the running daemon."""

from __future__ import annotations

import argparse

from devicegw.cli.common import SubParsers, ask_daemon, load


def register(sub: SubParsers) -> None:
    p = sub.add_parser(
        "assign",
        help="assign a bed's subject and kit in the running gateway (or --end it)",
        description="Exit 0: applied; 2: refused (the reason is printed); 1: the gateway "
        "cannot be reached.",
    )
    p.add_argument("--config", required=True)
    p.add_argument("--bed", required=True)
    p.add_argument("--subject", default=None, help="pseudonymous subject id")
    p.add_argument("--kit", default=None, help="kit number (a barcode scanner's input works)")
    p.add_argument("--end", action="store_true", help="end the bed's assignment")
    p.add_argument("--operator", required=True, help="who assigns (audited)")
    p.add_argument("--reason", required=True, help="why (audited)")
    p.add_argument(
        "--override-reason", default=None, help="use a kit already used for a dose (audited)"
    )
    p.add_argument(
        "--first-dose",
        default=None,
        metavar="UTC",
        help="with [schedule]: when dose 1 is planned, ISO 8601 with offset "
        "(e.g. 2026-11-25T08:00Z); default: the first dose given defines day 1",
    )
    p.set_defaults(func=cmd_assign)


def cmd_assign(args: argparse.Namespace) -> int:
    config = load(args.config)
    payload = {
        "command": "assign",
        "bed": args.bed,
        "subject_id": args.subject,
        "kit_number": args.kit.strip() if args.kit is not None else None,
        "end": args.end,
        "operator": args.operator,
        "reason": args.reason,
        "override_reason": args.override_reason,
    }
    if args.first_dose is not None:
        payload["planned_first_dose_utc"] = args.first_dose.replace("Z", "+00:00")
    return ask_daemon("assign", config.gateway.data_dir, payload)
