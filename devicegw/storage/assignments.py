"""Bedside assignments (issue 11): who is on which bed with which kit, and since when.

One code path for every way in (``devicegw assign``, the MQTT ``cmd/assign``
command, the dashboard's assignment form): each calls :class:`AssignmentService`.

The API, kept small on purpose::

    service = AssignmentService(store, audit, clock=clock, kit_list=kits,
                                subject_pattern=r"CVD-042-\\d{4}")
    a = service.assign(bed="B1", subject_id="CVD-042-0021", kit_number="K-0101",
                       operator="nurse.lee", reason="admission", channel="cli")
    service.end(bed="B1", operator="nurse.lee", reason="discharged", channel="cli")
    service.current()                  # {bed: Assignment} in force now
    service.history(bed="B1")          # every assignment and end, oldest first
    service.in_force_at("B1", t)       # the assignment at time t (None: unassigned)
    service.record_kit_used("K-0101", event_id)   # a finished dose used this kit

A refused request raises :class:`AssignmentRefused` (its message is the one-line
reason a CLI prints with exit status 2) after appending an ``assignment_refused``
audit record. Applied requests append ``bed_assigned`` / ``bed_unassigned``.

Storage is append-only: the ``assignment`` table holds one row per assignment
or end (an end is a row with null subject and kit) with the UTC time it took
effect; rows are never updated or deleted (SQLite triggers refuse it), so the
history needed to attribute a dose by its session's start time is always there.
Nothing here names or hints at a treatment arm: a kit is a number only, and a
kit list with an arm-like column is refused outright.
"""

from __future__ import annotations

import csv
import re
import threading
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import NoReturn

from devicegw.core.ports import Attribution, AuditKind, AuditLog
from devicegw.errors import GatewayError
from devicegw.storage.store import Store
from drivers.clock import Clock

# The syntax every subject id and kit number must have whatever the study pattern
# (pseudonyms only: no spaces, so no names), as in devicegw.config.
SUBJECT_SYNTAX = re.compile(r"[A-Z0-9][A-Z0-9-]{2,31}")
KIT_SYNTAX = re.compile(r"[A-Z0-9][A-Z0-9-]{0,31}")
BED_SYNTAX = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_ARM_WORDS = ("arm", "treatment", "allocation", "active", "sham", "placebo", "group")

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS assignment (
        seq INTEGER PRIMARY KEY,
        bed TEXT NOT NULL,
        subject_id TEXT,
        kit_number TEXT,
        effective_utc TEXT NOT NULL,
        operator TEXT NOT NULL,
        channel TEXT NOT NULL,
        reason TEXT NOT NULL,
        override_reason TEXT
    )""",
    "CREATE INDEX IF NOT EXISTS assignment_bed ON assignment (bed, seq)",
    """CREATE TABLE IF NOT EXISTS kit_used (
        kit_number TEXT PRIMARY KEY,
        event_id TEXT NOT NULL,
        recorded_utc TEXT NOT NULL
    )""",
    """CREATE TRIGGER IF NOT EXISTS assignment_no_update BEFORE UPDATE ON assignment
       BEGIN SELECT RAISE(ABORT, 'assignment rows are append-only'); END""",
    """CREATE TRIGGER IF NOT EXISTS assignment_no_delete BEFORE DELETE ON assignment
       BEGIN SELECT RAISE(ABORT, 'assignment rows are append-only'); END""",
)


class AssignmentRefused(GatewayError):
    """A request the gateway will not apply; ``str(exc)`` is the one-line reason."""


class KitListError(GatewayError):
    """The kit list file cannot be used (unreadable, malformed, or names an arm)."""


@dataclass(frozen=True, slots=True)
class Assignment:
    """One row of a bed's history. ``subject_id``/``kit_number`` are None for an end."""

    seq: int
    bed: str
    subject_id: str | None
    kit_number: str | None
    effective_utc: datetime
    operator: str
    channel: str
    reason: str
    override_reason: str | None = None

    @property
    def is_end(self) -> bool:
        return self.subject_id is None

    def to_json_dict(self) -> dict[str, object]:
        return {
            "seq": self.seq,
            "bed": self.bed,
            "subject_id": self.subject_id,
            "kit_number": self.kit_number,
            "effective_utc": _utc_text(self.effective_utc),
            "operator": self.operator,
            "channel": self.channel,
            "reason": self.reason,
            "override_reason": self.override_reason,
        }


