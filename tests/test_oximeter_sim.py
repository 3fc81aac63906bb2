"""Oximeter simulators: physiology model -> protocol bytes -> the project's decoders, and a pty."""

from __future__ import annotations

import asyncio
import itertools
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import serial

from devicegw.config import Spo2Rules
from devicegw.contract.spo2 import OximeterRef
from devicegw.core.spo2_monitor import (
    SafetyAlertCleared,
    SafetyAlertRaised,
    SessionSpo2Summary,
    Spo2Context,
    Spo2Event,
    Spo2Monitor,
)
from drivers.clock import ScaledClock
from drivers.oximeter import berrymed, nonin, plx
from drivers.oximeter.sample import OximeterSample, QualityFlag
from drivers.vm1.messages import SessionEnd, SessionStart
from simulators.errors import ScenarioError
from simulators.oximeter_pty import NoninPtySimulator
from simulators.oximeter_scenario import (
    OximeterScenario,
    load_oximeter_scenario,
    load_pair,
    parse_oximeter_scenario,
)
from simulators.oximeter_sim import BerryMedSim, NoninSim, OximeterSim, PlxSim, make_sim
from simulators.physiology import PhysioModel, PhysioState
from simulators.scenario import Scenario
from simulators.vm1_model import Vm1Model

# In a subdirectory: simulators/scenarios/*.toml are all VM-1 scenarios (tests/test_scenario.py).
SCENARIO_DIR = Path(__file__).resolve().parent.parent / "simulators" / "scenarios" / "oximeter"

TimedSample = tuple[float, OximeterSample]


def scenario(**extra: Any) -> OximeterScenario:
    """Every condition once in two minutes: desaturation, motion, low perfusion, finger, sensor."""
    data: dict[str, Any] = {
        "bed": "B01",
        "subject_id": "CVD-042-0017",
        "oximeter": {"serial_no": "NONIN-T1", "seed": 3},
        "subject": {"baseline_spo2": 95, "baseline_pulse_bpm": 72},
        "desaturations": [{"at_s": 10, "depth_points": 8, "duration_s": 15, "ramp_s": 5}],
        "motion": [{"at_s": 40, "duration_s": 10}],
        "low_perfusion": [{"at_s": 60, "duration_s": 10}],
        "finger_removed": [{"at_s": 80, "duration_s": 10}],
        "sensor_off": [{"at_s": 100, "duration_s": 10}],
    }
    data.update(extra)
    return parse_oximeter_scenario(data, source="test.toml")


def decode(sim: OximeterSim, t0: float, t1: float) -> list[TimedSample]:
    """The simulator's output for [t0, t1) through the production decoders, with send times."""
    out: list[TimedSample] = []
    if isinstance(sim, PlxSim):
        for t, value in sim.timed_frames_between(t0, t1):
            out.append((t, plx.to_sample(plx.decode_continuous(value))))
        return out
    if isinstance(sim, NoninSim):
        nd = nonin.NoninDecoder()
        for t, data in sim.timed_frames_between(t0, t1):
            out += [(t, nonin.to_sample(p)) for p in nd.feed(data)]
        assert nd.stats.bytes_discarded == 0 and nd.stats.bad_packets == 0
        return out
    bd = berrymed.BerryMedDecoder()
    for t, data in sim.timed_frames_between(t0, t1):
        out += [(t, berrymed.to_sample(p)) for p in bd.feed(data)]
    assert bd.stats.bytes_discarded == 0
    return out


SIMS: dict[str, Callable[[PhysioModel], OximeterSim]] = {
    "nonin": NoninSim,
    "berrymed": BerryMedSim,
    "plx": PlxSim,
}
RATES = {"nonin": 3, "berrymed": 100, "plx": 1}


# --------------------------------------------------------------------------- the model


