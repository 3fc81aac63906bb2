"""Stored dose events -> CDISC SDTM EC (+ SUPPEC), or FHIR R4 MedicationAdministration.

Input is JSON lines of blinded ``dose_completion`` payloads (the reference
EDC client's ack-store file, for example): contract 2.x, and 1.x events kept
from before the migration, whose restricted reason codes are dropped here as
the v2 gateway drops them (:func:`devicegw.contract.vocabulary.blinded_reasons`).
Nothing from the restricted feed is read.

What the CSV is, honestly: **SDTM EC, Exposure as Collected** (SDTMIG 3.2 to
3.4): one record per nebulization as the device saw it, under the masked
product name, in mL of the reservoir's liquid. EX (exposure in protocol
units, by treatment) is derived from EC by the sponsor after unblinding; this
gateway cannot and must not know the treatment. The gateway's verdict and its
data-management flags are not EC variables: they go to **SUPPEC**.

Deterministic: the same events give the same bytes, whatever their order in
the input and whatever the exporting machine's ``TZ``. A timestamp without a
UTC offset is refused (it would be read as the machine's local time). SDTM
dates are the site's local times with their offset (``[trial] time_zone``);
FHIR dates are UTC. ``ECSEQ`` is derived from the dose itself (its start
second), so a late-arriving event never renumbers the others.

Every mapping decision is written down in docs/contract.md ("Exports").
"""

from __future__ import annotations

import csv
import io
import json
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, ValidationError, field_validator

from devicegw.config import TrialSettings
from devicegw.contract.payloads import DoseCorrection
from devicegw.contract.vocabulary import DataSource, PayloadKind, Reason, Verdict, blinded_reasons
from devicegw.errors import GatewayError

Format = Literal["sdtm-ec", "fhir"]
FORMATS: tuple[Format, ...] = ("sdtm-ec", "fhir")
#: Contract major versions this export reads (docs/contract.md).
READABLE_MAJORS = ("1", "2")

#: ECTRT: the product as the site knows it. SDTMIG: in a masked study where the
#: treatment has no synonym, the value is "MASKED"; the kit number is ECREFID.
MASKED_PRODUCT = "MASKED"
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
STUDY_SYSTEM = "urn:trial:study"
DEVICE_SERIAL_SYSTEM = "urn:trial:device-serial"
# FHIR R4 core extension "Associated Study" (workflow pattern), allowed on
# MedicationAdministration: Reference(ResearchStudy).
RESEARCH_STUDY_EXTENSION = "http://hl7.org/fhir/StructureDefinition/workflow-researchStudy"
UCUM = "http://unitsofmeasure.org"
DOSE_STEP = Decimal("0.01")  # mL; the level sensor and cum_ul resolve 1 µL

EC_FILE = "ec.csv"
SUPPEC_FILE = "suppec.csv"
FHIR_FILE = "fhir.json"

EC_COLUMNS = (
    "STUDYID",
    "DOMAIN",
    "USUBJID",
    "ECSEQ",  # from the dose's start second (UTC epoch): stable when events arrive late
    "ECREFID",  # kit number
    "ECSPID",  # the event_id: traceability back to the MQTT event
    "ECTRT",
    "ECMOOD",
    "ECPRESP",
    "ECOCCUR",
    "ECREASOC",
    "ECDOSE",
    "ECDOSU",
    "ECDOSFRM",
    "ECROUTE",
    "ECSTDTC",
    "ECENDTC",
)
SUPP_COLUMNS = (
    "STUDYID",
    "RDOMAIN",
    "USUBJID",
    "IDVAR",
    "IDVARVAL",
    "QNAM",
    "QLABEL",
    "QVAL",
    "QORIG",
    "QEVAL",
)


@dataclass(frozen=True, slots=True)
class Qualifier:
    qnam: str  # <= 8 characters, letters, digits, underscores
    qlabel: str  # <= 40 characters
    qorig: str


# The SUPPEC qualifiers, in the order written per record.
DOSVERD = Qualifier("DOSVERD", "Gateway Dose Verdict", "Derived")
DOSRSN = Qualifier("DOSRSN", "Gateway Verdict Reason Codes", "Derived")
DATASRC = Qualifier("DATASRC", "Dose Record Data Source", "Assigned")
QUERYFL = Qualifier("QUERYFL", "Data Management Query Flag", "Derived")

# verdict -> FHIR status when something was delivered (or the amount is unknown)
FHIR_STATUS: dict[Verdict, str] = {
    Verdict.COMPLETE: "completed",
    Verdict.DEVIATION: "completed",
    Verdict.PARTIAL: "stopped",
    Verdict.ABORTED: "stopped",
    Verdict.INDETERMINATE: "unknown",
}


