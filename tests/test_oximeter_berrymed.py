"""BerryMed BCI: golden packets fed three ways, resync counting, gating, round trips, garbage."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devicegw.errors import ProtocolError
from drivers.oximeter import berrymed
from drivers.oximeter.berrymed import (
    BerryMedDecoder,
    BerryMedPacket,
    BerryMedStats,
    decode_packet,
    encode_packet,
    to_sample,
)
from drivers.oximeter.sample import OximeterSample, QualityFlag

_DATA = tomllib.loads((Path(__file__).parent / "data" / "oximeter" / "berrymed.toml").read_text())


def _none(value: Any) -> Any:
    return None if value == "none" else value


def _packet(fields: dict[str, Any]) -> BerryMedPacket:
    return BerryMedPacket(**{k: _none(v) for k, v in fields.items()})


def _sample(spec: dict[str, Any], packet: BerryMedPacket) -> OximeterSample:
    spo2, pulse = _none(spec["spo2"]), _none(spec["pulse_bpm"])
    return OximeterSample(
        spo2=None if spo2 is None else float(spo2),
        pulse_bpm=None if pulse is None else float(pulse),
        quality=frozenset(QualityFlag(q) for q in spec["quality"]),
        signal_strength=packet.signal_strength,
        pleth=(packet.pleth,),
        source="berrymed-bci",
    )


RAW: list[dict[str, Any]] = _DATA["packet"]
WIRE: list[bytes] = [bytes.fromhex(v["hex"]) for v in RAW]
PACKETS: list[BerryMedPacket] = [_packet(v["fields"]) for v in RAW]
BY_NAME = {v["name"]: p for v, p in zip(RAW, PACKETS, strict=True)}
VECTORS = [pytest.param(w, p, v, id=v["name"]) for w, p, v in zip(WIRE, PACKETS, RAW, strict=True)]
STREAMS = [pytest.param(s, id=s["name"]) for s in _DATA["stream"]]
ALL = b"".join(WIRE)


def _feed_bytewise(decoder: BerryMedDecoder, data: bytes) -> list[BerryMedPacket]:
    out: list[BerryMedPacket] = []
    for i in range(len(data)):
        out += decoder.feed(data[i : i + 1])
    return out


# --------------------------------------------------------------------------- golden packets


@pytest.mark.parametrize(("wire", "packet", "vector"), VECTORS)
def test_packet_decodes(wire: bytes, packet: BerryMedPacket, vector: dict[str, Any]) -> None:
    assert decode_packet(wire) == packet


@pytest.mark.parametrize(("wire", "packet", "vector"), VECTORS)
def test_packet_encodes(wire: bytes, packet: BerryMedPacket, vector: dict[str, Any]) -> None:
    assert encode_packet(packet) == wire


@pytest.mark.parametrize(("wire", "packet", "vector"), VECTORS)
def test_packet_sample(wire: bytes, packet: BerryMedPacket, vector: dict[str, Any]) -> None:
    sample = to_sample(packet)
    assert sample == _sample(vector["sample"], packet)
    assert sample.valid is vector["sample"]["valid"]


@pytest.mark.parametrize(("wire", "packet", "vector"), VECTORS)
def test_vector_fed_whole(wire: bytes, packet: BerryMedPacket, vector: dict[str, Any]) -> None:
    decoder = BerryMedDecoder()
    assert decoder.feed(wire) == [packet]
    assert decoder.stats == BerryMedStats(packets_ok=1)
    assert decoder.pending_bytes == 0


@pytest.mark.parametrize(("wire", "packet", "vector"), VECTORS)
def test_vector_fed_one_byte_at_a_time(
    wire: bytes, packet: BerryMedPacket, vector: dict[str, Any]
) -> None:
    decoder = BerryMedDecoder()
    for i in range(len(wire) - 1):
        assert decoder.feed(wire[i : i + 1]) == []
    assert decoder.feed(wire[-1:]) == [packet]
    assert decoder.stats == BerryMedStats(packets_ok=1)


@pytest.mark.parametrize(("wire", "packet", "vector"), VECTORS)
def test_vector_split_at_every_offset(
    wire: bytes, packet: BerryMedPacket, vector: dict[str, Any]
) -> None:
    for cut in range(len(wire) + 1):
        decoder = BerryMedDecoder()
        assert decoder.feed(wire[:cut]) + decoder.feed(wire[cut:]) == [packet], cut


def test_all_vectors_back_to_back() -> None:
    decoder = BerryMedDecoder()
    assert decoder.feed(ALL) == PACKETS
    assert decoder.stats == BerryMedStats(packets_ok=len(PACKETS))


def test_all_vectors_back_to_back_one_byte_at_a_time() -> None:
    decoder = BerryMedDecoder()
    assert _feed_bytewise(decoder, ALL) == PACKETS
    assert decoder.stats == BerryMedStats(packets_ok=len(PACKETS))


def test_all_vectors_split_at_every_offset() -> None:
    for cut in range(len(ALL) + 1):
        decoder = BerryMedDecoder()
        assert decoder.feed(ALL[:cut]) + decoder.feed(ALL[cut:]) == PACKETS, cut


def test_notifications_of_arbitrary_sizes() -> None:
    """BLE notifications rarely align with packets: 20-byte chunks, 3-byte chunks."""
    for size in (1, 3, 7, 20, 244):
        decoder = BerryMedDecoder()
        got: list[BerryMedPacket] = []
        for i in range(0, len(ALL), size):
            got += decoder.feed(ALL[i : i + size])
        assert got == PACKETS, size


@pytest.mark.parametrize("raw", [v["hex"] for v in _DATA["malformed"]])
def test_malformed_single_packet_raises(raw: str) -> None:
    with pytest.raises(ProtocolError):
        decode_packet(bytes.fromhex(raw))


# --------------------------------------------------------------------------- streams


def _check_stream(
    decoder: BerryMedDecoder, got: list[BerryMedPacket], spec: dict[str, Any]
) -> None:
    assert got == [BY_NAME[n] for n in spec["packets"]]
    assert decoder.stats == BerryMedStats(
        packets_ok=len(spec["packets"]),
        resyncs=spec["resyncs"],
        bytes_discarded=spec["bytes_discarded"],
    )
    assert decoder.pending_bytes == spec["pending"]


@pytest.mark.parametrize("spec", STREAMS)
def test_stream_fed_whole(spec: dict[str, Any]) -> None:
    decoder = BerryMedDecoder()
    _check_stream(decoder, decoder.feed(bytes.fromhex(spec["hex"])), spec)


@pytest.mark.parametrize("spec", STREAMS)
def test_stream_fed_one_byte_at_a_time(spec: dict[str, Any]) -> None:
    decoder = BerryMedDecoder()
    _check_stream(decoder, _feed_bytewise(decoder, bytes.fromhex(spec["hex"])), spec)


@pytest.mark.parametrize("spec", STREAMS)
def test_stream_split_at_every_offset(spec: dict[str, Any]) -> None:
    stream = bytes.fromhex(spec["hex"])
    for cut in range(len(stream) + 1):
        decoder = BerryMedDecoder()
        _check_stream(decoder, decoder.feed(stream[:cut]) + decoder.feed(stream[cut:]), spec)


def test_streams_back_to_back() -> None:
    decoder = BerryMedDecoder()
    got: list[BerryMedPacket] = []
    expected: list[BerryMedPacket] = []
    for spec in _DATA["stream"]:
        got += decoder.feed(bytes.fromhex(spec["hex"]))
        expected += [BY_NAME[n] for n in spec["packets"]]
    # Each stream's leading junk joins the previous stream's pending byte, if any.
    assert got == expected
    assert decoder.stats.packets_ok == len(expected)


def test_reset_drops_partial_packet() -> None:
    decoder = BerryMedDecoder()
    decoder.feed(WIRE[0][:3])
    decoder.reset()
    assert decoder.pending_bytes == 0
    assert decoder.stats.bytes_discarded == 3
    assert decoder.feed(WIRE[0][3:] + WIRE[1]) == [PACKETS[1]]
    assert decoder.stats.resyncs == 1  # the orphaned tail after the reset


def test_feed_accepts_bytearray_memoryview_and_empty() -> None:
    decoder = BerryMedDecoder()
    assert decoder.feed(b"") == []
    assert decoder.feed(bytearray(WIRE[0])) == [PACKETS[0]]
    assert decoder.feed(memoryview(WIRE[1])) == [PACKETS[1]]


def test_uuids() -> None:
    assert berrymed.BERRYMED_SERVICE_UUID == "49535343-fe7d-4ae5-8fa9-9fafd205e455"
    assert berrymed.BERRYMED_NOTIFY_CHAR_UUID == "49535343-1e4d-4bd9-ba61-23c647249616"


# --------------------------------------------------------------------------- encoder checks


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("signal_strength", 16),
        ("bargraph", -1),
        ("pleth", 128),
        ("pulse_rate", 255),  # the invalid code must be spelled None
        ("pulse_rate", 256),
        ("spo2", 127),
        ("spo2", -1),
    ],
)
def test_encoder_refuses_out_of_range(field: str, value: int) -> None:
    changes: dict[str, Any] = {field: value}
    with pytest.raises(ProtocolError, match=field):
        encode_packet(dataclasses.replace(PACKETS[0], **changes))


def test_no_signal_is_byte_0_bit_4() -> None:
    """Vendor BCI v1.2 "byte 1 bit 4" in its 1-based numbering: 1 means NO signal."""
    base = decode_packet(bytes.fromhex("86 2d 04 48 62"))
    flagged = decode_packet(bytes.fromhex("96 2d 04 48 62"))
    assert not base.no_signal
    assert flagged.no_signal
    assert flagged == dataclasses.replace(base, no_signal=True)
    assert QualityFlag.NO_SIGNAL in to_sample(flagged).gating


def test_pleth_bit_4_is_not_a_flag() -> None:
    packet = decode_packet(bytes.fromhex("86 10 04 48 62"))
    assert packet.pleth == 16
    assert not (packet.no_signal or packet.no_finger or packet.searching)


# --------------------------------------------------------------------------- properties

PACKET_STRATEGY = st.builds(
    BerryMedPacket,
    signal_strength=st.integers(0, 15),
    no_signal=st.booleans(),
    probe_unplugged=st.booleans(),
    pulse_beep=st.booleans(),
    pleth=st.integers(0, 127),
    bargraph=st.integers(0, 15),
    no_finger=st.booleans(),
    searching=st.booleans(),
    pulse_rate=st.none() | st.integers(0, 254),
    spo2=st.none() | st.integers(0, 126),
)
_WIRE_BYTE = st.sampled_from([0x80, 0xFF, 0x7F, 0x00]) | st.integers(0, 255)
NOISE = st.lists(_WIRE_BYTE, max_size=200).map(bytes)
SEGMENTS = st.lists(
    PACKET_STRATEGY.map(encode_packet) | NOISE | st.sampled_from(WIRE), max_size=12
).map(b"".join)


@settings(max_examples=200)
@given(PACKET_STRATEGY)
def test_packet_round_trip(packet: BerryMedPacket) -> None:
    wire = encode_packet(packet)
    assert wire[0] & 0x80 and not any(b & 0x80 for b in wire[1:])
    assert decode_packet(wire) == packet
    sample = to_sample(packet)
    assert sample.valid is (
        packet.spo2 is not None
        and packet.spo2 <= 100
        and packet.pulse_rate is not None
        and not (packet.no_signal or packet.probe_unplugged or packet.no_finger or packet.searching)
    )


@settings(max_examples=100)
@given(st.lists(PACKET_STRATEGY, min_size=1, max_size=10))
def test_back_to_back_round_trip_bytewise(packets: list[BerryMedPacket]) -> None:
    stream = b"".join(encode_packet(p) for p in packets)
    assert _feed_bytewise(BerryMedDecoder(), stream) == packets


@settings(max_examples=200)
@given(st.binary(max_size=400) | NOISE | SEGMENTS, PACKET_STRATEGY)
def test_garbage_never_raises_and_next_packet_is_recovered(
    garbage: bytes, packet: BerryMedPacket
) -> None:
    decoder = BerryMedDecoder()
    decoder.feed(garbage)
    assert decoder.pending_bytes < berrymed.PACKET_LEN
    assert decoder.feed(encode_packet(packet))[-1:] == [packet]


@settings(max_examples=200)
@given(SEGMENTS, st.lists(st.integers(1, 40), max_size=40))
def test_output_and_counters_do_not_depend_on_chunking(stream: bytes, sizes: list[int]) -> None:
    whole = BerryMedDecoder()
    expected = whole.feed(stream)
    chunked = BerryMedDecoder()
    got: list[BerryMedPacket] = []
    pos = 0
    for size in sizes:
        got += chunked.feed(stream[pos : pos + size])
        pos += size
    got += chunked.feed(stream[pos:])
    assert got == expected
    assert chunked.stats == whole.stats
    assert chunked.pending_bytes == whole.pending_bytes
    # Every byte is in a packet, discarded, or pending.
    assert (
        whole.stats.packets_ok * berrymed.PACKET_LEN
        + whole.stats.bytes_discarded
        + whole.pending_bytes
        == len(stream)
    )
