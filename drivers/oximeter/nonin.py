"""Nonin OEM III module, serial data format #2: frames, packets and a stream decoder.

Serial settings (OEM III specification): 9600 baud, 8 data bits, no parity,
1 stop bit, no flow control (:data:`SERIAL_SETTINGS`). The module streams 75
frames/s without being asked, so the port may open mid-packet.

Frame (5 bytes): ``0x01, STATUS, PLETH, DATA, CHK`` with
CHK = (sum of the first four bytes) mod 256. 25 frames make a packet (one
every 1/3 s); the first frame of a packet has STATUS bit 0 (SYNC) set.

STATUS bits, checked against Pez-Globo Pufferfish (``Driver/Serial/Nonin``),
the Oxford IBME Nonin driver (``NoninFrame``/``NoninPacket``) and their
quotes of the OEM III specification:

====  =====  ==============================================================
bit   name   meaning
====  =====  ==============================================================
7            always 1
6     SNSD   sensor disconnected (or inoperable)
5     ARTF   artifact: a detected beat did not match the current interval
4     OOT    out of track: an absence of consecutive good pulse signals
3     SNSA   sensor alarm: the sensor is providing unusable data
2     RPRF   red perfusion (low signal amplitude)       } both set = YPRF,
1     GPRF   green perfusion (high signal amplitude)    } yellow (medium)
0     SYNC   first frame of a packet
====  =====  ==============================================================

The issue text guessed "bit 2 YPRF, bit 1 RPRF"; both sources say bit 2 is
red, bit 1 green and *both* mean yellow, which is what we implement.
(Pufferfish tests the 0x06 mask first with ``!= 0``, which reports yellow
for red or green alone; Oxford's decoder tests the bits correctly.) The
perfusion bits, like ARTF, are only reported during a pulse.

DATA byte by frame (1-based frame numbers as in the specification; "-D"
values are formatted for display and hold the last value for about 10 s
after the finger is removed, the others switch to "missing" at once):

=====  ==============================================================
frame  content
=====  ==============================================================
1, 2   HR MSB / LSB, 4-beat average: HR = (MSB & 0x03) << 7 | (LSB & 0x7F)
3      SpO2, 4-beat average
4      firmware revision
5-8    reserved
9      SpO2-D (display)
10     SpO2 Fast (4-beat, non-slew-limited)
11     SpO2 B-B (beat to beat, unaveraged)
12-13  reserved
14,15  E-HR MSB / LSB (8-beat extended average)
16     E-SpO2 (8-beat)
17     E-SpO2-D (8-beat, display)
18-19  reserved
20,21  HR-D MSB / LSB (display)
22,23  E-HR-D MSB / LSB (8-beat, display)
24-25  reserved
=====  ==============================================================

Missing values: HR 511, SpO2 127 -> ``None``. The reserved bits of an HR
MSB byte are masked off, reserved frames are ignored (the encoder sends 0).
A complete packet whose SpO2 byte is neither 0-100 nor 127 is rejected as
corrupt (the additive checksum is weak) and counted in ``bad_packets``.

Stream rules (:class:`NoninDecoder`): a frame is valid when byte 0 is 0x01,
STATUS bit 7 is set and the checksum matches; otherwise one byte is dropped
and the search goes on. A packet is the 25 consecutive valid frames starting
at a SYNC frame. Any dropped byte, or a SYNC frame arriving early, ends the
packet in progress, which is dropped and counted in ``packets_incomplete``:
frame positions carry the meaning of DATA, so a packet with a hole cannot be
trusted. Valid frames seen outside a packet (before the first SYNC frame, or
after a broken packet) are counted in ``frames_orphaned``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, IntFlag
from functools import reduce
from operator import or_

from drivers.errors import ProtocolError
from drivers.oximeter.sample import OximeterSample, QualityFlag

__all__ = [
    "FRAMES_PER_PACKET",
    "FRAME_LEN",
    "HR_MISSING",
    "PACKET_LEN",
    "SERIAL_SETTINGS",
    "SPO2_MISSING",
    "NoninDecoder",
    "NoninPacket",
    "NoninStats",
    "NoninStatus",
    "Perfusion",
    "SerialSettings",
    "decode_packet",
    "encode_packet",
    "frame_checksum",
    "make_packet",
    "to_sample",
]

SOURCE = "nonin-oem3"
FRAME_LEN = 5
FRAMES_PER_PACKET = 25
PACKET_LEN = FRAME_LEN * FRAMES_PER_PACKET  # 125
START = 0x01
HR_MISSING = 511
SPO2_MISSING = 127
_HR_MAX = 0x1FF


@dataclass(frozen=True, slots=True)
class SerialSettings:
    """Port settings a serial link must use for this device."""

    baudrate: int
    bytesize: int
    parity: str
    stopbits: int
    flow_control: bool


SERIAL_SETTINGS = SerialSettings(
    baudrate=9600, bytesize=8, parity="N", stopbits=1, flow_control=False
)


class NoninStatus(IntFlag):
    """STATUS byte of a format #2 frame."""

    SYNC = 0x01
    GPRF = 0x02
    RPRF = 0x04
    SNSA = 0x08
    OOT = 0x10
    ARTF = 0x20
    SNSD = 0x40
    BIT7 = 0x80


