"""VM-1 payload codec (ICD section 2): message objects <-> payload bytes, no I/O.

A payload is ``type u8, seq u8, dev_ms u32 LE, body``; the same bytes travel
inside a serial frame or as one BLE characteristic value. Both directions are
handled so the gateway and the VM-1 simulator share one codec.

The decoder is strict where a wrong value would change what the gateway
believes about a treatment: unknown type bytes, a body of the wrong length,
enum values the ICD does not define and out-of-range values all raise
:class:`ProtocolError` rather than guess. Two exceptions, both from the ICD:
unknown ALARM codes are passed on as plain ints, and reserved STATUS flag bits
are kept (not rejected) so a later firmware's flag does not blank the status.

Choices where ICD rev 1.0 is silent:

- ``protocol_version`` in IDENT is decoded whatever its value; whether to talk
  to a device of another version is the driver's decision, which needs the
  IDENT to make it.
- SET_RATE ``hz`` is checked only as a u8: the ICD defines a BAD_ARGUMENT ACK
  for values outside 1-50, so such values are legal on the wire and the
  simulator must be able to receive them.
- ACK ``cmd`` is any u8 (the device may ACK an unknown command with
  UNKNOWN_COMMAND).
- Host commands must be encoded with ``dev_ms == 0`` (ICD: "host commands send
  0"); on decode any value is accepted and kept, since the device ignores it.
- ALARM ``active`` must be 0 or 1 on the wire; anything else is a ProtocolError.
- ``battery_pct`` must be 0-100 or the 0xFF sentinel; ``reservoir_ul`` is any
  u16, 0xFFFF being the sentinel. On encode the sentinels are spelled ``None``
  only; passing 0xFFFF/0xFF as numbers is rejected as ambiguous.
- Strings must be ASCII with no embedded NUL (it would truncate on decode) and
  may fill their whole width with no terminating NUL. On decode anything from
  the first NUL on is ignored.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import IntEnum
from struct import Struct
from typing import Any, TypeVar

from drivers.errors import ProtocolError
from drivers.vm1.messages import (
    HEADER_LEN,
    MAX_PAYLOAD,
    Ack,
    AckResult,
    Alarm,
    Breath,
    DeviceState,
    EndReason,
    GetInfo,
    GetSession,
    Ident,
    Message,
    MsgType,
    Output,
    Ping,
    SessionEnd,
    SessionRecord,
    SessionStart,
    SetClock,
    SetRate,
    Start,
    Status,
    Stop,
)

__all__ = ["PAYLOAD_DECODERS", "decode_payload", "encode_payload"]

_E = TypeVar("_E", bound=IntEnum)

RESERVOIR_UNKNOWN = 0xFFFF
BATTERY_ON_MAINS = 0xFF
MODEL_LEN = 12
SERIAL_LEN = 12
FIRMWARE_LEN = 8

_U8 = 0xFF
_U16 = 0xFFFF
_U32 = 0xFFFF_FFFF

# One precompiled Struct per type, header included, so a decode is one unpack.
_HEADER = Struct("<BBI")
_IDENT = Struct(f"<BBIB{MODEL_LEN}s{SERIAL_LEN}s{FIRMWARE_LEN}sHHI")
_STATUS = Struct("<BBIBHBBH")
_OUTPUT = Struct("<BBIHIB")
_SESSION_START = Struct("<BBIIHI")
_SESSION_END = Struct("<BBIIBIIH")
_ALARM = Struct("<BBIHB")
_ACK = Struct("<BBIBBB")
_SESSION_RECORD = Struct("<BBIIIHBIIHI")
_U32_BODY = Struct("<BBII")
_U8_BODY = Struct("<BBIB")

assert _HEADER.size == HEADER_LEN
assert _IDENT.size == HEADER_LEN + 41
assert _STATUS.size == _OUTPUT.size == HEADER_LEN + 7
assert _SESSION_START.size == HEADER_LEN + 10
assert _SESSION_END.size == HEADER_LEN + 15
assert _ALARM.size == _ACK.size == HEADER_LEN + 3
assert _SESSION_RECORD.size == HEADER_LEN + 25
assert max(s.size for s in (_IDENT, _SESSION_RECORD)) <= MAX_PAYLOAD


# --------------------------------------------------------------------------- helpers


def _uint(msg: str, field: str, value: object, maximum: int, minimum: int = 0) -> int:
    """Range-check one integer field so the error names the field, not a struct code."""
    if not isinstance(value, int):
        raise ProtocolError(f"{msg}.{field} must be an int, got {type(value).__name__}")
    if not minimum <= value <= maximum:
        raise ProtocolError(f"{msg}.{field}={value} outside {minimum}..{maximum}")
    return value


def _enum_out(msg: str, field: str, value: object, enum: type[_E]) -> int:
    number = _uint(msg, field, value, _U8)
    try:
        return int(enum(number))
    except ValueError as exc:
        raise ProtocolError(f"{msg}.{field}={value!r} is not a valid {enum.__name__}") from exc


#: Members of each decoded enum by value: a dict lookup per field, not ``Enum.__call__``.
_MEMBERS: dict[type[Any], dict[int, Any]] = {}


def _members(enum: type[_E]) -> dict[int, _E]:
    """``enum``'s members by value, built once."""
    members = _MEMBERS.get(enum)
    if members is None:
        members = _MEMBERS[enum] = {int(m): m for m in enum}
    return members


