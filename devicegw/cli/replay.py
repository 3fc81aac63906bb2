"""``devicegw replay`` and ``recording show``: recordings through the live pipeline.

``devicegw replay``: the command around :class:`devicegw.recording.player.Player`
(the library that feeds recordings through fresh pipelines): argparse, printing
what it emits (``devicegw.mqtt.publisher.encode``), an optional progress bar and
the summary table (from the public :class:`~devicegw.recording.player.ReplaySummary`).
``--speed N`` paces the records on a :class:`~drivers.clock.ScaledClock`;
``--as-fast-as-possible`` does not wait at all.

The scenario recorder behind ``devicegw simulate --record`` is
:mod:`devicegw.cli.scenario_recorder`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from devicegw.cli.scenario_recorder import (
    DEFAULT_SIM_START,
    SimRecordStats,
    record_scenario,
    simulate_record,
    synthesized_device,
)
from devicegw.config import Config, load_config
from devicegw.contract.topics import Topics
from devicegw.contract.vocabulary import Verdict
from devicegw.errors import ConfigError, GatewayError
from devicegw.mqtt.publisher import encode
from devicegw.recording.format import (
    RecordingError,
    show_lines,
)
from devicegw.recording.player import (
    OUTPUT_KINDS,
    DeviceSummary,
    Emitted,
    OutputKind,
    Player,
    ReplaySummary,
    play_parallel,
)

if TYPE_CHECKING:
    from rich.progress import Progress

    from simulators.oximeter_scenario import OximeterScenario


__all__ = [
    "DEFAULT_SIM_START",
    "DeviceSummary",
    "Emitted",
    "Player",
    "ReplaySummary",
    "SimRecordStats",
    "add_cli_commands",
    "add_simulate_record_args",
    "record_scenario",
    "simulate_record",
    "simulate_record_cli",
    "summary_table",
    "synthesized_device",
]


# ======================================================================== command line


def add_simulate_record_args(sim: argparse.ArgumentParser) -> None:
    """Options of ``devicegw simulate`` for recording in virtual time (no ptys)."""
    sim.add_argument(
        "--record",
        metavar="DIR",
        default=None,
        help="no ptys: run the scenarios in virtual time and write recordings into DIR",
    )
    sim.add_argument(
        "--start-utc",
        default=None,
        help=f"virtual UTC at power-on (default {DEFAULT_SIM_START:%Y-%m-%dT%H:%MZ})",
    )
    sim.add_argument(
        "--until", type=float, default=None, help="seconds to simulate (default: script end + 10 s)"
    )
    sim.add_argument(
        "--output-rate-hz", type=int, default=None, help="SET_RATE in the simulated handshake"
    )
    sim.add_argument(
        "--config", default=None, help="gateway config; its devices map to the scenarios in order"
    )
    sim.add_argument("--jobs", type=int, default=1, help="worker processes (with --record)")


def _parse_utc(text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ConfigError(f"--start-utc: not an ISO 8601 time: {text!r}") from exc
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC)


def _paired_oximeters(
    scenario_paths: list[str], oximeter_paths: list[str]
) -> list[OximeterScenario | None]:
    """Each --oximeter goes on the bed of the --scenario its ``vm1_scenario`` names."""
    from simulators.oximeter_scenario import load_oximeter_scenario

    wanted = [Path(p).resolve() for p in scenario_paths]
    paired: list[OximeterScenario | None] = [None] * len(wanted)
    for path in oximeter_paths:
        oximeter = load_oximeter_scenario(path)
        target = (
            None
            if oximeter.vm1_scenario is None
            else (Path(path).parent / oximeter.vm1_scenario).resolve()
        )
        if target not in wanted:
            raise ConfigError(
                f"--oximeter {path}: its vm1_scenario ({oximeter.vm1_scenario}) is not one of "
                "the --scenario files"
            )
        i = wanted.index(target)
        if paired[i] is not None:
            raise ConfigError(f"--oximeter {path}: {scenario_paths[i]} already has an oximeter")
        paired[i] = oximeter
    return paired


def simulate_record_cli(args: argparse.Namespace) -> int:
    from simulators.scenario import load_scenario

    try:
        scenarios = [load_scenario(p) for p in args.scenario]
        oximeters = _paired_oximeters(args.scenario, args.oximeter or [])
    except GatewayError as exc:
        sys.stderr.write(f"devicegw simulate: {exc}\n")
        return 2
    config = load_config(args.config) if args.config else None
    start = _parse_utc(args.start_utc) if args.start_utc else DEFAULT_SIM_START
    t0 = time.perf_counter()
    results = simulate_record(
        scenarios,
        args.record,
        config=config,
        start_utc=start,
        until_s=args.until,
        output_rate_hz=args.output_rate_hz,
        jobs=args.jobs,
        oximeters=oximeters,
    )
    wall = time.perf_counter() - t0
    frames = sum(r.frames for r in results)
    sim_s = sum(r.sim_seconds for r in results)
    for r in results:
        sys.stdout.write(
            f"{r.device_id}  {r.scenario}: {r.sim_seconds:.0f} s simulated, {r.frames} frames, "
            f"{r.records} records, {r.bytes} bytes in {r.wall_s:.2f} s\n"
        )
    sys.stdout.write(
        f"recorded {len(results)} device(s) into {args.record}: {frames} frames, "
        f"{sim_s:.0f} device-seconds in {wall:.2f} s ({sim_s / max(wall, 1e-9):.0f}x real time)\n"
    )
    return 0


def add_cli_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``devicegw replay`` and ``devicegw recording show``."""
    rp = sub.add_parser(
        "replay", help="replay recordings through the gateway's pipeline; print the events"
    )
    rp.add_argument("files", nargs="+", metavar="FILE", help=".dgwrec recordings")
    pace = rp.add_mutually_exclusive_group()
    pace.add_argument("--speed", type=float, default=None, help="N times the recorded pace")
    pace.add_argument("--as-fast-as-possible", action="store_true", help="no waiting (the default)")
    rp.add_argument("--config", default=None, help="use this config instead of the headers'")
    rp.add_argument(
        "--kinds",
        default="dose",
        help=f"comma-separated outputs to print: {','.join(OUTPUT_KINDS)} (default dose; "
        "the -detail kinds are the restricted feed, docs/blinding.md)",
    )
    rp.add_argument(
        "--publish",
        metavar="HOST:PORT",
        default=None,
        help="also publish the dose events and their restricted details straight to this "
        "broker (QoS 1, no outbox, no TLS/auth: a test and demo aid, not the gateway's "
        "durable path)",
    )
    rp.add_argument(
        "--summary-json",
        metavar="PATH",
        default=None,
        help="also write the summary (counts, verdicts, span, speed) as JSON to PATH",
    )
    rp.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="worker processes, one device per task (as fast as possible only; no --publish); "
        "the events come out in the same order, after all workers finished",
    )
    rp.add_argument("--quiet", action="store_true", help="print no events (summary only)")
    rp.add_argument(
        "--progress",
        choices=["auto", "on", "off"],
        default="auto",
        help="progress bar on stderr (auto: when stderr is a terminal)",
    )
    rp.set_defaults(func=replay_cli)

    rec = sub.add_parser("recording", help="inspect recordings")
    rec_sub = rec.add_subparsers(dest="recording_command", required=True)
    show = rec_sub.add_parser("show", help="print a recording's records, decoded")
    show.add_argument("file", metavar="FILE")
    show.add_argument("--limit", type=int, default=None, help="at most N records")
    show.set_defaults(func=recording_show_cli)


