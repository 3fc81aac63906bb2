"""``devicegw schema``: the JSON Schemas of the MQTT payloads, written or checked."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from devicegw.cli.common import SubParsers


def register(sub: SubParsers) -> None:
    schema = sub.add_parser("schema", help="JSON Schemas of the MQTT payloads")
    schema_sub = schema.add_subparsers(dest="schema_command", required=True)
    for name, help_text in (
        ("export", "write the JSON Schemas into DIR"),
        ("check", "exit 1 if the schemas in DIR differ from the payload models"),
    ):
        cmd = schema_sub.add_parser(name, help=help_text)
        cmd.add_argument("dir", metavar="DIR")
        cmd.set_defaults(func=cmd_schema)


def cmd_schema(args: argparse.Namespace) -> int:
    from devicegw.contract.schemas import check, export

    directory = Path(args.dir)
    if args.schema_command == "export":
        for path in export(directory):
            print(f"wrote {path}")
        return 0
    problems = check(directory)
    for problem in problems:
        print(f"devicegw: {problem}", file=sys.stderr)
    if problems:
        print(f"devicegw: run `devicegw schema export {directory}` and commit", file=sys.stderr)
        return 1
    print(f"{directory}: schemas up to date")
    return 0