def _enum_in(msg: str, field: str, value: int, enum: type[_E]) -> _E:
    member = _members(enum).get(value)
    if member is None:
        raise ProtocolError(f"{msg}: unknown {field} value {value}")
    return member


def _str_out(msg: str, field: str, value: object, width: int) -> bytes:
    if not isinstance(value, str):
        raise ProtocolError(f"{msg}.{field} must be a str, got {type(value).__name__}")
    try:
        raw = value.encode("ascii")
    except UnicodeEncodeError as exc:
        raise ProtocolError(f"{msg}.{field}={value!r} is not ASCII") from exc
    if b"\x00" in raw:
        raise ProtocolError(f"{msg}.{field}={value!r} contains NUL")
    if len(raw) > width:
        raise ProtocolError(f"{msg}.{field}={value!r} longer than {width} bytes")
    return raw  # struct's "Ns" pads with NULs


def _str_in(msg: str, field: str, raw: bytes) -> str:
    raw = raw.split(b"\x00", 1)[0]
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"{msg}: {field} is not ASCII: {raw!r}") from exc


def _header(msg: Message, name: str, host: bool) -> tuple[int, int]:
    seq = _uint(name, "seq", msg.seq, _U8)
    dev_ms = _uint(name, "dev_ms", msg.dev_ms, _U32)
    if host and dev_ms != 0:
        raise ProtocolError(f"{name}.dev_ms={dev_ms}: host commands send 0")
    return seq, dev_ms


# --------------------------------------------------------------------------- encode


def _enc_ident(m: Ident) -> bytes:
    n = "IDENT"
    return _IDENT.pack(
        MsgType.IDENT,
        *_header(m, n, host=False),
        _uint(n, "protocol_version", m.protocol_version, _U8),
        _str_out(n, "model", m.model, MODEL_LEN),
        _str_out(n, "serial_no", m.serial_no, SERIAL_LEN),
        _str_out(n, "firmware", m.firmware, FIRMWARE_LEN),
        _uint(n, "nominal_rate_ul_min", m.nominal_rate_ul_min, _U16),
        _uint(n, "reservoir_capacity_ul", m.reservoir_capacity_ul, _U16),
        _uint(n, "last_session_no", m.last_session_no, _U32),
    )


def _enc_status(m: Status) -> bytes:
    n = "STATUS"
    reservoir = (
        RESERVOIR_UNKNOWN
        if m.reservoir_ul is None
        else _uint(n, "reservoir_ul", m.reservoir_ul, RESERVOIR_UNKNOWN - 1)
    )
    battery = (
        BATTERY_ON_MAINS if m.battery_pct is None else _uint(n, "battery_pct", m.battery_pct, 100)
    )
    return _STATUS.pack(
        MsgType.STATUS,
        *_header(m, n, host=False),
        _enum_out(n, "state", m.state, DeviceState),
        reservoir,
        battery,
        _uint(n, "flags", m.flags, _U8),
        _uint(n, "fault_code", m.fault_code, _U16),
    )


def _enc_output(m: Output) -> bytes:
    n = "OUTPUT"
    return _OUTPUT.pack(
        MsgType.OUTPUT,
        *_header(m, n, host=False),
        _uint(n, "rate_ul_min", m.rate_ul_min, _U16),
        _uint(n, "cum_ul", m.cum_ul, _U32),
        _enum_out(n, "breath", m.breath, Breath),
    )


