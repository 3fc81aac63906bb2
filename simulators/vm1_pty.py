"""A simulated VM-1 behind a real pseudo-terminal (STYLE item 4: simulators use the real byte path).

The gateway opens :attr:`Vm1PtySimulator.path` with pyserial exactly as it
opens ``/dev/serial/by-id/...`` on a ward: the path is a symlink to the
current ``/dev/pts/N``, re-pointed atomically whenever the pty is recreated
(after a link drop), and removed while the link is down (as udev removes the
by-id link when a USB device is unplugged).

Byte path: model message -> :func:`drivers.vm1.codec.encode_payload` ->
:func:`drivers.vm1.framing.encode_frame` -> pty master; and host bytes from
the master -> :class:`~drivers.vm1.framing.Deframer` ->
:func:`~drivers.vm1.codec.decode_payload` -> :meth:`Vm1Model.handle_command`.

Pty details that matter:

- The slave is put in raw mode right after ``openpty()``: with the default
  cooked mode its ECHO would send the simulator's own frames straight back to
  it (and mangle CR/LF bytes).
- The simulator keeps its own slave fd open, so the master never sees a
  hangup while no gateway is connected. Bytes written then pile up in the
  pty buffer until it is full; after that a write hits EAGAIN and the bytes
  are dropped and counted, as a real UART sends into the void. pyserial's
  ``open()`` flushes the input queue, so a gateway does not see that backlog.
- Port-open detection: the master runs in packet mode (``TIOCPKT``), so a
  ``tcflush(TCIFLUSH)`` on the slave (pyserial does one in ``open()`` and in
  ``reset_input_buffer()``) is reported to the simulator. It answers with an
  IDENT (ICD: "IDENT ... when the port opens") once the flushes have been
  quiet for 20 ms of real time, so a second flush right after open does not
  wipe it. This is best effort: a gateway should still send GET_INFO.
- A link drop closes master and slave: the gateway's next read fails (EIO),
  which is what an unplugged USB adapter looks like. The model keeps running
  and what it sends meanwhile is lost. When the link returns, a new pty is
  made, the symlink re-pointed and an IDENT sent.

Time comes only from the injected :class:`~drivers.clock.Clock`: device time
is ``clock.monotonic()`` minus its value at :meth:`Vm1PtySimulator.start`.
"""

from __future__ import annotations

import asyncio
import errno
import heapq
import logging
import math
import os
import random
import re
import termios
from dataclasses import dataclass
from pathlib import Path

from drivers.clock import Clock
from drivers.errors import ProtocolError
from drivers.vm1.codec import decode_payload, encode_payload
from drivers.vm1.framing import Deframer, DeframerStats, encode_frame
from drivers.vm1.messages import (
    AckResult,
    DeviceMessage,
    GetInfo,
    GetSession,
    HostCommand,
    Ident,
    MsgType,
    Ping,
    SetClock,
    SetRate,
    Start,
    Stop,
)
from simulators.lifecycle import MIN_REAL_SLEEP_S
from simulators.pty_link import Pty, PtySimulator, point_symlink, remove_symlink, write_master
from simulators.scenario import Scenario
from simulators.vm1_model import Vm1Model

__all__ = ["MIN_REAL_SLEEP_S", "SimCounters", "Vm1PtySimulator", "default_link_name"]

log = logging.getLogger(__name__)

#: Real seconds the simulator waits after the last input flush before its port-open IDENT.
PORT_OPEN_IDENT_DELAY_S = 0.02
_READ_CHUNK = 4096
_HOST_COMMANDS = (GetInfo, SetClock, Start, Stop, Ping, SetRate, GetSession)
_COMMAND_TYPE_BYTES = frozenset(
    int(t)
    for t in (
        MsgType.GET_INFO,
        MsgType.SET_CLOCK,
        MsgType.START,
        MsgType.STOP,
        MsgType.PING,
        MsgType.SET_RATE,
        MsgType.GET_SESSION,
    )
)


def default_link_name(scenario: Scenario) -> str:
    """The symlink name udev would give the device: ``usb-VM-1_<serial>-if00``.

    As udev does, every character outside ``0-9A-Za-z#+-.:=@_`` becomes ``_``, so a
    device's strings never make an odd path.
    """
    d = scenario.device
    return _UDEV_UNSAFE.sub("_", f"usb-{d.model}_{d.serial_no}-if00")


