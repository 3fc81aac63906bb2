"""``devicegw audit verify|show``: the hash-chained audit trail in the gateway store."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from devicegw.cli.common import EXIT_CONFIG, SubParsers, load
from devicegw.cli.terminal import error, printable


def register(sub: SubParsers) -> None:
    audit_p = sub.add_parser("audit", help="the hash-chained audit trail in the gateway store")
    audit_sub = audit_p.add_subparsers(dest="audit_command", required=True)
    for name, help_text in (
        ("verify", "check the chain; exit 1 naming the first bad record"),
        ("show", "print the audit trail"),
    ):
        cmd = audit_sub.add_parser(name, help=help_text)
        where = cmd.add_mutually_exclusive_group(required=True)
        where.add_argument("--config", help="the gateway's TOML config (store in its data_dir)")
        where.add_argument("--store", help="path of a gateway store file (or a copy of one)")
        cmd.set_defaults(func=cmd_audit)
    audit_sub.choices["verify"].add_argument(
        "--witness", metavar="N:HASH", help="a head recorded earlier; catches truncation"
    )
    show = audit_sub.choices["show"]
    show.add_argument("--device", default=None, help="only this device id")
    show.add_argument("--since", default=None, metavar="ISO", help="only records from this time")
    show.add_argument("--json", action="store_true", help="JSON lines instead of a table")


def cmd_audit(args: argparse.Namespace) -> int:
    from devicegw.storage import audit
    from devicegw.storage.store import Store

    if args.store is not None:
        path = Path(args.store)
    else:
        path = Path(load(args.config).gateway.data_dir) / Store.FILE_NAME
    try:
        witness_text = getattr(args, "witness", None)
        since_text = getattr(args, "since", None)
        witness = audit.AuditHead.parse(witness_text) if witness_text else None
        since = audit.parse_since(since_text) if since_text else None
    except ValueError as exc:
        error(exc)
        return EXIT_CONFIG
    with audit.open_store(path) as store:
        if args.audit_command == "verify":
            # The chain, SQLite's full integrity_check and the outbox against the chain.
            report = audit.verify_store(store, witness=witness)
            for line in report.lines():
                print(printable(line))
            return 0 if report.ok else 1
        records = audit.iter_records(store, device_id=args.device, since=since)
        with contextlib.closing(records):
            if args.json:
                for record in records:
                    print(audit.canonical_json(record.to_json_dict()))
            else:
                from rich.console import Console

                console = Console()
                console.print(audit.records_table(records, width=console.width))
    return 0
