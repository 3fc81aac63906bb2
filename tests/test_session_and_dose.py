"""Session tracking and dose check: pure functions of a message stream."""

from __future__ import annotations

import pytest

from devicegw.config import DoseRules
from devicegw.contract.vocabulary import Verdict
from devicegw.core.dose_check import assess
from devicegw.core.session_tracker import (
    FetchSessionRecord,
    FinishedSession,
    SessionFinished,
    SessionTracker,
    TrackerEvent,
)
from devicegw.core.vm1_pipeline import Vm1Pipeline
from drivers.vm1.messages import AlarmCode, DeviceState, EndReason, SessionRecord
from tests.session_stream import T0, ListSink, StreamBuilder, feed, one_device_config

RULES = DoseRules()
CONFIG = one_device_config()


def run(stream: StreamBuilder, tracker: SessionTracker | None = None) -> list[TrackerEvent]:
    tracker = tracker or SessionTracker()
    events: list[TrackerEvent] = []
    for rx in stream.out:
        events.extend(tracker.feed(rx))
    return events


def finished(events: list[TrackerEvent]) -> list[FinishedSession]:
    return [e.session for e in events if isinstance(e, SessionFinished)]


def complete_stream(minutes: float = 7.25) -> StreamBuilder:
    s = StreamBuilder()
    s.status(DeviceState.READY)
    s.start()
    s.nebulize(minutes * 60)
    s.end(EndReason.COMPLETE, residual=105, neb_ms=round(minutes * 60_000))
    return s


def test_complete_session_is_complete() -> None:
    [session] = finished(run(complete_stream()))
    a = assess(session, RULES)
    assert a.verdict is Verdict.COMPLETE
    assert a.reasons == ()
    assert session.duration_s == pytest.approx(435.0, abs=0.01)
    assert a.volumes.reservoir_drop_ml == pytest.approx(2.895)
    assert a.volumes.output_integral_ml == pytest.approx(2.9, abs=0.01)
    assert a.volumes.delivered_basis == "reservoir_drop"
    assert a.volumes.estimates_agree is True
    assert session.frames_lost == 0


def test_user_stop_at_half_is_partial() -> None:
    s = StreamBuilder()
    s.status(DeviceState.READY)
    s.start()
    s.nebulize(225)
    s.end(EndReason.USER_STOP, residual=1500, neb_ms=225_000)
    [session] = finished(run(s))
    a = assess(session, RULES)
    assert a.verdict is Verdict.PARTIAL
    assert "ended_by_user" in a.reasons
    assert "delivered_below_minimum" in a.reasons
    assert a.volumes.delivered_fraction == pytest.approx(0.5)


def test_two_minute_pause_is_recorded_and_complete() -> None:
    s = StreamBuilder()
    s.status(DeviceState.READY)
    s.start()
    s.nebulize(200)
    s.pause(120)
    s.nebulize(235)
    s.end(EndReason.COMPLETE, residual=105, neb_ms=435_000)
    [session] = finished(run(s))
    a = assess(session, RULES)
    assert a.verdict is Verdict.COMPLETE
    assert len(session.pauses) == 1
    assert session.pauses[0].start_s == pytest.approx(200.0, abs=0.01)
    assert session.pauses[0].duration_s == pytest.approx(120.0, abs=0.01)
    assert a.total_pause_s == pytest.approx(120.0, abs=0.01)
    assert a.nebulizing_s == pytest.approx(435.0)


def test_long_pauses_break_the_rule_but_dose_counts_as_deviation() -> None:
    s = StreamBuilder()
    s.status(DeviceState.READY)
    s.start()
    for _ in range(3):
        s.nebulize(145)
        s.pause(250)
    s.end(EndReason.COMPLETE, residual=105, neb_ms=435_000)
    a = assess(finished(run(s))[0], RULES)
    assert a.verdict is Verdict.DEVIATION
    assert "pause_above_maximum" in a.reasons


def test_fault_early_is_aborted() -> None:
    s = StreamBuilder()
    s.status(DeviceState.READY)
    s.start()
    s.nebulize(20)
    s.alarm(AlarmCode.OVER_TEMPERATURE, True)
    s.end(EndReason.FAULT, residual=2870, neb_ms=20_000)
    [session] = finished(run(s))
    a = assess(session, RULES)
    assert a.verdict is Verdict.ABORTED
    assert "ended_by_fault" in a.reasons
    assert "device_alarm" in a.reasons
    assert session.alarms[0].code == AlarmCode.OVER_TEMPERATURE
    assert session.alarms[0].cleared_s is None


def test_unknown_alarm_code_is_passed_on() -> None:
    s = StreamBuilder()
    s.status(DeviceState.READY)
    s.start()
    s.nebulize(10)
    s.alarm(0x0999, True)
    s.nebulize(10)
    s.alarm(0x0999, False)
    s.nebulize(415)
    s.end(EndReason.COMPLETE, residual=105, neb_ms=435_000)
    [session] = finished(run(s))
    assert session.alarms[0].code == 0x0999
    assert session.alarms[0].raised_s == pytest.approx(10.0, abs=0.01)
    assert session.alarms[0].cleared_s == pytest.approx(20.0, abs=0.01)


def test_estimates_disagreeing_are_flagged() -> None:
    s = StreamBuilder()
    s.status(DeviceState.READY)
    s.start()
    s.nebulize(435, rate=300)  # device says ~2.2 mL left as aerosol
    s.end(EndReason.COMPLETE, residual=105, neb_ms=435_000)  # level says 2.9 mL
    a = assess(finished(run(s))[0], RULES)
    assert a.volumes.estimates_agree is False
    assert "volume_estimates_disagree" in a.reasons


