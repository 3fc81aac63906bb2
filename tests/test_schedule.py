"""The dosing schedule in virtual time (issue 11): ten doses over five days, BID.

Real parts: the gateway store (SQLite), the audit trail, the assignments, the
ScheduleBook, and an MqttPublisher whose outbox receives the ``dose_missed``
notices (not connected: what it would publish is read from the outbox). The
pipeline is fed the serial frames a VM-1 sends; a ManualClock moves the ward
through five days in a second.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from devicegw.config import BrokerSettings, ScheduleSettings
from devicegw.contract.payloads import DoseMissed
from devicegw.contract.topics import Topics
from devicegw.mqtt.publisher import MqttPublisher
from devicegw.runtime.assignment_commands import AssignRequest, AssignResult
from devicegw.runtime.schedule_watch import ScheduleWatch
from drivers.clock import ManualClock
from drivers.vm1.messages import DeviceState, EndReason
from tests.session_stream import T0, device_log_record
from tests.test_assignment_attribution import Ward

HOUR = 3600.0
BID = ScheduleSettings()  # 2 a day for 5 days, 12 h apart, +- 3 h


class ScheduledWard(Ward):
    """A ward bed with the trial's schedule and the gateway's schedule task."""

    def __init__(self, tmp_path: Path, clock: ManualClock | None = None) -> None:
        super().__init__(tmp_path, schedule=BID, clock=clock)
        assert self.schedule is not None
        self.publisher = MqttPublisher(
            BrokerSettings(),
            client_id="test",
            clock=self.clock,
            store=self.store,
            status_topic="t/status",
            status_payload=lambda online: b"{}",
        )
        self.watch = ScheduleWatch(
            self.config,
            self.schedule,
            self.service,
            self.publisher,
            Topics("devicegw/v2", "site-042", "gw1"),
            self.clock,
        )
        self.b.ident()
        self.b.status(DeviceState.READY)
        self.send()

    def dose_at(self, hours: float, *, stop_early: bool = False, session_no: int) -> None:
        """A session starting ``hours`` after T0 (complete, or stopped after 20 s)."""
        self.at(hours * HOUR)
        if stop_early:
            wall = int(T0.timestamp() + hours * HOUR)
            self.b.start(session_no=session_no, wall_s=wall)
            self.b.nebulize(20)
            self.b.end(EndReason.USER_STOP, residual=2870, neb_ms=20_000, session_no=session_no)
            self.send()
        else:
            self.session(seconds=300, session_no=session_no)

    def missed(self) -> list[dict[str, Any]]:
        rows = self.store.conn.execute(
            "SELECT payload FROM outbox WHERE kind = 'dose-missed' ORDER BY id"
        ).fetchall()
        return [json.loads(r[0]) for r in rows]


@pytest.fixture
def ward(tmp_path: Path) -> Iterator[ScheduledWard]:
    w = ScheduledWard(tmp_path)  # bed B01, CVD-042-0017 from the config
    yield w
    w.close()


def test_ten_doses_over_five_days_are_numbered_in_their_windows(ward: ScheduledWard) -> None:
    for k in range(10):
        ward.dose_at(1 + 12 * k + (0.5 if k % 2 else -0.25), session_no=42 + k)
        ward.watch.check()
    numbers = [e.dose_number for e in ward.sink.events]
    assert numbers == list(range(1, 11))
    assert all(e.schedule is not None and e.schedule.in_window for e in ward.sink.events)
    assert all(e.repeat_of is None for e in ward.sink.events)
    first, last = ward.sink.events[0].schedule, ward.sink.events[-1].schedule
    assert first is not None and last is not None
    assert (first.study_day, first.slot_of_day, first.label) == (1, 1, "AM")
    assert (last.study_day, last.slot_of_day, last.label) == (5, 2, "PM")
    assert first.local_time == "2026-11-25T09:45:00+01:00"  # 08:45 UTC in Europe/Berlin
    ward.at(200 * HOUR)
    ward.watch.check()
    assert ward.missed() == []  # every slot was given


def test_a_skipped_slot_is_reported_missed_once_and_a_late_dose_is_off_window(
    ward: ScheduledWard,
) -> None:
    ward.dose_at(1, session_no=42)  # slot 1 at 09:00 UTC
    ward.dose_at(13, session_no=43)  # slot 2
    ward.at(25 * HOUR)  # slot 3's window (22:00-04:00 UTC next day) still open
    ward.watch.check()
    assert ward.missed() == []
    ward.at(28.5 * HOUR)  # slot 3's window has closed: no session
    ward.watch.check()
    ward.watch.check()  # again: still once
    [missed] = ward.missed()
    DoseMissed.model_validate(missed)
    assert (missed["status"], missed["dose_number"], missed["subject_id"]) == (
        "missed",
        3,
        "CVD-042-0017",
    )
    ward.dose_at(37 + 4, session_no=44)  # slot 4, four hours late
    late = ward.sink.events[-1]
    assert late.dose_number == 4 and late.schedule is not None
    assert late.schedule.in_window is False


def test_a_repeat_after_an_aborted_dose_is_linked_not_counted(ward: ScheduledWard) -> None:
    ward.dose_at(1, session_no=42)
    ward.dose_at(13, stop_early=True, session_no=43)  # slot 2: stopped after 20 s
    ward.dose_at(13.5, session_no=44)  # the nurse repeats it
    ward.dose_at(25, session_no=45)
    aborted, repeat, next_dose = ward.sink.events[1:]
    assert aborted.verdict in ("aborted", "partial")
    assert (aborted.dose_number, repeat.dose_number, next_dose.dose_number) == (2, 2, 3)
    assert repeat.repeat_of == aborted.event_id
    assert next_dose.repeat_of is None


def test_numbering_survives_a_gateway_restart(tmp_path: Path) -> None:
    clock = ManualClock(start=T0)
    first = ScheduledWard(tmp_path, clock=clock)
    first.dose_at(1, session_no=42)
    first.dose_at(13, session_no=43)
    first.close()
    again = ScheduledWard(tmp_path, clock=clock)  # same store, a new gateway process
    try:
        again.b.t_ms = first.b.t_ms
        again.dose_at(25, session_no=44)
        assert [e.dose_number for e in again.sink.events] == [3]
    finally:
        again.close()


def test_a_late_logged_session_fills_its_slot_and_withdraws_the_missed_notice(
    ward: ScheduledWard,
) -> None:
    ward.dose_at(1, session_no=42)
    ward.at(17 * HOUR)  # slot 2's window (T0 + 10 h .. 16 h) has closed: no session seen
    ward.watch.check()
    [missed] = ward.missed()
    assert missed["dose_number"] == 2
    # The device had given it while its link was down: fetched from its log now.
    start = T0.timestamp() + 13 * HOUR
    ward.b.record(
        device_log_record(session_no=43, start_wall_s=int(start), end_wall_s=int(start + 435))
    )
    ward.send()
    logged = ward.sink.events[-1]
    assert logged.data_source == "device_log" and logged.dose_number == 2
    ward.watch.check()
    notices = ward.missed()
    assert [n["status"] for n in notices] == ["missed", "withdrawn"]
    assert notices[1]["withdrawn_by"] == str(logged.event_id)
    assert notices[1]["dose_number"] == 2


def test_a_planned_first_dose_given_at_assignment_sets_day_one(ward: ScheduledWard) -> None:
    ward.desk.schedule = ward.schedule
    planned = T0 + timedelta(hours=2)

    def assign(kit: str) -> AssignResult:
        return ward.desk.apply(
            AssignRequest(
                bed="B01",
                subject_id="CVD-042-0021",
                kit_number=kit,
                operator="nurse.lee",
                reason="admission",
                channel="cli",
                planned_first_dose_utc=planned,
            )
        )

    assert assign("K-0101").applied
    ward.dose_at(6, session_no=42)  # four hours after the planned dose 1
    ward.dose_at(14.5, session_no=43)  # dose 2 is planned at 14 h
    late, second = ward.sink.events
    assert late.dose_number == 1 and late.schedule is not None
    assert late.schedule.in_window is False  # the plan, not this dose, defines day 1
    assert late.schedule.planned_utc == planned
    assert second.dose_number == 2 and second.schedule is not None and second.schedule.in_window
    refused = assign("K-0102")
    assert not refused.applied and "has started" in refused.message
