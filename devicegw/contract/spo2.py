"""Payloads of the SpO2 safety overlay: the summary embedded in the dose event and two events.

- :class:`Spo2Summary` rides inside the dose-completion event (the caller adds
  it to the dose payload; correlation id = the dose ``event_id``).
- :class:`SafetyAlert` (``event_type`` "safety_alert") is published when a
  desaturation has lasted the sustain time and again when it clears; QoS 1 on
  its own topic (the caller does the MQTT).
- :class:`PostDoseSafetySummary` (``event_type`` "post_dose_safety_summary")
  is published once the post-dose observation window closes, for the same
  dose (same ``correlation_id``), covering session + observation window.

JSON on the wire, ``schema_version`` "2.0" (the contract's, see
:mod:`devicegw.contract.base`): fields are added within a major
version, never renamed or repurposed. Offsets (``*_offset_s``) are seconds
from the nebulization session's start on the gateway's monotonic clock. As in
:mod:`devicegw.contract.payloads`, nothing here names or hints at the allocation: a dose
is identified by its correlation id, the pseudonymous subject ID and devices.

Reason codes in ``unavailable_reason`` (add codes, never repurpose them):
``no_oximeter_assigned``, ``oximeter_disconnected``, ``no_samples`` (connected,
but nothing arrived), ``no_valid_samples`` (samples arrived, all flagged).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from devicegw.contract.base import SCHEMA_VERSION, Delivery
from devicegw.contract.vocabulary import PayloadKind

__all__ = [
    "SCHEMA_VERSION",
    "BaselineOut",
    "DesaturationKind",
    "DesaturationOut",
    "MonitoringState",
    "OximeterRef",
    "PostDoseSafetySummary",
    "SafetyAlert",
    "Spo2RulesOut",
    "Spo2Summary",
    "Spo2WindowStats",
    "UnavailableReason",
]

DesaturationKind = Literal["relative_drop", "absolute_below_90", "both"]
BaselineSource = Literal["pre_session", "first_minute", "unavailable"]
UnavailableReason = Literal[
    "no_oximeter_assigned",
    "oximeter_disconnected",
    "no_samples",
    "no_valid_samples",
    "reconciled_from_device_log",  # rebuilt from the nebulizer's log: no overlay possible
    "gateway_restart",  # the gateway restarted during the session: the overlay was lost
]
#: ``monitoring_inadequate``: samples came, but valid ones covered less of the window than
#: ``min_coverage_pct``: what they show is reported, and is not enough to call it monitored.
MonitoringState = Literal["monitored", "monitoring_inadequate", "unavailable"]


class _Payload(BaseModel):
    # Fields with defaults are always sent, so published schemas would require them.
    model_config = ConfigDict(
        extra="forbid", frozen=True, json_schema_serialization_defaults_required=True
    )


class OximeterRef(_Payload):
    """Which oximeter watched the subject (passed in by the caller from its configuration)."""

    device_id: str = Field(description="The oximeter's name in the gateway configuration")
    protocol: Literal["nonin", "berrymed", "plx"] | None = None
    model: str | None = None
    serial_no: str | None = None


class Spo2RulesOut(_Payload):
    """The rules the summary was computed with (echo of :class:`Spo2Rules`)."""

    baseline_window_s: float
    baseline_fallback_s: float
    observation_window_s: float
    drop_points: float
    absolute_threshold: float
    sustain_s: float
    clear_s: float
    max_sample_gap_s: float
    baseline_min_valid_s: float = 30.0
    min_coverage_pct: float = 80.0


class BaselineOut(_Payload):
    spo2: float | None = Field(description="median SpO2 (%) of the valid baseline samples")
    pulse_bpm: float | None = Field(description="median pulse rate of the valid baseline samples")
    source: BaselineSource = Field(
        description="pre_session: the window before start; first_minute: no valid pre-session "
        "sample, the session's first minute was used (flagged); unavailable: neither had any"
    )
    n_samples: int


class DesaturationOut(_Payload):
    """One desaturation: low SpO2 on valid samples for at least the sustain time."""

    start_offset_s: float = Field(description="first valid low sample, from session start")
    duration_s: float = Field(
        description="to the first valid sample of the recovery that cleared it (or to the end "
        "of the window when ongoing); includes gaps of invalid samples inside the event"
    )
    nadir_spo2: float
    nadir_offset_s: float
    kind: DesaturationKind = Field(
        description="which criteria valid samples of the event met: a drop of drop_points "
        "below baseline, SpO2 below absolute_threshold (default 90 %), or both"
    )
    ongoing: bool = Field(description="not yet cleared when the window closed")
    invalid_gap_s: float = Field(
        description="time inside the event not covered by valid samples (artefact, dropouts)"
    )


class Spo2WindowStats(_Payload):
    """Statistics over one window, from valid samples only (invalid ones are counted)."""

    start_offset_s: float
    end_offset_s: float
    samples_total: int
    samples_valid: int
    samples_excluded: int = Field(description="samples not valid (artefact, low perfusion, ...)")
    excluded_by_flag: dict[str, int] = Field(
        description="gating quality flag -> number of excluded samples carrying it"
    )
    coverage_pct: float = Field(
        description="time covered by valid samples / window time; a sample covers the time to "
        "the next sample, at most max_sample_gap_s"
    )
    nadir_spo2: float | None
    nadir_offset_s: float | None
    mean_spo2: float | None = Field(description="mean of the valid samples' SpO2")
    mean_pulse_bpm: float | None
    time_below_threshold_s: float = Field(
        description="valid-sample time with SpO2 below absolute_threshold (default 90 %)"
    )
    desaturations: list[DesaturationOut]
    alert_time_without_valid_data_s: float = Field(
        default=0.0,
        description="of the desaturations' duration, the time with no valid sample to show "
        "the SpO2 (sum of their invalid_gap_s): an alert's length is only as good as its data",
    )


class Spo2Summary(_Payload):
    """SpO2 monitoring of one nebulization session, for the dose-completion event."""

    schema_version: Literal["2.0"] = SCHEMA_VERSION
    correlation_id: uuid.UUID = Field(description="the dose event's event_id")
    spo2_monitoring: MonitoringState
    unavailable_reason: UnavailableReason | None
    oximeter: OximeterRef | None
    baseline: BaselineOut
    session: Spo2WindowStats
    alerts_raised: int
    flags: list[str] = Field(
        description="e.g. baseline_first_minute, baseline_unavailable, link_interrupted"
    )
    rules: Spo2RulesOut


class SafetyAlert(_Payload):
    """A desaturation alert being raised or cleared (QoS 1, own topic)."""

    schema_version: Literal["2.0"] = SCHEMA_VERSION
    event_type: Literal[PayloadKind.SAFETY_ALERT] = PayloadKind.SAFETY_ALERT
    delivery: Delivery | None = None
    event_id: uuid.UUID = Field(description="unique per message; deterministic (UUIDv5)")
    alert_id: uuid.UUID = Field(description="the same for the raised and the cleared message")
    state: Literal["raised", "cleared"]
    clear_reason: Literal["recovered", "monitoring_ended", "superseded"] | None = Field(
        description="recovered: SpO2 back above the thresholds for clear_s; monitoring_ended: "
        "the observation window closed while still low; superseded: a new session started"
    )
    correlation_id: uuid.UUID = Field(description="the dose event's event_id")
    gateway_id: str
    subject_id: str | None = Field(description="null: the bed was unassigned")
    bed: str
    device_id: str = Field(description="the nebulizer")
    oximeter_device_id: str | None
    phase: Literal["session", "observation"]
    offset_s: float = Field(description="when this message was decided, from session start")
    utc: datetime | None = Field(description="session start UTC + offset_s, if the start is known")
    kind: DesaturationKind
    spo2: float | None = Field(description="SpO2 of the sample that decided this message")
    nadir_spo2: float
    baseline_spo2: float | None
    baseline_source: BaselineSource
    desaturation_start_offset_s: float
    duration_s: float = Field(description="of the desaturation so far (raised) or in all")


class PostDoseSafetySummary(_Payload):
    """After the observation window: the dose's SpO2 over session + observation window."""

    schema_version: Literal["2.0"] = SCHEMA_VERSION
    event_type: Literal[PayloadKind.POST_DOSE_SAFETY_SUMMARY] = PayloadKind.POST_DOSE_SAFETY_SUMMARY
    delivery: Delivery | None = None
    event_id: uuid.UUID = Field(description="deterministic (UUIDv5 of the correlation id)")
    correlation_id: uuid.UUID = Field(description="the dose event's event_id")
    gateway_id: str
    subject_id: str | None = Field(description="null: the bed was unassigned")
    bed: str
    device_id: str = Field(description="the nebulizer")
    oximeter: OximeterRef | None
    spo2_monitoring: MonitoringState
    unavailable_reason: UnavailableReason | None
    session_start_utc: datetime | None
    session_end_offset_s: float
    observation_end_offset_s: float
    observation_truncated: bool = Field(
        description="the window was cut short (a new session started before it ended)"
    )
    baseline: BaselineOut
    session_and_observation: Spo2WindowStats
    observation: Spo2WindowStats
    alerts_raised: int
    flags: list[str]
    rules: Spo2RulesOut
