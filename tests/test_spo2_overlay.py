"""SpO2 safety overlay: baseline, desaturation events, alerts, summaries, all in stream time."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from devicegw.config import Spo2Rules
from devicegw.contract.spo2 import (
    OximeterRef,
    PostDoseSafetySummary,
    SafetyAlert,
    Spo2Summary,
)
from devicegw.core.spo2_monitor import (
    PostDoseSummary,
    SafetyAlertCleared,
    SafetyAlertRaised,
    SessionSpo2Summary,
    Spo2Context,
    Spo2Event,
    Spo2Monitor,
    unavailable_summary,
)
from drivers.oximeter.sample import OximeterSample, QualityFlag

CID = uuid.UUID("0b4f6a0e-7c51-5f4e-9d7e-3f1f7a2b9c10")
OXI = OximeterRef(device_id="oxi-b01", protocol="nonin", model="OEM III", serial_no="501234")
CTX = Spo2Context(
    gateway_id="gw-1", subject_id="S-0001", bed="B01", device_id="neb-b01", oximeter=OXI
)
START_UTC = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)


def sample(spo2: float | None, pulse: float | None = 80.0, *flags: QualityFlag) -> OximeterSample:
    return OximeterSample(spo2=spo2, pulse_bpm=pulse, quality=frozenset(flags), source="test")


class Run:
    """A monitor plus every event it returned, with helpers to feed 1 Hz streams."""

    def __init__(self, rules: Spo2Rules | None = None, context: Spo2Context = CTX) -> None:
        self.m = Spo2Monitor(rules or Spo2Rules(), context)
        self.events: list[Spo2Event] = []

    def feed(self, t: float, s: OximeterSample) -> None:
        self.events += self.m.feed(t, s)

    def values(
        self, t0: float, t1: float, value: float | Callable[[float], float], hz: float = 1.0
    ) -> None:
        """Valid samples at ``hz`` over [t0, t1)."""
        n = round((t1 - t0) * hz)
        for i in range(n):
            t = t0 + i / hz
            self.feed(t, sample(value(t) if callable(value) else value))

    def start(self, t: float, cid: uuid.UUID = CID, utc: datetime | None = START_UTC) -> None:
        self.events += self.m.session_started(t, cid, start_utc=utc)

    def end(self, t: float) -> None:
        self.events += self.m.session_ended(t)

    def tick(self, t: float) -> None:
        self.events += self.m.tick(t)

    def of(self, cls: type[Any]) -> list[Any]:
        return [e for e in self.events if isinstance(e, cls)]

    @property
    def summary(self) -> Spo2Summary:
        [s] = self.of(SessionSpo2Summary)
        summary: Spo2Summary = s.summary
        return summary

    @property
    def post(self) -> PostDoseSafetySummary:
        [s] = self.of(PostDoseSummary)
        summary: PostDoseSafetySummary = s.summary
        return summary


def dose(
    baseline: float,
    during: Callable[[float], float],
    *,
    pre_s: float = 120,
    session_s: float = 120,
    rules: Spo2Rules | None = None,
) -> Run:
    """Baseline samples before t=1000, a session [1000, 1000+session_s) with ``during(offset)``."""
    r = Run(rules)
    r.values(1000 - pre_s, 1000, baseline)
    r.start(1000)
    r.values(1000, 1000 + session_s, lambda t: during(t - 1000))
    r.end(1000 + session_s)
    return r


def dip(base: float, low: float, at: float, length: float) -> Callable[[float], float]:
    return lambda off: low if at <= off < at + length else base


# --------------------------------------------------------------------------- baseline


def test_baseline_is_the_median_of_valid_samples_in_the_pre_window() -> None:
    r = Run()
    r.values(700, 880, 99.0)  # older than the 120 s window: ignored
    cycle = (95.0, 96.0, 97.0, 96.0)
    for i, t in enumerate(range(880, 1000)):
        r.feed(t, sample(cycle[i % 4], 70.0 + i % 3))
        r.feed(t + 0.5, sample(60.0, 200.0, QualityFlag.ARTIFACT))  # invalid: not in the baseline
    r.start(1000)
    r.values(1000, 1060, 96.0)
    r.end(1060)
    b = r.summary.baseline
    assert (b.source, b.spo2, b.pulse_bpm, b.n_samples) == ("pre_session", 96.0, 71.0, 120)
    assert "baseline_first_minute" not in r.summary.flags


def test_baseline_falls_back_to_the_first_minute_flagged() -> None:
    r = Run()
    r.feed(990, sample(70.0, 80.0, QualityFlag.NO_FINGER))  # only invalid before the start
    r.start(1000)
    r.values(1000, 1060, lambda t: 95.0 if int(t) % 2 else 96.0)
    r.values(1060, 1200, 95.0)
    r.end(1200)
    b = r.summary.baseline
    assert (b.source, b.spo2, b.n_samples) == ("first_minute", 95.5, 60)
    assert "baseline_first_minute" in r.summary.flags


def test_relative_criterion_starts_once_the_first_minute_baseline_is_known() -> None:
    r = Run()
    r.start(1000)
    r.values(1000, 1060, 96.0)
    r.values(1060, 1080, 91.0)  # 5 below the first-minute baseline, not below 90
    r.values(1080, 1120, 96.0)
    r.end(1120)
    [ev] = r.summary.session.desaturations
    assert (ev.kind, ev.start_offset_s, ev.duration_s) == ("relative_drop", 60.0, 20.0)


def test_baseline_unavailable_still_detects_absolute_desaturation() -> None:
    r = Run()
    r.start(1000)
    r.feed(1010, sample(None, None, QualityFlag.PROBE_UNPLUGGED))
    r.values(1070, 1090, 85.0)  # after the first minute: no baseline at all
    r.values(1090, 1110, 94.0)
    r.end(1110)
    s = r.summary
    assert s.baseline.source == "unavailable" and s.baseline.spo2 is None
    assert "baseline_unavailable" in s.flags
    [ev] = s.session.desaturations
    assert ev.kind == "absolute_below_90"
    [raised] = r.of(SafetyAlertRaised)
    assert raised.alert.baseline_source == "unavailable" and raised.alert.baseline_spo2 is None


# --------------------------------------------------------------------------- desaturation


def test_relative_drop_95_to_90_for_15_s_is_an_event() -> None:
    r = dose(95.0, dip(95.0, 90.0, at=30, length=15))
    s = r.summary
    assert s.spo2_monitoring == "monitored" and s.unavailable_reason is None
    [ev] = s.session.desaturations
    assert ev.kind == "relative_drop"  # 90 is a 5-point drop but not below 90
    assert (ev.start_offset_s, ev.duration_s, ev.nadir_spo2, ev.nadir_offset_s) == (
        30.0,
        15.0,
        90.0,
        30.0,
    )
    assert not ev.ongoing and ev.invalid_gap_s == 0.0
    assert s.alerts_raised == 1
    assert s.session.time_below_threshold_s == 0.0


def test_absolute_below_90_and_both() -> None:
    r = dose(92.0, dip(92.0, 89.0, at=20, length=12))
    [ev] = r.summary.session.desaturations
    assert ev.kind == "absolute_below_90"  # only 3 below baseline
    assert r.summary.session.time_below_threshold_s == 12.0

    r = dose(95.0, dip(95.0, 88.0, at=20, length=12))
    [ev] = r.summary.session.desaturations
    assert ev.kind == "both"


def test_kind_becomes_both_when_a_relative_drop_deepens_below_90() -> None:
    r = dose(95.0, lambda off: 91.0 if 20 <= off < 35 else 87.0 if 35 <= off < 40 else 95.0)
    [raised] = r.of(SafetyAlertRaised)
    assert raised.alert.kind == "relative_drop"  # what was known when it was raised
    [ev] = r.summary.session.desaturations
    assert (ev.kind, ev.duration_s, ev.nadir_spo2, ev.nadir_offset_s) == ("both", 20.0, 87.0, 35.0)
    [cleared] = r.of(SafetyAlertCleared)
    assert cleared.alert.kind == "both"


def test_a_dip_shorter_than_the_sustain_time_is_no_event() -> None:
    r = dose(95.0, dip(95.0, 85.0, at=30, length=10))  # low samples at 30..39: 9 s apart
    assert r.summary.session.desaturations == []
    assert r.of(SafetyAlertRaised) == [] and r.summary.alerts_raised == 0
    assert r.summary.session.time_below_threshold_s == 10.0


def test_alert_raised_exactly_at_sustain_and_cleared_after_clear_s() -> None:
    r = dose(95.0, dip(95.0, 88.0, at=30, length=15))  # low 1030..1044, normal from 1045
    [raised] = r.of(SafetyAlertRaised)
    [cleared] = r.of(SafetyAlertCleared)
    assert raised.t_s == 1040.0  # 10 s after the first low sample, on the sample that shows it
    assert cleared.t_s == 1055.0  # recovery seen from 1045, for 10 s
    a = raised.alert
    assert (a.state, a.clear_reason, a.phase, a.offset_s) == ("raised", None, "session", 40.0)
    assert (a.spo2, a.nadir_spo2, a.baseline_spo2, a.baseline_source) == (
        88.0,
        88.0,
        95.0,
        "pre_session",
    )
    assert (a.desaturation_start_offset_s, a.duration_s) == (30.0, 10.0)
    assert a.utc == START_UTC + timedelta(seconds=40)
    assert (a.correlation_id, a.subject_id, a.bed, a.device_id, a.oximeter_device_id) == (
        CID,
        "S-0001",
        "B01",
        "neb-b01",
        "oxi-b01",
    )
    c = cleared.alert
    assert (c.state, c.clear_reason, c.offset_s, c.duration_s) == (
        "cleared",
        "recovered",
        55.0,
        15.0,
    )
    assert c.alert_id == a.alert_id and c.event_id != a.event_id
    # Output order: raised before cleared, both before the summary.
    kinds = [type(e) for e in r.events]
    assert kinds == [SafetyAlertRaised, SafetyAlertCleared, SessionSpo2Summary]


def test_custom_rules_change_the_decision_times() -> None:
    rules = Spo2Rules(sustain_s=5, clear_s=3, drop_points=3)
    r = dose(95.0, dip(95.0, 92.0, at=30, length=8), rules=rules)
    [raised] = r.of(SafetyAlertRaised)
    [cleared] = r.of(SafetyAlertCleared)
    assert (raised.t_s, cleared.t_s) == (1035.0, 1041.0)
    assert r.summary.rules.sustain_s == 5


def test_a_low_reading_during_recovery_restarts_the_clear_time() -> None:
    def during(off: float) -> float:
        if 30 <= off < 45 or off == 50:
            return 86.0
        return 95.0

    r = dose(95.0, during)
    [cleared] = r.of(SafetyAlertCleared)
    assert cleared.t_s == 1061.0  # recovery 1045-1049, low at 1050, recovery again from 1051
    [ev] = r.summary.session.desaturations
    assert ev.duration_s == 21.0


def test_same_stream_gives_the_same_events() -> None:
    def build() -> list[Spo2Event]:
        return dose(95.0, dip(95.0, 87.0, at=10, length=30)).events

    assert build() == build()


# --------------------------------------------------------------------------- artefacts and gaps


def test_artefact_heavy_stream_gives_no_false_desaturation() -> None:
    gating = (QualityFlag.ARTIFACT, QualityFlag.LOW_PERFUSION)
    r = Run()
    r.values(880, 1000, 96.0)
    r.start(1000)
    n_bad = 0
    for i in range(600):  # 5 Hz for 120 s, 40 % flagged with bogus low values
        t = 1000 + i / 5
        if i % 5 in (1, 3):
            r.feed(t, sample(62.0 + i % 20, 150.0, gating[i % 2]))
            n_bad += 1
        else:
            r.feed(t, sample(96.0, 78.0))
    r.end(1120)
    s = r.summary.session
    assert s.desaturations == [] and r.of(SafetyAlertRaised) == []
    assert s.samples_excluded == n_bad == 240 and s.samples_total == 600
    assert s.excluded_by_flag == {"artifact": 120, "low_perfusion": 120}
    assert (s.nadir_spo2, s.mean_spo2, s.time_below_threshold_s) == (96.0, 96.0, 0.0)
    assert s.coverage_pct == 60.0  # each valid sample holds until the next (flagged) one


def test_artefact_burst_longer_than_the_gap_resets_a_pending_run() -> None:
    r = Run()
    r.values(880, 1000, 96.0)
    r.start(1000)
    r.values(1030, 1036, 85.0)  # 6 s low
    for i in range(20):  # 10 s of artefact, then 6 s more low: never 10 s shown by data
        r.feed(1036 + i / 2, sample(50.0, 80.0, QualityFlag.ARTIFACT))
    r.values(1046, 1052, 85.0)
    r.values(1052, 1100, 96.0)
    r.end(1100)
    assert r.of(SafetyAlertRaised) == [] and r.summary.session.desaturations == []


def test_short_artefact_inside_a_run_is_bridged() -> None:
    r = Run()
    r.values(880, 1000, 96.0)
    r.start(1000)
    r.values(1030, 1034, 85.0)
    for i in range(6):  # 1034.0-1036.5: under max_sample_gap_s since the last valid sample
        r.feed(1034 + i / 2, sample(40.0, 80.0, QualityFlag.ARTIFACT))
    r.values(1037, 1045, 85.0)
    r.values(1045, 1100, 96.0)
    r.end(1100)
    [raised] = r.of(SafetyAlertRaised)
    assert raised.t_s == 1040.0
    [ev] = r.summary.session.desaturations
    assert ev.duration_s == 15.0 and ev.invalid_gap_s == 3.0  # 1034-1037 held by artefact


def test_long_invalid_gap_inside_a_raised_event_neither_ends_it_nor_fakes_recovery() -> None:
    r = Run()
    r.values(880, 1000, 96.0)
    r.start(1000)
    r.values(1030, 1045, 85.0)  # raised at 1040
    r.values(1045, 1048, 96.0)  # recovery starts ...
    for i in range(30):  # ... then 30 s of no finger: the recovery must start over
        r.feed(1048 + i, sample(None, None, QualityFlag.NO_FINGER))
    r.values(1078, 1100, 96.0)
    r.end(1100)
    [cleared] = r.of(SafetyAlertCleared)
    assert cleared.t_s == 1088.0
    [ev] = r.summary.session.desaturations
    assert ev.duration_s == 48.0  # 1030 to the first sample of the recovery that counted
    assert ev.invalid_gap_s == 30.0  # 1048-1078: nothing valid
    assert r.summary.session.excluded_by_flag == {"no_finger": 30}


def test_coverage_with_a_gap() -> None:
    r = Run()
    r.start(1000)
    r.values(1000, 1040, 96.0)
    r.values(1070, 1100, 96.0)  # silence 1040-1070
    r.end(1100)
    s = r.summary.session
    # 39 s of 1-s holds + 5 s (capped hold of the sample at 1039) + 30 s = 74 s of 100 s.
    assert s.coverage_pct == 74.0
    assert (s.samples_total, s.samples_valid, s.samples_excluded) == (70, 70, 0)


def test_pre_session_sample_covers_the_start() -> None:
    r = Run()
    r.values(900, 1000, 96.0, hz=2)
    r.start(1000)
    r.values(1000.25, 1010.25, 96.0, hz=2)
    r.end(1010)
    assert r.summary.session.coverage_pct == 100.0


# --------------------------------------------------------------------------- post-dose window


def test_post_dose_summary_at_the_end_of_the_observation_window() -> None:
    rules = Spo2Rules(observation_window_s=600)
    r = dose(95.0, lambda off: 95.0, session_s=300, rules=rules)
    [s] = r.of(SessionSpo2Summary)
    assert s.t_s == 1300.0 and s.correlation_id == CID
    r.values(1300, 1400, 95.0)
    r.values(1400, 1420, 87.0)  # desaturation in the observation window: alerts continue
    r.values(1420, 1500, 95.0)
    r.tick(1899.9)
    assert r.of(PostDoseSummary) == []
    r.tick(1900.0)
    [post] = r.of(PostDoseSummary)
    assert post.t_s == 1900.0 and post.correlation_id == CID
    p = post.summary
    assert (p.event_type, p.correlation_id, p.event_id) == (
        "post_dose_safety_summary",
        CID,
        uuid.uuid5(CID, "post_dose_safety_summary"),
    )
    assert (p.session_end_offset_s, p.observation_end_offset_s, p.observation_truncated) == (
        300.0,
        900.0,
        False,
    )
    assert p.session_start_utc == START_UTC
    [raised] = r.of(SafetyAlertRaised)
    assert raised.alert.phase == "observation" and raised.t_s == 1410.0
    [ev] = p.observation.desaturations
    assert ev.start_offset_s == 400.0 and ev.kind == "both"
    assert p.session_and_observation.desaturations == p.observation.desaturations
    assert p.session_and_observation.samples_valid == 300 + 200  # the pre-session ones are not
    assert p.observation.start_offset_s == 300.0 and p.observation.end_offset_s == 900.0
    # Samples at 1300-1499, the last one holding 5 s: 204 s of the 600 s window.
    assert p.observation.coverage_pct == round(100 * 204 / 600, 1)
    assert r.m.correlation_id is None  # nothing monitored any more
    r.tick(5000)
    assert len(r.of(PostDoseSummary)) == 1


def test_alert_still_raised_when_the_window_closes_is_closed_as_monitoring_ended() -> None:
    rules = Spo2Rules(observation_window_s=60)
    r = dose(95.0, lambda off: 95.0, session_s=60, rules=rules)
    r.values(1060, 1100, 86.0)
    r.tick(1120)
    [cleared] = r.of(SafetyAlertCleared)
    assert (cleared.t_s, cleared.alert.clear_reason, cleared.alert.spo2) == (
        1120.0,
        "monitoring_ended",
        None,
    )
    [ev] = r.post.observation.desaturations
    assert ev.ongoing and ev.duration_s == 60.0 and ev.invalid_gap_s == 16.0  # 1104-1120
    assert [type(e) for e in r.events][-2:] == [SafetyAlertCleared, PostDoseSummary]


def test_zero_observation_window_closes_with_the_session() -> None:
    r = dose(95.0, lambda off: 95.0, rules=Spo2Rules(observation_window_s=0))
    assert [type(e) for e in r.events] == [SessionSpo2Summary, PostDoseSummary]
    assert r.post.observation.coverage_pct == 0.0


def test_a_new_session_truncates_the_previous_observation_window() -> None:
    r = dose(95.0, lambda off: 95.0)
    r.values(1120, 1200, 95.0)
    other = uuid.uuid4()
    r.start(1200, other)
    [post] = r.of(PostDoseSummary)
    assert post.correlation_id == CID and post.summary.observation_truncated
    assert "observation_truncated" in post.summary.flags
    assert r.m.correlation_id == other
    r.values(1200, 1260, 95.0)
    r.end(1260)
    second = r.of(SessionSpo2Summary)[-1].summary
    assert second.correlation_id == other and second.baseline.source == "pre_session"


def test_missing_session_end_is_flagged_when_the_next_session_starts() -> None:
    r = Run()
    r.values(880, 1000, 95.0)
    r.start(1000)
    r.values(1000, 1100, 95.0)
    r.start(1100, uuid.uuid4())
    [s] = r.of(SessionSpo2Summary)
    assert "session_end_missed" in s.summary.flags
    assert r.post.observation_truncated


# --------------------------------------------------------------------------- unavailable


def test_session_without_samples_is_recorded_unavailable() -> None:
    r = Run()
    r.start(1000)
    r.end(1300)
    s = r.summary
    assert (s.spo2_monitoring, s.unavailable_reason) == ("unavailable", "no_samples")
    assert s.baseline.source == "unavailable" and s.session.coverage_pct == 0.0
    assert s.session.nadir_spo2 is None and s.session.mean_spo2 is None


def test_unavailable_reasons() -> None:
    r = Run()
    r.start(1000)
    for i in range(60):
        r.feed(1000 + i, sample(None, None, QualityFlag.NO_FINGER))
    r.end(1060)
    assert r.summary.unavailable_reason == "no_valid_samples"

    r = Run()
    r.events += r.m.link_down(990)
    r.start(1000)
    r.end(1060)
    assert r.summary.unavailable_reason == "oximeter_disconnected"

    r = Run(context=Spo2Context("gw-1", "S-0001", "B01", "neb-b01", oximeter=None))
    r.start(1000)
    r.end(1060)
    assert r.summary.unavailable_reason == "no_oximeter_assigned"
    assert r.summary.oximeter is None

    s = unavailable_summary(CID, "no_oximeter_assigned", Spo2Rules(), session_s=300)
    assert (s.spo2_monitoring, s.session.end_offset_s, s.baseline.source) == (
        "unavailable",
        300.0,
        "unavailable",
    )


def test_link_drop_mid_session_is_flagged_and_ends_the_hold() -> None:
    r = Run()
    r.values(880, 1000, 95.0)
    r.start(1000)
    r.values(1000, 1050, 95.0)
    r.events += r.m.link_down(1050.5)
    r.events += r.m.link_up(1080)
    r.values(1080, 1100, 95.0)
    r.end(1100)
    s = r.summary
    # 30 s of a 100 s session without the oximeter: below min_coverage_pct (80 %).
    assert s.spo2_monitoring == "monitoring_inadequate" and "link_interrupted" in s.flags
    assert s.session.coverage_pct == 70.5


def test_between_doses_times_going_backwards_are_clamped_and_counted() -> None:
    """The monitor's between-dose path (no dose open) clamps and counts like the dose path,
    and a tick's time is kept the same way."""
    r = Run()
    r.feed(1010, sample(95.0))
    r.feed(1005, sample(94.0))
    r.tick(1001)
    assert r.m.out_of_order == 2
    assert [t for t, _, _ in r.m._ring] == [1010, 1010]  # the late sample held at 1010


