"""Typed, immutable VM-1 messages (ICD section 2).

Every message carries the payload header's ``seq`` and ``dev_ms``; host
commands send ``dev_ms = 0``. Values the ICD encodes as sentinels (reservoir
0xFFFF, battery 0xFF) are ``None`` here so no caller can mistake them for
numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

PROTOCOL_VERSION = 1
MAX_PAYLOAD = 64
HEADER_LEN = 6


class MsgType(IntEnum):
    IDENT = 0x01
    STATUS = 0x02
    OUTPUT = 0x03
    SESSION_START = 0x04
    SESSION_END = 0x05
    ALARM = 0x06
    ACK = 0x07
    SESSION_RECORD = 0x08
    GET_INFO = 0x81
    SET_CLOCK = 0x82
    START = 0x83
    STOP = 0x84
    PING = 0x85
    SET_RATE = 0x86
    GET_SESSION = 0x87


class DeviceState(IntEnum):
    IDLE = 0
    READY = 1
    NEBULIZING = 2
    PAUSED = 3
    DONE = 4
    FAULT = 5


class EndReason(IntEnum):
    COMPLETE = 0
    USER_STOP = 1
    HOST_STOP = 2
    TIMEOUT = 3
    FAULT = 4
    LOW_BATTERY = 5


class Breath(IntEnum):
    UNKNOWN = 0
    INHALATION = 1
    EXHALATION = 2


class AckResult(IntEnum):
    OK = 0
    BAD_STATE = 1
    BAD_ARGUMENT = 2
    UNKNOWN_COMMAND = 3


class AlarmCode(IntEnum):
    """Alarm codes known in ICD rev 1.0; other codes are valid and passed on."""

    MESH_BLOCKED = 0x0101
    BATTERY_LOW = 0x0201
    OVER_TEMPERATURE = 0x0301
    TILT = 0x0401


def alarm_name(code: int) -> str:
    """Readable name of an alarm code, ``UNKNOWN_0x....`` for codes later firmware may add."""
    try:
        return AlarmCode(code).name
    except ValueError:
        return f"UNKNOWN_0x{code:04X}"


# STATUS flag bits
FLAG_MOUTHPIECE = 0x01
FLAG_MAINS = 0x02
FLAG_MESH_DRY = 0x04
FLAG_CLOCK_SET = 0x08


@dataclass(frozen=True, slots=True, kw_only=True)
class Ident:
    protocol_version: int = PROTOCOL_VERSION
    model: str
    serial_no: str
    firmware: str
    nominal_rate_ul_min: int
    reservoir_capacity_ul: int
    last_session_no: int
    seq: int = 0
    dev_ms: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Status:
    state: DeviceState
    reservoir_ul: int | None  # None: level unknown (0xFFFF on the wire)
    battery_pct: int | None  # None: on mains (0xFF on the wire)
    flags: int
    fault_code: int = 0
    seq: int = 0
    dev_ms: int = 0

    @property
    def mouthpiece_in_use(self) -> bool:
        return bool(self.flags & FLAG_MOUTHPIECE)

    @property
    def on_mains(self) -> bool:
        return bool(self.flags & FLAG_MAINS)

    @property
    def mesh_dry(self) -> bool:
        return bool(self.flags & FLAG_MESH_DRY)

    @property
    def clock_set(self) -> bool:
        return bool(self.flags & FLAG_CLOCK_SET)


@dataclass(frozen=True, slots=True, kw_only=True)
class Output:
    rate_ul_min: int
    cum_ul: int
    breath: Breath = Breath.UNKNOWN
    seq: int = 0
    dev_ms: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionStart:
    session_no: int
    fill_ul: int
    wall_s: int  # 0: device clock never set
    seq: int = 0
    dev_ms: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionEnd:
    session_no: int
    reason: EndReason
    neb_ms: int
    cum_ul: int
    residual_ul: int
    seq: int = 0
    dev_ms: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Alarm:
    code: int  # see AlarmCode; unknown codes are kept as-is
    active: bool
    seq: int = 0
    dev_ms: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Ack:
    acked_seq: int
    cmd: int  # the command's type byte
    result: AckResult
    seq: int = 0
    dev_ms: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionRecord:
    session_no: int
    start_wall_s: int
    fill_ul: int
    reason: EndReason
    neb_ms: int
    cum_ul: int
    residual_ul: int
    end_wall_s: int
    seq: int = 0
    dev_ms: int = 0


# Host -> device commands. dev_ms is always 0 on the wire.


@dataclass(frozen=True, slots=True, kw_only=True)
class GetInfo:
    seq: int = 0
    dev_ms: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class SetClock:
    unix_s: int
    seq: int = 0
    dev_ms: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Start:
    seq: int = 0
    dev_ms: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Stop:
    seq: int = 0
    dev_ms: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Ping:
    seq: int = 0
    dev_ms: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class SetRate:
    hz: int
    seq: int = 0
    dev_ms: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class GetSession:
    session_no: int
    seq: int = 0
    dev_ms: int = 0


DeviceMessage = Ident | Status | Output | SessionStart | SessionEnd | Alarm | Ack | SessionRecord
HostCommand = GetInfo | SetClock | Start | Stop | Ping | SetRate | GetSession
Message = DeviceMessage | HostCommand

MESSAGE_TYPES: dict[type[Message], MsgType] = {
    Ident: MsgType.IDENT,
    Status: MsgType.STATUS,
    Output: MsgType.OUTPUT,
    SessionStart: MsgType.SESSION_START,
    SessionEnd: MsgType.SESSION_END,
    Alarm: MsgType.ALARM,
    Ack: MsgType.ACK,
    SessionRecord: MsgType.SESSION_RECORD,
    GetInfo: MsgType.GET_INFO,
    SetClock: MsgType.SET_CLOCK,
    Start: MsgType.START,
    Stop: MsgType.STOP,
    Ping: MsgType.PING,
    SetRate: MsgType.SET_RATE,
    GetSession: MsgType.GET_SESSION,
}
