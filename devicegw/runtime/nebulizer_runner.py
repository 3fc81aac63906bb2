"""One VM-1 nebulizer, live: link lifecycle, handshake and commands.

Chunks come from a :class:`~drivers.transport.base.Link` (serial bytes, or one
VM-1 payload per BLE value) and go through the device's :class:`Vm1Pipeline`
(the same one replays use), which decodes them by the link's unit; commands go
out encoded for that unit (a serial frame, or a bare payload). The link is reopened
by itself with capped, jittered backoff; on every (re)connect the gateway sends
GET_INFO until the device has identified itself (IDENT), then SET_CLOCK. A
device that acknowledges GET_INFO but never sends IDENT is asked again, with
backoff, for as long as the link is up; its data is held meanwhile, never used
(see :mod:`devicegw.core.vm1_pipeline`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable

from devicegw.config import Config, DeviceSettings
from devicegw.core.bed_monitor import BedMonitor
from devicegw.core.ports import Attributor, DoseSchedule
from devicegw.core.session_tracker import SessionTracker
from devicegw.core.vm1_pipeline import (
    DeviceHealth,
    GatewaySink,
    SerialClaims,
    UnexpectedDeviceError,
    Vm1Pipeline,
)
from devicegw.errors import DeviceTimeoutError, TransportError
from devicegw.runtime.link_events import LinkObserver
from devicegw.runtime.log_summary import RepeatedLog
from devicegw.runtime.reconnect import open_until_up
from devicegw.storage.audit import AuditTrail
from devicegw.storage.journal import SessionJournal
from drivers.backoff import Backoff
from drivers.clock import Clock
from drivers.transport.base import Link
from drivers.vm1.messages import (
    MESSAGE_TYPES,
    Ack,
    AckResult,
    GetInfo,
    GetSession,
    HostCommand,
    SetClock,
    SetRate,
)
from drivers.vm1.stream import encode_for_link

__all__ = ["GatewaySink", "NebulizerRunner", "SerialClaims", "UnexpectedDeviceError"]

log = logging.getLogger(__name__)

ACK_TIMEOUT_DEVICE_S = 0.5  # ICD: resend a command that got no ACK after 500 ms
ACK_TIMEOUT_MIN_REAL_S = 0.25  # floor in real time, so a fast clock does not starve the pty
COMMAND_ATTEMPTS = 3
IDENT_TIMEOUT_DEVICE_S = 1.0  # IDENT follows GET_INFO's ACK at once (ICD section 2)
#: A stream link that brings this many bytes without one valid frame is line noise (or the wrong
#: device): it is closed and reopened with backoff rather than decoded at full speed for ever.
#: A VM-1 sends a frame at least every 100 ms; 64 KiB is ~5.7 s of a 115200-baud line.
NOISE_LIMIT_BYTES = 64 * 1024
NOT_IDENTIFIED = "device does not identify itself (no IDENT after GET_INFO); its data is not used"


class NebulizerRunner:
    def __init__(
        self,
        device: DeviceSettings,
        config: Config,
        *,
        link_factory: Callable[[], Link],
        clock: Clock,
        sink: GatewaySink,
        backoff: Backoff | None = None,
        observers: list[LinkObserver] | None = None,
        journal: SessionJournal | None = None,
        audit: AuditTrail | None = None,
        bed: BedMonitor | None = None,
        attributor: Attributor | None = None,
        schedule: DoseSchedule | None = None,
        claims: SerialClaims | None = None,
    ) -> None:
        self.device = device
        self.config = config
        self.pipeline = Vm1Pipeline(
            device,
            config,
            sink,
            journal=journal,
            audit=audit,
            bed=bed,
            attributor=attributor,
            schedule=schedule,
            claims=claims,
        )
        self.observers = observers if observers is not None else []
        self._link_factory = link_factory
        self._clock = clock
        self._backoff = backoff or Backoff(0.5, 30.0)
        self._link: Link | None = None
        self._host_seq = 0
        self._pending_acks: dict[tuple[int, int], asyncio.Future[Ack]] = {}
        self._identified = asyncio.Event()
        self._repeats = RepeatedLog(log, clock.monotonic)

    @property
    def task_name(self) -> str:
        return f"device-{self.device.id}"

    @property
    def tracker(self) -> SessionTracker:
        return self.pipeline.tracker

    @property
    def health(self) -> DeviceHealth:
        return self.pipeline.health

    # -- lifecycle -------------------------------------------------------------

    async def run(self) -> None:
        """Keep the device connected until cancelled."""
        while True:
            link = await open_until_up(
                self._link_factory,
                clock=self._clock,
                backoff=self._backoff,
                log=log,
                what="device link",
                device_id=self.device.id,
                on_failure=self._open_failed,
            )
            reason = "closed"
            try:
                await self._session_on(link)
            except UnexpectedDeviceError as exc:
                reason = "refused"
                self._refused(exc)
            except TransportError as exc:
                reason = str(exc)
                self.health.last_error = str(exc)
                self._repeats.log(
                    logging.WARNING,
                    "device link lost: %s",
                    exc,
                    extra={"device_id": self.device.id},
                )
            except Exception:
                # Anything else (a bug) is the supervisor's: logged once, this runner restarted
                # with backoff, no other device affected (devicegw/runtime/supervise.py).
                reason = "internal error"
                raise
            finally:
                await self._on_link_closed(link, reason)
            await self._clock.sleep(self._backoff.next_delay())

    def crashed(self, error: str) -> None:
        """The supervisor restarts this runner after an unexpected failure; status says why."""
        self.health.last_error = f"internal error: {error}"

    def _refused(self, exc: UnexpectedDeviceError) -> None:
        """ERROR the first time (and when the answer changes), DEBUG while it repeats."""
        h = self.health
        repeated = h.refused == str(exc)
        h.refused = str(exc)
        h.refusals += 1
        extra = {"device_id": self.device.id, "refusals": h.refusals}
        if not repeated:
            # A refusal, not a crash: no traceback wanted.
            log.error("device refused: %s", exc, extra=extra)
        elif h.refusals % 1000 == 0:
            log.warning("device still refused (%d times): %s", h.refusals, exc, extra=extra)
        else:
            log.debug("device refused again: %s", exc, extra=extra)
        self.pipeline.publish_status(error=str(exc))

    def _open_failed(self, exc: TransportError, first: bool) -> None:
        self.health.open_failures += 1
        self.health.last_error = str(exc)
        if first:
            self.pipeline.publish_status(error=str(exc))

    async def _session_on(self, link: Link) -> None:
        self._link = link
        self._identified.clear()
        utc, mono = self._clock.now(), self._clock.monotonic()
        self.pipeline.link_up(utc, link.unit)
        for obs in self.observers:
            obs.link_opened(self.device.id, link.description, utc, mono)
        self._repeats.log(
            logging.INFO,
            "device link open",
            extra={"device_id": self.device.id, "link": link.description},
        )
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._read_loop(link, tg), name=f"{self.device.id}-read")
                tg.create_task(self._handshake(), name=f"{self.device.id}-handshake")
        except ExceptionGroup as group:
            # A broken link surfaces as a TransportError from whichever task saw it first.
            link_errors, others = group.split(TransportError)
            if others is not None or link_errors is None:
                raise
            raise link_errors.exceptions[0] from None

    async def _on_link_closed(self, link: Link, reason: str) -> None:
        self._link = None
        for fut in self._pending_acks.values():
            if not fut.done():
                fut.cancel()
        self._pending_acks.clear()
        with contextlib.suppress(TransportError):
            await link.close()
        utc, mono = self._clock.now(), self._clock.monotonic()
        if self.health.connected:
            for obs in self.observers:
                obs.link_closed(self.device.id, reason, utc, mono)
        self.pipeline.link_down(utc, error=self.health.refused if reason == "refused" else None)

    async def _handshake(self) -> None:
        """On every (re)connect: identify the device and set its clock (ICD section 2)."""
        await self._until_identified()
        try:
            await self.command(SetClock(unix_s=int(self._clock.now().timestamp())))
            if self.device.output_rate_hz is not None:
                await self.command(SetRate(hz=self.device.output_rate_hz))
        except DeviceTimeoutError as exc:
            # The device is identified and its data used; its clock stays as it was.
            log.warning("device handshake: %s", exc, extra={"device_id": self.device.id})
            return
        self._backoff.reset()
        self._repeats.flush()  # the link works: the next failure is logged in full

    async def _until_identified(self) -> None:
        """GET_INFO, and again until an IDENT has arrived (the port-open one counts)."""
        retry = Backoff(1.0, 30.0)
        said = False
        first = True  # GET_INFO at least once per connection, as always (ICD section 2)
        while first or not self.pipeline.identified:
            first = False
            try:
                await self.command(GetInfo())
            except DeviceTimeoutError as exc:
                problem = f"no answer to GET_INFO: {exc}"
            else:
                problem = NOT_IDENTIFIED
            if await self._wait_identified():
                break
            if not said:
                said = True
                log.warning(
                    "device not identified: %s", problem, extra={"device_id": self.device.id}
                )
                self.health.identity_note = problem
                self.pipeline.publish_status(error=problem)
            else:
                log.debug("device still not identified", extra={"device_id": self.device.id})
            await self._clock.sleep(retry.next_delay())
        if said:
            log.info("device identified after all", extra={"device_id": self.device.id})
            self.pipeline.publish_status()

    async def _wait_identified(self) -> bool:
        timeout = max(IDENT_TIMEOUT_DEVICE_S / self._clock.scale, ACK_TIMEOUT_MIN_REAL_S)
        if self.pipeline.identified:
            return True
        try:
            async with asyncio.timeout(timeout):
                await self._identified.wait()
        except TimeoutError:
            return self.pipeline.identified
        return True

    async def _read_loop(self, link: Link, tg: asyncio.TaskGroup) -> None:
        noise = 0  # stream bytes since the last valid frame
        while True:
            data = await link.read()
            utc, mono = self._clock.now(), self._clock.monotonic()
            for obs in self.observers:
                obs.bytes_received(self.device.id, data, utc, mono)
            frames_before = self.health.frames_ok
            result = self.pipeline.feed(data, utc, mono)
            if link.unit == "stream":
                noise = noise + len(data) if self.health.frames_ok == frames_before else 0
                if noise > NOISE_LIMIT_BYTES:
                    raise TransportError(
                        f"no valid frame in the last {NOISE_LIMIT_BYTES} bytes "
                        "(line noise or not a VM-1): reopening the link later",
                        device_id=self.device.id,
                    )
            if result.identified:
                self._identified.set()
            for ack in result.acks:
                fut = self._pending_acks.get((ack.acked_seq, ack.cmd))
                if fut is not None and not fut.done():
                    fut.set_result(ack)
            for session_no in result.fetch:
                tg.create_task(self._fetch_record(session_no), name=f"{self.device.id}-fetch")

    async def _fetch_record(self, session_no: int) -> None:
        try:
            ack = await self.command(GetSession(session_no=session_no))
        except (DeviceTimeoutError, TransportError) as exc:
            log.warning(
                "GET_SESSION %d failed: %s", session_no, exc, extra={"device_id": self.device.id}
            )
            return
        if ack.result != AckResult.OK:
            log.warning(
                "device has no record of session %d (%s): still running, or older than its log",
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
        chunk = encode_for_link(dataclasses.replace(cmd, seq=seq), link.unit)
        key = (seq, int(MESSAGE_TYPES[type(cmd)]))
        fut: asyncio.Future[Ack] = asyncio.get_running_loop().create_future()
        self._pending_acks[key] = fut
        timeout = max(ACK_TIMEOUT_DEVICE_S / self._clock.scale, ACK_TIMEOUT_MIN_REAL_S)
        try:
            for _ in range(COMMAND_ATTEMPTS):
                utc, mono = self._clock.now(), self._clock.monotonic()
                for obs in self.observers:
                    obs.bytes_sent(self.device.id, chunk, utc, mono)
                self.pipeline.sent(chunk)
                await link.write(chunk)
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
