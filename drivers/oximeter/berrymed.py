"""BerryMed BCI protocol (BM1000-series oximeters over BLE): packets and stream decoder.

Transport: the oximeter streams over the Microchip "transparent UART" BLE
service; subscribe to the notify characteristic. Notifications are not
aligned to packets (one may carry several packets or end mid-packet), so
:class:`BerryMedDecoder` treats them as one byte stream. About 100 packets/s.

Packet (5 bytes, bytes numbered from 0 here; the vendor document numbers
them 1-5, so its "byte 1" is our byte 0):

======  =====  ==========================================================
byte    bits   meaning
======  =====  ==========================================================
0       7      sync, always 1 (the only byte with bit 7 set)
0       6      pulse beep (a beat was detected in this packet)
0       5      probe unplugged (1 = unplugged)
0       4      no signal (1 = NO signal)
0       0-3    signal strength, 0-15
1       7      0
1       0-6    pleth (plethysmogram sample)
2       7      0
2       6      bit 7 of the pulse rate
2       5      pulse searching (1 = searching, "pulse research" in BCI)
2       4      no finger / sensor off (1 = no finger)
2       0-3    bargraph, 0-15
3       7      0
3       0-6    pulse rate bits 0-6 (with byte 2 bit 6: 0-255, 255 = invalid)
4       7      0
4       0-6    SpO2 %, 0-100, 127 = invalid
======  =====  ==========================================================

Sources checked and how they disagree:

- BerryMed's own demo apps (github zh2x/SpO2-BLE-for-Android and
  SpO2-BLE-for-iOS, which point to the BCI protocol PDFs v1.2/v1.4) only
  decode the values: PR = byte3 | (byte2 & 0x40) << 1, SpO2 = byte4,
  pleth = byte1, signal strength = byte0 & 0x0F, sync = bit 7 of byte 0.
- bgould/berrymed-pulseox-reader, the berry-oximeter package and
  ScheindorfHyenetics/berrymedBluetoothOxymeter read byte 0 bit 4 as
  "no signal", bit 5 probe unplugged, bit 6 pulse beep, byte 2 bit 4 no
  finger and bit 5 pulse searching, as in the table.
- Adafruit's CircuitPython driver names byte 0 bit 4 ``has_sensor_signal``
  (it never uses it), and ehborisov/BerryMed-Pulse-Oximeter-tool calls it
  ``has_signal`` in a ``construct`` BitStruct whose fields are listed LSB
  first although BitStruct parses MSB first, so that name is not evidence.
  The vendor's v1.2 text quoted in the issue ("byte 1 bit 4 = 1 means NO
  signal") uses the vendor's 1-based byte numbers, i.e. our byte 0 bit 4;
  our byte 1 bit 4 is a pleth bit and cannot be a flag. ScheindorfHyenetics
  reports the bit as always 0 on a working device that gives readings, which
  fits "1 = no signal" and not "1 = has signal". We follow the vendor:
  **byte 0 bit 4 set = no signal**.
- bgould masks the signal strength and bargraph with 0x07; the vendor demo
  and the others use 0x0F, as we do.

Values: PR 255 and SpO2 127 are "no value" (``None``). Anything else is kept
as sent on the packet; :func:`to_sample` also treats SpO2 above 100 as no
value (flag INVALID). The vendor demo additionally blanks SpO2 < 35 and
PR < 25 or > 250 for display; we do not, since those limits are a display
choice, not part of the protocol.
"""

from __future__ import annotations

from dataclasses import dataclass

from drivers.errors import ProtocolError
from drivers.oximeter.sample import OximeterSample, QualityFlag

__all__ = [
    "BERRYMED_NOTIFY_CHAR_UUID",
    "BERRYMED_SERVICE_UUID",
    "PACKET_LEN",
    "PR_INVALID",
    "SPO2_INVALID",
    "BerryMedDecoder",
    "BerryMedPacket",
    "BerryMedStats",
    "decode_packet",
    "encode_packet",
    "to_sample",
]