_UDEV_UNSAFE = re.compile(r"[^0-9A-Za-z#+\-.:=@_]")


@dataclass(slots=True)
class SimCounters:
    """What went over (or did not go over) the simulated wire."""

    frames_sent: int = 0  # frames written to the pty completely
    bytes_sent: int = 0
    frames_dropped: int = 0  # frames cut or lost because the pty buffer was full (EAGAIN)
    bytes_dropped: int = 0
    messages_lost_link_down: int = 0  # produced by the device while the link was down
    commands_received: int = 0  # decoded host commands handed to the model
    commands_rejected: int = 0  # CRC-good frames answered UNKNOWN_COMMAND/BAD_ARGUMENT
    unexpected_frames: int = 0  # CRC-good frames that are not host commands at all
    garbage_bytes_injected: int = 0
    frames_corrupted: int = 0  # frames sent with a flipped bit
    idents_sent: int = 0
    port_opens: int = 0  # port opens detected through TIOCPKT flush notifications
    link_drops: int = 0
    ptys_created: int = 0


class Vm1PtySimulator(PtySimulator):
    """A :class:`Vm1Model` running a :class:`Scenario`, reachable at :attr:`path`.

    Use as ``async with Vm1PtySimulator(scenario, clock=clock, link_dir=d) as sim:``.
    """

    task_prefix = "vm1-sim"

    def __init__(
        self,
        scenario: Scenario,
        *,
        clock: Clock,
        link_dir: str | Path,
        name: str | None = None,
        model: Vm1Model | None = None,
    ) -> None:
        super().__init__(clock=clock, link_dir=link_dir, name=name or default_link_name(scenario))
        self.scenario = scenario
        self.model = model if model is not None else Vm1Model.from_scenario(scenario)
        self.counters = SimCounters()
        #: Framing statistics of what the host sent us.
        self.rx_stats = DeframerStats()
        #: Set once every scripted session and link event has happened and the link is up.
        self.idle = asyncio.Event()
        self._rng = random.Random(f"vm1/{scenario.device.seed}/link")
        self._deframer = Deframer(self.rx_stats)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Future[None] | None = None
        self._ident_handle: asyncio.TimerHandle | None = None
        self._link_events: list[tuple[float, int, str, float]] = []
        self._link_counter = 0
        self._scripted_link_pending = 0
        self._drop_token = 0
        self._bitflips_pending = 0
        self._link_up_event = asyncio.Event()
        self._failure: BaseException | None = None
        for drop in scenario.link_drops:
            self._add_link_event(drop.at_s, "drop", drop.duration_s, scripted=True)
        for c in scenario.corruption:
            self._add_link_event(c.at_s, c.kind, float(c.count), scripted=True)

    # ------------------------------------------------------------------ public API

    @property
    def link_up(self) -> bool:
        return self._pty is not None

    async def wait_until_idle(self) -> None:
        """Wait until every scripted session ended and every link event happened.

        Raises whatever crashed the simulator's loop instead of waiting forever.
        """
        task = self._task
        if task is None:
            raise RuntimeError("simulator not started")
        idle = asyncio.ensure_future(self.idle.wait())
        try:
            await asyncio.wait({idle, task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            idle.cancel()
            await asyncio.wait({idle})
        if not self.idle.is_set():
            task.result()  # raises the loop's exception
            raise RuntimeError("simulator stopped before its scenario finished")

    async def wait_link_up(self) -> None:
        await self._link_up_event.wait()

    def drop_link(self, duration_s: float) -> None:
        """Unplug the link now for ``duration_s`` seconds of clock time (ignored while down)."""
        if duration_s <= 0 or not math.isfinite(duration_s):
            raise ValueError("duration_s must be a positive number of seconds")
        self._add_link_event(self.device_time(), "drop", duration_s, scripted=False)
        self._poke()

    # ------------------------------------------------------------------ run loop

    def _power_on(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._open_link()
        # Power-up IDENT (nobody may be listening yet; the pty buffers or drops it).
        self._send_ident(0.0)

    async def _run(self) -> None:
        clock = self._clock
        min_sleep = self._min_sleep()
        loop = asyncio.get_running_loop()
        while True:
            if self._failure is not None:
                raise self._failure
            now = self.device_time()
            self._catch_up(now)
            self._update_idle()
            wake_at = self.model.next_event_time()
            if self._link_events:
                wake_at = min(wake_at, self._link_events[0][0])
            delay = max(wake_at - now, min_sleep)
            self._wake = loop.create_future()
            sleeper = asyncio.ensure_future(clock.sleep(delay))
            try:
                await asyncio.wait({sleeper, self._wake}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                self._wake = None
                if not sleeper.done():
                    sleeper.cancel()
                    await asyncio.wait({sleeper})  # a cancel of this task still propagates

    def _poke(self) -> None:
        """Wake the run loop early: the schedule changed."""
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def _catch_up(self, now: float) -> None:
        """Send everything due up to ``now``, link events interleaved in time order."""
        while self._link_events and self._link_events[0][0] <= now:
            at, _, kind, arg = heapq.heappop(self._link_events)
            self._transmit(self.model.advance(at))
            self._link_event(at, kind, arg)
        self._transmit(self.model.advance(now))

    def _update_idle(self) -> None:
        if self.model.scripted_done and self._scripted_link_pending == 0 and self.link_up:
            self.idle.set()

    # ------------------------------------------------------------------ link events

    def _add_link_event(self, at: float, kind: str, arg: float, *, scripted: bool) -> None:
        self._link_counter += 1
        if scripted:
            kind = f"scripted-{kind}"
            self._scripted_link_pending += 1
        heapq.heappush(self._link_events, (at, self._link_counter, kind, arg))

    def _link_event(self, at: float, kind: str, arg: float) -> None:
        if kind.startswith("scripted-"):
            kind = kind.removeprefix("scripted-")
            self._scripted_link_pending -= 1
        if kind == "drop":
            if self._pty is None:
                log.info(
                    "%s: link drop at %.3f s ignored: the link is already down", self._name, at
                )
                return
            self._drop_token += 1
            self._scripted_link_pending += 1  # its restore, counted like a scripted event
            self._link_counter += 1
            heapq.heappush(
                self._link_events,
                (at + arg, self._link_counter, "restore", float(self._drop_token)),
            )
            self.counters.link_drops += 1
            log.info("%s: link dropped at %.3f s for %.1f s", self._name, at, arg)
            self._close_link(unlink=True)
        elif kind == "restore":
            self._scripted_link_pending -= 1
            if int(arg) != self._drop_token or self._pty is not None:
                return
            self._open_link()
            self._send_ident(at)
            log.info("%s: link back at %.3f s on %s", self._name, at, self.pts_path)
        elif kind == "garbage":
            self._inject_garbage(int(arg))
        elif kind == "bitflip":
            self._bitflips_pending += int(arg)

    def _open_link(self) -> None:
        pty = Pty()
        self._pty = pty
        self.counters.ptys_created += 1
        self._deframer.reset()
        try:
            point_symlink(self.path, pty.name, self)
            assert self._loop is not None
            self._loop.add_reader(pty.master, self._on_readable)
        except BaseException:
            self._close_link(unlink=False)
            raise
        self._link_up_event.set()

    def _close_link(self, *, unlink: bool) -> None:
        pty, self._pty = self._pty, None
        self._link_up_event.clear()
        if self._ident_handle is not None:
            self._ident_handle.cancel()
            self._ident_handle = None
        if pty is None:
            return
        if unlink:
            remove_symlink(self.path, pty.name)
        if self._loop is not None:
            self._loop.remove_reader(pty.master)
        pty.close()

    # ------------------------------------------------------------------ device -> host

    def _transmit(self, msgs: list[DeviceMessage]) -> None:
        if not msgs:
            return
        if self._pty is None:
            self.counters.messages_lost_link_down += len(msgs)
            return
        frames = []
        for msg in msgs:
            frame = encode_frame(encode_payload(msg))
            if self._bitflips_pending:
                self._bitflips_pending -= 1
                frame = self._flip_bit(frame)
            frames.append(frame)
        self.counters.idents_sent += sum(1 for m in msgs if isinstance(m, Ident))
        self._write(frames)

    def _write(self, frames: list[bytes]) -> None:
        assert self._pty is not None
        data = b"".join(frames)
        written = write_master(self._pty, data)
        c = self.counters
        c.bytes_sent += written
        c.bytes_dropped += len(data) - written
        if written == len(data):
            c.frames_sent += len(frames)
            return
        end = 0
        for frame in frames:
            end += len(frame)
            if end <= written:
                c.frames_sent += 1
            else:
                c.frames_dropped += 1

    def _flip_bit(self, frame: bytes) -> bytes:
        out = bytearray(frame)
        i = self._rng.randrange(1, len(out) - 1)  # keep the opening and closing flags
        out[i] ^= 1 << self._rng.randrange(8)
        self.counters.frames_corrupted += 1
        return bytes(out)

    def _inject_garbage(self, count: int) -> None:
        if self._pty is None:
            return
        for _ in range(100):
            junk = bytes(self._rng.getrandbits(8) for _ in range(count))
            # Line noise that happens to form a CRC-valid frame would be a new test, not noise.
            if not Deframer().feed(b"\x7e" + junk + b"\x7e"):
                break
        self.counters.garbage_bytes_injected += count
        self._write([junk])

    # ------------------------------------------------------------------ host -> device

    def _on_readable(self) -> None:
        try:
            self._read_host()
        except Exception as exc:  # a simulator bug: stop the run loop loudly
            log.exception("%s: simulator failed handling host bytes", self._name)
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        if self._failure is None:
            self._failure = exc
        if self._pty is not None and self._loop is not None:
            self._loop.remove_reader(self._pty.master)
        self._poke()

    def _read_host(self) -> None:
        pty = self._pty
        if pty is None:
            return
        try:
            data = os.read(pty.master, _READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if exc.errno == errno.EIO:
                return
            raise
        if not data:
            return
        if data[0] != 0:  # packet-mode status byte, no data
            if data[0] & termios.TIOCPKT_FLUSHREAD:
                self._port_flushed()
            return
        for payload in self._deframer.feed(data[1:]):
            self._on_payload(payload)
            if self._pty is not pty:
                return  # a link event during catch-up closed this pty

    def _on_payload(self, payload: bytes) -> None:
        now = self.device_time()
        self._catch_up(now)
        if self._pty is None:
            return
        try:
            msg = decode_payload(payload)
        except ProtocolError:
            kind = payload[0] if payload else 0
            seq = payload[1] if len(payload) > 1 else 0
            if kind in _COMMAND_TYPE_BYTES:
                result = AckResult.BAD_ARGUMENT
            elif kind & 0x80:
                result = AckResult.UNKNOWN_COMMAND
            else:
                self.counters.unexpected_frames += 1
                return
            self.counters.commands_rejected += 1
            self._transmit(self.model.reject_command(kind, seq, result, now))
            return
        if not isinstance(msg, _HOST_COMMANDS):
            self.counters.unexpected_frames += 1
            return
        command: HostCommand = msg
        self.counters.commands_received += 1
        self._transmit(self.model.handle_command(command, now))
        self._poke()

    def _port_flushed(self) -> None:
        assert self._loop is not None
        if self._ident_handle is not None:
            self._ident_handle.cancel()
        self._ident_handle = self._loop.call_later(PORT_OPEN_IDENT_DELAY_S, self._port_open_ident)

    def _port_open_ident(self) -> None:
        try:
            self._send_port_open_ident()
        except Exception as exc:
            log.exception("%s: simulator failed sending its port-open IDENT", self._name)
            self._fail(exc)

    def _send_port_open_ident(self) -> None:
        self._ident_handle = None
        if self._pty is None:
            return
        now = self.device_time()
        self._catch_up(now)
        if self._pty is None:
            return
        self.counters.port_opens += 1
        self._send_ident(now)

    def repeat_ident(self, count: int) -> None:
        """A faulty device that floods its IDENT: ``count`` IDENTs at once, on top of what it
        sends anyway (a full pty drops and counts them, as a UART sends into the void)."""
        if self._pty is not None:
            now = self.device_time()
            self._transmit([self.model.ident_message(now)] * count)

    def _send_ident(self, t: float) -> None:
        """An unsolicited IDENT (power-up, port open), unless the device is one that never does."""
        if self.scenario.device.sends_ident:
            self._transmit([self.model.ident_message(t)])
