"""``devicegw export``: stored dose events as SDTM EC + SUPPEC or FHIR R4."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from devicegw.cli.common import SubParsers
from devicegw.config import load_config
from devicegw.errors import ConfigError
from devicegw.safe_text import printable


def register(sub: SubParsers) -> None:
    export = sub.add_parser(
        "export",
        help="stored dose events (JSON lines) as SDTM EC + SUPPEC (CSV) or FHIR R4",
    )
    export.add_argument(
        "--config", required=True, help="gateway config with [trial] study_id and time_zone"
    )
    export.add_argument("--input", required=True, metavar="FILE.jsonl")
    export.add_argument("--format", choices=["sdtm-ec", "fhir"], default="sdtm-ec")
    export.add_argument(
        "--output",
        default=None,
        metavar="PATH",
        help="sdtm-ec: a directory for ec.csv and suppec.csv (required); fhir: a file "
        "(default: stdout)",
    )
    export.add_argument("--dose-form", default="SOLUTION", help="ECDOSFRM (sdtm-ec)")
    export.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from devicegw.edc.export import ExportError, load_events, render

    config = load_config(args.config)
    if config.trial is None:
        raise ConfigError(
            f"{args.config}: devicegw export needs a [trial] section with study_id and "
            "time_zone (docs/contract.md, 'Exports')",
            path=args.config,
            field="trial",
        )
    unassigned: list[str] = []
    voided: list[str] = []
    events = load_events(Path(args.input), unassigned=unassigned, voided=voided)
    if voided:
        sys.stderr.write(f"devicegw export: {len(voided)} voided dose event(s) left out\n")
    if unassigned:
        sys.stderr.write(
            f"devicegw export: {len(unassigned)} dose event(s) of an unassigned bed left out "
            f"(no subject to export under), e.g. {printable(unassigned[0], limit=40)}\n"
        )
    files = render(events, args.format, trial=config.trial, dose_form=args.dose_form)
    if args.format == "sdtm-ec":
        if not args.output:
            raise ExportError("--format sdtm-ec writes two files: give --output DIR")
        directory = Path(args.output)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            for name, content in files.items():
                (directory / name).write_text(content, encoding="utf-8")
        except OSError as exc:
            raise ExportError(f"{directory}: {exc.strerror}") from exc
        return 0
    [content] = files.values()
    if args.output:
        Path(args.output).write_text(content, encoding="utf-8")
    else:
        sys.stdout.write(content)
    return 0
