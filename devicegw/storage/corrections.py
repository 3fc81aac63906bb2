"""Corrections of recorded doses (issue 11): re-attribute or void, never edit.

A dose attributed to the wrong subject or kit (a late bedside assignment, a
mistaken scan) or one that should not count (a test run on a ward device) is
corrected by a new record that supersedes it: a ``dose_correction`` payload with
a deterministic id (UUIDv5 of the dose's id and the correction's sequence number),
published on the blinded ``dose-correction`` topic through the same durable
outbox. The dose event itself, its outbox row and its audit record are never
changed. The original is looked up in the audit trail (kept for good, unlike the
outbox, which prunes sent events), so a dose of any age can be corrected.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from collections.abc import Mapping
from typing import NoReturn

from devicegw.contract.payloads import DoseCorrection, GatewayRef
from devicegw.core.ports import AuditKind, AuditLog
from devicegw.errors import GatewayError
from devicegw.storage.assignments import KIT_SYNTAX, SUBJECT_SYNTAX
from devicegw.storage.store import Store
from drivers.clock import Clock

__all__ = ["CorrectionRefused", "CorrectionService", "correction_id"]

_NAMESPACE = uuid.UUID("5f0c8a4e-2f43-4c36-9a8e-6b1d0c7e9a31")


class CorrectionRefused(GatewayError):
    """A correction the gateway will not make; ``str(exc)`` is the one-line reason."""


def correction_id(supersedes: uuid.UUID, sequence: int) -> uuid.UUID:
    return uuid.uuid5(_NAMESPACE, f"{supersedes}/correction/{sequence}")


class CorrectionService:
    """Prepares and audits corrections; the caller commits the payload to the outbox."""

    def __init__(
        self,
        store: Store,
        audit: AuditLog,
        *,
        clock: Clock,
        gateway: GatewayRef,
        kit_list: Mapping[str, str] | None = None,
        subject_pattern: str | None = None,
    ) -> None:
        self._store = store
        self._audit = audit
        self._clock = clock
        self._gateway = gateway
        self._kits = dict(kit_list) if kit_list is not None else None
        self._pattern = re.compile(subject_pattern) if subject_pattern else None
        self._lock = threading.Lock()

    def correct(
        self,
        *,
        event_id: str,
        subject_id: str | None,
        kit_number: str | None,
        void: bool,
        operator: str,
        reason: str,
        channel: str,
    ) -> DoseCorrection:
        """The correction to publish (audited), or :class:`CorrectionRefused` (audited)."""
        asked: dict[str, object] = {
            "event_id": event_id,
            "subject_id": subject_id,
            "kit_number": kit_number,
        }
        with self._lock:
            if not operator.strip() or not operator.isprintable() or len(operator) > 128:
                self._refuse(asked, operator, channel, reason, "an operator identity is required")
            if not reason.strip() or not reason.isprintable() or len(reason) > 500:
                self._refuse(asked, operator, channel, reason, "a reason is required")
            try:
                supersedes = uuid.UUID(event_id)
            except ValueError:
                self._refuse(asked, operator, channel, reason, "not an event id (a UUID)")
            original = self._original(str(supersedes))
            if original is None:
                self._refuse(
                    asked, operator, channel, reason, f"no dose {supersedes} recorded here"
                )
            device_id, old_subject, old_kit = original
            if void:
                if subject_id is not None or kit_number is not None:
                    self._refuse(asked, operator, channel, reason, "a void takes no subject or kit")
            else:
                if subject_id is None or kit_number is None:
                    self._refuse(
                        asked, operator, channel, reason, "a subject and a kit are required"
                    )
                if not SUBJECT_SYNTAX.fullmatch(subject_id) or (
                    self._pattern is not None and not self._pattern.fullmatch(subject_id)
                ):
                    self._refuse(
                        asked, operator, channel, reason, "subject id does not match the pattern"
                    )
                if not KIT_SYNTAX.fullmatch(kit_number):
                    self._refuse(asked, operator, channel, reason, "not a kit number")
                if self._kits is not None and self._kits.get(kit_number) != subject_id:
                    self._refuse(
                        asked,
                        operator,
                        channel,
                        reason,
                        f"kit {kit_number} is not listed for subject {subject_id}",
                    )
            sequence = self._corrections_of(str(supersedes)) + 1
            correction = DoseCorrection(
                event_id=correction_id(supersedes, sequence),
                supersedes=supersedes,
                sequence=sequence,
                action="void" if void else "reattribute",
                subject_id=None if void else subject_id,
                kit_number=None if void else kit_number,
                previous_subject_id=old_subject,
                previous_kit_number=old_kit,
                gateway=self._gateway,
                device_id=device_id,
                operator=operator,
                reason=reason,
                corrected_utc=self._clock.now(),
            )
            self._audit.append(
                AuditKind.dose_corrected,
                device_id=device_id,
                subject_id=correction.subject_id or old_subject,
                body={
                    **json.loads(correction.model_dump_json(exclude={"delivery", "gateway"})),
                    "channel": channel,
                },
            )
            return correction

    def _original(self, event_id: str) -> tuple[str, str | None, str | None] | None:
        row = self._store.conn.execute(
            "SELECT device_id, subject_id, body FROM audit WHERE kind = ? "
            "AND json_extract(body, '$.event_id') = ? ORDER BY seq LIMIT 1",
            (AuditKind.session_finished.value, event_id),
        ).fetchone()
        if row is None:
            return None
        body = json.loads(row[2])
        return str(row[0]), row[1], body.get("kit_number")

    def _corrections_of(self, event_id: str) -> int:
        row = self._store.conn.execute(
            "SELECT COUNT(*) FROM audit WHERE kind = ? AND json_extract(body, '$.supersedes') = ?",
            (AuditKind.dose_corrected.value, event_id),
        ).fetchone()
        return int(row[0])

    def _refuse(
        self, asked: dict[str, object], operator: str, channel: str, reason: str, refusal: str
    ) -> NoReturn:
        self._audit.append(
            AuditKind.correction_refused,
            body={
                **{k: None if v is None else str(v)[:200] for k, v in asked.items()},
                "operator": operator[:128],
                "channel": channel,
                "reason": reason[:500],
                "refusal": refusal,
            },
        )
        raise CorrectionRefused(refusal)
