"""Replay recordings through the live pipeline: the player, as a library.

Reads ``.dgwrec`` files (:mod:`devicegw.recording.format`), builds one
:class:`~devicegw.core.vm1_pipeline.Vm1Pipeline` per device (the very class the
live runner feeds) from a given configuration or from the recording's header, and
feeds it the recorded bytes with the recorded gateway UTC and monotonic readings.
Dose checks therefore see exactly what they saw live; encoded with
``devicegw.mqtt.publisher.encode`` the dose events are byte-identical. Pacing
(:meth:`Player.run_async` on a :class:`~drivers.clock.ScaledClock`) changes when
events come out, never what they say.

The result is public: :class:`ReplaySummary` (counts, verdicts per device, the
time recorded and the time taken) and :meth:`Player.config_for` (the
configuration a device's pipeline runs with, e.g. for its topics). No argparse,
no terminal, no broker here: ``devicegw replay`` (``devicegw/cli/replay.py``)
prints and publishes what the player emits.

A recording of a bed with an oximeter (format version 2) also holds what the
bed's SpO2 monitor was given (:mod:`devicegw.recording.bed_inputs`); the player
gives it to a fresh :class:`~devicegw.core.bed_monitor.BedMonitor` in file order,
so the dose event's ``spo2`` section, the safety alerts and the post-dose
summary (output kind ``safety``) come out as they did live. Version 1
recordings of such a bed replay without an overlay (``no_oximeter_assigned``).
"""

from __future__ import annotations

import asyncio
import gc
import heapq
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import BaseModel

from devicegw.config import Config
from devicegw.contract.payloads import (
    DeviceDetail,
    DeviceStatus,
    DoseDetail,
    DoseEvent,
    DoseRecord,
    Telemetry,
    TelemetryDetail,
)
from devicegw.contract.spo2 import PostDoseSafetySummary, SafetyAlert
from devicegw.core.bed_monitor import BedMonitor
from devicegw.core.vm1_pipeline import UnexpectedDeviceError, Vm1Pipeline
from devicegw.recording.bed_inputs import DECODED_SAMPLES, decode_sample
from devicegw.recording.format import (
    _EPOCH,
    BED_TICK,
    CLOSE,
    HEADER,
    OPEN,
    OX_DOWN,
    OX_SAMPLE,
    OX_UP,
    RX,
    TX,
    ReadStats,
    Record,
    RecordingError,
    RecordingHeader,
    first_header,
    iter_field_batches,
    iter_record_batches,
    parse_header,
)
from drivers.clock import Clock, ScaledClock
from drivers.oximeter.sample import OximeterSample

__all__ = [
    "OUTPUT_KINDS",
    "DeviceSummary",
    "Emitted",
    "OutputKind",
    "Player",
    "ReplaySummary",
    "play_parallel",
]

OutputKind = Literal[
    "dose", "dose-detail", "status", "device-detail", "telemetry", "telemetry-detail", "safety"
]
OUTPUT_KINDS: tuple[OutputKind, ...] = (
    "dose",
    "dose-detail",
    "status",
    "device-detail",
    "telemetry",
    "telemetry-detail",
    "safety",
)


@dataclass(frozen=True, slots=True)
class Emitted:
    """One output of a replayed device (what the daemon would have published)."""

    device_id: str
    kind: OutputKind
    payload: (
        DoseEvent
        | DoseDetail
        | DeviceStatus
        | DeviceDetail
        | Telemetry
        | TelemetryDetail
        | SafetyAlert
        | PostDoseSafetySummary
    )


@dataclass(slots=True)
class DeviceSummary:
    sessions: int = 0
    verdicts: Counter[str] = field(default_factory=Counter)
    runs: int = 0


