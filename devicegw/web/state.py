"""What the ward dashboard shows, kept up to date from the gateway's own outputs.

:class:`WardState` listens to what the gateway publishes (device status,
telemetry, dose records, safety alerts) and reads the rest from the gateway's
snapshot, its bed monitors and its assignments; it never blocks a runner (every
callback is a few dictionary updates). :meth:`WardState.ward` and
:meth:`WardState.bed` build plain JSON for the pages and the event stream.

Blinding: the ``viewer`` view carries what the blinded feed carries (no rate,
delivered-so-far, fill, reservoir, battery or alarm). The ``engineer`` view adds
that physical detail under ``restricted`` keys.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from devicegw.contract.payloads import (
    DeviceDetail,
    DeviceStatus,
    DoseRecord,
    Telemetry,
    TelemetryDetail,
)
from devicegw.contract.spo2 import SafetyAlert
from devicegw.storage.audit import verify
from devicegw.web.auth import Role

if TYPE_CHECKING:
    from devicegw.config import DeviceSettings
    from devicegw.runtime.gateway import Gateway
    from devicegw.runtime.health import GatewaySnapshot
    from devicegw.runtime.oximeter_runner import OximeterRunner
    from devicegw.storage.assignments import Assignment

__all__ = ["Role", "WardState"]


#: Points of a bed's SpO2 trend sent to a page (30 minutes at one per 10 s).
TREND_POINTS = 180
RECENT_DOSES = 20
AUDIT_CHECK_S = 60.0
TIMELINE_POINTS = 2000


@dataclass
class _Device:
    status: DeviceStatus | None = None
    detail: DeviceDetail | None = None
    telemetry: Telemetry | None = None
    telemetry_detail: TelemetryDetail | None = None
    # The current or last session: (elapsed s, delivered mL or None) for its timeline.
    timeline_session: int | None = None
    timeline: deque[tuple[float, float | None]] = field(
        default_factory=lambda: deque(maxlen=TIMELINE_POINTS)
    )
    doses: deque[DoseRecord] = field(default_factory=lambda: deque(maxlen=RECENT_DOSES))
    alerts: dict[str, SafetyAlert] = field(default_factory=dict)
    # Marks on the current or last session's timeline (seconds from its start):
    # pauses [start, end or None], desaturations [start, end or None], alarms (at, name).
    pauses: list[list[float | None]] = field(default_factory=list)
    desaturations: dict[str, list[float | None]] = field(default_factory=dict)
    alarm_marks: list[tuple[float, str]] = field(default_factory=list)
    last_state: str | None = None
    last_alarms: frozenset[str] = frozenset()


def _iso(t: datetime | None) -> str | None:
    return None if t is None else t.isoformat()


class WardState:
    """The dashboard's view of one gateway; see the module docstring."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.devices: dict[str, _Device] = {d.id: _Device() for d in gateway.config.devices}
        self.version = 0  # bumped on every change, so the event stream sends only news
        self._audit_checked: tuple[float, bool] | None = None
        self._ox_by_id: dict[str, OximeterRunner] = {
            r.oximeter.id: r for r in gateway.oximeter_runners
        }
        gateway.sink.listeners.append(self)
        gateway.sink.safety_listeners.append(self.safety_event)

    # -- GatewaySink (what the gateway publishes) --------------------------------------------

    def dose_record(self, device_id: str, record: DoseRecord) -> None:
        dev = self.devices.get(device_id)
        if dev is not None:
            dev.doses.appendleft(record)
            self.version += 1

    def device_status(self, device_id: str, status: DeviceStatus) -> None:
        dev = self.devices.get(device_id)
        if dev is not None:
            dev.status = status
            self.version += 1

    def device_detail(self, device_id: str, detail: DeviceDetail) -> None:
        dev = self.devices.get(device_id)
        if dev is not None:
            dev.detail = detail
            raised = frozenset(detail.active_alarms) - dev.last_alarms
            dev.last_alarms = frozenset(detail.active_alarms)
            t = dev.telemetry
            if raised and t is not None and t.elapsed_s is not None:
                dev.alarm_marks += [(t.elapsed_s, name) for name in sorted(raised)]
            self.version += 1

    def telemetry(self, device_id: str, telemetry: Telemetry, detail: TelemetryDetail) -> None:
        dev = self.devices.get(device_id)
        if dev is None:
            return
        dev.telemetry, dev.telemetry_detail = telemetry, detail
        elapsed = telemetry.elapsed_s
        if telemetry.session_no is not None and elapsed is not None:
            if dev.timeline_session != telemetry.session_no:
                dev.timeline_session = telemetry.session_no
                dev.timeline.clear()
                dev.pauses.clear()
                dev.desaturations.clear()
                dev.alarm_marks.clear()
                dev.last_state = None
            dev.timeline.append((elapsed, detail.delivered_ml))
            if telemetry.state == "PAUSED" and dev.last_state != "PAUSED":
                dev.pauses.append([elapsed, None])
            elif telemetry.state != "PAUSED" and dev.pauses and dev.pauses[-1][1] is None:
                dev.pauses[-1][1] = elapsed
            dev.last_state = telemetry.state
        self.version += 1

    def safety_event(self, device_id: str, payload: BaseModel) -> None:
        dev = self.devices.get(device_id)
        if dev is None or not isinstance(payload, SafetyAlert):
            return
        key = str(payload.alert_id)
        if payload.state == "raised":
            dev.alerts[key] = payload
            dev.desaturations[key] = [payload.desaturation_start_offset_s, None]
        else:
            dev.alerts.pop(key, None)
            band = dev.desaturations.setdefault(key, [payload.desaturation_start_offset_s, None])
            band[1] = payload.offset_s
        self.version += 1

    # -- views -------------------------------------------------------------------------------

    def ward(self, role: Role) -> dict[str, Any]:
        """Every bed, for the overview page and its event stream."""
        snap = self.gateway.snapshot()
        # One read of the assignments for the whole ward (per frame, per client): read per
        # bed, it was beds x history rows every second at 500 beds (issue 13).
        assignments = self.gateway.assignment_service.current()
        return {
            "gateway": {"id": snap.gateway_id, "site": snap.site, "utc": snap.utc},
            "broker_connected": bool(snap.broker.get("connected")),
            "role": role,
            "beds": [self._bed(d, role, snap, assignments) for d in self._devices()],
        }

    def bed(self, bed: str, role: Role) -> dict[str, Any] | None:
        """One bed in detail: the bed card, the session timeline and its recent doses."""
        device = next((d for d in self._devices() if d.bed == bed), None)
        if device is None:
            return None
        assignments = self.gateway.assignment_service.current()
        view = self._bed(device, role, self.gateway.snapshot(), assignments)
        dev = self.devices[device.id]
        view["timeline"] = [
            {"elapsed_s": e, **({"delivered_ml": v} if role == "engineer" else {})}
            for e, v in dev.timeline
        ]
        view["doses"] = [self._dose(r, role) for r in dev.doses]
        # Marks on the session timeline: desaturations for everyone (the SpO2 overlay is on
        # the blinded feed); pauses and the device's alarms for engineers only (pause detail
        # and alarm codes are restricted: docs/blinding.md).
        view["marks"] = {
            "desaturations": [{"start_s": a, "end_s": b} for a, b in dev.desaturations.values()],
        }
        if role == "engineer":
            view["marks"]["pauses"] = [{"start_s": a, "end_s": b} for a, b in dev.pauses]
            view["marks"]["alarms"] = [{"at_s": t, "name": n} for t, n in dev.alarm_marks]
        return view

    def health(self) -> dict[str, Any]:
        snap = self.gateway.snapshot()
        oldest = self.gateway.publisher.outbox.oldest_unsent_utc()
        audit_ok = self._audit_ok()
        return {
            "gateway_id": snap.gateway_id,
            "site": snap.site,
            "utc": snap.utc,
            "config_sha256": self.gateway.config.source_sha256,
            "broker": {
                "host": snap.broker.get("host"),
                "port": snap.broker.get("port"),
                "connected": snap.broker.get("connected"),
                "connects": snap.broker.get("connects"),
                "last_error": snap.broker.get("last_error"),
            },
            "outbox_depth": snap.outbox_depth,
            "oldest_unsent_utc": _iso(oldest),
            "store_bytes": snap.store_bytes,
            "store": {
                "held_writes": snap.store.held_writes,
                "disk_full_since": snap.store.disk_full_since,
            },
            "audit_chain_ok": audit_ok,
            "devices": {
                device_id: {
                    "connected": d.connected,
                    "frames_ok": d.frames_ok,
                    "frames_bad": d.frames_bad,
                    "frames_lost": d.frames_lost,
                    "connects": d.connects,
                    "last_error": d.last_error,
                }
                for device_id, d in snap.devices.items()
            },
            "task_restarts": snap.task_restarts,
        }

    def _audit_ok(self) -> bool:
        """Whether the audit chain verifies; re-checked at most once a minute (real time)."""
        now = time.monotonic()
        if self._audit_checked is None or now - self._audit_checked[0] > AUDIT_CHECK_S:
            self._audit_checked = (now, verify(self.gateway.store).ok)
        return self._audit_checked[1]

    # -- pieces ------------------------------------------------------------------------------

    def _devices(self) -> list[DeviceSettings]:
        return sorted(self.gateway.config.devices, key=lambda d: d.bed)

    def _bed(
        self,
        device: DeviceSettings,
        role: Role,
        snap: GatewaySnapshot,
        assignments: Mapping[str, Assignment],
    ) -> dict[str, Any]:
        gw = self.gateway
        device_id = device.id
        dev = self.devices[device_id]
        snap_dev = snap.devices.get(device_id)
        assignment = assignments.get(device.bed)
        monitor = gw.beds.get(device.bed)
        oximeter = gw.config.oximeter_for(device)
        ox_runner = None if oximeter is None else self._ox_by_id.get(oximeter.id)
        t = dev.telemetry
        # Telemetry stops at the session's end: a session is running while the last
        # telemetry says so and no dose of that session has been recorded since.
        finished = (
            bool(dev.doses) and t is not None and dev.doses[0].event.session_no == t.session_no
        )
        in_session = (
            t is not None
            and t.session_no is not None
            and t.state in ("NEBULIZING", "PAUSED")
            and not finished
        )
        view: dict[str, Any] = {
            "bed": device.bed,
            "device_id": device_id,
            "nebulizer": {
                "connected": snap_dev.connected if snap_dev else False,
                "state": None if dev.status is None else dev.status.state,
            },
            "oximeter": None
            if oximeter is None
            else {
                "device_id": oximeter.id,
                "connected": bool(ox_runner and ox_runner.health.connected),
            },
            "assignment": None
            if assignment is None
            else {"subject_id": assignment.subject_id, "kit_number": assignment.kit_number},
            "session": None
            if not in_session or t is None
            else {
                "session_no": t.session_no,
                "state": t.state,
                "elapsed_s": t.elapsed_s,
                "prescribed_ml": gw.config.dose_rules.prescribed_volume_ml,
            },
            "spo2": None,
            "alerts": [
                {
                    "alert_id": str(a.alert_id),
                    "kind": a.kind,
                    "spo2": a.spo2,
                    "offset_s": a.offset_s,
                    "phase": a.phase,
                }
                for a in dev.alerts.values()
            ],
            "last_dose": self._dose(dev.doses[0], role) if dev.doses else None,
        }
        if monitor is not None and monitor.trend:
            now = gw.clock.monotonic()
            points = list(monitor.trend)
            step = max(1, len(points) // TREND_POINTS)
            last = points[-1]
            view["spo2"] = {
                "spo2": last[1],
                "pulse_bpm": last[2],
                "age_s": round(now - last[0], 1),
                "trend": [
                    {"t_s": round(p[0] - now, 1), "spo2": p[1], "pulse_bpm": p[2]}
                    for p in points[::step]
                ],
            }
        if role == "engineer":
            td, detail = dev.telemetry_detail, dev.detail
            view["restricted"] = {
                "delivered_ml": None if td is None or not in_session else td.delivered_ml,
                "rate_ul_min": None if td is None or not in_session else td.rate_ul_min,
                "reservoir_ml": None if detail is None else detail.reservoir_ml,
                "battery_pct": None if detail is None else detail.battery_pct,
                "active_alarms": [] if detail is None else list(detail.active_alarms),
            }
        return view

    def _dose(self, record: DoseRecord, role: Role) -> dict[str, Any]:
        e = record.event
        out: dict[str, Any] = {
            "event_id": str(e.event_id),
            "session_no": e.session_no,
            "verdict": e.verdict,
            "reasons": list(e.reasons),
            "subject_id": e.subject_id,
            "kit_number": e.kit_number,
            "dose_number": e.dose_number,
            "end_utc": _iso(e.times.gateway_end_utc),
            "delivered_fraction": e.volume.delivered_fraction,
        }
        if role == "engineer":
            out["restricted"] = {
                "reasons": list(record.detail.reasons),
                "delivered_basis": record.detail.volume.delivered_basis,
                "fill_ml": record.detail.volume.fill_ml,
                "residual_ml": record.detail.volume.residual_ml,
            }
        return out
