"""Builds a device's byte link from its configuration (the one place transports are chosen)."""

from __future__ import annotations

from collections.abc import Callable

from devicegw.config import DeviceSettings
from drivers.transport.base import ByteLink
from drivers.transport.serial_link import SerialLink


def link_factory(device: DeviceSettings) -> Callable[[], ByteLink]:
    def make() -> ByteLink:
        return SerialLink(device.link.port, baudrate=device.link.baudrate, device_id=device.id)

    return make
