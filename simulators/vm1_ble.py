"""A simulated VM-1 offered over Bluetooth LE through the standard BlueZ D-Bus API.

The same :class:`~simulators.vm1_model.Vm1Model` as the serial simulator,
driven by the injected :class:`~devicegw.clock.Clock`, registered on one
adapter as a GATT application (``org.bluez.GattManager1.RegisterApplication``)
and an advertisement (``org.bluez.LEAdvertisingManager1.RegisterAdvertisement``)
with dbus-fast. Against real BlueZ this is a peripheral other machines can
connect to; in the tests it runs on bluezoo's ``hci0`` while the gateway's bleak
client uses ``hci1`` (see ``tests/ble_fixtures.py`` and ``docs/ble-testing.md``).

Byte path (ICD section 4): model message -> :func:`drivers.vm1.codec.encode_payload`
-> one characteristic value, no framing:

- STATUS -> Status (read, notify); its battery reading also -> Battery Level
  0x2A19 (read, notify; 100 on mains, since the SIG characteristic has no
  "on mains" value);
- OUTPUT -> Output (notify);
- SESSION_START, SESSION_END, ALARM, SESSION_RECORD -> Events (indicate);
- ACK -> Control point (indicate); host command payloads arrive as writes with
  response to the Control point and go through
  :func:`~drivers.vm1.codec.decode_payload` to :meth:`Vm1Model.handle_command`;
- IDENT -> Ident (read).

Choices where the ICD is silent:

- A value sent while the central has not subscribed to that characteristic is
  lost (counted), as bytes sent into an unplugged serial port are.
- IDENT has no notify property, so an IDENT the device produces (power-up,
  GET_INFO) waits in the Ident characteristic until it is read. A read when no
  produced IDENT is waiting makes a fresh one (as a serial port open does), so
  a reconnecting host always reads a current ``last_session_no`` and every
  IDENT's ``seq`` reaches the host exactly once (no false sequence gaps).
- Device Information: Manufacturer Name is :data:`MANUFACTURER`; Model Number,
  Serial Number and Firmware Revision come from the scenario's device.

:meth:`Vm1BleSimulator.go_away` is the device leaving radio range: it drops
every connection (``Device1.Disconnect`` on its adapter's connected devices),
stops advertising and removes its GATT application; the model keeps running
and what it sends meanwhile is lost. :meth:`Vm1BleSimulator.come_back`
registers both again.
"""

# No ``from __future__ import annotations``: dbus-fast reads the D-Bus signatures from
# the annotations, and a postponed ``-> None`` would reach it as the string "None".
import asyncio
import contextlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Annotated, Any, Self

from dbus_fast import BusType, DBusError, Message, MessageType, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import (
    DBusBool,
    DBusBytes,
    DBusDict,
    DBusObjectPath,
    DBusSignature,
    DBusStr,
)
from dbus_fast.constants import PropertyAccess
from dbus_fast.service import ServiceInterface, dbus_method, dbus_property

from devicegw.clock import Clock
from devicegw.errors import ProtocolError, TransportError
from drivers.transport.ble_link import (
    BATTERY_LEVEL_UUID,
    BATTERY_SERVICE_UUID,
    DEVICE_INFORMATION_UUID,
    FIRMWARE_REVISION_UUID,
    MANUFACTURER_NAME_UUID,
    MODEL_NUMBER_UUID,
    SERIAL_NUMBER_UUID,
    VM1_CONTROL_POINT_UUID,
    VM1_EVENTS_UUID,
    VM1_IDENT_UUID,
    VM1_OUTPUT_UUID,
    VM1_SERVICE_UUID,
    VM1_STATUS_UUID,
    vm1_local_name,
)
from drivers.vm1.codec import decode_payload, encode_payload
from drivers.vm1.messages import (
    Ack,
    AckResult,
    Alarm,
    DeviceMessage,
    GetInfo,
    GetSession,
    HostCommand,
    Ident,
    MsgType,
    Output,
    Ping,
    SessionEnd,
    SessionRecord,
    SessionStart,
    SetClock,
    SetRate,
    Start,
    Status,
    Stop,
)
from simulators.scenario import Scenario
from simulators.vm1_model import Vm1Model

