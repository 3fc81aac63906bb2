"""The long-running gateway: every configured device plus the broker connection.

Each device runs in its own task; a device that cannot be opened keeps
retrying without affecting the others. Dose events, statuses and telemetry
flow from the device runners through a sink to the MQTT publisher (and to any
extra listeners, e.g. the demo's live view).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable
from datetime import datetime

from pydantic import BaseModel

from devicegw import __version__
from devicegw.config import Config, DeviceSettings
from devicegw.contract.payloads import (
    DeviceDetail,
    DeviceStatus,
    DoseRecord,
    GatewayStatus,
    Telemetry,
    TelemetryDetail,
)
from devicegw.contract.topics import Topics
from devicegw.core.bed_monitor import BedMonitor
from devicegw.core.ports import AuditKind
from devicegw.mqtt.publisher import MqttPublisher, encode
from devicegw.recording.format import RecordingWriter
from devicegw.runtime import health, systemd_notify
from devicegw.runtime.link_events import LinkObserver
from devicegw.runtime.link_factory import link_factory as default_link_factory
from devicegw.runtime.link_factory import oximeter_source_factory
from devicegw.runtime.nebulizer_runner import GatewaySink, NebulizerRunner
from devicegw.runtime.oximeter_runner import OximeterRunner
from devicegw.runtime.supervise import Restarts, spawn
from devicegw.storage.audit import AuditTrail
from devicegw.storage.journal import SessionJournal
from devicegw.storage.store import Store
from drivers.clock import Clock
from drivers.transport.base import Link

log = logging.getLogger(__name__)


class MqttSink:
    """Routes device outputs to their topics (blinded or restricted), then to any listeners."""

    def __init__(self, publisher: MqttPublisher, topics: Topics) -> None:
        self._pub = publisher
        self._topics = topics
        self.listeners: list[GatewaySink] = []

    def safety_event(self, device_id: str, payload: BaseModel) -> None:
        """Safety alerts and post-dose summaries: durable, QoS 1, on the bed's safety topic."""
        self._pub.publish_event(self._topics.safety(device_id), payload, device_id=device_id)

    def dose_record(self, device_id: str, record: DoseRecord) -> None:
        """The blinded event and its restricted detail, committed in one transaction."""
        self._pub.publish_dose(
            self._topics.dose(device_id),
            record.event,
            device_id=device_id,
            event_id=str(record.event.event_id),
            detail_topic=self._topics.dose_detail(device_id),
            detail=record.detail,
        )
        for listener in self.listeners:
            listener.dose_record(device_id, record)

    def device_status(self, device_id: str, status: DeviceStatus) -> None:
        self._pub.publish_status(self._topics.device_status(device_id), status, device_id=device_id)
        for listener in self.listeners:
            listener.device_status(device_id, status)

    def device_detail(self, device_id: str, detail: DeviceDetail) -> None:
        self._pub.publish_status(self._topics.device_detail(device_id), detail, device_id=device_id)
        for listener in self.listeners:
            listener.device_detail(device_id, detail)

    def telemetry(self, device_id: str, telemetry: Telemetry, detail: TelemetryDetail) -> None:
        self._pub.publish_telemetry(self._topics.telemetry(device_id), telemetry)
        self._pub.publish_telemetry(self._topics.telemetry_detail(device_id), detail)
        for listener in self.listeners:
            listener.telemetry(device_id, telemetry, detail)


def gateway_status(config: Config, *, online: bool, since: datetime | None) -> GatewayStatus:
    return GatewayStatus(
        gateway_id=config.gateway.id,
        site=config.gateway.site,
        online=online,
        version=__version__,
        config_sha256=config.source_sha256 or None,
        devices=[d.id for d in config.devices],
        since_utc=since,
    )


