"""What the pure core needs from the outside, as small protocols.

The VM-1 pipeline decides; storage keeps. The pipeline talks to the session
journal and the audit trail only through these interfaces, so the core never
imports SQLite or the storage package (``devicegw.storage`` implements them).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol

from devicegw.contract.payloads import DoseRecord
from devicegw.core.schedule import Placement

__all__ = [
    "Attribution",
    "Attributor",
    "AuditKind",
    "AuditLog",
    "DoseSchedule",
    "RecordedDose",
    "SessionJournalPort",
    "StaticAttributor",
]


class AuditKind(StrEnum):
    """What a record is about. Suggested body fields are listed per kind."""

    #: body: version, and anything identifying this run (pid, host).
    gateway_start = "gateway_start"
    #: body: reason (e.g. "signal", "error").
    gateway_stop = "gateway_stop"
    #: body: sha256 (of the config file's bytes), path. See record_assignments.
    config_loaded = "config_loaded"
    #: body: device_id, type, bed, subject_id, kit_number, port. See record_assignments.
    device_assigned = "device_assigned"
    #: body: device_id and the last assignment (bed, subject_id, kit_number, port);
    #: appended by record_assignments when a device leaves the configuration.
    device_unassigned = "device_unassigned"
    #: body: port, model, serial_no, firmware as the device reported them.
    device_identified = "device_identified"
    #: body: port, expected_serial, serial_no seen; the device is not used.
    device_refused = "device_refused"
    #: body: fill_ml, device start time/uptime, data_source. session_no is set.
    session_started = "session_started"
    #: body: event_id, verdict, reasons, delivered_ml, end_reason, data_source.
    #: See record_session_finished.
    session_finished = "session_finished"
    #: body: what was fetched from the device log (session numbers, why).
    reconciliation = "reconciliation"
    #: body: kind, count, first_utc, last_utc, limit, window_s: a device's records of
    #: one kind beyond the rate limit, counted instead of written (issue 14 item 7).
    audit_coalesced = "audit_coalesced"
    #: body: why (operator confirmed --new-store), the witness it replaces.
    store_created = "store_created"
    #: body: problems quick_check found at start, whether rebuilding indexes repaired them.
    store_check = "store_check"

    #: body: serial_no, what showed the reset, recorded_up_to, device_last_session_no, epoch.
    device_counter_reset = "device_counter_reset"

    #: body: bed, subject_id, kit_number, operator, channel, reason, effective_utc,
    #: override_reason (kit reuse), replaces (the previous assignment's seq or null).
    #: Appended by devicegw.storage.assignments.AssignmentService (issue 11).
    bed_assigned = "bed_assigned"
    #: body: bed, the ended assignment (subject_id, kit_number), operator, channel, reason.
    bed_unassigned = "bed_unassigned"
    #: body: bed, what was asked (subject_id, kit_number), operator, channel, reason, refusal.
    assignment_refused = "assignment_refused"
    #: body: the correction (supersedes, sequence, action, old and new subject/kit,
    #: operator, channel, reason), or what was asked and the refusal (``refused``).
    dose_corrected = "dose_corrected"
    correction_refused = "correction_refused"

    #: The ward dashboard's logins (issue 12). body: user, role, client (address).
    web_login = "web_login"
    #: body: user (null when the name is not a known user), client, why.
    web_login_failed = "web_login_failed"
    #: body: what is locked (user or client), failures, lockout_s: further attempts are
    #: refused until the window passes; appended once per lockout, not per attempt.
    web_login_locked = "web_login_locked"
    #: body: user, client (an expired session ends without a record).
    web_logout = "web_logout"


@dataclass(frozen=True, slots=True)
class RecordedDose:
    """A dose event already in the outbox: its gateway end time, if its payload says it."""

    gateway_end_utc: datetime | None


class AuditLog(Protocol):
    """The append-only audit trail (``devicegw.storage.audit.AuditTrail``)."""

    def append(
        self,
        kind: AuditKind,
        *,
        device_id: str | None = None,
        subject_id: str | None = None,
        session_no: int | None = None,
        body: Mapping[str, object],
        sync_later: bool = False,
    ) -> object: ...

    def record_session_finished(self, record: DoseRecord) -> object: ...


class SessionJournalPort(Protocol):
    """Open sessions and per-device watermarks (``devicegw.storage.journal.SessionJournal``)."""

    def load(self, device_id: str) -> tuple[dict[str, Any], datetime] | None: ...

    def save(
        self, device_id: str, session_no: int, state: dict[str, object], utc: datetime
    ) -> None: ...

    def clear(self, device_id: str, session_no: int) -> None: ...

    def finishing(
        self, device_id: str, session_no: int
    ) -> contextlib.AbstractContextManager[None]: ...

    def is_recorded(self, event_id: str) -> bool: ...

    def commit_decided(self, key: str, write: Callable[[], object]) -> bool: ...

    def watermark(self, model: str, serial_no: str) -> int | None: ...

    def raise_watermark(self, model: str, serial_no: str, session_no: int) -> None: ...

    def recorded_dose(self, event_id: str) -> RecordedDose | None: ...

    def counter_epoch(self, model: str, serial_no: str) -> int: ...

    def start_counter_epoch(self, model: str, serial_no: str, session_no: int) -> int: ...


@dataclass(frozen=True, slots=True)
class Attribution:
    """Whose dose a session was: the bed's assignment in force at the session's start.

    ``subject_id``/``kit_number`` are None on an unassigned bed (never a guess);
    ``changed`` says the assignment changed between the session's start and end.
    """

    subject_id: str | None
    kit_number: str | None
    changed: bool = False


class Attributor(Protocol):
    """The bed assignments (``devicegw.storage.assignments.AssignmentService``)."""

    def attribute(self, bed: str, start: datetime, end: datetime) -> Attribution: ...

    def kit_used(self, kit_number: str, event_id: str) -> None: ...


class DoseSchedule(Protocol):
    """The dosing schedule (``devicegw.storage.schedule_book.ScheduleBook``)."""

    def place(
        self, subject_id: str, event_id: uuid.UUID, start: datetime, *, bed: str, device_id: str
    ) -> Placement: ...


class StaticAttributor:
    """A fixed assignment (no assignment service: replay, tests, tools)."""

    def __init__(self, subject_id: str | None, kit_number: str | None) -> None:
        self._attribution = Attribution(subject_id, kit_number)

    def attribute(self, bed: str, start: datetime, end: datetime) -> Attribution:
        return self._attribution

    def kit_used(self, kit_number: str, event_id: str) -> None:
        pass
