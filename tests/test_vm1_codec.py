"""VM-1 payload codec: the ICD's golden vectors, strictness, sentinels and round trips."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devicegw.errors import ProtocolError
from drivers.vm1 import messages as m
from drivers.vm1.codec import decode_payload, encode_payload
from drivers.vm1.stream import Vm1StreamDecoder, encode_message_frame
from tests.vm1_vectors import RAW_VECTORS, build_message


def _unframe(frame: bytes) -> bytes:
    """Payload of a single golden frame, by the ICD's rules spelled out independently."""
    content = frame[1:-1].replace(b"\x7d\x5e", b"\x7e").replace(b"\x7d\x5d", b"\x7d")
    return content[:-2]


_RAW_VECTORS = RAW_VECTORS
VECTORS = [
    pytest.param(bytes.fromhex(v["frame"]), build_message(v), id=v["name"]) for v in _RAW_VECTORS
]


def test_vector_file_holds_every_icd_vector() -> None:
    names = [v["name"] for v in _RAW_VECTORS]
    assert len(names) == 10 == len(set(names))  # ICD rev 1.0 section 5 has ten rows


@pytest.mark.parametrize(("frame", "expected"), VECTORS)
def test_decode_icd_vector(frame: bytes, expected: m.Message) -> None:
    assert decode_payload(_unframe(frame)) == expected


@pytest.mark.parametrize(("frame", "expected"), VECTORS)
def test_encode_icd_vector(frame: bytes, expected: m.Message) -> None:
    assert encode_payload(expected) == _unframe(frame)
    assert encode_message_frame(expected) == frame


@pytest.mark.parametrize(("frame", "expected"), VECTORS)
def test_decoded_enums_and_types(frame: bytes, expected: m.Message) -> None:
    msg = decode_payload(_unframe(frame))
    for field in dataclasses.fields(msg):
        assert type(getattr(msg, field.name)) is type(getattr(expected, field.name)), field.name


# --------------------------------------------------------------------------- sentinels


def _status(**kw: Any) -> m.Status:
    base: dict[str, Any] = {
        "state": m.DeviceState.READY,
        "reservoir_ul": 3000,
        "battery_pct": 80,
        "flags": 0,
    }
    return m.Status(**(base | kw))


@pytest.mark.parametrize(
    ("reservoir", "battery", "wire"),
    [
        (None, None, b"\xff\xff\xff"),
        (0, 0, b"\x00\x00\x00"),
        (0xFFFE, 100, b"\xfe\xff\x64"),
        (None, 15, b"\xff\xff\x0f"),
        (1234, None, b"\xd2\x04\xff"),
    ],
)
def test_status_sentinels_map_to_none_and_back(
    reservoir: int | None, battery: int | None, wire: bytes
) -> None:
    msg = _status(reservoir_ul=reservoir, battery_pct=battery)
    payload = encode_payload(msg)
    assert payload[7:10] == wire
    decoded = decode_payload(payload)
    assert isinstance(decoded, m.Status)
    assert decoded.reservoir_ul == reservoir
    assert decoded.battery_pct == battery
    assert decoded == msg


@pytest.mark.parametrize(
    "kw",
    [
        {"reservoir_ul": 0xFFFF},  # the sentinel is spelled None
        {"battery_pct": 0xFF},
        {"battery_pct": 101},
        {"battery_pct": -1},
        {"reservoir_ul": -1},
    ],
)
def test_status_sentinel_values_as_numbers_are_rejected(kw: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError):
        encode_payload(_status(**kw))


@pytest.mark.parametrize("battery", [101, 150, 0xFE])
def test_decode_rejects_battery_out_of_range(battery: int) -> None:
    payload = bytearray(encode_payload(_status()))
    payload[9] = battery
    with pytest.raises(ProtocolError, match="battery_pct"):
        decode_payload(bytes(payload))


def test_reserved_status_flags_are_kept() -> None:
    msg = _status(flags=0xFF)
    decoded = decode_payload(encode_payload(msg))
    assert decoded == msg
    assert isinstance(decoded, m.Status)
    assert decoded.mouthpiece_in_use and decoded.on_mains and decoded.mesh_dry
    assert decoded.clock_set


# --------------------------------------------------------------------------- strict decode


def _payload(msg_type: int, body: bytes, seq: int = 5, dev_ms: int = 1000) -> bytes:
    return bytes((msg_type, seq)) + dev_ms.to_bytes(4, "little") + body


