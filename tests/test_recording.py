"""The .dgwrec format: round trip, day files, torn tails, the writer's failure mode, `show`."""

from __future__ import annotations

import struct
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from devicegw.config import Config, parse_config
from devicegw.recording.format import (
    HEADER,
    MAGIC,
    RX,
    ReadStats,
    Record,
    RecordDecoder,
    RecordingError,
    RecordingWriter,
    encode_record,
    first_header,
    iter_field_batches,
    iter_record_batches,
    iter_records,
    show_lines,
    us_to_utc,
    utc_to_us,
)
from drivers.vm1.messages import Breath, DeviceState, Output, Status
from drivers.vm1.stream import encode_message_frame

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "data" / "recordings"
T0 = datetime(2026, 3, 1, 23, 59, 58, 123456, tzinfo=UTC)


def config() -> Config:
    return parse_config(
        {
            "gateway": {"id": "gw-1", "site": "site-9"},
            "devices": [
                {
                    "id": "neb-bed01",
                    "type": "vm1",
                    "bed": "B01",
                    "subject_id": "CVD-042-0001",
                    "kit_number": "K-10001",
                    "link": {"kind": "serial", "port": "/dev/ttyUSB0"},
                }
            ],
        },
        sha256="ab" * 32,
    )


def frames() -> list[bytes]:
    return [
        encode_message_frame(
            Status(state=DeviceState.IDLE, reservoir_ul=6000, battery_pct=80, flags=0, seq=1)
        ),
        encode_message_frame(
            Output(rate_ul_min=400, cum_ul=12, breath=Breath.INHALATION, seq=2, dev_ms=1100)
        ),
    ]


def write_sample(directory: Path, flush_interval_s: float = 0.0) -> RecordingWriter:
    w = RecordingWriter(directory, config(), run_id="run-1", flush_interval_s=flush_interval_s)
    w.link_opened("neb-bed01", "/dev/ttyUSB0", T0, 10.25)
    for i, f in enumerate(frames()):
        w.bytes_received("neb-bed01", f, T0 + timedelta(seconds=0.1 * i), 10.35 + 0.1 * i)
    w.bytes_sent("neb-bed01", b"\x7e\x81\x00", T0 + timedelta(seconds=1), 11.25)
    # 2 s later it is the next UTC day: a second file, same run.
    w.bytes_received("neb-bed01", frames()[0], T0 + timedelta(seconds=2), 12.25)
    w.link_closed("neb-bed01", "closed", T0 + timedelta(seconds=3), 13.25)
    w.close()
    return w


def test_utc_microseconds_are_exact() -> None:
    for when in (T0, datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)):
        assert us_to_utc(utc_to_us(when)) == when


def test_round_trip_and_one_file_per_utc_day(tmp_path: Path) -> None:
    w = write_sample(tmp_path)
    day1, day2 = w.paths()
    assert day1.name == "neb-bed01-20260301.dgwrec"
    assert day2.name == "neb-bed01-20260302.dgwrec"
    assert day1.read_bytes().startswith(MAGIC)
    recs1 = list(iter_records(day1))
    recs2 = list(iter_records(day2))
    assert [r.kind for r in recs1] == ["H", "O", "R", "R", "T"]
    assert [r.kind for r in recs2] == ["H", "R", "C"]
    f = frames()
    assert recs1[2] == Record(RX, 10.35, utc_to_us(T0), f[0])
    assert recs1[3].payload == f[1]
    assert recs1[3].mono == 10.35 + 0.1  # the float as given, bit for bit
    assert recs1[3].utc == T0 + timedelta(seconds=0.1)
    assert recs2[2].text() == "closed"
    h1, _ = first_header(day1)
    h2, _ = first_header(day2)
    assert h1.run_id == h2.run_id == "run-1"
    assert h1.device is not None and h1.device.subject_id == "CVD-042-0001"
    assert h1.config() == config().model_copy(update={"devices": [h1.device]})
    assert h1.config_sha256 == "ab" * 32


def test_decoder_fed_whole_bytewise_and_in_chunks_agrees(tmp_path: Path) -> None:
    data = write_sample(tmp_path).paths()[0].read_bytes()
    whole = RecordDecoder().feed(data)
    bytewise: list[Record] = []
    dec = RecordDecoder()
    for i in range(len(data)):
        bytewise += dec.feed(data[i : i + 1])
    assert dec.finish().bytes_skipped == 0
    assert bytewise == whole
    assert len(whole) == 5


def test_plain_fields_are_the_records_whatever_the_split(tmp_path: Path) -> None:
    """``feed_fields`` (the player's) gives the same four fields as ``feed``, fed whole or
    byte by byte, and ``iter_field_batches`` the same as ``iter_record_batches``."""
    path = write_sample(tmp_path).paths()[0]
    data = path.read_bytes()
    whole = [tuple(r) for r in RecordDecoder().feed(data)]
    assert RecordDecoder().feed_fields(data) == whole
    dec = RecordDecoder()
    bytewise: list[tuple[str, float, int, bytes]] = []
    for i in range(len(data)):
        bytewise += dec.feed_fields(data[i : i + 1])
    assert bytewise == whole and dec.finish().bytes_skipped == 0
    assert [f for b in iter_field_batches(path, chunk=7) for f in b] == whole
    assert [tuple(r) for b in iter_record_batches(path, chunk=7) for r in b] == whole
    assert all(type(f) is tuple for b in iter_field_batches(path) for f in b)


