"""Every payload the gateway publishes, as pydantic models: the MQTT contract.

JSON on the wire. Each payload has a ``schema_version``; fields are added
within a major version, never renamed or repurposed. Nothing here names or
hints at the treatment arm: a dose is identified by kit number and
pseudonymous subject ID only.

Two feeds (docs/blinding.md). The blinded feed (:class:`DoseEvent`,
:class:`DeviceStatus`, :class:`Telemetry`, gateway status, SpO2 safety) is what
the EDC and blinded staff see: no rate, fill, residual, rate integral, device
total, nebulizing time, pause detail or alarm code, since the two products
may nebulize differently. The restricted feed (:class:`DoseDetail`,
:class:`DeviceDetail`, :class:`TelemetryDetail`) carries that physical record
for engineering roles, joined to the dose by the same ``event_id``.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from devicegw.contract.base import SCHEMA_VERSION, Delivery, Payload
from devicegw.contract.spo2 import Spo2Summary
from devicegw.contract.vocabulary import DataSource, DeliveredBasis, PayloadKind, Verdict

# Namespace for deterministic event ids (UUIDv5); never change it.
EVENT_NAMESPACE = uuid.UUID("5d0c3a8e-2f61-4a53-9a0e-6b1f2f8c7d41")


def dose_event_id(model: str, serial_no: str, session_no: int, epoch: int = 0) -> uuid.UUID:
    """Same device session -> same id, on any gateway, after any restart.

    The gateway id is deliberately not part of it: a session reconciled by a
    second gateway is the same dose, and must deduplicate as such. ``epoch``
    counts the device's session-counter resets (board swap, re-flash): after
    one, session numbers repeat, and the new sessions need ids of their own;
    epoch 0 keeps every earlier id unchanged.
    """
    name = f"dose/{model}/{serial_no}/{session_no}"
    if epoch:
        name = f"dose/{model}/{serial_no}/epoch-{epoch}/{session_no}"
    return uuid.uuid5(EVENT_NAMESPACE, name)


_Payload = Payload


class GatewayRef(_Payload):
    id: str
    site: str
    version: str


class DeviceIdentity(_Payload):
    device_id: str = Field(description="The device's name in the gateway configuration")
    model: str | None
    serial_no: str | None
    firmware: str | None


class DoseTimes(_Payload):
    """When the dose was given: what the protocol needs, on the blinded feed."""

    gateway_start_utc: datetime | None = Field(
        description="gateway clock when it received SESSION_START; null if it never saw it"
    )
    gateway_end_utc: datetime = Field(description="gateway clock when it learned of the end")
    device_start_utc: datetime | None = Field(
        description="device clock at start; null if never set"
    )
    device_end_utc: datetime | None
    duration_s: float | None = Field(description="SESSION_START to SESSION_END in device time")


class DoseVolume(_Payload):
    """How much was given: prescribed, delivered and their ratio; nothing physical."""

    prescribed_ml: float
    delivered_ml: float | None = Field(description="null when no estimate can be trusted")
    delivered_fraction: float | None = Field(description="delivered_ml / prescribed_ml")


class DoseRulesOut(_Payload):
    prescribed_volume_ml: float
    min_delivered_fraction: float
    abort_below_fraction: float
    max_delivered_fraction: float = 1.15
    min_duration_s: float
    max_duration_s: float
    max_total_pause_s: float
    volume_tolerance_ml: float


class ScheduleOut(_Payload):
    """Where a dose falls in its subject's dosing schedule (docs/assignments.md, "Schedule")."""

    slot: int = Field(ge=1, description="the planned dose's number: 1 .. doses_per_day x days")
    study_day: int = Field(ge=1, description="day 1 begins with the subject's first dose")
    slot_of_day: int = Field(ge=1)
    label: Literal["AM", "PM"] = Field(description="of the planned time, in the site's zone")
    planned_utc: datetime
    window_start_utc: datetime
    window_end_utc: datetime
    in_window: bool = Field(description="the session started within the window")
    local_time: str | None = Field(
        description="the session's start as the site's local time with its offset; null: none"
    )
    time_zone: str