BODY_LEN = {
    m.MsgType.IDENT: 41,
    m.MsgType.STATUS: 7,
    m.MsgType.OUTPUT: 7,
    m.MsgType.SESSION_START: 10,
    m.MsgType.SESSION_END: 15,
    m.MsgType.ALARM: 3,
    m.MsgType.ACK: 3,
    m.MsgType.SESSION_RECORD: 25,
    m.MsgType.GET_INFO: 0,
    m.MsgType.SET_CLOCK: 4,
    m.MsgType.START: 0,
    m.MsgType.STOP: 0,
    m.MsgType.PING: 0,
    m.MsgType.SET_RATE: 1,
    m.MsgType.GET_SESSION: 4,
}


def test_every_type_has_a_body_length() -> None:
    assert set(BODY_LEN) == set(m.MsgType)


@pytest.mark.parametrize("msg_type", list(m.MsgType), ids=lambda t: t.name)
def test_zero_body_of_exact_length_decodes(msg_type: m.MsgType) -> None:
    # All-zero bodies are valid for every type (state IDLE, reason COMPLETE, ...).
    msg = decode_payload(_payload(msg_type, bytes(BODY_LEN[msg_type])))
    assert m.MESSAGE_TYPES[type(msg)] is msg_type
    assert msg.seq == 5
    assert msg.dev_ms == 1000


@pytest.mark.parametrize(
    ("msg_type", "n"),
    [(t, BODY_LEN[t] + d) for t in m.MsgType for d in (-1, 1, 20) if BODY_LEN[t] + d >= 0],
    ids=str,
)
def test_wrong_body_length_is_rejected(msg_type: m.MsgType, n: int) -> None:
    with pytest.raises(ProtocolError, match=rf"{msg_type.name} payload is \d+ bytes, expected"):
        decode_payload(_payload(msg_type, bytes(n)))


@pytest.mark.parametrize("msg_type", [0x00, 0x09, 0x7F, 0x80, 0x88, 0xFF])
def test_unknown_type_byte_is_rejected(msg_type: int) -> None:
    with pytest.raises(ProtocolError, match=f"unknown message type 0x{msg_type:02X}"):
        decode_payload(_payload(msg_type, bytes(7)))


@pytest.mark.parametrize("n", range(6))
def test_payload_shorter_than_header_is_rejected(n: int) -> None:
    with pytest.raises(ProtocolError, match="shorter than the 6-byte header"):
        decode_payload(b"\x02" * n)


@pytest.mark.parametrize(
    ("msg_type", "offset", "value", "field"),
    [
        (m.MsgType.STATUS, 0, 6, "state"),
        (m.MsgType.STATUS, 0, 0xFF, "state"),
        (m.MsgType.OUTPUT, 6, 3, "breath"),
        (m.MsgType.SESSION_END, 4, 6, "reason"),
        (m.MsgType.SESSION_RECORD, 10, 6, "reason"),
        (m.MsgType.ACK, 2, 4, "result"),
        (m.MsgType.ALARM, 2, 2, "active"),
    ],
)
def test_unknown_enum_value_is_rejected(
    msg_type: m.MsgType, offset: int, value: int, field: str
) -> None:
    body = bytearray(BODY_LEN[msg_type])
    body[offset] = value
    with pytest.raises(ProtocolError, match=field):
        decode_payload(_payload(msg_type, bytes(body)))


@pytest.mark.parametrize("code", [0x0000, 0x0102, 0x0501, 0x7E7D, 0xFFFF])
def test_unknown_alarm_code_is_passed_on(code: int) -> None:
    msg = decode_payload(_payload(m.MsgType.ALARM, code.to_bytes(2, "little") + b"\x00"))
    assert msg == m.Alarm(code=code, active=False, seq=5, dev_ms=1000)
    assert m.alarm_name(code).startswith("UNKNOWN_0x")


@pytest.mark.parametrize("code", list(m.AlarmCode), ids=lambda c: c.name)
def test_known_alarm_codes(code: m.AlarmCode) -> None:
    msg = decode_payload(_payload(m.MsgType.ALARM, code.to_bytes(2, "little") + b"\x01"))
    assert isinstance(msg, m.Alarm)
    assert msg.code == code
    assert msg.active is True


def test_other_protocol_version_is_decoded_for_the_driver_to_judge() -> None:
    ident = m.Ident(
        protocol_version=2,
        model="VM-1",
        serial_no="X",
        firmware="2.0",
        nominal_rate_ul_min=400,
        reservoir_capacity_ul=6000,
        last_session_no=0,
    )
    assert decode_payload(encode_payload(ident)) == ident


