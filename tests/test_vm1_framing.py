"""VM-1 serial framing and the stream decoder: golden frames fed three ways, noise, counters."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devicegw.errors import ProtocolError
from drivers.vm1 import messages as m
from drivers.vm1.crc import crc16_ccitt_false
from drivers.vm1.framing import MAX_ESCAPED, Deframer, DeframerStats, encode_frame
from drivers.vm1.stream import StreamStats, Vm1StreamDecoder, encode_message_frame
from tests.vm1_vectors import RAW_VECTORS, build_message

_RAW = RAW_VECTORS
FRAMES: list[bytes] = [bytes.fromhex(v["frame"]) for v in _RAW]
MESSAGES: list[m.Message] = [build_message(v) for v in _RAW]
VECTORS = [
    pytest.param(f, msg, id=v["name"]) for f, msg, v in zip(FRAMES, MESSAGES, _RAW, strict=True)
]
ALL_FRAMES = b"".join(FRAMES)

BAD_COUNTERS = ("crc_errors", "short_frames", "oversize_frames", "bad_escapes")


def _frame_raw(content: bytes) -> bytes:
    """Frame arbitrary content (payload + CRC or not) with no length checks, for bad input."""
    escaped = content.replace(b"\x7d", b"\x7d\x5d").replace(b"\x7e", b"\x7d\x5e")
    return b"\x7e" + escaped + b"\x7e"


def _with_crc(payload: bytes) -> bytes:
    return payload + crc16_ccitt_false(payload).to_bytes(2, "little")


def _feed_bytewise(decoder: Vm1StreamDecoder | Deframer, data: bytes) -> list[Any]:
    out: list[Any] = []
    for i in range(len(data)):
        out.extend(decoder.feed(data[i : i + 1]))
    return out


def _counters(stats: DeframerStats) -> dict[str, int]:
    return dataclasses.asdict(stats)


# --------------------------------------------------------------------------- golden frames


@pytest.mark.parametrize(("frame", "expected"), VECTORS)
def test_vector_fed_whole(frame: bytes, expected: m.Message) -> None:
    decoder = Vm1StreamDecoder()
    assert decoder.feed(frame) == [expected]
    assert decoder.stats == StreamStats(frames_ok=1, messages=1)


@pytest.mark.parametrize(("frame", "expected"), VECTORS)
def test_vector_fed_one_byte_at_a_time(frame: bytes, expected: m.Message) -> None:
    decoder = Vm1StreamDecoder()
    for i in range(len(frame) - 1):
        assert decoder.feed(frame[i : i + 1]) == []  # nothing before the closing flag
    assert decoder.feed(frame[-1:]) == [expected]
    assert decoder.stats == StreamStats(frames_ok=1, messages=1)


@pytest.mark.parametrize(("frame", "expected"), VECTORS)
def test_vector_split_at_every_offset(frame: bytes, expected: m.Message) -> None:
    for cut in range(len(frame) + 1):
        decoder = Vm1StreamDecoder()
        assert decoder.feed(frame[:cut]) + decoder.feed(frame[cut:]) == [expected], cut
        assert decoder.stats.frames_bad == 0


@pytest.mark.parametrize(("frame", "expected"), VECTORS)
def test_vector_payload_matches_encode_frame(frame: bytes, expected: m.Message) -> None:
    [payload] = Deframer().feed(frame)
    assert encode_frame(payload) == frame
    assert encode_message_frame(expected) == frame


def test_all_vectors_back_to_back() -> None:
    decoder = Vm1StreamDecoder()
    assert decoder.feed(ALL_FRAMES) == MESSAGES
    assert decoder.stats.frames_ok == len(FRAMES)
    assert decoder.stats.frames_bad == decoder.stats.bytes_discarded == 0


def test_all_vectors_back_to_back_one_byte_at_a_time() -> None:
    decoder = Vm1StreamDecoder()
    assert _feed_bytewise(decoder, ALL_FRAMES) == MESSAGES
    whole = Vm1StreamDecoder()
    whole.feed(ALL_FRAMES)
    assert decoder.stats == whole.stats


def test_all_vectors_sharing_flags() -> None:
    # HDLC senders may let one flag close a frame and open the next.
    shared = b"\x7e" + b"\x7e".join(f[1:-1] for f in FRAMES) + b"\x7e"
    assert Vm1StreamDecoder().feed(shared) == MESSAGES


def test_all_vectors_split_at_every_offset() -> None:
    for cut in range(len(ALL_FRAMES) + 1):
        decoder = Vm1StreamDecoder()
        assert decoder.feed(ALL_FRAMES[:cut]) + decoder.feed(ALL_FRAMES[cut:]) == MESSAGES


GARBAGE = [
    b"\x00\x01\x02\xff",  # noise without flags
    b"\x7d",  # lone escape
    b"\x7e\x7e\x7e",  # idle flags
    b"\x55" * 300,  # long run: oversize if inside a frame
    b"\x7d\x7e",  # abort
    b"\x7e\x01\x02\x7e",  # short frame
    bytes.fromhex("7e 02 01 d0 07 00 00 01 b8 0b ff 0a 00 00 15 0c 7e"),  # bad CRC
    b"\x7e\x07\x7d\x41\x00\x00\x00\x00\x00\x00\x00\x7e",  # bad escape
]


@pytest.mark.parametrize("garbage", GARBAGE, ids=lambda g: g[:8].hex())
def test_all_vectors_with_garbage_before_and_between(garbage: bytes) -> None:
    stream = garbage + garbage.join(FRAMES) + garbage
    decoder = Vm1StreamDecoder()
    assert decoder.feed(stream) == MESSAGES
    bytewise = Vm1StreamDecoder()
    assert _feed_bytewise(bytewise, stream) == MESSAGES
    assert bytewise.stats == decoder.stats


@pytest.mark.parametrize(("frame", "expected"), VECTORS)
def test_starting_mid_frame_loses_only_that_frame(frame: bytes, expected: m.Message) -> None:
    # The device starts sending as soon as the port opens: the host may join anywhere.
    for start in range(1, len(frame)):
        decoder = Vm1StreamDecoder()
        assert decoder.feed(frame[start:] + ALL_FRAMES) == MESSAGES, start
        assert decoder.stats.frames_bad == 0


@pytest.mark.parametrize(("frame", "expected"), VECTORS)
def test_truncated_frame_is_counted_and_next_frame_recovered(
    frame: bytes, expected: m.Message
) -> None:
    [payload] = Deframer().feed(frame)
    for cut in range(1, len(frame) - 1):
        deframer = Deframer()
        assert deframer.feed(frame[:cut] + frame) == [payload], cut
        rejected = deframer.stats.frames_bad
        assert rejected == (1 if cut >= 2 else 0), cut  # frame[:1] is only a flag


# --------------------------------------------------------------------------- counters


def test_bytes_before_first_flag_are_discarded_silently() -> None:
    deframer = Deframer()
    assert deframer.feed(b"\x01\x02\x03") == []
    assert deframer.feed(b"\x04" + FRAMES[1]) == [Deframer().feed(FRAMES[1])[0]]
    assert deframer.stats == DeframerStats(frames_ok=1, bytes_discarded=4)


def test_empty_frames_are_ignored_and_not_counted() -> None:
    deframer = Deframer()
    assert deframer.feed(b"\x7e" * 50) == []
    assert deframer.stats == DeframerStats()


def test_short_frame() -> None:
    deframer = Deframer()
    assert deframer.feed(b"\x7e\x01\x02\x03\x7e") == []
    assert deframer.stats == DeframerStats(short_frames=1, bytes_discarded=3)


def test_seven_byte_frame_with_good_crc_is_short_not_accepted() -> None:
    deframer = Deframer()
    assert deframer.feed(_frame_raw(_with_crc(b"\x85\x00\x00\x00\x00"))) == []
    assert deframer.stats.short_frames == 1
    assert deframer.stats.crc_errors == 0


def test_eight_byte_frame_is_the_minimum_accepted() -> None:
    payload = b"\x85\x00\x00\x00\x00\x00"
    assert Deframer().feed(_frame_raw(_with_crc(payload))) == [payload]


def test_bad_crc() -> None:
    frame = bytearray(FRAMES[1])
    frame[-2] ^= 0x01
    deframer = Deframer()
    assert deframer.feed(bytes(frame) + FRAMES[2]) == Deframer().feed(FRAMES[2])
    assert deframer.stats == DeframerStats(
        frames_ok=1, crc_errors=1, bytes_discarded=len(frame) - 2
    )


def test_largest_frame_accepted_and_payload_rejected_by_codec() -> None:
    payload = b"\x01" + bytes(63)  # 64 bytes: legal frame, no such IDENT length
    frame = encode_frame(payload)
    assert Deframer().feed(frame) == [payload]
    decoder = Vm1StreamDecoder()
    assert decoder.feed(frame) == []
    assert (decoder.stats.frames_ok, decoder.stats.bad_payloads) == (1, 1)
    assert isinstance(decoder.last_error, ProtocolError)
    assert "IDENT payload is 64 bytes" in str(decoder.last_error)


def test_oversize_frame_with_good_crc() -> None:
    deframer = Deframer()
    big = _frame_raw(_with_crc(b"\x01" + bytes(64)))  # 65-byte payload, 67 unescaped
    assert deframer.feed(big + FRAMES[0]) == Deframer().feed(FRAMES[0])
    assert deframer.stats.oversize_frames == 1
    assert deframer.stats.crc_errors == 0


def test_escapes_do_not_count_towards_the_size_limit() -> None:
    payload = b"\x7e" * 32 + b"\x7d" * 32  # 64 bytes, 128+ on the wire
    frame = encode_frame(payload)
    assert len(frame) > 2 + 66
    assert Deframer().feed(frame) == [payload]


def test_long_run_is_capped_and_resynchronises() -> None:
    deframer = Deframer()
    noise = b"\x7e" + bytes(range(1, 126)) * 40  # 5,000 bytes with no flag
    for i in range(len(noise)):
        deframer.feed(noise[i : i + 1])
        assert deframer.pending_bytes <= MAX_ESCAPED
    assert deframer.feed(FRAMES[3]) == Deframer().feed(FRAMES[3])
    assert deframer.stats.oversize_frames == 1
    assert deframer.stats.bytes_discarded == len(noise) - 1
    assert deframer.stats.frames_ok == 1


def test_long_run_in_one_chunk_is_counted_once() -> None:
    deframer = Deframer()
    assert deframer.feed(b"\x7e" + b"\x01" * 10_000 + FRAMES[3]) == Deframer().feed(FRAMES[3])
    assert deframer.stats.oversize_frames == 1
    assert deframer.stats.bytes_discarded == 10_000


@pytest.mark.parametrize(
    "content",
    [
        b"\x07\x7d\x41" + bytes(8),  # escape + byte other than 5E/5D
        b"\x07\x7d\x7d\x5e" + bytes(8),  # escape + escape
        b"\x07\x7d\x00" + bytes(8),
        b"\x07" + bytes(8) + b"\x7d",  # escape + flag: abort
    ],
    ids=["esc-41", "esc-esc", "esc-00", "abort"],
)
def test_bad_escape_discards_frame_and_next_frame_survives(content: bytes) -> None:
    deframer = Deframer()
    stream = b"\x7e" + content + FRAMES[5]  # the next frame's flag closes the bad one
    assert deframer.feed(stream) == Deframer().feed(FRAMES[5])
    assert deframer.stats.bad_escapes == 1
    assert deframer.stats.frames_ok == 1
    assert deframer.stats.bytes_discarded == len(content)


@pytest.mark.parametrize(
    ("garbage", "counter"),
    [
        (GARBAGE[0], "short_frames"),
        (GARBAGE[1], "bad_escapes"),
        (GARBAGE[2], None),
        (GARBAGE[3], "oversize_frames"),
        (GARBAGE[4], "bad_escapes"),
        (GARBAGE[5], "short_frames"),
        (GARBAGE[6], "crc_errors"),
        (GARBAGE[7], "bad_escapes"),
    ],
    ids=lambda v: v[:8].hex() if isinstance(v, bytes) else str(v),
)
def test_garbage_between_frames_lands_in_one_counter(garbage: bytes, counter: str | None) -> None:
    deframer = Deframer()
    assert len(deframer.feed(FRAMES[0] + garbage + FRAMES[1])) == 2
    stats = deframer.stats
    expected = {c: int(c == counter) for c in BAD_COUNTERS}
    assert {c: getattr(stats, c) for c in BAD_COUNTERS} == expected
    assert stats.bytes_discarded == len(garbage.replace(b"\x7e", b""))


def test_reset_drops_partial_frame_and_waits_for_flag() -> None:
    deframer = Deframer()
    deframer.feed(FRAMES[0][:10])
    assert deframer.pending_bytes == 9
    deframer.reset()
    assert deframer.pending_bytes == 0
    assert deframer.stats.bytes_discarded == 9
    assert deframer.feed(FRAMES[0][10:]) == []  # tail before the first flag: discarded
    assert deframer.feed(FRAMES[1]) == Deframer().feed(FRAMES[1])


def test_feed_accepts_empty_bytearray_and_memoryview() -> None:
    deframer = Deframer()
    assert deframer.feed(b"") == []
    assert deframer.feed(bytearray(FRAMES[1])) == Deframer().feed(FRAMES[1])
    assert deframer.feed(memoryview(FRAMES[1])) == Deframer().feed(FRAMES[1])


def test_shared_stats_object() -> None:
    stats = StreamStats()
    Deframer(stats).feed(FRAMES[0])
    assert stats.frames_ok == 1


# --------------------------------------------------------------------------- encode_frame


@pytest.mark.parametrize("n", [0, 1, 5, 65, 100])
def test_encode_frame_rejects_bad_payload_length(n: int) -> None:
    with pytest.raises(ProtocolError):
        encode_frame(bytes(n))


def test_encode_frame_escapes_flag_and_escape_bytes() -> None:
    payload = b"\x85\x7e\x7d\x00\x00\x00"  # CRC 0x30EC, sent EC 30
    frame = encode_frame(payload)
    assert frame == bytes.fromhex("7e 85 7d5e 7d5d 00 00 00 ec 30 7e")
    assert Deframer().feed(frame) == [payload]


@pytest.mark.parametrize(
    ("seq", "wire_crc"),
    [(43, "7a 7d5d"), (166, "d0 7d5e"), (172, "7d5e 38"), (218, "7d5d e8")],
)
def test_encode_frame_escapes_the_crc_too(seq: int, wire_crc: str) -> None:
    payload = bytes((0x85, seq, 0, 0, 0, 0))
    frame = encode_frame(payload)
    assert frame == bytes.fromhex(f"7e 85 {seq:02x} 00 00 00 00 {wire_crc} 7e")
    assert Deframer().feed(frame) == [payload]


def test_encode_message_frame_rejects_bad_message() -> None:
    with pytest.raises(ProtocolError, match="seq"):
        encode_message_frame(m.Ping(seq=300))


# --------------------------------------------------------------------------- sequence numbers


def _device_frame(seq: int) -> bytes:
    return encode_message_frame(m.Output(rate_ul_min=0, cum_ul=0, seq=seq, dev_ms=seq))


def _host_frame(seq: int) -> bytes:
    return encode_message_frame(m.Ping(seq=seq))


@pytest.mark.parametrize(
    ("seqs", "gaps", "lost", "repeats"),
    [
        ([0, 1, 2, 3], 0, 0, 0),
        ([0, 2], 1, 1, 0),
        ([0, 1, 5, 6, 9], 2, 5, 0),
        ([253, 254, 255, 0, 1], 0, 0, 0),  # wrap 255 -> 0 is no gap
        ([254, 1], 1, 2, 0),  # 255 and 0 lost across the wrap
        ([250, 3], 1, 8, 0),
        ([5, 5, 6], 0, 0, 1),  # a resend, not 255 lost frames
        ([10, 9], 1, 254, 0),  # serial never reorders: going back means loss
        ([0x7C, 0x7D, 0x7E, 0x7F], 0, 0, 0),  # escaped seq values
    ],
)
def test_seq_gap_counting(seqs: list[int], gaps: int, lost: int, repeats: int) -> None:
    decoder = Vm1StreamDecoder()
    msgs = decoder.feed(b"".join(_device_frame(s) for s in seqs))
    assert [x.seq for x in msgs] == seqs
    stats = decoder.stats
    assert (stats.seq_gaps, stats.frames_lost, stats.seq_repeats) == (gaps, lost, repeats)


def test_seq_counted_per_sender() -> None:
    decoder = Vm1StreamDecoder()
    stream = _device_frame(0) + _host_frame(100) + _device_frame(1) + _host_frame(101)
    assert len(decoder.feed(stream)) == 4
    assert decoder.stats.seq_gaps == 0
    decoder.feed(_host_frame(103))
    assert (decoder.stats.seq_gaps, decoder.stats.frames_lost) == (1, 1)


def test_lost_frame_on_the_wire_shows_as_gap() -> None:
    decoder = Vm1StreamDecoder()
    corrupt = bytearray(_device_frame(1))
    corrupt[3] ^= 0x10
    decoder.feed(_device_frame(0) + bytes(corrupt) + _device_frame(2))
    stats = decoder.stats
    assert (stats.crc_errors, stats.seq_gaps, stats.frames_lost) == (1, 1, 1)


def test_bad_payload_advances_seq_and_is_not_a_lost_frame() -> None:
    unknown_type = encode_frame(b"\x09\x01" + bytes(8))
    decoder = Vm1StreamDecoder()
    msgs = decoder.feed(_device_frame(0) + unknown_type + _device_frame(2))
    assert [x.seq for x in msgs] == [0, 2]
    stats = decoder.stats
    assert (stats.bad_payloads, stats.seq_gaps, stats.frames_lost) == (1, 0, 0)
    assert "unknown message type 0x09" in str(decoder.last_error)


def test_reset_seq_forgets_history() -> None:
    decoder = Vm1StreamDecoder()
    decoder.feed(_device_frame(7))
    decoder.reset_seq()
    decoder.feed(_device_frame(200))
    assert decoder.stats.seq_gaps == 0


def test_icd_vector_stream_seq_statistics() -> None:
    decoder = Vm1StreamDecoder()
    decoder.feed(ALL_FRAMES)
    # device seqs 0 1 2 3 126 9 10 11: 4..125 and 127..8 missing; host seqs 0 1.
    assert (decoder.stats.seq_gaps, decoder.stats.frames_lost) == (2, 122 + 138)


# --------------------------------------------------------------------------- properties

_WIRE_BYTE = st.sampled_from([0x7E, 0x7D, 0x5E, 0x5D]) | st.integers(0, 255)
PAYLOADS = st.lists(_WIRE_BYTE, min_size=6, max_size=64).map(bytes)
NOISE = st.lists(_WIRE_BYTE, max_size=200).map(bytes)
# A stream mixing good frames, raw noise and framed garbage of any length.
SEGMENTS = st.lists(
    PAYLOADS.map(encode_frame)
    | NOISE
    | st.binary(max_size=90).map(_frame_raw)
    | st.sampled_from(FRAMES),
    max_size=12,
).map(b"".join)


@given(PAYLOADS)
def test_frame_round_trip(payload: bytes) -> None:
    frame = encode_frame(payload)
    assert 0x7E not in frame[1:-1]
    deframer = Deframer()
    assert deframer.feed(frame) == [payload]
    assert deframer.stats == DeframerStats(frames_ok=1)


@given(st.lists(PAYLOADS, min_size=1, max_size=8))
def test_back_to_back_round_trip_bytewise(payloads: list[bytes]) -> None:
    stream = b"".join(encode_frame(p) for p in payloads)
    assert _feed_bytewise(Deframer(), stream) == payloads


@settings(max_examples=200)
@given(SEGMENTS, st.lists(st.integers(1, 64), max_size=40))
def test_output_and_counters_do_not_depend_on_chunking(stream: bytes, sizes: list[int]) -> None:
    whole = Vm1StreamDecoder()
    expected = whole.feed(stream)
    chunked = Vm1StreamDecoder()
    got: list[m.Message] = []
    pos = 0
    for size in sizes:
        got += chunked.feed(stream[pos : pos + size])
        pos += size
    got += chunked.feed(stream[pos:])
    assert got == expected
    assert chunked.stats == whole.stats
    assert chunked._deframer.pending_bytes == whole._deframer.pending_bytes


@settings(max_examples=200)
@given(st.binary(max_size=400) | NOISE | SEGMENTS, PAYLOADS)
def test_garbage_never_raises_and_next_frame_is_recovered(garbage: bytes, payload: bytes) -> None:
    deframer = Deframer()
    deframer.feed(garbage)
    assert deframer.pending_bytes <= MAX_ESCAPED
    assert deframer.feed(encode_frame(payload))[-1:] == [payload]


@settings(max_examples=200)
@given(st.binary(max_size=400) | NOISE | SEGMENTS)
def test_stream_decoder_never_raises(garbage: bytes) -> None:
    decoder = Vm1StreamDecoder()
    decoder.feed(garbage)
    _feed_bytewise(decoder, garbage)
    assert decoder.feed(FRAMES[0])[-1:] == MESSAGES[:1]


@settings(max_examples=200)
@given(PAYLOADS)
def test_random_valid_frames_decode_or_count_bad_payload(payload: bytes) -> None:
    decoder = Vm1StreamDecoder()
    msgs = decoder.feed(encode_frame(payload))
    assert decoder.stats.frames_ok == 1
    assert len(msgs) + decoder.stats.bad_payloads == 1


@settings(max_examples=200)
@given(st.lists(st.sampled_from(range(len(FRAMES))), min_size=1, max_size=6), st.data())
def test_content_bit_flip_loses_exactly_that_frame(idx: list[int], data: st.DataObject) -> None:
    frames = [FRAMES[i] for i in idx]
    hit = data.draw(st.integers(0, len(frames) - 1))
    frame = bytearray(frames[hit])
    # Flip a bit of a byte that is neither a flag nor an escape and does not become
    # one: the frame keeps its shape, so the CRC (or escape check) must catch it.
    positions = [
        (pos, bit)
        for pos in range(1, len(frame) - 1)
        for bit in range(8)
        if frame[pos] not in (0x7D, 0x7E) and frame[pos] ^ (1 << bit) not in (0x7D, 0x7E)
    ]
    pos, bit = data.draw(st.sampled_from(positions))
    frame[pos] ^= 1 << bit
    frames[hit] = bytes(frame)
    decoder = Vm1StreamDecoder()
    msgs = decoder.feed(b"".join(frames))
    assert msgs == [MESSAGES[i] for n, i in enumerate(idx) if n != hit]
    assert decoder.stats.crc_errors + decoder.stats.bad_escapes == 1
    assert decoder.stats.frames_bad == 1


@settings(max_examples=200)
@given(st.lists(st.sampled_from(FRAMES), min_size=1, max_size=6), st.data())
def test_any_bit_flip_never_raises_and_stream_recovers(
    frames: list[bytes], data: st.DataObject
) -> None:
    stream = bytearray(b"".join(frames))
    bit = data.draw(st.integers(0, len(stream) * 8 - 1))
    stream[bit // 8] ^= 1 << (bit % 8)
    decoder = Vm1StreamDecoder()
    msgs = decoder.feed(bytes(stream))
    assert len(msgs) >= len(frames) - 2
    assert (
        decoder.stats.bytes_discarded > 0
        or decoder._deframer.pending_bytes > 0
        or decoder.stats.bad_payloads > 0
        or len(msgs) < len(frames)
    )
    assert decoder.feed(FRAMES[2]) == MESSAGES[2:3]


@settings(max_examples=100)
@given(st.lists(st.sampled_from(FRAMES), min_size=1, max_size=4), st.data())
def test_truncated_frames_never_raise(frames: list[bytes], data: st.DataObject) -> None:
    decoder = Vm1StreamDecoder()
    for frame in frames:
        decoder.feed(frame[: data.draw(st.integers(0, len(frame)))])
    assert decoder.feed(FRAMES[1])[-1:] == MESSAGES[1:2]


def _rejected(stats: DeframerStats) -> int:
    return stats.crc_errors + stats.short_frames + stats.oversize_frames + stats.bad_escapes


# Whole frames as a VM-1's reads and recorded RX chunks bring them: good ones, framed garbage
# of any length (short, oversize, bad CRC) and raw content whose escapes may be illegal.
WHOLE_FRAMES = (
    PAYLOADS.map(encode_frame)
    | st.binary(max_size=150).map(_frame_raw)
    | st.binary(max_size=150).map(lambda b: b"\x7e" + b.replace(b"\x7e", b"") + b"\x7e")
    | st.sampled_from(FRAMES)
)


@settings(max_examples=300)
@given(st.lists(WHOLE_FRAMES, min_size=1, max_size=10))
def test_one_whole_frame_per_chunk_is_judged_as_byte_by_byte(frames: list[bytes]) -> None:
    """A chunk that is one whole frame takes the deframer's shortcut (no split, the common
    checks inline); fed byte by byte, the same frames never do. Same messages, counters."""
    whole = Vm1StreamDecoder()
    got = whole.feed(b"\x7e")  # synced, as after the first frame
    for frame in frames:
        got += whole.feed(frame)
    bytewise = Vm1StreamDecoder()
    assert got == _feed_bytewise(bytewise, b"\x7e" + b"".join(frames))
    assert whole.stats == bytewise.stats
    assert whole.stats.frames_bad == bytewise.stats.frames_bad == _rejected(whole.stats)


@settings(max_examples=200)
@given(SEGMENTS, st.lists(st.integers(1, 64), max_size=40))
def test_frames_bad_is_every_rejected_frame(stream: bytes, sizes: list[int]) -> None:
    """frames_bad is kept as a count (not summed on demand): always the four counters' sum."""
    decoder = Vm1StreamDecoder()
    pos = 0
    for size in sizes:
        decoder.feed(stream[pos : pos + size])
        pos += size
        assert decoder.stats.frames_bad == _rejected(decoder.stats)
    decoder.feed(stream[pos:])
    assert decoder.stats.frames_bad == _rejected(decoder.stats)
    assert DeframerStats(crc_errors=2, bad_escapes=1).frames_bad == 3  # as given, summed
