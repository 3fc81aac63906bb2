"""Replay recordings through the live pipeline, and make recordings from scenarios.

``devicegw replay``: the command around :class:`devicegw.recording.player.Player`
(the library that feeds recordings through fresh pipelines): argparse, printing
what it emits (``devicegw.mqtt.publisher.encode``), an optional progress bar and
the summary table (from the public :class:`~devicegw.recording.player.ReplaySummary`).
``--speed N`` paces the records on a :class:`~drivers.clock.ScaledClock`;
``--as-fast-as-possible`` does not wait at all.

Scenario runner (``devicegw simulate --scenario F --record DIR``): drives the
pure :class:`~simulators.vm1_model.Vm1Model` in virtual time (no pty, no
sleeping) and writes what a gateway would have recorded: the link opening,
the device's port-open IDENT, the gateway's handshake (GET_INFO, SET_CLOCK to
the virtual UTC, SET_RATE if the device is configured with ``output_rate_hz``)
as sent bytes with the device's answers, then every message the device sends,
received at the instant it is sent. Scripted link drops close the link (what
the device sends meanwhile is lost) and the gateway reopens 0.5 s after the
port returns; line noise and bit flips are injected like the pty simulator
does. The virtual gateway does not run the pipeline, so it never sends
GET_SESSION for a missed SESSION_END (scenarios in which the gateway needs the
device's session log replay as "end missed").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import heapq
import json
import random
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from devicegw.config import Config, DeviceSettings, GatewaySettings, load_config
from devicegw.contract.topics import Topics
from devicegw.contract.vocabulary import Verdict
from devicegw.errors import ConfigError, GatewayError
from devicegw.mqtt.publisher import encode
from devicegw.recording.format import (
    CLOSE,
    OPEN,
    RX,
    TX,
    RecordingError,
    RecordingWriter,
    show_lines,
    utc_to_us,
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

    from simulators.scenario import Scenario

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

#: Virtual UTC at which ``simulate --record`` powers the devices on, unless told otherwise.
DEFAULT_SIM_START = datetime(2026, 1, 5, 8, 0, tzinfo=UTC)
_SIM_NAMESPACE = uuid.UUID("0b7e4a52-7d0f-4f57-9c1e-2a8f3b8e6d10")
#: Gateway's delay between the port reappearing and its reopen (its first backoff step).
SIM_REOPEN_DELAY_S = 0.5


# ======================================================================== scenario runner


@dataclass(slots=True)
class SimRecordStats:
    device_id: str
    scenario: str
    sim_seconds: float = 0.0
    frames: int = 0
    frames_lost: int = 0
    records: int = 0
    bytes: int = 0
    wall_s: float = 0.0


def synthesized_device(
    index: int, scenario: Scenario, *, output_rate_hz: int | None = None
) -> DeviceSettings:
    """Config of the ``index``-th simulated device when no --config is given."""
    serial = scenario.device.serial_no
    return DeviceSettings(
        id=f"neb-{serial}" if _ident_ok(serial) else f"neb-sim{index + 1:02d}",
        type="vm1",
        link={"kind": "serial", "port": f"sim://{serial}"},  # type: ignore[arg-type]
        bed=f"SIM{index + 1:02d}",
        subject_id=f"SIM-{index + 1:04d}",
        kit_number=f"K-SIM-{index + 1:04d}",
        output_rate_hz=output_rate_hz,
    )


def _ident_ok(text: str) -> bool:
    import re

    return re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,59}", text) is not None


def simulation_config(devices: list[DeviceSettings]) -> Config:
    return Config(
        gateway=GatewaySettings(id="gw-sim", site="site-sim"),
        devices=devices,
    )


def record_scenario(
    scenario: Scenario,
    out_dir: str | Path,
    *,
    config: Config,
    device: DeviceSettings,
    start_utc: datetime = DEFAULT_SIM_START,
    until_s: float | None = None,
    tail_s: float = 10.0,
    run_id: str | None = None,
    flush_interval_s: float = 60.0,
) -> SimRecordStats:
    """Run one scenario in virtual time and write its recording; see the module docstring."""
    from drivers.vm1.framing import Deframer
    from drivers.vm1.messages import DeviceMessage, GetInfo, HostCommand, SetClock, SetRate
    from drivers.vm1.stream import encode_message_frame
    from simulators.vm1_model import Vm1Model

    t_wall = time.perf_counter()
    model = Vm1Model.from_scenario(scenario)
    dev_id = device.id
    if run_id is None:
        run_id = str(
            uuid.uuid5(
                _SIM_NAMESPACE, f"{scenario.name}/{scenario.device.serial_no}/{start_utc}/{dev_id}"
            )
        )
    writer = RecordingWriter(
        out_dir,
        config,
        run_id=run_id,
        flush_interval_s=flush_interval_s,
        source="simulator",
        header_extra={
            dev_id: {
                "scenario": scenario.name,
                "serial_no": scenario.device.serial_no,
                "seed": scenario.device.seed,
                "handshake": "simulated (GET_INFO, SET_CLOCK, SET_RATE if configured)",
            }
        },
    )
    stats = SimRecordStats(dev_id, scenario.name)
    utc0 = utc_to_us(start_utc)
    append = writer.append
    rng = random.Random(f"vm1/{scenario.device.seed}/link")
    link_up = False
    bitflips = 0
    host_seq = 0

    def us(t: float) -> int:
        return utc0 + round(t * 1_000_000)

    def emit(msgs: list[DeviceMessage], t: float) -> None:
        nonlocal bitflips
        if not msgs:
            return
        if not link_up:
            stats.frames_lost += len(msgs)
            return
        frames = [encode_message_frame(m) for m in msgs]
        while bitflips and frames:
            i = len(frames) - min(bitflips, len(frames))
            for j in range(i, len(frames)):
                f = bytearray(frames[j])
                f[rng.randrange(1, len(f) - 1)] ^= 1 << rng.randrange(8)
                frames[j] = bytes(f)
                bitflips -= 1
            break
        stats.frames += len(frames)
        append(dev_id, RX, t, us(t), b"".join(frames))

    def command(cmd: HostCommand, t: float) -> None:
        nonlocal host_seq
        cmd = replace(cmd, seq=host_seq)
        host_seq = (host_seq + 1) & 0xFF
        append(dev_id, TX, t, us(t), encode_message_frame(cmd))
        emit(model.handle_command(cmd, t), t)

    def connect(t: float) -> None:
        nonlocal link_up
        emit(model.advance(t), t)  # lost: the link is still down
        link_up = True
        append(dev_id, OPEN, t, us(t), f"simulated {scenario.device.serial_no}".encode())
        emit([model.ident_message(t)], t)  # the device's port-open IDENT
        command(GetInfo(), t + 0.002)
        command(SetClock(unix_s=us(t + 0.004) // 1_000_000), t + 0.004)
        if device.output_rate_hz is not None:
            command(SetRate(hz=device.output_rate_hz), t + 0.006)

    # (time, order, kind, arg) like the pty simulator's link events.
    events: list[tuple[float, int, str, float]] = []
    for i, drop in enumerate(scenario.link_drops):
        events.append((drop.at_s, i, "drop", drop.duration_s))
    for i, c in enumerate(scenario.corruption):
        events.append((c.at_s, 1000 + i, c.kind, float(c.count)))
    heapq.heapify(events)
    order = 10_000

    connect(0.0)
    end = until_s
    next_event_time = model.next_event_time
    advance = model.advance
    while True:
        nt = next_event_time()
        if events and events[0][0] <= nt:
            at, _, kind, arg = heapq.heappop(events)
            if end is not None and at > end:
                break
            emit(advance(at), at)
            if kind == "drop" and link_up:
                link_up = False
                append(dev_id, CLOSE, at, us(at), b"simulated link drop")
                order += 1
                heapq.heappush(events, (at + arg + SIM_REOPEN_DELAY_S, order, "reopen", 0.0))
            elif kind == "reopen" and not link_up:
                connect(at)
            elif kind == "garbage" and link_up:
                junk = b""
                for _ in range(100):
                    junk = bytes(rng.getrandbits(8) for _ in range(int(arg)))
                    if not Deframer().feed(b"\x7e" + junk + b"\x7e"):
                        break
                append(dev_id, RX, at, us(at), junk)
            elif kind == "bitflip":
                bitflips += int(arg)
            continue
        if end is None and model.scripted_done and not events:
            end = model.time_s + tail_s
        if end is not None and nt > end:
            break
        # next_event_time() is ms / 1000: nudge it so advance()'s floor(t * 1000) reaches it.
        msgs = advance(nt + 0.0004)
        if msgs:
            emit(msgs, nt)
    t_end = end if end is not None else model.time_s
    if link_up:
        append(dev_id, CLOSE, t_end, us(t_end), b"closed")
    writer.close()
    stats.sim_seconds = t_end
    stats.records = writer.stats.records
    stats.bytes = writer.stats.bytes
    stats.wall_s = time.perf_counter() - t_wall
    return stats


def _record_job(
    args: tuple[Scenario, Path, Config, DeviceSettings, datetime, float | None],
) -> SimRecordStats:
    scenario, out_dir, config, device, start, until = args
    return record_scenario(
        scenario, out_dir, config=config, device=device, start_utc=start, until_s=until
    )


def simulate_record(
    scenarios: Sequence[Scenario],
    out_dir: str | Path,
    *,
    config: Config | None = None,
    start_utc: datetime = DEFAULT_SIM_START,
    until_s: float | None = None,
    output_rate_hz: int | None = None,
    jobs: int = 1,
) -> list[SimRecordStats]:
    """Record every scenario; device ``i`` is ``config.devices[i]`` (or synthesized)."""
    if config is not None:
        if len(config.devices) < len(scenarios):
            raise ConfigError(
                f"{len(scenarios)} scenarios but only {len(config.devices)} devices in the config"
            )
        devices = list(config.devices[: len(scenarios)])
    else:
        devices = [
            synthesized_device(i, s, output_rate_hz=output_rate_hz) for i, s in enumerate(scenarios)
        ]
        config = simulation_config(devices)
    out = Path(out_dir)
    jobs_args = [
        (s, out, config, d, start_utc, until_s) for s, d in zip(scenarios, devices, strict=True)
    ]
    if jobs <= 1 or len(scenarios) == 1:
        return [_record_job(a) for a in jobs_args]
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(_record_job, jobs_args))


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


def simulate_record_cli(args: argparse.Namespace) -> int:
    from simulators.scenario import load_scenario

    try:
        scenarios = [load_scenario(p) for p in args.scenario]
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
