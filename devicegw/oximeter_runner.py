"""One serial pulse oximeter (Nonin OEM III, data format #2), live, feeding its bed's monitor.

The link is reopened by itself with capped, jittered backoff; every decoded
packet becomes one :class:`OximeterSample` stamped with the gateway's clock.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

from devicegw.backoff import Backoff
from devicegw.bed_monitor import BedMonitor
from devicegw.clock import Clock
from devicegw.config import OximeterSettings
from devicegw.errors import TransportError
from drivers.oximeter.nonin import NoninDecoder, to_sample
from drivers.transport.base import ByteLink

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
        link_factory: Callable[[], ByteLink],
        clock: Clock,
        bed: BedMonitor | None,
        backoff: Backoff | None = None,
    ) -> None:
        self.oximeter = oximeter
        self.bed = bed
        self.health = OximeterHealth()
        self._link_factory = link_factory
        self._clock = clock
        self._backoff = backoff or Backoff(0.5, 30.0)

    async def run(self) -> None:
        first_failure = True
        while True:
            link = self._link_factory()
            try:
                await link.open()
            except TransportError as exc:
                self.health.last_error = str(exc)
                level = logging.WARNING if first_failure else logging.DEBUG
                log.log(
                    level,
                    "cannot open oximeter link: %s",
                    exc,
                    extra={"device_id": self.oximeter.id},
                )
                first_failure = False
                await self._clock.sleep(self._backoff.next_delay())
                continue
            first_failure = True
            self.health.connected = True
            self.health.connects += 1
            if self.bed is not None:
                self.bed.oximeter_up(self._clock.monotonic())
            try:
                await self._read(link)
            except TransportError as exc:
                self.health.last_error = str(exc)
                log.warning("oximeter link lost: %s", exc, extra={"device_id": self.oximeter.id})
            finally:
                self.health.connected = False
                if self.bed is not None:
                    self.bed.oximeter_down(self._clock.monotonic())
                with contextlib.suppress(TransportError):
                    await link.close()
            await self._clock.sleep(self._backoff.next_delay())

    async def _read(self, link: ByteLink) -> None:
        decoder = NoninDecoder()
        while True:
            data = await link.read()
            packets = decoder.feed(data)
            self.health.checksum_errors = decoder.stats.checksum_errors
            if packets:
                self._backoff.reset()
            for packet in packets:
                sample = to_sample(packet, source=self.oximeter.id)
                mono = self._clock.monotonic()
                self.health.samples += 1
                self.health.last_sample_mono = mono
                if not sample.valid:
                    self.health.samples_gated += 1
                if self.bed is not None:
                    self.bed.feed(mono, sample)