class ExportError(GatewayError):
    """The input is not a list of dose events this export can map."""

    def __init__(self, message: str, *, line: int | None = None) -> None:
        self.line = line
        super().__init__(message)


# What the export reads from a dose event. Unknown fields are ignored, as the
# versioning policy asks of every consumer (docs/contract.md). Times must carry
# their UTC offset (AwareDatetime): a naive one is refused, never guessed.
class _In(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class _Gateway(_In):
    site: str


class _Device(_In):
    device_id: str
    model: str | None
    serial_no: str | None


class _Times(_In):
    gateway_start_utc: AwareDatetime | None
    gateway_end_utc: AwareDatetime
    device_start_utc: AwareDatetime | None
    device_end_utc: AwareDatetime | None


class _Volume(_In):
    delivered_ml: float | None


class StoredDoseEvent(_In):
    schema_version: str
    event_type: Literal[PayloadKind.DOSE_COMPLETION]
    event_id: uuid.UUID
    gateway: _Gateway
    subject_id: str
    kit_number: str
    device: _Device
    data_source: DataSource
    verdict: Verdict
    reasons: list[str]
    times: _Times
    volume: _Volume

    @field_validator("schema_version")
    @classmethod
    def _readable(cls, value: str) -> str:
        if value.split(".")[0] not in READABLE_MAJORS:
            raise ValueError(
                f"schema_version {value}: this export reads contract "
                f"{' and '.join(m + '.x' for m in READABLE_MAJORS)}"
            )
        return value

    @property
    def blinded_reasons(self) -> list[Reason]:
        """The reasons a blinded reader may see (a v1 event still carries restricted ones)."""
        return blinded_reasons(self.reasons)

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
        return (self.subject_id, utc_iso(start or end), str(self.event_id))


def record_identity(event: Mapping[str, Any]) -> dict[str, Any]:
    """The dose record without its delivery metadata.

    Two copies of one dose event may differ in ``delivery`` (seq numbers and
    redelivery count, stamped per send) and nowhere else.
    """
    return {k: v for k, v in event.items() if k != "delivery"}


def read_events(
    lines: Iterable[str],
    *,
    unassigned: list[str] | None = None,
    voided: list[str] | None = None,
) -> list[StoredDoseEvent]:
    """Parse JSON lines of dose events and dose corrections, as the EDC stored them.

    The first copy of each event_id wins, as on the wire: copies that differ at
    most in ``delivery`` are dropped; a copy with the same event_id and other
    content is an error (it must never happen).

    Corrections (``dose_correction``, docs/contract.md "Corrections") are applied:
    for each dose the one with the highest ``sequence`` wins; ``reattribute``
    exports the dose under the corrected subject and kit, ``void`` leaves it out
    (its event_id goes to ``voided``). A dose of an unassigned bed (``subject_id``
    null, reason ``unassigned``) that no correction attributes has no subject to
    export under: its event_id goes to ``unassigned`` and it is left out.
    """
    first: dict[str, tuple[int, dict[str, Any]]] = {}
    corrections: dict[str, tuple[int, dict[str, Any]]] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ExportError(f"line {number}: not JSON: {exc}", line=number) from exc
        if not isinstance(raw, dict):
            raise ExportError(f"line {number}: not a JSON object", line=number)
        if raw.get("event_type") == PayloadKind.DOSE_CORRECTION:
            _take_correction(raw, number, corrections)
            continue
        key = str(raw.get("event_id"))
        seen = first.get(key)
        if seen is None:
            first[key] = (number, raw)
        elif record_identity(seen[1]) != record_identity(raw):
            raise ExportError(
                f"line {number}: event_id {key} differs from line {seen[0]}", line=number
            )
    events: list[StoredDoseEvent] = []
    for key, (number, raw) in first.items():
        correction = corrections.get(key)
        if correction is not None:
            action = correction[1]["action"]
            if action == "void":
                if voided is not None:
                    voided.append(key)
                continue
            raw = {
                **raw,
                "subject_id": correction[1]["subject_id"],
                "kit_number": correction[1]["kit_number"],
            }
        if raw.get("subject_id") is None and "unassigned" in (raw.get("reasons") or ()):
            if unassigned is not None:
                unassigned.append(key)
            continue
        try:
            events.append(StoredDoseEvent.model_validate(raw))
        except ValidationError as exc:
            raise ExportError(f"line {number}: not a dose event: {exc}", line=number) from exc
    return sorted(events, key=StoredDoseEvent.sort_key)


def _take_correction(
    raw: dict[str, Any], number: int, corrections: dict[str, tuple[int, dict[str, Any]]]
) -> None:
    """Keep the correction with the highest sequence for its dose."""
    try:
        correction = DoseCorrection.model_validate(raw)
    except ValidationError as exc:
        raise ExportError(f"line {number}: not a dose correction: {exc}", line=number) from exc
    key = str(correction.supersedes)
    kept = corrections.get(key)
    if kept is None or kept[1]["sequence"] < correction.sequence:
        corrections[key] = (
            correction.sequence,
            {
                "sequence": correction.sequence,
                "action": correction.action,
                "subject_id": correction.subject_id,
                "kit_number": correction.kit_number,
            },
        )


def load_events(
    path: Path, *, unassigned: list[str] | None = None, voided: list[str] | None = None
) -> list[StoredDoseEvent]:
    try:
        with path.open(encoding="utf-8") as f:
            return read_events(f, unassigned=unassigned, voided=voided)
    except OSError as exc:
        raise ExportError(f"{path}: {exc.strerror}") from exc
    except ExportError as exc:
        raise ExportError(f"{path}: {exc}", line=exc.line) from exc


def utc_iso(t: datetime | None) -> str:
    """ISO 8601 UTC to the second: 2026-11-25T08:00:10Z (empty when unknown)."""
    if t is None:
        return ""
    return t.astimezone(UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def local_iso(t: datetime | None, trial: TrialSettings, site: str) -> str:
    """ISO 8601 site-local time to the second, with its offset: 2026-11-25T09:00:10+01:00."""
    if t is None:
        return ""
    return t.astimezone(trial.zone_for(site)).replace(microsecond=0).isoformat()


def dose_ml(event: StoredDoseEvent) -> Decimal | None:
    """delivered_ml to 0.01 mL, half up, from its decimal text (no binary surprises)."""
    value = event.volume.delivered_ml
    return None if value is None else Decimal(repr(value)).quantize(DOSE_STEP, ROUND_HALF_UP)


def not_given(event: StoredDoseEvent) -> bool:
    """Stopped before anything (to 0.01 mL) was delivered: the dose did not occur."""
    dose = dose_ml(event)
    return dose is not None and dose == 0


def needs_query(event: StoredDoseEvent) -> bool:
    """Data management must look: the amount is unknown, or so is the start."""
    return event.verdict == Verdict.INDETERMINATE or event.period()[0] is None


def _codes_text(reasons: Iterable[str]) -> str:
    return ", ".join(reasons)


# -- sequence numbers ----------------------------------------------------------------


def sequence_numbers(events: Iterable[StoredDoseEvent]) -> dict[uuid.UUID, int]:
    """ECSEQ per event: the dose's start (else end) as whole UTC epoch seconds.

    SDTM allows any number unique per subject and domain. Deriving it from the
    dose means an event that arrives late gets its own number and changes no
    other. Two doses of one subject in the same second (never seen; a second
    device assigned by mistake) take the next free second, in event_id order.
    """
    taken: dict[str, set[int]] = {}
    out: dict[uuid.UUID, int] = {}
    for event in sorted(events, key=lambda e: (e.subject_id, _seq_base(e), str(e.event_id))):
        used = taken.setdefault(event.subject_id, set())
        seq = _seq_base(event)
        while seq in used:
            seq += 1
        used.add(seq)
        out[event.event_id] = seq
    return out


def _seq_base(event: StoredDoseEvent) -> int:
    start, end = event.period()
    return int((start or end).timestamp())


# -- (a) SDTM EC + SUPPEC -----------------------------------------------------------


def to_sdtm_ec(
    events: Iterable[StoredDoseEvent],
    *,
    trial: TrialSettings,
    dose_form: str = DEFAULT_DOSE_FORM,
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """EC rows (one per dose event) and their SUPPEC rows, in subject and start order."""
    ordered = sorted(events, key=StoredDoseEvent.sort_key)
    seqs = sequence_numbers(ordered)
    ec: list[dict[str, str]] = []
    supp: list[dict[str, str]] = []
    for event in ordered:
        start, end = event.period()
        site = event.gateway.site
        seq = str(seqs[event.event_id])
        dose = dose_ml(event)
        reasons = event.blinded_reasons
        if event.verdict == Verdict.INDETERMINATE:
            occur = ""  # the gateway cannot say; QUERYFL=Y asks data management
        elif not_given(event):
            occur = "N"
        else:
            occur = "Y"
        ec.append(
            {
                "STUDYID": trial.study_id,
                "DOMAIN": "EC",
                "USUBJID": event.subject_id,
                "ECSEQ": seq,
                "ECREFID": event.kit_number,
                "ECSPID": str(event.event_id),
                "ECTRT": MASKED_PRODUCT,
                "ECMOOD": "PERFORMED",
                "ECPRESP": "Y",  # each dose is scheduled by the protocol (BID)
                "ECOCCUR": occur,
                "ECREASOC": _codes_text(reasons).upper().replace("_", " ") if occur == "N" else "",
                # Never 0 for a dose not given (SDTMIG: ECOCCUR=N says it).
                "ECDOSE": "" if dose is None or occur == "N" else str(dose),
                "ECDOSU": "mL",
                "ECDOSFRM": dose_form,
                "ECROUTE": ROUTE_SDTM,
                "ECSTDTC": local_iso(start, trial, site),
                "ECENDTC": local_iso(end, trial, site),
            }
        )
        values = [
            (DOSVERD, event.verdict.upper()),
            (DOSRSN, _codes_text(reasons)),
            (DATASRC, event.data_source.upper()),
            (QUERYFL, "Y" if needs_query(event) else ""),
        ]
        for q, value in values:
            if not value:
                continue  # SUPPQUAL: no record with a null QVAL
            supp.append(
                {
                    "STUDYID": trial.study_id,
                    "RDOMAIN": "EC",
                    "USUBJID": event.subject_id,
                    "IDVAR": "ECSEQ",
                    "IDVARVAL": seq,
                    "QNAM": q.qnam,
                    "QLABEL": q.qlabel,
                    "QVAL": value,
                    "QORIG": q.qorig,
                    "QEVAL": "",
                }
            )
    return ec, supp


def render_csv(rows: Iterable[dict[str, str]], columns: tuple[str, ...]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


# -- (b) FHIR R4 MedicationAdministration ------------------------------------------


def to_medication_administration(event: StoredDoseEvent, *, study_id: str) -> dict[str, Any]:
    start, end = event.period()
    status = "not-done" if not_given(event) else FHIR_STATUS[event.verdict]
    reasons = _codes_text(event.blinded_reasons)
    resource: dict[str, Any] = {
        "resourceType": "MedicationAdministration",
        "id": str(event.event_id),
        "extension": [
            {
                "url": RESEARCH_STUDY_EXTENSION,
                "valueReference": {
                    "type": "ResearchStudy",
                    "identifier": {"system": STUDY_SYSTEM, "value": study_id},
                },
            }
        ],
        "identifier": [{"system": "urn:ietf:rfc:3986", "value": event.event_id.urn}],
        "status": status,
    }
    if status != "completed" and reasons:
        resource["statusReason"] = [{"text": reasons}]
    resource["medicationCodeableConcept"] = {"text": f"Study drug (masked), kit {event.kit_number}"}
    resource["subject"] = {
        "type": "Patient",
        "identifier": {"system": SUBJECT_SYSTEM, "value": event.subject_id},
    }
    period = {"start": utc_iso(start), "end": utc_iso(end)}
    resource["effectivePeriod"] = {k: v for k, v in period.items() if v}
    device = event.device
    device_ref: dict[str, Any] = {"type": "Device"}
    if device.serial_no:
        device_ref["identifier"] = {"system": DEVICE_SERIAL_SYSTEM, "value": device.serial_no}
    device_ref["display"] = " ".join(
        x for x in (device.model, device.serial_no or device.device_id) if x
    )
    resource["device"] = [device_ref]
    note = f"devicegw verdict: {event.verdict}" + (f"; reasons: {reasons}" if reasons else "")
    resource["note"] = [{"text": note}]
    dosage: dict[str, Any] = {"route": {"coding": [ROUTE_SNOMED], "text": "Inhalation"}}
    dose = dose_ml(event)
    if dose is not None and status != "not-done":
        dosage["dose"] = {"value": float(dose), "unit": "mL", "system": UCUM, "code": "mL"}
    resource["dosage"] = dosage
    return resource


def to_fhir_bundle(events: Iterable[StoredDoseEvent], *, study_id: str) -> dict[str, Any]:
    """A Bundle of type ``collection``: one MedicationAdministration per event."""
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {
                "fullUrl": e.event_id.urn,
                "resource": to_medication_administration(e, study_id=study_id),
            }
            for e in sorted(events, key=StoredDoseEvent.sort_key)
        ],
    }


def render(
    events: list[StoredDoseEvent],
    fmt: Format,
    *,
    trial: TrialSettings,
    dose_form: str = DEFAULT_DOSE_FORM,
) -> dict[str, str]:
    """File name -> the exact text written (``ec.csv`` + ``suppec.csv``, or ``fhir.json``)."""
    if fmt == "sdtm-ec":
        ec, supp = to_sdtm_ec(events, trial=trial, dose_form=dose_form)
        return {EC_FILE: render_csv(ec, EC_COLUMNS), SUPPEC_FILE: render_csv(supp, SUPP_COLUMNS)}
    bundle = to_fhir_bundle(events, study_id=trial.study_id)
    return {FHIR_FILE: json.dumps(bundle, indent=2, ensure_ascii=False) + "\n"}
