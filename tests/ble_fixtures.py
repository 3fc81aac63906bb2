"""A private D-Bus bus with bluezoo (a user-space BlueZ D-Bus service) for BLE tests.

No Bluetooth hardware, no root, no system bus: the fixture starts its own
``dbus-daemon`` on a socket in a fresh temporary directory and runs bluezoo on
it with two virtual adapters that see each other. Simulators register GATT
applications and advertisements on ``hci0`` through the standard BlueZ D-Bus
API; the gateway's (unmodified) bleak client scans and connects on ``hci1``.
``DBUS_SYSTEM_BUS_ADDRESS`` points both at the private bus, which is the only
thing bleak needs to find "BlueZ" there.

The sandbox itself (bus, bluezoo, readiness, teardown) is product code shared
with ``devicegw simulate --ble``: :class:`simulators.ble_sandbox.BleSandbox`.
bluezoo 1.0.2 is run through :func:`simulators.ble_sandbox.run_bluezoo`, which
fixes three places where it behaves unlike BlueZ and which a reconnect test
cannot do without (details and the exact failures in ``docs/ble-testing.md``):

1. On disconnect BlueZ removes an unbonded LE device's GATT objects (and stops
   the server's notifications). bluezoo keeps them exported, so the next
   ``Device1.Connect`` to the same device fails exporting the same object paths
   again (``sd_bus_add_object_vtable ... returned error number: 17``).
2. A disconnect is seen by both ends. bluezoo keeps a separate object for each
   end and updates only the one whose ``Disconnect`` was called, so a
   peripheral dropping the link is invisible to the central.
3. BlueZ reports a known device again on every advertisement it receives during
   discovery (``RSSI`` changes). bluezoo only signals changed advertising data,
   so a device already known to the adapter is never reported to a new scan and
   ``BleakScanner.find_device_by_*`` returns None.

Run it by hand with ``python -m simulators.ble_sandbox bluezoo -a 00:00:00:00:00:01``
(its own arguments, ``DBUS_SYSTEM_BUS_ADDRESS`` from the environment;
``python -m tests.ble_fixtures bluezoo …`` still works), or the whole world with
``devicegw simulate --ble --scenario …``.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from simulators.ble_sandbox import (
    ADAPTER_ADDRESSES,
    GATEWAY_ADAPTER,
    PERIPHERAL_ADAPTER,
    SCAN_INTERVAL_S,
    BleSandbox,
    bluezoo_available,
    dbus_daemon_binary,
    run_bluezoo,
)
from tests.mqtt_helpers import require

__all__ = [
    "ADAPTER_ADDRESSES",
    "GATEWAY_ADAPTER",
    "PERIPHERAL_ADAPTER",
    "SCAN_INTERVAL_S",
    "BluezooEnv",
    "bluez",
    "bluezoo_available",
    "bluezoo_env",
    "dbus_daemon_binary",
    "run_bluezoo",
]

REPO_ROOT = Path(__file__).resolve().parent.parent

#: The tests' name for the sandbox: :attr:`address` is what DBUS_SYSTEM_BUS_ADDRESS must be.
BluezooEnv = BleSandbox


@contextlib.asynccontextmanager
async def bluezoo_env() -> AsyncIterator[BluezooEnv]:
    async with BleSandbox(adapters=2) as env:  # hci0 peripherals, hci1 the gateway
        yield env


@pytest.fixture
async def bluez(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[BluezooEnv]:
    """A private bus + bluezoo (hci0 for simulators, hci1 for the gateway), torn down after.

    DBUS_SYSTEM_BUS_ADDRESS points at it for the test, so unmodified bleak talks to it.
    """
    require(dbus_daemon_binary() is not None, "dbus-daemon is not installed (apt: dbus-daemon)")
    require(bluezoo_available(), "bluezoo is not installed (pip: bluezoo)")
    async with bluezoo_env() as env:
        monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", env.address)
        yield env


if __name__ == "__main__":  # pragma: no cover
    if len(sys.argv) < 2 or sys.argv[1] != "bluezoo":
        raise SystemExit("usage: python -m tests.ble_fixtures bluezoo [bluezoo options]")
    run_bluezoo(sys.argv[2:])  # the patched bluezoo of simulators/ble_sandbox.py
