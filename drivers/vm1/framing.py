"""VM-1 serial framing (ICD section 1): HDLC-like flags and escapes around payload + CRC.

Sans-I/O: :func:`encode_frame` is pure and :class:`Deframer` turns whatever
bytes a serial read returned into complete, CRC-checked payloads. Malformed
input is counted in :class:`DeframerStats`, never raised, because line noise
is expected on a serial link and must not stop the stream.
"""

from __future__ import annotations

from binascii import crc_hqx  # crc16_ccitt_false without the wrapper's call, per frame
from dataclasses import dataclass, field

from drivers.errors import ProtocolError
from drivers.vm1.crc import CRC16_INIT, crc16_ccitt_false
from drivers.vm1.messages import HEADER_LEN, MAX_PAYLOAD

__all__ = [
    "ESC",
    "FLAG",
    "MAX_CONTENT",
    "MAX_ESCAPED",
    "MIN_CONTENT",
    "Deframer",
    "DeframerStats",
    "encode_frame",
]

FLAG = 0x7E
ESC = 0x7D
_ESC_XOR = 0x20
_FLAG_B = bytes((FLAG,))
_ESC_B = bytes((ESC,))
# After an escape only these two bytes are legal; value = the byte they stand for.
_UNESCAPE = {FLAG ^ _ESC_XOR: bytes((FLAG,)), ESC ^ _ESC_XOR: bytes((ESC,))}

CRC_LEN = 2
MIN_CONTENT = 8  # ICD: frames shorter than 8 bytes unescaped are discarded
MAX_CONTENT = MAX_PAYLOAD + CRC_LEN  # 66: ICD "runs past 66 bytes" is discarded
MAX_ESCAPED = 2 * MAX_CONTENT  # the most a legal frame can occupy on the wire


def encode_frame(payload: bytes) -> bytes:
    """Flag-delimited, escaped frame of ``payload`` + CRC, ready to write to the port.

    Payloads shorter than the 6-byte header are refused as well as ones over
    64 bytes: the receiver would discard either, so sending one is a bug.
    """
    n = len(payload)
    if n > MAX_PAYLOAD:
        raise ProtocolError(f"payload of {n} bytes exceeds the {MAX_PAYLOAD}-byte maximum")
    if n < HEADER_LEN:
        raise ProtocolError(f"payload of {n} bytes is shorter than the {HEADER_LEN}-byte header")
    content = bytes(payload) + crc16_ccitt_false(payload).to_bytes(CRC_LEN, "little")
    # Escape ESC first, or the ESCs introduced for flags would be escaped again.
    content = content.replace(_ESC_B, b"\x7d\x5d").replace(_FLAG_B, b"\x7d\x5e")
    return _FLAG_B + content + _FLAG_B


@dataclass(slots=True)
class DeframerStats:
    """Link-quality counters; every rejected non-empty frame lands in exactly one.

    ``bytes_discarded`` counts wire bytes (escaped, flags excluded) thrown
    away: noise before the first flag and the content of every rejected frame.
    """

    frames_ok: int = 0
    crc_errors: int = 0
    short_frames: int = 0
    oversize_frames: int = 0
    bad_escapes: int = 0
    bytes_discarded: int = 0
    #: Every rejected frame, whichever of the four counters above it landed in: kept as
    #: a count (not a sum on demand) because a pipeline asks for it after every chunk.
    #: Derived, so not compared and not an argument (a given set of counters starts it).
    frames_bad: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.frames_bad = (
            self.crc_errors + self.short_frames + self.oversize_frames + self.bad_escapes
        )


