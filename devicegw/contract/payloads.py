"""Every payload the gateway publishes, as pydantic models: the MQTT contract.

JSON on the wire. Each payload has a ``schema_version``; fields are added
within a major version, never renamed or repurposed. Nothing here names or
hints at the treatment arm: a dose is identified by kit number and
pseudonymous subject ID only.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from pydantic import Field

from devicegw.contract.base import SCHEMA_VERSION, Delivery, Payload
from devicegw.contract.spo2 import Spo2Summary
from devicegw.contract.vocabulary import DataSource, DeliveredBasis, PayloadKind, Verdict

# Namespace for deterministic event ids (UUIDv5); never change it.
EVENT_NAMESPACE = uuid.UUID("5d0c3a8e-2f61-4a53-9a0e-6b1f2f8c7d41")


def dose_event_id(model: str, serial_no: str, session_no: int) -> uuid.UUID:
    """Same device session -> same id, on any gateway, after any restart.

    The gateway id is deliberately not part of it: a session reconciled by a
    second gateway is the same dose, and must deduplicate as such.
    """
    return uuid.uuid5(EVENT_NAMESPACE, f"dose/{model}/{serial_no}/{session_no}")


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


class PauseOut(_Payload):
    start_offset_s: float
    duration_s: float


class PauseSummary(_Payload):
    count: int
    total_s: float
    items: list[PauseOut]


class AlarmOut(_Payload):
    code: int
    name: str
    raised_offset_s: float | None
    cleared_offset_s: float | None


class VolumeOut(_Payload):
    prescribed_ml: float
    fill_ml: float | None
    residual_ml: float | None
    reservoir_drop_ml: float | None = Field(
        description="fill - residual: the level sensor's estimate"
    )
    output_integral_ml: float | None = Field(
        description="integral of OUTPUT rate samples over their device times"
    )
    device_cum_ml: float = Field(description="the device's own output total (cum_ul)")
    delivered_ml: float | None
    delivered_basis: DeliveredBasis | None
    delivered_fraction: float | None
    max_disagreement_ml: float | None
    tolerance_ml: float
    estimates_agree: bool | None


class LinkQuality(_Payload):
    interruptions: int
    down_s: float
    frames_lost: int
    bad_frames: int
    sample_count: int
    sample_gap_s: float
    sample_gaps: int


class DoseTimes(_Payload):
    gateway_start_utc: datetime | None
    gateway_end_utc: datetime
    device_start_utc: datetime | None = Field(
        description="device clock at start; null if never set"
    )
    device_end_utc: datetime | None
    device_start_uptime_ms: int | None
    device_end_uptime_ms: int | None
    duration_s: float | None = Field(description="SESSION_START to SESSION_END in device time")
    nebulizing_s: float


class DoseRulesOut(_Payload):
    prescribed_volume_ml: float
    min_delivered_fraction: float
    abort_below_fraction: float
    min_duration_s: float
    max_duration_s: float
    max_total_pause_s: float
    volume_tolerance_ml: float


class DoseEvent(_Payload):
    """One per nebulization session: the record the EDC keeps."""

    schema_version: Literal["1.0"] = SCHEMA_VERSION
    event_type: Literal[PayloadKind.DOSE_COMPLETION] = PayloadKind.DOSE_COMPLETION
    delivery: Delivery | None = None
    event_id: uuid.UUID
    gateway: GatewayRef
    subject_id: str
    kit_number: str
    bed: str
    device: DeviceIdentity
    session_no: int
    data_source: DataSource
    end_reason: str
    verdict: Verdict
    reasons: list[str] = Field(
        description="reason codes (docs/mqtt.md); consumers ignore codes they do not know"
    )
    times: DoseTimes
    pauses: PauseSummary
    volume: VolumeOut
    alarms: list[AlarmOut]
    link: LinkQuality
    rules: DoseRulesOut
    config_sha256: str
    spo2: Spo2Summary | None = Field(
        default=None,
        description="SpO2 during the session from the bed's oximeter, or why it is unavailable",
    )


class DeviceStatus(_Payload):
    """Retained per device; stale when the gateway's status says offline."""

    schema_version: Literal["1.0"] = SCHEMA_VERSION
    event_type: Literal[PayloadKind.DEVICE_STATUS] = PayloadKind.DEVICE_STATUS
    delivery: Delivery | None = None
    gateway_id: str
    device_id: str
    connected: bool
    state: str | None
    identity: DeviceIdentity
    battery_pct: int | None
    on_mains: bool | None
    reservoir_ml: float | None
    active_alarms: list[str]
    last_seen_utc: datetime | None
    error: str | None = None


class GatewayStatus(_Payload):
    """Retained; the broker publishes the offline form as the gateway's last will."""

    schema_version: Literal["1.0"] = SCHEMA_VERSION
    event_type: Literal[PayloadKind.GATEWAY_STATUS] = PayloadKind.GATEWAY_STATUS
    delivery: Delivery | None = None
    gateway_id: str
    site: str
    online: bool
    version: str
    config_sha256: str | None
    devices: list[str]
    since_utc: datetime | None


class Telemetry(_Payload):
    """Live view of a device, at most once per telemetry interval (QoS 0, may be dropped)."""

    schema_version: Literal["1.0"] = SCHEMA_VERSION
    event_type: Literal[PayloadKind.TELEMETRY] = PayloadKind.TELEMETRY
    delivery: Delivery | None = None
    gateway_id: str
    device_id: str
    utc: datetime
    state: str | None
    session_no: int | None
    elapsed_s: float | None
    rate_ul_min: int | None
    delivered_ml: float | None = Field(description="device's cum_ul so far this session")
    reservoir_ml: float | None
    battery_pct: int | None