# Plain ints and a lookup table for the per-frame path: an IntFlag operation goes through
# enum's Python-level __and__/__call__ (issue 13's profile: the top cost at 100 beds).
_SYNC_BIT = int(NoninStatus.SYNC)
_GPRF_BIT = int(NoninStatus.GPRF)
_RPRF_BIT = int(NoninStatus.RPRF)
_BIT7_BIT = int(NoninStatus.BIT7)
_STATUS_OF = tuple(NoninStatus(i) for i in range(256))
# A whole packet checked at once (NoninDecoder._whole_packet): every frame's START byte,
# and the STATUS bits that say where the packet starts.
_STARTS = bytes([START]) * FRAMES_PER_PACKET
_SYNC_MASK = _SYNC_BIT | _BIT7_BIT  # frame 1 has both bits; frames 2-25 only BIT7


class Perfusion(Enum):
    """Signal amplitude class from the GPRF/RPRF bits; ordered worst last."""

    NONE = 0  # outside a pulse: no indication
    GREEN = 1
    YELLOW = 2
    RED = 3


def perfusion_of(status: NoninStatus) -> Perfusion:
    """Perfusion class of one STATUS byte: bit 2 red, bit 1 green, both yellow."""
    v = int(status)
    red = bool(v & _RPRF_BIT)
    green = bool(v & _GPRF_BIT)
    if red and green:
        return Perfusion.YELLOW
    if red:
        return Perfusion.RED
    if green:
        return Perfusion.GREEN
    return Perfusion.NONE


_PERFUSION_OF = tuple(perfusion_of(_STATUS_OF[i]).value for i in range(256))

# 0-based frame index of each DATA value.
_HR = (0, 1)
_SPO2 = 2
_REV = 3
_SPO2_D = 8
_SPO2_FAST = 9
_SPO2_BB = 10
_E_HR = (13, 14)
_E_SPO2 = 15
_E_SPO2_D = 16
_HR_D = (19, 20)
_E_HR_D = (21, 22)


@dataclass(frozen=True, slots=True, kw_only=True)
class NoninPacket:
    """One 25-frame packet: per-frame STATUS and pleth plus the values the DATA bytes carry.

    ``statuses`` are kept as received (bit 7 set, SYNC on the first frame).
    """

    statuses: tuple[NoninStatus, ...]
    pleth: tuple[int, ...]
    hr: int | None
    spo2: int | None
    firmware_revision: int
    spo2_display: int | None
    spo2_fast: int | None
    spo2_beat_to_beat: int | None
    hr_extended: int | None
    spo2_extended: int | None
    spo2_extended_display: int | None
    hr_display: int | None
    hr_extended_display: int | None
    #: Every frame's STATUS OR-ed, and the worst perfusion class: read several times per
    #: packet (75 frames/s per oximeter), so computed once here (issue 13). Not init
    #: fields, so that ``dataclasses.replace`` with other statuses computes them afresh.
    _status_any: int = field(init=False, repr=False, compare=False)
    _worst_perfusion: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        statuses = self.statuses
        # The decoder's statuses are a tuple from its column cache, summarised there.
        known = _COLUMN_OF_TUPLE.get(id(statuses))
        if known is not None and known[0] is statuses:
            status_any, worst = known[1], known[2]
        else:
            status_any, worst = _summarise(bytes(int(s) & 0xFF for s in statuses))
        object.__setattr__(self, "_status_any", status_any)
        object.__setattr__(self, "_worst_perfusion", worst)

    def _any(self, bit: NoninStatus) -> bool:
        return bool(self._status_any & int(bit))

    @property
    def sensor_disconnected(self) -> bool:
        return self._any(NoninStatus.SNSD)

    @property
    def artifact(self) -> bool:
        return self._any(NoninStatus.ARTF)

    @property
    def out_of_track(self) -> bool:
        return self._any(NoninStatus.OOT)

    @property
    def sensor_alarm(self) -> bool:
        return self._any(NoninStatus.SNSA)

    @property
    def perfusion(self) -> Perfusion:
        """Worst perfusion class reported by any frame of the packet."""
        return Perfusion(self._worst_perfusion)


