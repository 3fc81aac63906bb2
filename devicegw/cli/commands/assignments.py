"""``devicegw assignments``: the beds' current assignments and their history (read only)."""

from __future__ import annotations

import argparse
import json

from devicegw.cli.common import SubParsers, load
from devicegw.cli.terminal import error, text


def register(sub: SubParsers) -> None:
    p = sub.add_parser("assignments", help="current bed assignments and their history")
    p.add_argument("--config", required=True)
    p.add_argument("--bed", default=None, help="only this bed")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(func=cmd_assignments)


def cmd_assignments(args: argparse.Namespace) -> int:
    """Print who is on which bed with which kit now, then every change, oldest first."""
    from rich.console import Console
    from rich.table import Table

    from devicegw.storage.assignments import current_of, read_history
    from devicegw.storage.store import Store, StoreError

    config = load(args.config)
    try:
        with Store.in_dir(config.gateway.data_dir) as store:
            history = read_history(store, args.bed)
    except (StoreError, OSError) as exc:
        error(f"cannot read the assignments in {config.gateway.data_dir}: {exc}")
        return 1
    current = current_of(history)
    if args.json:
        print(
            json.dumps(
                {
                    "current": {b: a.to_json_dict() for b, a in sorted(current.items())},
                    "history": [a.to_json_dict() for a in history],
                }
            )
        )
        return 0
    console = Console()
    now = Table("bed", "subject", "kit", "since (UTC)", "by", title="in force now")
    for bed, a in sorted(current.items()):
        now.add_row(
            text(bed),
            text(a.subject_id),
            text(a.kit_number),
            text(a.to_json_dict()["effective_utc"]),
            text(a.operator),
        )
    console.print(now)
    hist = Table("#", "bed", "what", "effective (UTC)", "by", "via", "reason", title="history")
    for a in history:
        what = "end" if a.is_end else f"{a.subject_id} kit {a.kit_number}"
        reason = (
            a.reason if a.override_reason is None else f"{a.reason} (override: {a.override_reason})"
        )
        hist.add_row(
            text(a.seq),
            text(a.bed),
            text(what),
            text(a.to_json_dict()["effective_utc"]),
            text(a.operator),
            text(a.channel),
            text(reason, limit=200),
        )
    console.print(hist)
    return 0
