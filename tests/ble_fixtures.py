"""A private D-Bus bus with bluezoo (a user-space BlueZ D-Bus service) for BLE tests.

No Bluetooth hardware, no root, no system bus: the fixture starts its own
``dbus-daemon`` on a socket in a fresh temporary directory and runs bluezoo on
it with two virtual adapters that see each other. Simulators register GATT
applications and advertisements on ``hci0`` through the standard BlueZ D-Bus
API; the gateway's (unmodified) bleak client scans and connects on ``hci1``.
``DBUS_SYSTEM_BUS_ADDRESS`` points both at the private bus, which is the only
thing bleak needs to find "BlueZ" there.

bluezoo 1.0.2 is run through :func:`run_bluezoo`, which fixes three places
where it behaves unlike BlueZ and which a reconnect test cannot do without
(details and the exact failures in ``docs/ble-testing.md``):

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

Run it by hand with ``python -m tests.ble_fixtures bluezoo -a 00:00:00:00:00:01``
(its own arguments, ``DBUS_SYSTEM_BUS_ADDRESS`` from the environment).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.mqtt_helpers import require

REPO_ROOT = Path(__file__).resolve().parent.parent

#: The two virtual adapters: hci0 for simulators (peripherals), hci1 for the gateway.
PERIPHERAL_ADAPTER = "hci0"
GATEWAY_ADAPTER = "hci1"
ADAPTER_ADDRESSES = ("00:00:5E:00:53:01", "00:00:5E:00:53:02")  # RFC 7042 documentation range
#: Seconds between bluezoo's scan rounds (its default of 10 s would make every test slow).
SCAN_INTERVAL_S = 1

_BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""


def dbus_daemon_binary() -> str | None:
    return shutil.which("dbus-daemon") or (
        "/usr/bin/dbus-daemon" if os.path.exists("/usr/bin/dbus-daemon") else None
    )


def bluezoo_available() -> bool:
    try:
        import bluezoo  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class BluezooEnv:
    """A private bus plus bluezoo; :attr:`address` is what DBUS_SYSTEM_BUS_ADDRESS must be."""

    workdir: Path
    adapters: tuple[str, ...] = ADAPTER_ADDRESSES
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def socket(self) -> Path:
        return self.workdir / "bus"

    @property
    def address(self) -> str:
        return f"unix:path={self.socket}"

    def adapter_address(self, name: str) -> str:
        return self.adapters[int(name.removeprefix("hci"))]

    def start(self) -> None:
        binary = dbus_daemon_binary()
        assert binary is not None
        conf = self.workdir / "bus.conf"
        conf.write_text(_BUS_CONFIG.format(socket=self.socket))
        self._spawn([binary, "--nofork", f"--config-file={conf}"], "dbus-daemon.log")
        self._wait(lambda: self.socket.exists(), "dbus-daemon did not create its socket")
        env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": self.address}
        args = [sys.executable, "-m", "tests.ble_fixtures", "bluezoo", "--auto-enable"]
        args += ["--scan-interval", str(SCAN_INTERVAL_S)]
        for address in self.adapters:
            args += ["-a", address]
        self._spawn(args, "bluezoo.log", env=env)

    async def wait_ready(self, timeout: float = 15.0) -> None:
        """Until bluezoo owns org.bluez and every adapter is powered."""
        from dbus_fast import BusType, Message, MessageType
        from dbus_fast.aio import MessageBus

        deadline = time.monotonic() + timeout
        last = "no reply yet"
        while time.monotonic() < deadline:
            self._check_alive()
            bus = None
            try:
                bus = await MessageBus(bus_address=self.address, bus_type=BusType.SYSTEM).connect()
                reply = await bus.call(
                    Message(
                        destination="org.bluez",
                        path="/",
                        interface="org.freedesktop.DBus.ObjectManager",
                        member="GetManagedObjects",
                    )
                )
                if reply is not None and reply.message_type == MessageType.METHOD_RETURN:
                    objects: dict[str, dict[str, dict[str, Any]]] = reply.body[0]
                    powered = [
                        p
                        for p, ifaces in objects.items()
                        if "org.bluez.Adapter1" in ifaces
                        and ifaces["org.bluez.Adapter1"]["Powered"].value
                    ]
                    if len(powered) == len(self.adapters):
                        return
                    last = f"powered adapters: {powered}"
                elif reply is not None:
                    last = f"{reply.error_name}: {reply.body}"
            except (OSError, EOFError) as exc:
                last = repr(exc)
            finally:
                if bus is not None:
                    bus.disconnect()
            await asyncio.sleep(0.05)
        raise RuntimeError(f"bluezoo did not come up: {last}; log: {self.log('bluezoo.log')}")

    def log(self, name: str) -> str:
        path = self.workdir / name
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        self.procs.clear()

    def _spawn(self, args: list[str], log_name: str, env: dict[str, str] | None = None) -> None:
        with open(self.workdir / log_name, "ab") as log:
            self.procs.append(
                subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
            )

    def _check_alive(self) -> None:
        for proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{proc.args[0]} exited with {proc.returncode}; "
                    f"bluezoo log: {self.log('bluezoo.log')}; "
                    f"bus log: {self.log('dbus-daemon.log')}"
                )

    def _wait(self, predicate: Any, why: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            if predicate():
                return
            time.sleep(0.01)
        raise RuntimeError(why)


@contextlib.asynccontextmanager
async def bluezoo_env() -> AsyncIterator[BluezooEnv]:
    # A short directory of our own: a unix socket path must fit in 108 bytes.
    workdir = Path(tempfile.mkdtemp(prefix="devicegw-bz-"))
    env = BluezooEnv(workdir)
    try:
        env.start()
        await env.wait_ready()
        yield env
    finally:
        env.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
async def bluez(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[BluezooEnv]:
    """A private bus + bluezoo (hci0 for simulators, hci1 for the gateway), torn down after.

    DBUS_SYSTEM_BUS_ADDRESS points at it for the test, so unmodified bleak talks to it.
    """
    require(dbus_daemon_binary() is not None, "dbus-daemon is not installed (apt: dbus)")
    require(bluezoo_available(), "bluezoo is not installed (pip: bluezoo)")
    async with bluezoo_env() as env:
        monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", env.address)
        yield env


# --------------------------------------------------------------------------- bluezoo runner


def _patch_bluezoo() -> None:  # pragma: no cover - runs in the bluezoo subprocess
    """Make bluezoo 1.0.2 behave like BlueZ where the tests depend on it (module docstring)."""
    from bluezoo.device import Device
    from bluezoo.events import Subscription
    from bluezoo.gatt import GattCharacteristicClientLink

    original_disconnect = Device.disconnect
    original_sync = Device.properties_sync

    def twin(device: Any) -> Any:
        """The object for the other end of the link: on the peer adapter, for our adapter."""
        if device.adapter is None:
            return None
        name = "dev_" + device.adapter.address.replace(":", "_")
        path = f"{device.peer_adapter.get_object_path()}/{name}"
        return device.peer_adapter.devices.get(path)

    async def disconnect(self: Any, uuid: str | None = None) -> None:
        was_connected = self.connected
        await original_disconnect(self, uuid)
        # (1) drop this end's GATT objects, stopping the server's notifications first
        for link in list(self.services.values()):
            if not isinstance(link, GattCharacteristicClientLink):
                continue
            # bluezoo's empty Subscription wrapper until StartNotify, a pyventus subscriber after
            subscription = link.client_props_changed_subscription
            if getattr(subscription, "subscriber", subscription) is not None:
                subscription.unsubscribe()
                link.client_props_changed_subscription = Subscription()
                with contextlib.suppress(Exception):
                    await link.client.StopNotify()
        for link in reversed(list(self.services.values())):
            with contextlib.suppress(KeyError):
                self.peer_adapter.mock.remove_object(link)
        self.services.clear()
        if self.services_resolved:
            await self.ServicesResolved.set_async(False)
        # (2) the other end sees the link go too
        other = twin(self)
        if was_connected and other is not None and other.connected:
            await other.disconnect()

    async def properties_sync(self: Any, device: Any) -> None:
        await original_sync(self, device)
        # (3) a fresh sighting, as BlueZ signals for every advertisement it receives
        self.rssi = -51 if self.rssi == -50 else -50
        self.properties_changed.emit(("org.bluez.Device1", {"RSSI": ("n", self.rssi)}, []))

    Device.disconnect = disconnect  # type: ignore[method-assign]
    Device.properties_sync = properties_sync  # type: ignore[method-assign]


def run_bluezoo(argv: list[str]) -> None:  # pragma: no cover - runs in a subprocess
    from bluezoo import bluezoo

    _patch_bluezoo()
    sys.argv = ["bluezoo", *argv]
    bluezoo.main()


if __name__ == "__main__":  # pragma: no cover
    if len(sys.argv) < 2 or sys.argv[1] != "bluezoo":
        raise SystemExit("usage: python -m tests.ble_fixtures bluezoo [bluezoo options]")
    run_bluezoo(sys.argv[2:])
