"""``devicegw check-config``: validate a configuration and summarise it."""

from __future__ import annotations

import argparse

from devicegw.cli.common import SubParsers, checked
from devicegw.cli.terminal import printable


def register(sub: SubParsers) -> None:
    check = sub.add_parser("check-config", help="validate a configuration file and summarise it")
    check.add_argument("config")
    check.add_argument(
        "--file-only",
        action="store_true",
        help="check the file alone, not this machine (a config written for another gateway)",
    )
    check.set_defaults(func=cmd_check_config)


def cmd_check_config(args: argparse.Namespace) -> int:
    config, warnings = checked(args.config, machine=not args.file_only)
    checked_what = "OK"
    if args.file_only:
        checked_what = "file OK; data directory, TLS and password files NOT checked"
    print(f"{printable(args.config)}: {checked_what} (sha256 {config.source_sha256[:16]}…)")
    for warning in warnings:
        print(f"  WARNING: {warning}")
    print(f"  gateway {config.gateway.id} at site {config.gateway.site}")
    print(f"  broker  {config.broker.host}:{config.broker.port} tls={config.broker.tls.enabled}")
    r = config.dose_rules
    print(
        f"  dose rules: {r.prescribed_volume_ml} mL prescribed, "
        f">= {r.min_delivered_fraction:.0%} delivered, "
        f"{r.min_duration_s:g}-{r.max_duration_s:g} s, pauses <= {r.max_total_pause_s:g} s"
    )
    for d in config.devices:
        print(
            f"  device {d.id}: {d.type} on {printable(d.link.port_name)}, bed {d.bed}, "
            f"subject {d.subject_id}, kit {d.kit_number}"
        )
    for ox in config.oximeters:
        print(f"  oximeter {ox.id}: {ox.type} on {printable(ox.link.port_name)}, bed {ox.bed}")
    return 0
