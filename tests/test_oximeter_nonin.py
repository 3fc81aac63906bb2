"""Nonin OEM III format #2: golden packets fed three ways, frame-sync recovery, counters, gating."""

from __future__ import annotations

import contextlib
import dataclasses
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devicegw.errors import ProtocolError
from drivers.oximeter import nonin
from drivers.oximeter.nonin import (
    NoninDecoder,
    NoninPacket,
    NoninStats,
    NoninStatus,
    Perfusion,
    decode_packet,
    encode_packet,
    frame_checksum,
    make_packet,
    to_sample,
)
from drivers.oximeter.sample import OximeterSample, QualityFlag

_DATA = tomllib.loads((Path(__file__).parent / "data" / "oximeter" / "nonin.toml").read_text())


def _none(value: Any) -> Any:
    return None if value == "none" else value


def _wire(vector: dict[str, Any]) -> bytes:
    frames = [bytes.fromhex(f) for f in vector["frames"]]
    assert len(frames) == 25 and all(len(f) == 5 for f in frames)
    return b"".join(frames)


def _packet(vector: dict[str, Any], wire: bytes) -> NoninPacket:
    """Expected packet: DATA values from the vector, STATUS and PLETH straight off the frames."""
    frames = [wire[i : i + 5] for i in range(0, 125, 5)]
    return NoninPacket(
        statuses=tuple(NoninStatus(f[1]) for f in frames),
        pleth=tuple(f[2] for f in frames),
        **{k: _none(v) for k, v in vector["fields"].items()},
    )


RAW: list[dict[str, Any]] = _DATA["packet"]
WIRE: list[bytes] = [_wire(v) for v in RAW]
PACKETS: list[NoninPacket] = [_packet(v, w) for v, w in zip(RAW, WIRE, strict=True)]
VECTORS = [pytest.param(w, p, v, id=v["name"]) for w, p, v in zip(WIRE, PACKETS, RAW, strict=True)]
ALL = b"".join(WIRE)
NORMAL, MISSING, HIGH_HR = WIRE[0], WIRE[1], WIRE[2]
NORMAL_PKT, MISSING_PKT, HIGH_HR_PKT = PACKETS[0], PACKETS[1], PACKETS[2]


def _feed_bytewise(decoder: NoninDecoder, data: bytes) -> list[NoninPacket]:
    out: list[NoninPacket] = []
    for i in range(len(data)):
        out += decoder.feed(data[i : i + 1])
    return out


def _frame(wire: bytes, n: int) -> bytes:
    """Frame ``n`` (1-based) of a packet."""
    return wire[(n - 1) * 5 : n * 5]


# --------------------------------------------------------------------------- golden packets


@pytest.mark.parametrize(("wire", "packet", "vector"), VECTORS)
def test_packet_decodes(wire: bytes, packet: NoninPacket, vector: dict[str, Any]) -> None:
    decoded = decode_packet(wire)
    assert decoded == packet
    assert decoded.perfusion is Perfusion[vector["perfusion"]]


@pytest.mark.parametrize(("wire", "packet", "vector"), VECTORS)
def test_packet_encodes(wire: bytes, packet: NoninPacket, vector: dict[str, Any]) -> None:
    encoded = encode_packet(packet)
    assert len(encoded) == nonin.PACKET_LEN == 125
    if vector["canonical"]:
        assert encoded == wire
    assert decode_packet(encoded) == packet


@pytest.mark.parametrize(("wire", "packet", "vector"), VECTORS)
def test_packet_sample(wire: bytes, packet: NoninPacket, vector: dict[str, Any]) -> None:
    spec = vector["sample"]
    spo2, pulse = _none(spec["spo2"]), _none(spec["pulse_bpm"])
    expected = OximeterSample(
        spo2=None if spo2 is None else float(spo2),
        pulse_bpm=None if pulse is None else float(pulse),
        quality=frozenset(QualityFlag(q) for q in spec["quality"]),
        pleth=packet.pleth,
        source="nonin-oem3",
    )
    sample = to_sample(packet)
    assert sample == expected
    assert sample.valid is spec["valid"]


