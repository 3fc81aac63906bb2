"""VM-1 link chunks -> messages, with link statistics, still no I/O.

Two decoders with one interface (``feed(chunk) -> list[Message]``, ``stats``,
``reset``), one per :data:`~drivers.transport.base.LinkUnit`:

- :class:`Vm1StreamDecoder` for a byte stream (serial): the deframer, then
  the payload codec;
- :class:`Vm1PayloadDecoder` for a message link (BLE: one characteristic
  value is one payload, ICD section 4): straight to the payload codec, once.

:func:`vm1_decoder` picks one by the link's unit, :func:`encode_for_link` the
matching encoding of a host command. Nothing here raises on input: every
problem becomes a counter in :class:`StreamStats`, so a noisy link degrades
into visible numbers instead of a dead reader task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import assert_never

from drivers.errors import ProtocolError
from drivers.link_unit import LinkUnit
from drivers.vm1.codec import PAYLOAD_DECODERS, decode_payload, encode_payload
from drivers.vm1.framing import Deframer, DeframerStats, encode_frame
from drivers.vm1.messages import Message

__all__ = [
    "StreamStats",
    "Vm1PayloadDecoder",
    "Vm1StreamDecoder",
    "encode_for_link",
    "encode_message_frame",
    "vm1_decoder",
]

_HOST_TYPE_BIT = 0x80  # host -> device types are 0x81..0x87


def encode_message_frame(msg: Message) -> bytes:
    """Serial frame for ``msg``; ProtocolError if a field cannot be sent."""
    return encode_frame(encode_payload(msg))


@dataclass(slots=True)
class StreamStats(DeframerStats):
    """Frame counters plus what happened to the payloads of good frames.

    ``frames_lost`` is the sum of the gaps: with seq 3 followed by seq 7,
    ``seq_gaps`` grows by 1 and ``frames_lost`` by 3. A repeated seq is a
    resend (ICD: a host may resend an un-ACKed command with the same seq), so
    it counts in ``seq_repeats``, not as 255 lost frames.
    """

    messages: int = 0
    bad_payloads: int = 0
    seq_gaps: int = 0
    frames_lost: int = 0
    seq_repeats: int = 0


class Vm1StreamDecoder:
    """Serial bytes -> decoded VM-1 messages of either direction, with link statistics.

    Sequence numbers are tracked per sender (device types 0x01-0x7F, host
    types 0x80-0xFF), since device and host count separately and a sniffed
    capture may hold both. Every CRC-valid payload advances the tracking, also
    ones the codec rejects: such a frame arrived, so it is a bad payload, not
    a lost frame. A device restart shows up as one gap; call
    :meth:`reset_seq` when the link is reopened to avoid that.
    """

    __slots__ = ("_deframer", "_last_seq", "last_error", "stats")

    def __init__(self) -> None:
        self.stats = StreamStats()
        self._deframer = Deframer(self.stats)
        self._last_seq: dict[bool, int] = {}  # is_host -> last seq seen
        self.last_error: ProtocolError | None = None  # why the latest bad payload failed

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        """Messages completed by ``data`` in arrival order; never raises."""
        return self._decode(self._deframer.feed(data))

    def _decode(self, payloads: list[bytes]) -> list[Message]:
        """The messages of good payloads, in order; a rejected one is counted, not raised."""
        out: list[Message] = []
        decoders = PAYLOAD_DECODERS
        for payload in payloads:
            n = len(payload)
            if n >= 2:  # what _track_seq does for the next in sequence, inline
                last_seq = self._last_seq
                is_host = payload[0] >= _HOST_TYPE_BIT
                last = last_seq.get(is_host)
                seq = payload[1]
                if last is not None and seq == (last + 1) & 0xFF:
                    last_seq[is_host] = seq
                else:
                    self._track_seq(payload)
            try:
                # decode_payload's lookup, inline; it still judges (and names) the rest
                entry = decoders.get(payload[0]) if n else None
                if entry is not None and n == entry[0]:
                    out.append(entry[1](payload))
                else:
                    out.append(decode_payload(payload))
            except ProtocolError as exc:
                self.stats.bad_payloads += 1
                self.last_error = exc
        self.stats.messages += len(out)
        return out

    def reset(self) -> None:
        """Forget partial frames and sequence history, e.g. after the port reopens."""
        self._deframer.reset()
        self.reset_seq()

    def reset_seq(self) -> None:
        """Start sequence tracking afresh so the next message is not counted as a gap."""
        self._last_seq.clear()

    def _track_seq(self, payload: bytes) -> None:
        if len(payload) < 2:
            return
        is_host = bool(payload[0] & _HOST_TYPE_BIT)
        seq = payload[1]
        last = self._last_seq.get(is_host)
        self._last_seq[is_host] = seq
        if last is None:
            return
        if seq == last:
            self.stats.seq_repeats += 1
            return
        gap = (seq - last - 1) & 0xFF
        if gap:
            self.stats.seq_gaps += 1
            self.stats.frames_lost += gap


class Vm1PayloadDecoder(Vm1StreamDecoder):
    """Whole payloads (one per chunk, as a BLE value carries) -> messages; same stats.

    There is no frame layer: ``frames_ok``/``frames_bad`` count payloads as they
    arrived, and a payload the codec rejects is a bad payload (the link layer
    already checked its integrity, so there is no CRC to fail).
    """

    __slots__ = ()

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        """The message in the payload ``data`` (empty if it does not decode); never raises."""
        self.stats.frames_ok += 1
        return self._decode([bytes(data)])


def vm1_decoder(unit: LinkUnit) -> Vm1StreamDecoder:
    """The decoder for chunks of a link of this unit."""
    if unit == "stream":
        return Vm1StreamDecoder()
    if unit == "message":
        return Vm1PayloadDecoder()
    assert_never(unit)


def encode_for_link(msg: Message, unit: LinkUnit) -> bytes:
    """``msg`` as one chunk for a link of this unit: a serial frame or a bare payload."""
    if unit == "stream":
        return encode_message_frame(msg)
    if unit == "message":
        return encode_payload(msg)
    assert_never(unit)