def test_every_truncation_is_tolerated(tmp_path: Path) -> None:
    path = write_sample(tmp_path).paths()[0]
    data = path.read_bytes()
    full = list(iter_records(path))
    for cut in range(len(MAGIC), len(data)):
        path.write_bytes(data[:cut])
        stats = ReadStats()
        got = list(iter_records(path, stats))
        assert got == full[: len(got)]
        assert stats.bytes_ok + stats.bytes_skipped == cut
        if stats.bytes_skipped:
            assert stats.problem is not None and "truncated" in stats.problem


def test_corruption_ends_the_stream_quietly(tmp_path: Path) -> None:
    path = write_sample(tmp_path).paths()[0]
    data = bytearray(path.read_bytes())
    full = list(iter_records(path))
    data[-3] ^= 0x40  # inside the last record's body
    path.write_bytes(bytes(data))
    stats = ReadStats()
    assert list(iter_records(path, stats)) == full[:-1]
    assert stats.problem is not None and "CRC" in stats.problem


@pytest.mark.parametrize("step", [1, 7, 1 << 20])
def test_a_bad_length_ends_the_stream_however_it_is_fed(tmp_path: Path, step: int) -> None:
    """A length prefix beyond the limit is corruption at once, not a record still to come."""
    data = write_sample(tmp_path).paths()[0].read_bytes()
    full = RecordDecoder().feed(data)
    bad = data + struct.pack("<II", 1 << 24, 0) + b"x" * 40
    dec = RecordDecoder()
    got: list[Record] = []
    for i in range(0, len(bad), step):
        got += dec.feed(bad[i : i + step])
    stats = dec.finish()
    assert got == full
    assert stats.problem is not None and "bad record length" in stats.problem
    assert stats.bytes_ok + stats.bytes_skipped == len(bad)


def test_not_a_recording(tmp_path: Path) -> None:
    p = tmp_path / "x.dgwrec"
    p.write_bytes(b"PK\x03\x04 not a recording")
    with pytest.raises(RecordingError, match="bad magic"):
        list(iter_records(p))


def test_writer_cuts_a_torn_tail_before_appending(tmp_path: Path) -> None:
    w = RecordingWriter(tmp_path, config(), run_id="run-1")
    w.bytes_received("neb-bed01", b"abc", T0, 1.0)
    w.close()
    path = w.paths()[0]
    path.write_bytes(path.read_bytes() + encode_record(RX, 2.0, utc_to_us(T0), b"xyz")[:-2])
    w2 = RecordingWriter(tmp_path, config(), run_id="run-2")
    w2.bytes_received("neb-bed01", b"def", T0, 0.5)
    w2.close()
    stats = ReadStats()
    recs = list(iter_records(path, stats))
    assert stats.bytes_skipped == 0
    assert [(r.kind, r.payload) for r in recs if r.kind != HEADER] == [(RX, b"abc"), (RX, b"def")]
    headers = [r for r in recs if r.kind == HEADER]
    assert len(headers) == 2  # the restarted gateway's run starts with its own header


def test_batched_flush_writes_everything_on_close(tmp_path: Path) -> None:
    w = write_sample(tmp_path, flush_interval_s=3600.0)
    unbatched = write_sample(tmp_path / "b")
    assert [p.read_bytes() for p in w.paths()] == [p.read_bytes() for p in unbatched.paths()]


def test_a_write_failure_stops_recording_without_raising(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    w = RecordingWriter(blocker, config())
    w.bytes_received("neb-bed01", b"abc", T0, 1.0)  # mkdir fails: logged, not raised
    w.bytes_received("neb-bed01", b"abc", T0, 1.1)
    w.close()
    assert w.stats.records_dropped == 2
    assert any(r.levelname == "ERROR" and "recording" in r.message for r in caplog.records)


def test_show_decodes_messages(tmp_path: Path) -> None:
    path = write_sample(tmp_path).paths()[0]
    lines = list(show_lines(path))
    assert "H format v1 run=run-1" in lines[0]
    assert "subject=CVD-042-0001" in lines[0]
    assert "O open: /dev/ttyUSB0" in lines[1]
    assert "R rx" in lines[2]
    assert "Status(state=<DeviceState.IDLE: 0>" in lines[3]
    assert any("Output(" in line for line in lines)
    assert len(list(show_lines(path, limit=2))) == 2


def test_show_command_line_on_a_golden_recording() -> None:
    golden = sorted(GOLDEN.glob("*.dgwrec"))[0]
    res = subprocess.run(
        [sys.executable, "-m", "devicegw.cli", "recording", "show", str(golden), "--limit", "8"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert " H format v1 " in out
    assert "Ident(" in out
    assert "GetInfo(" in out and "SetClock(" in out
    assert sum(1 for line in out.splitlines() if not line.startswith(" ")) == 8