@dataclass(slots=True)
class ReplaySummary:
    files: int = 0
    records: int = 0
    rx_bytes: int = 0
    frames: int = 0  # VM-1 frames decoded (good and bad)
    first_utc_us: int | None = None
    last_utc_us: int | None = None
    #: Sum over devices (and gateway runs) of the time their recordings span.
    device_seconds: float = 0.0
    wall_s: float = 0.0
    skipped_bytes: int = 0
    problems: list[str] = field(default_factory=list)
    devices: dict[str, DeviceSummary] = field(default_factory=dict)

    @property
    def span_s(self) -> float:
        """Gateway time the recordings span (first record to last, all devices)."""
        if self.first_utc_us is None or self.last_utc_us is None:
            return 0.0
        return (self.last_utc_us - self.first_utc_us) / 1e6

    @property
    def sessions(self) -> int:
        return sum(d.sessions for d in self.devices.values())

    def verdicts(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for d in self.devices.values():
            total.update(d.verdicts)
        return total

    @property
    def speedup(self) -> float:
        """Gateway time recorded per second taken (``span_s / wall_s``; 0 if nothing ran)."""
        return self.span_s / self.wall_s if self.wall_s > 0 else 0.0

    def as_dict(self) -> dict[str, object]:
        """The summary as plain JSON-able data (``devicegw replay --summary-json``)."""
        return {
            "files": self.files,
            "records": self.records,
            "rx_bytes": self.rx_bytes,
            "frames": self.frames,
            "sessions": self.sessions,
            "verdicts": dict(sorted(self.verdicts().items())),
            "span_s": self.span_s,
            "device_seconds": self.device_seconds,
            "wall_s": self.wall_s,
            "speedup": self.speedup,
            "skipped_bytes": self.skipped_bytes,
            "problems": list(self.problems),
            "devices": {
                device_id: {
                    "sessions": d.sessions,
                    "runs": d.runs,
                    "verdicts": dict(sorted(d.verdicts.items())),
                }
                for device_id, d in sorted(self.devices.items())
            },
        }


class _Sink:
    """The GatewaySink of a replayed device: counts verdicts, forwards what was asked for."""

    def __init__(
        self,
        summary: DeviceSummary,
        kinds: frozenset[str],
        emit: Callable[[Emitted], None] | None,
    ) -> None:
        self._summary = summary
        self._kinds = kinds
        self._emit = emit

    def _out(self, item: Emitted) -> None:
        if self._emit is not None and item.kind in self._kinds:
            self._emit(item)

    def dose_record(self, device_id: str, record: DoseRecord) -> None:
        self._summary.sessions += 1
        self._summary.verdicts[record.event.verdict] += 1
        self._out(Emitted(device_id, "dose", record.event))
        self._out(Emitted(device_id, "dose-detail", record.detail))

    def device_status(self, device_id: str, status: DeviceStatus) -> None:
        self._out(Emitted(device_id, "status", status))

    def device_detail(self, device_id: str, detail: DeviceDetail) -> None:
        self._out(Emitted(device_id, "device-detail", detail))

    def telemetry(self, device_id: str, telemetry: Telemetry, detail: TelemetryDetail) -> None:
        self._out(Emitted(device_id, "telemetry", telemetry))
        self._out(Emitted(device_id, "telemetry-detail", detail))

    def safety_event(self, device_id: str, payload: BaseModel) -> None:
        assert isinstance(payload, SafetyAlert | PostDoseSafetySummary)
        self._out(Emitted(device_id, "safety", payload))


@dataclass(slots=True)
class _Run:
    run_id: str
    pipeline: Vm1Pipeline
    first_utc_us: int
    last_utc_us: int
    bed: BedMonitor | None = None


class Player:
    """Feeds recordings through fresh pipelines; see the module docstring.

    ``emit`` receives every output of the kinds in ``kinds`` in the order the
    pipelines produce them. Files of one device are played one after the
    other (ordered by their first record); devices are interleaved by UTC.
    A new gateway run in a device's recording (another ``run_id``) starts a
    fresh pipeline, as the restarted daemon did.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        *,
        config: Config | None = None,
        emit: Callable[[Emitted], None] | None = None,
        kinds: Sequence[OutputKind] = ("dose",),
    ) -> None:
        self.paths = [Path(p) for p in paths]
        self.config = config
        self.summary = ReplaySummary(files=len(self.paths))
        self._emit = emit
        self._kinds = frozenset(kinds)
        #: Telemetry models are built only for someone who will see them.
        self._wants_telemetry = emit is not None and not self._kinds.isdisjoint(
            ("telemetry", "telemetry-detail")
        )
        self._runs: dict[str, _Run] = {}
        self._finished: list[_Run] = []
        self._groups: dict[str, list[tuple[int, Path]]] = {}
        self.total_bytes = 0
        for path in self.paths:
            header, rec = first_header(path)
            self._groups.setdefault(header.device_id, []).append((rec.utc_us, path))
            self.total_bytes += path.stat().st_size
        for group in self._groups.values():
            group.sort()

    def config_for(self, device_id: str) -> Config | None:
        """The configuration ``device_id``'s current pipeline runs with (None before its header).

        With a configuration given to the player, that one; otherwise the one
        rebuilt from the device's recording header.
        """
        run = self._runs.get(device_id)
        return run.pipeline.config if run is not None else self.config

    # -- the record stream -----------------------------------------------------------

    def _device_stream(self, device_id: str) -> Iterator[tuple[str, Record]]:
        for _, path in self._groups[device_id]:
            stats = ReadStats()
            for batch in iter_record_batches(path, stats):
                for rec in batch:
                    yield device_id, rec
            if stats.bytes_skipped:
                self.summary.skipped_bytes += stats.bytes_skipped
                self.summary.problems.append(f"{path}: {stats.problem}")

    def records(self) -> Iterator[tuple[str, Record]]:
        """Every record of every file, devices merged in UTC order (ties: device order)."""
        streams = [self._device_stream(d) for d in self._groups]
        if len(streams) == 1:
            return streams[0]
        # Plain tuples (UTC, device index, ...) merge without a key function per record;
        # the index settles ties before anything else is compared, as the key's merge did.
        keyed = [_keyed(i, stream) for i, stream in enumerate(streams)]
        return ((device_id, rec) for _, _, device_id, rec in heapq.merge(*keyed))

    # -- applying records ----------------------------------------------------------

    def _start_run(self, device_id: str, header: RecordingHeader, utc_us: int) -> _Run:
        if self.config is not None:
            config = self.config
            device = next((d for d in config.devices if d.id == device_id), None)
            if device is None:
                raise RecordingError(
                    f"device {device_id} of the recording is not in the given configuration"
                )
        else:
            config = header.config()
            device = config.devices[0]
        dev_summary = self.summary.devices.setdefault(device_id, DeviceSummary())
        dev_summary.runs += 1
        sink = _Sink(dev_summary, self._kinds, self._emit)
        oximeter = config.oximeter_for(device) if header.oximeter is not None else None
        bed = None if oximeter is None else BedMonitor(config, device, oximeter, sink)
        pipeline = Vm1Pipeline(device, config, sink, bed=bed, telemetry=self._wants_telemetry)
        return _Run(header.run_id, pipeline, utc_us, utc_us, bed)

    def apply(self, device_id: str, rec: Record) -> None:
        """Feed one record to its device's pipeline (the commonest kinds tested first)."""
        kind = rec.kind
        run = self._runs.get(device_id)
        if run is None or kind == HEADER:
            self._header(device_id, rec, run)
            return
        run.last_utc_us = rec.utc_us
        if kind == RX:
            self.summary.rx_bytes += len(rec.payload)
            try:  # noqa: SIM105 (contextlib.suppress costs ~0.25 us a frame)
                run.pipeline.feed(rec.payload, rec.utc, rec.mono)
            except UnexpectedDeviceError:
                pass  # a refused device: the live runner dropped the link; the close follows
        elif kind == OX_SAMPLE:
            if run.bed is not None:
                run.bed.feed(rec.mono, decode_sample(rec.payload))
        elif kind == BED_TICK:
            if run.bed is not None:
                run.bed.tick(rec.mono)
        elif kind == OPEN:
            run.pipeline.link_up(rec.utc)
        elif kind == CLOSE:
            run.pipeline.link_down(rec.utc)
        elif kind == TX:
            # What the gateway asked: an unanswerable GET_SESSION finishes a session.
            run.pipeline.sent(rec.payload)
        elif run.bed is not None:
            if kind == OX_UP:
                run.bed.oximeter_up(rec.mono)
            elif kind == OX_DOWN:
                run.bed.oximeter_down(rec.mono)

    def play_device(
        self,
        device_id: str,
        at: list[int] | None = None,
        problems: list[tuple[int, str]] | None = None,
    ) -> None:
        """All of one device's records, in its own order, as fast as possible.

        What :meth:`_note` and :meth:`apply` do for each record, with the kinds a ward
        is made of (R, S, K: ~99.9 % of records) handled here inline and every other
        kind handed to :meth:`apply`.

        ``at[0]``, if given, is set before each record is applied to the latest UTC of
        this device's records so far (that record's, unless the recorded clock went
        back): outputs stamped with it and merged by (stamp, device order) come out in
        the order of the UTC merge of :meth:`records` (see :func:`_merge_outputs`).
        ``problems``, if given, receives each damaged file's problem with the stamp it
        was found at, instead of the summary.
        """
        s = self.summary
        apply = self.apply
        count = rx_bytes = 0
        latest = _BEFORE_ANY  # this device's latest UTC so far (summary's last: the latest)
        run = self._runs.get(device_id)
        bed_feed, bed_tick, pipe_feed = _entry_points(run)
        epoch, micros = _EPOCH, timedelta
        decoded, new_record = DECODED_SAMPLES.get, tuple.__new__
        try:
            for _, path in self._groups[device_id]:
                stats = ReadStats()
                for batch in iter_field_batches(path, stats):
                    if s.first_utc_us is None:  # batches are never empty
                        s.first_utc_us = batch[0][2]
                    for fields in batch:
                        kind, mono, utc_us, payload = fields
                        count += 1
                        if utc_us > latest:  # (the first record of each call always is)
                            latest = utc_us
                            if at is not None:
                                at[0] = latest
                        if run is not None:  # the commonest kinds first
                            if kind == OX_SAMPLE:
                                run.last_utc_us = utc_us
                                if bed_feed is not None:
                                    # decode_sample's cache, looked up here: one call less
                                    sample = decoded(payload)
                                    if sample is None:
                                        sample = decode_sample(payload)
                                    bed_feed(mono, sample)
                                continue
                            if kind == RX:
                                run.last_utc_us = utc_us
                                rx_bytes += len(payload)
                                try:  # noqa: SIM105 (as in apply)
                                    # us_to_utc inline, positional: the same datetime, half the cost
                                    pipe_feed(payload, epoch + micros(0, 0, utc_us), mono)
                                except UnexpectedDeviceError:
                                    pass
                                continue
                            if kind == BED_TICK:
                                run.last_utc_us = utc_us
                                if bed_tick is not None:
                                    bed_tick(mono)
                                continue
                        apply(device_id, new_record(Record, fields))
                        run = self._runs.get(device_id)  # a header may have started a new run
                        bed_feed, bed_tick, pipe_feed = _entry_points(run)
                if stats.bytes_skipped:
                    s.skipped_bytes += stats.bytes_skipped
                    problem = f"{path}: {stats.problem}"
                    if problems is None:
                        s.problems.append(problem)
                    else:
                        problems.append((latest, problem))
        finally:
            s.records += count
            s.rx_bytes += rx_bytes
            if count and (s.last_utc_us is None or latest > s.last_utc_us):
                s.last_utc_us = latest

    def _header(self, device_id: str, rec: Record, run: _Run | None) -> None:
        """A header record: a new gateway run starts a fresh pipeline; nothing may precede one."""
        if rec.kind != HEADER:
            raise RecordingError(f"{device_id}: records before the first header")
        header = parse_header(rec)
        if run is None or run.run_id != header.run_id:
            if run is not None:
                self._finished.append(run)
            self._runs[device_id] = self._start_run(device_id, header, rec.utc_us)

    def _note(self, rec: Record) -> None:
        s = self.summary
        s.records += 1
        if s.first_utc_us is None:
            s.first_utc_us = rec.utc_us
        if s.last_utc_us is None or rec.utc_us > s.last_utc_us:
            s.last_utc_us = rec.utc_us

    def _finish(self, wall_s: float) -> ReplaySummary:
        s = self.summary
        s.wall_s = wall_s
        runs = [*self._finished, *self._runs.values()]
        s.device_seconds = sum((r.last_utc_us - r.first_utc_us) / 1e6 for r in runs)
        s.frames = sum(r.pipeline.health.frames_ok + r.pipeline.health.frames_bad for r in runs)
        return s

    # -- running ---------------------------------------------------------------------

    def run(self, *, progress: Callable[[int], None] | None = None) -> ReplaySummary:
        """As fast as possible, synchronously. ``progress`` gets approximate bytes read.

        Device by device (each device's pipeline stays hot in the cache instead of a
        hundred being touched in turn), the outputs held and then handed to ``emit``
        merged into the order of the UTC merge of :meth:`records`, which
        :meth:`run_async` plays; damaged files' problems likewise. If a record raises,
        nothing is emitted (as with :func:`play_parallel`).
        """
        t0 = time.perf_counter()
        devices = list(self._groups)
        if len(devices) == 1 and progress is None:
            self.play_device(devices[0])  # one device: outputs straight to emit
            return self._finish(time.perf_counter() - t0)
        emit = self._emit
        streams: list[list[_Timed]] = []
        problems: list[list[tuple[int, str]]] = []
        done = 0
        try:
            for device_id in devices:
                out: list[_Timed] = []
                at = [0]
                if emit is not None:  # the device's sinks are made at its header, below
                    self._emit = lambda item, out=out, at=at: out.append((at[0], item))
                found: list[tuple[int, str]] = []
                self.play_device(device_id, at, found)
                streams.append(out)
                problems.append(found)
                if progress is not None:
                    done += sum(path.stat().st_size for _, path in self._groups[device_id])
                    progress(done)
        finally:
            self._emit = emit
        for _, problem in _merge_outputs(problems):
            self.summary.problems.append(problem)
        if emit is not None:
            for _, item in _merge_outputs(streams):
                emit(item)
        return self._finish(time.perf_counter() - t0)

    async def run_async(
        self,
        *,
        speed: float | None,
        clock: Clock | None = None,
        progress: Callable[[int], None] | None = None,
        yield_every: int = 512,
    ) -> ReplaySummary:
        """Paced by ``clock`` (default ``ScaledClock(speed)``), or unpaced if ``speed`` is None.

        Unpaced, it still yields to the event loop every ``yield_every`` records,
        so a publisher task keeps draining.
        """
        t0 = time.perf_counter()
        if speed is not None and clock is None:
            clock = ScaledClock(speed)
        # Waits shorter than 2 ms of real time are batched with the next ones.
        min_ahead = 0.002 * clock.scale if clock is not None else 0.0
        start_us: int | None = None
        base = 0.0
        done = 0
        for n, (device_id, rec) in enumerate(self.records(), 1):
            if clock is not None:
                if start_us is None:
                    start_us, base = rec.utc_us, clock.monotonic()
                ahead = base + (rec.utc_us - start_us) / 1e6 - clock.monotonic()
                if ahead > min_ahead:
                    await clock.sleep(ahead)
            elif n % yield_every == 0:
                await asyncio.sleep(0)
            self._note(rec)
            self.apply(device_id, rec)
            done += len(rec.payload) + 25
            if progress is not None and (n % 256 == 0 or clock is not None):
                progress(done)
        if progress is not None:
            progress(self.total_bytes)
        return self._finish(time.perf_counter() - t0)


def _entry_points(
    run: _Run | None,
) -> tuple[
    Callable[[float, OximeterSample], None] | None,
    Callable[[float], None] | None,
    Callable[[bytes, datetime, float], object],
]:
    """A run's bed ``feed`` and ``tick`` (None without an oximeter) and pipeline ``feed``,
    bound once per run for :meth:`Player.play_device` (no attribute lookups per record)."""
    if run is None:
        return None, None, _no_run
    bed = run.bed
    if bed is None:
        return None, None, run.pipeline.feed
    return bed.feed, bed.tick, run.pipeline.feed


def _no_run(data: bytes, utc: datetime, mono: float) -> object:
    raise AssertionError("play_device feeds a pipeline only once a run has started")


def _keyed(
    index: int, stream: Iterator[tuple[str, Record]]
) -> Iterator[tuple[int, int, str, Record]]:
    for device_id, rec in stream:
        yield rec.utc_us, index, device_id, rec


# ======================================================================== parallel


#: The stamp before a device's first record: below any recorded UTC (an i64).
_BEFORE_ANY = -(1 << 64)
#: One device's outputs: (stamp of the record that produced it, the output), in order.
_Timed = tuple[int, Emitted]
_T = TypeVar("_T")


def _play_device(
    job: tuple[list[Path], Config | None, tuple[OutputKind, ...]],
) -> tuple[ReplaySummary, list[_Timed]]:
    """Worker: one device's files through its own player; outputs stamped with their UTC."""
    paths, config, kinds = job
    out: list[_Timed] = []
    at = [0]
    player = Player(paths, config=config, kinds=kinds, emit=lambda item: out.append((at[0], item)))
    t0 = time.perf_counter()
    for device_id in player._groups:
        player.play_device(device_id, at)
    return player._finish(time.perf_counter() - t0), out


#: A replay worker's young-generation threshold (CPython's default: 700). A replay
#: allocates millions of short-lived tuples; collecting them 14x less often, with what
#: the worker inherited frozen, is ~3 % fewer instructions (callgrind, one BID bed).
WORKER_GC_GEN0 = 10_000


def _worker_gc() -> None:
    """A replay worker's collector: what it inherited frozen, young collections rarer."""
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(WORKER_GC_GEN0, gen1, gen2)


def _merge_summaries(parts: Sequence[ReplaySummary], files: int, wall_s: float) -> ReplaySummary:
    total = ReplaySummary(files=files, wall_s=wall_s)
    for part in parts:
        total.records += part.records
        total.rx_bytes += part.rx_bytes
        total.frames += part.frames
        total.device_seconds += part.device_seconds
        total.skipped_bytes += part.skipped_bytes
        total.problems.extend(part.problems)
        total.devices.update(part.devices)
        if part.first_utc_us is not None and (
            total.first_utc_us is None or part.first_utc_us < total.first_utc_us
        ):
            total.first_utc_us = part.first_utc_us
        if part.last_utc_us is not None and (
            total.last_utc_us is None or part.last_utc_us > total.last_utc_us
        ):
            total.last_utc_us = part.last_utc_us
    return total


def play_parallel(
    paths: Sequence[str | Path],
    *,
    jobs: int,
    config: Config | None = None,
    emit: Callable[[Emitted], None] | None = None,
    kinds: Sequence[OutputKind] = ("dose",),
) -> ReplaySummary:
    """Replay as fast as possible with each device in a worker process (``jobs`` of them).

    Devices are independent (one pipeline each), so each device's files are
    played by one worker. The outputs are handed to ``emit`` after all workers
    finished, merged as :meth:`Player.run` merges them (:func:`_merge_outputs`): the
    order of the UTC merge of every record, as :meth:`Player.run_async` plays them.
    The summary is the sum of the workers' (``wall_s``: the whole parallel run).
    """
    t0 = time.perf_counter()
    layout = Player(paths, config=config, kinds=kinds)  # groups the files by device
    job_list = [([p for _, p in group], config, tuple(kinds)) for group in layout._groups.values()]
    if jobs <= 1 or len(job_list) <= 1:
        results = [_play_device(job) for job in job_list]
    else:
        # Biggest devices first, one per task: the workers finish together (chunks of
        # devices left one worker alone with the last chunk). Results keep device order.
        size = [sum(p.stat().st_size for p in job[0]) for job in job_list]
        order = sorted(range(len(job_list)), key=lambda i: -size[i])
        workers = min(jobs, len(job_list))
        with ProcessPoolExecutor(max_workers=workers, initializer=_worker_gc) as pool:
            done = pool.map(_play_device, [job_list[i] for i in order])
            by_index = dict(zip(order, done, strict=True))
        results = [by_index[i] for i in range(len(job_list))]
    if emit is not None:
        for _, item in _merge_outputs([outputs for _, outputs in results]):
            emit(item)
    return _merge_summaries(
        [part for part, _ in results], len(layout.paths), time.perf_counter() - t0
    )


def _merge_outputs(streams: Sequence[list[tuple[int, _T]]]) -> Iterator[tuple[int, _T]]:
    """Per-device outputs stamped by :meth:`Player.play_device`, merged by (stamp, device
    order, the device's own order): the order of the UTC merge of :meth:`Player.records`.

    ``heapq.merge`` of record streams keyed by (UTC, device index) emits a record once
    it heads its stream and is the least head; a record after a later one in its own
    stream (the recorded clock went back) waits for it. So each record comes out where
    its device's latest UTC so far would put it -- the stamp -- and an output comes out
    with the record that made it.
    """
    return heapq.merge(*streams, key=_stamp)


def _stamp(item: tuple[int, object]) -> int:
    return item[0]
