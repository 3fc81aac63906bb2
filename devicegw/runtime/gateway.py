"""The long-running gateway: every configured device plus the broker connection.

Each device, and each bed's SpO2 tick, is a supervised runner in its own task
(:mod:`devicegw.runtime.supervise`): a device that cannot be opened keeps
retrying, and one that fails unexpectedly is restarted, without affecting the
others. Dose events, statuses and telemetry flow from the device runners
through a sink to the MQTT publisher (and to any extra listeners, e.g. the
demo's live view).

``async with Gateway(config, clock=clock) as gw: await gw.run()`` closes what
the gateway opened (its store, its recorder) on the way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from types import TracebackType

from pydantic import BaseModel

from devicegw import __version__
from devicegw.config import Config, DeviceSettings
from devicegw.contract.payloads import (
    DeviceDetail,
    DeviceStatus,
    DoseRecord,
    GatewayRef,
    GatewayStatus,
    StoreState,
    Telemetry,
    TelemetryDetail,
)
from devicegw.contract.topics import Topics
from devicegw.core.bed_monitor import BedMonitor
from devicegw.core.ports import AuditKind
from devicegw.mqtt.publisher import MqttPublisher, encode
from devicegw.recording.bed_inputs import RecordingBedMonitor
from devicegw.recording.format import RecordingWriter
from devicegw.runtime import descriptors, health, loop_lag, systemd_notify
from devicegw.runtime.assign_command import AssignCommand
from devicegw.runtime.assignment_commands import AssignmentDesk, seed_initial
from devicegw.runtime.control_socket import ControlServer
from devicegw.runtime.correction_commands import CorrectionDesk
from devicegw.runtime.link_events import LinkObserver
from devicegw.runtime.link_factory import link_factory as default_link_factory
from devicegw.runtime.link_factory import oximeter_source_factory, serial_ports
from devicegw.runtime.nebulizer_runner import GatewaySink, NebulizerRunner, SerialClaims
from devicegw.runtime.oximeter_runner import OximeterRunner
from devicegw.runtime.schedule_watch import ScheduleWatch
from devicegw.runtime.supervise import Restarts, Runner, Task, spawn
from devicegw.storage.assignments import AssignmentService, load_kit_list
from devicegw.storage.audit import AuditTrail
from devicegw.storage.corrections import CorrectionService
from devicegw.storage.journal import SessionJournal
from devicegw.storage.schedule_book import ScheduleBook
from devicegw.storage.store import Store
from devicegw.storage.witness import StoreOpening, open_checked, write_witness
from drivers.clock import Clock
from drivers.transport.base import Link

log = logging.getLogger(__name__)

WITNESS_INTERVAL_S = 60.0
HELD_RETRY_S = 2.0
#: How old the status snapshot's count of open descriptors may be (counting costs ms).
DESCRIPTOR_COUNT_MAX_AGE_S = 10.0


class MqttSink:
    """Routes device outputs to their topics (blinded or restricted), then to any listeners."""

    def __init__(self, publisher: MqttPublisher, topics: Topics) -> None:
        self._pub = publisher
        self._topics = topics
        self.listeners: list[GatewaySink] = []
        self.safety_listeners: list[Callable[[str, BaseModel], None]] = []

    def safety_event(self, device_id: str, payload: BaseModel) -> None:
        """Safety alerts and post-dose summaries: durable, QoS 1, on the bed's safety topic."""
        self._pub.publish_event(self._topics.safety(device_id), payload, device_id=device_id)
        for listen in self.safety_listeners:
            listen(device_id, payload)

    def dose_record(self, device_id: str, record: DoseRecord) -> None:
        """The blinded event and its restricted detail, committed in one transaction."""
        self._pub.commit_dose(
            self._topics.dose(device_id),
            record,
            device_id=device_id,
            detail_topic=self._topics.dose_detail(device_id),
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


def gateway_status(
    config: Config, *, online: bool, since: datetime | None, store: StoreState | None = None
) -> GatewayStatus:
    return GatewayStatus(
        store=store,
        gateway_id=config.gateway.id,
        site=config.gateway.site,
        online=online,
        version=__version__,
        config_sha256=config.source_sha256 or None,
        devices=[d.id for d in config.devices],
        since_utc=since,
    )


class BedTicker:
    """Lets one bed's SpO2 monitor see time pass (observation windows close without samples).

    One per bed, each supervised on its own: a bug in one bed's tick restarts that
    ticker only.
    """

    def __init__(self, bed: str, monitor: BedMonitor, clock: Clock) -> None:
        self.bed = bed
        self.monitor = monitor
        self._clock = clock

    @property
    def task_name(self) -> str:
        return f"spo2-tick-{self.bed}"

    async def run(self) -> None:
        while True:
            await self._clock.sleep(1.0)
            self.monitor.tick(self._clock.monotonic())

    def crashed(self, error: str) -> None:
        pass


STOP_ROUND_S = 0.2
#: A task still running this long after its last cancellation is cancelled again.
STOP_GRACE_S = 5.0
STOP_LIMIT_S = 60.0


async def _stop(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel every task until it has stopped.

    On Python 3.11 a cancellation can be lost: ``asyncio.wait_for`` returning just as it
    arrives, or a TaskGroup whose child fails at that moment, swallows it, and the task
    runs on. A task is cancelled again when nothing cancellation is pending on it any
    more (its cancellation was swallowed) or it has run on for STOP_GRACE_S since the
    last one -- never while it is still cleaning up in time (the dashboard's server
    closing its connections). Bounded: what still runs after STOP_LIMIT_S is logged
    and left to the TaskGroup.
    """
    loop = asyncio.get_running_loop()
    last: dict[asyncio.Task[None], float] = {}
    deadline = loop.time() + STOP_LIMIT_S
    while loop.time() < deadline:
        pending = [t for t in tasks if not t.done()]
        if not pending:
            return
        now = loop.time()
        for task in pending:
            if task not in last or task.cancelling() == 0 or now - last[task] >= STOP_GRACE_S:
                task.cancel()
                last[task] = now
        await asyncio.wait(pending, timeout=STOP_ROUND_S)
    still = [t.get_name() for t in tasks if not t.done()]
    log.error(
        "tasks still running %g s after their cancellation: %s", STOP_LIMIT_S, ", ".join(still)
    )


class Gateway:
    def __init__(
        self,
        config: Config,
        *,
        clock: Clock,
        link_factory: Callable[[DeviceSettings], Callable[[], Link]] | None = None,
        store: Store | None = None,
        notifier: systemd_notify.Notifier | None = None,
        new_store: bool = False,
    ) -> None:
        self.config = config
        # Read before anything is opened: a bad kit list refuses the start with its reason.
        trial = config.trial
        kits = None if trial is None or trial.kit_list is None else load_kit_list(trial.kit_list)
        # systemd readiness/watchdog (deploy/systemd); None: not run as a notify service.
        self.notifier = notifier
        self.clock = clock
        self.topics = Topics(config.broker.topic_prefix, config.gateway.site, config.gateway.id)
        # A store handed in is the caller's to close; one opened here is closed by __aexit__.
        self._owns_store = store is None
        # Checked against its witness file and with quick_check (devicegw/storage/witness.py).
        self.store_opening = (
            StoreOpening(store=store)
            if store is not None
            else open_checked(config.gateway.data_dir, new_store=new_store)
        )
        self.store = self.store_opening.store
        # The control socket, status.json and the witness live here even when the store was
        # handed in from elsewhere; made now, not by whichever task happens to write first.
        Path(config.gateway.data_dir).mkdir(parents=True, exist_ok=True)
        self.restarts = Restarts()
        self.loop_lag = loop_lag.LoopLag()
        started = clock.now()

        def status_payload(online: bool) -> bytes:
            held = self.store.held
            store = (
                StoreState(
                    disk_full=bool(len(held)),
                    held_writes=len(held),
                    held_dose_events=held.dose_events(),
                )
                if online
                else None
            )
            since = started if online else None
            return encode(gateway_status(config, online=online, since=since, store=store))

        try:  # a broker setting refused here (e.g. an unreadable CA file): close the store
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
        except BaseException:
            if self._owns_store:
                self.store.close()
            raise
        self.sink = MqttSink(self.publisher, self.topics)
        self.journal = SessionJournal(self.store)
        self.audit = AuditTrail(self.store, clock=clock, gateway_id=config.gateway.id)
        # Bedside assignments (docs/assignments.md): every dose is attributed by its start.
        self.assignment_service = AssignmentService(
            self.store,
            self.audit,
            clock=clock,
            kit_list=kits,
            subject_pattern=None if trial is None else trial.subject_pattern,
            beds=[d.bed for d in config.devices],
        )
        seed_initial(self.assignment_service, config)
        self.assignments = AssignmentDesk(self.assignment_service)
        self.corrections = CorrectionDesk(
            CorrectionService(
                self.store,
                self.audit,
                clock=clock,
                gateway=GatewayRef(
                    id=config.gateway.id, site=config.gateway.site, version=__version__
                ),
                kit_list=kits,
                subject_pattern=None if trial is None else trial.subject_pattern,
            ),
            self.publisher,
            self.topics,
        )
        # The dosing schedule (docs/assignments.md, "Schedule"): absent, no dose numbers.
        self.schedule: ScheduleBook | None = None
        self.schedule_watch: ScheduleWatch | None = None
        if config.schedule is not None:
            self.schedule = self.assignments.schedule = ScheduleBook(
                self.store,
                config.schedule,
                time_zone="UTC" if trial is None else trial.time_zone,
                gateway=GatewayRef(
                    id=config.gateway.id, site=config.gateway.site, version=__version__
                ),
                clock=clock,
            )
            self.schedule_watch = ScheduleWatch(
                config, self.schedule, self.assignment_service, self.publisher, self.topics, clock
            )
        # The site's IWRS/EDC may push assignments over MQTT (docs/assignments.md).
        self.assign_command: AssignCommand | None = None
        if config.broker.assign_users:
            self.assign_command = AssignCommand(
                self.topics, self.assignments, config.broker.assign_users
            )
            self.publisher.add_command(self.assign_command.topic_filter, self.assign_command)
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
            if oximeter is None:
                continue
            if self.recorder is not None:
                # The bed's SpO2 inputs go into its nebulizer's recording (replay gives `spo2`).
                self.beds[device.bed] = RecordingBedMonitor(
                    config, device, oximeter, self.sink, writer=self.recorder, clock=clock
                )
            else:
                self.beds[device.bed] = BedMonitor(config, device, oximeter, self.sink)
        #: VM-1 serial numbers in use, by device: a second device reporting one is refused.
        self.serial_claims = SerialClaims()
        # By default a serial port is refused while another entry names the same device.
        serial_entries = serial_ports([*config.devices, *config.oximeters])
        if link_factory is None:

            def link_factory(device: DeviceSettings) -> Callable[[], Link]:
                return default_link_factory(device, serial_entries)

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
                attributor=self.assignment_service,
                schedule=self.schedule,
                claims=self.serial_claims,
            )
            for device in config.devices
        ]
        self.oximeter_runners = [
            OximeterRunner(
                ox,
                source_factory=oximeter_source_factory(ox, clock, serial_entries),
                clock=clock,
                bed=self.beds.get(ox.bed),
            )
            for ox in config.oximeters
        ]

        self.bed_tickers = [BedTicker(bed, m, clock) for bed, m in self.beds.items()]
        #: More supervised parts added by whoever runs the gateway (the web dashboard).
        self.extra_runners: list[Runner] = []

    async def __aenter__(self) -> Gateway:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close what the gateway opened: the recorder and (unless handed in) the store."""
        if self.recorder is not None:
            self.recorder.close()
        if self._owns_store:
            self.store.close()

    def supervised_runners(self) -> list[Runner]:
        """Every long-running part, each under the one runner contract (supervise.py)."""
        runners: list[Runner] = [
            Task("mqtt-publisher", self.publisher.run),
            Task(
                "health",
                lambda: health.run(self.snapshot_in_slices, self.config.gateway.data_dir),
            ),
            Task("loop-lag", lambda: loop_lag.run(self.loop_lag)),
            Task("store-upkeep", self._store_upkeep),
            Task("store-checkpoint", self.store.checkpoint_in_background),
            ControlServer(self.config.gateway.data_dir, self.assignments, self.corrections),
        ]
        if self.schedule_watch is not None:
            runners.append(self.schedule_watch)
        runners += self.extra_runners
        runners += self.bed_tickers
        runners += self.oximeter_runners
        runners += self.runners
        notifier = self.notifier
        # Outside a Type=notify service there is nothing to tell: no task (it would return
        # at once, and the supervisor would log it as a failure every second or so).
        if notifier is not None and notifier.enabled:  # last: READY=1 once all else runs
            runners.append(
                Task("systemd-notify", lambda: systemd_notify.run(self.snapshot, notifier))
            )
        return runners

    def snapshot(self) -> health.GatewaySnapshot:
        """What `devicegw status` shows (written by :mod:`devicegw.runtime.health`)."""
        now_mono = self.clock.monotonic()
        return self._gateway_snapshot(
            {r.device.id: self._device_snapshot(r, now_mono) for r in self.runners},
            {o.oximeter.id: self._oximeter_snapshot(o, now_mono) for o in self.oximeter_runners},
        )

    async def snapshot_in_slices(self) -> health.GatewaySnapshot:
        """:meth:`snapshot`, handing the loop back every :data:`health.SLICE` devices.

        At 500 beds one snapshot of 1,000 devices took ~12 ms of the loop in one go,
        every 2 s: every port's data waited meanwhile (issue 13). Each device's entry is
        still one consistent view; entries are up to a few ms apart.
        """
        now_mono = self.clock.monotonic()
        devices: dict[str, health.DeviceSnapshot] = {}
        async for runners in health.in_slices(self.runners):
            devices.update((r.device.id, self._device_snapshot(r, now_mono)) for r in runners)
        oximeters: dict[str, health.OximeterSnapshot] = {}
        async for oxs in health.in_slices(self.oximeter_runners):
            oximeters.update((o.oximeter.id, self._oximeter_snapshot(o, now_mono)) for o in oxs)
        return self._gateway_snapshot(devices, oximeters)

    @staticmethod
    def _device_snapshot(runner: NebulizerRunner, now_mono: float) -> health.DeviceSnapshot:
        h = runner.health
        ident = runner.tracker.identity
        return health.DeviceSnapshot(
            identity=None
            if ident is None
            else health.DeviceIdentity(ident.model, ident.serial_no, ident.firmware),
            port=runner.device.link.port_name,
            connected=h.connected,
            connects=h.connects,
            open_failures=h.open_failures,
            refusals=h.refusals,
            last_frame_age_s=health.age(now_mono, h.last_frame_mono),
            frames_ok=h.frames_ok,
            frames_bad=h.frames_bad,
            frames_lost=h.frames_lost,
            refused=h.refused,
            last_error=h.last_error,
            identified=h.identified,
            identity_note=h.identity_note,
            held_before_ident=h.held_before_ident,
            dropped_before_ident=h.dropped_before_ident,
            idents_ignored=h.idents_ignored,
            open_session=runner.tracker.open_session_no,
        )

    @staticmethod
    def _oximeter_snapshot(ox: OximeterRunner, now_mono: float) -> health.OximeterSnapshot:
        oh = ox.health
        return health.OximeterSnapshot(
            port=ox.oximeter.link.port_name,
            bed=ox.oximeter.bed,
            connected=oh.connected,
            last_sample_age_s=health.age(now_mono, oh.last_sample_mono),
            samples=oh.samples,
            samples_gated=oh.samples_gated,
            checksum_errors=oh.checksum_errors,
            last_error=oh.last_error,
        )

    def _gateway_snapshot(
        self,
        devices: dict[str, health.DeviceSnapshot],
        oximeters: dict[str, health.OximeterSnapshot],
    ) -> health.GatewaySnapshot:
        held = self.store.held
        lag = self.loop_lag
        return health.GatewaySnapshot(
            gateway_id=self.config.gateway.id,
            site=self.config.gateway.site,
            utc=self.clock.now().isoformat(),
            pid=os.getpid(),
            broker={
                "host": self.config.broker.host,
                "port": self.config.broker.port,
                **asdict(self.publisher.stats),
            },
            outbox_depth=self.publisher.outbox.depth(),
            store_bytes=self.store.size_bytes(),
            store=health.StoreSnapshot(
                held_writes=len(held),
                held_dose_events=held.dose_events(),
                held_dropped=held.dropped,
                disk_full_since=None if held.full_since is None else held.full_since.isoformat(),
                last_error=held.last_error,
                quarantined_rows=self.publisher.outbox.quarantined_now,
            ),
            descriptors_in_use=descriptors.in_use(max_age_s=DESCRIPTOR_COUNT_MAX_AGE_S),
            descriptors_limit=descriptors.limit(),
            devices=devices,
            oximeters=oximeters,
            task_restarts=dict(self.restarts.counts),
            task_errors=dict(self.restarts.last_error),
            loop_lag=health.LoopLagSnapshot(
                samples=lag.samples,
                max_s=round(lag.max_s, 4),
                over_50ms=lag.over_50ms,
                stalls=lag.stalls,
            ),
        )

    def _audit_store_opening(self) -> None:
        opening = self.store_opening
        if opening.created and opening.replaced_witness is not None:
            self.audit.append(
                AuditKind.store_created,
                body={
                    "why": "the operator confirmed a new store (--new-store)",
                    "replaced_witness": opening.replaced_witness,
                },
            )
        elif opening.replaced_witness is not None:
            self.audit.append(
                AuditKind.store_created,
                body={
                    "why": "the operator accepted a store other than the witnessed one "
                    "(--new-store)",
                    "replaced_witness": opening.replaced_witness,
                },
            )
        if opening.problems:
            self.audit.append(
                AuditKind.store_check,
                body={"problems": opening.problems[:20], "repaired": opening.repaired},
            )

    def _write_witness(self) -> None:
        with contextlib.suppress(Exception):  # a damaged or full store: logged where it failed
            # Only a head that is on disk: sessions committed with sync_later may not be yet.
            self.store.sync_now()
            head = str(self.audit.head())
            write_witness(self.config.gateway.data_dir, head, now=self.clock.now())

    async def _store_upkeep(self) -> None:
        """Retry writes a full disk refused (every 2 s, an ERROR line a minute while any
        are held); every minute the witness file and the audit's coalesced summaries."""
        held = self.store.held
        last_minute = self.clock.monotonic()
        shown = (False, 0)  # (disk full, dose events held) as the status topic last said
        while True:
            await self.clock.sleep(HELD_RETRY_S)
            if len(held):
                held.retry()
            state = (bool(len(held)), held.dose_events())
            if state != shown:  # the disk filled, freed, or holds another dose: say so
                shown = state
                self.publisher.republish_status()
            if self.clock.monotonic() - last_minute < WITNESS_INTERVAL_S:
                continue
            last_minute = self.clock.monotonic()
            if len(held):
                log.error(
                    "the disk is full: %d decided writes held in memory (%d dose events), "
                    "retrying; free space in %s",
                    len(held),
                    held.dose_events(),
                    self.config.gateway.data_dir,
                    extra={"held_writes": len(held), "last_error": held.last_error},
                )
                continue
            self.audit.flush_coalesced()
            self._write_witness()

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
        self._audit_store_opening()
        self._write_witness()
        stop_reason = "error"
        try:
            # Every task is supervised: a failure nobody expected is logged and that task
            # restarted; the others, and the process, go on (docs: README "Guarantees").
            async with asyncio.TaskGroup() as tg:
                tasks = [
                    spawn(tg, runner, clock=self.clock, restarts=self.restarts)
                    for runner in self.supervised_runners()
                ]
                try:
                    await asyncio.Future()  # until cancelled
                except asyncio.CancelledError:
                    await _stop(tasks)
                    raise
        except asyncio.CancelledError:
            stop_reason = "stopped"
            raise
        finally:
            if self.recorder is not None:
                self.recorder.close()  # (again in close(): closing twice is harmless)
            with contextlib.suppress(Exception):
                self.audit.flush_coalesced(everything=True)
                self.audit.append(AuditKind.gateway_stop, body={"reason": stop_reason})
            self._write_witness()
            log.info("gateway stopped", extra={"gateway_id": self.config.gateway.id})
