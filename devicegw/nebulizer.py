"""One VM-1 nebulizer, live: link lifecycle, handshake, commands, session tracking.

Bytes come from a :class:`~drivers.transport.base.ByteLink`; the codec turns
them into messages; the pure :class:`SessionTracker` turns messages into
sessions; finished sessions are assessed and handed to the sink as dose
events. The link is reopened by itself with capped, jittered backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from devicegw.backoff import Backoff
from devicegw.clock import Clock
from devicegw.config import Config, DeviceSettings
from devicegw.dose_check import assess
from devicegw.dose_record import build_dose_event, device_identity
from devicegw.errors import DeviceTimeoutError, TransportError
from devicegw.payloads import DeviceStatus, DoseEvent, Telemetry
from devicegw.session_tracker import (
    AlarmChanged,
    FetchSessionRecord,
    Rx,
    SessionFinished,
    SessionStarted,
    SessionTracker,
    StateChanged,
    TrackerEvent,
)
from drivers.transport.base import ByteLink
from drivers.vm1.messages import (
    MESSAGE_TYPES,
    Ack,
    AckResult,
    DeviceMessage,
    GetInfo,
    GetSession,
    HostCommand,
    Ident,
    Output,
    Ping,
    SetClock,
    SetRate,
    Start,
    Status,
    Stop,
    alarm_name,
)
from drivers.vm1.stream import Vm1StreamDecoder, encode_message_frame

log = logging.getLogger(__name__)

HOST_COMMAND_TYPES = (GetInfo, SetClock, SetRate, GetSession, Start, Stop, Ping)

ACK_TIMEOUT_DEVICE_S = 0.5  # ICD: resend a command that got no ACK after 500 ms
ACK_TIMEOUT_MIN_REAL_S = 0.25  # floor in real time, so a fast clock does not starve the pty
COMMAND_ATTEMPTS = 3


class GatewaySink(Protocol):
    """Where a device's outputs go (MQTT in the daemon; a list in tests)."""

    def dose_event(self, device_id: str, event: DoseEvent) -> None: ...

    def device_status(self, device_id: str, status: DeviceStatus) -> None: ...

    def telemetry(self, device_id: str, telemetry: Telemetry) -> None: ...


@dataclass(slots=True)
class DeviceHealth:
    connected: bool = False
    connects: int = 0
    last_frame_mono: float | None = None
    frames_ok: int = 0
    frames_bad: int = 0
    frames_lost: int = 0
    refused: str | None = None
    last_error: str | None = None


class UnexpectedDeviceError(TransportError):
    """The device on a configured port is not the one on the allow-list."""