def test_the_baseline_ring_holds_only_the_window_whatever_the_gaps() -> None:
    """One sample in, one out once the window is full; a gap drops every sample it passed."""
    rules = Spo2Rules.model_validate({"baseline_window_s": 120.0})
    r = Run(rules)
    r.values(0, 600, 95.0)  # 1 Hz for 10 minutes, no dose
    assert [t for t, _, _ in r.m._ring] == [float(t) for t in range(479, 600)]
    r.feed(700, sample(96.0))  # 100 s without a sample: most of the window goes
    assert [t for t, _, _ in r.m._ring] == [float(t) for t in range(580, 600)] + [700.0]
    r.feed(1000, sample(97.0))  # longer than the window: only the newest is left
    assert [t for t, _, _ in r.m._ring] == [1000.0]
    r.feed(1001, sample(None))  # an invalid sample is not kept
    assert [t for t, _, _ in r.m._ring] == [1000.0]


def test_times_going_backwards_are_clamped_and_counted() -> None:
    r = Run()
    r.start(1000)
    r.feed(1010, sample(95.0))
    r.feed(1005, sample(95.0))
    assert r.m.out_of_order == 1


# --------------------------------------------------------------------------- payloads and rules


def test_payloads_round_trip_and_name_no_arm() -> None:
    r = dose(95.0, dip(95.0, 87.0, at=30, length=20), rules=Spo2Rules(observation_window_s=60))
    r.tick(2000)
    payloads = [r.summary, r.post] + [e.alert for e in r.of(SafetyAlertRaised)]
    payloads += [e.alert for e in r.of(SafetyAlertCleared)]
    for p in payloads:
        wire = p.model_dump_json()
        assert type(p).model_validate_json(wire) == p
        assert json.loads(wire)["schema_version"] == "2.0"
    for model in (Spo2Summary, SafetyAlert, PostDoseSafetySummary):
        text = json.dumps(model.model_json_schema())
        for key in re.findall(r'"([a-z_0-9]+)":', text):
            assert not re.search(r"(^|_)arms?(_|$)|treatment|placebo|allocation|active", key), key