@pytest.mark.parametrize(("wire", "packet", "vector"), VECTORS)
def test_vector_fed_whole(wire: bytes, packet: NoninPacket, vector: dict[str, Any]) -> None:
    decoder = NoninDecoder()
    assert decoder.feed(wire) == [packet]
    assert decoder.stats == NoninStats(frames_ok=25, packets_ok=1)
    assert decoder.pending_bytes == decoder.pending_frames == 0


@pytest.mark.parametrize(("wire", "packet", "vector"), VECTORS)
def test_vector_fed_one_byte_at_a_time(
    wire: bytes, packet: NoninPacket, vector: dict[str, Any]
) -> None:
    decoder = NoninDecoder()
    for i in range(len(wire) - 1):
        assert decoder.feed(wire[i : i + 1]) == []
    assert decoder.feed(wire[-1:]) == [packet]
    assert decoder.stats == NoninStats(frames_ok=25, packets_ok=1)


@pytest.mark.parametrize(("wire", "packet", "vector"), VECTORS)
def test_vector_split_at_every_offset(
    wire: bytes, packet: NoninPacket, vector: dict[str, Any]
) -> None:
    for cut in range(len(wire) + 1):
        decoder = NoninDecoder()
        assert decoder.feed(wire[:cut]) + decoder.feed(wire[cut:]) == [packet], cut
        assert decoder.stats == NoninStats(frames_ok=25, packets_ok=1)


def test_all_vectors_back_to_back() -> None:
    decoder = NoninDecoder()
    assert decoder.feed(ALL) == PACKETS
    assert decoder.stats == NoninStats(frames_ok=25 * len(PACKETS), packets_ok=len(PACKETS))


def test_all_vectors_back_to_back_one_byte_at_a_time() -> None:
    decoder = NoninDecoder()
    assert _feed_bytewise(decoder, ALL) == PACKETS
    assert decoder.stats == NoninStats(frames_ok=25 * len(PACKETS), packets_ok=len(PACKETS))


def test_all_vectors_split_at_every_offset() -> None:
    for cut in range(0, len(ALL) + 1, 3):
        decoder = NoninDecoder()
        assert decoder.feed(ALL[:cut]) + decoder.feed(ALL[cut:]) == PACKETS, cut


def test_hr_is_nine_bits_and_511_is_missing() -> None:
    assert HIGH_HR_PKT.hr == 300  # (2 << 7) | 0x2C: needs the MSB frame
    assert MISSING_PKT.hr is None and MISSING_PKT.spo2 is None
    assert _frame(MISSING, 1)[3] == 0x03 and _frame(MISSING, 2)[3] == 0x7F  # 511


def test_status_bits() -> None:
    assert [m.value for m in NoninStatus] == [1 << i for i in range(8)]
    assert nonin.perfusion_of(NoninStatus.GPRF) is Perfusion.GREEN
    assert nonin.perfusion_of(NoninStatus.RPRF) is Perfusion.RED
    assert nonin.perfusion_of(NoninStatus.RPRF | NoninStatus.GPRF) is Perfusion.YELLOW
    assert nonin.perfusion_of(NoninStatus.BIT7) is Perfusion.NONE


@pytest.mark.parametrize(
    ("status", "flags", "valid"),
    [
        (NoninStatus.SNSD, {QualityFlag.PROBE_UNPLUGGED}, False),
        (NoninStatus.ARTF, {QualityFlag.ARTIFACT}, False),
        (NoninStatus.OOT, {QualityFlag.OUT_OF_TRACK}, False),
        (NoninStatus.SNSA, {QualityFlag.SENSOR_ALARM}, False),
        (NoninStatus.RPRF, {QualityFlag.LOW_PERFUSION}, False),
        (NoninStatus.RPRF | NoninStatus.GPRF, {QualityFlag.MARGINAL_PERFUSION}, True),
        (NoninStatus.GPRF, set(), True),
    ],
    ids=["snsd", "artf", "oot", "snsa", "red", "yellow", "green"],
)
def test_status_gating(status: NoninStatus, flags: set[QualityFlag], valid: bool) -> None:
    sample = to_sample(make_packet(hr=70, spo2=96, status=status))
    assert sample.quality == flags
    assert sample.valid is valid


