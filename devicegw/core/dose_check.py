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
    device_cum_ml: float
    delivered_ml: float | None
    delivered_basis: DeliveredBasis | None
    delivered_fraction: float | None
    max_disagreement_ml: float | None
    estimates_agree: bool | None
    integral: IntegralResult


@dataclass(frozen=True, slots=True)
class Assessment:
    verdict: Verdict
    reasons: tuple[Reason, ...]
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
    delivered: float | None = None
    basis: DeliveredBasis | None = None
    if drop is not None:
        delivered, basis = float(max(drop, 0)), DeliveredBasis.RESERVOIR_DROP
    elif integ is not None:
        delivered, basis = integ, DeliveredBasis.OUTPUT_INTEGRAL
    elif s.device_cum_ul > 0:
        delivered, basis = cum, DeliveredBasis.DEVICE_CUM
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
    reasons: list[Reason] = []
    end_code = END_REASON_CODES[s.end_reason]
    if end_code:
        reasons.append(end_code)

    total_pause = sum(p.duration_s for p in s.pauses)
    rule_broken = False
    if s.duration_s is None:
        reasons.append(Reason.DURATION_UNKNOWN)
    elif s.duration_s < rules.min_duration_s:
        reasons.append(Reason.DURATION_BELOW_MINIMUM)
        rule_broken = True
    elif s.duration_s > rules.max_duration_s:
        reasons.append(Reason.DURATION_ABOVE_MAXIMUM)
        rule_broken = True
    if total_pause > rules.max_total_pause_s:
        reasons.append(Reason.PAUSE_ABOVE_MAXIMUM)
        rule_broken = True

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
