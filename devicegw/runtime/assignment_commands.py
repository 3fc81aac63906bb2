"""The one way into bedside assignments for every channel (issue 11).

``devicegw assign`` (over the daemon's local socket), the MQTT ``cmd/assign``
command and the ward dashboard's form all build an :class:`AssignRequest` and call
:meth:`AssignmentDesk.apply`, which hands it to the
:class:`~devicegw.storage.assignments.AssignmentService` (validation, audit,
append-only history). A refusal is a result, not an exception: its message is the
one line the caller shows. :func:`seed_initial` turns the configuration's
``subject_id``/``kit_number`` into a bed's first assignment.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NoReturn

from pydantic import ValidationError

from devicegw.config import Config
from devicegw.contract.payloads import AssignCommand
from devicegw.safe_text import printable
from devicegw.storage.assignments import Assignment, AssignmentRefused, AssignmentService
from devicegw.storage.schedule_book import ScheduleBook

__all__ = ["AssignRequest", "AssignResult", "AssignmentDesk", "request_from", "seed_initial"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AssignRequest:
    """Assign ``subject_id`` with ``kit_number`` to ``bed``, or end its assignment (``end``)."""

    bed: str
    operator: str
    reason: str
    channel: str  # "cli", "mqtt", "web": who asked, for the audit trail
    subject_id: str | None = None
    kit_number: str | None = None
    end: bool = False
    override_reason: str | None = None
    #: With [schedule]: the subject's dose 1 is planned then (else the first dose decides).
    planned_first_dose_utc: datetime | None = None


def request_from(data: dict[str, Any], channel: str) -> AssignRequest | str:
    """A request from JSON data (the socket and MQTT: the fields of :class:`AssignCommand`),
    or the first reason the data is not one."""
    try:
        command = AssignCommand.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in first["loc"]) or "command"
        return f"{printable(where, limit=40)}: {first['msg']}"
    return AssignRequest(
        bed=command.bed,
        operator=command.operator,
        reason=command.reason,
        channel=channel,
        subject_id=command.subject_id,
        kit_number=command.kit_number,
        end=command.end,
        override_reason=command.override_reason,
        planned_first_dose_utc=command.planned_first_dose_utc,
    )


@dataclass(frozen=True, slots=True)
class AssignResult:
    applied: bool
    message: str  # one line: what was done, or why it was refused
    assignment: Assignment | None = None


class AssignmentDesk:
    """Applies assignment requests; one instance per gateway (``Gateway.assignments``)."""

    def __init__(self, service: AssignmentService, schedule: ScheduleBook | None = None) -> None:
        self.service = service
        self.schedule = schedule

    def refuse(self, channel: str, why: str) -> AssignResult:
        """A request too malformed to name a bed: refused and audited all the same."""
        try:
            self.service.refuse(
                bed="?", operator="?", reason="?", channel=channel, asked={}, refusal=why
            )
        except AssignmentRefused as exc:
            return AssignResult(False, str(exc))
        raise AssertionError("AssignmentService.refuse returned")  # it always raises

    def apply(self, request: AssignRequest) -> AssignResult:
        service = self.service
        asked: dict[str, object] = {
            "subject_id": request.subject_id,
            "kit_number": request.kit_number,
            "end": request.end,
        }

        def refuse(why: str, **more: object) -> NoReturn:
            service.refuse(
                bed=request.bed,
                operator=request.operator,
                reason=request.reason,
                channel=request.channel,
                asked={**asked, **more},
                refusal=why,
            )

        try:
            if request.end:
                if request.subject_id is not None or request.kit_number is not None:
                    refuse("an end takes no subject or kit")
                a = service.end(
                    bed=request.bed,
                    operator=request.operator,
                    reason=request.reason,
                    channel=request.channel,
                )
                return AssignResult(True, f"bed {a.bed} unassigned", a)
            if request.subject_id is None or request.kit_number is None:
                refuse("a subject and a kit are required (or end the bed)")
            planned = request.planned_first_dose_utc
            if planned is not None:
                why = self._cannot_plan(request.subject_id, planned)
                if why is not None:
                    refuse(why, planned_first_dose_utc=planned.isoformat())
            a = service.assign(
                bed=request.bed,
                subject_id=request.subject_id,
                kit_number=request.kit_number,
                operator=request.operator,
                reason=request.reason,
                channel=request.channel,
                override_reason=request.override_reason,
                planned_first_dose_utc=planned,
            )
        except AssignmentRefused as exc:
            return AssignResult(False, str(exc))
        if planned is not None and self.schedule is not None:
            self.schedule.plan_from(request.subject_id, planned)
        return AssignResult(True, f"bed {a.bed}: subject {a.subject_id}, kit {a.kit_number}", a)

    def _cannot_plan(self, subject_id: str, planned: datetime) -> str | None:
        if self.schedule is None:
            return "a planned first dose needs [schedule] in the gateway's configuration"
        if planned.tzinfo is None:
            return "the planned first dose needs a time zone offset (e.g. Z)"
        if self.schedule.has_doses(subject_id):
            return f"subject {subject_id}'s schedule has started: its first dose is given"
        return None


def seed_initial(service: AssignmentService, config: Config) -> None:
    """The configuration's subject and kit become a bed's first assignment.

    Only for a bed with no assignment history: once a bed has been assigned (by any
    channel, or by an earlier start), the store's history decides and the config's
    values are ignored, with a warning if they differ from the assignment in force.
    """
    current = service.current()
    for device in config.devices:
        if device.subject_id is None or device.kit_number is None:
            continue
        if service.history(device.bed):
            now = current.get(device.bed)
            if now is None or (now.subject_id, now.kit_number) != (
                device.subject_id,
                device.kit_number,
            ):
                log.warning(
                    "bed %s: the configuration's subject and kit are ignored; the bed's "
                    "assignment history decides (devicegw assignments shows it)",
                    device.bed,
                    extra={"device_id": device.id, "bed": device.bed},
                )
            continue
        result = AssignmentDesk(service).apply(
            AssignRequest(
                bed=device.bed,
                subject_id=device.subject_id,
                kit_number=device.kit_number,
                operator="config",
                reason="initial assignment from the configuration"
                + (f" (sha256 {config.source_sha256[:12]})" if config.source_sha256 else ""),
                channel="config",
            )
        )
        if not result.applied:
            log.error(
                "bed %s: the configuration's assignment is refused: %s; the bed is unassigned",
                device.bed,
                result.message,
                extra={"device_id": device.id, "bed": device.bed},
            )
