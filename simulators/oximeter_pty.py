"""A simulated Nonin OEM III oximeter behind a real pseudo-terminal (STYLE item 4).

The gateway opens :attr:`NoninPtySimulator.path` with pyserial (9600 8N1) as
it opens ``/dev/serial/by-id/...`` on a ward: the path is a symlink to the
``/dev/pts/N`` slave. Byte path: :class:`~simulators.physiology.PhysioModel`
-> :class:`~simulators.oximeter_sim.NoninSim` (the codec's
:func:`~drivers.oximeter.nonin.encode_packet`) -> pty master.

The pty handling is :mod:`simulators.vm1_pty`'s (its ``_Pty`` is reused): the
slave is raw and kept open by the simulator, so nothing hangs up while no
gateway is connected; bytes written meanwhile fill the pty buffer and, once
it is full, are dropped and counted (a UART sends into the void), and
pyserial's ``open()`` flushes that backlog. Format #2 is output only: the
device never reads, so host bytes are ignored.

Time comes only from the injected :class:`~devicegw.clock.Clock`: scenario
time is ``clock.monotonic()`` minus its value at :meth:`start`. Packets are
written when due (every 1/3 s of clock time); at high clock scales they go out
in batches of at least :data:`MIN_REAL_SLEEP_S` real seconds, each packet
still carrying the values of its own time.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from devicegw.clock import Clock
from devicegw.errors import ScenarioError, TransportError
from drivers.oximeter.nonin import PACKET_LEN
from simulators.oximeter_scenario import OximeterScenario
from simulators.oximeter_sim import NoninSim
from simulators.physiology import PhysioModel
from simulators.vm1_pty import _Pty

__all__ = ["NoninPtySimulator", "OximeterSimCounters", "default_link_name"]

log = logging.getLogger(__name__)

MIN_REAL_SLEEP_S = 0.002


def default_link_name(scenario: OximeterScenario) -> str:
    """The by-id name of the oximeter's USB-serial adapter: ``usb-Nonin_<model>_<serial>-if00``."""
    model = scenario.oximeter.model.replace(" ", "_")
    return f"usb-Nonin_{model}_{scenario.oximeter.serial_no}-if00"


@dataclass(slots=True)
class OximeterSimCounters:
    packets_sent: int = 0  # written to the pty completely
    bytes_sent: int = 0
    packets_dropped: int = 0  # cut or lost because the pty buffer was full
    bytes_dropped: int = 0


class NoninPtySimulator:
    """A Nonin OEM III streaming format #2 packets for an :class:`OximeterScenario`.

    Use as ``async with NoninPtySimulator(scenario, clock=clock, link_dir=d) as sim:``.
    """

    def __init__(
        self,
        scenario: OximeterScenario,
        *,
        clock: Clock,
        link_dir: str | Path,
        name: str | None = None,
        model: PhysioModel | None = None,
    ) -> None:
        if scenario.oximeter.protocol != "nonin":
            raise ScenarioError(
                f"{scenario.name}: oximeter.protocol is {scenario.oximeter.protocol!r}; "
                "only a Nonin (serial) oximeter can be simulated on a pty"
            )
        self.scenario = scenario
        self.model = model if model is not None else PhysioModel(scenario)
        self.sim = NoninSim(self.model, firmware_revision=scenario.oximeter.firmware_revision)
        self.counters = OximeterSimCounters()
        self._clock = clock
        self._link_dir = Path(link_dir)
        self._name = name or default_link_name(scenario)
        self._pty: _Pty | None = None
        self._t0 = 0.0
        self._sent_until = 0.0
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    # ------------------------------------------------------------------ public API

    @property
    def path(self) -> Path:
        """The stable port path (a symlink to the pty slave)."""
        return self._link_dir / self._name

    @property
    def pts_path(self) -> str | None:
        return None if self._pty is None else self._pty.name

    @property
    def sent_until(self) -> float:
        """Scenario time up to which every due packet has been written (or dropped)."""
        return self._sent_until

    def device_time(self) -> float:
        return self._clock.monotonic() - self._t0

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("simulator already started")
        self._link_dir.mkdir(parents=True, exist_ok=True)
        self._t0 = self._clock.monotonic()
        pty = _Pty()
        self._pty = pty
        try:
            _point_symlink(self.path, pty.name)
        except BaseException:
            self._close_pty()
            raise
        self._task = asyncio.create_task(self._run(), name=f"nonin-sim {self._name}")

    async def close(self) -> None:
        """Stop streaming, close the pty and remove the symlink; re-raises a crash of the loop."""
        if self._closed:
            return
        self._closed = True
        task, self._task = self._task, None
        try:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        finally:
            self._close_pty()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # ------------------------------------------------------------------ run loop

    async def _run(self) -> None:
        clock = self._clock
        period = 1.0 / self.sim.rate_hz
        min_sleep = MIN_REAL_SLEEP_S * clock.scale if math.isfinite(clock.scale) else 0.0
        while True:
            now = self.device_time()
            self._send_until(now)
            next_due = math.floor(now * self.sim.rate_hz + 1e-9) * period + period
            await clock.sleep(max(next_due - now, min_sleep))

    def _send_until(self, now: float) -> None:
        if now <= self._sent_until:
            return
        packets = self.sim.timed_frames_between(self._sent_until, now)
        self._sent_until = now
        if packets:
            self._write([data for _, data in packets])

    def _write(self, packets: list[bytes]) -> None:
        assert self._pty is not None
        data = b"".join(packets)
        try:
            written = os.write(self._pty.master, data)
        except BlockingIOError:
            written = 0
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
            written = 0
        c = self.counters
        c.bytes_sent += written
        c.bytes_dropped += len(data) - written
        complete = written // PACKET_LEN
        c.packets_sent += complete
        c.packets_dropped += len(packets) - complete

    def _close_pty(self) -> None:
        pty, self._pty = self._pty, None
        if pty is None:
            return
        with contextlib.suppress(OSError):
            if os.readlink(self.path) == pty.name:
                self.path.unlink()
        pty.close()


def _point_symlink(link: Path, target: str) -> None:
    """Point ``link`` at ``target`` atomically (as udev maintains /dev/serial/by-id)."""
    if os.path.lexists(link) and not link.is_symlink():
        raise TransportError(f"{link} exists and is not a symlink; refusing to replace it")
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)
