"""Whose dose a session was (issue 11): the bed's assignment at the session's start.

Real parts: the gateway store (SQLite) with the real audit trail and
AssignmentService; the pipeline is fed the serial frames a VM-1 sends
(tests/session_stream.py). Times: the service's clock and the stream share T0.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from devicegw.config import ScheduleSettings
from devicegw.contract.payloads import DoseEvent, GatewayRef
from devicegw.core.vm1_pipeline import Vm1Pipeline
from devicegw.runtime.assignment_commands import AssignmentDesk, AssignRequest, seed_initial
from devicegw.storage.assignments import AssignmentService
from devicegw.storage.audit import AuditTrail, verify
from devicegw.storage.journal import SessionJournal
from devicegw.storage.schedule_book import ScheduleBook
from devicegw.storage.store import Store
from drivers.clock import ManualClock
from drivers.vm1.messages import DeviceState, EndReason
from tests.session_stream import (
    T0,
    ListSink,
    StreamBuilder,
    device_log_record,
    feed,
    one_device_config,
)


class Ward:
    """One bed (B01) with a VM-1, the gateway's store, audit trail and assignments."""

    def __init__(
        self,
        tmp_path: Path,
        *,
        schedule: ScheduleSettings | None = None,
        clock: ManualClock | None = None,
        **device: object,
    ) -> None:
        self.store = Store.in_dir(tmp_path)
        self.clock = clock or ManualClock(start=T0)
        self.config = one_device_config(**device)
        self.schedule = (
            None
            if schedule is None
            else ScheduleBook(
                self.store,
                schedule,
                time_zone="Europe/Berlin",
                gateway=GatewayRef(id="gw1", site="site-042", version="test"),
                clock=self.clock,
            )
        )
        self.audit = AuditTrail(self.store, clock=self.clock, gateway_id="gw1")
        self.service = AssignmentService(self.store, self.audit, clock=self.clock, beds=["B01"])
        seed_initial(self.service, self.config)
        self.desk = AssignmentDesk(self.service)
        self.sink = ListSink()
        self.pipeline = Vm1Pipeline(
            self.config.devices[0],
            self.config,
            self.sink,
            journal=SessionJournal(self.store),
            audit=self.audit,
            attributor=self.service,
            schedule=self.schedule,
        )
        self.pipeline.link_up(T0)
        self.b = StreamBuilder(start_ms=0)
        self.fed = 0

    def at(self, seconds: float) -> None:
        """Move the ward's clock and the device's stream to T0 + ``seconds``."""
        self.clock.set(seconds)
        if self.b.t_ms < seconds * 1000:
            self.b.t_ms = round(seconds * 1000)

    def assign(self, subject: str, kit: str, **kw: object) -> None:
        result = self.desk.apply(
            AssignRequest(
                bed="B01",
                subject_id=subject,
                kit_number=kit,
                operator="nurse.lee",
                reason="test",
                channel="cli",
                **kw,  # type: ignore[arg-type]
            )
        )
        assert result.applied, result.message

    def send(self) -> None:
        self.fed = feed(self.pipeline, self.b, self.fed)

    def session(self, seconds: float = 300, session_no: int = 42) -> None:
        """A complete 2.9 mL session of ``seconds``, starting now (device clock set)."""
        wall = int((T0 + timedelta(milliseconds=self.b.t_ms)).timestamp())
        self.b.start(session_no=session_no, wall_s=wall)
        self.b.nebulize(seconds, rate=round(2900 / seconds * 60))
        self.b.end(
            EndReason.COMPLETE, residual=100, neb_ms=round(seconds * 1000), session_no=session_no
        )
        self.send()

    def close(self) -> None:
        self.store.close()


@pytest.fixture
def ward(tmp_path: Path) -> Iterator[Ward]:
    w = Ward(tmp_path, subject_id=None, kit_number=None)  # the bed starts unassigned
    w.b.ident()
    w.b.status(DeviceState.READY)
    w.send()
    yield w
    w.close()


def only(events: list[DoseEvent]) -> DoseEvent:
    assert len(events) == 1
    return events[0]


def test_a_dose_belongs_to_the_assignment_made_before_it(ward: Ward) -> None:
    ward.at(60)
    ward.assign("CVD-042-0021", "K-0101")
    ward.at(120)
    ward.session()
    event = only(ward.sink.events)
    assert (event.subject_id, event.kit_number) == ("CVD-042-0021", "K-0101")
    assert "unassigned" not in event.reasons
    assert "assignment_changed_during_session" not in event.reasons
    # The kit is used now: giving it again needs an override reason.
    refused = ward.desk.apply(
        AssignRequest(
            bed="B01",
            subject_id="CVD-042-0021",
            kit_number="K-0101",
            operator="nurse.lee",
            reason="again",
            channel="cli",
        )
    )
    assert not refused.applied and "already used" in refused.message