class DoseEvent(_Payload):
    """One per nebulization session on the blinded ``dose`` topic: the record the EDC keeps."""

    schema_version: Literal["2.0"] = SCHEMA_VERSION
    event_type: Literal[PayloadKind.DOSE_COMPLETION] = PayloadKind.DOSE_COMPLETION
    delivery: Delivery | None = None
    event_id: uuid.UUID
    gateway: GatewayRef
    subject_id: str | None = Field(
        description="the subject assigned to the bed at the session's start; null only "
        "with the reason `unassigned` (docs/assignments.md)"
    )
    kit_number: str | None = Field(description="null only with the reason `unassigned`")
    bed: str
    device: DeviceIdentity
    session_no: int
    data_source: DataSource
    verdict: Verdict
    reasons: list[str] = Field(
        description="blinded reason codes (docs/mqtt.md); consumers ignore codes they do not know"
    )
    times: DoseTimes
    volume: DoseVolume
    rules: DoseRulesOut
    config_sha256: str
    spo2: Spo2Summary | None = Field(
        default=None,
        description="SpO2 during the session from the bed's oximeter, or why it is unavailable",
    )
    dose_number: int | None = Field(
        default=None,
        description="the subject's planned dose this session was (its schedule slot); null "
        "without a [schedule], on an unassigned bed, or after the plan's last slot",
    )
    schedule: ScheduleOut | None = None
    repeat_of: uuid.UUID | None = Field(
        default=None,
        description="a second session for the same slot: the event_id of the slot's first",
    )


# -- the restricted feed: the physical record ------------------------------------------


class PauseOut(_Payload):
    start_offset_s: float
    duration_s: float
    cut_by_link: bool = Field(
        default=False,
        description="the link dropped during the pause: it ends at the drop, its true end unknown",
    )


class PauseSummary(_Payload):
    count: int
    total_s: float
    items: list[PauseOut]


class AlarmOut(_Payload):
    code: int
    name: str
    raised_offset_s: float | None
    cleared_offset_s: float | None


class VolumeDetail(_Payload):
    prescribed_ml: float
    fill_ml: float | None
    residual_ml: float | None
    reservoir_drop_ml: float | None = Field(
        description="fill - residual: the level sensor's estimate"
    )
    output_integral_ml: float | None = Field(
        description="integral of OUTPUT rate samples over their device times"
    )
    device_cum_ml: float | None = Field(
        description="the device's own output total (cum_ul); null if never reported"
    )
    delivered_ml: float | None
    delivered_basis: DeliveredBasis | None
    delivered_fraction: float | None
    max_disagreement_ml: float | None
    tolerance_ml: float
    estimates_agree: bool | None
    findings: list[str] = Field(
        default_factory=list,
        description="what the plausibility checks found in these readings (reason codes)",
    )


class RateStats(_Payload):
    """The OUTPUT rate samples of the session (device's instantaneous estimates)."""

    samples: int
    mean_ul_min: float | None = Field(
        description="output integral / nebulizing time: the rate while the mesh was driven"
    )
    min_ul_min: int | None = Field(description="lowest sample, pauses included")
    max_ul_min: int | None
    nominal_ul_min: int | None = Field(description="the device's nominal rate (IDENT)")


class LinkQuality(_Payload):
    interruptions: int
    down_s: float
    frames_lost: int
    bad_frames: int
    sample_count: int
    sample_gap_s: float
    sample_gaps: int


class TimesDetail(_Payload):
    gateway_start_utc: datetime | None
    gateway_end_utc: datetime
    device_start_utc: datetime | None
    device_end_utc: datetime | None
    device_start_uptime_ms: int | None
    device_end_uptime_ms: int | None
    duration_s: float | None
    duration_at_least_s: float | None = Field(
        default=None,
        description="with duration_s unknown (device clock never set, session not seen to "
        "its end): the least the session lasted, from neb_ms or what was seen",
    )
    nebulizing_s: float | None = Field(
        description="time the mesh was driven (device's neb_ms); null if the device's record "
        "of the session was unavailable"
    )