def recording_show_cli(args: argparse.Namespace) -> int:
    out = sys.stdout
    try:
        for line in show_lines(args.file, limit=args.limit):
            out.write(line + "\n")
    except BrokenPipeError:  # `| head`
        with contextlib.suppress(OSError):
            sys.stdout.close()
    except OSError as exc:
        raise RecordingError(f"{args.file}: {exc.strerror or exc}") from exc
    return 0


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--publish: expected HOST:PORT, got {text!r}")
    return host, int(port)


def replay_cli(args: argparse.Namespace) -> int:
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    bad = [k for k in kinds if k not in OUTPUT_KINDS]
    if bad:
        raise ConfigError(f"--kinds: unknown output kind(s) {', '.join(bad)}")
    if args.speed is not None and args.speed <= 0:
        raise ConfigError("--speed must be positive")
    if args.jobs < 1:
        raise ConfigError("--jobs must be at least 1")
    if args.jobs > 1 and (args.speed is not None or args.publish):
        raise ConfigError("--jobs runs as fast as possible and does not publish")
    config = load_config(args.config) if args.config else None
    publish = _host_port(args.publish) if args.publish else None
    return asyncio.run(
        _replay_main(
            [Path(f) for f in args.files],
            config=config,
            kinds=kinds,
            speed=args.speed,
            publish=publish,
            quiet=args.quiet,
            summary_json=Path(args.summary_json) if args.summary_json else None,
            jobs=args.jobs,
            progress=args.progress == "on" or (args.progress == "auto" and sys.stderr.isatty()),
        )
    )