def frame_checksum(head: bytes | bytearray) -> int:
    """Checksum of a frame's first four bytes: their sum mod 256."""
    return sum(head[:4]) & 0xFF


def _frame_valid(frame: bytes | bytearray) -> bool:
    return frame[0] == START and bool(frame[1] & _BIT7_BIT) and frame_checksum(frame) == frame[4]


def _hr(data: bytes, pos: tuple[int, int]) -> int | None:
    value = ((data[pos[0]] & 0x03) << 7) | (data[pos[1]] & 0x7F)
    return None if value == HR_MISSING else value


def _spo2(data: bytes, pos: int, name: str) -> int | None:
    value = data[pos]
    if value == SPO2_MISSING:
        return None
    if value > 100:
        raise ProtocolError(f"{name} byte {value} (frame {pos + 1}) is neither 0-100 nor 127")
    return value


def decode_packet(data: bytes | bytearray | memoryview) -> NoninPacket:
    """125 bytes (25 frames, SYNC frame first) -> NoninPacket; ProtocolError if malformed."""
    raw = bytes(data)
    if len(raw) != PACKET_LEN:
        raise ProtocolError(f"Nonin packet is {len(raw)} bytes, expected {PACKET_LEN}")
    frames = [raw[i : i + FRAME_LEN] for i in range(0, PACKET_LEN, FRAME_LEN)]
    for n, frame in enumerate(frames):
        if not _frame_valid(frame):
            raise ProtocolError(f"Nonin frame {n + 1} {frame.hex(' ')} is not a valid frame")
        if bool(frame[1] & _SYNC_BIT) != (n == 0):
            raise ProtocolError(f"Nonin frame {n + 1} has the SYNC bit wrong")
    return _packet_from_frames(frames)


def _summarise(raw_statuses: bytes) -> tuple[int, int]:
    """(every STATUS OR-ed, worst perfusion class) of a packet's raw STATUS bytes."""
    return reduce(or_, raw_statuses, 0), max(
        map(_PERFUSION_OF.__getitem__, raw_statuses), default=0
    )


_Column = tuple[tuple[NoninStatus, ...], int, int]
#: A packet's raw STATUS column -> (statuses, OR of all, worst perfusion). A Nonin sends the
#: same column packet after packet (it changes with the perfusion class, a lost pulse, a
#: probe off), so three packets a second per oximeter cost a dict lookup each, not 25 enum
#: lookups and the summary (issue 13). Bounded: cleared when full.
_COLUMNS: dict[bytes, _Column] = {}
#: The same entries by the id of their statuses tuple, for NoninPacket.__post_init__; an
#: entry holds its tuple, so the id is not reused while the entry exists.
_COLUMN_OF_TUPLE: dict[int, _Column] = {}
_COLUMNS_MAX = 4096


def _status_column(raw: bytes) -> _Column:
    known = _COLUMNS.get(raw)
    if known is None:
        if len(_COLUMNS) >= _COLUMNS_MAX:
            _COLUMNS.clear()
            _COLUMN_OF_TUPLE.clear()
        known = _COLUMNS[raw] = (tuple(map(_STATUS_OF.__getitem__, raw)), *_summarise(raw))
        _COLUMN_OF_TUPLE[id(known[0])] = known
    return known


def _columns(frames: list[bytes]) -> tuple[bytes, bytes, bytes]:
    """The STATUS, PLETH and DATA bytes of 25 frames, each in frame order."""
    return bytes(f[1] for f in frames), bytes(f[2] for f in frames), bytes(f[3] for f in frames)


def _packet_from_frames(frames: list[bytes]) -> NoninPacket:
    return _packet_from_columns(*_columns(frames))


