"""The contract's words, defined once: verdicts, volume bases, data sources, reason codes, feeds.

Payloads, the dose check, the exports and replay summaries all use these
enums; the strings are part of the published contract (docs/mqtt.md). Add
members, never rename or repurpose one.

Every reason code and payload belongs to one :class:`Feed` (docs/blinding.md):
the blinded feed is what the EDC and blinded staff may see; the restricted feed
carries the physical record (rates, reservoir levels, alarms, link detail),
which could separate the arms and is for engineering roles only.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum


class Feed(StrEnum):
    """Who may read a message or a reason code (docs/blinding.md)."""

    BLINDED = "blinded"  # the EDC, blinded data management and ward staff
    RESTRICTED = "restricted"  # engineering roles cleared to see device physics


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
    # The blinded stand-in for ended_by_low_battery / _timeout / _fault (never produced
    # by the dose check itself): the device ended it; which physical cause is restricted.
    ENDED_BY_DEVICE = "ended_by_device"
    # Dose rules.
    DURATION_UNKNOWN = "duration_unknown"
    DURATION_BELOW_MINIMUM = "duration_below_minimum"
    DURATION_ABOVE_MAXIMUM = "duration_above_maximum"
    PAUSE_ABOVE_MAXIMUM = "pause_above_maximum"
    DELIVERED_BELOW_MINIMUM = "delivered_below_minimum"
    VOLUME_UNKNOWN = "volume_unknown"
    DELIVERED_ABOVE_MAXIMUM = "delivered_above_maximum"
    # Plausibility of the readings that decide a verdict (docs/mqtt.md, "Reasons").
    RESERVOIR_UNKNOWN = "reservoir_unknown"  # fill or residual read 0xFFFF (sensor blind)
    RESERVOIR_IMPLAUSIBLE = "reservoir_implausible"  # residual > fill, fill > capacity, ...
    DELIVERY_IMPLAUSIBLE = "delivery_implausible"  # faster than the device can nebulize
    FILL_ABOVE_PRESCRIBED = "fill_above_prescribed"
    FILL_BELOW_PRESCRIBED = "fill_below_prescribed"
    # Data quality.
    VOLUME_ESTIMATES_DISAGREE = "volume_estimates_disagree"
    TELEMETRY_GAP = "telemetry_gap"
    LINK_INTERRUPTED = "link_interrupted"
    DEVICE_ALARM = "device_alarm"
    # How the session was followed.
    GATEWAY_RESTART = "gateway_restart"
    SESSION_END_MISSED = "session_end_missed"
    RECONCILED_FROM_DEVICE_LOG = "reconciled_from_device_log"
    DEVICE_RESTARTED = "device_restarted"  # the device rebooted inside the session
    DEVICE_COUNTER_RESET = "device_counter_reset"  # its session counter started again
    SESSION_RECORD_UNAVAILABLE = "session_record_unavailable"  # finished from what was seen
    PAUSE_STATE_UNKNOWN = "pause_state_unknown"  # a pause was open when the link dropped
    # Whose dose (docs/assignments.md).
    UNASSIGNED = "unassigned"  # no assignment on the bed at the session's start
    ASSIGNMENT_CHANGED_DURING_SESSION = "assignment_changed_during_session"


#: The feed of every reason code. A reason is blinded only when the protocol needs
#: it to read the verdict and its occurrence cannot follow from how the product
#: behaves in the device (rate, residual, foaming, mesh clogging): those are the
#: differences that could split subjects into two groups (docs/blinding.md).
REASON_FEED: dict[Reason, Feed] = {
    Reason.ENDED_BY_USER: Feed.BLINDED,  # staff or subject stopped it
    Reason.ENDED_BY_HOST: Feed.BLINDED,  # the gateway or a ward system stopped it
    Reason.ENDED_BY_LOW_BATTERY: Feed.RESTRICTED,  # battery drains with nebulizing time
    Reason.ENDED_BY_DEVICE: Feed.BLINDED,  # stand-in for the three device endings
    Reason.ENDED_BY_TIMEOUT: Feed.RESTRICTED,  # a slow nebulization times out more often
    Reason.ENDED_BY_FAULT: Feed.RESTRICTED,  # e.g. a blocked mesh (output below nominal)
    Reason.DURATION_UNKNOWN: Feed.BLINDED,  # protocol rules ...
    Reason.DURATION_BELOW_MINIMUM: Feed.BLINDED,
    Reason.DURATION_ABOVE_MAXIMUM: Feed.BLINDED,
    Reason.PAUSE_ABOVE_MAXIMUM: Feed.BLINDED,
    Reason.DELIVERED_BELOW_MINIMUM: Feed.BLINDED,
    Reason.VOLUME_UNKNOWN: Feed.BLINDED,
    Reason.DELIVERED_ABOVE_MAXIMUM: Feed.BLINDED,  # follows from the blinded fraction
    # The level sensor and the rate are the product's physics (tilt, foam, residue).
    Reason.RESERVOIR_UNKNOWN: Feed.RESTRICTED,
    Reason.RESERVOIR_IMPLAUSIBLE: Feed.RESTRICTED,
    Reason.DELIVERY_IMPLAUSIBLE: Feed.RESTRICTED,
    Reason.FILL_ABOVE_PRESCRIBED: Feed.RESTRICTED,  # a fill is a level-sensor reading
    Reason.FILL_BELOW_PRESCRIBED: Feed.RESTRICTED,
    Reason.VOLUME_ESTIMATES_DISAGREE: Feed.RESTRICTED,  # level sensor vs rate: physics
    Reason.TELEMETRY_GAP: Feed.RESTRICTED,  # rate samples: engineering
    Reason.LINK_INTERRUPTED: Feed.RESTRICTED,  # link detail: engineering
    Reason.DEVICE_ALARM: Feed.RESTRICTED,  # alarm codes include MESH_BLOCKED (rate-derived)
    Reason.GATEWAY_RESTART: Feed.BLINDED,  # how the record was made (ALCOA) ...
    Reason.SESSION_END_MISSED: Feed.BLINDED,
    Reason.RECONCILED_FROM_DEVICE_LOG: Feed.BLINDED,
    Reason.DEVICE_RESTARTED: Feed.BLINDED,
    Reason.DEVICE_COUNTER_RESET: Feed.BLINDED,
    Reason.SESSION_RECORD_UNAVAILABLE: Feed.BLINDED,
    Reason.PAUSE_STATE_UNKNOWN: Feed.BLINDED,  # the link, not the product
    Reason.UNASSIGNED: Feed.BLINDED,  # the ward's bookkeeping, not the product
    Reason.ASSIGNMENT_CHANGED_DURING_SESSION: Feed.BLINDED,
}

#: Restricted reasons the blinded record still accounts for, in a coarser word.
BLINDED_STAND_IN: dict[Reason, Reason] = {
    Reason.ENDED_BY_LOW_BATTERY: Reason.ENDED_BY_DEVICE,
    Reason.ENDED_BY_TIMEOUT: Reason.ENDED_BY_DEVICE,
    Reason.ENDED_BY_FAULT: Reason.ENDED_BY_DEVICE,
}


def blinded_reasons(reasons: Iterable[str]) -> list[Reason]:
    """The reason codes the blinded feed may carry, in order, without repeats.

    Restricted codes are replaced by their stand-in or dropped; a code this
    version does not know is dropped too (unknown means not reviewed).
    """
    out: list[Reason] = []
    for text in reasons:
        try:
            reason = Reason(text)
        except ValueError:
            continue
        reason = BLINDED_STAND_IN.get(reason, reason)
        if REASON_FEED.get(reason) is Feed.BLINDED and reason not in out:
            out.append(reason)
    return out


class PayloadKind(StrEnum):
    """``event_type`` of every published payload."""

    DOSE_COMPLETION = "dose_completion"
    DEVICE_STATUS = "device_status"
    GATEWAY_STATUS = "gateway_status"
    TELEMETRY = "telemetry"
    SAFETY_ALERT = "safety_alert"
    POST_DOSE_SAFETY_SUMMARY = "post_dose_safety_summary"
    DOSE_CORRECTION = "dose_correction"
    DOSE_MISSED = "dose_missed"
    # Commands to the gateway and their answers (docs/assignments.md, "Over MQTT").
    ASSIGN_COMMAND = "assign_command"
    ASSIGN_ANSWER = "assign_answer"
    # The restricted feed (docs/blinding.md).
    DOSE_DETAIL = "dose_detail"
    DEVICE_DETAIL = "device_detail"
    TELEMETRY_DETAIL = "telemetry_detail"


#: The feed of every payload.
PAYLOAD_FEED: dict[PayloadKind, Feed] = {
    PayloadKind.DOSE_COMPLETION: Feed.BLINDED,
    PayloadKind.DEVICE_STATUS: Feed.BLINDED,
    PayloadKind.GATEWAY_STATUS: Feed.BLINDED,
    PayloadKind.TELEMETRY: Feed.BLINDED,
    PayloadKind.SAFETY_ALERT: Feed.BLINDED,
    PayloadKind.POST_DOSE_SAFETY_SUMMARY: Feed.BLINDED,
    PayloadKind.DOSE_CORRECTION: Feed.BLINDED,
    PayloadKind.DOSE_MISSED: Feed.BLINDED,
    PayloadKind.ASSIGN_COMMAND: Feed.BLINDED,
    PayloadKind.ASSIGN_ANSWER: Feed.BLINDED,
    PayloadKind.DOSE_DETAIL: Feed.RESTRICTED,
    PayloadKind.DEVICE_DETAIL: Feed.RESTRICTED,
    PayloadKind.TELEMETRY_DETAIL: Feed.RESTRICTED,
}


class TopicKind(StrEnum):
    """What a message is for, as the topic level that carries it (docs/mqtt.md)."""

    DOSE = "dose"  # dose-completion events, durable
    DOSE_CORRECTION = "dose-correction"  # a dose re-attributed or voided, durable
    DOSE_MISSED = "dose-missed"  # a planned dose with no session in its window, durable
    STATUS = "status"  # retained device / gateway status, latest wins
    SAFETY = "safety"  # SpO2 safety alerts and post-dose summaries, durable
    TELEMETRY = "telemetry"  # live progress, best effort
    # The restricted feed: the physical record of a dose, device and live output.
    DOSE_DETAIL = "dose-detail"  # durable, committed with its dose event
    DEVICE_DETAIL = "device-detail"  # retained, latest wins
    TELEMETRY_DETAIL = "telemetry-detail"  # best effort