async def _replay_main(
    files: list[Path],
    *,
    config: Config | None,
    kinds: Sequence[OutputKind],
    speed: float | None,
    publish: tuple[str, int] | None,
    quiet: bool,
    progress: bool,
    summary_json: Path | None = None,
    jobs: int = 1,
) -> int:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    out: BinaryIO = sys.stdout.buffer
    queue: asyncio.Queue[Emitted | None] = asyncio.Queue()

    def emit(item: Emitted) -> None:
        if not quiet and item.kind in kinds:
            out.write(encode(item.payload) + b"\n")
        if publish is not None and item.kind in ("dose", "dose-detail"):
            queue.put_nowait(item)

    played: list[OutputKind] = list(kinds)
    if publish is not None:
        played += [k for k in ("dose", "dose-detail") if k not in played]
    player = Player(files, config=config, emit=emit, kinds=played)
    console = Console(stderr=True)
    bar = Progress(
        TextColumn("replay"),
        BarColumn(),
        DownloadColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not progress,
        transient=True,
    )
    publisher: asyncio.Task[int] | None = None
    if publish is not None:
        publisher = asyncio.create_task(_publish(publish, queue, player), name="replay-publisher")
    if jobs > 1:  # as fast as possible, nothing to publish: no loop work meanwhile
        summary = play_parallel(files, jobs=jobs, config=config, emit=emit, kinds=played)
    else:
        summary = await _play_with_bar(player, bar, speed)
    out.flush()
    published = 0
    if publisher is not None:
        queue.put_nowait(None)
        published = await publisher
    console.print(summary_table(summary))
    if summary_json is not None:
        text = json.dumps(summary.as_dict(), indent=2) + "\n"
        await asyncio.to_thread(summary_json.write_text, text)
    if publish is not None:
        console.print(f"published {published} dose event(s) to {publish[0]}:{publish[1]}")
    for problem in summary.problems:
        console.print(f"[yellow]skipped a torn tail:[/] {problem}")
    return 0


async def _play_with_bar(player: Player, bar: Progress, speed: float | None) -> ReplaySummary:
    with bar:
        task = bar.add_task("replay", total=player.total_bytes)

        def on_progress(done: int) -> None:
            bar.update(task, completed=min(done, player.total_bytes))

        return await player.run_async(speed=speed, progress=on_progress)


async def _publish(
    where: tuple[str, int], queue: asyncio.Queue[Emitted | None], player: Player
) -> int:
    import aiomqtt

    count = 0
    async with aiomqtt.Client(
        where[0], where[1], identifier=f"devicegw-replay-{uuid.uuid4()}"
    ) as c:
        while (item := await queue.get()) is not None:
            topics = _topics_for(player, item.device_id)
            if item.kind == "dose":
                await c.publish(topics.dose(item.device_id), encode(item.payload), qos=1)
                count += 1
            else:
                await c.publish(topics.dose_detail(item.device_id), encode(item.payload), qos=1)
    return count


def _topics_for(player: Player, device_id: str) -> Topics:
    config = player.config_for(device_id)
    if config is None:  # cannot happen: a device emits only after its header
        raise RecordingError(f"{device_id}: output before the recording's header")
    return Topics(config.broker.topic_prefix, config.gateway.site, config.gateway.id)


def summary_table(summary: ReplaySummary) -> object:
    """A rich Table: sessions and verdicts per device, then the totals and the speed."""
    from rich.table import Table

    verdicts = list(Verdict)
    table = Table(title="replay summary")
    table.add_column("device")
    table.add_column("sessions", justify="right")
    for v in verdicts:
        table.add_column(v, justify="right")
    for device_id in sorted(summary.devices):
        d = summary.devices[device_id]
        table.add_row(device_id, str(d.sessions), *(str(d.verdicts.get(v, 0)) for v in verdicts))
    total = summary.verdicts()
    table.add_row(
        "total", str(summary.sessions), *(str(total.get(v, 0)) for v in verdicts), style="bold"
    )
    wall = max(summary.wall_s, 1e-9)
    table.caption = (
        f"{summary.files} file(s), {summary.records} records, {summary.frames} frames; "
        f"{summary.span_s:.0f} s recorded in {summary.wall_s:.2f} s "
        f"({summary.span_s / wall:.0f}x real time, {summary.frames / wall:.0f} frames/s)"
    )
    return table
