"""``devicegw correct``: re-attribute or void a recorded dose in the running daemon."""

from __future__ import annotations

import argparse

from devicegw.cli.common import SubParsers, ask_daemon, load


def register(sub: SubParsers) -> None:
    p = sub.add_parser(
        "correct",
        help="re-attribute (--subject/--kit) or --void a recorded dose; the original stays",
        description="Publishes a dose_correction that supersedes the dose event (docs/contract.md, "
        '"Corrections"). Exit 0: published; 2: refused (the reason is printed); 1: the '
        "gateway cannot be reached.",
    )
    p.add_argument("--config", required=True)
    p.add_argument("--event", required=True, help="the dose event's event_id")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--subject", default=None, help="the right subject (with --kit)")
    what.add_argument("--void", action="store_true", help="the dose does not count")
    p.add_argument("--kit", default=None, help="the right kit (with --subject)")
    p.add_argument("--operator", required=True, help="who corrects (audited)")
    p.add_argument("--reason", required=True, help="why (audited)")
    p.set_defaults(func=cmd_correct)


def cmd_correct(args: argparse.Namespace) -> int:
    config = load(args.config)
    payload = {
        "command": "correct",
        "event_id": args.event,
        "subject_id": args.subject,
        "kit_number": args.kit,
        "void": args.void,
        "operator": args.operator,
        "reason": args.reason,
    }
    return ask_daemon("correct", config.gateway.data_dir, payload)