def test_model_is_a_pure_function_of_time_and_seed() -> None:
    a, b = PhysioModel(scenario()), PhysioModel(scenario())
    times = [0.0, 12.5, 33.3, 99.9, 7.0]
    forward = [a.value_at(t) for t in times]
    backward = [b.value_at(t) for t in reversed(times)][::-1]
    assert forward == backward
    assert PhysioModel(scenario(), seed=4).value_at(33.3) != forward[2]


def test_model_follows_the_script() -> None:
    m = PhysioModel(scenario())
    base = m.value_at(5)
    assert 93 < base.spo2 < 97 and base.trustworthy
    assert m.value_at(20).spo2 == pytest.approx(base.spo2 - 8, abs=1.0)  # plateau 15-30 s
    assert m.value_at(12.5).spo2 == pytest.approx(base.spo2 - 4, abs=1.0)  # half-way down
    assert m.value_at(36).spo2 == pytest.approx(base.spo2, abs=1.0)  # recovered at 35 s
    s: PhysioState = m.value_at(45)
    assert s.motion and not s.trustworthy and s.measured_spo2 is not None
    assert s.measured_spo2 <= s.spo2 - 4  # bogus low reading
    assert m.value_at(65).low_perfusion and m.value_at(65).perfusion_index_pct < 1
    finger = m.value_at(85)
    assert not finger.finger_present and finger.sensor_connected and finger.measured_spo2 is None
    off = m.value_at(105)
    assert not off.sensor_connected and not off.finger_present and off.measured_pulse_bpm is None


def test_battery_runs_down_and_the_device_goes_quiet() -> None:
    sc = scenario(oximeter={"serial_no": "X", "battery_pct": 1.0, "battery_drain_pct_per_h": 60})
    m = PhysioModel(sc)
    assert m.value_at(30).battery_pct == pytest.approx(0.5)
    assert not m.value_at(60).powered
    for make in SIMS.values():
        sim = make(m)
        assert sim.frames_between(60, 70) in (b"", [])
        assert sim.frames_between(0, 10)


# --------------------------------------------------------------------------- protocols


@pytest.mark.parametrize("protocol", SIMS)
def test_bytes_decode_back_to_samples_that_follow_the_model(protocol: str) -> None:
    model = PhysioModel(scenario())
    sim = SIMS[protocol](model)
    samples = decode(sim, 0, 120)
    assert len(samples) == 120 * RATES[protocol]
    subj = model.scenario.subject
    tol_spo2 = 4 * subj.spo2_noise_sd + 0.5  # 4 SD of noise, plus integer rounding
    tol_pulse = 4 * subj.pulse_noise_sd + 0.5
    checked = 0
    for t, s in samples:
        state = model.value_at(t)
        if state.trustworthy:
            assert s.valid, (t, s)
            assert s.spo2 is not None and s.pulse_bpm is not None
            assert abs(s.spo2 - state.spo2) <= tol_spo2, (t, s.spo2, state.spo2)
            assert abs(s.pulse_bpm - state.pulse_bpm) <= tol_pulse, (t, s.pulse_bpm)
            checked += 1
    assert checked >= 60 * RATES[protocol]
    # The desaturation plateau (15-30 s) comes through: 8 points down.
    plateau = [s.spo2 for t, s in samples if 16 <= t < 29 and s.spo2 is not None]
    assert min(plateau) >= 95 - 8 - 2.5 and max(plateau) <= 95 - 8 + 2.5


