"""Builds a device's byte link from its configuration (the one place transports are chosen)."""

from __future__ import annotations

from collections.abc import Callable

from devicegw.config import DeviceSettings, OximeterSettings
from drivers.transport.base import ByteLink
from drivers.transport.serial_link import SerialLink


def link_factory(device: DeviceSettings) -> Callable[[], ByteLink]:
    def make() -> ByteLink:
        return SerialLink(device.link.port, baudrate=device.link.baudrate, device_id=device.id)

    return make


def oximeter_link_factory(oximeter: OximeterSettings) -> Callable[[], ByteLink]:
    def make() -> ByteLink:
        return SerialLink(
            oximeter.link.port, baudrate=oximeter.link.baudrate, device_id=oximeter.id
        )

    return make