def test_rules_are_validated() -> None:
    with pytest.raises(ValidationError):
        Spo2Rules(sustain_s=-1)
    with pytest.raises(ValidationError):
        Spo2Rules.model_validate({"baseline_window_s": 60, "arm": "A"})
    assert Spo2Rules().model_dump() == {
        "baseline_window_s": 120.0,
        "baseline_fallback_s": 60.0,
        "observation_window_s": 1800.0,
        "drop_points": 4.0,
        "absolute_threshold": 90.0,
        "sustain_s": 10.0,
        "clear_s": 10.0,
        "max_sample_gap_s": 5.0,
        "baseline_min_valid_s": 30.0,
        "min_coverage_pct": 80.0,
    }


# --------------------------------------------------------------------------- property

BASE_FLAGS = st.sampled_from(
    [QualityFlag.ARTIFACT, QualityFlag.LOW_PERFUSION, QualityFlag.NO_FINGER, QualityFlag.SEARCHING]
)


@st.composite
def flagged_low_streams(draw: st.DrawFn) -> list[tuple[float, OximeterSample]]:
    """Valid samples within 3 points of each other (never low); every low value flagged."""
    out: list[tuple[float, OximeterSample]] = []
    t = 0.0
    for _ in range(draw(st.integers(1, 300))):
        t += draw(st.sampled_from([0.01, 0.33, 1.0, 2.0, 7.0]))
        if draw(st.booleans()):
            out.append((t, sample(float(draw(st.integers(96, 99))), 80.0)))
        else:
            value = draw(st.one_of(st.none(), st.floats(0, 100, allow_nan=False)))
            out.append((t, sample(value, draw(st.none() | st.just(80.0)), draw(BASE_FLAGS))))
    return out