def test_decode_accepts_bytearray_and_memoryview() -> None:
    payload = encode_payload(m.Ping(seq=7))
    assert decode_payload(bytearray(payload)) == m.Ping(seq=7)
    assert decode_payload(memoryview(payload)) == m.Ping(seq=7)


def test_host_command_dev_ms_is_kept_on_decode() -> None:
    assert decode_payload(_payload(m.MsgType.PING, b"", dev_ms=99)) == m.Ping(seq=5, dev_ms=99)


@given(st.binary(max_size=80))
def test_decode_of_random_bytes_raises_only_protocol_error(data: bytes) -> None:
    try:
        msg = decode_payload(data)
    except ProtocolError:
        return
    assert type(msg) in m.MESSAGE_TYPES


@given(st.sampled_from(list(m.MsgType)), st.data())
def test_decode_of_random_body_raises_only_protocol_error(
    msg_type: m.MsgType, data: st.DataObject
) -> None:
    size = BODY_LEN[msg_type]
    body = data.draw(st.binary(min_size=size, max_size=size))
    try:
        msg = decode_payload(_payload(msg_type, body))
    except ProtocolError:
        return
    assert m.MESSAGE_TYPES[type(msg)] is msg_type
    assert (msg.seq, msg.dev_ms) == (5, 1000)


# --------------------------------------------------------------------------- strings


def _ident_payload(model: bytes) -> bytes:
    ident = m.Ident(
        model="VM-1",
        serial_no="S",
        firmware="F",
        nominal_rate_ul_min=1,
        reservoir_capacity_ul=2,
        last_session_no=3,
    )
    payload = bytearray(encode_payload(ident))
    payload[7:19] = model
    return bytes(payload)


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        (b"VM-1" + bytes(8), "VM-1"),
        (b"ABCDEFGHIJKL", "ABCDEFGHIJKL"),  # full width, no terminator
        (b"AB\x00CDEFGHIJK", "AB"),  # everything after the first NUL is ignored
        (b"AB\x00\xff\xfe" + bytes(7), "AB"),  # ... even non-ASCII junk
        (bytes(12), ""),
    ],
)
def test_string_decoding_stops_at_first_nul(raw: bytes, text: str) -> None:
    msg = decode_payload(_ident_payload(raw))
    assert isinstance(msg, m.Ident)
    assert msg.model == text


def test_non_ascii_string_is_rejected_on_decode() -> None:
    with pytest.raises(ProtocolError, match="model is not ASCII"):
        decode_payload(_ident_payload(b"VM\xe9" + bytes(9)))


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("model", "VM-1-TOO-LONG", "longer than 12"),
        ("serial_no", "1234567890123", "longer than 12"),
        ("firmware", "1.4.2-rc17", "longer than 8"),
        ("model", "VM-\u00e9", "not ASCII"),
        ("firmware", "1\u20ac", "not ASCII"),
        ("serial_no", "AB\x00CD", "contains NUL"),
    ],
)
def test_bad_strings_are_rejected_on_encode(field: str, value: str, match: str) -> None:
    kw: dict[str, Any] = {
        "model": "VM-1",
        "serial_no": "S",
        "firmware": "F",
        "nominal_rate_ul_min": 1,
        "reservoir_capacity_ul": 2,
        "last_session_no": 3,
    }
    with pytest.raises(ProtocolError, match=match):
        encode_payload(m.Ident(**(kw | {field: value})))


def test_full_width_strings_round_trip() -> None:
    ident = m.Ident(
        model="M" * 12,
        serial_no="~}" * 6,
        firmware="1.2.3.4.",
        nominal_rate_ul_min=1,
        reservoir_capacity_ul=2,
        last_session_no=3,
    )
    assert decode_payload(encode_payload(ident)) == ident


# --------------------------------------------------------------------------- encode range checks


