"""Builds a device's link from its configuration (the one place transports are chosen).

A VM-1 gets a :class:`~drivers.transport.base.Link` (serial: a byte stream;
BLE: one payload per value, ICD section 4); an oximeter gets a
:class:`~drivers.transport.base.SampleSource` (serial Nonin through its
adapter, BLE PLX / BerryMed links directly).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence

from devicegw.config import BleLinkSettings, DeviceSettings, OximeterSettings
from devicegw.errors import TransportError
from drivers.clock import Clock
from drivers.transport.adapters import NoninSerialSource
from drivers.transport.base import Link, SampleSource
from drivers.transport.ble_link import Vm1BleLink
from drivers.transport.ble_oximeter_link import BerryMedBleLink, PlxBleLink
from drivers.transport.serial_link import SerialLink


class SharedPortError(TransportError):
    """Two configured ports are one device (e.g. its by-id link and its /dev/ttyUSBn)."""


def _device_number(path: str) -> int | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_rdev or None  # 0: not a device file (a plain file in a test): no identity


#: How long another entry's device number is trusted. Every port opening compares itself
#: with every other serial entry: without this, 1,000 ports opening at start made a
#: million stat() calls (issue 13).
_OTHERS_TTL_S = 1.0
_others_seen: dict[str, tuple[float, int | None]] = {}


def _other_device_number(path: str) -> int | None:
    now = time.monotonic()
    seen = _others_seen.get(path)
    if seen is not None and now - seen[0] < _OTHERS_TTL_S:
        return seen[1]
    number = _device_number(path)
    _others_seen[path] = (now, number)
    return number


class GuardedSerialLink(SerialLink):
    """A serial port that refuses to open while another configured port names the same
    device: two ports opened for one device would split its bytes between two beds, and
    which one got a session would be a race. Both entries are refused, each saying which
    other entry it collides with, until the configuration names the device once; the
    other beds are not affected (issue 13)."""

    def __init__(
        self,
        path: str,
        *,
        baudrate: int,
        device_id: str,
        others: Sequence[tuple[str, str]],
    ) -> None:
        super().__init__(path, baudrate=baudrate, device_id=device_id)
        self._others = others  # (device id, port path) of every other serial entry

    async def open(self) -> None:
        mine = _device_number(self.path)
        if mine is not None:
            for other_id, other_path in self._others:
                if _other_device_number(other_path) == mine:
                    raise SharedPortError(
                        f"port {self.path} is the same device as port {other_path} "
                        f"(configured for {other_id}); neither is opened until the "
                        "configuration names the device once",
                        device_id=self.device_id,
                    )
        await super().open()


def serial_ports(devices: Sequence[DeviceSettings | OximeterSettings]) -> list[tuple[str, str]]:
    """(id, port path) of every serially linked entry."""
    return [(d.id, d.link.port) for d in devices if not isinstance(d.link, BleLinkSettings)]


def link_factory(
    device: DeviceSettings, serial_entries: Sequence[tuple[str, str]] = ()
) -> Callable[[], Link]:
    """``serial_entries``: (id, port) of the configuration's serial links, so that a second
    name for this device's port is refused (:class:`GuardedSerialLink`)."""
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

    others = [(i, p) for i, p in serial_entries if i != device.id]

    def make() -> Link:
        return GuardedSerialLink(
            link.port, baudrate=link.baudrate, device_id=device.id, others=others
        )

    return make


def oximeter_source_factory(
    oximeter: OximeterSettings, clock: Clock, serial_entries: Sequence[tuple[str, str]] = ()
) -> Callable[[], SampleSource]:
    """Serial Nonin or BLE PLX / BerryMed, all as a source of timestamped samples;
    ``serial_entries`` as for :func:`link_factory`."""
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
    others = [(i, p) for i, p in serial_entries if i != oximeter.id]

    def make_serial() -> SampleSource:
        serial = GuardedSerialLink(port, baudrate=baudrate, device_id=oximeter.id, others=others)
        return NoninSerialSource(serial, clock, oximeter.id)

    return make_serial