def test_one_frame_with_artifact_gates_the_packet() -> None:
    statuses = list(NORMAL_PKT.statuses)
    statuses[12] |= NoninStatus.ARTF
    packet = dataclasses.replace(NORMAL_PKT, statuses=tuple(statuses))
    assert decode_packet(encode_packet(packet)) == packet
    assert to_sample(packet).quality == {QualityFlag.ARTIFACT}


def test_worst_perfusion_of_the_packet_wins() -> None:
    statuses = list(NORMAL_PKT.statuses)  # green on frames 10-21
    statuses[3] |= NoninStatus.RPRF | NoninStatus.GPRF
    statuses[4] |= NoninStatus.RPRF
    assert dataclasses.replace(NORMAL_PKT, statuses=tuple(statuses)).perfusion is Perfusion.RED


# --------------------------------------------------------------------------- stream recovery


def _checksum_broken(wire: bytes, n: int) -> bytes:
    """``wire`` with the checksum of frame ``n`` (1-based) wrong but not 0x01."""
    out = bytearray(wire)
    pos = n * 5 - 1
    out[pos] = (out[pos] + 0x11) & 0xFF
    assert out[pos] != 0x01
    return bytes(out)


# name, stream, expected packets, expected stats, pending bytes
SCENARIOS = [
    pytest.param(
        _checksum_broken(NORMAL, 7) + MISSING,
        [MISSING_PKT],
        # frames 1-6 ok, frame 7 fails: 1 checksum error, its 5 bytes dropped one at a time,
        # the packet is incomplete, frames 8-25 are orphans; then a clean packet.
        NoninStats(
            frames_ok=6 + 18 + 25,
            checksum_errors=1,
            bytes_discarded=5,
            packets_ok=1,
            packets_incomplete=1,
            frames_orphaned=18,
        ),
        0,
        id="checksum_failure_then_recovery",
    ),
    pytest.param(
        bytes.fromhex("ff 01 00 01 80 12 34") + NORMAL,
        [NORMAL_PKT],
        # ff; 01 (next byte lacks bit 7); 00; 01 80 12 34 + NORMAL's 01 looks like a frame
        # but fails the checksum (0xC7 != 0x01); then 80 12 34: 7 bytes, 1 checksum error.
        NoninStats(frames_ok=25, checksum_errors=1, bytes_discarded=7, packets_ok=1),
        0,
        id="frame_sync_after_garbage",
    ),
    pytest.param(
        NORMAL[:50] + HIGH_HR,
        [HIGH_HR_PKT],
        NoninStats(frames_ok=35, packets_ok=1, packets_incomplete=1),
        0,
        id="incomplete_packet_cut_by_sync_frame",
    ),
    pytest.param(
        NORMAL[-60:] + NORMAL,
        [NORMAL_PKT],
        NoninStats(frames_ok=37, packets_ok=1, frames_orphaned=12),
        0,
        id="port_opened_mid_packet",
    ),
    pytest.param(
        NORMAL[1:] + MISSING,
        [MISSING_PKT],
        # Without its leading 0x01 the first frame is lost; the rest are orphans.
        NoninStats(frames_ok=24 + 25, bytes_discarded=4, packets_ok=1, frames_orphaned=24),
        0,
        id="first_byte_lost",
    ),
    pytest.param(
        HIGH_HR + MISSING[:-3],
        [HIGH_HR_PKT],
        NoninStats(frames_ok=25 + 24, packets_ok=1),
        2,
        id="partial_frame_pending",
    ),
    pytest.param(
        NORMAL + b"\x55" * 3 + HIGH_HR[:-5] + MISSING,
        [NORMAL_PKT, MISSING_PKT],
        # Noise between packets costs nothing; HIGH_HR missing its last frame is incomplete.
        NoninStats(frames_ok=25 + 24 + 25, bytes_discarded=3, packets_ok=2, packets_incomplete=1),
        0,
        id="noise_and_short_packet_between_good_ones",
    ),
]