class DoseMissed(_Payload):
    """A planned dose with no session by the end of its window (``dose-missed`` topic).

    ``status: withdrawn`` cancels an earlier ``missed`` notice for the same slot:
    a session of that slot arrived later (e.g. fetched from the device's log).
    """

    schema_version: Literal["2.0"] = SCHEMA_VERSION
    event_type: Literal[PayloadKind.DOSE_MISSED] = PayloadKind.DOSE_MISSED
    delivery: Delivery | None = None
    event_id: uuid.UUID = Field(description="deterministic: subject, slot and status")
    status: Literal["missed", "withdrawn"]
    subject_id: str
    bed: str
    device_id: str
    gateway: GatewayRef
    dose_number: int
    schedule: ScheduleOut
    withdrawn_by: uuid.UUID | None = Field(description="the dose event that filled the slot")
    decided_utc: datetime


class AssignCommand(_Payload):
    """A bed assignment pushed to the gateway on ``cmd/assign/{username}`` (MQTT 5).

    The fields of ``devicegw assign``; ``schema_version`` and ``event_type`` may be
    left out. Values are checked as an assignment (docs/assignments.md).
    """

    model_config = ConfigDict(strict=True)

    schema_version: Literal["2.0"] = SCHEMA_VERSION
    event_type: Literal[PayloadKind.ASSIGN_COMMAND] = PayloadKind.ASSIGN_COMMAND
    bed: str
    operator: str = Field(description="who assigns, as the sending system knows them")
    reason: str
    subject_id: str | None = None
    kit_number: str | None = None
    end: bool = Field(default=False, description="end the bed's assignment (no subject, kit)")
    override_reason: str | None = Field(default=None, description="to use a kit already used")
    planned_first_dose_utc: datetime | None = Field(
        default=None,
        strict=False,
        description="when the subject's dose 1 is planned (with [schedule]); absent: the "
        "first dose given defines day 1",
    )


class AssignAnswer(_Payload):
    """The gateway's answer to an :class:`AssignCommand` (to the requester's own topic)."""

    schema_version: Literal["2.0"] = SCHEMA_VERSION
    event_type: Literal[PayloadKind.ASSIGN_ANSWER] = PayloadKind.ASSIGN_ANSWER
    applied: bool
    message: str = Field(description="what was done, or the one-line reason it was refused")


class DoseCorrection(_Payload):
    """A dose event re-attributed or voided after the fact (blinded ``dose-correction`` topic).

    The original event is never edited: a subscriber applies the correction with the
    highest ``sequence`` for a dose (docs/contract.md, "Corrections").
    """

    schema_version: Literal["2.0"] = SCHEMA_VERSION
    event_type: Literal[PayloadKind.DOSE_CORRECTION] = PayloadKind.DOSE_CORRECTION
    delivery: Delivery | None = None
    event_id: uuid.UUID = Field(description="deterministic: UUIDv5 of supersedes and sequence")
    supersedes: uuid.UUID = Field(description="the dose event's event_id")
    sequence: int = Field(ge=1, description="1 for a dose's first correction, then 2, ...")
    action: Literal["reattribute", "void"]
    subject_id: str | None = Field(description="the right subject (reattribute); null: void")
    kit_number: str | None = Field(description="the right kit (reattribute); null: void")
    previous_subject_id: str | None
    previous_kit_number: str | None
    gateway: GatewayRef
    device_id: str
    operator: str
    reason: str
    corrected_utc: datetime


class DoseDetail(_Payload):
    """The physical record of one session, restricted (``dose-detail`` topic).

    Same ``event_id`` as the blinded :class:`DoseEvent`, committed in the same
    transaction; no subject or kit: whoever may join the two does so by id.
    """

    schema_version: Literal["2.0"] = SCHEMA_VERSION
    event_type: Literal[PayloadKind.DOSE_DETAIL] = PayloadKind.DOSE_DETAIL
    delivery: Delivery | None = None
    event_id: uuid.UUID
    gateway: GatewayRef
    device: DeviceIdentity
    session_no: int
    data_source: DataSource
    end_reason: str = Field(description="the device's SESSION_END reason")
    verdict: Verdict
    reasons: list[str] = Field(description="every reason code, restricted ones included")
    times: TimesDetail
    pauses: PauseSummary
    volume: VolumeDetail
    rate: RateStats
    alarms: list[AlarmOut]
    link: LinkQuality
    rules: DoseRulesOut
    config_sha256: str