def _packet_from_columns(raw_statuses: bytes, pleth: bytes, data: bytes) -> NoninPacket:
    """A packet from its 25 STATUS, PLETH and DATA bytes (frame order)."""
    return NoninPacket(
        statuses=_status_column(raw_statuses)[0],
        pleth=tuple(pleth),
        hr=_hr(data, _HR),
        spo2=_spo2(data, _SPO2, "SpO2"),
        firmware_revision=data[_REV],
        spo2_display=_spo2(data, _SPO2_D, "SpO2-D"),
        spo2_fast=_spo2(data, _SPO2_FAST, "SpO2 Fast"),
        spo2_beat_to_beat=_spo2(data, _SPO2_BB, "SpO2 B-B"),
        hr_extended=_hr(data, _E_HR),
        spo2_extended=_spo2(data, _E_SPO2, "E-SpO2"),
        spo2_extended_display=_spo2(data, _E_SPO2_D, "E-SpO2-D"),
        hr_display=_hr(data, _HR_D),
        hr_extended_display=_hr(data, _E_HR_D),
    )


def encode_packet(packet: NoninPacket) -> bytes:
    """The 125 wire bytes of ``packet`` for the simulator; ProtocolError if it cannot be sent."""
    if len(packet.statuses) != FRAMES_PER_PACKET or len(packet.pleth) != FRAMES_PER_PACKET:
        raise ProtocolError(f"a packet needs {FRAMES_PER_PACKET} statuses and pleth samples")
    data = [0] * FRAMES_PER_PACKET
    _put_hr(data, _HR, packet.hr, "hr")
    _put_spo2(data, _SPO2, packet.spo2, "spo2")
    if not 0 <= packet.firmware_revision <= 0xFF:
        raise ProtocolError(f"firmware_revision {packet.firmware_revision!r} is not a byte")
    data[_REV] = packet.firmware_revision
    _put_spo2(data, _SPO2_D, packet.spo2_display, "spo2_display")
    _put_spo2(data, _SPO2_FAST, packet.spo2_fast, "spo2_fast")
    _put_spo2(data, _SPO2_BB, packet.spo2_beat_to_beat, "spo2_beat_to_beat")
    _put_hr(data, _E_HR, packet.hr_extended, "hr_extended")
    _put_spo2(data, _E_SPO2, packet.spo2_extended, "spo2_extended")
    _put_spo2(data, _E_SPO2_D, packet.spo2_extended_display, "spo2_extended_display")
    _put_hr(data, _HR_D, packet.hr_display, "hr_display")
    _put_hr(data, _E_HR_D, packet.hr_extended_display, "hr_extended_display")
    out = bytearray()
    for n, (flags, pleth) in enumerate(zip(packet.statuses, packet.pleth, strict=True)):
        status = int(flags)
        if not 0 <= status <= 0xFF or not status & NoninStatus.BIT7:
            raise ProtocolError(f"frame {n + 1} status 0x{status:X} must be a byte with bit 7 set")
        if bool(status & NoninStatus.SYNC) != (n == 0):
            raise ProtocolError(f"frame {n + 1}: SYNC must be set on frame 1 only")
        if not 0 <= pleth <= 0xFF:
            raise ProtocolError(f"frame {n + 1} pleth {pleth!r} is not a byte")
        head = bytes((START, status, pleth, data[n]))
        out += head + bytes((frame_checksum(head),))
    return bytes(out)


def _put_hr(data: list[int], pos: tuple[int, int], value: int | None, name: str) -> None:
    if value is not None and not 0 <= value < HR_MISSING:
        raise ProtocolError(f"{name} {value!r} is outside 0-{HR_MISSING - 1} (None = missing)")
    value = HR_MISSING if value is None else value
    data[pos[0]] = value >> 7
    data[pos[1]] = value & 0x7F


def _put_spo2(data: list[int], pos: int, value: int | None, name: str) -> None:
    if value is not None and not 0 <= value <= 100:
        raise ProtocolError(f"{name} {value!r} is outside 0-100 (None = missing)")
    data[pos] = SPO2_MISSING if value is None else value


