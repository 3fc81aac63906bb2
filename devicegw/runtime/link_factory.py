"""Builds a device's link from its configuration (the one place transports are chosen).

A VM-1 gets a :class:`~drivers.transport.base.Link` (serial: a byte stream;
BLE: one payload per value, ICD section 4); an oximeter gets a
:class:`~drivers.transport.base.SampleSource` (serial Nonin through its
adapter, BLE PLX / BerryMed links directly).
"""

from __future__ import annotations

from collections.abc import Callable

from devicegw.config import BleLinkSettings, DeviceSettings, OximeterSettings
from drivers.clock import Clock
from drivers.transport.adapters import NoninSerialSource
from drivers.transport.base import Link, SampleSource
from drivers.transport.ble_link import Vm1BleLink
from drivers.transport.ble_oximeter_link import BerryMedBleLink, PlxBleLink
from drivers.transport.serial_link import SerialLink


def link_factory(device: DeviceSettings) -> Callable[[], Link]:
    link = device.link
    if isinstance(link, BleLinkSettings):
        allow = [x for x in (link.address, link.name) if x is not None]

        def make_ble() -> Link:
            return Vm1BleLink(
                allow=allow,
                address=link.address,
                name=link.name,
                adapter=link.adapter,
                device_id=device.id,
                scan_timeout_s=link.scan_timeout_s,
            )

        return make_ble

    def make() -> Link:
        return SerialLink(link.port, baudrate=link.baudrate, device_id=device.id)

    return make


def oximeter_source_factory(oximeter: OximeterSettings, clock: Clock) -> Callable[[], SampleSource]:
    """Serial Nonin or BLE PLX / BerryMed, all as a source of timestamped samples."""
    link = oximeter.link
    if isinstance(link, BleLinkSettings):
        allow = [x for x in (link.address, link.name) if x is not None]
        cls = PlxBleLink if oximeter.type == "plx" else BerryMedBleLink

        def make_ble() -> SampleSource:
            return cls(
                allow=allow,
                address=link.address,
                name=link.name,
                adapter=link.adapter,
                device_id=oximeter.id,
                clock=clock,
                scan_timeout_s=link.scan_timeout_s,
            )

        return make_ble
    port, baudrate = link.port, link.baudrate

    def make_serial() -> SampleSource:
        return NoninSerialSource(
            SerialLink(port, baudrate=baudrate, device_id=oximeter.id), clock, oximeter.id
        )

    return make_serial