def test_lost_frames_and_gaps_are_counted() -> None:
    """Frame loss is counted once, by the stream decoder, for the event and health alike."""
    s = StreamBuilder()
    s.ident()
    complete = complete_stream()
    s.out.extend(complete.out)
    # Drop 50 OUTPUT frames (5 s) in the middle: seq gap and a telemetry gap.
    del s.out[1001:1051]
    sink = ListSink()
    pipeline = Vm1Pipeline(CONFIG.devices[0], CONFIG, sink)
    pipeline.link_up(T0)
    feed(pipeline, s)
    [record] = sink.records
    assert record.detail.link.frames_lost == 50 == pipeline.health.frames_lost
    assert record.detail.link.sample_gaps == 1
    assert record.detail.link.sample_gap_s == pytest.approx(5.1, abs=0.01)
    assert "telemetry_gap" in record.detail.reasons
    # Bridged linearly: the integral still agrees with the level drop.
    assert record.detail.volume.estimates_agree is True
    assert record.event.verdict is Verdict.COMPLETE


def test_device_uptime_wrap_is_unwrapped() -> None:
    s = StreamBuilder(start_ms=(1 << 32) - 60_000)
    s.status(DeviceState.READY)
    s.start()
    s.nebulize(435)
    s.end(EndReason.COMPLETE, residual=105, neb_ms=435_000)
    [session] = finished(run(s))
    assert session.duration_s == pytest.approx(435.0, abs=0.01)
    assert assess(session, RULES).verdict is Verdict.COMPLETE


def test_repeated_session_end_gives_one_session() -> None:
    s = complete_stream()
    s.out.append(s.out[-2])  # SESSION_END again
    assert len(finished(run(s))) == 1


def test_missed_end_is_fetched_from_the_device_log() -> None:
    s = StreamBuilder()
    s.status(DeviceState.READY)
    s.start()
    s.nebulize(200)
    tracker = SessionTracker()
    events = run(s, tracker)
    tracker.link_down(T0)
    # While the link was down the session ended; after reconnect the device is DONE.
    s2 = StreamBuilder(start_ms=s.t_ms + 300_000)
    s2.status(DeviceState.DONE, 105)
    s2.status(DeviceState.DONE, 105)
    tracker.link_up(T0)
    events = run(s2, tracker)
    assert [e for e in events if isinstance(e, FetchSessionRecord)] == [FetchSessionRecord(42)]
    record = SessionRecord(
        session_no=42,
        start_wall_s=1_795_507_200,
        fill_ul=3000,
        reason=EndReason.COMPLETE,
        neb_ms=435_000,
        cum_ul=2900,
        residual_ul=105,
        end_wall_s=1_795_507_200 + 435,
    )
    from devicegw.core.session_tracker import Rx

    [fin] = finished(tracker.feed(Rx(msg=record, utc=T0, mono=0.0)))
    a = assess(fin, RULES)
    assert fin.data_source == "live"
    assert "session_end_missed" in a.reasons
    assert "link_interrupted" in a.reasons
    assert fin.duration_s == pytest.approx(435.0)
    assert a.verdict is Verdict.COMPLETE


def test_unknown_session_end_is_reconciled_from_device_log() -> None:
    s = StreamBuilder()
    s.end(EndReason.COMPLETE, residual=105, neb_ms=435_000, session_no=7)
    tracker = SessionTracker()
    events = run(s, tracker)
    assert FetchSessionRecord(7) in events
    record = SessionRecord(
        session_no=7,
        start_wall_s=0,
        fill_ul=3000,
        reason=EndReason.COMPLETE,
        neb_ms=435_000,
        cum_ul=2890,
        residual_ul=105,
        end_wall_s=0,
    )
    from devicegw.core.session_tracker import Rx

    [fin] = finished(tracker.feed(Rx(msg=record, utc=T0, mono=0.0)))
    a = assess(fin, RULES)
    assert fin.data_source == "device_log"
    assert "reconciled_from_device_log" in a.reasons
    assert "duration_unknown" in a.reasons
    assert a.verdict is Verdict.COMPLETE
    assert a.volumes.output_integral_ml is None
    assert a.volumes.estimates_agree is True  # level drop vs the device's own total


def test_a_device_flooding_output_is_thinned_to_the_icds_fastest_rate() -> None:
    """OUTPUT 1,000 times a second (20x the ICD's 50 Hz maximum, SET_RATE) for 7.25 min:
    the session keeps at most ~66 samples a second, so its memory is bounded by time,
    not by what the link can carry (issue 13); the dose is assessed as before."""
    s = StreamBuilder()
    s.status(DeviceState.READY)
    s.start()
    s.nebulize(435, hz=1000)
    s.end(EndReason.COMPLETE, residual=105, neb_ms=435_000)
    [session] = finished(run(s))
    assert len(session.sample_times_s) <= 435 * 67
    assert len(session.sample_times_s) >= 435 * 50
    a = assess(session, RULES)
    assert a.verdict is Verdict.COMPLETE
    assert a.volumes.output_integral_ml == pytest.approx(2.9, abs=0.01)


def test_output_at_the_icds_50_hz_is_kept_whole() -> None:
    s = StreamBuilder()
    s.status(DeviceState.READY)
    s.start()
    s.nebulize(60, hz=50)
    s.end(EndReason.COMPLETE, residual=2600, neb_ms=60_000)
    [session] = finished(run(s))
    assert len(session.sample_times_s) == 60 * 50
