"""The contract's words, defined once: verdicts, volume bases, data sources, reason codes.

Payloads, the dose check, the exports and replay summaries all use these
enums; the strings are part of the published contract (docs/mqtt.md). Add
members, never rename or repurpose one.
"""

from __future__ import annotations

from enum import StrEnum


class Verdict(StrEnum):
    """The dose check's conclusion about one session."""

    COMPLETE = "complete"  # enough delivered, every rule met
    DEVIATION = "deviation"  # enough delivered, but a duration or pause rule broken
    PARTIAL = "partial"  # some delivered, below the minimum fraction
    ABORTED = "aborted"  # ended by the device (fault, battery, timeout) or next to nothing
    INDETERMINATE = "indeterminate"  # the gateway cannot tell how much was delivered


class DeliveredBasis(StrEnum):
    """Which estimate the delivered volume was taken from."""

    RESERVOIR_DROP = "reservoir_drop"  # fill - residual (level sensor)
    OUTPUT_INTEGRAL = "output_integral"  # integral of OUTPUT rate samples
    DEVICE_CUM = "device_cum"  # the device's own cum_ul total


class DataSource(StrEnum):
    """Where a session's facts came from."""

    LIVE = "live"  # followed live on the link
    DEVICE_LOG = "device_log"  # only the device's SESSION_RECORD speaks for it


class Reason(StrEnum):
    """Machine-readable reason codes of a dose event (``reasons``), in docs/mqtt.md."""

    # How the device ended the session (none for COMPLETE).
    ENDED_BY_USER = "ended_by_user"
    ENDED_BY_HOST = "ended_by_host"
    ENDED_BY_TIMEOUT = "ended_by_timeout"
    ENDED_BY_FAULT = "ended_by_fault"
    ENDED_BY_LOW_BATTERY = "ended_by_low_battery"
    # Dose rules.
    DURATION_UNKNOWN = "duration_unknown"
    DURATION_BELOW_MINIMUM = "duration_below_minimum"
    DURATION_ABOVE_MAXIMUM = "duration_above_maximum"
    PAUSE_ABOVE_MAXIMUM = "pause_above_maximum"
    DELIVERED_BELOW_MINIMUM = "delivered_below_minimum"
    VOLUME_UNKNOWN = "volume_unknown"
    # Data quality.
    VOLUME_ESTIMATES_DISAGREE = "volume_estimates_disagree"
    TELEMETRY_GAP = "telemetry_gap"
    LINK_INTERRUPTED = "link_interrupted"
    DEVICE_ALARM = "device_alarm"
    # How the session was followed.
    GATEWAY_RESTART = "gateway_restart"
    SESSION_END_MISSED = "session_end_missed"
    RECONCILED_FROM_DEVICE_LOG = "reconciled_from_device_log"


class PayloadKind(StrEnum):
    """``event_type`` of every published payload."""

    DOSE_COMPLETION = "dose_completion"
    DEVICE_STATUS = "device_status"
    GATEWAY_STATUS = "gateway_status"
    TELEMETRY = "telemetry"
    SAFETY_ALERT = "safety_alert"
    POST_DOSE_SAFETY_SUMMARY = "post_dose_safety_summary"


class TopicKind(StrEnum):
    """What a message is for, as the topic level that carries it (docs/mqtt.md)."""

    DOSE = "dose"  # dose-completion events, durable
    STATUS = "status"  # retained device / gateway status, latest wins
    SAFETY = "safety"  # SpO2 safety alerts and post-dose summaries, durable
    TELEMETRY = "telemetry"  # live progress, best effort