BERRYMED_SERVICE_UUID = "49535343-fe7d-4ae5-8fa9-9fafd205e455"
BERRYMED_NOTIFY_CHAR_UUID = "49535343-1e4d-4bd9-ba61-23c647249616"

SOURCE = "berrymed-bci"
PACKET_LEN = 5
SYNC = 0x80
PR_INVALID = 255
SPO2_INVALID = 127

# byte 0
_BEEP = 0x40
_PROBE_UNPLUGGED = 0x20
_NO_SIGNAL = 0x10
_NIBBLE = 0x0F
# byte 2
_PR_BIT7 = 0x40
_SEARCHING = 0x20
_NO_FINGER = 0x10
_LOW7 = 0x7F


@dataclass(frozen=True, slots=True, kw_only=True)
class BerryMedPacket:
    """One decoded BCI packet; ``pulse_rate``/``spo2`` are None for the invalid codes."""

    signal_strength: int
    no_signal: bool
    probe_unplugged: bool
    pulse_beep: bool
    pleth: int
    bargraph: int
    no_finger: bool
    searching: bool
    pulse_rate: int | None
    spo2: int | None


def decode_packet(data: bytes | bytearray | memoryview) -> BerryMedPacket:
    """One 5-byte packet -> BerryMedPacket; ProtocolError if length or sync bits are wrong."""
    raw = bytes(data)
    if len(raw) != PACKET_LEN:
        raise ProtocolError(f"BCI packet is {len(raw)} bytes, expected {PACKET_LEN}")
    if not raw[0] & SYNC:
        raise ProtocolError(f"BCI packet byte 0 0x{raw[0]:02X} lacks the sync bit")
    for i in range(1, PACKET_LEN):
        if raw[i] & SYNC:
            raise ProtocolError(f"BCI packet byte {i} 0x{raw[i]:02X} has the sync bit set")
    b0, b1, b2, b3, b4 = raw
    pulse_rate = b3 | ((b2 & _PR_BIT7) << 1)
    return BerryMedPacket(
        signal_strength=b0 & _NIBBLE,
        no_signal=bool(b0 & _NO_SIGNAL),
        probe_unplugged=bool(b0 & _PROBE_UNPLUGGED),
        pulse_beep=bool(b0 & _BEEP),
        pleth=b1,
        bargraph=b2 & _NIBBLE,
        no_finger=bool(b2 & _NO_FINGER),
        searching=bool(b2 & _SEARCHING),
        pulse_rate=None if pulse_rate == PR_INVALID else pulse_rate,
        spo2=None if b4 == SPO2_INVALID else b4,
    )


def encode_packet(packet: BerryMedPacket) -> bytes:
    """The 5 wire bytes of ``packet`` (for the simulator).

    Ranges: signal strength and bargraph 0-15, pleth 0-127, pulse rate 0-254,
    SpO2 0-126; "no value" is spelled None only, so 255/127 as numbers are
    refused as ambiguous.
    """
    _check("signal_strength", packet.signal_strength, 15)
    _check("bargraph", packet.bargraph, 15)
    _check("pleth", packet.pleth, _LOW7)
    pulse_rate = PR_INVALID if packet.pulse_rate is None else packet.pulse_rate
    if packet.pulse_rate is not None:
        _check("pulse_rate", packet.pulse_rate, PR_INVALID - 1)
    spo2 = SPO2_INVALID if packet.spo2 is None else packet.spo2
    if packet.spo2 is not None:
        _check("spo2", packet.spo2, SPO2_INVALID - 1)
    b0 = (
        SYNC
        | (_BEEP if packet.pulse_beep else 0)
        | (_PROBE_UNPLUGGED if packet.probe_unplugged else 0)
        | (_NO_SIGNAL if packet.no_signal else 0)
        | packet.signal_strength
    )
    b2 = (
        ((pulse_rate >> 1) & _PR_BIT7)
        | (_SEARCHING if packet.searching else 0)
        | (_NO_FINGER if packet.no_finger else 0)
        | packet.bargraph
    )
    return bytes((b0, packet.pleth, b2, pulse_rate & _LOW7, spo2))