__all__ = ["MANUFACTURER", "BleSimCounters", "Vm1BleSimulator"]

log = logging.getLogger(__name__)

MANUFACTURER = "devicegw VM-1 simulator"
#: Shortest real-time sleep of the run loop (as in the pty simulator).
MIN_REAL_SLEEP_S = 0.002

_BLUEZ = "org.bluez"
_ADAPTER_IFACE = "org.bluez.Adapter1"
_DEVICE_IFACE = "org.bluez.Device1"
_HOST_COMMANDS = (GetInfo, SetClock, Start, Stop, Ping, SetRate, GetSession)
_COMMAND_TYPE_BYTES = frozenset(int(t) for t in MsgType if t & 0x80)

DBusStrList = Annotated[list[str], DBusSignature("as")]


@dataclass(slots=True)
class BleSimCounters:
    """What went over (or did not go over) the simulated radio."""

    notifications_sent: int = 0  # notifications and indications emitted to a subscriber
    values_lost: int = 0  # produced while nobody was subscribed (or while away)
    commands_received: int = 0
    commands_rejected: int = 0  # answered UNKNOWN_COMMAND / BAD_ARGUMENT
    unexpected_writes: int = 0  # decodable payloads that are not host commands
    ident_reads: int = 0
    disconnects_forced: int = 0


# --------------------------------------------------------------------------- GATT objects


class _Service(ServiceInterface):
    def __init__(self, uuid: str) -> None:
        super().__init__("org.bluez.GattService1")
        self._uuid = uuid

    @dbus_property(access=PropertyAccess.READ)
    def UUID(self) -> DBusStr:
        return self._uuid

    @dbus_property(access=PropertyAccess.READ)
    def Primary(self) -> DBusBool:
        return True


class _Characteristic(ServiceInterface):
    """One GATT characteristic; ``send`` notifies/indicates when a central subscribed."""

    def __init__(
        self,
        uuid: str,
        service_path: str,
        flags: list[str],
        value: bytes = b"",
        *,
        on_read: Callable[[], bytes] | None = None,
        on_write: Callable[[bytes], None] | None = None,
    ) -> None:
        super().__init__("org.bluez.GattCharacteristic1")
        self.uuid = uuid
        self._service_path = service_path
        self._flags = flags
        self.value = value
        self.notifying = False
        self._on_read = on_read
        self._on_write = on_write

    @dbus_property(access=PropertyAccess.READ)
    def UUID(self) -> DBusStr:
        return self.uuid

    @dbus_property(access=PropertyAccess.READ)
    def Service(self) -> DBusObjectPath:
        return self._service_path

    @dbus_property(access=PropertyAccess.READ)
    def Flags(self) -> DBusStrList:
        return self._flags

    @dbus_property(access=PropertyAccess.READ)
    def Value(self) -> DBusBytes:
        return self.value

    @dbus_property(access=PropertyAccess.READ)
    def Notifying(self) -> DBusBool:
        return self.notifying

    @dbus_method()
    def ReadValue(self, options: DBusDict) -> DBusBytes:
        if "read" not in self._flags:
            raise DBusError("org.bluez.Error.NotPermitted", "read not permitted")
        if self._on_read is not None:
            self.value = self._on_read()
        return self.value

    @dbus_method()
    def WriteValue(self, value: DBusBytes, options: DBusDict) -> None:
        if self._on_write is None:
            raise DBusError("org.bluez.Error.NotPermitted", "write not permitted")
        self._on_write(bytes(value))

    @dbus_method()
    def StartNotify(self) -> None:
        if not {"notify", "indicate"} & set(self._flags):
            raise DBusError("org.bluez.Error.NotSupported", "no notify or indicate")
        self.notifying = True

    @dbus_method()
    def StopNotify(self) -> None:
        self.notifying = False

    @dbus_method()
    def Confirm(self) -> None:
        """The central confirmed an indication (nothing to do: values are not queued)."""

    def send(self, value: bytes) -> bool:
        """Set the value and push it to a subscribed central; False if nobody listens."""
        self.value = value
        if not self.notifying:
            return False
        self.emit_properties_changed({"Value": value})
        return True


