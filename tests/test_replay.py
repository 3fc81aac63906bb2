"""Replay: live recording -> identical events, golden recordings, the command line."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from devicegw.cli.replay import simulate_record
from devicegw.config import parse_config
from devicegw.contract.payloads import (
    DeviceDetail,
    DeviceStatus,
    DoseRecord,
    Telemetry,
    TelemetryDetail,
)
from devicegw.mqtt.publisher import encode
from devicegw.recording.format import MAGIC, encode_record, iter_records
from devicegw.recording.player import (
    WORKER_GC_GEN0,
    Emitted,
    Player,
    _worker_gc,
    play_parallel,
)
from devicegw.runtime.gateway import Gateway
from drivers.clock import ScaledClock
from simulators.scenario import load_scenario
from simulators.vm1_pty import Vm1PtySimulator
from tests.mqtt_helpers import MosquittoBroker, collecting

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ROOT / "simulators" / "scenarios"
GOLDEN = ROOT / "tests" / "data" / "recordings"
DEVICEGW = [sys.executable, "-m", "devicegw.cli"]
SCALE = 100.0


#: What the golden files hold: each dose event followed by its restricted detail.
RECORD_KINDS = ("dose", "dose-detail")


def replay_lines(paths: list[Path]) -> list[bytes]:
    out: list[Emitted] = []
    Player(paths, emit=out.append, kinds=RECORD_KINDS).run()
    return [encode(e.payload) for e in out]


def without_delivery(payload: bytes) -> dict[str, Any]:
    """The broker copy minus the per-send delivery stamp (explicitly not part of the record)."""
    obj: dict[str, Any] = json.loads(payload)
    obj.pop("delivery", None)
    return obj


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*DEVICEGW, *args], capture_output=True, timeout=timeout, cwd=ROOT, check=False
    )


# ----------------------------------------------------------------------------- golden


def golden_files() -> list[Path]:
    files = sorted(GOLDEN.glob("*.dgwrec"))
    assert len(files) >= 3
    return files


@pytest.mark.parametrize("path", golden_files(), ids=lambda p: p.stem)
def test_golden_recording_replays_to_its_expected_events(path: Path) -> None:
    assert path.stat().st_size < 300_000
    expected = path.with_name(path.name.removesuffix(".dgwrec") + ".expected.jsonl")
    want = expected.read_bytes().splitlines()
    assert want, f"{expected} is empty"
    assert replay_lines([path]) == want


def test_golden_verdicts_are_the_scenarios() -> None:
    verdicts = {}
    for path in golden_files():
        for line in path.with_name(path.stem + ".expected.jsonl").read_bytes().splitlines():
            detail = json.loads(line)
            if detail["event_type"] == "dose_detail":
                verdicts[detail["device"]["serial_no"]] = (detail["verdict"], detail["end_reason"])
    assert verdicts["VM1-000123"] == ("complete", "COMPLETE")  # complete.toml
    assert verdicts["VM1-000187"] == ("partial", "USER_STOP")  # user_stop_half.toml
    assert verdicts["VM1-000201"] == ("complete", "COMPLETE")  # pause_2min.toml


def test_all_golden_files_at_once_match_each_alone() -> None:
    together = sorted(replay_lines(golden_files()))
    alone = sorted(line for p in golden_files() for line in replay_lines([p]))
    assert together == alone


def test_a_torn_recording_still_replays(tmp_path: Path) -> None:
    src = golden_files()[0]
    data = src.read_bytes()
    torn = tmp_path / src.name
    torn.write_bytes(data[: len(data) - 7])
    player = Player([torn])
    summary = player.run()
    assert summary.skipped_bytes > 0
    assert summary.problems


def test_scenario_runner_is_deterministic(tmp_path: Path) -> None:
    scenario = load_scenario(SCENARIOS / "user_stop_half.toml")
    a = simulate_record([scenario], tmp_path / "a", output_rate_hz=2)
    b = simulate_record([scenario], tmp_path / "b", output_rate_hz=2)
    assert a[0].frames == b[0].frames > 500
    [fa] = sorted((tmp_path / "a").iterdir())
    [fb] = sorted((tmp_path / "b").iterdir())
    assert fa.read_bytes() == fb.read_bytes()
    # The device clock was set by the simulated handshake, as live.
    [event, detail] = [json.loads(line) for line in replay_lines([fa])]
    assert event["times"]["device_start_utc"] is not None
    assert detail["event_id"] == event["event_id"]


# ----------------------------------------------------------------------------- live


class ListSink:
    def __init__(self) -> None:
        self.doses: list[bytes] = []

    def dose_record(self, device_id: str, record: DoseRecord) -> None:
        self.doses.append(encode(record.event))
        self.doses.append(encode(record.detail))

    def device_status(self, device_id: str, status: DeviceStatus) -> None:
        pass

    def device_detail(self, device_id: str, detail: DeviceDetail) -> None:
        pass

    def telemetry(self, device_id: str, telemetry: Telemetry, detail: TelemetryDetail) -> None:
        pass


@pytest.mark.e2e
async def test_live_recording_replays_to_byte_identical_events(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    """Pty simulator -> daemon with recording -> Mosquitto; then replay the recording."""
    clock = ScaledClock(SCALE)
    rec_dir = tmp_path / "rec"
    async with Vm1PtySimulator(
        load_scenario(SCENARIOS / "user_stop_half.toml"),
        clock=clock,
        link_dir=tmp_path,
        name="vm1-0",
    ) as sim:
        config = parse_config(
            {
                "gateway": {
                    "id": "gw-test",
                    "site": "site-042",
                    "data_dir": str(tmp_path / "data"),
                    "record_dir": str(rec_dir),
                },
                "broker": {"host": mosquitto.host, "port": mosquitto.port},
                "devices": [
                    {
                        "id": "neb-bed01",
                        "type": "vm1",
                        "bed": "B01",
                        "subject_id": "CVD-042-0001",
                        "kit_number": "K-10001",
                        "link": {"kind": "serial", "port": str(sim.path)},
                    }
                ],
            },
            sha256="1" * 64,
        )
        gateway = Gateway(config, clock=clock)
        assert gateway.recorder is not None
        live = ListSink()
        gateway.sink.listeners.append(live)
        async with collecting(
            mosquitto.host,
            mosquitto.port,
            [f"{gateway.topics.base}/dose/#", f"{gateway.topics.base}/dose-detail/#"],
        ) as collector:
            task = asyncio.create_task(gateway.run(), name="gateway-under-test")
            try:
                await collector.wait_for(lambda msgs: len(msgs) >= 2, 60)
                await asyncio.wait_for(sim.wait_until_idle(), 30)
                await asyncio.sleep(0.3)
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            broker_copies = [
                m.payload for m in collector.messages if "/dose" in m.topic
            ]  # the event, then its detail (committed together, published in order)

    files = sorted(rec_dir.glob("*.dgwrec"))
    assert [f.name.split("-2")[0] for f in files] == ["neb-bed01"]
    kinds = {r.kind for r in iter_records(files[0])}
    assert kinds == {"H", "O", "R", "T", "C"}  # the daemon's close on shutdown is recorded too

    assert len(live.doses) == 2
    assert [without_delivery(b) for b in broker_copies] == [without_delivery(d) for d in live.doses]

    # As fast as possible: byte for byte.
    assert replay_lines(files) == live.doses

    # At 100x the recorded pace: the same bytes, in about span/100 of real time.
    paced: list[Emitted] = []
    player = Player(files, emit=paced.append, kinds=RECORD_KINDS)
    t0 = time.perf_counter()
    summary = await player.run_async(speed=SCALE)
    elapsed = time.perf_counter() - t0
    assert [encode(e.payload) for e in paced] == live.doses
    assert summary.span_s > 200  # ~257 s of gateway time were recorded
    # Paced: never ahead of the clock (no upper bound: a loaded host may be slower).
    assert elapsed >= summary.span_s / SCALE * 0.9


# ----------------------------------------------------------------------------- command line


def test_cli_simulate_record_then_replay(tmp_path: Path) -> None:
    out = tmp_path / "rec"
    res = run_cli(
        "simulate",
        "--scenario",
        str(SCENARIOS / "complete.toml"),
        "--scenario",
        str(SCENARIOS / "user_stop_half.toml"),
        "--record",
        str(out),
        "--output-rate-hz",
        "5",
    )
    assert res.returncode == 0, res.stderr
    assert b"recorded 2 device(s)" in res.stdout
    files = sorted(out.glob("*.dgwrec"))
    assert [f.name for f in files] == [
        "neb-VM1-000123-20260105.dgwrec",
        "neb-VM1-000187-20260105.dgwrec",
    ]
    summary_json = tmp_path / "summary.json"
    res = run_cli(
        "replay",
        "--as-fast-as-possible",
        "--progress",
        "off",
        "--summary-json",
        str(summary_json),
        *map(str, files),
    )
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()  # the default: dose events only (the blinded feed)
    assert sorted(lines) == sorted(
        line for line in replay_lines(files) if b'"event_type":"dose_completion"' in line
    )
    verdicts = sorted(json.loads(line)["verdict"] for line in lines)
    assert verdicts == ["complete", "partial"]
    assert "replay summary" in res.stderr.decode()  # the table (width-dependent: not parsed)
    summary = json.loads(summary_json.read_text())  # the same figures, as data
    assert summary["files"] == 2
    assert summary["sessions"] == 2
    assert summary["verdicts"] == {"complete": 1, "partial": 1}
    assert sorted(summary["devices"]) == ["neb-VM1-000123", "neb-VM1-000187"]
    assert summary["span_s"] > 0
    assert summary["frames"] > 0
    assert summary["speedup"] > 0  # a figure, not a speed requirement


def test_cli_replay_at_a_speed_takes_about_the_paced_time(tmp_path: Path) -> None:
    src = GOLDEN / "neb-VM1-000187-20260105.dgwrec"  # ~257 s recorded
    t0 = time.perf_counter()
    res = run_cli(
        "replay", "--speed", "200", "--kinds", "dose,dose-detail", "--progress", "off", str(src)
    )
    elapsed = time.perf_counter() - t0
    assert res.returncode == 0, res.stderr
    assert (
        res.stdout.splitlines()
        == src.with_name(src.stem + ".expected.jsonl").read_bytes().splitlines()
    )
    assert elapsed >= 257 / 200 * 0.9


def test_cli_replay_rejects_a_non_recording(tmp_path: Path) -> None:
    bogus = tmp_path / "x.dgwrec"
    bogus.write_text("hello")
    res = run_cli("replay", str(bogus))
    assert res.returncode == 1
    assert b"not a devicegw recording" in res.stderr


@pytest.mark.e2e
async def test_cli_replay_publishes_dose_events(mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    files = golden_files()
    async with collecting(mosquitto.host, mosquitto.port, ["devicegw/v2/#"]) as collector:
        proc = await asyncio.create_subprocess_exec(
            *DEVICEGW,
            "replay",
            "--quiet",
            "--progress",
            "off",
            "--publish",
            f"{mosquitto.host}:{mosquitto.port}",
            *map(str, files),
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err
        assert f"published {len(files)} dose event(s)".encode() in err
        await collector.wait_for(lambda msgs: len(msgs) >= 2 * len(files), 10)
    got = {m.topic: m.payload for m in collector.messages if "/dose" in m.topic}
    want = {}
    for f in files:
        [line, detail] = f.with_name(f.stem + ".expected.jsonl").read_bytes().splitlines()
        device_id = json.loads(line)["device"]["device_id"]
        want[f"devicegw/v2/site-sim/gw-sim/dose/{device_id}"] = line
        want[f"devicegw/v2/site-sim/gw-sim/dose-detail/{device_id}"] = detail
    assert got == want


def test_golden_dir_has_no_stray_files() -> None:
    names = {p.name for p in GOLDEN.iterdir()}
    for p in golden_files():
        assert p.stem + ".expected.jsonl" in names
    assert len(names) == 2 * len(golden_files()) + 2  # + README.md, oximeter/
    assert {q.name for q in (GOLDEN / "oximeter").iterdir()} == {
        OXIMETER_GOLDEN.name,
        OXIMETER_GOLDEN.stem + ".expected.jsonl",
    }


OXIMETER_GOLDEN = GOLDEN / "oximeter" / "neb-VM1-000123-20260105.dgwrec"


def test_golden_recording_with_an_oximeter_replays_its_spo2_overlay() -> None:
    """complete.toml + oximeter_desat.toml on one bed: the dose event's spo2 section and the
    safety alerts come out of the replay byte for byte."""
    assert OXIMETER_GOLDEN.stat().st_size < 300_000
    out: list[Emitted] = []
    Player([OXIMETER_GOLDEN], emit=out.append, kinds=("dose", "dose-detail", "safety")).run()
    lines = [encode(e.payload) for e in out]
    assert (
        lines
        == OXIMETER_GOLDEN.with_name(OXIMETER_GOLDEN.stem + ".expected.jsonl")
        .read_bytes()
        .splitlines()
    )
    docs = [json.loads(line) for line in lines]
    assert [d["event_type"] for d in docs] == [
        "safety_alert",
        "safety_alert",
        "dose_completion",
        "dose_detail",
    ]
    assert docs[2]["spo2"]["spo2_monitoring"] == "monitored"
    assert docs[2]["spo2"]["alerts_raised"] == 1


def test_scenario_runner_records_a_nonin_on_the_bed(tmp_path: Path) -> None:
    """simulate --record with --oximeter: deterministic (it is how the golden was made);
    an oximeter scenario naming another VM-1 scenario is refused."""
    complete = SCENARIOS / "complete.toml"
    desat = SCENARIOS / "oximeter" / "oximeter_desat.toml"
    res = run_cli(
        "simulate",
        "--record",
        str(tmp_path / "rec"),
        "--output-rate-hz",
        "2",
        "--scenario",
        str(complete),
        "--oximeter",
        str(desat),
    )
    assert res.returncode == 0, res.stderr
    [made] = sorted((tmp_path / "rec").iterdir())
    assert made.read_bytes() == OXIMETER_GOLDEN.read_bytes()
    res = run_cli(
        "simulate",
        "--record",
        str(tmp_path / "other"),
        "--scenario",
        str(SCENARIOS / "pause_2min.toml"),
        "--oximeter",
        str(desat),
    )
    assert res.returncode == 2
    assert b"is not one of the --scenario files" in res.stderr


ALL_KINDS = ("dose", "dose-detail", "status", "device-detail", "telemetry", "telemetry-detail")


@pytest.mark.parametrize("jobs", [1, 2])
def test_parallel_replay_matches_the_sequential_one(jobs: int) -> None:
    """Devices in worker processes: the same outputs in the same order, the same counts."""
    files = sorted(GOLDEN.glob("*.dgwrec"))
    seq: list[Emitted] = []
    seq_summary = Player(files, emit=seq.append, kinds=ALL_KINDS).run()
    par: list[Emitted] = []
    par_summary = play_parallel(files, jobs=jobs, emit=par.append, kinds=ALL_KINDS)
    assert [(e.device_id, e.kind, encode(e.payload)) for e in par] == [
        (e.device_id, e.kind, encode(e.payload)) for e in seq
    ]
    assert len({e.device_id for e in par}) == len(files)
    for summary in (seq_summary, par_summary):
        summary.wall_s = 0.0  # the one figure that differs run to run
    assert par_summary.as_dict() == seq_summary.as_dict()


def test_parallel_replay_with_an_oximeter_bed_matches_the_sequential_one() -> None:
    """A format v2 bed among v1 ones: its safety outputs too, in the sequential order."""
    others = [f for f in sorted(GOLDEN.glob("*.dgwrec")) if f.name != OXIMETER_GOLDEN.name]
    files = [*others, OXIMETER_GOLDEN]  # its nebulizer is golden's 000123: not that one twice
    kinds = (*ALL_KINDS, "safety")
    seq: list[Emitted] = []
    Player(files, emit=seq.append, kinds=kinds).run()
    par: list[Emitted] = []
    play_parallel(files, jobs=2, emit=par.append, kinds=kinds)
    assert [(e.device_id, e.kind, encode(e.payload)) for e in par] == [
        (e.device_id, e.kind, encode(e.payload)) for e in seq
    ]
    assert any(e.kind == "safety" for e in par)


def test_cli_replay_with_jobs_prints_the_same_events(tmp_path: Path) -> None:
    files = sorted(GOLDEN.glob("*.dgwrec"))
    summary_json = tmp_path / "summary.json"
    res = run_cli(
        "replay",
        "--jobs",
        "2",
        "--kinds",
        "dose,dose-detail",
        "--progress",
        "off",
        "--summary-json",
        str(summary_json),
        *map(str, files),
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == replay_lines(files)
    assert json.loads(summary_json.read_text())["files"] == len(files)
    res = run_cli("replay", "--jobs", "2", "--speed", "10", str(files[0]))
    assert res.returncode != 0
    assert b"--jobs" in res.stderr


def _with_clock_step_back(src: Path, dst: Path, back_us: int) -> None:
    """``src`` re-written with the gateway UTC of its middle third ``back_us`` earlier (a
    clock step back and forward again), everything else as recorded."""
    records = list(iter_records(src))
    lo, hi = len(records) // 3, 2 * len(records) // 3
    with dst.open("wb") as f:
        f.write(MAGIC)
        for i, rec in enumerate(records):
            utc = rec.utc_us - back_us if lo <= i < hi else rec.utc_us
            f.write(encode_record(rec.kind, rec.mono, utc, rec.payload))


def test_device_by_device_replay_keeps_the_interleaved_order(tmp_path: Path) -> None:
    """Player.run and play_parallel play a device at a time and merge the outputs; they
    come out in the order of the UTC merge of every record that run_async plays, also
    when a device's recorded clock steps back, and so do damaged files' problems."""
    files = sorted(GOLDEN.glob("*.dgwrec"))
    stepped = tmp_path / "stepped"
    stepped.mkdir()
    for i, f in enumerate(files[:2]):
        _with_clock_step_back(f, stepped / f.name, (i + 1) * 90_000_000)
    for f in files[2:]:  # two torn copies: two problems to order
        data = f.read_bytes()
        (stepped / f.name).write_bytes(data[: len(data) - 7])
    paths = sorted(stepped.glob("*.dgwrec"))
    kinds = (*ALL_KINDS, "safety")

    def outputs(items: list[Emitted]) -> list[tuple[str, str, bytes]]:
        return [(e.device_id, e.kind, encode(e.payload)) for e in items]

    ref: list[Emitted] = []
    ref_summary = asyncio.run(
        Player(paths, emit=ref.append, kinds=kinds).run_async(speed=None, yield_every=10**9)
    )
    seq: list[Emitted] = []
    seq_summary = Player(paths, emit=seq.append, kinds=kinds).run()
    par: list[Emitted] = []
    play_parallel(paths, jobs=2, emit=par.append, kinds=kinds)
    assert outputs(seq) == outputs(ref)
    assert outputs(par) == outputs(ref)
    assert len(seq_summary.problems) == 2
    for summary in (seq_summary, ref_summary):
        summary.wall_s = 0.0
    assert seq_summary.as_dict() == ref_summary.as_dict()
    assert seq_summary.problems == ref_summary.problems


def _collector_state() -> tuple[int, int]:
    return gc.get_threshold()[0], gc.get_freeze_count()


def test_replay_workers_collect_young_objects_less_often() -> None:
    """play_parallel's workers start with what they inherited frozen and a raised young
    threshold (a replay's millions of short-lived tuples); the parent is untouched."""
    before = gc.get_threshold()
    with ProcessPoolExecutor(max_workers=1, initializer=_worker_gc) as pool:
        threshold, frozen = pool.submit(_collector_state).result(timeout=60)
    assert threshold == WORKER_GC_GEN0 and frozen > 0
    assert gc.get_threshold() == before
