"""The SpO2 safety overlay of one bed: the oximeter's samples meet the nebulizer's sessions.

Glue around the pure :class:`Spo2Monitor`: the oximeter runner feeds samples,
the nebulizer pipeline says when a session starts and ends, a ticker lets time
pass; alerts and post-dose summaries go out at once on the bed's safety topic.
All times are the gateway's monotonic clock, shared by both devices.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections import deque
from dataclasses import replace
from datetime import datetime
from typing import Literal, Protocol

from pydantic import BaseModel

from devicegw.config import Config, DeviceSettings, OximeterSettings
from devicegw.contract.spo2 import OximeterRef, Spo2Summary
from devicegw.core.spo2_monitor import (
    PostDoseSummary,
    SafetyAlertCleared,
    SafetyAlertRaised,
    SessionSpo2Summary,
    Spo2Context,
    Spo2Event,
    Spo2Monitor,
)
from drivers.oximeter.sample import OximeterSample

log = logging.getLogger(__name__)


PROTOCOLS: dict[str, Literal["nonin", "berrymed", "plx"]] = {
    "nonin_oem3": "nonin",
    "plx": "plx",
    "berrymed": "berrymed",
}


TREND_POINTS = 30 * 60


class SafetySink(Protocol):
    def safety_event(self, device_id: str, payload: BaseModel) -> None: ...


class BedMonitor:
    def __init__(
        self,
        config: Config,
        device: DeviceSettings,
        oximeter: OximeterSettings,
        sink: SafetySink,
    ) -> None:
        self.device = device
        self.oximeter = oximeter
        self._sink = sink
        self.monitor = Spo2Monitor(
            config.spo2_rules,
            Spo2Context(
                gateway_id=config.gateway.id,
                subject_id=device.subject_id,
                bed=device.bed,
                device_id=device.id,
                oximeter=OximeterRef(
                    device_id=oximeter.id,
                    protocol=PROTOCOLS[oximeter.type],
                    model=oximeter.model,
                    serial_no=oximeter.serial_no,
                ),
            ),
        )
        self._summary: Spo2Summary | None = None
        #: The last 30 minutes at one reading a second: (monotonic s, SpO2, pulse), None
        #: where the reading was not valid. For the ward dashboard, never for decisions.
        self.trend: deque[tuple[float, float | None, float | None]] = deque(maxlen=TREND_POINTS)
        self._trend_t = -math.inf  # time of the trend's latest point (none yet)
        self.alerts_raised = 0

    def feed(self, t: float, sample: OximeterSample) -> None:
        if t - self._trend_t >= 1.0:  # the trend's latest time, kept: a sample or three a second
            self._trend_t = t
            valid = sample.valid
            self.trend.append(
                (t, sample.spo2 if valid else None, sample.pulse_bpm if valid else None)
            )
        events = self.monitor.feed(t, sample)
        if events:  # rarely: between doses there are none
            self._handle(events)

    def oximeter_down(self, t: float) -> None:
        self._handle(self.monitor.link_down(t))

    def oximeter_up(self, t: float) -> None:
        self._handle(self.monitor.link_up(t))

    def tick(self, t: float) -> None:
        events = self.monitor.tick(t)
        if events:  # only when an observation window closes
            self._handle(events)

    def session_started(
        self,
        t: float,
        correlation_id: uuid.UUID,
        start_utc: datetime,
        subject_id: str | None = None,
    ) -> None:
        """A session began; its alerts and summaries name ``subject_id``, the bed's assignment
        at its start (until the next session starts: the observation window is this dose's)."""
        if subject_id != self.monitor.context.subject_id:
            self.monitor.context = replace(self.monitor.context, subject_id=subject_id)
        self._handle(self.monitor.session_started(t, correlation_id, start_utc=start_utc))

    def session_ended(self, t: float, correlation_id: uuid.UUID) -> Spo2Summary | None:
        """The session's SpO2 summary, or None if the monitor never saw it start."""
        self._summary = None
        if self.monitor.correlation_id != correlation_id:
            return None
        self._handle(self.monitor.session_ended(t))
        summary, self._summary = self._summary, None
        return summary

    def _handle(self, events: list[Spo2Event]) -> None:
        for event in events:
            if isinstance(event, SessionSpo2Summary):
                self._summary = event.summary
            elif isinstance(event, (SafetyAlertRaised, SafetyAlertCleared)):
                alert = event.alert
                if isinstance(event, SafetyAlertRaised):
                    self.alerts_raised += 1
                log.warning(
                    "SpO2 safety alert %s",
                    alert.state,
                    extra={
                        "device_id": self.device.id,
                        "bed": self.device.bed,
                        "spo2": alert.spo2,
                        "kind": alert.kind,
                    },
                )
                self._sink.safety_event(self.device.id, alert)
            elif isinstance(event, PostDoseSummary):
                self._sink.safety_event(self.device.id, event.summary)