EXPECTED_FLAGS: dict[str, dict[str, set[QualityFlag]]] = {
    "nonin": {
        "motion": {QualityFlag.ARTIFACT},
        "low_perfusion": {QualityFlag.LOW_PERFUSION},
        "finger_removed": {QualityFlag.SENSOR_ALARM, QualityFlag.OUT_OF_TRACK},
        "sensor_off": {QualityFlag.PROBE_UNPLUGGED},
    },
    "berrymed": {
        "motion": {QualityFlag.SEARCHING},
        "low_perfusion": set(),  # BCI has no perfusion bit: documented, values stay valid
        "finger_removed": {QualityFlag.NO_FINGER},
        "sensor_off": {QualityFlag.PROBE_UNPLUGGED, QualityFlag.NO_SIGNAL},
    },
    "plx": {
        "motion": {QualityFlag.ERRATIC_SIGNAL, QualityFlag.ARTIFACT, QualityFlag.QUESTIONABLE},
        "low_perfusion": {QualityFlag.LOW_PERFUSION},
        "finger_removed": {QualityFlag.NO_FINGER, QualityFlag.UNAVAILABLE},
        "sensor_off": {QualityFlag.PROBE_UNPLUGGED, QualityFlag.UNAVAILABLE},
    },
}
PERIODS = {"motion": (40, 50), "low_perfusion": (60, 70), "finger_removed": (80, 90)}
PERIODS["sensor_off"] = (100, 110)


@pytest.mark.parametrize("protocol", SIMS)
def test_artefact_periods_come_out_flagged(protocol: str) -> None:
    model = PhysioModel(scenario())
    samples = decode(SIMS[protocol](model), 0, 120)
    for condition, (a, b) in PERIODS.items():
        inside = [s for t, s in samples if a <= t < b]
        assert inside
        expected = EXPECTED_FLAGS[protocol][condition]
        for s in inside:
            assert s.gating == frozenset(expected), (condition, s.quality)
            if expected:
                assert not s.valid
        if condition in ("finger_removed", "sensor_off"):
            assert all(s.spo2 is None and s.pulse_bpm is None for s in inside)
    # Motion values are bogus (low), which is exactly why they must be flagged.
    motion = [s.spo2 for t, s in samples if 40 <= t < 50]
    assert all(v is not None and v <= 92 for v in motion)


def test_low_perfusion_is_valid_on_berrymed_only() -> None:
    model = PhysioModel(scenario())
    inside = [s for t, s in decode(BerryMedSim(model), 60, 70)]
    assert all(s.valid and s.signal_strength == 1 for s in inside)


@pytest.mark.parametrize("protocol", SIMS)
def test_windows_partition_the_stream(protocol: str) -> None:
    sim = SIMS[protocol](PhysioModel(scenario()))
    whole = sim.frames_between(0, 10)
    cuts = [0.0, 1 / 3, 0.999, 3.3, 3.33, 7.01, 10.0]
    parts = [sim.frames_between(a, b) for a, b in itertools.pairwise(cuts)]
    if isinstance(whole, bytes):
        assert b"".join(p for p in parts if isinstance(p, bytes)) == whole
        assert len(whole) == 10 * RATES[protocol] * (125 if protocol == "nonin" else 5)
    else:
        assert [v for p in parts for v in p] == whole and len(whole) == 10
    assert sim.frames_between(0, 10) == whole  # same window, same bytes


def test_nonin_packets_carry_firmware_and_pleth() -> None:
    sim = NoninSim(PhysioModel(scenario()), firmware_revision=0x42)
    [pkt] = nonin.NoninDecoder().feed(sim.frames_between(0, 0.1))
    assert pkt.firmware_revision == 0x42 and len(set(pkt.pleth)) > 5
    assert pkt.perfusion is nonin.Perfusion.GREEN


def test_make_sim_follows_the_protocol() -> None:
    assert isinstance(make_sim(scenario()), NoninSim)
    for protocol, cls in (("berrymed", BerryMedSim), ("plx", PlxSim)):
        sc = scenario(oximeter={"serial_no": "X", "protocol": protocol})
        assert isinstance(make_sim(sc), cls)


# --------------------------------------------------------------------------- scenarios


