"""Corrections of recorded doses, applied by the running gateway (issue 11).

``devicegw correct`` reaches this over the daemon's control socket
(``devicegw/runtime/control_socket.py``): the correction is prepared and
audited by :class:`~devicegw.storage.corrections.CorrectionService` and
committed to the outbox, from which the publisher sends it (now, or after an
outage) on ``{prefix}/{site}/{gateway}/dose-correction/{device}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from devicegw.contract.topics import Topics
from devicegw.contract.vocabulary import TopicKind
from devicegw.mqtt.publisher import MqttPublisher
from devicegw.runtime.assignment_commands import AssignResult
from devicegw.safe_text import printable
from devicegw.storage.corrections import CorrectionRefused, CorrectionService

__all__ = ["CorrectRequest", "CorrectionDesk", "correct_request_from"]


@dataclass(frozen=True, slots=True)
class CorrectRequest:
    event_id: str
    operator: str
    reason: str
    channel: str
    subject_id: str | None = None
    kit_number: str | None = None
    void: bool = False


_KNOWN = frozenset(("event_id", "operator", "reason", "subject_id", "kit_number", "void"))


def correct_request_from(data: dict[str, Any], channel: str) -> CorrectRequest | str:
    """A request from JSON data, or why the data is not one."""
    unknown = sorted(k for k in data if k not in _KNOWN)
    if unknown:
        return f"unknown field {printable(unknown[0], limit=40)!r}"
    for key in ("event_id", "operator", "reason"):
        if not isinstance(data.get(key), str):
            return f"{key}: a text value is required"
    for key in ("subject_id", "kit_number"):
        if data.get(key) is not None and not isinstance(data[key], str):
            return f"{key}: must be text"
    void = data.get("void", False)
    if not isinstance(void, bool):
        return "void: must be true or false"
    return CorrectRequest(
        event_id=data["event_id"],
        operator=data["operator"],
        reason=data["reason"],
        channel=channel,
        subject_id=data.get("subject_id"),
        kit_number=data.get("kit_number"),
        void=void,
    )


class CorrectionDesk:
    def __init__(
        self, service: CorrectionService, publisher: MqttPublisher, topics: Topics
    ) -> None:
        self.service = service
        self._publisher = publisher
        self._topics = topics

    def apply(self, request: CorrectRequest) -> AssignResult:
        try:
            correction = self.service.correct(
                event_id=request.event_id,
                subject_id=request.subject_id,
                kit_number=request.kit_number,
                void=request.void,
                operator=request.operator,
                reason=request.reason,
                channel=request.channel,
            )
        except CorrectionRefused as exc:
            return AssignResult(False, str(exc))
        self._publisher.commit_unique(
            TopicKind.DOSE_CORRECTION,
            self._topics.dose_correction(correction.device_id),
            correction,
            device_id=correction.device_id,
            event_id=str(correction.event_id),
        )
        what = (
            "voided"
            if correction.action == "void"
            else f"re-attributed to {correction.subject_id}, kit {correction.kit_number}"
        )
        return AssignResult(
            True, f"dose {correction.supersedes} {what} (correction {correction.event_id})"
        )