class Deframer:
    """Serial byte stream -> payloads, resynchronising on the next flag after any error.

    Rules (ICD section 1, plus choices where it is silent):

    - Bytes before the first flag are discarded (the device may be mid-frame
      when the port opens).
    - Two flags in a row (an empty frame) are ignored and not counted.
    - The flag that closes a frame also opens the next one, so a frame
      rejected for any reason costs only that frame.
    - Unescaped content (payload + CRC) over 66 bytes -> ``oversize_frames``.
      The buffer never holds more than ``MAX_ESCAPED`` (132) bytes: past that
      the frame cannot be legal, so its bytes are dropped up to the next flag.
    - An escape followed by a flag is an abort -> ``bad_escapes``; the flag
      still opens the next frame.
    - An escape followed by anything but 0x5E/0x5D (including another escape)
      -> ``bad_escapes``, whole frame discarded. HDLC receivers often just XOR
      the byte, but the VM-1 never sends such a sequence, so it means
      corruption and the CRC alone should not be trusted to catch it.
    - Under 8 bytes unescaped -> ``short_frames``; CRC mismatch -> ``crc_errors``.
    - Checks run in this order: over 132 escaped bytes, escapes, over 66
      unescaped, under 8, CRC. Output and counters do not depend on how the
      input is split across :meth:`feed` calls (a property the tests check).
    """

    __slots__ = ("_buf", "_overflow", "_synced", "stats")

    def __init__(self, stats: DeframerStats | None = None) -> None:
        # Callers may pass a subclass instance so one object carries all counters.
        self.stats = stats if stats is not None else DeframerStats()
        self._buf = bytearray()  # escaped content of the frame in progress
        self._synced = False  # seen a flag yet?
        self._overflow = False  # frame in progress passed MAX_ESCAPED; drop to next flag

    @property
    def pending_bytes(self) -> int:
        """Escaped bytes of an unfinished frame held until its closing flag arrives."""
        return len(self._buf)

    def reset(self) -> None:
        """Forget any partial frame and wait for a flag again, e.g. after the port reopens."""
        self.stats.bytes_discarded += len(self._buf)
        self._buf.clear()
        self._synced = False
        self._overflow = False

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Payloads (CRC stripped) of every frame completed by ``data``; never raises."""
        if not isinstance(data, bytes):
            data = bytes(data)
        out: list[bytes] = []
        if not data:
            return out
        if (
            data[0] == FLAG
            and data[-1] == FLAG
            and self._synced
            and not self._buf
            and not self._overflow
            and data.count(FLAG) == 2
        ):
            # One whole frame, nothing pending (how a VM-1's reads mostly come, and every
            # recorded RX chunk): what the split below does, without the split; and for a
            # good frame without escapes, what _check decides, without the call.
            raw = data[1:-1]
            if (
                MIN_CONTENT <= len(raw) <= MAX_CONTENT
                and ESC not in raw
                and crc_hqx(raw[:-CRC_LEN], CRC16_INIT) == int.from_bytes(raw[-CRC_LEN:], "little")
            ):
                self.stats.frames_ok += 1
                out.append(raw[:-CRC_LEN])
            else:
                self._check(raw, out)
            return out
        if not self._synced:
            start = data.find(_FLAG_B)
            if start < 0:
                self.stats.bytes_discarded += len(data)
                return out
            self.stats.bytes_discarded += start
            self._synced = True
            data = data[start + 1 :]
        # parts[0] continues the frame in progress; every later part follows a flag.
        parts = data.split(_FLAG_B)
        last = len(parts) - 1
        if last == 0:
            self._extend(data)
            return out
        self._close(parts[0], out)
        for i in range(1, last):
            self._check(parts[i], out)
        self._extend(parts[last])
        return out

    def _extend(self, part: bytes) -> None:
        """Buffer bytes of a frame whose closing flag has not arrived, within the hard cap."""
        if not part:
            return
        if self._overflow:
            self.stats.bytes_discarded += len(part)
            return
        if len(self._buf) + len(part) > MAX_ESCAPED:
            self.stats.bytes_discarded += len(self._buf) + len(part)
            self._buf.clear()
            self._overflow = True
            return
        self._buf += part

    def _close(self, tail: bytes, out: list[bytes]) -> None:
        """A flag arrived: finish the buffered frame with ``tail``, its last bytes."""
        if self._overflow:
            self._overflow = False
            self.stats.oversize_frames += 1
            self.stats.frames_bad += 1
            self.stats.bytes_discarded += len(tail)
            return
        if not self._buf:
            self._check(tail, out)
            return
        if len(self._buf) + len(tail) > MAX_ESCAPED:
            self.stats.oversize_frames += 1
            self.stats.frames_bad += 1
            self.stats.bytes_discarded += len(self._buf) + len(tail)
            self._buf.clear()
            return
        self._buf += tail
        raw = bytes(self._buf)
        self._buf.clear()
        self._check(raw, out)

    def _check(self, raw: bytes, out: list[bytes]) -> None:
        """Validate one complete frame's escaped content; append its payload if good."""
        n = len(raw)
        if n == 0:
            return  # two flags in a row: legal, ignored
        stats = self.stats
        if n > MAX_ESCAPED:
            stats.oversize_frames += 1
            stats.frames_bad += 1
            stats.bytes_discarded += n
            return
        if ESC in raw:
            content = _unescape(raw)
            if content is None:
                stats.bad_escapes += 1
                stats.frames_bad += 1
                stats.bytes_discarded += n
                return
        else:
            content = raw
        size = len(content)
        if size > MAX_CONTENT:
            stats.oversize_frames += 1
            stats.frames_bad += 1
        elif size < MIN_CONTENT:
            stats.short_frames += 1
            stats.frames_bad += 1
        elif crc_hqx(content[:-CRC_LEN], CRC16_INIT) != int.from_bytes(
            content[-CRC_LEN:], "little"
        ):
            stats.crc_errors += 1
            stats.frames_bad += 1
        else:
            stats.frames_ok += 1
            out.append(content[:-CRC_LEN])
            return
        stats.bytes_discarded += n


def _unescape(raw: bytes) -> bytes | None:
    """Undo escaping; None if an escape is followed by an illegal byte or ends the frame."""
    pieces = raw.split(_ESC_B)
    out = [pieces[0]]
    for piece in pieces[1:]:
        if not piece:
            return None  # ESC ESC, or ESC right before the closing flag (abort)
        byte = _UNESCAPE.get(piece[0])
        if byte is None:
            return None
        out.append(byte)
        out.append(piece[1:])
    return b"".join(out)