def make_packet(
    *,
    hr: int | None,
    spo2: int | None,
    status: NoninStatus = NoninStatus(0),  # noqa: B008 - an immutable flag value
    pleth: tuple[int, ...] | None = None,
    firmware_revision: int = 0,
) -> NoninPacket:
    """A packet for the simulator: ``status`` flags on every frame, every HR/SpO2 variant equal.

    Bit 7 and SYNC are filled in; ``pleth`` defaults to 25 zeros.
    """
    flags = (status | NoninStatus.BIT7) & ~NoninStatus.SYNC
    statuses = (flags | NoninStatus.SYNC,) + (flags,) * (FRAMES_PER_PACKET - 1)
    return NoninPacket(
        statuses=statuses,
        pleth=pleth if pleth is not None else (0,) * FRAMES_PER_PACKET,
        hr=hr,
        spo2=spo2,
        firmware_revision=firmware_revision,
        spo2_display=spo2,
        spo2_fast=spo2,
        spo2_beat_to_beat=spo2,
        hr_extended=hr,
        spo2_extended=spo2,
        spo2_extended_display=spo2,
        hr_display=hr,
        hr_extended_display=hr,
    )


def to_sample(packet: NoninPacket, *, source: str = SOURCE) -> OximeterSample:
    """Gateway sample from the 4-beat HR (frames 1-2) and SpO2 (frame 3), gated by STATUS.

    Any frame of the packet with SNSD, ARTF, OOT, SNSA or red perfusion gates
    the sample; yellow perfusion is reported but does not gate.
    """
    key = (packet._status_any, packet._worst_perfusion)
    quality = _QUALITY.get(key)
    if quality is None:
        quality = _QUALITY[key] = _quality(packet)  # at most 256 x 4 keys
    return OximeterSample(
        spo2=None if packet.spo2 is None else float(packet.spo2),
        pulse_bpm=None if packet.hr is None else float(packet.hr),
        quality=quality,
        pleth=packet.pleth,
        source=source,
    )


#: (every STATUS OR-ed, worst perfusion) -> the sample's quality flags: all a packet's
#: quality depends on, looked up three times a second per oximeter.
_QUALITY: dict[tuple[int, int], frozenset[QualityFlag]] = {}


def _quality(packet: NoninPacket) -> frozenset[QualityFlag]:
    quality: set[QualityFlag] = set()
    if packet.sensor_disconnected:
        quality.add(QualityFlag.PROBE_UNPLUGGED)
    if packet.artifact:
        quality.add(QualityFlag.ARTIFACT)
    if packet.out_of_track:
        quality.add(QualityFlag.OUT_OF_TRACK)
    if packet.sensor_alarm:
        quality.add(QualityFlag.SENSOR_ALARM)
    perfusion = packet.perfusion
    if perfusion is Perfusion.RED:
        quality.add(QualityFlag.LOW_PERFUSION)
    elif perfusion is Perfusion.YELLOW:
        quality.add(QualityFlag.MARGINAL_PERFUSION)
    return frozenset(quality)


@dataclass(slots=True)
class NoninStats:
    """Stream counters.

    ``checksum_errors`` counts 5-byte windows that look like a frame (0x01,
    STATUS bit 7) but fail the checksum; ``bytes_discarded`` counts every
    byte skipped while searching for a frame.
    """

    frames_ok: int = 0
    checksum_errors: int = 0
    bytes_discarded: int = 0
    packets_ok: int = 0
    packets_incomplete: int = 0
    frames_orphaned: int = 0
    bad_packets: int = 0


