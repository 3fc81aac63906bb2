"""One pulse oximeter, live, feeding its bed's SpO2 monitor.

Serial (Nonin OEM III, data format #2) and BLE (PLX, BerryMed) oximeters are
all a :class:`~drivers.transport.base.SampleSource` (built by
:mod:`devicegw.runtime.link_factory`): open it, read timestamped samples,
close it. The link is reopened by itself with capped, jittered backoff.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

from devicegw.config import OximeterSettings
from devicegw.core.bed_monitor import BedMonitor
from devicegw.errors import TransportError
from devicegw.runtime.log_summary import RepeatedLog
from devicegw.runtime.reconnect import open_until_up
from drivers.backoff import Backoff
from drivers.clock import Clock
from drivers.transport.adapters import NoninSerialSource
from drivers.transport.base import SampleSource

log = logging.getLogger(__name__)


@dataclass(slots=True)
class OximeterHealth:
    connected: bool = False
    connects: int = 0
    last_sample_mono: float | None = None
    samples: int = 0
    samples_gated: int = 0
    checksum_errors: int = 0
    last_error: str | None = None


class OximeterRunner:
    def __init__(
        self,
        oximeter: OximeterSettings,
        *,
        source_factory: Callable[[], SampleSource],
        clock: Clock,
        bed: BedMonitor | None,
        backoff: Backoff | None = None,
    ) -> None:
        self.oximeter = oximeter
        self.bed = bed
        self.health = OximeterHealth()
        self._source_factory = source_factory
        self._clock = clock
        self._backoff = backoff or Backoff(0.5, 30.0)
        self._repeats = RepeatedLog(log, clock.monotonic)

    @property
    def task_name(self) -> str:
        return f"oximeter-{self.oximeter.id}"

    def crashed(self, error: str) -> None:
        """The supervisor restarts this runner after an unexpected failure; status says why."""
        self.health.last_error = f"internal error: {error}"

    async def run(self) -> None:
        """Keep the oximeter connected until cancelled; a bug is the supervisor's (supervise.py)."""
        while True:
            source = await open_until_up(
                self._source_factory,
                clock=self._clock,
                backoff=self._backoff,
                log=log,
                what="oximeter link",
                device_id=self.oximeter.id,
                on_failure=self._open_failed,
            )
            self.health.connected = True
            self.health.connects += 1
            if self.bed is not None:
                self.bed.oximeter_up(self._clock.monotonic())
            try:
                await self._read(source)
            except TransportError as exc:
                self.health.last_error = str(exc)
                self._repeats.log(
                    logging.WARNING,
                    "oximeter link lost: %s",
                    exc,
                    extra={"device_id": self.oximeter.id},
                )
            finally:
                self.health.connected = False
                if self.bed is not None:
                    self.bed.oximeter_down(self._clock.monotonic())
                with contextlib.suppress(TransportError):
                    await source.close()
            await self._clock.sleep(self._backoff.next_delay())

    def _open_failed(self, exc: TransportError, first: bool) -> None:
        self.health.last_error = str(exc)

    async def _read(self, source: SampleSource) -> None:
        while True:
            samples = await source.read_samples()
            if samples:
                # Only real samples count as a working link: a port that opens and then
                # fails (or brings only bad frames) keeps backing off.
                self._backoff.reset()
                self._repeats.flush()
            if isinstance(source, NoninSerialSource):
                self.health.checksum_errors = source.checksum_errors
            for received in samples:
                mono, sample = received.t_s, received.sample
                self.health.samples += 1
                self.health.last_sample_mono = mono
                if not sample.valid:
                    self.health.samples_gated += 1
                if self.bed is not None:
                    self.bed.feed(mono, sample)