def feed_all(r: Run, items: Iterable[tuple[float, OximeterSample]], offset: float) -> None:
    for t, s in items:
        r.feed(offset + t, s)


@settings(max_examples=40, deadline=None)
@given(
    pre=flagged_low_streams(),
    during=flagged_low_streams(),
    after=flagged_low_streams(),
)
def test_flagged_low_values_never_make_an_event(
    pre: list[tuple[float, OximeterSample]],
    during: list[tuple[float, OximeterSample]],
    after: list[tuple[float, OximeterSample]],
) -> None:
    r = Run(Spo2Rules(observation_window_s=120))
    feed_all(r, pre, 0.0)
    r.start(2000)
    feed_all(r, during, 2000)
    r.end(3000)
    feed_all(r, after, 3000)
    r.tick(9000)
    assert not r.of(SafetyAlertRaised) and not r.of(SafetyAlertCleared)
    assert r.summary.session.desaturations == []
    assert r.post.session_and_observation.desaturations == []
    excluded = sum(not s.valid for t, s in during if t < 1000)
    assert r.summary.session.samples_excluded == excluded


# --------------------------------------------------------------------------- adequacy (issue 10)


def test_a_low_baseline_alerts_on_a_drop_not_for_standing_still() -> None:
    """Baseline 88 %: below the absolute threshold all session long, no alert; a drop is one."""
    still = dose(88.0, lambda off: 88.0)
    assert still.of(SafetyAlertRaised) == []
    assert "low_baseline" in still.summary.flags
    assert still.summary.baseline.spo2 == 88.0
    dropped = dose(88.0, dip(88.0, 83.0, at=30, length=30))
    [raised] = dropped.of(SafetyAlertRaised)
    assert raised.alert.kind == "relative_drop"


