"""A virtual Bluetooth world: a private D-Bus bus with bluezoo (user-space BlueZ) on it.

No Bluetooth hardware, no root, no system bus, no bluetoothd. :class:`BleSandbox`
starts its own ``dbus-daemon`` on a socket in a fresh short ``/tmp`` directory
and runs bluezoo on it with N virtual adapters (``hci0``, ``hci1``, …) that see
each other. Simulators (``simulators/vm1_ble.py``) register GATT applications
and advertisements on ``hci0`` through the standard BlueZ D-Bus API; the
gateway's unmodified bleak client scans and connects on ``hci1``. Pointing
``DBUS_SYSTEM_BUS_ADDRESS`` at :attr:`BleSandbox.bus_address` is all bleak (and
dbus-fast, and bluezoo's sdbus) need to find "BlueZ" there::

    async with BleSandbox(adapters=2) as sandbox:
        os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = sandbox.bus_address
        ...

The tests (``tests/ble_fixtures.py``) and ``devicegw simulate --ble``
(:func:`simulate_ble_main`) share this implementation. It needs
``dbus-daemon`` (Debian package ``dbus-daemon``) and bluezoo (the ``ble-sim``
or ``test`` extra); :class:`BleSandboxUnavailable` says which is missing.

bluezoo 1.0.2 is run as ``python -m simulators.ble_sandbox bluezoo <bluezoo
options>`` (:func:`run_bluezoo`), which fixes three places where it behaves
unlike BlueZ and which reconnecting clients cannot do without (details and the
exact failures in ``docs/ble-testing.md``):

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

If a later bluezoo fixes these, the patches become no-ops or can go (the
dependency is pinned ``<1.1`` for that review).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TextIO

from drivers.clock import Clock
from drivers.errors import GatewayError, TransportError
from simulators.errors import ScenarioError

__all__ = [
    "ADAPTER_ADDRESSES",
    "GATEWAY_ADAPTER",
    "PERIPHERAL_ADAPTER",
    "SCAN_INTERVAL_S",
    "BleSandbox",
    "BleSandboxUnavailable",
    "bluezoo_available",
    "dbus_daemon_binary",
    "peripheral_adapters",
    "run_ble_scenarios",
    "run_bluezoo",
    "simulate_ble_main",
]

#: hci0 carries the simulated peripherals, hci1 is the gateway's adapter.
PERIPHERAL_ADAPTER = "hci0"
GATEWAY_ADAPTER = "hci1"
#: Adapter addresses from the RFC 7042 documentation range: hci<N> is ...:53:<N+1>.
ADAPTER_ADDRESSES = tuple(f"00:00:5E:00:53:{n:02X}" for n in range(1, 17))
#: Seconds between bluezoo's scan rounds (its default of 10 s makes every scan slow).
SCAN_INTERVAL_S = 1
#: Exit status of ``devicegw simulate --ble`` when the sandbox cannot run or a scenario is bad.
EXIT_UNAVAILABLE = 2

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


class BleSandboxUnavailable(GatewayError):
    """dbus-daemon or bluezoo is not installed, or they did not come up."""


def dbus_daemon_binary() -> str | None:
    return shutil.which("dbus-daemon") or (
        "/usr/bin/dbus-daemon" if os.path.exists("/usr/bin/dbus-daemon") else None
    )


def bluezoo_available() -> bool:
    try:
        importlib.import_module("bluezoo")
    except ImportError:
        return False
    return True


def check_available() -> None:
    """Raise :class:`BleSandboxUnavailable` naming what is missing and how to get it."""
    if dbus_daemon_binary() is None:
        raise BleSandboxUnavailable(
            "dbus-daemon is not installed (Debian/Ubuntu: apt-get install dbus-daemon); "
            "the BLE sandbox runs its own private D-Bus bus with it"
        )
    if not bluezoo_available():
        raise BleSandboxUnavailable(
            "bluezoo is not installed in this Python environment "
            "(pip install 'devicegw[ble-sim]', or the 'test' extra)"
        )


class BleSandbox:
    """A private bus plus patched bluezoo with ``adapters`` powered virtual adapters.

    ``async with BleSandbox(adapters=2) as sandbox:`` starts both processes and
    returns once ``org.bluez`` answers with every adapter powered; leaving the
    block stops them and removes the temporary directory (socket, config, logs).
    """

    def __init__(self, adapters: int = 2, *, scan_interval_s: int = SCAN_INTERVAL_S) -> None:
        if not 1 <= adapters <= len(ADAPTER_ADDRESSES):
            raise ValueError(f"adapters must be 1..{len(ADAPTER_ADDRESSES)}, not {adapters}")
        self.adapters: tuple[str, ...] = ADAPTER_ADDRESSES[:adapters]
        self.scan_interval_s = scan_interval_s
        self.workdir: Path | None = None
        self._procs: list[subprocess.Popen[bytes]] = []
        self._names: list[str] = []  # for messages: "dbus-daemon", "bluezoo"

    # ------------------------------------------------------------------ what users need

    @property
    def adapter_names(self) -> tuple[str, ...]:
        return tuple(f"hci{i}" for i in range(len(self.adapters)))

    @property
    def socket(self) -> Path:
        if self.workdir is None:
            raise RuntimeError("the BLE sandbox is not started")
        return self.workdir / "bus"

    @property
    def bus_address(self) -> str:
        """What ``DBUS_SYSTEM_BUS_ADDRESS`` must be for bleak, dbus-fast and bluezoo."""
        return f"unix:path={self.socket}"

    #: The name the test fixtures have always used.
    address = bus_address

    def adapter_address(self, name: str) -> str:
        """The Bluetooth address of adapter ``hci<N>``."""
        return self.adapters[int(name.removeprefix("hci"))]

    def log(self, name: str) -> str:
        """The tail of ``bluezoo.log`` or ``dbus-daemon.log``."""
        if self.workdir is None:
            return ""
        path = self.workdir / name
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    # ------------------------------------------------------------------ life cycle

    async def start(self) -> None:
        if self.workdir is not None:
            raise RuntimeError("the BLE sandbox is already started")
        check_available()
        binary = dbus_daemon_binary()
        assert binary is not None
        # A short directory of our own: a unix socket path must fit in 108 bytes.
        self.workdir = Path(tempfile.mkdtemp(prefix="devicegw-bz-", dir="/tmp"))
        try:
            conf = self.workdir / "bus.conf"
            conf.write_text(_BUS_CONFIG.format(socket=self.socket))
            self._spawn([binary, "--nofork", f"--config-file={conf}"], "dbus-daemon.log")
            await self._wait_socket()
            env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": self.bus_address}
            args = [sys.executable, "-m", "simulators.ble_sandbox", "bluezoo", "--auto-enable"]
            args += ["--scan-interval", str(self.scan_interval_s)]
            for address in self.adapters:
                args += ["-a", address]
            self._spawn(args, "bluezoo.log", env=env)
            await self.wait_ready()
        except BaseException:
            await self.close()
            raise

    async def wait_ready(self, within_s: float = 15.0) -> None:
        """Until bluezoo owns org.bluez and every adapter is powered."""
        from dbus_fast import BusType, Message, MessageType
        from dbus_fast.aio import MessageBus

        deadline = time.monotonic() + within_s
        last = "no reply yet"
        while time.monotonic() < deadline:
            self._check_alive()
            bus = None
            try:
                bus = await MessageBus(
                    bus_address=self.bus_address, bus_type=BusType.SYSTEM
                ).connect()
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
        raise BleSandboxUnavailable(
            f"bluezoo did not come up in {within_s:g} s: {last}; log: {self.log('bluezoo.log')}"
        )

    async def close(self) -> None:
        """Stop bluezoo, then the bus (SIGTERM, SIGKILL after 5 s); remove the directory."""
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.terminate()
                if not await _exited(proc, 5.0):
                    proc.kill()
                    await _exited(proc, 5.0)
        self._procs.clear()
        self._names.clear()
        workdir, self.workdir = self.workdir, None
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # ------------------------------------------------------------------ internals

    def _spawn(self, args: list[str], log_name: str, env: dict[str, str] | None = None) -> None:
        assert self.workdir is not None
        with open(self.workdir / log_name, "ab") as log:
            self._procs.append(
                subprocess.Popen(
                    args,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    # Own process group: a terminal's Ctrl-C reaches only the owner, which
                    # then tears down in order (simulators unregister before bluezoo goes).
                    process_group=0,
                )
            )
        self._names.append(log_name.removesuffix(".log"))

    def _check_alive(self) -> None:
        for proc in self._procs:
            if proc.poll() is not None:
                raise BleSandboxUnavailable(
                    f"{self._names[self._procs.index(proc)]} exited with {proc.returncode}; "
                    f"bluezoo log: {self.log('bluezoo.log')}; "
                    f"bus log: {self.log('dbus-daemon.log')}"
                )

    async def _wait_socket(self, within_s: float = 10.0) -> None:
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            self._check_alive()
            if self.socket.exists():
                return
            await asyncio.sleep(0.01)
        raise BleSandboxUnavailable(f"dbus-daemon did not create {self.socket} in {within_s:g} s")


async def _exited(proc: subprocess.Popen[bytes], within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while proc.poll() is None:
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.02)
    return True


# ------------------------------------------------------------------- devicegw simulate --ble


def peripheral_adapters(count: int) -> list[str]:
    """Adapters for ``count`` peripherals: hci0, then hci2, hci3, … (hci1 is the gateway's).

    One peripheral per adapter, as one device is one radio: bluezoo reports only
    an adapter's first advertisement to scanners, and two GATT applications on
    one adapter would appear as one device with two VM-1 services.
    """
    return [PERIPHERAL_ADAPTER, *(f"hci{i}" for i in range(2, count + 1))][:count]


@asynccontextmanager
async def run_ble_scenarios(
    paths: Sequence[str | Path], clock: Clock, oximeter_paths: Sequence[str | Path] = ()
) -> AsyncIterator[tuple[BleSandbox, list[Any]]]:
    """Validate every scenario, start the sandbox, register one peripheral per scenario.

    ``paths`` are VM-1 scenarios, ``oximeter_paths`` oximeter scenarios (PLX or
    BerryMed; a Nonin is a serial device and a :class:`ScenarioError`). The
    VM-1s come first: the first peripheral advertises on
    :data:`PERIPHERAL_ADAPTER` (``hci0``), further ones on ``hci2``, ``hci3``,
    … (:func:`peripheral_adapters`); the gateway scans on
    :data:`GATEWAY_ADAPTER`. Two scenarios of one kind with the same serial
    number are a :class:`ScenarioError`. All simulators share ``clock`` and
    power on together (their starts run concurrently, each taking its time
    base from ``clock`` before its first await), so an oximeter scenario's
    physiology lines up with the VM-1 scenario it is written against. Yields
    the sandbox and the started simulators (VM-1s, then oximeters).
    """
    from simulators.oximeter_ble import BerryMedBleSimulator, PlxBleSimulator
    from simulators.oximeter_scenario import load_oximeter_scenario
    from simulators.scenario import load_scenario
    from simulators.vm1_ble import Vm1BleSimulator

    # Every scenario is read (and refused) before anything starts.
    scenarios = [load_scenario(p) for p in paths]
    oximeters = [load_oximeter_scenario(p) for p in oximeter_paths]
    seen: dict[str, str | Path] = {}
    serials = [("device", p, s.device.serial_no) for p, s in zip(paths, scenarios, strict=True)]
    serials += [
        ("oximeter", p, s.oximeter.serial_no)
        for p, s in zip(oximeter_paths, oximeters, strict=True)
    ]
    for table, path, serial in serials:
        if serial in seen:
            raise ScenarioError(
                f"{path}: {table}.serial_no {serial!r} is also used by {seen[serial]}; "
                "each simulated device needs its own serial number"
            )
        seen[serial] = path
    for path, oximeter in zip(oximeter_paths, oximeters, strict=True):
        if oximeter.oximeter.protocol not in ("plx", "berrymed"):
            raise ScenarioError(
                f"{path}: oximeter.protocol is {oximeter.oximeter.protocol!r}, a serial "
                'oximeter; --ble simulates BLE oximeters only (protocol "plx" or "berrymed")'
            )
    count = len(scenarios) + len(oximeters)
    if count >= len(ADAPTER_ADDRESSES):
        raise ScenarioError(
            f"{count} scenarios: the BLE sandbox has room for at most "
            f"{len(ADAPTER_ADDRESSES) - 1} peripherals (one adapter each)"
        )
    adapters = peripheral_adapters(count)
    async with AsyncExitStack() as stack:
        sandbox = await stack.enter_async_context(BleSandbox(adapters=len(adapters) + 1))
        sims: list[Any] = []
        for scenario, adapter in zip(scenarios, adapters[: len(scenarios)], strict=True):
            sims.append(
                Vm1BleSimulator(
                    scenario, clock=clock, adapter=adapter, bus_address=sandbox.bus_address
                )
            )
        for oximeter, adapter in zip(oximeters, adapters[len(scenarios) :], strict=True):
            cls = PlxBleSimulator if oximeter.oximeter.protocol == "plx" else BerryMedBleSimulator
            sims.append(
                cls(oximeter, clock=clock, adapter=adapter, bus_address=sandbox.bus_address)
            )
        for sim in sims:  # close() is safe on a simulator that never started
            stack.push_async_callback(sim.close)
        try:
            async with asyncio.TaskGroup() as group:
                for sim in sims:
                    group.create_task(sim.start())
        except BaseExceptionGroup as failed:  # the first failure, as a sequential start would
            raise failed.exceptions[0] from None
        yield sandbox, sims


def _oximeter_protocol(sim: Any) -> str | None:
    """``plx`` / ``berrymed`` for an oximeter simulator, None for a VM-1."""
    oximeter = getattr(sim.scenario, "oximeter", None)
    return None if oximeter is None else str(oximeter.protocol)


def _device_line(sandbox: BleSandbox, sim: Any) -> str:
    where = f"on {sim.adapter} ({sandbox.adapter_address(sim.adapter)})"
    protocol = _oximeter_protocol(sim)
    if protocol is None:
        serial = sim.scenario.device.serial_no
        return f'{serial}  "{sim.local_name}"  {where}  ({sim.scenario.name})\n'
    scenario = sim.scenario
    return (
        f'{scenario.oximeter.serial_no}  "{sim.local_name}"  {where}  ({scenario.name})'
        f'  oximeter type "{protocol}", bed {scenario.bed}, subject {scenario.subject_id}\n'
    )


def _link_line(sandbox: BleSandbox, sim: Any) -> str:
    """The gateway's ``link`` for this peripheral: by advertised name, or by address for
    BerryMed (every BerryMed advertises the same name)."""
    if _oximeter_protocol(sim) == "berrymed":
        found_by = f'address = "{sandbox.adapter_address(sim.adapter)}"'
    else:
        found_by = f'name = "{sim.local_name}"'
    return f'link = {{ kind = "ble", {found_by}, adapter = "{GATEWAY_ADAPTER}" }}\n'


async def simulate_ble_main(
    paths: Sequence[str | Path],
    *,
    clock: Clock,
    oximeter_paths: Sequence[str | Path] = (),
    out: TextIO | None = None,
) -> int:
    """``devicegw simulate --ble``: run the scenarios as BLE peripherals until cancelled.

    Prints one line per device (``<serial>  "<advertised name>"  on <adapter>
    (<address>)  (<scenario>)``; an oximeter's line goes on with its config
    ``type``, bed and subject), then the ``DBUS_SYSTEM_BUS_ADDRESS`` export
    line and one config line per device, in the same order, for the gateway
    (which scans on :data:`GATEWAY_ADAPTER`): the ``link`` of its
    ``[[devices]]`` or ``[[oximeters]]`` entry. A missing dbus-daemon or
    bluezoo, or a bad scenario (a Nonin oximeter among them), prints one error
    line to stderr and returns 2.
    """
    out = out if out is not None else sys.stdout
    try:
        async with run_ble_scenarios(paths, clock, oximeter_paths) as (sandbox, sims):
            for sim in sims:
                out.write(_device_line(sandbox, sim))
            out.write(f"export DBUS_SYSTEM_BUS_ADDRESS={sandbox.bus_address}\n")
            out.write(f"# gateway config, per device (the gateway scans on {GATEWAY_ADAPTER}):\n")
            for sim in sims:
                out.write(_link_line(sandbox, sim))
            out.flush()
            await asyncio.Event().wait()
    except (BleSandboxUnavailable, ScenarioError, TransportError) as exc:
        sys.stderr.write(f"devicegw simulate --ble: {exc}\n")
        return EXIT_UNAVAILABLE
    return 0


# --------------------------------------------------------------------------- patched bluezoo


def _patch_bluezoo() -> None:  # pragma: no cover - runs in the bluezoo subprocess
    """Make bluezoo 1.0.2 behave like BlueZ where clients depend on it (module docstring)."""
    Device: Any = importlib.import_module("bluezoo.device").Device
    Subscription: Any = importlib.import_module("bluezoo.events").Subscription
    client_link: Any = importlib.import_module("bluezoo.gatt").GattCharacteristicClientLink

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
            if not isinstance(link, client_link):
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

    Device.disconnect = disconnect
    Device.properties_sync = properties_sync


def run_bluezoo(argv: list[str]) -> None:  # pragma: no cover - runs in a subprocess
    """bluezoo's own ``main()`` with its arguments, after :func:`_patch_bluezoo`."""
    bluezoo: Any = importlib.import_module("bluezoo.bluezoo")
    _patch_bluezoo()
    sys.argv = ["bluezoo", *argv]
    bluezoo.main()


def main(argv: Sequence[str] | None = None) -> None:  # pragma: no cover - a subprocess
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] != "bluezoo":
        raise SystemExit(
            "usage: python -m simulators.ble_sandbox bluezoo [bluezoo options]\n"
            "  (bluezoo with the BlueZ-fidelity patches; DBUS_SYSTEM_BUS_ADDRESS from the "
            "environment)"
        )
    run_bluezoo(args[1:])


if __name__ == "__main__":  # pragma: no cover
    main()