def test_scenario_errors_name_the_field() -> None:
    with pytest.raises(ScenarioError, match=r"test.toml: arm: unknown field"):
        scenario(arm="A")
    with pytest.raises(ScenarioError, match=r"motion\[1\].at_s: must not be before"):
        scenario(motion=[{"at_s": 40, "duration_s": 10}, {"at_s": 45, "duration_s": 5}])
    with pytest.raises(ScenarioError, match=r"subject_id"):
        scenario(subject_id="John Smith")
    with pytest.raises(ScenarioError, match=r"subject.baseline_spo2"):
        scenario(subject={"baseline_spo2": "95"})
    with pytest.raises(ScenarioError, match=r"oximeter.protocol"):
        scenario(oximeter={"serial_no": "X", "protocol": "masimo"})


def vm1_session(vm1: Scenario) -> tuple[float, float]:
    """SESSION_START and SESSION_END times of the paired VM-1 scenario's first session."""
    msgs = Vm1Model.from_scenario(vm1).advance(vm1.end_of_script_s + 900)
    [start] = [m.dev_ms / 1000 for m in msgs if isinstance(m, SessionStart)]
    [end] = [m.dev_ms / 1000 for m in msgs if isinstance(m, SessionEnd)]
    return start, end


def test_shipped_scenarios_pair_with_a_vm1_session_on_one_bed() -> None:
    files = sorted(SCENARIO_DIR.glob("oximeter_*.toml"))
    assert {f.name for f in files} >= {"oximeter_desat.toml", "oximeter_artefacts.toml"}
    for f in files:
        oxi, vm1 = load_pair(f)
        assert vm1 is not None and vm1.name == "complete" and oxi.vm1_scenario == "../complete.toml"
        assert (oxi.bed, oxi.subject_id) == ("B01", "CVD-042-0017")
        start, end = vm1_session(vm1)
        assert start < oxi.end_of_script_s < end  # everything scripted happens in the session
    desat, vm1 = load_pair(SCENARIO_DIR / "oximeter_desat.toml")
    assert vm1 is not None
    start, _ = vm1_session(vm1)
    [d] = desat.desaturations
    assert d.at_s - start == 180 and d.duration_s == 45
    assert desat.subject.baseline_spo2 - d.depth_points == 86 and desat.subject.baseline_spo2 == 94


def overlay(
    path: Path, make: Callable[[PhysioModel], OximeterSim]
) -> tuple[list[Spo2Event], Spo2Monitor]:
    """Run the paired scenarios' session through simulator bytes, decoders and the overlay."""
    oxi, vm1 = load_pair(path)
    assert vm1 is not None
    start, end = vm1_session(vm1)
    ctx = Spo2Context("gw-1", oxi.subject_id, oxi.bed, "neb-bed01", OximeterRef(device_id="oxi"))
    monitor = Spo2Monitor(Spo2Rules(), ctx)
    events: list[Spo2Event] = []
    started = False
    for t, s in decode(make(PhysioModel(oxi)), 0, end + 60):
        if not started and t >= start:
            events += monitor.session_started(start, uuid.uuid4())
            started = True
        if t >= end and not any(isinstance(e, SessionSpo2Summary) for e in events):
            events += monitor.session_ended(end)
        events += monitor.feed(t, s)
    return events, monitor


def test_desat_scenario_gives_one_desaturation_through_the_overlay() -> None:
    events, _ = overlay(SCENARIO_DIR / "oximeter_desat.toml", NoninSim)
    [summary] = [e.summary for e in events if isinstance(e, SessionSpo2Summary)]
    assert summary.baseline.source == "pre_session"
    assert summary.baseline.spo2 == pytest.approx(94, abs=1)
    [ev] = summary.session.desaturations
    assert ev.kind == "both" and not ev.ongoing
    assert 180 <= ev.start_offset_s <= 190  # falls from 180 s after the start
    assert 45 <= ev.duration_s <= 65
    assert 84 <= ev.nadir_spo2 <= 87
    [raised] = [e for e in events if isinstance(e, SafetyAlertRaised)]
    [cleared] = [e for e in events if isinstance(e, SafetyAlertCleared)]
    assert raised.alert.offset_s == pytest.approx(ev.start_offset_s + 10, abs=0.5)
    assert cleared.alert.clear_reason == "recovered"
    assert summary.session.coverage_pct > 99 and summary.session.samples_excluded == 0