def _enc_session_start(m: SessionStart) -> bytes:
    n = "SESSION_START"
    return _SESSION_START.pack(
        MsgType.SESSION_START,
        *_header(m, n, host=False),
        _uint(n, "session_no", m.session_no, _U32),
        _uint(n, "fill_ul", m.fill_ul, _U16),
        _uint(n, "wall_s", m.wall_s, _U32),
    )


def _enc_session_end(m: SessionEnd) -> bytes:
    n = "SESSION_END"
    return _SESSION_END.pack(
        MsgType.SESSION_END,
        *_header(m, n, host=False),
        _uint(n, "session_no", m.session_no, _U32),
        _enum_out(n, "reason", m.reason, EndReason),
        _uint(n, "neb_ms", m.neb_ms, _U32),
        _uint(n, "cum_ul", m.cum_ul, _U32),
        _uint(n, "residual_ul", m.residual_ul, _U16),
    )


def _enc_alarm(m: Alarm) -> bytes:
    n = "ALARM"
    return _ALARM.pack(
        MsgType.ALARM,
        *_header(m, n, host=False),
        _uint(n, "code", m.code, _U16),
        _uint(n, "active", m.active, 1),
    )


def _enc_ack(m: Ack) -> bytes:
    n = "ACK"
    return _ACK.pack(
        MsgType.ACK,
        *_header(m, n, host=False),
        _uint(n, "acked_seq", m.acked_seq, _U8),
        _uint(n, "cmd", m.cmd, _U8),
        _enum_out(n, "result", m.result, AckResult),
    )


def _enc_session_record(m: SessionRecord) -> bytes:
    n = "SESSION_RECORD"
    return _SESSION_RECORD.pack(
        MsgType.SESSION_RECORD,
        *_header(m, n, host=False),
        _uint(n, "session_no", m.session_no, _U32),
        _uint(n, "start_wall_s", m.start_wall_s, _U32),
        _uint(n, "fill_ul", m.fill_ul, _U16),
        _enum_out(n, "reason", m.reason, EndReason),
        _uint(n, "neb_ms", m.neb_ms, _U32),
        _uint(n, "cum_ul", m.cum_ul, _U32),
        _uint(n, "residual_ul", m.residual_ul, _U16),
        _uint(n, "end_wall_s", m.end_wall_s, _U32),
    )


def _enc_bare(msg_type: MsgType) -> Callable[[GetInfo | Start | Stop | Ping], bytes]:
    def enc(m: GetInfo | Start | Stop | Ping) -> bytes:
        return _HEADER.pack(msg_type, *_header(m, msg_type.name, host=True))

    return enc


def _enc_set_clock(m: SetClock) -> bytes:
    n = "SET_CLOCK"
    return _U32_BODY.pack(
        MsgType.SET_CLOCK, *_header(m, n, host=True), _uint(n, "unix_s", m.unix_s, _U32)
    )


def _enc_set_rate(m: SetRate) -> bytes:
    n = "SET_RATE"
    return _U8_BODY.pack(MsgType.SET_RATE, *_header(m, n, host=True), _uint(n, "hz", m.hz, _U8))


def _enc_get_session(m: GetSession) -> bytes:
    n = "GET_SESSION"
    return _U32_BODY.pack(
        MsgType.GET_SESSION,
        *_header(m, n, host=True),
        _uint(n, "session_no", m.session_no, _U32),
    )


# Values are typed loosely because each encoder takes one concrete class; the
# dict is keyed by that class, so the pairing is right by construction.
_ENCODERS: dict[type[Any], Callable[[Any], bytes]] = {
    Ident: _enc_ident,
    Status: _enc_status,
    Output: _enc_output,
    SessionStart: _enc_session_start,
    SessionEnd: _enc_session_end,
    Alarm: _enc_alarm,
    Ack: _enc_ack,
    SessionRecord: _enc_session_record,
    GetInfo: _enc_bare(MsgType.GET_INFO),
    SetClock: _enc_set_clock,
    Start: _enc_bare(MsgType.START),
    Stop: _enc_bare(MsgType.STOP),
    Ping: _enc_bare(MsgType.PING),
    SetRate: _enc_set_rate,
    GetSession: _enc_get_session,
}


