"""The trial's dose rules applied to one finished session.

Pure function of a :class:`FinishedSession` and the configured
:class:`DoseRules`. The verdict vocabulary and reason codes are part of the
published contract (:mod:`devicegw.contract.vocabulary`, docs/mqtt.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from devicegw.config import DoseRules
from devicegw.contract.vocabulary import DeliveredBasis, Reason, Verdict
from devicegw.core.session_tracker import FinishedSession
from devicegw.core.volume import IntegralResult, integrate_rate
from drivers.vm1.messages import EndReason

END_REASON_CODES: dict[EndReason, Reason | None] = {
    EndReason.COMPLETE: None,
    EndReason.USER_STOP: Reason.ENDED_BY_USER,
    EndReason.HOST_STOP: Reason.ENDED_BY_HOST,
    EndReason.TIMEOUT: Reason.ENDED_BY_TIMEOUT,
    EndReason.FAULT: Reason.ENDED_BY_FAULT,
    EndReason.LOW_BATTERY: Reason.ENDED_BY_LOW_BATTERY,
}
_DEVICE_ABORTS = (EndReason.TIMEOUT, EndReason.FAULT, EndReason.LOW_BATTERY)


@dataclass(frozen=True, slots=True)
class VolumeEstimates:
    fill_ml: float | None
    residual_ml: float | None
    reservoir_drop_ml: float | None
    output_integral_ml: float | None
    device_cum_ml: float | None
    delivered_ml: float | None
    delivered_basis: DeliveredBasis | None
    delivered_fraction: float | None
    max_disagreement_ml: float | None
    estimates_agree: bool | None
    integral: IntegralResult
    #: What the plausibility checks found (reservoir_unknown, reservoir_implausible,
    #: delivery_implausible), in that order.
    findings: tuple[Reason, ...] = ()


@dataclass(frozen=True, slots=True)
class Assessment:
    verdict: Verdict
    reasons: tuple[Reason, ...]
    volumes: VolumeEstimates
    total_pause_s: float
    nebulizing_s: float | None


#: A delivered volume needing more than this multiple of the device's nominal rate over
#: its nebulizing time is not believed (a VM-1 runs at about its nominal rate: ICD 3).
PLAUSIBLE_RATE_FACTOR = 2.0


def _ml(ul: float | None) -> float | None:
    return None if ul is None else round(ul / 1000.0, 4)


def _reservoir_drop(s: FinishedSession, findings: list[Reason]) -> float | None:
    """fill - residual, if both readings are known and can be true (ICD 3: +-0.1 mL)."""
    if s.fill_ul is None or s.residual_ul is None:
        findings.append(Reason.RESERVOIR_UNKNOWN)
        return None
    capacity = s.reservoir_capacity_ul
    if s.residual_ul > s.fill_ul or (capacity is not None and s.fill_ul > capacity):
        findings.append(Reason.RESERVOIR_IMPLAUSIBLE)
        return None
    return float(s.fill_ul - s.residual_ul)


def _plausible_max_ul(s: FinishedSession, rules: DoseRules) -> float | None:
    """The most the device can have nebulized in its driven time, or None if unknowable."""
    if s.nominal_rate_ul_min is None or not s.neb_ms:
        return None
    minutes = s.neb_ms / 60_000.0
    return PLAUSIBLE_RATE_FACTOR * s.nominal_rate_ul_min * minutes + rules.volume_tolerance_ml * 1e3


def estimate_volumes(s: FinishedSession, rules: DoseRules) -> VolumeEstimates:
    """The three estimates of what left the reservoir, and the one the verdict uses.

    The level drop is preferred (the sensor is the most accurate), then the rate
    integral, then the device's own total. A reading that cannot be true is not
    used: an unknown (0xFFFF) or impossible reservoir reading, a drop that
    disagrees with both rate estimates while those agree with each other, and any
    estimate above what the device can nebulize in its driven time.
    """
    findings: list[Reason] = []
    tolerance_ul = rules.volume_tolerance_ml * 1000.0
    integral = integrate_rate(
        s.sample_times_s,
        s.sample_rates_ul_min,
        start_s=0.0,
        end_s=s.duration_s if s.duration_s is not None else s.duration_at_least_s,
        max_gap_s=rules.max_sample_gap_s,
    )
    drop = _reservoir_drop(s, findings)
    integ = integral.volume_ul if integral.samples >= 2 else None
    cum = None if s.device_cum_ul is None else float(s.device_cum_ul)
    # The level drop is checked against the two rate-based estimates (integral, device total).
    others = [v for v in (integ, cum) if v is not None]
    disagreement = max(abs(drop - v) for v in others) if drop is not None and others else None
    if (
        drop is not None
        and integ is not None
        and cum is not None
        and abs(integ - cum) <= tolerance_ul
        and abs(drop - integ) > tolerance_ul
        and abs(drop - cum) > tolerance_ul
    ):
        findings.append(Reason.RESERVOIR_IMPLAUSIBLE)  # two independent estimates say otherwise
        usable_drop = None
    else:
        usable_drop = drop
    ceiling = _plausible_max_ul(s, rules)
    candidates = (
        (usable_drop, DeliveredBasis.RESERVOIR_DROP),
        (integ, DeliveredBasis.OUTPUT_INTEGRAL),
        (cum if cum else None, DeliveredBasis.DEVICE_CUM),
    )
    delivered: float | None = None
    basis: DeliveredBasis | None = None
    for value, candidate_basis in candidates:
        if value is None:
            continue
        if ceiling is not None and value > ceiling:
            if Reason.DELIVERY_IMPLAUSIBLE not in findings:
                findings.append(Reason.DELIVERY_IMPLAUSIBLE)
            continue
        delivered, basis = value, candidate_basis
        break
    return VolumeEstimates(
        fill_ml=_ml(s.fill_ul),
        residual_ml=_ml(s.residual_ul),
        reservoir_drop_ml=_ml(drop),
        output_integral_ml=_ml(integ),
        device_cum_ml=_ml(cum),
        delivered_ml=_ml(delivered),
        delivered_basis=basis,
        delivered_fraction=(
            None if delivered is None else round(delivered / 1000.0 / rules.prescribed_volume_ml, 4)
        ),
        max_disagreement_ml=_ml(disagreement),
        estimates_agree=(None if disagreement is None else disagreement <= tolerance_ul),
        integral=integral,
        findings=tuple(findings),
    )


def assess(s: FinishedSession, rules: DoseRules) -> Assessment:
    vol = estimate_volumes(s, rules)
    reasons: list[Reason] = []
    end_code = END_REASON_CODES[s.end_reason] if s.end_reason is not None else None
    if end_code:
        reasons.append(end_code)

    # Pause time is what was seen; a pause cut by a link drop counts to the drop only.
    total_pause = sum(p.duration_s for p in s.pauses)
    rule_broken = False
    if s.duration_s is None:
        reasons.append(Reason.DURATION_UNKNOWN)
        # The least it lasted still breaks the maximum if it is above it.
        if s.duration_at_least_s is not None and s.duration_at_least_s > rules.max_duration_s:
            reasons.append(Reason.DURATION_ABOVE_MAXIMUM)
            rule_broken = True
    elif s.duration_s < rules.min_duration_s:
        reasons.append(Reason.DURATION_BELOW_MINIMUM)
        rule_broken = True
    elif s.duration_s > rules.max_duration_s:
        reasons.append(Reason.DURATION_ABOVE_MAXIMUM)
        rule_broken = True
    if total_pause > rules.max_total_pause_s:
        reasons.append(Reason.PAUSE_ABOVE_MAXIMUM)
        rule_broken = True
    if any(p.cut_by_link for p in s.pauses):
        reasons.append(Reason.PAUSE_STATE_UNKNOWN)

    reasons.extend(vol.findings)
    tolerance_ul = rules.volume_tolerance_ml * 1000.0
    prescribed_ul = rules.prescribed_volume_ml * 1000.0
    if s.fill_ul is not None and Reason.RESERVOIR_IMPLAUSIBLE not in vol.findings:
        if s.fill_ul > prescribed_ul + tolerance_ul:
            reasons.append(Reason.FILL_ABOVE_PRESCRIBED)
        elif s.fill_ul < prescribed_ul - tolerance_ul:
            reasons.append(Reason.FILL_BELOW_PRESCRIBED)
    if vol.estimates_agree is False:
        reasons.append(Reason.VOLUME_ESTIMATES_DISAGREE)
    if vol.integral.gaps:
        reasons.append(Reason.TELEMETRY_GAP)
    if s.link_interruptions:
        reasons.append(Reason.LINK_INTERRUPTED)
    if s.alarms:
        reasons.append(Reason.DEVICE_ALARM)
    for flag in s.flags:
        if flag not in reasons:
            reasons.append(flag)

    frac = vol.delivered_fraction
    if frac is None:
        verdict = Verdict.INDETERMINATE
        reasons.append(Reason.VOLUME_UNKNOWN)
    elif frac < rules.abort_below_fraction:
        verdict = Verdict.ABORTED
        reasons.append(Reason.DELIVERED_BELOW_MINIMUM)
    elif frac < rules.min_delivered_fraction:
        verdict = Verdict.ABORTED if s.end_reason in _DEVICE_ABORTS else Verdict.PARTIAL
        reasons.append(Reason.DELIVERED_BELOW_MINIMUM)
    elif frac > rules.max_delivered_fraction:
        verdict = Verdict.DEVIATION
        reasons.append(Reason.DELIVERED_ABOVE_MAXIMUM)
    elif rule_broken:
        verdict = Verdict.DEVIATION
    else:
        verdict = Verdict.COMPLETE
    return Assessment(
        verdict=verdict,
        reasons=tuple(reasons),
        volumes=vol,
        total_pause_s=round(total_pause, 3),
        nebulizing_s=None if s.neb_ms is None else s.neb_ms / 1000.0,
    )