def test_a_baseline_needs_enough_valid_data() -> None:
    """10 s of valid samples before the start is not a baseline (30 s needed): first minute."""
    r = dose(95.0, lambda off: 96.0, pre_s=10)
    assert r.summary.baseline.source == "first_minute"
    assert {"baseline_pre_session_inadequate", "baseline_first_minute"} <= set(r.summary.flags)
    none = Run()
    none.values(990, 1000, 95.0)
    none.start(1000)
    none.values(1000, 1020, 95.0)  # 20 s in the first minute, then nothing valid
    for t in range(1020, 1120):
        none.feed(t, sample(None, None, QualityFlag.NO_FINGER))
    none.end(1120)
    assert none.summary.baseline.source == "unavailable"
    assert "baseline_unavailable" in none.summary.flags


def test_a_session_mostly_without_valid_data_is_monitoring_inadequate() -> None:
    r = Run()
    r.values(880, 1000, 95.0)
    r.start(1000)
    r.values(1000, 1030, 95.0)
    for t in range(1030, 1120):
        r.feed(t, sample(95.0, 80.0, QualityFlag.ARTIFACT))
    r.end(1120)
    assert r.summary.spo2_monitoring == "monitoring_inadequate"
    assert r.summary.unavailable_reason is None
    assert r.summary.session.coverage_pct < 80.0
    adequate = dose(95.0, lambda off: 95.0)
    assert adequate.summary.spo2_monitoring == "monitored"


