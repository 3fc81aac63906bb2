"""``devicegw`` command line: run, demo, check-config, simulate, schema."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from devicegw import __version__
from devicegw.cli.terminal import error, printable, text
from devicegw.config import Config, load_config
from devicegw.errors import ConfigError, GatewayError
from devicegw.runtime.logging_setup import configure_logging
from drivers.clock import Clock, ScaledClock, SystemClock

if TYPE_CHECKING:
    from rich.console import RenderableType

EXIT_CONFIG = 2
EXIT_FATAL = 1

log = logging.getLogger("devicegw")


def _clock(scale: float) -> Clock:
    return SystemClock() if scale == 1.0 else ScaledClock(scale)


def run_until_signalled(coro: Coroutine[Any, Any, object]) -> int:
    """Run ``coro``; SIGTERM/SIGINT cancel it so every task shuts down in order."""

    async def main() -> int:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        try:
            result = await coro
        except asyncio.CancelledError:
            return 0
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        return result if isinstance(result, int) else 0

    return asyncio.run(main())


def _load(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        error(exc)
        raise SystemExit(EXIT_CONFIG) from None


def _checked(
    path: str, *, record: str | None = None, machine: bool = True
) -> tuple[Config, list[str]]:
    """The configuration and what the machine must offer it: exactly what ``run`` needs."""
    from devicegw.runtime.preflight import insecure_settings, preflight

    config = _load(path)
    if not machine:
        return config, insecure_settings(config)
    if record is not None:
        try:
            gateway_settings = type(config.gateway).model_validate(
                {**config.gateway.model_dump(), "record_dir": Path(record)}
            )
        except ValueError as exc:
            error(f"--record {record}: {exc}")
            raise SystemExit(EXIT_CONFIG) from None
        config = config.model_copy(update={"gateway": gateway_settings})
    try:
        warnings = preflight(config)
    except ConfigError as exc:
        error(f"{path}: {exc}")
        raise SystemExit(EXIT_CONFIG) from None
    return config, warnings


def cmd_run(args: argparse.Namespace) -> int:
    from devicegw.runtime.gateway import Gateway
    from devicegw.runtime.systemd_notify import Notifier

    config, warnings = _checked(args.config, record=args.record)
    configure_logging(args.log_level or config.gateway.log_level, config.gateway.log_format)
    for warning in warnings:
        log.warning("INSECURE: %s", warning)
    scale = args.time_scale if args.time_scale is not None else config.gateway.time_scale
    try:
        # Under systemd (Type=notify): READY=1, WATCHDOG=1, STATUS= (deploy/systemd).
        gateway = Gateway(config, clock=_clock(scale), notifier=Notifier.from_environment())
    except ConfigError as exc:
        error(exc)
        return EXIT_CONFIG
    except (GatewayError, OSError) as exc:
        error(f"cannot start: {exc}")
        return EXIT_FATAL
    try:
        return run_until_signalled(gateway.run())
    except Exception as exc:
        # Every running task is supervised (devicegw/runtime/supervise.py); what arrives
        # here failed before the tasks started. One line here, the traceback in the log.
        log.critical("gateway could not start", exc_info=True)
        error(f"cannot start: {type(exc).__name__}: {exc}")
        return EXIT_FATAL


def cmd_check_config(args: argparse.Namespace) -> int:
    config, warnings = _checked(args.config, machine=not args.file_only)
    checked = "OK"
    if args.file_only:
        checked = "file OK; data directory, TLS and password files NOT checked"
    print(f"{printable(args.config)}: {checked} (sha256 {config.source_sha256[:16]}…)")
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
                clock=_clock(args.time_scale),
            )
        )
    if args.oximeter:
        print("devicegw simulate: --oximeter needs --ble (BLE oximeters)", file=sys.stderr)
        return EXIT_CONFIG
    from simulators.run import simulate_main

    configure_logging(args.log_level or "INFO", "text")
    link_dir = Path(args.link_dir)
    link_dir.mkdir(parents=True, exist_ok=True)
    return run_until_signalled(
        simulate_main(
            [Path(p) for p in args.scenario], clock=_clock(args.time_scale), link_dir=link_dir
        )
    )


def cmd_demo(args: argparse.Namespace) -> int:
    from devicegw.cli.demo import run_demo

    # The live view shows what matters; only errors go to the log.
    configure_logging(args.log_level or "ERROR", "text")
    try:
        return asyncio.run(run_demo(time_scale=args.time_scale, scenario=args.scenario))
    except KeyboardInterrupt:
        return 130


def cmd_tail(args: argparse.Namespace) -> int:
    import os

    from devicegw.edc.tail import (
        ALL_TOPICS,
        AckStore,
        Printer,
        TailOptions,
        run_edc_client,
        run_tail,
    )

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
    files = render(
        load_events(Path(args.input)), args.format, trial=config.trial, dose_form=args.dose_form
    )
    if args.format == "sdtm-ec":
        if not args.output:
            raise ExportError("--format sdtm-ec writes two files: give --output DIR")
        directory = Path(args.output)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            for name, text in files.items():
                (directory / name).write_text(text, encoding="utf-8")
        except OSError as exc:
            raise ExportError(f"{directory}: {exc.strerror}") from exc
        return 0
    [text] = files.values()
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


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


def cmd_audit(args: argparse.Namespace) -> int:
    from devicegw.storage import audit
    from devicegw.storage.store import Store

    if args.store is not None:
        path = Path(args.store)
    else:
        path = Path(_load(args.config).gateway.data_dir) / Store.FILE_NAME
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
            result = audit.verify(store, witness=witness)
            print(printable(result.summary()))
            return 0 if result.ok else 1
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


def cmd_status(args: argparse.Namespace) -> int:
    """The health snapshot of the running gateway; every value in it is shown as data."""
    from rich.console import Console

    from devicegw.runtime import health

    config = _load(args.config)
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="devicegw", description=__doc__)
    p.add_argument("--version", action="version", version=f"devicegw {__version__}")
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], default=None)
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the gateway daemon")
    run.add_argument("--config", required=True, help="TOML configuration file")
    run.add_argument(
        "--time-scale",
        type=float,
        default=None,
        help="run the clock N times faster (simulated devices only)",
    )
    run.add_argument("--record", metavar="DIR", default=None, help="record raw link events in DIR")
    run.set_defaults(func=cmd_run)

    status = sub.add_parser("status", help="health of the gateway running with this config")
    status.add_argument("--config", required=True)
    status.add_argument("--json", action="store_true", help="one JSON object")
    status.set_defaults(func=cmd_status)

    check = sub.add_parser("check-config", help="validate a configuration file and summarise it")
    check.add_argument("config")
    check.add_argument(
        "--file-only",
        action="store_true",
        help="check the file alone, not this machine (a config written for another gateway)",
    )
    check.set_defaults(func=cmd_check_config)

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
        help="with --ble: a PLX or BerryMed oximeter scenario TOML, sharing the clock (repeatable)",
    )
    from devicegw.cli.replay import add_cli_commands, add_simulate_record_args

    add_simulate_record_args(sim)
    sim.set_defaults(func=cmd_simulate)

    demo = sub.add_parser(
        "demo", help="broker + simulated nebulizer + gateway, live in the terminal"
    )
    demo.add_argument("--time-scale", type=float, default=8.0)
    demo.add_argument("--scenario", default=None, help="scenario TOML (default: the demo session)")
    demo.set_defaults(func=cmd_demo)

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

    schema = sub.add_parser("schema", help="JSON Schemas of the MQTT payloads")
    schema_sub = schema.add_subparsers(dest="schema_command", required=True)
    for name, help_text in (
        ("export", "write the JSON Schemas into DIR"),
        ("check", "exit 1 if the schemas in DIR differ from the payload models"),
    ):
        cmd = schema_sub.add_parser(name, help=help_text)
        cmd.add_argument("dir", metavar="DIR")
        cmd.set_defaults(func=cmd_schema)

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
    add_cli_commands(sub)  # replay, recording show
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc: int = args.func(args)
    except GatewayError as exc:
        error(exc)
        return 1
    return rc


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