def _utc_text(t: datetime) -> str:
    return t.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _parse_utc(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


def load_kit_list(path: str | Path) -> dict[str, str]:
    """Read the IWRS kit list CSV (header ``kit_number,subject_id``): kit -> subject.

    Refused (:class:`KitListError`): a missing column, a bad kit or subject id, a
    kit listed twice, or any column whose name hints at the treatment arm.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise KitListError(f"cannot read the kit list {p}: {exc}") from exc
    reader = csv.DictReader(text.splitlines())
    fields = [f.strip().lower() for f in (reader.fieldnames or [])]
    for f in fields:
        if any(word in f for word in _ARM_WORDS):
            raise KitListError(f"kit list {p}: column {f!r} is not allowed (blinded trial)")
    if "kit_number" not in fields or "subject_id" not in fields:
        raise KitListError(f"kit list {p}: the header must have kit_number and subject_id")
    kits: dict[str, str] = {}
    for n, row in enumerate(reader, start=2):
        norm = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items()}
        kit, subject = norm.get("kit_number", ""), norm.get("subject_id", "")
        if not KIT_SYNTAX.fullmatch(kit) or not SUBJECT_SYNTAX.fullmatch(subject):
            raise KitListError(f"kit list {p} line {n}: not a kit number and subject id")
        if kit in kits:
            raise KitListError(f"kit list {p} line {n}: kit {kit} is listed twice")
        kits[kit] = subject
    return kits


class AssignmentService:
    """Set, change and end bed assignments; look them up by time. Thread-safe."""

    def __init__(
        self,
        store: Store,
        audit: AuditLog,
        *,
        clock: Clock,
        kit_list: Mapping[str, str] | None = None,
        subject_pattern: str | None = None,
        beds: Collection[str] | None = None,
    ) -> None:
        self._beds = frozenset(beds) if beds is not None else None
        self._store = store
        self._audit = audit
        self._clock = clock
        self._kits = dict(kit_list) if kit_list is not None else None
        self._pattern = re.compile(subject_pattern) if subject_pattern else None
        self._lock = threading.Lock()
        with store.transaction() as conn:
            for statement in _SCHEMA:
                conn.execute(statement)

    # -- writing ---------------------------------------------------------------------------

    def assign(
        self,
        *,
        bed: str,
        subject_id: str,
        kit_number: str,
        operator: str,
        reason: str,
        channel: str = "cli",
        override_reason: str | None = None,
        planned_first_dose_utc: datetime | None = None,
    ) -> Assignment:
        """Assign ``subject_id`` with ``kit_number`` to ``bed`` from now on, or refuse.

        ``planned_first_dose_utc`` is recorded in the audit record (the schedule keeps it).
        """
        asked: dict[str, object] = {"subject_id": subject_id, "kit_number": kit_number}
        with self._lock:
            self._check_common(bed, operator, reason, channel, asked)
            if not SUBJECT_SYNTAX.fullmatch(subject_id) or (
                self._pattern is not None and not self._pattern.fullmatch(subject_id)
            ):
                self._refuse(
                    bed,
                    operator,
                    reason,
                    channel,
                    asked,
                    "subject id does not match the study pattern",
                )
            if not KIT_SYNTAX.fullmatch(kit_number):
                self._refuse(bed, operator, reason, channel, asked, "not a kit number")
            if self._kits is not None and self._kits.get(kit_number) != subject_id:
                self._refuse(
                    bed,
                    operator,
                    reason,
                    channel,
                    asked,
                    f"kit {kit_number} is not listed for subject {subject_id}",
                )
            if self._kit_used(kit_number) and not (override_reason or "").strip():
                self._refuse(
                    bed,
                    operator,
                    reason,
                    channel,
                    asked,
                    f"kit {kit_number} was already used for a finished dose"
                    " (give an override reason to use it again)",
                )
            current = self._current_locked()
            for other_bed, a in current.items():
                if other_bed != bed and a.subject_id == subject_id:
                    self._refuse(
                        bed,
                        operator,
                        reason,
                        channel,
                        asked,
                        f"subject {subject_id} is assigned to bed {other_bed}",
                    )
            previous = current.get(bed)
            row = self._insert(
                bed,
                subject_id,
                kit_number,
                operator,
                channel,
                reason,
                override_reason.strip() if override_reason else None,
            )
            self._audit.append(
                AuditKind.bed_assigned,
                subject_id=subject_id,
                body={
                    **row.to_json_dict(),
                    "replaces": previous.seq if previous is not None else None,
                    **(
                        {"planned_first_dose_utc": _utc_text(planned_first_dose_utc)}
                        if planned_first_dose_utc is not None
                        else {}
                    ),
                },
            )
            return row

    def end(self, *, bed: str, operator: str, reason: str, channel: str = "cli") -> Assignment:
        """End the bed's assignment from now on (the bed becomes unassigned), or refuse."""
        asked: dict[str, object] = {"end": True}
        with self._lock:
            self._check_common(bed, operator, reason, channel, asked)
            previous = self._current_locked().get(bed)
            if previous is None:
                self._refuse(bed, operator, reason, channel, asked, f"bed {bed} is not assigned")
            row = self._insert(bed, None, None, operator, channel, reason, None)
            self._audit.append(
                AuditKind.bed_unassigned,
                subject_id=previous.subject_id,
                body={
                    **row.to_json_dict(),
                    "ended_subject_id": previous.subject_id,
                    "ended_kit_number": previous.kit_number,
                    "replaces": previous.seq,
                },
            )
            return row

    def record_kit_used(self, kit_number: str, event_id: str) -> None:
        """Note that a finished dose used ``kit_number``: reassigning it needs an override."""
        with self._store.transaction() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO kit_used (kit_number, event_id, recorded_utc)"
                " VALUES (?, ?, ?)",
                (kit_number, event_id, _utc_text(self._clock.now())),
            )

    # -- reading ---------------------------------------------------------------------------

    def current(self) -> dict[str, Assignment]:
        """The assignment in force now on each assigned bed (unassigned beds are absent)."""
        with self._lock:
            return self._current_locked()

    def history(self, bed: str | None = None) -> list[Assignment]:
        """Every assignment and end (of ``bed``, or of all beds), oldest first."""
        return read_history(self._store, bed)

    def in_force_at(self, bed: str, t: datetime) -> Assignment | None:
        """The assignment of ``bed`` in force at ``t`` (a session's start); None if unassigned."""
        found: Assignment | None = None
        for a in self.history(bed):
            if a.effective_utc <= t.astimezone(UTC):
                found = a
            else:
                break
        return None if found is None or found.is_end else found

    def refuse(
        self,
        *,
        bed: str,
        operator: str,
        reason: str,
        channel: str,
        asked: dict[str, object],
        refusal: str,
    ) -> NoReturn:
        """Refuse a request malformed before it reaches :meth:`assign`/:meth:`end` (audited)."""
        with self._lock:
            self._refuse(bed, operator, reason, channel, asked, refusal)

    # -- core.ports.Attributor ---------------------------------------------------------------

    def attribute(self, bed: str, start: datetime, end: datetime) -> Attribution:
        """Whose dose a session on ``bed`` from ``start`` to ``end`` was (its start decides)."""
        start, end = start.astimezone(UTC), end.astimezone(UTC)
        history = self.history(bed)
        found: Assignment | None = None
        changed = False
        for a in history:
            if a.effective_utc <= start:
                found = a
            elif a.effective_utc <= end:
                changed = True
        if found is None or found.is_end:
            return Attribution(None, None, changed)
        return Attribution(found.subject_id, found.kit_number, changed)

    def kit_used(self, kit_number: str, event_id: str) -> None:
        self.record_kit_used(kit_number, event_id)

    # -- internals -------------------------------------------------------------------------

    def _current_locked(self) -> dict[str, Assignment]:
        return read_current(self._store)

    def _kit_used(self, kit_number: str) -> bool:
        row = self._store.conn.execute(
            "SELECT 1 FROM kit_used WHERE kit_number = ?", (kit_number,)
        ).fetchone()
        return row is not None

    def _check_common(
        self, bed: str, operator: str, reason: str, channel: str, asked: dict[str, object]
    ) -> None:
        if not BED_SYNTAX.fullmatch(bed):
            self._refuse("?", operator, reason, channel, asked, "not a bed name")
        if self._beds is not None and bed not in self._beds:
            self._refuse(
                bed, operator, reason, channel, asked, f"bed {bed} has no nebulizer on this gateway"
            )
        if not operator.strip() or not operator.isprintable() or len(operator) > 128:
            self._refuse(bed, "?", reason, channel, asked, "an operator identity is required")
        if not reason.strip() or not reason.isprintable() or len(reason) > 500:
            self._refuse(
                bed,
                operator,
                "?",
                channel,
                asked,
                "a reason is required (printable, at most 500 characters)",
            )

    def _refuse(
        self,
        bed: str,
        operator: str,
        reason: str,
        channel: str,
        asked: dict[str, object],
        refusal: str,
    ) -> NoReturn:
        body = {
            "bed": bed,
            **{
                k: (v if isinstance(v, bool) or v is None else _printable(str(v)))
                for k, v in asked.items()
            },
            "operator": _printable(operator),
            "channel": channel,
            "reason": _printable(reason),
            "refusal": refusal,
        }
        self._audit.append(AuditKind.assignment_refused, body=body)
        raise AssignmentRefused(refusal)

    def _insert(
        self,
        bed: str,
        subject_id: str | None,
        kit_number: str | None,
        operator: str,
        channel: str,
        reason: str,
        override_reason: str | None,
    ) -> Assignment:
        now = self._clock.now().astimezone(UTC)
        last = self.history(bed)
        if last and last[-1].effective_utc > now:  # never before the previous row
            now = last[-1].effective_utc
        with self._store.transaction() as conn:
            cur = conn.execute(
                "INSERT INTO assignment (bed, subject_id, kit_number, effective_utc, operator,"
                " channel, reason, override_reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    bed,
                    subject_id,
                    kit_number,
                    _utc_text(now),
                    operator,
                    channel,
                    reason,
                    override_reason,
                ),
            )
            seq = int(cur.lastrowid or 0)
        return Assignment(
            seq, bed, subject_id, kit_number, now, operator, channel, reason, override_reason
        )


