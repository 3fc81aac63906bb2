"""Turns a finished session and its assessment into the published dose record.

One decision, two messages (docs/blinding.md): the blinded :class:`DoseEvent`
for the EDC, and the restricted :class:`DoseDetail` with the physical record,
both with the same ``event_id``. Every physical fact goes to the detail only;
the blinded event gets what the protocol needs, and only blinded reason codes
(:func:`devicegw.contract.vocabulary.blinded_reasons`).

Deterministic: the same session facts give byte-identical JSON, so a
republished or replayed record can be compared with the original.
"""

from __future__ import annotations

import numpy as np

from devicegw import __version__
from devicegw.config import Config, DeviceSettings
from devicegw.contract.payloads import (
    AlarmOut,
    DeviceIdentity,
    DoseDetail,
    DoseEvent,
    DoseRecord,
    DoseRulesOut,
    DoseTimes,
    DoseVolume,
    GatewayRef,
    LinkQuality,
    PauseOut,
    PauseSummary,
    RateStats,
    TimesDetail,
    VolumeDetail,
    dose_event_id,
)
from devicegw.contract.vocabulary import blinded_reasons
from devicegw.core.dose_check import Assessment
from devicegw.core.ports import Attribution
from devicegw.core.schedule import Placement
from devicegw.core.session_tracker import FinishedSession, wall_to_utc
from drivers.vm1.messages import Ident, alarm_name


def device_identity(device: DeviceSettings, ident: Ident | None) -> DeviceIdentity:
    return DeviceIdentity(
        device_id=device.id,
        model=ident.model if ident else None,
        serial_no=ident.serial_no if ident else None,
        firmware=ident.firmware if ident else None,
    )


def _rate_stats(session: FinishedSession, assessment: Assessment, ident: Ident | None) -> RateStats:
    rates = np.asarray(session.sample_rates_ul_min, dtype=np.int64)
    vol = assessment.volumes
    neb_s = assessment.nebulizing_s
    mean = (
        vol.output_integral_ml * 1000.0 * 60.0 / neb_s
        if vol.output_integral_ml is not None and neb_s
        else None
    )
    return RateStats(
        samples=int(rates.size),
        mean_ul_min=None if mean is None else round(mean, 1),
        min_ul_min=int(rates.min()) if rates.size else None,
        max_ul_min=int(rates.max()) if rates.size else None,
        nominal_ul_min=ident.nominal_rate_ul_min if ident else None,
    )