@pytest.mark.parametrize(
    ("msg", "match"),
    [
        (m.Ping(seq=256), r"PING\.seq=256"),
        (m.Ping(seq=-1), r"PING\.seq=-1"),
        (m.Ping(dev_ms=1), r"PING\.dev_ms=1: host commands send 0"),
        (m.GetInfo(dev_ms=5), r"GET_INFO\.dev_ms"),
        (m.Output(rate_ul_min=0, cum_ul=0, dev_ms=2**32), r"OUTPUT\.dev_ms"),
        (m.Output(rate_ul_min=0x10000, cum_ul=0), r"rate_ul_min"),
        (m.Output(rate_ul_min=0, cum_ul=2**32), r"cum_ul"),
        (m.Output(rate_ul_min=0, cum_ul=0, breath=3), r"breath"),  # type: ignore[arg-type]
        (_status(state=6), r"state"),
        (_status(state="READY"), r"state must be an int"),
        (_status(flags=0x100), r"flags"),
        (_status(fault_code=-1), r"fault_code"),
        (m.SessionStart(session_no=2**32, fill_ul=0, wall_s=0), r"session_no"),
        (m.SessionStart(session_no=1, fill_ul=0x10000, wall_s=0), r"fill_ul"),
        (m.SessionStart(session_no=1, fill_ul=0, wall_s=-1), r"wall_s"),
        (
            m.SessionEnd(session_no=1, reason=7, neb_ms=0, cum_ul=0, residual_ul=0),  # type: ignore[arg-type]
            r"reason",
        ),
        (
            m.SessionEnd(
                session_no=1, reason=m.EndReason.FAULT, neb_ms=0, cum_ul=0, residual_ul=70000
            ),
            r"residual_ul",
        ),
        (m.Alarm(code=0x10000, active=True), r"code"),
        (m.Alarm(code=1, active=2), r"active"),  # type: ignore[arg-type]
        (m.Ack(acked_seq=256, cmd=0x82, result=m.AckResult.OK), r"acked_seq"),
        (m.Ack(acked_seq=1, cmd=0x100, result=m.AckResult.OK), r"cmd"),
        (m.Ack(acked_seq=1, cmd=0x82, result=4), r"result"),  # type: ignore[arg-type]
        (
            m.SessionRecord(
                session_no=1,
                start_wall_s=0,
                fill_ul=0,
                reason=m.EndReason.COMPLETE,
                neb_ms=2**32,
                cum_ul=0,
                residual_ul=0,
                end_wall_s=0,
            ),
            r"neb_ms",
        ),
        (m.SetClock(unix_s=2**32), r"unix_s"),
        (m.SetRate(hz=256), r"hz"),
        (m.SetRate(hz=1.5), r"hz must be an int"),  # type: ignore[arg-type]
        (m.GetSession(session_no=-1), r"session_no"),
        (
            m.Ident(
                protocol_version=256,
                model="",
                serial_no="",
                firmware="",
                nominal_rate_ul_min=0,
                reservoir_capacity_ul=0,
                last_session_no=0,
            ),
            r"protocol_version",
        ),
    ],
)
def test_out_of_range_fields_are_rejected_on_encode(msg: m.Message, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        encode_payload(msg)


@pytest.mark.parametrize("hz", [0, 1, 50, 51, 255])
def test_set_rate_carries_any_u8_for_the_device_to_judge(hz: int) -> None:
    # The ICD answers hz outside 1-50 with BAD_ARGUMENT, so such values travel.
    assert decode_payload(encode_payload(m.SetRate(hz=hz, seq=3))) == m.SetRate(hz=hz, seq=3)


def test_encode_rejects_non_messages() -> None:
    with pytest.raises(ProtocolError, match="not a VM-1 message"):
        encode_payload(object())  # type: ignore[arg-type]


# --------------------------------------------------------------------------- round trips


def _wire_uint(nbytes: int) -> st.SearchStrategy[int]:
    """Unsigned ints whose bytes favour the flag and escape values (0x7E, 0x7D)."""
    byte = st.sampled_from([0x7E, 0x7D, 0x00, 0xFF]) | st.integers(0, 255)
    return st.lists(byte, min_size=nbytes, max_size=nbytes).map(
        lambda bs: int.from_bytes(bytes(bs), "little")
    )


U8, U16, U32 = _wire_uint(1), _wire_uint(2), _wire_uint(4)


def _ascii(width: int) -> st.SearchStrategy[str]:
    return st.text(st.characters(min_codepoint=1, max_codepoint=127), max_size=width)


DEVICE_HEADER: dict[str, st.SearchStrategy[int]] = {"seq": U8, "dev_ms": U32}
HOST_HEADER: dict[str, st.SearchStrategy[int]] = {"seq": U8, "dev_ms": st.just(0)}

STRATEGIES: dict[type[m.Message], st.SearchStrategy[m.Message]] = {
    m.Ident: st.builds(
        m.Ident,
        protocol_version=U8,
        model=_ascii(12),
        serial_no=_ascii(12),
        firmware=_ascii(8),
        nominal_rate_ul_min=U16,
        reservoir_capacity_ul=U16,
        last_session_no=U32,
        **DEVICE_HEADER,
    ),
    m.Status: st.builds(
        m.Status,
        state=st.sampled_from(m.DeviceState),
        reservoir_ul=st.none() | U16.filter(lambda v: v != 0xFFFF),
        battery_pct=st.none() | st.integers(0, 100),
        flags=U8,
        fault_code=U16,
        **DEVICE_HEADER,
    ),
    m.Output: st.builds(
        m.Output, rate_ul_min=U16, cum_ul=U32, breath=st.sampled_from(m.Breath), **DEVICE_HEADER
    ),
    m.SessionStart: st.builds(
        m.SessionStart, session_no=U32, fill_ul=U16, wall_s=U32, **DEVICE_HEADER
    ),
    m.SessionEnd: st.builds(
        m.SessionEnd,
        session_no=U32,
        reason=st.sampled_from(m.EndReason),
        neb_ms=U32,
        cum_ul=U32,
        residual_ul=U16,
        **DEVICE_HEADER,
    ),
    m.Alarm: st.builds(
        m.Alarm,
        code=st.sampled_from(m.AlarmCode) | U16,
        active=st.booleans(),
        **DEVICE_HEADER,
    ),
    m.Ack: st.builds(
        m.Ack,
        acked_seq=U8,
        cmd=st.sampled_from([t.value for t in m.MsgType if t >= 0x80]) | U8,
        result=st.sampled_from(m.AckResult),
        **DEVICE_HEADER,
    ),
    m.SessionRecord: st.builds(
        m.SessionRecord,
        session_no=U32,
        start_wall_s=U32,
        fill_ul=U16,
        reason=st.sampled_from(m.EndReason),
        neb_ms=U32,
        cum_ul=U32,
        residual_ul=U16,
        end_wall_s=U32,
        **DEVICE_HEADER,
    ),
    m.GetInfo: st.builds(m.GetInfo, **HOST_HEADER),
    m.SetClock: st.builds(m.SetClock, unix_s=U32, **HOST_HEADER),
    m.Start: st.builds(m.Start, **HOST_HEADER),
    m.Stop: st.builds(m.Stop, **HOST_HEADER),
    m.Ping: st.builds(m.Ping, **HOST_HEADER),
    m.SetRate: st.builds(m.SetRate, hz=U8, **HOST_HEADER),
    m.GetSession: st.builds(m.GetSession, session_no=U32, **HOST_HEADER),
}
ANY_MESSAGE: st.SearchStrategy[m.Message] = st.one_of(*STRATEGIES.values())


def test_every_message_type_has_a_strategy() -> None:
    assert set(STRATEGIES) == set(m.MESSAGE_TYPES)


@pytest.mark.parametrize("cls", list(STRATEGIES), ids=lambda c: c.__name__)
@settings(max_examples=60)
@given(data=st.data())
def test_payload_round_trip(cls: type[m.Message], data: st.DataObject) -> None:
    msg = data.draw(STRATEGIES[cls])
    payload = encode_payload(msg)
    assert payload[0] == m.MESSAGE_TYPES[cls]
    assert len(payload) == 6 + BODY_LEN[m.MESSAGE_TYPES[cls]]
    assert decode_payload(payload) == msg


@pytest.mark.parametrize("cls", list(STRATEGIES), ids=lambda c: c.__name__)
@settings(max_examples=12)
@given(data=st.data(), seq=st.sampled_from([0x7D, 0x7E, 0x00, 0xFF]))
def test_flag_and_escape_seq_round_trip(
    cls: type[m.Message], data: st.DataObject, seq: int
) -> None:
    msg = dataclasses.replace(data.draw(STRATEGIES[cls]), seq=seq)
    assert decode_payload(encode_payload(msg)) == msg


@pytest.mark.parametrize("cls", list(STRATEGIES), ids=lambda c: c.__name__)
@settings(max_examples=30)
@given(data=st.data())
def test_frame_round_trip(cls: type[m.Message], data: st.DataObject) -> None:
    msg = data.draw(STRATEGIES[cls])
    frame = encode_message_frame(msg)
    assert frame[0] == frame[-1] == 0x7E
    assert 0x7E not in frame[1:-1]
    decoder = Vm1StreamDecoder()
    assert decoder.feed(frame) == [msg]
    stats = decoder.stats
    assert (stats.messages, stats.frames_bad, stats.bad_payloads) == (1, 0, 0)
