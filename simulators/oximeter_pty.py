"""A simulated Nonin OEM III oximeter behind a real pseudo-terminal (STYLE item 4).

The gateway opens :attr:`NoninPtySimulator.path` with pyserial (9600 8N1) as
it opens ``/dev/serial/by-id/...`` on a ward: the path is a symlink to the
``/dev/pts/N`` slave. Byte path: :class:`~simulators.physiology.PhysioModel`
-> :class:`~simulators.oximeter_sim.NoninSim` (the codec's
:func:`~drivers.oximeter.nonin.encode_packet`) -> pty master.

The pty handling is :mod:`simulators.vm1_pty`'s (:mod:`simulators.pty_link`): the
slave is raw and kept open by the simulator, so nothing hangs up while no
gateway is connected; bytes written meanwhile fill the pty buffer and, once
it is full, are dropped and counted (a UART sends into the void), and
pyserial's ``open()`` flushes that backlog. Format #2 is output only: the
device never reads, so host bytes are ignored.

Time comes only from the injected :class:`~drivers.clock.Clock`: scenario
time is ``clock.monotonic()`` minus its value at :meth:`start`. Packets are
written when due (every 1/3 s of clock time); at high clock scales they go out
in batches of at least :data:`MIN_REAL_SLEEP_S` real seconds, each packet
still carrying the values of its own time.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

from drivers.clock import Clock
from drivers.oximeter.nonin import PACKET_LEN
from simulators.errors import ScenarioError
from simulators.lifecycle import MIN_REAL_SLEEP_S
from simulators.oximeter_scenario import OximeterScenario
from simulators.oximeter_sim import NoninSim
from simulators.physiology import PhysioModel
from simulators.pty_link import Pty, PtySimulator, point_symlink, remove_symlink, write_master

__all__ = ["MIN_REAL_SLEEP_S", "NoninPtySimulator", "OximeterSimCounters", "default_link_name"]

log = logging.getLogger(__name__)


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


class NoninPtySimulator(PtySimulator):
    """A Nonin OEM III streaming format #2 packets for an :class:`OximeterScenario`.

    Use as ``async with NoninPtySimulator(scenario, clock=clock, link_dir=d) as sim:``.
    """

    task_prefix = "nonin-sim"

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
        super().__init__(clock=clock, link_dir=link_dir, name=name or default_link_name(scenario))
        self.scenario = scenario
        self.model = model if model is not None else PhysioModel(scenario)
        self.sim = NoninSim(self.model, firmware_revision=scenario.oximeter.firmware_revision)
        self.counters = OximeterSimCounters()
        self._sent_until = 0.0

    # ------------------------------------------------------------------ public API

    @property
    def sent_until(self) -> float:
        """Scenario time up to which every due packet has been written (or dropped)."""
        return self._sent_until

    # ------------------------------------------------------------------ run loop

    def _power_on(self) -> None:
        pty = Pty()
        self._pty = pty
        try:
            point_symlink(self.path, pty.name, self)
        except BaseException:
            self._close_link(unlink=True)
            raise

    async def _run(self) -> None:
        clock = self._clock
        period = 1.0 / self.sim.rate_hz
        min_sleep = self._min_sleep()
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
        written = write_master(self._pty, data)
        c = self.counters
        c.bytes_sent += written
        c.bytes_dropped += len(data) - written
        complete = written // PACKET_LEN
        c.packets_sent += complete
        c.packets_dropped += len(packets) - complete

    def _close_link(self, *, unlink: bool) -> None:
        pty, self._pty = self._pty, None
        if pty is None:
            return
        if unlink:
            remove_symlink(self.path, pty.name)
        pty.close()