class _Advertisement(ServiceInterface):
    def __init__(self, local_name: str, service_uuids: list[str]) -> None:
        super().__init__("org.bluez.LEAdvertisement1")
        self._local_name = local_name
        self._service_uuids = service_uuids

    @dbus_property(access=PropertyAccess.READ)
    def Type(self) -> DBusStr:
        return "peripheral"

    @dbus_property(access=PropertyAccess.READ)
    def ServiceUUIDs(self) -> DBusStrList:
        return self._service_uuids

    @dbus_property(access=PropertyAccess.READ)
    def LocalName(self) -> DBusStr:
        return self._local_name

    @dbus_property(access=PropertyAccess.READ)
    def Discoverable(self) -> DBusBool:
        return True

    @dbus_method()
    def Release(self) -> None:
        """BlueZ dropped the advertisement (adapter gone); nothing to free."""


# --------------------------------------------------------------------------- simulator


class Vm1BleSimulator:
    """A :class:`Vm1Model` running a :class:`Scenario`, advertised as ``VM-1 <serial>``.

    Use as ``async with Vm1BleSimulator(scenario, clock=clock) as sim:``. The bus is
    the system bus (``DBUS_SYSTEM_BUS_ADDRESS`` is honoured) unless ``bus_address``
    is given.
    """

    def __init__(
        self,
        scenario: Scenario,
        *,
        clock: Clock,
        adapter: str = "hci0",
        bus_address: str | None = None,
        model: Vm1Model | None = None,
    ) -> None:
        self.scenario = scenario
        self.model = model if model is not None else Vm1Model.from_scenario(scenario)
        self.counters = BleSimCounters()
        self.adapter = adapter
        self.local_name = vm1_local_name(scenario.device.serial_no)
        self._clock = clock
        self._bus_address = bus_address
        self._adapter_path = f"/org/bluez/{adapter}"
        serial = "".join(c if c.isalnum() else "_" for c in scenario.device.serial_no)
        self._root = f"/org/devicegw/vm1sim/{serial}"
        self._adv_path = f"{self._root}/advertisement0"
        self._bus: MessageBus | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Future[None] | None = None
        self._t0 = 0.0
        self._present = False
        self._ident_waiting: bytes | None = None
        self._battery_level: int | None = None
        self._exports: list[tuple[str, ServiceInterface]] = []
        self._build_gatt()

    # ------------------------------------------------------------------ public API

    @property
    def present(self) -> bool:
        """Advertising and connectable (False while :meth:`go_away` is in effect)."""
        return self._present

    def device_time(self) -> float:
        """Seconds since power-on (simulator start) on the injected clock."""
        return self._clock.monotonic() - self._t0

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("simulator already started")
        self._t0 = self._clock.monotonic()
        self._ident_waiting = encode_payload(self.model.ident_message(0.0))  # power-up IDENT
        try:
            if self._bus_address is not None:
                bus = MessageBus(bus_address=self._bus_address, bus_type=BusType.SYSTEM)
            else:
                bus = MessageBus(bus_type=BusType.SYSTEM)
            self._bus = await bus.connect()
        except (OSError, EOFError, DBusError) as exc:
            raise TransportError(f"VM-1 BLE simulator: cannot reach D-Bus: {exc}") from exc
        await self._require_adapter()
        for path, iface in self._exports:
            self._bus.export(path, iface)
        await self.come_back()
        self._task = asyncio.create_task(self._run(), name=f"vm1-ble-sim {self.local_name}")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        bus, self._bus = self._bus, None
        if bus is not None:
            if self._present:
                with contextlib.suppress(TransportError):
                    await self._unregister(bus)
            self._present = False
            bus.disconnect()

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

    async def go_away(self) -> None:
        """Leave radio range: drop connections, stop advertising, remove the GATT app."""
        bus = self._require_bus()
        if not self._present:
            return
        self._present = False
        for char in self._chars:
            char.notifying = False
        for device_path in await self._connected_devices(bus):
            await self._call(bus, device_path, _DEVICE_IFACE, "Disconnect", "", [])
            self.counters.disconnects_forced += 1
        await self._unregister(bus)
        log.info("%s: gone away", self.local_name)

    async def come_back(self) -> None:
        """Back in range: register the GATT application and the advertisement again."""
        bus = self._require_bus()
        if self._present:
            return
        await self._call(
            bus,
            self._adapter_path,
            "org.bluez.GattManager1",
            "RegisterApplication",
            "oa{sv}",
            [self._root, {}],
        )
        await self._call(
            bus,
            self._adapter_path,
            "org.bluez.LEAdvertisingManager1",
            "RegisterAdvertisement",
            "oa{sv}",
            [self._adv_path, {}],
        )
        self._present = True
        log.info("%s: advertising on %s", self.local_name, self.adapter)

    # ------------------------------------------------------------------ GATT layout

    def _build_gatt(self) -> None:
        dev = self.scenario.device
        root = self._root
        vm1 = f"{root}/service0"
        dis = f"{root}/service1"
        bas = f"{root}/service2"
        self.ident = _Characteristic(VM1_IDENT_UUID, vm1, ["read"], on_read=self._read_ident)
        self.status = _Characteristic(VM1_STATUS_UUID, vm1, ["read", "notify"])
        self.output = _Characteristic(VM1_OUTPUT_UUID, vm1, ["notify"])
        self.events = _Characteristic(VM1_EVENTS_UUID, vm1, ["indicate"])
        self.control_point = _Characteristic(
            VM1_CONTROL_POINT_UUID, vm1, ["write", "indicate"], on_write=self._on_command
        )
        self.battery = _Characteristic(
            BATTERY_LEVEL_UUID, bas, ["read", "notify"], bytes([self._battery_pct()])
        )
        info = [
            (MANUFACTURER_NAME_UUID, MANUFACTURER),
            (MODEL_NUMBER_UUID, dev.model),
            (SERIAL_NUMBER_UUID, dev.serial_no),
            (FIRMWARE_REVISION_UUID, dev.firmware),
        ]
        self._chars = [self.ident, self.status, self.output, self.events, self.control_point]
        exports: list[tuple[str, ServiceInterface]] = [(vm1, _Service(VM1_SERVICE_UUID))]
        exports += [(f"{vm1}/char{i}", c) for i, c in enumerate(self._chars)]
        exports.append((dis, _Service(DEVICE_INFORMATION_UUID)))
        exports += [
            (f"{dis}/char{i}", _Characteristic(uuid, dis, ["read"], text.encode("ascii")))
            for i, (uuid, text) in enumerate(info)
        ]
        exports += [(bas, _Service(BATTERY_SERVICE_UUID)), (f"{bas}/char0", self.battery)]
        self._chars.append(self.battery)
        exports.append((self._adv_path, _Advertisement(self.local_name, [VM1_SERVICE_UUID])))
        self._exports = exports

    def _battery_pct(self) -> int:
        pct = self.model.battery_pct
        return 100 if pct is None else pct

    # ------------------------------------------------------------------ run loop

    async def _run(self) -> None:
        clock = self._clock
        min_sleep = MIN_REAL_SLEEP_S * clock.scale if math.isfinite(clock.scale) else 0.0
        loop = asyncio.get_running_loop()
        while True:
            now = self.device_time()
            self._transmit(self.model.advance(now))
            delay = max(self.model.next_event_time() - now, min_sleep)
            self._wake = loop.create_future()
            sleeper = asyncio.ensure_future(clock.sleep(delay))
            try:
                await asyncio.wait({sleeper, self._wake}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                self._wake = None
                if not sleeper.done():
                    sleeper.cancel()
                    await asyncio.wait({sleeper})

    def _poke(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    # ------------------------------------------------------------------ device -> host

    def _transmit(self, msgs: list[DeviceMessage]) -> None:
        for msg in msgs:
            payload = encode_payload(msg)
            if isinstance(msg, Ident):
                self._ident_waiting = payload
                continue
            if isinstance(msg, Status):
                self._send(self.status, payload)
                level = self._battery_pct()
                if level != self._battery_level:
                    self._battery_level = level
                    self._send(self.battery, bytes([level]), count=False)
            elif isinstance(msg, Output):
                self._send(self.output, payload)
            elif isinstance(msg, SessionStart | SessionEnd | Alarm | SessionRecord):
                self._send(self.events, payload)
            elif isinstance(msg, Ack):
                self._send(self.control_point, payload)

    def _send(self, char: _Characteristic, value: bytes, *, count: bool = True) -> None:
        sent = self._present and char.send(value)
        if not count:
            return
        if sent:
            self.counters.notifications_sent += 1
        else:
            self.counters.values_lost += 1

    def _read_ident(self) -> bytes:
        now = self.device_time()
        self._transmit(self.model.advance(now))  # keep messages in time order
        self.counters.ident_reads += 1
        waiting, self._ident_waiting = self._ident_waiting, None
        return waiting if waiting is not None else encode_payload(self.model.ident_message(now))

    # ------------------------------------------------------------------ host -> device

    def _on_command(self, payload: bytes) -> None:
        now = self.device_time()
        try:
            msg = decode_payload(payload)
        except ProtocolError:
            kind = payload[0] if payload else 0
            seq = payload[1] if len(payload) > 1 else 0
            if kind in _COMMAND_TYPE_BYTES:
                result = AckResult.BAD_ARGUMENT
            elif kind & 0x80:
                result = AckResult.UNKNOWN_COMMAND
            else:
                self.counters.unexpected_writes += 1
                raise DBusError(
                    "org.bluez.Error.InvalidValueLength", "not a VM-1 command"
                ) from None
            self.counters.commands_rejected += 1
            self._transmit(self.model.reject_command(kind, seq, result, now))
            return
        if not isinstance(msg, _HOST_COMMANDS):
            self.counters.unexpected_writes += 1
            raise DBusError("org.bluez.Error.NotPermitted", "not a host command")
        command: HostCommand = msg
        self.counters.commands_received += 1
        self._transmit(self.model.handle_command(command, now))
        self._poke()

    # ------------------------------------------------------------------ BlueZ calls

    def _require_bus(self) -> MessageBus:
        if self._bus is None:
            raise RuntimeError("simulator not started")
        return self._bus

    async def _require_adapter(self) -> None:
        bus = self._require_bus()
        objects = await self._managed_objects(bus)
        if _ADAPTER_IFACE not in objects.get(self._adapter_path, {}):
            adapters = sorted(p for p, i in objects.items() if _ADAPTER_IFACE in i)
            raise TransportError(
                f"VM-1 BLE simulator: Bluetooth adapter {self.adapter} not found "
                f"(BlueZ has: {', '.join(adapters) or 'none'})"
            )

    async def _managed_objects(self, bus: MessageBus) -> dict[str, dict[str, dict[str, Any]]]:
        body = await self._call(
            bus, "/", "org.freedesktop.DBus.ObjectManager", "GetManagedObjects", "", []
        )
        objects: dict[str, dict[str, dict[str, Any]]] = body[0]
        return objects

    async def _connected_devices(self, bus: MessageBus) -> list[str]:
        out = []
        for path, ifaces in (await self._managed_objects(bus)).items():
            props = ifaces.get(_DEVICE_IFACE)
            if props is None:
                continue
            adapter = props.get("Adapter")
            connected = props.get("Connected")
            if (
                isinstance(adapter, Variant)
                and adapter.value == self._adapter_path
                and isinstance(connected, Variant)
                and connected.value
            ):
                out.append(path)
        return out

    async def _unregister(self, bus: MessageBus) -> None:
        for iface, member, path in (
            ("org.bluez.LEAdvertisingManager1", "UnregisterAdvertisement", self._adv_path),
            ("org.bluez.GattManager1", "UnregisterApplication", self._root),
        ):
            try:
                await self._call(bus, self._adapter_path, iface, member, "o", [path])
            except TransportError as exc:
                log.warning("%s: %s", self.local_name, exc)

    async def _call(
        self,
        bus: MessageBus,
        path: str,
        interface: str,
        member: str,
        signature: str,
        body: list[Any],
    ) -> list[Any]:
        reply = await bus.call(
            Message(
                destination=_BLUEZ,
                path=path,
                interface=interface,
                member=member,
                signature=signature,
                body=body,
            )
        )
        if reply is None or reply.message_type != MessageType.METHOD_RETURN:
            detail = "no reply" if reply is None else f"{reply.error_name}: {reply.body}"
            raise TransportError(f"VM-1 BLE simulator: BlueZ {member} on {path} failed: {detail}")
        result: list[Any] = reply.body
        return result