def _check(name: str, value: int, maximum: int) -> None:
    if not 0 <= value <= maximum:
        raise ProtocolError(f"{name} {value!r} is outside 0-{maximum}")


def to_sample(packet: BerryMedPacket, *, source: str = SOURCE) -> OximeterSample:
    """Gateway sample for one packet, gated by no-signal, unplugged, no-finger and searching."""
    quality: set[QualityFlag] = set()
    if packet.no_signal:
        quality.add(QualityFlag.NO_SIGNAL)
    if packet.probe_unplugged:
        quality.add(QualityFlag.PROBE_UNPLUGGED)
    if packet.no_finger:
        quality.add(QualityFlag.NO_FINGER)
    if packet.searching:
        quality.add(QualityFlag.SEARCHING)
    spo2 = packet.spo2
    if spo2 is not None and spo2 > 100:
        spo2 = None
        quality.add(QualityFlag.INVALID)
    return OximeterSample(
        spo2=None if spo2 is None else float(spo2),
        pulse_bpm=None if packet.pulse_rate is None else float(packet.pulse_rate),
        quality=frozenset(quality),
        signal_strength=packet.signal_strength,
        pleth=(packet.pleth,),
        source=source,
    )


@dataclass(slots=True)
class BerryMedStats:
    """Stream counters; every byte fed ends up in a packet, in ``bytes_discarded`` or pending.

    ``resyncs`` counts the times the decoder lost packet alignment: a run of
    bytes before any sync byte (e.g. joining the stream mid-packet) counts
    once, and a sync byte that cuts a packet short counts once.
    """

    packets_ok: int = 0
    resyncs: int = 0
    bytes_discarded: int = 0


class BerryMedDecoder:
    """BLE notification bytes -> BCI packets; never raises, resynchronises on the sync bit.

    Rules: bytes are dropped until one with bit 7 set; that byte starts a
    packet; four bytes with bit 7 clear complete it. A byte with bit 7 set
    inside a packet abandons the partial packet (its bytes are discarded) and
    starts a new one. Output and counters do not depend on how the stream is
    split across :meth:`feed` calls.
    """

    __slots__ = ("_buf", "_discarding", "stats")

    def __init__(self) -> None:
        self.stats = BerryMedStats()
        self._buf = bytearray()  # the packet in progress, starting with its sync byte
        self._discarding = False  # inside a run of unsynchronised bytes

    @property
    def pending_bytes(self) -> int:
        """Bytes of a packet still waiting for the rest of it."""
        return len(self._buf)

    def reset(self) -> None:
        """Drop any partial packet, e.g. after a reconnect."""
        self.stats.bytes_discarded += len(self._buf)
        self._buf.clear()
        self._discarding = False

    def feed(self, data: bytes | bytearray | memoryview) -> list[BerryMedPacket]:
        """Packets completed by ``data`` in arrival order."""
        out: list[BerryMedPacket] = []
        buf = self._buf
        stats = self.stats
        for byte in bytes(data):
            if byte & SYNC:
                if buf:
                    stats.resyncs += 1
                    stats.bytes_discarded += len(buf)
                    buf.clear()
                self._discarding = False
                buf.append(byte)
            elif buf:
                buf.append(byte)
                if len(buf) == PACKET_LEN:
                    out.append(decode_packet(buf))
                    buf.clear()
            else:
                if not self._discarding:
                    self._discarding = True
                    stats.resyncs += 1
                stats.bytes_discarded += 1
        stats.packets_ok += len(out)
        return out
