"""Stored dose events -> CDISC SDTM EX-style rows, or FHIR R4 MedicationAdministration.

Input is JSON lines of ``dose_completion`` payloads (the reference EDC
client's ack-store file, for example). Output is deterministic: the same
events give the same bytes, whatever their order in the input.

Blinding: the outputs carry the kit number, the pseudonymous subject id and
a fixed product text ("STUDY DRUG (BLINDED)"); no field is derived from
anything that could name the arm, and the payloads carry no such thing.

Every mapping decision is written down in docs/contract.md ("Exports").
"""

from __future__ import annotations

import csv
import io
import json
import uuid
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from devicegw.contract.vocabulary import PayloadKind, Verdict
from devicegw.errors import GatewayError

Format = Literal["sdtm-ex", "fhir"]
FORMATS: tuple[Format, ...] = ("sdtm-ex", "fhir")

BLINDED_PRODUCT = "STUDY DRUG (BLINDED)"
DEFAULT_STUDY = "UNSPECIFIED"
# A nebulizer kit is a liquid for nebulization. CDISC's "AEROSOL" is a
# pressurised pack (a metered-dose inhaler), which this is not. The same value
# for every subject: it must never differ between arms.
DEFAULT_DOSE_FORM = "SOLUTION"
ROUTE_SDTM = "RESPIRATORY (INHALATION)"
# SNOMED CT international edition, in FHIR's route-codes value set
# (descendants of 284009009 "Route of administration values").
ROUTE_SNOMED = {
    "system": "http://snomed.info/sct",
    "code": "447694001",
    "display": "Respiratory tract route",
}
SUBJECT_SYSTEM = "urn:trial:subject"
DEVICE_SERIAL_SYSTEM = "urn:trial:device-serial"
UCUM = "http://unitsofmeasure.org"
DOSE_STEP = Decimal("0.01")  # mL; the level sensor and cum_ul resolve 1 µL

EX_COLUMNS = (
    "STUDYID",
    "DOMAIN",
    "USUBJID",
    "EXSEQ",
    "EXREFID",  # kit number
    "EXSPID",  # the event_id: traceability back to the MQTT event
    "EXTRT",
    "EXDOSE",
    "EXDOSU",
    "EXDOSFRM",
    "EXROUTE",
    "EXSTDTC",
    "EXENDTC",
    "EXOCCUR",
    "EXADJ",
    # Not EX variables: candidates for SUPPEX (QNAM <= 8 characters).
    "DOSVERD",  # the gateway's verdict
    "QUERYFL",  # Y: data management must look at this record
)

# verdict -> (EXOCCUR, EXADJ label, FHIR status)
VERDICTS: dict[Verdict, tuple[str, str, str]] = {
    Verdict.COMPLETE: ("Y", "", "completed"),
    Verdict.DEVIATION: ("Y", "PROTOCOL DEVIATION", "completed"),
    Verdict.PARTIAL: ("Y", "PARTIAL DOSE", "stopped"),
    Verdict.ABORTED: ("Y", "DOSE ABORTED", "stopped"),  # "N" when nothing was delivered
    Verdict.INDETERMINATE: ("", "DOSE UNKNOWN", "unknown"),
}


class ExportError(GatewayError):
    """The input is not a list of dose events this export can map."""

    def __init__(self, message: str, *, line: int | None = None) -> None:
        self.line = line
        super().__init__(message)


