"""Recordings of raw link events: the ``.dgwrec`` format, its writer and its reader.

The writer (:class:`RecordingWriter`) is just another :class:`LinkObserver`
(STYLE item 5): the device runners hand it every byte received or sent and
every link open/close, with the gateway's clock readings at that moment. The
reader (:func:`iter_records`, :class:`RecordDecoder`) streams the records back
so :mod:`devicegw.recording.player` can feed them through the same pipeline.

The format is documented in ``docs/recording-format.md``. In short: an 8-byte
magic, then length-prefixed, CRC-32-checked records. Each record is
``kind, gateway monotonic (f64), gateway UTC (i64 microseconds), payload``.
The first record of every file, and of every gateway run appended to it, is a
header (JSON) with the format version, the device's configuration and the
gateway's identity, so a recording replays without the original config file.

A torn tail (the gateway died mid-write) is detected by the length prefix and
the CRC; readers stop there and report how many bytes they skipped, never
fail. A writer re-opening a file with a torn tail cuts the tail off first, so
what it appends stays readable.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO, Literal, NamedTuple, TypeVar, cast

from pydantic import BaseModel, ConfigDict, ValidationError

from devicegw import __version__
from devicegw.config import (
    Config,
    DeviceSettings,
    DoseRules,
    GatewaySettings,
    OximeterSettings,
    Spo2Rules,
    TelemetrySettings,
)
from devicegw.errors import ProtocolError
from devicegw.safe_text import printable

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "ReadStats",
    "Record",
    "RecordDecoder",
    "RecordFields",
    "RecordingError",
    "RecordingHeader",
    "RecordingWriter",
    "encode_record",
    "file_name",
    "iter_field_batches",
    "iter_record_batches",
    "iter_records",
    "make_header",
    "us_to_utc",
    "utc_to_us",
]

log = logging.getLogger(__name__)

MAGIC = b"DGWREC1\n"
#: Version 1: the nebulizer link only. Version 2 adds the bed's oximeter inputs (kinds
#: S, U, D, K) and is written only for a device whose bed has an oximeter, so recordings
#: of beds without one stay version 1, byte for byte.
FORMAT_VERSION = 1
FORMAT_VERSION_BED = 2
READ_VERSIONS = frozenset((1, 2))
SUFFIX = ".dgwrec"

# Record kinds (one ASCII byte each, readable in a hex dump).
HEADER = "H"
OPEN = "O"
CLOSE = "C"
RX = "R"
TX = "T"
# Version 2: what the bed's SpO2 monitor was given (devicegw/recording/bed_inputs.py).
OX_SAMPLE = "S"
OX_UP = "U"
OX_DOWN = "D"
BED_TICK = "K"
BED_KINDS = frozenset((OX_SAMPLE, OX_UP, OX_DOWN, BED_TICK))
KINDS = frozenset((HEADER, OPEN, CLOSE, RX, TX)) | BED_KINDS
#: Kind byte -> kind (None: not a kind): one index per record instead of chr() and a set test.
_KIND_OF: tuple[str | None, ...] = tuple(chr(b) if chr(b) in KINDS else None for b in range(256))

#: ``<u32 body length><u32 CRC-32 of body>`` before every body.
_PREFIX = struct.Struct("<II")
#: ``<u8 kind><f64 gateway monotonic s><i64 gateway UTC us since 1970>`` at the start of a body.
_BODY = struct.Struct("<Bdq")
#: Longest body a reader accepts; anything longer is corruption, not a record.
MAX_BODY = 1 << 20
#: ``_PREFIX`` and ``_BODY`` in one: what the reader unpacks per record.
_HEAD = struct.Struct("<IIBdq")
assert _HEAD.size == _PREFIX.size + _BODY.size

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
_US_PER_DAY = 86_400_000_000
_FLUSH_BYTES = 64 * 1024


class RecordingError(ProtocolError):
    """A file is not a recording, or a header cannot be understood."""


def utc_to_us(utc: datetime) -> int:
    """Exact microseconds since the Unix epoch (no float rounding)."""
    return (utc - _EPOCH) // _US


def us_to_utc(us: int) -> datetime:
    return _EPOCH + timedelta(0, 0, us)  # positional: the same value, half the cost


_new_tuple = tuple.__new__


_R = TypeVar("_R")

#: A record's four fields as a plain tuple (see :meth:`RecordDecoder.feed_fields`).
RecordFields = tuple[str, float, int, bytes]


class Record(NamedTuple):
    """One link event as recorded; ``kind`` is one of ``H O C R T S U D K``.

    Immutable; a NamedTuple rather than a frozen dataclass because a replay makes
    one per record (millions), and it costs half as much to build.
    """

    kind: str
    mono: float
    utc_us: int
    payload: bytes

    @property
    def utc(self) -> datetime:
        return us_to_utc(self.utc_us)

    def text(self) -> str:
        """The payload of H/O/C records (UTF-8 text)."""
        return self.payload.decode("utf-8", errors="replace")


def encode_record(kind: str, mono: float, utc_us: int, payload: bytes) -> bytes:
    """The bytes of one record (prefix + body); pure."""
    body = _BODY.pack(ord(kind), mono, utc_us) + payload
    return _PREFIX.pack(len(body), zlib.crc32(body)) + body


class _Gateway(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)
    id: str
    site: str


class RecordingHeader(BaseModel):
    """The JSON payload of an ``H`` record. Unknown keys are kept (newer minor versions)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    format: Literal["devicegw-recording"] = "devicegw-recording"
    version: int
    run_id: str
    source: str = "gateway"
    gateway: _Gateway
    gateway_version: str = ""
    config_sha256: str = ""
    device_id: str
    device: DeviceSettings | None = None
    dose_rules: DoseRules = DoseRules()
    telemetry: TelemetrySettings = TelemetrySettings()
    #: Version 2: the oximeter on the device's bed and the SpO2 rules it was judged by.
    oximeter: OximeterSettings | None = None
    spo2_rules: Spo2Rules | None = None
    extra: dict[str, Any] | None = None

    def encode(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode("utf-8")

    def config(self) -> Config:
        """A configuration equivalent to the recording gateway's, for this one device."""
        if self.device is None:
            raise RecordingError(
                f"recording of {self.device_id} has no device configuration; replay with --config"
            )
        return Config(
            gateway=GatewaySettings(id=self.gateway.id, site=self.gateway.site),
            dose_rules=self.dose_rules,
            telemetry=self.telemetry,
            spo2_rules=self.spo2_rules or Spo2Rules(),
            devices=[self.device],
            oximeters=[] if self.oximeter is None else [self.oximeter],
            source_sha256=self.config_sha256,
        )


def parse_header(record: Record) -> RecordingHeader:
    try:
        data = json.loads(record.payload)
        header = RecordingHeader.model_validate(data)
    except (ValueError, ValidationError) as exc:
        raise RecordingError(f"unreadable recording header: {exc}") from exc
    if header.version not in READ_VERSIONS:
        raise RecordingError(
            f"recording format version {header.version} is not supported "
            f"(this devicegw reads versions {', '.join(map(str, sorted(READ_VERSIONS)))})"
        )
    return header


def make_header(
    config: Config,
    device_id: str,
    *,
    run_id: str,
    source: str = "gateway",
    extra: dict[str, Any] | None = None,
) -> RecordingHeader:
    device = next((d for d in config.devices if d.id == device_id), None)
    oximeter = None if device is None else config.oximeter_for(device)
    return RecordingHeader(
        version=FORMAT_VERSION if oximeter is None else FORMAT_VERSION_BED,
        run_id=run_id,
        source=source,
        gateway=_Gateway(id=config.gateway.id, site=config.gateway.site),
        gateway_version=__version__,
        config_sha256=config.source_sha256,
        device_id=device_id,
        device=device,
        dose_rules=config.dose_rules,
        telemetry=config.telemetry,
        oximeter=oximeter,
        spo2_rules=None if oximeter is None else config.spo2_rules,
        extra=extra,
    )


def file_name(device_id: str, day: int) -> str:
    """``<device>-<YYYYMMDD>.dgwrec`` for the UTC day number ``day`` (days since 1970)."""
    return f"{device_id}-{(_EPOCH + timedelta(days=day)):%Y%m%d}{SUFFIX}"


# ---------------------------------------------------------------------------------- reading


@dataclass(slots=True)
class ReadStats:
    records: int = 0
    bytes_ok: int = 0
    #: Bytes after the last good record (a torn tail or corruption); 0 for a clean file.
    bytes_skipped: int = 0
    problem: str | None = None


class RecordDecoder:
    """Bytes of a recording -> records; sans-I/O (STYLE item 1).

    ``feed`` returns the records completed by the data. A bad prefix or CRC
    ends decoding: the rest is reported by :meth:`finish` as skipped bytes.
    """

    def __init__(self) -> None:
        self.stats = ReadStats()
        self._buf = bytearray()
        self._magic_ok = False
        self._dead = False

    def feed(self, data: bytes) -> list[Record]:
        return cast("list[Record]", self._feed(data, plain=False))

    def feed_fields(self, data: bytes) -> list[RecordFields]:
        """:meth:`feed` with plain tuples of the same four fields: a reader that unpacks
        each record at once (a replay, millions of them) skips building the NamedTuple."""
        return cast("list[RecordFields]", self._feed(data, plain=True))

    def _feed(self, data: bytes, *, plain: bool) -> list[Any]:
        if self._dead:
            self.stats.bytes_skipped += len(data)
            return []
        buf = self._buf
        buf += data
        pos = 0
        if not self._magic_ok:
            if len(buf) < len(MAGIC):
                if MAGIC.startswith(bytes(buf)):
                    return []
                raise RecordingError("not a devicegw recording (bad magic)")
            if buf[: len(MAGIC)] != MAGIC:
                raise RecordingError("not a devicegw recording (bad magic)")
            self._magic_ok = True
            pos = len(MAGIC)
            self.stats.bytes_ok += len(MAGIC)
        out: list[Any] = []
        n = len(buf)
        unpack_prefix = _PREFIX.unpack_from
        crc32 = zlib.crc32
        body_min = _BODY.size
        if n - pos < 8:
            del buf[:pos]
            return out
        first_length = unpack_prefix(buf, pos)[0]
        if body_min <= first_length <= MAX_BODY and pos + 8 + first_length > n:
            del buf[:pos]  # no complete record yet (a bad length is judged below)
            return out
        # One copy of the buffer per feed that completes a record; then each payload is
        # copied once (a slice of bytes). The CRC reads a slice of the body too: a small
        # copy costs fewer instructions than a memoryview slice (callgrind: ~1,700 vs ~2,000).
        data_b = bytes(buf)
        kind_of = _KIND_OF
        append = out.append
        first = pos  # bytes_ok is settled once, after the loop
        unpack_head = _HEAD.unpack_from
        max_body = MAX_BODY
        head = _HEAD.size  # prefix + body header: the shortest possible record
        limit = n - head
        # Prefix and body header in one unpack; the body's fields are used only once the
        # CRC has vouched for them. Fewer than ``head`` bytes left are judged after the loop.
        while pos <= limit:
            length, crc, kind_b, mono, utc_us = unpack_head(data_b, pos)
            end = pos + 8 + length
            if length < body_min or length > max_body:
                self._die(f"bad record length {length} at byte {self.stats.bytes_ok + pos - first}")
                break
            if end > n:
                break
            if crc32(data_b[pos + 8 : end]) != crc:
                self._die(f"CRC mismatch in the record at byte {self.stats.bytes_ok + pos - first}")
                break
            kind = kind_of[kind_b]
            if kind is None:
                at = self.stats.bytes_ok + pos - first
                self._die(f"unknown record kind {chr(kind_b)!r} at byte {at}")
                break
            append((kind, mono, utc_us, data_b[pos + head : end]))
            pos = end
        if not self._dead and n - pos >= 8:
            # A prefix but not a whole body header: a record still coming, or a bad length.
            length = unpack_prefix(data_b, pos)[0]
            if length < body_min or length > max_body:
                self._die(f"bad record length {length} at byte {self.stats.bytes_ok + pos - first}")
        self.stats.bytes_ok += pos - first
        if self._dead:
            self.stats.bytes_skipped += n - pos
            buf.clear()
        else:
            del buf[:pos]
        self.stats.records += len(out)
        if not plain:  # Record(...) without its Python-level __new__: the same tuple, half the cost
            new_record = _new_tuple
            return [new_record(Record, fields) for fields in out]
        return out

    def _die(self, problem: str) -> None:
        self._dead = True
        self.stats.problem = problem

    def finish(self) -> ReadStats:
        """End of input: whatever is left over is a torn tail."""
        if not self._magic_ok and not self._dead:
            if self._buf:
                self._die("file ends inside the magic")
                self.stats.bytes_skipped += len(self._buf)
                self._buf.clear()
            return self.stats
        if self._buf:
            if self.stats.problem is None:
                self.stats.problem = f"truncated record at byte {self.stats.bytes_ok}"
            self.stats.bytes_skipped += len(self._buf)
            self._buf.clear()
        return self.stats


def iter_records(
    path: str | Path, stats: ReadStats | None = None, *, chunk: int = 256 * 1024
) -> Iterator[Record]:
    """Stream the records of one file; a torn or corrupt tail ends the stream quietly.

    Pass ``stats`` to learn how many bytes were skipped (and why) once the
    iterator is exhausted. A file that is not a recording raises RecordingError.
    """
    for batch in iter_record_batches(path, stats, chunk=chunk):
        yield from batch


def iter_record_batches(
    path: str | Path, stats: ReadStats | None = None, *, chunk: int = 256 * 1024
) -> Iterator[list[Record]]:
    """:func:`iter_records` a list at a time (the records of one read of ``chunk`` bytes):
    for a reader that loops over millions of records, one generator step per read
    instead of one per record."""
    return _batches(path, stats, chunk, RecordDecoder.feed)


def iter_field_batches(
    path: str | Path, stats: ReadStats | None = None, *, chunk: int = 256 * 1024
) -> Iterator[list[RecordFields]]:
    """:func:`iter_record_batches` as plain tuples (:meth:`RecordDecoder.feed_fields`)."""
    return _batches(path, stats, chunk, RecordDecoder.feed_fields)


def _batches(
    path: str | Path,
    stats: ReadStats | None,
    chunk: int,
    feed: Callable[[RecordDecoder, bytes], list[_R]],
) -> Iterator[list[_R]]:
    decoder = RecordDecoder()
    with open(path, "rb") as f:
        while True:
            data = f.read(chunk)
            if not data:
                break
            records = feed(decoder, data)
            if records:
                yield records
    final = decoder.finish()
    if stats is not None:
        stats.records = final.records
        stats.bytes_ok = final.bytes_ok
        stats.bytes_skipped = final.bytes_skipped
        stats.problem = final.problem
    if final.bytes_skipped:
        log.warning(
            "%s: %d bytes after the last good record skipped (%s)",
            path,
            final.bytes_skipped,
            final.problem,
        )


def first_header(path: str | Path) -> tuple[RecordingHeader, Record]:
    """The header of a file (its first record) without reading the rest."""
    decoder = RecordDecoder()
    with open(path, "rb") as f:
        while True:
            data = f.read(4096)
            if not data:
                break
            records = decoder.feed(data)
            if records:
                rec = records[0]
                if rec.kind != HEADER:
                    raise RecordingError(f"{path}: first record is not a header")
                return parse_header(rec), rec
    raise RecordingError(f"{path}: no complete header record")


def _good_length(path: Path) -> int:
    """Length of the readable prefix of an existing file (0 if it is not a recording)."""
    decoder = RecordDecoder()
    try:
        with open(path, "rb") as f:
            while data := f.read(256 * 1024):
                decoder.feed(data)
    except RecordingError:
        return 0
    return decoder.finish().bytes_ok


# ---------------------------------------------------------------------------------- writing


@dataclass(slots=True)
class _DeviceFile:
    day: int
    path: Path
    fh: BinaryIO
    buf: bytearray = field(default_factory=bytearray)
    last_flush_mono: float = float("-inf")


@dataclass(slots=True)
class WriterStats:
    records: int = 0
    bytes: int = 0
    files_opened: int = 0
    records_dropped: int = 0


class RecordingWriter:
    """A link observer appending to ``<dir>/<device>-<day>.dgwrec``.

    One file per device per UTC day (of the gateway clock). Each gateway run
    starts with a header record carrying ``run_id``; a day change opens the
    next file with the same ``run_id`` (the replayer then carries on with the
    same session state). ``flush_interval_s`` is gateway-clock seconds between
    writes to the OS: 0 writes every record at once (the default; a crash
    loses at most the record being written). Nothing is fsync'ed.

    A write error is logged once per device at ERROR and that device's
    recording stops; the dose path is never affected.
    """

    def __init__(
        self,
        directory: str | Path,
        config: Config,
        *,
        run_id: str | None = None,
        flush_interval_s: float = 0.0,
        source: str = "gateway",
        header_extra: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.config = config
        self.run_id = run_id or str(uuid.uuid4())
        self.flush_interval_s = flush_interval_s
        self.source = source
        self.stats = WriterStats()
        self._header_extra = header_extra or {}
        self._files: dict[str, _DeviceFile] = {}
        self._failed: set[str] = set()
        self._headers: dict[str, bytes] = {}

    # -- LinkObserver ---------------------------------------------------------------

    def link_opened(self, device_id: str, description: str, utc: datetime, mono: float) -> None:
        self.append(device_id, OPEN, mono, utc_to_us(utc), description.encode("utf-8"))

    def link_closed(self, device_id: str, reason: str, utc: datetime, mono: float) -> None:
        self.append(device_id, CLOSE, mono, utc_to_us(utc), reason.encode("utf-8"))
        self.flush(device_id)

    def bytes_received(self, device_id: str, data: bytes, utc: datetime, mono: float) -> None:
        self.append(device_id, RX, mono, utc_to_us(utc), data)

    def bytes_sent(self, device_id: str, data: bytes, utc: datetime, mono: float) -> None:
        self.append(device_id, TX, mono, utc_to_us(utc), data)

    # -- the rest -------------------------------------------------------------------

    def append(self, device_id: str, kind: str, mono: float, utc_us: int, payload: bytes) -> None:
        """Append one record (the fast path the observer methods and the scenario runner use)."""
        if device_id in self._failed:
            self.stats.records_dropped += 1
            return
        try:
            df = self._files.get(device_id)
            day = utc_us // _US_PER_DAY
            if df is None or df.day != day:
                df = self._open(device_id, day, mono, utc_us)
            rec = encode_record(kind, mono, utc_us, payload)
            df.buf += rec
            self.stats.records += 1
            self.stats.bytes += len(rec)
            if mono - df.last_flush_mono >= self.flush_interval_s or len(df.buf) >= _FLUSH_BYTES:
                df.last_flush_mono = mono
                self._write_out(df)
        except OSError as exc:
            self._fail(device_id, exc)

    def flush(self, device_id: str | None = None) -> None:
        for dev, df in list(self._files.items()):
            if device_id is not None and dev != device_id:
                continue
            try:
                self._write_out(df)
            except OSError as exc:
                self._fail(dev, exc)

    def close(self) -> None:
        """Flush and close every file; safe to call twice."""
        self.flush()
        for df in self._files.values():
            try:
                df.fh.close()
            except OSError:
                log.exception("recording: closing %s failed", df.path)
        self._files.clear()

    def paths(self) -> list[Path]:
        return sorted(self.directory.glob(f"*{SUFFIX}"))

    def _write_out(self, df: _DeviceFile) -> None:
        if df.buf:
            df.fh.write(df.buf)
            df.buf.clear()

    def _open(self, device_id: str, day: int, mono: float, utc_us: int) -> _DeviceFile:
        old = self._files.pop(device_id, None)
        if old is not None:
            self._write_out(old)
            old.fh.close()
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / file_name(device_id, day)
        good = _good_length(path) if path.exists() else 0
        fh = open(path, "r+b" if path.exists() else "wb", buffering=0)  # noqa: SIM115
        try:
            size = fh.seek(0, os.SEEK_END)
            if good < size:
                if good:
                    log.warning(
                        "recording %s: cutting %d bytes of a torn tail before appending",
                        path,
                        size - good,
                    )
                    fh.truncate(good)
                    fh.seek(good)
                else:
                    fh.truncate(0)
                    fh.seek(0)
            if fh.tell() == 0:
                fh.write(MAGIC)
            header = self._headers.get(device_id)
            if header is None:
                header = make_header(
                    self.config,
                    device_id,
                    run_id=self.run_id,
                    source=self.source,
                    extra=self._header_extra.get(device_id),
                ).encode()
                self._headers[device_id] = header
            fh.write(encode_record(HEADER, mono, utc_us, header))
        except BaseException:
            fh.close()
            raise
        df = _DeviceFile(day=day, path=path, fh=fh)
        self._files[device_id] = df
        self.stats.files_opened += 1
        return df

    def _fail(self, device_id: str, exc: OSError) -> None:
        self._failed.add(device_id)
        self.stats.records_dropped += 1
        df = self._files.pop(device_id, None)
        if df is not None:
            try:
                df.fh.close()
            except OSError:
                log.debug("recording: close after failure", exc_info=True)
        log.error(
            "recording for device %s stopped: cannot write: %s",
            device_id,
            exc,
            exc_info=exc,
            extra={"device_id": device_id},
        )


# ---------------------------------------------------------------------------------- showing


_BED_LABELS = {
    OX_SAMPLE: "oximeter sample",
    OX_UP: "oximeter up",
    OX_DOWN: "oximeter down",
    BED_TICK: "bed tick",
}


def show_lines(path: str | Path, *, limit: int | None = None, hex_bytes: int = 24) -> Iterator[str]:
    """Human-readable lines for ``devicegw recording show``: one per record and per message."""
    from drivers.link_unit import LinkUnit
    from drivers.vm1.stream import vm1_decoder

    stats = ReadStats()
    unit: LinkUnit = "stream"  # a BLE device's records are one payload each
    decoders = {RX: vm1_decoder(unit), TX: vm1_decoder(unit)}
    device = "?"
    shown = 0
    for rec in iter_records(path, stats):
        if limit is not None and shown >= limit:
            return
        shown += 1
        when = f"{rec.utc:%Y-%m-%dT%H:%M:%S.%f}Z mono={rec.mono:12.6f}"
        if rec.kind == HEADER:
            h = parse_header(rec)
            device = h.device_id
            dev = h.device
            unit = "message" if dev is not None and dev.link.kind == "ble" else "stream"
            who = (
                f" bed={dev.bed} subject={dev.subject_id} kit={dev.kit_number} type={dev.type}"
                if dev
                else ""
            )
            yield (
                f"{when} {device} H format v{h.version} run={h.run_id} source={h.source} "
                f"gateway={h.gateway.id}@{h.gateway.site} devicegw={h.gateway_version}{who}"
            )
            continue
        if rec.kind in (OPEN, CLOSE):
            decoders = {RX: vm1_decoder(unit), TX: vm1_decoder(unit)}
            label = "open" if rec.kind == OPEN else "close"
            yield f"{when} {device} {rec.kind} {label}: {printable(rec.text(), limit=300)}"
            continue
        if rec.kind in BED_KINDS:
            label = _BED_LABELS[rec.kind]
            text = printable(rec.text(), limit=300)
            yield f"{when} {device} {rec.kind} {label}" + (f": {text}" if rec.payload else "")
            continue
        raw = rec.payload.hex(" ")
        if len(rec.payload) > hex_bytes:
            raw = rec.payload[:hex_bytes].hex(" ") + " …"
        direction = "rx" if rec.kind == RX else "tx"
        yield f"{when} {device} {rec.kind} {direction} {len(rec.payload)} B  {raw}"
        for msg in decoders[rec.kind].feed(rec.payload):
            yield f"{'':>52}-> {msg}"
    if stats.bytes_skipped:
        yield f"! {stats.bytes_skipped} bytes skipped at the end: {stats.problem}"
