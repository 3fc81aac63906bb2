"""The BlueZ side every simulated BLE peripheral shares (the VM-1 and the oximeters).

GATT objects exported with dbus-fast, and a base class that registers them on
one adapter as a GATT application (``org.bluez.GattManager1``) and an
advertisement (``org.bluez.LEAdvertisingManager1``), drops connections on
:meth:`~BlePeripheral.go_away` and registers again on
:meth:`~BlePeripheral.come_back`. What a device sends, and when, stays in its
own module.
"""

# No ``from __future__ import annotations``: dbus-fast reads the D-Bus signatures from
# the annotations, and a postponed ``-> None`` would reach it as the string "None".
import asyncio
import contextlib
import logging
from abc import abstractmethod
from collections.abc import Callable
from typing import Annotated, Any, Protocol

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

from drivers.clock import Clock
from drivers.errors import TransportError
from simulators.lifecycle import ClockedSimulator

__all__ = [
    "Advertisement",
    "BlePeripheral",
    "GattCharacteristic",
    "GattService",
]

BLUEZ = "org.bluez"
ADAPTER_IFACE = "org.bluez.Adapter1"
DEVICE_IFACE = "org.bluez.Device1"

DBusStrList = Annotated[list[str], DBusSignature("as")]


# --------------------------------------------------------------------------- GATT objects


class GattService(ServiceInterface):
    def __init__(self, uuid: str) -> None:
        super().__init__("org.bluez.GattService1")
        self._uuid = uuid

    @dbus_property(access=PropertyAccess.READ)
    def UUID(self) -> DBusStr:
        return self._uuid

    @dbus_property(access=PropertyAccess.READ)
    def Primary(self) -> DBusBool:
        return True


class GattCharacteristic(ServiceInterface):
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


class Advertisement(ServiceInterface):
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


# --------------------------------------------------------------------------- peripheral


class RadioCounters(Protocol):
    """The counters :class:`BlePeripheral` keeps; each device's counters have more."""

    notifications_sent: int
    values_lost: int
    disconnects_forced: int


class BlePeripheral(ClockedSimulator):
    """A GATT application + advertisement on one adapter, with a run loop on the clock.

    Subclasses fill :attr:`_exports` (GATT objects and the advertisement at
    :attr:`_adv_path`) and :attr:`_chars` (what :meth:`go_away` unsubscribes)
    in their ``__init__``, and provide the run loop.
    """

    counters: RadioCounters

    def __init__(
        self,
        *,
        clock: Clock,
        adapter: str,
        bus_address: str | None,
        local_name: str,
        app_name: str,
        serial_no: str,
    ) -> None:
        self.adapter = adapter
        self.local_name = local_name
        self._clock = clock
        self._bus_address = bus_address
        self._adapter_path = f"/org/bluez/{adapter}"
        serial = "".join(c if c.isalnum() else "_" for c in serial_no)
        self._root = f"/org/devicegw/{app_name}/{serial}"
        self._adv_path = f"{self._root}/advertisement0"
        self._bus: MessageBus | None = None
        self._task: asyncio.Task[None] | None = None
        self._t0 = 0.0
        self._present = False
        self._chars: list[GattCharacteristic] = []
        self._exports: list[tuple[str, ServiceInterface]] = []
        # The subclass's module: log lines keep the name they had before this class existed.
        self._log = logging.getLogger(type(self).__module__)

    # ------------------------------------------------------------------ public API

    @property
    def present(self) -> bool:
        """Advertising and connectable (False while :meth:`go_away` is in effect)."""
        return self._present

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("simulator already started")
        self._t0 = self._clock.monotonic()
        self._power_on()
        try:
            if self._bus_address is not None:
                bus = MessageBus(bus_address=self._bus_address, bus_type=BusType.SYSTEM)
            else:
                bus = MessageBus(bus_type=BusType.SYSTEM)
            self._bus = await bus.connect()
        except (OSError, EOFError, DBusError) as exc:
            raise TransportError(f"{self._what()}: cannot reach D-Bus: {exc}") from exc
        await self._require_adapter()
        for path, iface in self._exports:
            self._bus.export(path, iface)
        await self.come_back()
        self._task = asyncio.create_task(self._run(), name=self._task_name())

    async def close(self) -> None:
        await self._stop_task()
        bus, self._bus = self._bus, None
        if bus is not None:
            if self._present:
                with contextlib.suppress(TransportError):
                    await self._unregister(bus)
            self._present = False
            bus.disconnect()

    async def go_away(self) -> None:
        """Leave radio range: drop connections, stop advertising, remove the GATT app."""
        bus = self._require_bus()
        if not self._present:
            return
        self._present = False
        for char in self._chars:
            char.notifying = False
        for device_path in await self._connected_devices(bus):
            await self._call(bus, device_path, DEVICE_IFACE, "Disconnect", "", [])
            self.counters.disconnects_forced += 1
        await self._unregister(bus)
        self._log.info("%s: gone away", self.local_name)

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
        self._log.info("%s: advertising on %s", self.local_name, self.adapter)

    # ------------------------------------------------------------------ subclass hooks

    @abstractmethod
    def _power_on(self) -> None:
        """Reset the device's own state at device time 0 (before D-Bus is reached)."""

    @abstractmethod
    async def _run(self) -> None: ...

    @abstractmethod
    def _what(self) -> str:
        """How errors name this simulator."""

    @abstractmethod
    def _task_name(self) -> str: ...

    def _send(self, char: GattCharacteristic, value: bytes) -> bool:
        """Notify/indicate ``value``; counted as sent, or lost when away or unsubscribed."""
        sent = self._present and char.send(value)
        if sent:
            self.counters.notifications_sent += 1
        else:
            self.counters.values_lost += 1
        return sent

    # ------------------------------------------------------------------ BlueZ calls

    def _require_bus(self) -> MessageBus:
        if self._bus is None:
            raise RuntimeError("simulator not started")
        return self._bus

    async def _require_adapter(self) -> None:
        bus = self._require_bus()
        objects = await self._managed_objects(bus)
        if ADAPTER_IFACE not in objects.get(self._adapter_path, {}):
            adapters = sorted(p for p, i in objects.items() if ADAPTER_IFACE in i)
            raise TransportError(
                f"{self._what()}: Bluetooth adapter {self.adapter} not found "
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
            props = ifaces.get(DEVICE_IFACE)
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
                self._log.warning("%s: %s", self.local_name, exc)

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
                destination=BLUEZ,
                path=path,
                interface=interface,
                member=member,
                signature=signature,
                body=body,
            )
        )
        if reply is None or reply.message_type != MessageType.METHOD_RETURN:
            detail = "no reply" if reply is None else f"{reply.error_name}: {reply.body}"
            raise TransportError(f"{self._what()}: BlueZ {member} on {path} failed: {detail}")
        result: list[Any] = reply.body
        return result