@pytest.mark.parametrize(("stream", "packets", "stats", "pending"), SCENARIOS)
def test_scenario_fed_whole(
    stream: bytes, packets: list[NoninPacket], stats: NoninStats, pending: int
) -> None:
    decoder = NoninDecoder()
    assert decoder.feed(stream) == packets
    assert decoder.stats == stats
    assert decoder.pending_bytes == pending


@pytest.mark.parametrize(("stream", "packets", "stats", "pending"), SCENARIOS)
def test_scenario_fed_one_byte_at_a_time(
    stream: bytes, packets: list[NoninPacket], stats: NoninStats, pending: int
) -> None:
    decoder = NoninDecoder()
    assert _feed_bytewise(decoder, stream) == packets
    assert decoder.stats == stats
    assert decoder.pending_bytes == pending


@pytest.mark.parametrize(("stream", "packets", "stats", "pending"), SCENARIOS)
def test_scenario_split_at_every_offset(
    stream: bytes, packets: list[NoninPacket], stats: NoninStats, pending: int
) -> None:
    for cut in range(len(stream) + 1):
        decoder = NoninDecoder()
        assert decoder.feed(stream[:cut]) + decoder.feed(stream[cut:]) == packets, cut
        assert decoder.stats == stats, cut


def test_scenarios_back_to_back() -> None:
    decoder = NoninDecoder()
    expected: list[NoninPacket] = []
    got: list[NoninPacket] = []
    for param in SCENARIOS:
        stream, packets, _, _ = param.values
        assert isinstance(stream, bytes) and isinstance(packets, list)
        got += decoder.feed(stream)
        expected += packets
    assert got == expected


def test_complete_packet_with_corrupt_spo2_is_counted_not_raised() -> None:
    frames = bytearray(NORMAL)
    frames[2 * 5 + 3] = 0x70  # frame 3 SpO2 = 112
    frames[2 * 5 + 4] = frame_checksum(frames[10:14])
    decoder = NoninDecoder()
    assert decoder.feed(bytes(frames) + MISSING) == [MISSING_PKT]
    assert decoder.stats.bad_packets == 1
    assert decoder.stats.frames_ok == 50
    assert decoder.last_error is not None and "SpO2 byte 112" in str(decoder.last_error)
    with pytest.raises(ProtocolError, match="SpO2 byte 112"):
        decode_packet(bytes(frames))


def test_reset_drops_partial_frame_and_packet() -> None:
    decoder = NoninDecoder()
    decoder.feed(NORMAL[:52])
    assert (decoder.pending_frames, decoder.pending_bytes) == (10, 2)
    decoder.reset()
    assert (decoder.pending_frames, decoder.pending_bytes) == (0, 0)
    assert decoder.stats.packets_incomplete == 1
    assert decoder.stats.bytes_discarded == 2
    assert decoder.feed(MISSING) == [MISSING_PKT]


def test_feed_accepts_bytearray_memoryview_and_empty() -> None:
    decoder = NoninDecoder()
    assert decoder.feed(b"") == []
    assert decoder.feed(bytearray(NORMAL)) == [NORMAL_PKT]
    assert decoder.feed(memoryview(MISSING)) == [MISSING_PKT]