def encode_payload(msg: Message) -> bytes:
    """Payload bytes (header + body) for ``msg``; ProtocolError if a field cannot be sent."""
    encoder = _ENCODERS.get(type(msg))
    if encoder is None:
        raise ProtocolError(f"not a VM-1 message: {type(msg).__name__}")
    return encoder(msg)


# --------------------------------------------------------------------------- decode


def _dec_ident(p: bytes) -> Ident:
    n = "IDENT"
    _, seq, dev_ms, ver, model, serial_no, fw, rate, cap, last = _IDENT.unpack(p)
    return Ident(
        protocol_version=ver,
        model=_str_in(n, "model", model),
        serial_no=_str_in(n, "serial_no", serial_no),
        firmware=_str_in(n, "firmware", fw),
        nominal_rate_ul_min=rate,
        reservoir_capacity_ul=cap,
        last_session_no=last,
        seq=seq,
        dev_ms=dev_ms,
    )


# STATUS and OUTPUT are nearly every frame a VM-1 sends (1 Hz, and 10 Hz in a session).
# Their decoders fill the frozen dataclass's slots directly: the generated __init__ sets
# each field through object.__setattr__ (frozen), which is most of a decode's cost. The
# result is the same object (same type, fields, equality and hash); every value is
# checked first, exactly as before.
_new_object = object.__new__
_STATE_OF = _members(DeviceState)  # _enum_in's tables, looked up inline below
_BREATH_OF = _members(Breath)
_STATUS_SET = tuple(
    getattr(Status, f).__set__
    for f in ("state", "reservoir_ul", "battery_pct", "flags", "fault_code", "seq", "dev_ms")
)
_OUTPUT_SET = tuple(
    getattr(Output, f).__set__ for f in ("rate_ul_min", "cum_ul", "breath", "seq", "dev_ms")
)


def _dec_status(p: bytes) -> Status:
    n = "STATUS"
    _, seq, dev_ms, state, reservoir, battery, flags, fault = _STATUS.unpack(p)
    if battery != BATTERY_ON_MAINS and battery > 100:
        raise ProtocolError(f"{n}: battery_pct {battery} outside 0..100 and not 0xFF")
    member = _STATE_OF.get(state)  # what _enum_in does, without the call (every frame)
    if member is None:
        raise ProtocolError(f"{n}: unknown state value {state}")
    msg: Status = _new_object(Status)
    s_state, s_reservoir, s_battery, s_flags, s_fault, s_seq, s_dev_ms = _STATUS_SET
    s_state(msg, member)
    s_reservoir(msg, None if reservoir == RESERVOIR_UNKNOWN else reservoir)
    s_battery(msg, None if battery == BATTERY_ON_MAINS else battery)
    s_flags(msg, flags)
    s_fault(msg, fault)
    s_seq(msg, seq)
    s_dev_ms(msg, dev_ms)
    return msg


def _dec_output(p: bytes) -> Output:
    _, seq, dev_ms, rate, cum, breath = _OUTPUT.unpack(p)
    member = _BREATH_OF.get(breath)  # as in _dec_status
    if member is None:
        raise ProtocolError(f"OUTPUT: unknown breath value {breath}")
    msg: Output = _new_object(Output)
    s_rate, s_cum, s_breath, s_seq, s_dev_ms = _OUTPUT_SET
    s_rate(msg, rate)
    s_cum(msg, cum)
    s_breath(msg, member)
    s_seq(msg, seq)
    s_dev_ms(msg, dev_ms)
    return msg


def _dec_session_start(p: bytes) -> SessionStart:
    _, seq, dev_ms, session_no, fill, wall = _SESSION_START.unpack(p)
    return SessionStart(session_no=session_no, fill_ul=fill, wall_s=wall, seq=seq, dev_ms=dev_ms)


def _dec_session_end(p: bytes) -> SessionEnd:
    _, seq, dev_ms, session_no, reason, neb_ms, cum, residual = _SESSION_END.unpack(p)
    return SessionEnd(
        session_no=session_no,
        reason=_enum_in("SESSION_END", "reason", reason, EndReason),
        neb_ms=neb_ms,
        cum_ul=cum,
        residual_ul=residual,
        seq=seq,
        dev_ms=dev_ms,
    )


def _dec_alarm(p: bytes) -> Alarm:
    _, seq, dev_ms, code, active = _ALARM.unpack(p)
    if active > 1:
        raise ProtocolError(f"ALARM: active must be 0 or 1, got {active}")
    return Alarm(code=code, active=bool(active), seq=seq, dev_ms=dev_ms)


