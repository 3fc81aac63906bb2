"""Builds a device's byte link from its configuration (the one place transports are chosen)."""

from __future__ import annotations

from collections.abc import Callable

from devicegw.config import BleLinkSettings, DeviceSettings, OximeterSettings
from drivers.transport.base import ByteLink
from drivers.transport.ble_link import FramedPayloadLink, Vm1BleLink
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


def oximeter_link_factory(oximeter: OximeterSettings) -> Callable[[], ByteLink]:
    def make() -> ByteLink:
        return SerialLink(
            oximeter.link.port, baudrate=oximeter.link.baudrate, device_id=oximeter.id
        )

    return make