class DeviceStatus(_Payload):
    """Retained per device (blinded); stale when the gateway's status says offline.

    Whether a device is there and what it is doing; nothing that follows from
    how the product nebulizes (battery drains with nebulizing time: restricted).
    """

    schema_version: Literal["2.0"] = SCHEMA_VERSION
    event_type: Literal[PayloadKind.DEVICE_STATUS] = PayloadKind.DEVICE_STATUS
    delivery: Delivery | None = None
    gateway_id: str
    device_id: str
    connected: bool
    state: str | None
    identity: DeviceIdentity
    last_seen_utc: datetime | None
    error: str | None = None


class DeviceDetail(_Payload):
    """Retained per device (restricted): battery, reservoir level, fault and active alarms."""

    schema_version: Literal["2.0"] = SCHEMA_VERSION
    event_type: Literal[PayloadKind.DEVICE_DETAIL] = PayloadKind.DEVICE_DETAIL
    delivery: Delivery | None = None
    gateway_id: str
    device_id: str
    connected: bool
    battery_pct: int | None = Field(description="null on mains (0xFF) or not reported")
    on_mains: bool | None
    reservoir_ml: float | None = Field(description="null when unknown (0xFFFF) or not reported")
    fault_code: int | None
    active_alarms: list[str]


class StoreState(_Payload):
    """The gateway's store as a monitor must see it: a full disk is said on the topic."""

    disk_full: bool = Field(
        description="decided writes are held in memory because the disk refused them"
    )
    held_writes: int
    held_dose_events: int


class GatewayStatus(_Payload):
    """Retained; the broker publishes the offline form as the gateway's last will."""

    schema_version: Literal["2.0"] = SCHEMA_VERSION
    event_type: Literal[PayloadKind.GATEWAY_STATUS] = PayloadKind.GATEWAY_STATUS
    delivery: Delivery | None = None
    gateway_id: str
    site: str
    online: bool
    version: str
    config_sha256: str | None
    devices: list[str]
    since_utc: datetime | None
    store: StoreState | None = Field(
        default=None, description="while online; republished when the disk fills or frees"
    )


class Telemetry(_Payload):
    """Live progress of a device (blinded), at most once per telemetry interval (QoS 0)."""

    schema_version: Literal["2.0"] = SCHEMA_VERSION
    event_type: Literal[PayloadKind.TELEMETRY] = PayloadKind.TELEMETRY
    delivery: Delivery | None = None
    gateway_id: str
    device_id: str
    utc: datetime
    state: str | None
    session_no: int | None
    elapsed_s: float | None


class TelemetryDetail(_Payload):
    """Live output of a device (restricted), sent with each :class:`Telemetry` (QoS 0)."""

    schema_version: Literal["2.0"] = SCHEMA_VERSION
    event_type: Literal[PayloadKind.TELEMETRY_DETAIL] = PayloadKind.TELEMETRY_DETAIL
    delivery: Delivery | None = None
    gateway_id: str
    device_id: str
    utc: datetime
    session_no: int | None
    rate_ul_min: int | None
    delivered_ml: float | None = Field(description="device's cum_ul so far this session")
    reservoir_ml: float | None
    battery_pct: int | None


def encode_json(payload: BaseModel) -> bytes:
    """The one JSON encoding of every payload (stable key order, UTC ISO times): what the
    outbox stores and publishes (``devicegw.mqtt.publisher.encode``) and the audit hashes."""
    return payload.model_dump_json().encode("utf-8")


@dataclass(frozen=True, slots=True)
class DoseRecord:
    """One session's two messages: the blinded event and its restricted detail (same id)."""

    event: DoseEvent
    detail: DoseDetail
    #: Both payloads' JSON bytes, encoded on first use and kept: the outbox stores them and
    #: the audit trail hashes them (encoded for each, they were a third of a finished
    #: dose's time on the event loop at 500 beds). The payloads are frozen models.
    _encoded: tuple[bytes, bytes] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def encoded(self) -> tuple[bytes, bytes]:
        """(event, detail) as :func:`encode_json` makes them, encoded once."""
        encoded = self._encoded
        if encoded is None:
            encoded = (encode_json(self.event), encode_json(self.detail))
            object.__setattr__(self, "_encoded", encoded)
        return encoded
