"""The trial's dose rules applied to one finished session.

Pure function of a :class:`FinishedSession` and the configured
:class:`DoseRules`. The verdict vocabulary and reason codes are part of the
published contract (docs/events.md); add codes, never repurpose them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from devicegw.config import DoseRules
from devicegw.core.session_tracker import FinishedSession
from devicegw.core.volume import IntegralResult, integrate_rate
from drivers.vm1.messages import EndReason


class Verdict(StrEnum):
    COMPLETE = "complete"  # enough delivered, every rule met
    DEVIATION = "deviation"  # enough delivered, but a duration or pause rule broken
    PARTIAL = "partial"  # some delivered, below the minimum fraction
    ABORTED = "aborted"  # ended by the device (fault, battery, timeout) or next to nothing
    INDETERMINATE = "indeterminate"  # the gateway cannot tell how much was delivered


END_REASON_CODES: dict[EndReason, str | None] = {
    EndReason.COMPLETE: None,
    EndReason.USER_STOP: "ended_by_user",
    EndReason.HOST_STOP: "ended_by_host",
    EndReason.TIMEOUT: "ended_by_timeout",
    EndReason.FAULT: "ended_by_fault",
    EndReason.LOW_BATTERY: "ended_by_low_battery",
}
_DEVICE_ABORTS = (EndReason.TIMEOUT, EndReason.FAULT, EndReason.LOW_BATTERY)


@dataclass(frozen=True, slots=True)
class VolumeEstimates:
    fill_ml: float | None
    residual_ml: float | None
    reservoir_drop_ml: float | None
    output_integral_ml: float | None
    device_cum_ml: float
    delivered_ml: float | None
    delivered_basis: str | None  # "reservoir_drop" | "output_integral" | "device_cum"
    delivered_fraction: float | None
    max_disagreement_ml: float | None
    estimates_agree: bool | None
    integral: IntegralResult


@dataclass(frozen=True, slots=True)
class Assessment:
    verdict: Verdict
    reasons: tuple[str, ...]
    volumes: VolumeEstimates
    total_pause_s: float
    nebulizing_s: float


def _ml(ul: float | None) -> float | None:
    return None if ul is None else round(ul / 1000.0, 4)


def estimate_volumes(s: FinishedSession, rules: DoseRules) -> VolumeEstimates:
    integral = integrate_rate(
        s.sample_times_s,
        s.sample_rates_ul_min,
        start_s=0.0,
        end_s=s.duration_s,
        max_gap_s=rules.max_sample_gap_s,
    )
    drop = (
        s.fill_ul - s.residual_ul if s.fill_ul is not None and s.residual_ul is not None else None
    )
    integ = integral.volume_ul if integral.samples >= 2 else None
    cum = float(s.device_cum_ul)
    delivered, basis = None, None
    if drop is not None:
        delivered, basis = float(max(drop, 0)), "reservoir_drop"
    elif integ is not None:
        delivered, basis = integ, "output_integral"
    elif s.device_cum_ul > 0:
        delivered, basis = cum, "device_cum"
    # The level drop is checked against the two rate-based estimates (integral, device total).
    others = [v for v in (integ, cum) if v is not None]
    disagreement = (
        max(abs(float(drop) - v) for v in others) if drop is not None and others else None
    )
    return VolumeEstimates(
        fill_ml=_ml(s.fill_ul),
        residual_ml=_ml(s.residual_ul),
        reservoir_drop_ml=_ml(drop),
        output_integral_ml=_ml(integ),
        device_cum_ml=round(cum / 1000.0, 4),
        delivered_ml=_ml(delivered),
        delivered_basis=basis,
        delivered_fraction=(
            None if delivered is None else round(delivered / 1000.0 / rules.prescribed_volume_ml, 4)
        ),
        max_disagreement_ml=_ml(disagreement),
        estimates_agree=(
            None if disagreement is None else disagreement <= rules.volume_tolerance_ml * 1000.0
        ),
        integral=integral,
    )


def assess(s: FinishedSession, rules: DoseRules) -> Assessment:
    vol = estimate_volumes(s, rules)
    reasons: list[str] = []
    end_code = END_REASON_CODES[s.end_reason]
    if end_code:
        reasons.append(end_code)

    total_pause = sum(p.duration_s for p in s.pauses)
    rule_broken = False
    if s.duration_s is None:
        reasons.append("duration_unknown")
    elif s.duration_s < rules.min_duration_s:
        reasons.append("duration_below_minimum")
        rule_broken = True
    elif s.duration_s > rules.max_duration_s:
        reasons.append("duration_above_maximum")
        rule_broken = True
    if total_pause > rules.max_total_pause_s:
        reasons.append("pause_above_maximum")
        rule_broken = True

    if vol.estimates_agree is False:
        reasons.append("volume_estimates_disagree")
    if vol.integral.gaps:
        reasons.append("telemetry_gap")
    if s.link_interruptions:
        reasons.append("link_interrupted")
    if s.alarms:
        reasons.append("device_alarm")
    for flag in s.flags:
        if flag not in reasons:
            reasons.append(flag)

    frac = vol.delivered_fraction
    if frac is None:
        verdict = Verdict.INDETERMINATE
        reasons.append("volume_unknown")
    elif frac < rules.abort_below_fraction:
        verdict = Verdict.ABORTED
        reasons.append("delivered_below_minimum")
    elif frac < rules.min_delivered_fraction:
        verdict = Verdict.ABORTED if s.end_reason in _DEVICE_ABORTS else Verdict.PARTIAL
        reasons.append("delivered_below_minimum")
    elif rule_broken:
        verdict = Verdict.DEVIATION
    else:
        verdict = Verdict.COMPLETE
    return Assessment(
        verdict=verdict,
        reasons=tuple(reasons),
        volumes=vol,
        total_pause_s=round(total_pause, 3),
        nebulizing_s=s.neb_ms / 1000.0,
    )