@pytest.mark.parametrize("protocol", SIMS)
def test_artefact_scenario_gives_no_desaturation_on_any_protocol(protocol: str) -> None:
    events, _ = overlay(SCENARIO_DIR / "oximeter_artefacts.toml", SIMS[protocol])
    assert not [e for e in events if isinstance(e, SafetyAlertRaised)]
    [summary] = [e.summary for e in events if isinstance(e, SessionSpo2Summary)]
    s = summary.session
    # Valid samples cover under half the session: below min_coverage_pct (80 %).
    assert s.desaturations == [] and summary.spo2_monitoring == "monitoring_inadequate"
    assert s.samples_excluded > 0.4 * s.samples_total
    assert s.nadir_spo2 is not None and s.nadir_spo2 >= 92
    assert 35 < s.coverage_pct < 60


# --------------------------------------------------------------------------- the pty


def lexists(path: Path) -> bool:
    """Does ``path`` exist as a name (a dangling symlink counts)? Instant on a tmpfs."""
    return os.path.lexists(path)


def read_packets(path: Path, n: int, timeout_s: float = 10.0) -> list[nonin.NoninPacket]:
    """Open ``path`` with pyserial (as the gateway would) and decode ``n`` Nonin packets."""
    s = nonin.SERIAL_SETTINGS
    port = serial.Serial(
        str(path),
        s.baudrate,
        bytesize=s.bytesize,
        parity=s.parity,
        stopbits=s.stopbits,
        timeout=0.01,
    )
    try:
        decoder = nonin.NoninDecoder()
        got: list[nonin.NoninPacket] = []
        deadline = time.monotonic() + timeout_s  # a safety net, not a speed assertion
        while len(got) < n:
            assert time.monotonic() < deadline, f"only {len(got)} packets in {timeout_s} s"
            got += decoder.feed(port.read(4096))
        return got
    finally:
        port.close()


async def test_nonin_pty_streams_packets_readable_by_pyserial(tmp_path: Path) -> None:
    sc = load_oximeter_scenario(SCENARIO_DIR / "oximeter_desat.toml")
    clock = ScaledClock(20)  # 30 packets = 10 s of device time = 0.5 s real
    async with NoninPtySimulator(sc, clock=clock, link_dir=tmp_path) as sim:
        assert sim.path == tmp_path / "usb-Nonin_OEM_III_NONIN-0017-if00"
        assert sim.path.is_symlink() and os.readlink(sim.path) == sim.pts_path
        packets = await asyncio.to_thread(read_packets, sim.path, 30)
        assert sim.counters.packets_sent >= 30
    assert not lexists(tmp_path / "usb-Nonin_OEM_III_NONIN-0017-if00")
    # The first whole packet read is some packet k; the rest follow it without a gap.
    wire = [nonin.encode_packet(p) for p in packets]
    first = next(k for k in range(3 * 600) if sim.sim.packet(k) == wire[0])
    assert wire == [sim.sim.packet(first + i) for i in range(len(wire))]
    for i, p in enumerate(packets):
        state = sim.model.value_at((first + i) / 3)
        sample = nonin.to_sample(p)
        assert sample.valid and sample.spo2 is not None
        assert abs(sample.spo2 - state.spo2) <= 2.5


def test_pty_simulator_needs_a_nonin_scenario(tmp_path: Path) -> None:
    sc = scenario(oximeter={"serial_no": "X", "protocol": "plx"})
    with pytest.raises(ScenarioError, match="only a Nonin"):
        NoninPtySimulator(sc, clock=ScaledClock(1), link_dir=tmp_path)
