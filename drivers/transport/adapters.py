"""Adapters between the link contract and what the gateway reads (the one place for them).

:class:`NoninSerialSource`: a Nonin OEM III on a stream
:class:`~drivers.transport.base.Link` (serial) as a
:class:`~drivers.transport.base.SampleSource`: bytes -> one sample per
packet (3 per second), stamped with the injected clock on arrival.

A VM-1 needs no adapter: its :class:`~devicegw.core.vm1_pipeline.Vm1Pipeline`
takes the link's chunks and decodes them by the link's unit; the BLE oximeter
links are sample sources themselves (:mod:`drivers.transport.ble_oximeter_link`).
"""

from __future__ import annotations

from drivers.clock import Clock
from drivers.errors import TransportError
from drivers.oximeter.downsample import ReceivedSample
from drivers.oximeter.nonin import NoninDecoder, to_sample
from drivers.transport.base import BatchingLink, Link

__all__ = ["NOISE_LIMIT_BYTES", "NoninSerialSource"]

#: This many bytes without one complete packet is line noise, or not a Nonin (which sends
#: a packet every 1/3 s, with or without a finger): the link is given up, and the runner
#: reopens it with backoff, as the VM-1's runner does after 64 KiB (issue 13). 16 KiB is
#: ~17 s of a 9600-baud line, about 130 packets' worth.
NOISE_LIMIT_BYTES = 16 * 1024


class NoninSerialSource:
    """Nonin OEM III bytes -> one sample per packet (3 per second)."""

    def __init__(self, link: Link, clock: Clock, source: str) -> None:
        self._link = link
        self._clock = clock
        self._source = source
        self._decoder = NoninDecoder()
        self.checksum_errors = 0
        # Checked once: a runtime Protocol check per read was 1.5 % of the CPU at 500 beds.
        self._read_at_least = link.read_at_least if isinstance(link, BatchingLink) else None

    @property
    def description(self) -> str:
        return self._link.description

    async def open(self) -> None:
        self._decoder = NoninDecoder()
        await self._link.open()

    async def read_samples(self) -> list[ReceivedSample]:
        noise = 0
        read_at_least = self._read_at_least
        while True:
            if read_at_least is not None:
                # Woken when the packet in progress can be complete, not for every frame.
                data = await read_at_least(self._decoder.bytes_to_packet_end())
            else:
                data = await self._link.read()
            packets = self._decoder.feed(data)
            self.checksum_errors = self._decoder.stats.checksum_errors
            if not packets:
                noise += len(data)
                if noise > NOISE_LIMIT_BYTES:
                    raise TransportError(
                        f"no valid Nonin packet in the last {NOISE_LIMIT_BYTES} bytes "
                        "(line noise or not a Nonin OEM III): reopening the link later"
                    )
            if packets:
                t_s, utc = self._clock.monotonic(), self._clock.now()
                return [
                    ReceivedSample(to_sample(p, source=self._source), t_s, utc) for p in packets
                ]

    async def close(self) -> None:
        await self._link.close()
