"""The dosing schedule (issue 11): which planned dose a session was, and whether on time.

The trial gives each subject ``doses_per_day`` doses a day for ``days`` days,
``interval_h`` apart, each within ``+- window_h`` of its planned time. The
subject's first dose on this gateway defines the plan (slot 1 at its start);
slot ``k`` is planned at ``first + (k - 1) * interval``. A later session belongs
to the nearest slot; its ``dose_number`` is that slot's number, so a late or
early dose keeps its number (``in_window`` says it was off time) and a skipped
slot leaves a gap that ``dose_missed`` reports. A session in a slot that already
has a dose is a repeat of it (``repeat_of``), not the next dose.

Pure: slot arithmetic only. Where the plan and the doses are kept is
``devicegw/storage/schedule_book.py``.
"""

from __future__ import annotations

import math
import uuid
import zoneinfo
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta

from devicegw.config import ScheduleSettings
from devicegw.contract.payloads import ScheduleOut

__all__ = ["Placement", "Plan", "missed_notice_id"]

_NAMESPACE = uuid.UUID("9d6c2b1e-7f3a-4e58-8b0c-1a2e3f4d5c6b")


def missed_notice_id(subject_id: str, slot: int, status: str) -> uuid.UUID:
    """Deterministic id of a ``dose_missed`` notice (``status``: missed or withdrawn)."""
    return uuid.uuid5(_NAMESPACE, f"{subject_id}/{slot}/{status}")


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a dose falls in its subject's plan."""

    dose_number: int | None  # None: outside the plan (after its last slot)
    schedule: ScheduleOut | None
    repeat_of: uuid.UUID | None


@dataclass(frozen=True, slots=True)
class Plan:
    """One subject's plan: slots from ``first_utc`` on."""

    settings: ScheduleSettings
    first_utc: datetime
    time_zone: str

    @property
    def slots(self) -> int:
        return self.settings.doses_per_day * self.settings.days

    def planned(self, slot: int) -> datetime:
        return self.first_utc + timedelta(hours=self.settings.interval_h * (slot - 1))

    def slot_of(self, t: datetime) -> int | None:
        """The nearest slot to ``t`` (1-based), or None after the plan's last slot's window."""
        hours = (t - self.first_utc).total_seconds() / 3600.0
        slot = max(1, math.floor(hours / self.settings.interval_h + 0.5) + 1)
        if slot > self.slots:
            last_end = self.planned(self.slots) + timedelta(hours=self.settings.window_h)
            return None if t > last_end else self.slots
        return slot

    def window(self, slot: int) -> tuple[datetime, datetime]:
        planned, half = self.planned(slot), timedelta(hours=self.settings.window_h)
        return planned - half, planned + half

    def out(self, slot: int, at: datetime | None) -> ScheduleOut:
        """The ``schedule`` block of a dose at ``at`` in ``slot`` (None: no dose, missed)."""
        zone = zoneinfo.ZoneInfo(self.time_zone)
        planned = self.planned(slot)
        start, end = self.window(slot)
        local_planned = planned.astimezone(zone)
        return ScheduleOut(
            slot=slot,
            study_day=(slot - 1) // self.settings.doses_per_day + 1,
            slot_of_day=(slot - 1) % self.settings.doses_per_day + 1,
            label="AM" if local_planned.hour < 12 else "PM",
            planned_utc=planned,
            window_start_utc=start,
            window_end_utc=end,
            in_window=at is not None and start <= at <= end,
            local_time=None if at is None else at.astimezone(zone).isoformat(timespec="seconds"),
            time_zone=self.time_zone,
        )

    def closed_before(self, now: datetime) -> Iterator[int]:
        """Slots whose window has closed by ``now``."""
        for slot in range(1, self.slots + 1):
            if self.window(slot)[1] < now:
                yield slot
            else:
                return