def build_dose_record(
    session: FinishedSession,
    assessment: Assessment,
    *,
    device: DeviceSettings,
    ident: Ident,
    config: Config,
    epoch: int = 0,
    attribution: Attribution | None = None,
    placement: Placement | None = None,
) -> DoseRecord:
    """The record of a session of the device that identified itself as ``ident``.

    The identity is required: an event id is made from the device's own model
    and serial number, never from a placeholder (issue 14: ``unknown:<device>``
    ids gave one dose two records once the device's log was fetched).
    """
    rules = config.dose_rules
    vol = assessment.volumes
    who = attribution or Attribution(device.subject_id, device.kit_number)
    event_id = dose_event_id(ident.model, ident.serial_no, session.session_no, epoch)
    gateway = GatewayRef(id=config.gateway.id, site=config.gateway.site, version=__version__)
    identity = device_identity(device, ident)
    duration_s = None if session.duration_s is None else round(session.duration_s, 3)
    device_start_utc = wall_to_utc(session.device_start_wall_s)
    device_end_utc = wall_to_utc(session.device_end_wall_s)
    rules_out = DoseRulesOut(
        prescribed_volume_ml=rules.prescribed_volume_ml,
        min_delivered_fraction=rules.min_delivered_fraction,
        abort_below_fraction=rules.abort_below_fraction,
        max_delivered_fraction=rules.max_delivered_fraction,
        min_duration_s=rules.min_duration_s,
        max_duration_s=rules.max_duration_s,
        max_total_pause_s=rules.max_total_pause_s,
        volume_tolerance_ml=rules.volume_tolerance_ml,
    )
    event = DoseEvent(
        event_id=event_id,
        gateway=gateway,
        subject_id=who.subject_id,
        kit_number=who.kit_number,
        bed=device.bed,
        device=identity,
        session_no=session.session_no,
        data_source=session.data_source,
        verdict=assessment.verdict,
        reasons=list(blinded_reasons(assessment.reasons)),
        times=DoseTimes(
            gateway_start_utc=session.gateway_start_utc,
            gateway_end_utc=session.gateway_end_utc,
            device_start_utc=device_start_utc,
            device_end_utc=device_end_utc,
            duration_s=duration_s,
        ),
        volume=DoseVolume(
            prescribed_ml=rules.prescribed_volume_ml,
            delivered_ml=vol.delivered_ml,
            delivered_fraction=vol.delivered_fraction,
        ),
        rules=rules_out,
        config_sha256=config.source_sha256,
        dose_number=None if placement is None else placement.dose_number,
        schedule=None if placement is None else placement.schedule,
        repeat_of=None if placement is None else placement.repeat_of,
    )
    detail = DoseDetail(
        event_id=event_id,
        gateway=gateway,
        device=identity,
        session_no=session.session_no,
        data_source=session.data_source,
        end_reason="UNKNOWN" if session.end_reason is None else session.end_reason.name,
        verdict=assessment.verdict,
        reasons=list(assessment.reasons),
        times=TimesDetail(
            gateway_start_utc=session.gateway_start_utc,
            gateway_end_utc=session.gateway_end_utc,
            device_start_utc=device_start_utc,
            device_end_utc=device_end_utc,
            device_start_uptime_ms=session.device_start_ms,
            device_end_uptime_ms=session.device_end_ms,
            duration_s=duration_s,
            duration_at_least_s=(
                None
                if session.duration_at_least_s is None
                else round(session.duration_at_least_s, 3)
            ),
            nebulizing_s=(
                None if assessment.nebulizing_s is None else round(assessment.nebulizing_s, 3)
            ),
        ),
        pauses=PauseSummary(
            count=len(session.pauses),
            total_s=assessment.total_pause_s,
            items=[
                PauseOut(
                    start_offset_s=round(p.start_s, 3),
                    duration_s=round(p.duration_s, 3),
                    cut_by_link=p.cut_by_link,
                )
                for p in session.pauses
            ],
        ),
        volume=VolumeDetail(
            prescribed_ml=rules.prescribed_volume_ml,
            fill_ml=vol.fill_ml,
            residual_ml=vol.residual_ml,
            reservoir_drop_ml=vol.reservoir_drop_ml,
            output_integral_ml=vol.output_integral_ml,
            device_cum_ml=vol.device_cum_ml,
            delivered_ml=vol.delivered_ml,
            delivered_basis=vol.delivered_basis,
            delivered_fraction=vol.delivered_fraction,
            max_disagreement_ml=vol.max_disagreement_ml,
            tolerance_ml=rules.volume_tolerance_ml,
            estimates_agree=vol.estimates_agree,
            findings=[str(f) for f in vol.findings],
        ),
        rate=_rate_stats(session, assessment, ident),
        alarms=[
            AlarmOut(
                code=a.code,
                name=alarm_name(a.code),
                raised_offset_s=None if a.raised_s is None else round(a.raised_s, 3),
                cleared_offset_s=None if a.cleared_s is None else round(a.cleared_s, 3),
            )
            for a in session.alarms
        ],
        link=LinkQuality(
            interruptions=session.link_interruptions,
            down_s=session.link_down_s,
            frames_lost=session.frames_lost,
            bad_frames=session.bad_frames,
            sample_count=vol.integral.samples,
            sample_gap_s=round(vol.integral.gap_s, 3),
            sample_gaps=vol.integral.gaps,
        ),
        rules=rules_out,
        config_sha256=config.source_sha256,
    )
    return DoseRecord(event=event, detail=detail)
