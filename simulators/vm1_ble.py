"""A simulated VM-1 offered over Bluetooth LE through the standard BlueZ D-Bus API.

The same :class:`~simulators.vm1_model.Vm1Model` as the serial simulator,
driven by the injected :class:`~drivers.clock.Clock`, registered on one
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

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from dbus_fast import DBusError
from dbus_fast.service import ServiceInterface

from drivers.clock import Clock
from drivers.errors import ProtocolError
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
from simulators.ble_peripheral import (
    Advertisement,
    BlePeripheral,
    GattCharacteristic,
    GattService,
)
from simulators.lifecycle import MIN_REAL_SLEEP_S
from simulators.scenario import Scenario
from simulators.vm1_model import Vm1Model

__all__ = ["MANUFACTURER", "MIN_REAL_SLEEP_S", "BleSimCounters", "Vm1BleSimulator"]

MANUFACTURER = "devicegw VM-1 simulator"

_HOST_COMMANDS = (GetInfo, SetClock, Start, Stop, Ping, SetRate, GetSession)
_COMMAND_TYPE_BYTES = frozenset(int(t) for t in MsgType if t & 0x80)


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


# --------------------------------------------------------------------------- simulator


class Vm1BleSimulator(BlePeripheral):
    """A :class:`Vm1Model` running a :class:`Scenario`, advertised as ``VM-1 <serial>``.

    Use as ``async with Vm1BleSimulator(scenario, clock=clock) as sim:``. The bus is
    the system bus (``DBUS_SYSTEM_BUS_ADDRESS`` is honoured) unless ``bus_address``
    is given.
    """

    counters: BleSimCounters

    def __init__(
        self,
        scenario: Scenario,
        *,
        clock: Clock,
        adapter: str = "hci0",
        bus_address: str | None = None,
        model: Vm1Model | None = None,
    ) -> None:
        super().__init__(
            clock=clock,
            adapter=adapter,
            bus_address=bus_address,
            local_name=vm1_local_name(scenario.device.serial_no),
            app_name="vm1sim",
            serial_no=scenario.device.serial_no,
        )
        self.scenario = scenario
        self.model = model if model is not None else Vm1Model.from_scenario(scenario)
        self.counters = BleSimCounters()
        self._wake: asyncio.Future[None] | None = None
        self._ident_waiting: bytes | None = None
        self._battery_level: int | None = None
        self._build_gatt()

    def _power_on(self) -> None:
        self._ident_waiting = encode_payload(self.model.ident_message(0.0))  # power-up IDENT

    def _what(self) -> str:
        return "VM-1 BLE simulator"

    def _task_name(self) -> str:
        return f"vm1-ble-sim {self.local_name}"

    # ------------------------------------------------------------------ GATT layout

    def _build_gatt(self) -> None:
        dev = self.scenario.device
        root = self._root
        vm1 = f"{root}/service0"
        dis = f"{root}/service1"
        bas = f"{root}/service2"
        self.ident = GattCharacteristic(VM1_IDENT_UUID, vm1, ["read"], on_read=self._read_ident)
        self.status = GattCharacteristic(VM1_STATUS_UUID, vm1, ["read", "notify"])
        self.output = GattCharacteristic(VM1_OUTPUT_UUID, vm1, ["notify"])
        self.events = GattCharacteristic(VM1_EVENTS_UUID, vm1, ["indicate"])
        self.control_point = GattCharacteristic(
            VM1_CONTROL_POINT_UUID, vm1, ["write", "indicate"], on_write=self._on_command
        )
        self.battery = GattCharacteristic(
            BATTERY_LEVEL_UUID, bas, ["read", "notify"], bytes([self._battery_pct()])
        )
        info = [
            (MANUFACTURER_NAME_UUID, MANUFACTURER),
            (MODEL_NUMBER_UUID, dev.model),
            (SERIAL_NUMBER_UUID, dev.serial_no),
            (FIRMWARE_REVISION_UUID, dev.firmware),
        ]
        self._chars = [self.ident, self.status, self.output, self.events, self.control_point]
        exports: list[tuple[str, ServiceInterface]] = [(vm1, GattService(VM1_SERVICE_UUID))]
        exports += [(f"{vm1}/char{i}", c) for i, c in enumerate(self._chars)]
        exports.append((dis, GattService(DEVICE_INFORMATION_UUID)))
        exports += [
            (f"{dis}/char{i}", GattCharacteristic(uuid, dis, ["read"], text.encode("ascii")))
            for i, (uuid, text) in enumerate(info)
        ]
        exports += [(bas, GattService(BATTERY_SERVICE_UUID)), (f"{bas}/char0", self.battery)]
        self._chars.append(self.battery)
        exports.append((self._adv_path, Advertisement(self.local_name, [VM1_SERVICE_UUID])))
        self._exports = exports

    def _battery_pct(self) -> int:
        pct = self.model.battery_pct
        return 100 if pct is None else pct

    # ------------------------------------------------------------------ run loop

    async def _run(self) -> None:
        clock = self._clock
        min_sleep = self._min_sleep()
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
                    if self._present:
                        self.battery.send(bytes([level]))  # not counted: not a VM-1 message
            elif isinstance(msg, Output):
                self._send(self.output, payload)
            elif isinstance(msg, SessionStart | SessionEnd | Alarm | SessionRecord):
                self._send(self.events, payload)
            elif isinstance(msg, Ack):
                self._send(self.control_point, payload)

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
