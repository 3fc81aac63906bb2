"""Builds a device's byte link from its configuration (the one place transports are chosen)."""

from __future__ import annotations

from collections.abc import Callable

from devicegw.config import BleLinkSettings, DeviceSettings, OximeterSettings
from devicegw.runtime.oximeter_runner import NoninSerialSource, SampleSource
from drivers.clock import Clock
from drivers.oximeter.sample import OximeterSample
from drivers.transport.base import ByteLink
from drivers.transport.ble_link import FramedPayloadLink, Vm1BleLink
from drivers.transport.ble_oximeter_link import BerryMedBleLink, OximeterBleLink, PlxBleLink
from drivers.transport.serial_link import SerialLink


def link_factory(device: DeviceSettings) -> Callable[[], ByteLink]:
    link = device.link
    if isinstance(link, BleLinkSettings):
        allow = [x for x in (link.address, link.name) if x is not None]

        def make_ble() -> ByteLink:
            return FramedPayloadLink(
                Vm1BleLink(
                    allow=allow,
                    address=link.address,
                    name=link.name,
                    adapter=link.adapter,
                    device_id=device.id,
                    scan_timeout_s=link.scan_timeout_s,
                )
            )

        return make_ble

    def make() -> ByteLink:
        return SerialLink(link.port, baudrate=link.baudrate, device_id=device.id)

    return make


def oximeter_source_factory(oximeter: OximeterSettings, clock: Clock) -> Callable[[], SampleSource]:
    """Serial Nonin or BLE PLX / BerryMed, all as a source of timestamped samples."""
    link = oximeter.link
    if isinstance(link, BleLinkSettings):
        allow = [x for x in (link.address, link.name) if x is not None]
        cls = PlxBleLink if oximeter.type == "plx" else BerryMedBleLink

        def make_ble() -> SampleSource:
            return BleSampleSource(
                cls(
                    allow=allow,
                    address=link.address,
                    name=link.name,
                    adapter=link.adapter,
                    device_id=oximeter.id,
                    clock=clock,
                    scan_timeout_s=link.scan_timeout_s,
                )
            )

        return make_ble
    port, baudrate = link.port, link.baudrate

    def make_serial() -> SampleSource:
        return NoninSerialSource(
            SerialLink(port, baudrate=baudrate, device_id=oximeter.id), clock, oximeter.id
        )

    return make_serial


class BleSampleSource:
    """A BLE oximeter link as a :class:`SampleSource`."""

    def __init__(self, link: OximeterBleLink) -> None:
        self._link = link

    @property
    def description(self) -> str:
        return self._link.description

    async def open(self) -> None:
        await self._link.open()

    async def read_samples(self) -> list[tuple[float, OximeterSample]]:
        received = await self._link.read_sample()
        return [(received.t_s, received.sample)]

    async def close(self) -> None:
        await self._link.close()