def _dec_ack(p: bytes) -> Ack:
    _, seq, dev_ms, acked_seq, cmd, result = _ACK.unpack(p)
    return Ack(
        acked_seq=acked_seq,
        cmd=cmd,
        result=_enum_in("ACK", "result", result, AckResult),
        seq=seq,
        dev_ms=dev_ms,
    )


def _dec_session_record(p: bytes) -> SessionRecord:
    (_, seq, dev_ms, session_no, start_wall, fill, reason, neb_ms, cum, residual, end_wall) = (
        _SESSION_RECORD.unpack(p)
    )
    return SessionRecord(
        session_no=session_no,
        start_wall_s=start_wall,
        fill_ul=fill,
        reason=_enum_in("SESSION_RECORD", "reason", reason, EndReason),
        neb_ms=neb_ms,
        cum_ul=cum,
        residual_ul=residual,
        end_wall_s=end_wall,
        seq=seq,
        dev_ms=dev_ms,
    )


def _dec_bare(cls: type[GetInfo | Start | Stop | Ping]) -> Callable[[bytes], Message]:
    def dec(p: bytes) -> Message:
        _, seq, dev_ms = _HEADER.unpack(p)
        return cls(seq=seq, dev_ms=dev_ms)

    return dec


def _dec_set_clock(p: bytes) -> SetClock:
    _, seq, dev_ms, unix_s = _U32_BODY.unpack(p)
    return SetClock(unix_s=unix_s, seq=seq, dev_ms=dev_ms)


def _dec_set_rate(p: bytes) -> SetRate:
    _, seq, dev_ms, hz = _U8_BODY.unpack(p)
    return SetRate(hz=hz, seq=seq, dev_ms=dev_ms)


def _dec_get_session(p: bytes) -> GetSession:
    _, seq, dev_ms, session_no = _U32_BODY.unpack(p)
    return GetSession(session_no=session_no, seq=seq, dev_ms=dev_ms)


#: type byte -> (exact payload length, decoder). A decoder given a payload of exactly
#: its length returns the message or raises ProtocolError (a bad field value);
#: :func:`decode_payload` is the checked entry point. Public for the stream decoder,
#: which looks a frame's decoder up itself (a call less per frame).
PAYLOAD_DECODERS: dict[int, tuple[int, Callable[[bytes], Message]]] = {
    MsgType.IDENT: (_IDENT.size, _dec_ident),
    MsgType.STATUS: (_STATUS.size, _dec_status),
    MsgType.OUTPUT: (_OUTPUT.size, _dec_output),
    MsgType.SESSION_START: (_SESSION_START.size, _dec_session_start),
    MsgType.SESSION_END: (_SESSION_END.size, _dec_session_end),
    MsgType.ALARM: (_ALARM.size, _dec_alarm),
    MsgType.ACK: (_ACK.size, _dec_ack),
    MsgType.SESSION_RECORD: (_SESSION_RECORD.size, _dec_session_record),
    MsgType.GET_INFO: (_HEADER.size, _dec_bare(GetInfo)),
    MsgType.SET_CLOCK: (_U32_BODY.size, _dec_set_clock),
    MsgType.START: (_HEADER.size, _dec_bare(Start)),
    MsgType.STOP: (_HEADER.size, _dec_bare(Stop)),
    MsgType.PING: (_HEADER.size, _dec_bare(Ping)),
    MsgType.SET_RATE: (_U8_BODY.size, _dec_set_rate),
    MsgType.GET_SESSION: (_U32_BODY.size, _dec_get_session),
}


def decode_payload(payload: bytes | bytearray | memoryview) -> Message:
    """Message for one payload (either direction); ProtocolError and nothing else if malformed."""
    payload = bytes(payload)
    if len(payload) < HEADER_LEN:
        raise ProtocolError(f"payload of {len(payload)} bytes is shorter than the 6-byte header")
    entry = PAYLOAD_DECODERS.get(payload[0])
    if entry is None:
        raise ProtocolError(f"unknown message type 0x{payload[0]:02X}")
    size, decoder = entry
    if len(payload) != size:
        name = MsgType(payload[0]).name
        raise ProtocolError(
            f"{name} payload is {len(payload)} bytes, expected {size} "
            f"(body {len(payload) - HEADER_LEN}, expected {size - HEADER_LEN})"
        )
    return decoder(payload)