class NoninDecoder:
    """Serial bytes -> Nonin packets with frame-sync recovery; never raises.

    Output and counters do not depend on how the input is split across
    :meth:`feed` calls.
    """

    __slots__ = ("_buf", "_frames", "last_error", "stats")

    def __init__(self) -> None:
        self.stats = NoninStats()
        self._buf = bytearray()  # bytes not yet resolved into a frame or discarded
        self._frames: list[bytes] = []  # frames of the packet in progress
        self.last_error: ProtocolError | None = None  # why the latest bad packet failed

    @property
    def pending_bytes(self) -> int:
        """Bytes held until enough arrive to judge them."""
        return len(self._buf)

    @property
    def pending_frames(self) -> int:
        """Frames of the packet being assembled."""
        return len(self._frames)

    def bytes_to_packet_end(self) -> int:
        """Bytes still to come before the packet in progress can complete (at least 1).

        Assumes the rest arrives as valid frames; if it does not, feeding them costs
        nothing but a later look. With no packet in progress, a whole packet.
        """
        if self._frames:
            need = (FRAMES_PER_PACKET - len(self._frames)) * FRAME_LEN - len(self._buf)
        else:
            need = PACKET_LEN - len(self._buf)
        return max(1, need)

    def reset(self) -> None:
        """Drop partial frames and packets, e.g. after the port reopens."""
        self.stats.bytes_discarded += len(self._buf)
        self._buf.clear()
        self._abandon_packet()

    def feed(self, data: bytes | bytearray | memoryview) -> list[NoninPacket]:
        """Packets completed by ``data`` in arrival order."""
        out: list[NoninPacket] = []
        buf = self._buf
        buf += data
        stats = self.stats
        pos = 0
        end = len(buf)
        while pos < end:
            if buf[pos] != START:
                # Cannot start a frame: skip straight to the next 0x01.
                nxt = buf.find(START, pos + 1)
                nxt = end if nxt < 0 else nxt
                self._discard(nxt - pos)
                pos = nxt
                continue
            if end - pos >= 2 and not buf[pos + 1] & _BIT7_BIT:
                self._discard(1)
                pos += 1
                continue
            if end - pos >= PACKET_LEN and not self._frames:
                packet_end = self._whole_packet(buf, pos, out)
                if packet_end:
                    pos = packet_end
                    continue
            if end - pos < FRAME_LEN:
                break  # a plausible frame start: wait for the rest
            # frame_checksum, without building the frame first (75 frames/s per oximeter).
            if (buf[pos] + buf[pos + 1] + buf[pos + 2] + buf[pos + 3]) & 0xFF != buf[pos + 4]:
                stats.checksum_errors += 1
                self._discard(1)
                pos += 1
                continue
            stats.frames_ok += 1
            self._on_frame(bytes(buf[pos : pos + FRAME_LEN]), out)
            pos += FRAME_LEN
        del buf[:pos]
        return out

    def _whole_packet(self, buf: bytearray, pos: int, out: list[NoninPacket]) -> int:
        """A whole valid packet at ``pos`` in one step: where it ends, or 0 if it is not one.

        The frame-by-frame path gives the same packets and counters (the hypothesis test
        on chunking checks it); this one checks 25 frames with slices instead of 25
        calls, which matters at 75 frames/s per oximeter (issue 13).
        """
        chunk = bytes(buf[pos : pos + PACKET_LEN])
        statuses = chunk[1::FRAME_LEN]
        if (
            chunk[0::FRAME_LEN] != _STARTS
            or statuses[0] & _SYNC_MASK != _SYNC_MASK
            or any(b & _SYNC_MASK != _BIT7_BIT for b in statuses[1:])
            or bytes(
                (a + b + c + d) & 0xFF
                for a, b, c, d in zip(
                    chunk[0::FRAME_LEN],
                    statuses,
                    chunk[2::FRAME_LEN],
                    chunk[3::FRAME_LEN],
                    strict=True,
                )
            )
            != chunk[4::FRAME_LEN]
        ):
            return 0
        self.stats.frames_ok += FRAMES_PER_PACKET
        self._complete_columns(statuses, chunk[2::FRAME_LEN], chunk[3::FRAME_LEN], out)
        return pos + PACKET_LEN

    def _complete(self, frames: list[bytes], out: list[NoninPacket]) -> None:
        """25 valid frames: a packet, or a bad packet counted (never raised)."""
        self._complete_columns(*_columns(frames), out)

    def _complete_columns(
        self, statuses: bytes, pleth: bytes, data: bytes, out: list[NoninPacket]
    ) -> None:
        try:
            packet = _packet_from_columns(statuses, pleth, data)
        except ProtocolError as exc:
            self.stats.bad_packets += 1
            self.last_error = exc
        else:
            self.stats.packets_ok += 1
            out.append(packet)

    def _discard(self, n: int) -> None:
        self.stats.bytes_discarded += n
        self._abandon_packet()

    def _abandon_packet(self) -> None:
        if self._frames:
            self.stats.packets_incomplete += 1
            self._frames.clear()

    def _on_frame(self, frame: bytes, out: list[NoninPacket]) -> None:
        frames = self._frames
        if frame[1] & _SYNC_BIT:
            self._abandon_packet()  # a SYNC frame before 25 frames: the last packet was short
            frames.append(frame)
        elif not frames:
            self.stats.frames_orphaned += 1
            return
        else:
            frames.append(frame)
        if len(frames) == FRAMES_PER_PACKET:
            self._complete(frames, out)
            frames.clear()
