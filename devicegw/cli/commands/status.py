"""``devicegw status``: the health snapshot of the running gateway, every value shown as data."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from devicegw.cli.common import SubParsers, load
from devicegw.cli.terminal import error, printable, text

if TYPE_CHECKING:
    from rich.console import RenderableType


def register(sub: SubParsers) -> None:
    status = sub.add_parser("status", help="health of the gateway running with this config")
    status.add_argument("--config", required=True)
    status.add_argument("--json", action="store_true", help="one JSON object")
    status.set_defaults(func=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    """The health snapshot of the running gateway; every value in it is shown as data."""
    from rich.console import Console

    from devicegw.runtime import health

    config = load(args.config)
    try:
        snap, age = health.read(config.gateway.data_dir)
    except FileNotFoundError:
        print(f"devicegw: no status in {printable(config.gateway.data_dir)}: not run here yet")
        return 1
    except (OSError, ValueError) as exc:
        error(f"cannot read the status in {config.gateway.data_dir}: {exc}")
        return 1
    stale = age > 3 * health.INTERVAL_S
    if args.json:
        print(json.dumps({**snap, "age_s": round(age, 1), "stale": stale}))
        return 1 if stale else 0
    try:
        renderables = _status_view(snap, stale)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        error(f"the status file in {config.gateway.data_dir} is not as expected: {exc!r}")
        return 1
    console = Console()
    for renderable in renderables:
        console.print(renderable)
    return 1 if stale else 0


def _status_view(snap: dict[str, Any], stale: bool) -> list[RenderableType]:
    from rich.table import Table
    from rich.text import Text

    out: list[RenderableType] = []
    b = snap["broker"]
    state = text("STALE: not running?", "red") if stale else text("running", "green")
    out.append(
        Text.assemble(
            "gateway ",
            text(snap["gateway_id"]),
            " (site ",
            text(snap["site"]),
            ", pid ",
            text(snap["pid"]),
            "): ",
            state,
        )
    )
    link = (
        text("connected", "green")
        if b["connected"]
        else Text.assemble(text("disconnected", "red"), " ", text(b.get("last_error") or ""))
    )
    out.append(
        Text.assemble(
            "broker ",
            text(f"{b['host']}:{b['port']}"),
            ": ",
            link,
            text(f"  birth_seq {b['birth_seq']}, telemetry dropped {b['telemetry_dropped']}"),
        )
    )
    out.append(
        text(
            f"outbox depth {snap['outbox_depth']}, store {float(snap['store_bytes']) / 1e6:.1f} MB"
            + _descriptors(snap)
        )
    )
    store = snap.get("store") or {}
    if store.get("held_writes"):
        out.append(
            text(
                f"DISK FULL since {store.get('disk_full_since')}: {store['held_writes']} decided "
                f"write(s) held in memory ({store.get('held_dose_events', 0)} dose event(s)), "
                f"retried until space returns: {store.get('last_error') or ''}",
                "bold red",
            )
        )
    if store.get("quarantined_rows"):
        out.append(
            text(
                f"{store['quarantined_rows']} outbox row(s) quarantined (not published): "
                "run `devicegw audit verify`",
                "bold red",
            )
        )
    restarts = snap.get("task_restarts") or {}
    if restarts:
        errors = snap.get("task_errors") or {}
        for name, count in restarts.items():
            out.append(
                Text.assemble(
                    text(f"task {name} restarted {count} time(s) after a failure: ", "yellow"),
                    text(errors.get(name, ""), limit=200),
                )
            )
    table = Table(
        "device", "port", "identity", "connected", "last frame", "frames ok", "bad", "lost", "note"
    )
    for dev_id, d in snap["devices"].items():
        age_s = d["last_frame_age_s"]
        note = d["refused"] or d.get("identity_note") or d["last_error"] or ""
        ident = d.get("identity")
        shown = "—"
        if ident:
            shown = f"{ident['model']} {ident['serial_no']} fw {ident['firmware']}"
        table.add_row(
            text(dev_id),
            text(d["port"]),
            text(shown, limit=60),
            text("yes" if d["connected"] else "no"),
            text("—" if age_s is None else f"{float(age_s):.1f} s ago"),
            text(d["frames_ok"]),
            text(d["frames_bad"]),
            text(d["frames_lost"]),
            text(note, limit=300),
        )
    out.append(table)
    if snap.get("oximeters"):
        ox_table = Table("oximeter", "bed", "connected", "last sample", "samples", "gated", "note")
        for ox_id, o in snap["oximeters"].items():
            age_o = o["last_sample_age_s"]
            ox_table.add_row(
                text(ox_id),
                text(o["bed"]),
                text("yes" if o["connected"] else "no"),
                text("—" if age_o is None else f"{float(age_o):.1f} s ago"),
                text(o["samples"]),
                text(o["samples_gated"]),
                text(o["last_error"] or "", limit=300),
            )
        out.append(ox_table)
    return out


def _descriptors(snap: dict[str, Any]) -> str:
    used, allowed = snap.get("descriptors_in_use"), snap.get("descriptors_limit")
    out = (
        ""
        if allowed is None
        else f", file descriptors {'?' if used is None else used} of {allowed}"
    )
    lag = snap.get("loop_lag")
    if isinstance(lag, dict) and isinstance(lag.get("max_s"), int | float):
        out += f", event loop late by at most {float(lag['max_s']) * 1000:.0f} ms"
        if lag.get("stalls"):
            out += f" ({int(lag['stalls'])} stalls of 1 s or more)"
    return out