# What the export reads from a dose event. Unknown fields are ignored, as the
# versioning policy asks of every consumer (docs/contract.md).
class _In(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class _Device(_In):
    device_id: str
    model: str | None
    serial_no: str | None


class _Times(_In):
    gateway_start_utc: datetime | None
    gateway_end_utc: datetime
    device_start_utc: datetime | None
    device_end_utc: datetime | None


class _Volume(_In):
    delivered_ml: float | None


class StoredDoseEvent(_In):
    event_type: Literal[PayloadKind.DOSE_COMPLETION]
    event_id: uuid.UUID
    subject_id: str
    kit_number: str
    device: _Device
    verdict: Verdict
    reasons: list[str]
    times: _Times
    volume: _Volume

    def period(self) -> tuple[datetime | None, datetime]:
        """Start and end, both from the gateway clock when it saw the start.

        A session the gateway only rebuilt from the device's log has no
        gateway start: then both ends come from the device clock (when set),
        so start and end are on one clock.
        """
        t = self.times
        if t.gateway_start_utc is not None:
            return t.gateway_start_utc, t.gateway_end_utc
        if t.device_start_utc is not None:
            return t.device_start_utc, t.device_end_utc or t.gateway_end_utc
        return None, t.gateway_end_utc

    def sort_key(self) -> tuple[str, str, str]:
        start, end = self.period()
        return (self.subject_id, iso(start) or iso(end) or "", str(self.event_id))


def record_identity(event: Mapping[str, Any]) -> dict[str, Any]:
    """The dose record without its delivery metadata.

    Two copies of one dose event may differ in ``delivery`` (seq numbers and
    redelivery count, stamped per send) and nowhere else.
    """
    return {k: v for k, v in event.items() if k != "delivery"}


def read_events(lines: Iterable[str]) -> list[StoredDoseEvent]:
    """Parse JSON lines; the first copy of each event_id wins, as on the wire.

    Copies that differ at most in ``delivery`` are dropped; a copy with the
    same event_id and other content is an error (it must never happen).
    """
    first: dict[uuid.UUID, tuple[int, Any]] = {}
    events: list[StoredDoseEvent] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            event = StoredDoseEvent.model_validate(raw)
        except (json.JSONDecodeError, ValidationError) as exc:
            raise ExportError(f"line {number}: not a dose event: {exc}", line=number) from exc
        seen = first.get(event.event_id)
        if seen is None:
            first[event.event_id] = (number, raw)
            events.append(event)
        elif record_identity(seen[1]) != record_identity(raw):
            raise ExportError(
                f"line {number}: event_id {event.event_id} differs from line {seen[0]}",
                line=number,
            )
    return sorted(events, key=StoredDoseEvent.sort_key)


def load_events(path: Path) -> list[StoredDoseEvent]:
    try:
        with path.open(encoding="utf-8") as f:
            return read_events(f)
    except OSError as exc:
        raise ExportError(f"{path}: {exc.strerror}") from exc
    except ExportError as exc:
        raise ExportError(f"{path}: {exc}", line=exc.line) from exc


def iso(t: datetime | None) -> str:
    """ISO 8601 UTC to the second: 2026-11-25T08:00:10Z (empty when unknown)."""
    if t is None:
        return ""
    return t.astimezone(UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def dose_ml(event: StoredDoseEvent) -> Decimal | None:
    """delivered_ml to 0.01 mL, half up, from its decimal text (no binary surprises)."""
    value = event.volume.delivered_ml
    return None if value is None else Decimal(repr(value)).quantize(DOSE_STEP, ROUND_HALF_UP)


def _reason_text(event: StoredDoseEvent) -> str:
    label = VERDICTS[event.verdict][1]
    if not label:
        return ""
    return f"{label}: {', '.join(event.reasons)}" if event.reasons else label


# -- (a) SDTM EX-style CSV ---------------------------------------------------------


def to_sdtm_ex(
    events: Iterable[StoredDoseEvent],
    *,
    study: str = DEFAULT_STUDY,
    dose_form: str = DEFAULT_DOSE_FORM,
) -> list[dict[str, str]]:
    """One EX row per dose event; EXSEQ counts per subject in start order."""
    rows: list[dict[str, str]] = []
    seq: dict[str, int] = {}
    for event in sorted(events, key=StoredDoseEvent.sort_key):
        seq[event.subject_id] = seq.get(event.subject_id, 0) + 1
        start, end = event.period()
        dose = dose_ml(event)
        occur = VERDICTS[event.verdict][0]
        if event.verdict == "aborted" and not dose:
            occur = "N"  # stopped before anything was delivered
        rows.append(
            {
                "STUDYID": study,
                "DOMAIN": "EX",
                "USUBJID": event.subject_id,
                "EXSEQ": str(seq[event.subject_id]),
                "EXREFID": event.kit_number,
                "EXSPID": str(event.event_id),
                "EXTRT": BLINDED_PRODUCT,
                "EXDOSE": "" if dose is None else str(dose),
                "EXDOSU": "mL",
                "EXDOSFRM": dose_form,
                "EXROUTE": ROUTE_SDTM,
                "EXSTDTC": iso(start),
                "EXENDTC": iso(end),
                "EXOCCUR": occur,
                "EXADJ": _reason_text(event),
                "DOSVERD": event.verdict.upper(),
                "QUERYFL": "Y" if event.verdict == Verdict.INDETERMINATE or start is None else "",
            }
        )
    return rows


def render_csv(rows: Iterable[dict[str, str]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=EX_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


# -- (b) FHIR R4 MedicationAdministration ------------------------------------------


def to_medication_administration(event: StoredDoseEvent) -> dict[str, Any]:
    start, end = event.period()
    status = VERDICTS[event.verdict][2]
    resource: dict[str, Any] = {
        "resourceType": "MedicationAdministration",
        "id": str(event.event_id),
        "identifier": [{"system": "urn:ietf:rfc:3986", "value": event.event_id.urn}],
        "status": status,
    }
    reason = _reason_text(event)
    if status != "completed" and reason:
        resource["statusReason"] = [{"text": reason}]
    resource["medicationCodeableConcept"] = {
        "text": f"Study drug (blinded), kit {event.kit_number}"
    }
    resource["subject"] = {
        "type": "Patient",
        "identifier": {"system": SUBJECT_SYSTEM, "value": event.subject_id},
    }
    period = {"start": iso(start), "end": iso(end)}
    resource["effectivePeriod"] = {k: v for k, v in period.items() if v}
    device = event.device
    device_ref: dict[str, Any] = {"type": "Device"}
    if device.serial_no:
        device_ref["identifier"] = {"system": DEVICE_SERIAL_SYSTEM, "value": device.serial_no}
    device_ref["display"] = " ".join(
        x for x in (device.model, device.serial_no or device.device_id) if x
    )
    resource["device"] = [device_ref]
    resource["note"] = [
        {"text": f"devicegw verdict: {event.verdict}" + (f"; {reason}" if reason else "")}
    ]
    dosage: dict[str, Any] = {"route": {"coding": [ROUTE_SNOMED], "text": "Inhalation"}}
    dose = dose_ml(event)
    if dose is not None:
        dosage["dose"] = {"value": float(dose), "unit": "mL", "system": UCUM, "code": "mL"}
    resource["dosage"] = dosage
    return resource


def to_fhir_bundle(events: Iterable[StoredDoseEvent]) -> dict[str, Any]:
    """A Bundle of type ``collection``: one MedicationAdministration per event."""
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {"fullUrl": e.event_id.urn, "resource": to_medication_administration(e)}
            for e in sorted(events, key=StoredDoseEvent.sort_key)
        ],
    }


def render(
    events: list[StoredDoseEvent],
    fmt: Format,
    *,
    study: str = DEFAULT_STUDY,
    dose_form: str = DEFAULT_DOSE_FORM,
) -> str:
    """The exact text written: CSV, or indented JSON with a trailing newline."""
    if fmt == "sdtm-ex":
        return render_csv(to_sdtm_ex(events, study=study, dose_form=dose_form))
    return json.dumps(to_fhir_bundle(events), indent=2, ensure_ascii=False) + "\n"