# --------------------------------------------------------------------------- single-packet codec


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (NORMAL[:-1], "124 bytes"),
        (NORMAL + b"\x00", "126 bytes"),
        (_checksum_broken(NORMAL, 4), "frame 4 .* not a valid frame"),
        (NORMAL[5:] + NORMAL[:5], "frame 1 has the SYNC bit wrong"),
        (NORMAL[:10] + NORMAL[:5] + NORMAL[15:], "frame 3 has the SYNC bit wrong"),
    ],
    ids=["short", "long", "checksum", "sync_not_first", "two_syncs"],
)
def test_decode_packet_rejects(raw: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        decode_packet(raw)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"hr": 511}, "hr"),
        ({"hr": -1}, "hr"),
        ({"spo2": 101}, "spo2"),
        ({"spo2_fast": 127}, "spo2_fast"),
        ({"hr_extended_display": 600}, "hr_extended_display"),
        ({"firmware_revision": 256}, "firmware_revision"),
        ({"pleth": (0,) * 24}, "25 statuses"),
        ({"pleth": (256,) + (0,) * 24}, "pleth"),
        ({"statuses": (NoninStatus.BIT7,) * 25}, "SYNC"),
        ({"statuses": (NoninStatus.SYNC,) + (NoninStatus.BIT7,) * 24}, "bit 7"),
    ],
)
def test_encode_packet_refuses(change: dict[str, Any], match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        encode_packet(dataclasses.replace(NORMAL_PKT, **change))


def test_make_packet_fills_sync_and_bit7() -> None:
    packet = make_packet(hr=61, spo2=99, status=NoninStatus.SYNC | NoninStatus.GPRF)
    assert packet.statuses[0] == NoninStatus.BIT7 | NoninStatus.SYNC | NoninStatus.GPRF
    assert set(packet.statuses[1:]) == {NoninStatus.BIT7 | NoninStatus.GPRF}
    assert decode_packet(encode_packet(packet)) == packet
    assert to_sample(packet).valid


def test_serial_settings() -> None:
    s = nonin.SERIAL_SETTINGS
    assert (s.baudrate, s.bytesize, s.parity, s.stopbits, s.flow_control) == (
        9600,
        8,
        "N",
        1,
        False,
    )


# --------------------------------------------------------------------------- properties

_HR = st.none() | st.integers(0, 510)
_SPO2 = st.none() | st.integers(0, 100)
_STATUS = st.integers(0, 0x7F).map(lambda s: NoninStatus((s & ~1) | 0x80))
PACKET_STRATEGY = st.builds(
    lambda statuses, **kw: NoninPacket(
        statuses=(statuses[0] | NoninStatus.SYNC, *statuses[1:]), **kw
    ),
    statuses=st.lists(_STATUS, min_size=25, max_size=25),
    pleth=st.lists(st.integers(0, 255), min_size=25, max_size=25).map(tuple),
    hr=_HR,
    spo2=_SPO2,
    firmware_revision=st.integers(0, 255),
    spo2_display=_SPO2,
    spo2_fast=_SPO2,
    spo2_beat_to_beat=_SPO2,
    hr_extended=_HR,
    spo2_extended=_SPO2,
    spo2_extended_display=_SPO2,
    hr_display=_HR,
    hr_extended_display=_HR,
)
_WIRE_BYTE = st.sampled_from([0x01, 0x80, 0x81, 0x00, 0xFF]) | st.integers(0, 255)
NOISE = st.lists(_WIRE_BYTE, max_size=200).map(bytes)
SEGMENTS = st.lists(
    st.sampled_from(WIRE)
    | NOISE
    | st.sampled_from(WIRE).map(lambda w: w[:60])
    | st.sampled_from(WIRE).map(lambda w: w[37:]),
    max_size=6,
).map(b"".join)


@settings(max_examples=150)
@given(PACKET_STRATEGY)
def test_packet_round_trip(packet: NoninPacket) -> None:
    wire = encode_packet(packet)
    assert len(wire) == 125
    assert decode_packet(wire) == packet
    assert NoninDecoder().feed(wire) == [packet]


@settings(max_examples=50)
@given(st.lists(PACKET_STRATEGY, min_size=1, max_size=4))
def test_back_to_back_round_trip_bytewise(packets: list[NoninPacket]) -> None:
    stream = b"".join(encode_packet(p) for p in packets)
    assert _feed_bytewise(NoninDecoder(), stream) == packets


@settings(max_examples=200)
@given(st.binary(max_size=400) | NOISE | SEGMENTS)
def test_garbage_never_raises_and_stream_recovers(garbage: bytes) -> None:
    decoder = NoninDecoder()
    decoder.feed(garbage)
    assert decoder.pending_bytes < nonin.FRAME_LEN
    assert decoder.pending_frames < nonin.FRAMES_PER_PACKET
    # Garbage may swallow the start of the first packet; the second always decodes.
    assert decoder.feed(NORMAL + NORMAL)[-1:] == [NORMAL_PKT]


@settings(max_examples=200)
@given(SEGMENTS | st.binary(max_size=300), st.lists(st.integers(1, 64), max_size=40))
def test_output_and_counters_do_not_depend_on_chunking(stream: bytes, sizes: list[int]) -> None:
    whole = NoninDecoder()
    expected = whole.feed(stream)
    chunked = NoninDecoder()
    got: list[NoninPacket] = []
    pos = 0
    for size in sizes:
        got += chunked.feed(stream[pos : pos + size])
        pos += size
    got += chunked.feed(stream[pos:])
    assert got == expected
    assert chunked.stats == whole.stats
    assert (chunked.pending_bytes, chunked.pending_frames) == (
        whole.pending_bytes,
        whole.pending_frames,
    )
    assert whole.stats.frames_ok * 5 + whole.stats.bytes_discarded + whole.pending_bytes == len(
        stream
    )


# --------------------------------------------------------------------------- serial source


async def test_serial_source_gives_up_a_port_of_line_noise_and_reads_a_real_one() -> None:
    """A port that brings 16 KiB with no complete packet is not a Nonin (or is all noise):
    read_samples raises, so the runner closes it and reopens it with backoff instead of
    decoding garbage for ever (issue 13). Real pyserial on a real pseudo-terminal."""
    import asyncio
    import os
    import random
    import tty

    from drivers.clock import ManualClock
    from drivers.errors import TransportError
    from drivers.transport.adapters import NOISE_LIMIT_BYTES, NoninSerialSource
    from drivers.transport.serial_link import SerialLink

    controller, device = os.openpty()
    tty.setraw(device)
    source = NoninSerialSource(SerialLink(os.ttyname(device), baudrate=9600), ManualClock(), "t")
    try:
        await source.open()
        os.write(controller, NORMAL * 2)
        async with asyncio.timeout(5):
            got = await source.read_samples()
        assert got and got[0].sample.spo2 is not None
        noise = random.Random(13).randbytes(NOISE_LIMIT_BYTES + 4096).replace(b"\x01", b"\x02")
        writer = asyncio.get_running_loop().run_in_executor(None, os.write, controller, noise)
        with pytest.raises(TransportError, match="no valid Nonin packet"):
            async with asyncio.timeout(10):
                while True:
                    await source.read_samples()
        await writer
    finally:
        await source.close()
        os.close(controller)
        os.close(device)


async def test_serial_source_wakes_once_per_packet_not_per_frame() -> None:
    """Frames arriving one by one (as a 9600-baud line delivers them) wake the reader when
    the packet can be complete, not 25 times (issue 13: 75 wake-ups a second per oximeter
    were the largest share of the loop's turns at 500 beds). No sample is late for it:
    the packet's last frame is the one that wakes the reader. Real pty."""
    import asyncio
    import os
    import tty

    from drivers.clock import ManualClock
    from drivers.transport.adapters import NoninSerialSource
    from drivers.transport.serial_link import SerialLink

    controller, device = os.openpty()
    tty.setraw(device)
    link = SerialLink(os.ttyname(device), baudrate=9600)
    wakes: list[int] = []
    read_at_least = link.read_at_least

    async def counted(n: int) -> bytes:
        data = await read_at_least(n)
        wakes.append(len(data))
        return data

    link.read_at_least = counted  # type: ignore[method-assign]
    source = NoninSerialSource(link, ManualClock(), "t")
    try:
        await source.open()
        # Start mid-packet (10 orphan frames), then three whole packets, a frame at a time.
        stream = NORMAL[15 * 5 :] + NORMAL * 3
        frames = [stream[i : i + 5] for i in range(0, len(stream), 5)]
        reader = asyncio.create_task(source.read_samples())
        got = []
        for n, frame in enumerate(frames, start=1):
            os.write(controller, frame)
            await asyncio.sleep(0.003)
            if n > 10 and (n - 10) % 25 == 0:  # the last frame of a whole packet
                async with asyncio.timeout(5):
                    got += await reader
                reader = asyncio.create_task(source.read_samples())
            else:
                assert not reader.done(), f"woke with no packet after frame {n}"
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        assert len(got) == 3
        assert all(r.sample.spo2 is not None for r in got)
        # 85 frames came; the reader woke about once per packet (orphans: one more).
        assert len(wakes) <= 5, wakes
    finally:
        await source.close()
        os.close(controller)
        os.close(device)


async def test_read_at_least_returns_what_is_left_when_the_port_fails() -> None:
    """A port that fails before n bytes came: the bytes that did come, then the error."""
    import asyncio
    import os
    import tty

    from drivers.errors import TransportError
    from drivers.transport.serial_link import SerialLink

    controller, device = os.openpty()
    tty.setraw(device)
    link = SerialLink(os.ttyname(device), baudrate=9600)
    try:
        await link.open()
        os.write(controller, b"\x01\x80\x00")
        pending = asyncio.create_task(link.read_at_least(125))
        await asyncio.sleep(0.05)
        assert not pending.done()
        os.close(controller)  # the other side goes away: EIO on the next read
        controller = -1
        async with asyncio.timeout(5):
            assert await pending == b"\x01\x80\x00"
            with pytest.raises(TransportError):
                await link.read_at_least(125)
    finally:
        await link.close()
        if controller >= 0:
            os.close(controller)
        os.close(device)


_STATUS_BITS = st.integers(min_value=0, max_value=0x7F).map(lambda b: (b | 0x80) & ~0x01)


@settings(max_examples=200, deadline=None)
@given(st.lists(_STATUS_BITS, min_size=25, max_size=25), st.booleans())
def test_a_decoded_packets_cached_status_summary_is_the_computed_one(
    statuses: list[int], whole: bool
) -> None:
    """The decoder takes a packet's statuses and their summary (flags OR-ed, worst
    perfusion) from a cache of status columns (issue 13); a packet built from the same
    statuses afresh computes them itself: both must agree, sample quality included."""
    raw = [statuses[0] | 0x01, *statuses[1:]]  # SYNC on the first frame only
    packet = dataclasses.replace(NORMAL_PKT, statuses=tuple(nonin.NoninStatus(b) for b in raw))
    wire = encode_packet(packet)
    decoder = NoninDecoder()
    if whole:
        decoded = decoder.feed(wire)
    else:
        decoded = [p for i in range(0, len(wire), 5) for p in decoder.feed(wire[i : i + 5])]
    assert len(decoded) == 1
    got = decoded[0]
    fresh = dataclasses.replace(got, statuses=tuple(got.statuses))  # not the cached tuple
    assert got == packet
    for attr in ("sensor_disconnected", "artifact", "out_of_track", "sensor_alarm", "perfusion"):
        assert getattr(got, attr) == getattr(fresh, attr), attr
    assert to_sample(got).quality == to_sample(fresh).quality


def test_the_status_column_cache_is_bounded_and_stays_right_when_cleared(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(nonin, "_COLUMNS_MAX", 4)
    monkeypatch.setattr(nonin, "_COLUMNS", {})
    monkeypatch.setattr(nonin, "_COLUMN_OF_TUPLE", {})
    decoder = NoninDecoder()
    for n in range(20):
        column = [0x81 | (n & 0x06)] + [0x80 | (n % 3) << 1] * 24
        packet = dataclasses.replace(
            NORMAL_PKT, statuses=tuple(nonin.NoninStatus(b) for b in column)
        )
        (got,) = decoder.feed(encode_packet(packet))
        assert got.perfusion == dataclasses.replace(got, statuses=tuple(got.statuses)).perfusion
        assert len(nonin._COLUMNS) <= 4 and len(nonin._COLUMN_OF_TUPLE) == len(nonin._COLUMNS)