class NebulizerRunner:
    def __init__(
        self,
        device: DeviceSettings,
        config: Config,
        *,
        link_factory: Callable[[], ByteLink],
        clock: Clock,
        sink: GatewaySink,
        backoff: Backoff | None = None,
    ) -> None:
        self.device = device
        self.config = config
        self._link_factory = link_factory
        self._clock = clock
        self._sink = sink
        self._backoff = backoff or Backoff(0.5, 30.0)
        self.tracker = SessionTracker()
        self.health = DeviceHealth()
        self._link: ByteLink | None = None
        self._host_seq = 0
        self._pending_acks: dict[tuple[int, int], asyncio.Future[Ack]] = {}
        self._last_telemetry = float("-inf")
        self._last_status_key: tuple[object, ...] | None = None
        self._ident_seen = asyncio.Event()

    # -- lifecycle -------------------------------------------------------------

    async def run(self) -> None:
        """Keep the device connected until cancelled."""
        first_failure = True
        while True:
            link = self._link_factory()
            try:
                await link.open()
            except TransportError as exc:
                self.health.last_error = str(exc)
                level = logging.WARNING if first_failure else logging.DEBUG
                log.log(
                    level, "cannot open device link: %s", exc, extra={"device_id": self.device.id}
                )
                if first_failure:
                    self._publish_status(error=str(exc))
                first_failure = False
                await self._clock.sleep(self._backoff.next_delay())
                continue
            first_failure = True
            try:
                await self._session_on(link)
            except UnexpectedDeviceError as exc:
                self.health.refused = str(exc)
                # A refusal, not a crash: no traceback wanted.
                log.error("device refused: %s", exc, extra={"device_id": self.device.id})  # noqa: TRY400
                self._publish_status(error=str(exc))
            except TransportError as exc:
                self.health.last_error = str(exc)
                log.warning("device link lost: %s", exc, extra={"device_id": self.device.id})
            except Exception as exc:
                # A bug must not take the other devices down, and must not be hidden either.
                self.health.last_error = f"internal error: {exc!r}"
                log.exception(
                    "device runner failed; restarting", extra={"device_id": self.device.id}
                )
            finally:
                await self._on_link_closed(link)
            await self._clock.sleep(self._backoff.next_delay())

    async def _session_on(self, link: ByteLink) -> None:
        self._link = link
        self._ident_seen.clear()
        self.health.connected = True
        self.health.connects += 1
        self.health.last_error = None
        self.tracker.link_up(self._clock.now())
        log.info("device link open", extra={"device_id": self.device.id, "link": link.description})
        decoder = Vm1StreamDecoder()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._read_loop(link, decoder, tg), name=f"{self.device.id}-read")
                tg.create_task(self._handshake(), name=f"{self.device.id}-handshake")
        except ExceptionGroup as group:
            # A broken link surfaces as a TransportError from whichever task saw it first.
            link_errors, others = group.split(TransportError)
            if others is not None or link_errors is None:
                raise
            raise link_errors.exceptions[0] from None

    async def _on_link_closed(self, link: ByteLink) -> None:
        self._link = None
        for fut in self._pending_acks.values():
            if not fut.done():
                fut.cancel()
        self._pending_acks.clear()
        with contextlib.suppress(TransportError):
            await link.close()
        if self.health.connected:
            self.health.connected = False
            self.tracker.link_down(self._clock.now())
            self._publish_status()

    async def _handshake(self) -> None:
        """On every (re)connect: identify the device and set its clock (ICD section 2)."""
        try:
            await self.command(GetInfo())
            await self.command(SetClock(unix_s=int(self._clock.now().timestamp())))
            if self.device.output_rate_hz is not None:
                await self.command(SetRate(hz=self.device.output_rate_hz))
        except DeviceTimeoutError as exc:
            # The link stays up: the device may still be streaming; the next reconnect retries.
            log.warning("device handshake: %s", exc, extra={"device_id": self.device.id})
            return
        self._backoff.reset()

    # -- bytes in --------------------------------------------------------------

    async def _read_loop(
        self, link: ByteLink, decoder: Vm1StreamDecoder, tg: asyncio.TaskGroup
    ) -> None:
        bad_before = 0
        lost_before = 0
        while True:
            data = await link.read()
            messages = decoder.feed(data)
            stats = decoder.stats
            bad = stats.frames_bad + stats.bad_payloads
            if bad != bad_before:
                self.tracker.bad_frames(bad - bad_before)
                self.health.frames_bad += bad - bad_before
                bad_before = bad
            if stats.frames_lost != lost_before:
                self.health.frames_lost += stats.frames_lost - lost_before
                lost_before = stats.frames_lost
            for msg in messages:
                if isinstance(msg, HOST_COMMAND_TYPES):
                    continue  # our own commands echoed back: not from the device
                self._on_message(msg, tg)

    def _on_message(self, msg: DeviceMessage, tg: asyncio.TaskGroup) -> None:
        self.health.frames_ok += 1
        self.health.last_frame_mono = self._clock.monotonic()
        if isinstance(msg, Ack):
            fut = self._pending_acks.get((msg.acked_seq, msg.cmd))
            if fut is not None and not fut.done():
                fut.set_result(msg)
            return
        if isinstance(msg, Ident):
            self._check_allowed(msg)
            self._ident_seen.set()
        rx = Rx(msg=msg, utc=self._clock.now(), mono=self._clock.monotonic())
        for event in self.tracker.feed(rx):
            self._on_tracker_event(event, tg)
        if isinstance(msg, Output):
            self._maybe_telemetry(msg)
        elif isinstance(msg, (Ident, Status)):
            self._publish_status()

    def _check_allowed(self, ident: Ident) -> None:
        expected = self.device.expected_serial
        if expected is not None and ident.serial_no != expected:
            raise UnexpectedDeviceError(
                f"port {self.device.link.port} answered with serial {ident.serial_no!r}, "
                f"expected {expected!r}; device not used",
                device_id=self.device.id,
            )

    def _on_tracker_event(self, event: TrackerEvent, tg: asyncio.TaskGroup) -> None:
        if isinstance(event, SessionStarted):
            log.info(
                "session started",
                extra={
                    "device_id": self.device.id,
                    "session_no": event.session_no,
                    "fill_ul": event.fill_ul,
                },
            )
        elif isinstance(event, SessionFinished):
            self._emit_dose(event)
        elif isinstance(event, FetchSessionRecord):
            tg.create_task(self._fetch_record(event.session_no), name=f"{self.device.id}-fetch")
        elif isinstance(event, AlarmChanged):
            log.warning(
                "device alarm %s %s",
                alarm_name(event.code),
                "raised" if event.active else "cleared",
                extra={"device_id": self.device.id, "alarm_code": event.code},
            )
            self._publish_status()
        elif isinstance(event, StateChanged):
            pass  # the Status message itself triggers the status publication

    def _emit_dose(self, event: SessionFinished) -> None:
        session = event.session
        assessment = assess(session, self.config.dose_rules)
        dose = build_dose_event(
            session, assessment, device=self.device, ident=self.tracker.identity, config=self.config
        )
        log.info(
            "session finished",
            extra={
                "device_id": self.device.id,
                "session_no": session.session_no,
                "verdict": dose.verdict,
                "reasons": ",".join(dose.reasons),
                "delivered_ml": dose.volume.delivered_ml,
                "event_id": str(dose.event_id),
            },
        )
        self._sink.dose_event(self.device.id, dose)

    async def _fetch_record(self, session_no: int) -> None:
        try:
            ack = await self.command(GetSession(session_no=session_no))
        except (DeviceTimeoutError, TransportError) as exc:
            log.warning(
                "GET_SESSION %d failed: %s", session_no, exc, extra={"device_id": self.device.id}
            )
            return
        if ack.result != AckResult.OK:
            log.error(
                "device no longer holds session %d (%s)",
                session_no,
                ack.result.name,
                extra={"device_id": self.device.id},
            )

    # -- commands out ----------------------------------------------------------

    async def command(self, cmd: HostCommand) -> Ack:
        """Send a host command and wait for its ACK, resending per the ICD."""
        link = self._link
        if link is None:
            raise TransportError("device link is not open", device_id=self.device.id)
        seq = self._host_seq
        self._host_seq = (self._host_seq + 1) % 256
        frame = encode_message_frame(dataclasses.replace(cmd, seq=seq))
        key = (seq, int(MESSAGE_TYPES[type(cmd)]))
        fut: asyncio.Future[Ack] = asyncio.get_running_loop().create_future()
        self._pending_acks[key] = fut
        timeout = max(ACK_TIMEOUT_DEVICE_S / self._clock.scale, ACK_TIMEOUT_MIN_REAL_S)
        try:
            for _ in range(COMMAND_ATTEMPTS):
                await link.write(frame)
                try:
                    async with asyncio.timeout(timeout):
                        return await asyncio.shield(fut)
                except TimeoutError:
                    continue
            raise DeviceTimeoutError(
                f"no ACK for {type(cmd).__name__} after {COMMAND_ATTEMPTS} attempts",
                device_id=self.device.id,
                command=type(cmd).__name__,
            )
        finally:
            self._pending_acks.pop(key, None)
            if not fut.done():
                fut.cancel()

    # -- outputs ---------------------------------------------------------------

    def _maybe_telemetry(self, msg: Output) -> None:
        tcfg = self.config.telemetry
        now = self._clock.monotonic()
        if not tcfg.enabled or now - self._last_telemetry < tcfg.interval_s:
            return
        self._last_telemetry = now
        o = self.tracker.open_session
        status = self.tracker.status
        self._sink.telemetry(
            self.device.id,
            Telemetry(
                gateway_id=self.config.gateway.id,
                device_id=self.device.id,
                utc=self._clock.now(),
                state=status.state.name if status else None,
                session_no=o.session_no if o else None,
                elapsed_s=round(o.last_dev - o.start_dev, 3) if o else None,
                rate_ul_min=msg.rate_ul_min,
                delivered_ml=round(msg.cum_ul / 1000.0, 3),
                reservoir_ml=(
                    None
                    if status is None or status.reservoir_ul is None
                    else round(status.reservoir_ul / 1000.0, 3)
                ),
                battery_pct=status.battery_pct if status else None,
            ),
        )

    def _publish_status(self, *, error: str | None = None) -> None:
        t = self.tracker
        status = t.status
        alarms = sorted(alarm_name(c) for c in t.active_alarms)
        key = (
            self.health.connected,
            status.state if status else None,
            status.battery_pct if status else None,
            tuple(alarms),
            t.identity.serial_no if t.identity else None,
            error,
        )
        if key == self._last_status_key:
            return
        self._last_status_key = key
        self._sink.device_status(
            self.device.id,
            DeviceStatus(
                gateway_id=self.config.gateway.id,
                device_id=self.device.id,
                connected=self.health.connected,
                state=status.state.name if status else None,
                identity=device_identity(self.device, t.identity),
                battery_pct=status.battery_pct if status else None,
                on_mains=status.on_mains if status else None,
                reservoir_ml=(
                    None
                    if status is None or status.reservoir_ul is None
                    else round(status.reservoir_ul / 1000.0, 3)
                ),
                active_alarms=alarms,
                last_seen_utc=self._clock.now()
                if self.health.last_frame_mono is not None
                else None,
                error=error,
            ),
        )