def read_history(store: Store, bed: str | None = None) -> list[Assignment]:
    """Every assignment and end in ``store`` (of ``bed``, or all), oldest first; read only.

    For ``devicegw assignments``: works on a store the running daemon holds, and on
    one that has never had an assignment (an empty list).
    """
    row = store.conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'assignment'"
    ).fetchone()
    if row is None:
        return []
    sql = "SELECT * FROM assignment"
    args: tuple[str, ...] = ()
    if bed is not None:
        sql, args = sql + " WHERE bed = ?", (bed,)
    return [_row(r) for r in store.conn.execute(sql + " ORDER BY seq", args)]


def read_current(store: Store) -> dict[str, Assignment]:
    """:func:`current_of` the whole history, with only each bed's latest row read: a
    500-bed ward seeding its assignments at start read the growing history twice per
    bed (~1.6 s before the loop started)."""
    latest = store.conn.execute(
        "SELECT * FROM assignment WHERE seq IN (SELECT MAX(seq) FROM assignment GROUP BY bed)"
        " ORDER BY seq"
    )
    return current_of([_row(r) for r in latest])


def current_of(history: list[Assignment]) -> dict[str, Assignment]:
    """The assignment in force on each assigned bed, given a history oldest first."""
    latest: dict[str, Assignment] = {}
    for a in history:
        latest[a.bed] = a
    return {bed: a for bed, a in latest.items() if not a.is_end}


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)[:500]


def _row(r: tuple[object, ...]) -> Assignment:
    seq, bed, subject, kit, eff, operator, channel, reason, override = r
    return Assignment(
        seq=int(str(seq)),
        bed=str(bed),
        subject_id=None if subject is None else str(subject),
        kit_number=None if kit is None else str(kit),
        effective_utc=_parse_utc(str(eff)),
        operator=str(operator),
        channel=str(channel),
        reason=str(reason),
        override_reason=None if override is None else str(override),
    )