def test_the_kit_is_marked_used_in_the_transaction_that_records_the_dose(ward: Ward) -> None:
    """Not a transaction (and an fsync) of its own after it: a crash between the two left
    a recorded dose whose kit could be handed out again without an override."""
    ward.at(60)
    ward.assign("CVD-042-0021", "K-0101")
    ward.at(120)
    statements: list[str] = []
    ward.store.conn.set_trace_callback(statements.append)
    ward.session()
    ward.store.conn.set_trace_callback(None)
    kit = next(i for i, s in enumerate(statements) if "INTO kit_used" in s)
    begin = max(i for i, s in enumerate(statements[:kit]) if s.startswith("BEGIN"))
    commit = kit + next(i for i, s in enumerate(statements[kit:]) if s == "COMMIT")
    inside = statements[begin:commit]
    assert any("DELETE FROM session_journal " in s for s in inside)  # the session's finishing
    assert any("device_watermark" in s for s in inside)


def test_a_reassignment_during_a_session_keeps_the_dose_with_its_start(ward: Ward) -> None:
    ward.at(10)
    ward.assign("CVD-042-0021", "K-0101")
    ward.at(100)
    wall = int((T0 + timedelta(seconds=100)).timestamp())
    ward.b.start(wall_s=wall)
    ward.b.nebulize(100)
    ward.send()
    ward.at(200)
    ward.assign("CVD-042-0022", "K-0102")  # changed while the session runs
    ward.b.nebulize(200)
    ward.b.end(EndReason.COMPLETE, residual=100, neb_ms=300_000)
    ward.send()
    event = only(ward.sink.events)
    assert (event.subject_id, event.kit_number) == ("CVD-042-0021", "K-0101")
    assert "assignment_changed_during_session" in event.reasons


def test_an_unassigned_bed_records_the_dose_with_no_subject(ward: Ward) -> None:
    ward.at(30)
    ward.session()
    event = only(ward.sink.events)
    assert event.subject_id is None and event.kit_number is None
    assert "unassigned" in event.reasons
    assert event.verdict == "complete"  # who it was is not how it went
    DoseEvent.model_validate_json(event.model_dump_json())


def test_a_logged_session_is_attributed_by_its_start_after_a_reassignment(ward: Ward) -> None:
    """The device logged session 42 while the gateway was away; the bed was reassigned
    before the gateway fetched it: the dose is the first subject's."""
    ward.at(10)
    ward.assign("CVD-042-0021", "K-0101")
    start = T0 + timedelta(seconds=100)
    end = start + timedelta(seconds=435)
    ward.at(3600)
    ward.assign("CVD-042-0022", "K-0102")
    ward.at(3700)
    record = device_log_record(start_wall_s=int(start.timestamp()), end_wall_s=int(end.timestamp()))
    ward.b.record(record)
    ward.send()
    event = only(ward.sink.events)
    assert event.data_source == "device_log"
    assert (event.subject_id, event.kit_number) == ("CVD-042-0021", "K-0101")
    assert "assignment_changed_during_session" not in event.reasons


def test_the_configured_assignment_seeds_a_new_bed_only(tmp_path: Path) -> None:
    w = Ward(tmp_path)  # config: CVD-042-0017 / K-10234
    try:
        [first] = w.service.history("B01")
        assert (first.subject_id, first.kit_number, first.channel) == (
            "CVD-042-0017",
            "K-10234",
            "config",
        )
        w.at(60)
        w.assign("CVD-042-0021", "K-0101")
        seed_initial(w.service, w.config)  # a restart with the same config
        assert len(w.service.history("B01")) == 2
        assert w.service.current()["B01"].subject_id == "CVD-042-0021"
        assert verify(w.store).ok
    finally:
        w.close()


def test_refusals_are_results_and_audited(ward: Ward) -> None:
    def ask(**kw: object) -> str:
        fields: dict[str, object] = {
            "bed": "B01",
            "operator": "nurse.lee",
            "reason": "test",
            "channel": "cli",
        }
        fields.update(kw)
        result = ward.desk.apply(AssignRequest(**fields))  # type: ignore[arg-type]
        assert not result.applied
        return result.message

    assert "no nebulizer" in ask(bed="B99", subject_id="CVD-042-0021", kit_number="K-1")
    assert "required" in ask(subject_id="CVD-042-0021")
    assert "no subject or kit" in ask(end=True, subject_id="CVD-042-0021")
    assert "not assigned" in ask(end=True)
    kinds = [r[0] for r in ward.store.conn.execute("SELECT kind FROM audit ORDER BY seq")]
    assert kinds.count("assignment_refused") == 4  # every refusal, malformed ones too
    assert verify(ward.store).ok


def test_a_kit_list_naming_an_arm_refuses_the_start(tmp_path: Path) -> None:
    """preflight (what `run` and `check-config` do first) reads the kit list."""
    from devicegw.config import parse_config
    from devicegw.errors import ConfigError
    from devicegw.runtime.preflight import preflight

    kits = tmp_path / "kits.csv"
    kits.write_text("kit_number,subject_id,arm\nK-0101,CVD-042-0021,A\n", encoding="utf-8")
    config = parse_config(
        {
            "gateway": {"id": "gw1", "site": "s1", "data_dir": str(tmp_path / "data")},
            "trial": {"study_id": "CVD-042", "time_zone": "UTC", "kit_list": str(kits)},
            "devices": [],
        }
    )
    with pytest.raises(ConfigError, match=r"trial\.kit_list: .*arm"):
        preflight(config)
    kits.write_text("kit_number,subject_id\nK-0101,CVD-042-0021\n", encoding="utf-8")
    preflight(config)