class Gateway:
    def __init__(
        self,
        config: Config,
        *,
        clock: Clock,
        link_factory: Callable[[DeviceSettings], Callable[[], Link]] = default_link_factory,
        store: Store | None = None,
        notifier: systemd_notify.Notifier | None = None,
    ) -> None:
        self.config = config
        # systemd readiness/watchdog (deploy/systemd); None: not run as a notify service.
        self.notifier = notifier
        self.clock = clock
        self.topics = Topics(config.broker.topic_prefix, config.gateway.site, config.gateway.id)
        self.store = store if store is not None else Store.in_dir(config.gateway.data_dir)
        self.restarts = Restarts()
        started = clock.now()

        def status_payload(online: bool) -> bytes:
            return encode(gateway_status(config, online=online, since=started if online else None))

        self.publisher = MqttPublisher(
            config.broker,
            client_id=config.broker.client_id
            or f"devicegw-{config.gateway.site}-{config.gateway.id}",
            clock=clock,
            store=self.store,
            status_topic=self.topics.gateway_status(),
            status_payload=status_payload,
            protocol=config.broker.protocol,
        )
        self.sink = MqttSink(self.publisher, self.topics)
        self.journal = SessionJournal(self.store)
        self.audit = AuditTrail(self.store, clock=clock, gateway_id=config.gateway.id)
        # The recorder is just another link listener (docs/recording-format.md).
        self.recorder = (
            RecordingWriter(config.gateway.record_dir, config)
            if config.gateway.record_dir is not None
            else None
        )
        observers: list[LinkObserver] = [self.recorder] if self.recorder is not None else []
        self.beds: dict[str, BedMonitor] = {}
        for device in config.devices:
            oximeter = config.oximeter_for(device)
            if oximeter is not None:
                self.beds[device.bed] = BedMonitor(config, device, oximeter, self.sink)
        self.runners = [
            NebulizerRunner(
                device,
                config,
                link_factory=link_factory(device),
                clock=clock,
                sink=self.sink,
                observers=list(observers),
                journal=self.journal,
                audit=self.audit,
                bed=self.beds.get(device.bed),
            )
            for device in config.devices
        ]
        self.oximeter_runners = [
            OximeterRunner(
                ox,
                source_factory=oximeter_source_factory(ox, clock),
                clock=clock,
                bed=self.beds.get(ox.bed),
            )
            for ox in config.oximeters
        ]

    async def _tick_beds(self) -> None:
        """Let the SpO2 monitors see time pass (observation windows close without samples)."""
        while True:
            await self.clock.sleep(1.0)
            now = self.clock.monotonic()
            for bed in self.beds.values():
                bed.tick(now)

    async def run(self) -> None:
        """Run until cancelled (SIGTERM/SIGINT cancel the main task)."""
        log.info(
            "gateway starting",
            extra={
                "gateway_id": self.config.gateway.id,
                "site": self.config.gateway.site,
                "version": __version__,
                "config_sha256": self.config.source_sha256,
                "devices": ",".join(d.id for d in self.config.devices),
            },
        )
        self.audit.record_assignments(self.config)
        self.audit.append(
            AuditKind.gateway_start,
            body={"version": __version__, "pid": os.getpid(), "host": socket.gethostname()},
        )
        stop_reason = "error"
        try:
            # Every task is supervised: a failure nobody expected is logged and that task
            # restarted; the others, and the process, go on (docs: README "Guarantees").
            async with asyncio.TaskGroup() as tg:
                clock, restarts = self.clock, self.restarts
                spawn(tg, "mqtt-publisher", self.publisher.run, clock=clock, restarts=restarts)
                spawn(tg, "health", lambda: health.run(self), clock=clock, restarts=restarts)
                if self.beds:
                    spawn(tg, "spo2-ticker", self._tick_beds, clock=clock, restarts=restarts)
                for ox_runner in self.oximeter_runners:
                    name = f"oximeter-{ox_runner.oximeter.id}"
                    spawn(tg, name, ox_runner.run, clock=clock, restarts=restarts)
                for runner in self.runners:
                    name = f"device-{runner.device.id}"
                    spawn(tg, name, runner.run, clock=clock, restarts=restarts)
                notifier = self.notifier
                if notifier is not None:  # last: READY=1 once everything else runs
                    spawn(
                        tg,
                        "systemd-notify",
                        lambda: systemd_notify.run(self, notifier),
                        clock=clock,
                        restarts=restarts,
                    )
        except asyncio.CancelledError:
            stop_reason = "stopped"
            raise
        finally:
            if self.recorder is not None:
                self.recorder.close()
            with contextlib.suppress(Exception):
                self.audit.append(AuditKind.gateway_stop, body={"reason": stop_reason})
            log.info("gateway stopped", extra={"gateway_id": self.config.gateway.id})
