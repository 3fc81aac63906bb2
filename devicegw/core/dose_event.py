"""Turns a finished session and its assessment into the published dose event.

Deterministic: the same session facts give byte-identical JSON, so a
republished or replayed event can be compared with the original.
"""

from __future__ import annotations

from devicegw import __version__
from devicegw.config import Config, DeviceSettings
from devicegw.contract.payloads import (
    AlarmOut,
    DeviceIdentity,
    DoseEvent,
    DoseRulesOut,
    DoseTimes,
    GatewayRef,
    LinkQuality,
    PauseOut,
    PauseSummary,
    VolumeOut,
    dose_event_id,
)
from devicegw.core.dose_check import Assessment
from devicegw.core.session_tracker import FinishedSession, wall_to_utc
from drivers.vm1.messages import Ident, alarm_name


def device_identity(device: DeviceSettings, ident: Ident | None) -> DeviceIdentity:
    return DeviceIdentity(
        device_id=device.id,
        model=ident.model if ident else None,
        serial_no=ident.serial_no if ident else None,
        firmware=ident.firmware if ident else None,
    )


def build_dose_event(
    session: FinishedSession,
    assessment: Assessment,
    *,
    device: DeviceSettings,
    ident: Ident,
    config: Config,
) -> DoseEvent:
    """The event of a session of the device that identified itself as ``ident``.

    The identity is required: an event id is made from the device's own model
    and serial number, never from a placeholder (issue 14: ``unknown:<device>``
    ids gave one dose two records once the device's log was fetched).
    """
    rules = config.dose_rules
    vol = assessment.volumes
    return DoseEvent(
        event_id=dose_event_id(ident.model, ident.serial_no, session.session_no),
        gateway=GatewayRef(id=config.gateway.id, site=config.gateway.site, version=__version__),
        subject_id=device.subject_id,
        kit_number=device.kit_number,
        bed=device.bed,
        device=device_identity(device, ident),
        session_no=session.session_no,
        data_source=session.data_source,
        end_reason=session.end_reason.name,
        verdict=assessment.verdict,
        reasons=list(assessment.reasons),
        times=DoseTimes(
            gateway_start_utc=session.gateway_start_utc,
            gateway_end_utc=session.gateway_end_utc,
            device_start_utc=wall_to_utc(session.device_start_wall_s),
            device_end_utc=wall_to_utc(session.device_end_wall_s),
            device_start_uptime_ms=session.device_start_ms,
            device_end_uptime_ms=session.device_end_ms,
            duration_s=None if session.duration_s is None else round(session.duration_s, 3),
            nebulizing_s=round(assessment.nebulizing_s, 3),
        ),
        pauses=PauseSummary(
            count=len(session.pauses),
            total_s=assessment.total_pause_s,
            items=[
                PauseOut(start_offset_s=round(p.start_s, 3), duration_s=round(p.duration_s, 3))
                for p in session.pauses
            ],
        ),
        volume=VolumeOut(
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
        ),
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
        rules=DoseRulesOut(
            prescribed_volume_ml=rules.prescribed_volume_ml,
            min_delivered_fraction=rules.min_delivered_fraction,
            abort_below_fraction=rules.abort_below_fraction,
            min_duration_s=rules.min_duration_s,
            max_duration_s=rules.max_duration_s,
            max_total_pause_s=rules.max_total_pause_s,
            volume_tolerance_ml=rules.volume_tolerance_ml,
        ),
        config_sha256=config.source_sha256,
    )