def test_alert_time_without_valid_data_is_in_the_summary() -> None:
    """A raised alert whose SpO2 then went unobserved for a while says so at the top."""
    r = Run(Spo2Rules(observation_window_s=0))
    r.values(880, 1000, 95.0)
    r.start(1000)
    r.values(1000, 1030, 95.0)
    r.values(1030, 1050, 85.0)  # raised after 10 s
    for t in range(1050, 1080):  # 30 s with the sensor off, the SpO2 unknown
        r.feed(t, sample(None, None, QualityFlag.NO_FINGER))
    r.values(1080, 1120, 95.0)
    r.end(1120)
    stats = r.summary.session
    [desat] = stats.desaturations
    assert desat.invalid_gap_s > 0
    assert stats.alert_time_without_valid_data_s == desat.invalid_gap_s


def test_plx_readings_from_device_storage_are_not_live_samples() -> None:
    """A PLX spot-check flagged 'from measurement storage' is excluded, counted by its flag."""
    r = Run()
    r.values(880, 1000, 95.0)
    r.start(1000)
    r.values(1000, 1060, 95.0)
    r.feed(1060.5, sample(70.0, 80.0, QualityFlag.FROM_STORAGE))  # an old stored reading
    r.values(1061, 1120, 95.0)
    r.end(1120)
    assert r.of(SafetyAlertRaised) == []
    assert r.summary.session.excluded_by_flag == {"from_storage": 1}
    assert r.summary.session.nadir_spo2 == 95.0


