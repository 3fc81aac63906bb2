"""Each subject's dosing plan and doses, kept in the gateway store (issue 11).

The plan arithmetic is pure (``devicegw/core/schedule.py``); this keeps what it
needs to survive a restart: the subject's first dose (``schedule_plan``), every
dose placed in a slot (``schedule_dose``) and the ``dose_missed`` notices
(``schedule_notice``: decided, then published through the outbox by the
gateway's schedule task; a notice's id is deterministic, so publishing one twice
is harmless).

A session that fills a slot already reported missed (a session fetched from
the device's log after the window closed) withdraws the notice: a second notice
for the slot with ``status: withdrawn`` and ``withdrawn_by`` the dose's
event_id. Subscribers drop the missed notice when its withdrawal arrives.
"""

from __future__ import annotations

import sqlite3
import threading
import uuid
from datetime import UTC, datetime

from devicegw.config import ScheduleSettings
from devicegw.contract.payloads import DoseMissed, GatewayRef
from devicegw.core.schedule import Placement, Plan, missed_notice_id
from devicegw.storage.store import Store
from drivers.clock import Clock

__all__ = ["ScheduleBook"]

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS schedule_plan (
        subject_id TEXT PRIMARY KEY,
        first_utc TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS schedule_dose (
        event_id TEXT PRIMARY KEY,
        subject_id TEXT NOT NULL,
        slot INTEGER,
        start_utc TEXT NOT NULL,
        repeat_of TEXT,
        placed_seq INTEGER NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS schedule_dose_slot ON schedule_dose (subject_id, slot)",
    """CREATE TABLE IF NOT EXISTS schedule_notice (
        event_id TEXT PRIMARY KEY,
        subject_id TEXT NOT NULL,
        slot INTEGER NOT NULL,
        status TEXT NOT NULL,
        withdrawn_by TEXT,
        bed TEXT NOT NULL,
        device_id TEXT NOT NULL,
        decided_utc TEXT NOT NULL,
        published INTEGER NOT NULL DEFAULT 0
    )""",
)


def _utc(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


class ScheduleBook:
    """Places doses in their subjects' plans and decides the ``dose_missed`` notices."""

    def __init__(
        self,
        store: Store,
        settings: ScheduleSettings,
        *,
        time_zone: str,
        gateway: GatewayRef,
        clock: Clock,
    ) -> None:
        self._store = store
        self._clock = clock
        self.settings = settings
        self.time_zone = time_zone
        self._gateway = gateway
        self._lock = threading.Lock()
        with store.transaction() as conn:
            for statement in _SCHEMA:
                conn.execute(statement)

    def plan(self, subject_id: str) -> Plan | None:
        row = self._store.conn.execute(
            "SELECT first_utc FROM schedule_plan WHERE subject_id = ?", (subject_id,)
        ).fetchone()
        return None if row is None else Plan(self.settings, _utc(row[0]), self.time_zone)

    def has_doses(self, subject_id: str) -> bool:
        row = self._store.conn.execute(
            "SELECT 1 FROM schedule_dose WHERE subject_id = ? LIMIT 1", (subject_id,)
        ).fetchone()
        return row is not None

    def plan_from(self, subject_id: str, first: datetime) -> None:
        """Plan the subject's dose 1 at ``first`` (given at assignment), replacing a plan
        no dose has been placed in yet."""
        with self._lock, self._store.transaction() as conn:
            conn.execute(
                "INSERT INTO schedule_plan (subject_id, first_utc) VALUES (?, ?) "
                "ON CONFLICT(subject_id) DO UPDATE SET first_utc = excluded.first_utc",
                (subject_id, first.astimezone(UTC).isoformat()),
            )

    # -- core.ports.DoseSchedule --------------------------------------------------------------

    def place(
        self, subject_id: str, event_id: uuid.UUID, start: datetime, *, bed: str, device_id: str
    ) -> Placement:
        """Where this dose falls; recorded, so placing the same dose again gives the same."""
        start = start.astimezone(UTC)
        with self._lock, self._store.transaction() as conn:
            plan = self.plan(subject_id)
            if plan is None:
                conn.execute(
                    "INSERT INTO schedule_plan (subject_id, first_utc) VALUES (?, ?)",
                    (subject_id, start.isoformat()),
                )
                plan = Plan(self.settings, start, self.time_zone)
            known = conn.execute(
                "SELECT slot, start_utc, repeat_of FROM schedule_dose WHERE event_id = ?",
                (str(event_id),),
            ).fetchone()
            if known is not None:
                slot, at = known[0], _utc(known[1])
                repeat_of = None if known[2] is None else uuid.UUID(known[2])
                return self._placement(plan, slot, at, repeat_of)
            before_plan = start < plan.window(1)[0]
            slot = None if before_plan else plan.slot_of(start)
            first = (
                None
                if slot is None
                else conn.execute(
                    "SELECT event_id FROM schedule_dose WHERE subject_id = ? AND slot = ? "
                    "ORDER BY placed_seq LIMIT 1",
                    (subject_id, slot),
                ).fetchone()
            )
            repeat_of = None if first is None else uuid.UUID(first[0])
            seq = conn.execute("SELECT COALESCE(MAX(placed_seq), 0) + 1 FROM schedule_dose")
            conn.execute(
                "INSERT INTO schedule_dose (event_id, subject_id, slot, start_utc, repeat_of, "
                "placed_seq) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    str(event_id),
                    subject_id,
                    slot,
                    start.isoformat(),
                    None if repeat_of is None else str(repeat_of),
                    seq.fetchone()[0],
                ),
            )
            if slot is not None and repeat_of is None:
                self._withdraw_missed(conn, subject_id, slot, event_id, bed, device_id)
            return self._placement(plan, slot, start, repeat_of)

    def _placement(
        self, plan: Plan, slot: int | None, at: datetime, repeat_of: uuid.UUID | None
    ) -> Placement:
        if slot is None:
            return Placement(None, None, repeat_of)
        return Placement(slot, plan.out(slot, at), repeat_of)

    def _withdraw_missed(
        self,
        conn: sqlite3.Connection,
        subject_id: str,
        slot: int,
        by: uuid.UUID,
        bed: str,
        device_id: str,
    ) -> None:
        missed = conn.execute(
            "SELECT 1 FROM schedule_notice WHERE subject_id = ? AND slot = ? AND status = 'missed'",
            (subject_id, slot),
        ).fetchone()
        if missed is None:
            return
        conn.execute(
            "INSERT OR IGNORE INTO schedule_notice (event_id, subject_id, slot, status, "
            "withdrawn_by, bed, device_id, decided_utc) VALUES (?, ?, ?, 'withdrawn', ?, ?, ?, ?)",
            (
                str(missed_notice_id(subject_id, slot, "withdrawn")),
                subject_id,
                slot,
                str(by),
                bed,
                device_id,
                self._clock.now().astimezone(UTC).isoformat(),
            ),
        )

    # -- missed doses ------------------------------------------------------------------------

    def close_windows(self, now: datetime, assigned: dict[str, tuple[str, str]]) -> int:
        """Decide a ``missed`` notice for every closed slot without a dose, once, for the
        subjects assigned on this gateway now (``assigned``: subject -> (bed, device id)).
        Returns how many were decided."""
        decided = 0
        with self._lock, self._store.transaction() as conn:
            for subject_id, (bed, device_id) in sorted(assigned.items()):
                plan = self.plan(subject_id)
                if plan is None:
                    continue  # no dose yet: the first one defines the plan
                filled = {
                    r[0]
                    for r in conn.execute(
                        "SELECT DISTINCT slot FROM schedule_dose WHERE subject_id = ? "
                        "AND slot IS NOT NULL",
                        (subject_id,),
                    )
                }
                noticed = {
                    r[0]
                    for r in conn.execute(
                        "SELECT slot FROM schedule_notice WHERE subject_id = ? "
                        "AND status = 'missed'",
                        (subject_id,),
                    )
                }
                for slot in plan.closed_before(now):
                    if slot in filled or slot in noticed:
                        continue
                    conn.execute(
                        "INSERT INTO schedule_notice (event_id, subject_id, slot, status, "
                        "withdrawn_by, bed, device_id, decided_utc) "
                        "VALUES (?, ?, ?, 'missed', NULL, ?, ?, ?)",
                        (
                            str(missed_notice_id(subject_id, slot, "missed")),
                            subject_id,
                            slot,
                            bed,
                            device_id,
                            now.astimezone(UTC).isoformat(),
                        ),
                    )
                    decided += 1
        return decided

    def unpublished(self) -> list[DoseMissed]:
        rows = self._store.conn.execute(
            "SELECT event_id, subject_id, slot, status, withdrawn_by, bed, device_id, "
            "decided_utc FROM schedule_notice WHERE published = 0 ORDER BY rowid"
        ).fetchall()
        out = []
        for event_id, subject_id, slot, status, withdrawn_by, bed, device_id, decided in rows:
            plan = self.plan(subject_id)
            if plan is None:  # unreachable: a notice is only decided for a planned subject
                continue
            out.append(
                DoseMissed(
                    event_id=uuid.UUID(event_id),
                    status=status,
                    subject_id=subject_id,
                    bed=bed,
                    device_id=device_id,
                    gateway=self._gateway,
                    dose_number=slot,
                    schedule=plan.out(slot, None),
                    withdrawn_by=None if withdrawn_by is None else uuid.UUID(withdrawn_by),
                    decided_utc=_utc(decided),
                )
            )
        return out

    def published(self, event_id: uuid.UUID) -> None:
        with self._store.transaction() as conn:
            conn.execute(
                "UPDATE schedule_notice SET published = 1 WHERE event_id = ?", (str(event_id),)
            )