@settings(max_examples=300, deadline=None)
@given(
    steps=st.lists(
        st.one_of(
            st.sampled_from([0.0, -0.0, 0.33, 5.0, -0.1, 7.0]),
            st.floats(min_value=-2.0, max_value=12.0, allow_nan=False),
        ),
        min_size=1,
        max_size=60,
    ),
    tail=st.floats(min_value=-2.0, max_value=12.0, allow_nan=False),
    start=st.sampled_from([0.0, 86_400.5, 1.0e6 + 1 / 3]),
)
def test_baseline_coverage_is_the_reference_sum(
    steps: list[float], tail: float, start: float
) -> None:
    """_covered_s was rewritten for speed (a baseline's ~900 samples per session start and
    end); its value decides whether a baseline exists, so it must equal the plain sum
    bit for bit."""
    m = Spo2Monitor(Spo2Rules(), CTX)
    gap = m.rules.max_sample_gap_s
    times = []
    t = start
    for step in steps:
        t += step
        times.append(t)
    values = [(x, 97.0, 70.0) for x in times]
    until = t + tail
    ends = [*times[1:], until]
    reference = sum(min(max(0.0, b - a), gap) for a, b in zip(times, ends, strict=True))
    got = m._covered_s(values, until)
    assert repr(got) == repr(reference)
