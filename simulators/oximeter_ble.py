"""Simulated BLE pulse oximeters (PLX and BerryMed) through the standard BlueZ D-Bus API.

Like :mod:`simulators.vm1_ble` (whose GATT object classes are reused here):
each simulator connects to the system bus with dbus-fast (``DBUS_SYSTEM_BUS_ADDRESS``
is honoured), exports a GATT application and an LE advertisement and registers
both on one adapter (``org.bluez.GattManager1.RegisterApplication``,
``org.bluez.LEAdvertisingManager1.RegisterAdvertisement``). Against real BlueZ
that is a peripheral other machines can connect to; in the tests it runs on a
bluezoo adapter while the gateway's bleak client uses another (bluezoo
reports one advertisement per adapter, so each simulated device needs an
adapter of its own).

What is sent comes from the physiology model (:class:`~simulators.physiology.PhysioModel`)
through the protocol simulators of :mod:`simulators.oximeter_sim`, which use
the production codecs' encoders; time comes only from the injected
:class:`~devicegw.clock.Clock` (scenario time = ``clock.monotonic()`` minus its
value at :meth:`start`). A value due while no central is subscribed, or while
the device is away, is lost and counted (``counters``), as on a real radio.

:class:`PlxBleSimulator` (Bluetooth SIG Pulse Oximeter Service 0x1822):

- PLX Continuous Measurement 0x2A5F (notify): one value per second
  (:class:`~simulators.oximeter_sim.PlxSim`);
- PLX Spot-check Measurement 0x2A5E (indicate), only when
  ``spot_check_interval_s`` is given: every that many seconds, the reading of
  that second with a timestamp (``clock.now()``, UTC) and the same status fields;
- PLX Features 0x2A60 (read): measurement status and device/sensor status
  support (exactly the bits the simulator uses), PAI, and spot-check
  timestamps when spot-checks are offered;
- advertised name ``<model> <serial_no>`` unless ``local_name`` is given.

:class:`BerryMedBleSimulator` (BerryMed BCI, "transparent UART" service):
100 packets/s (:class:`~simulators.oximeter_sim.BerryMedSim`) as one byte
stream cut into notifications of ``chunk_bytes`` (default 20: a 23-byte ATT
MTU; a size that is not a multiple of 5 makes packets straddle
notifications, which the gateway's stream decoder must handle). Bytes of an
incomplete chunk wait for the next tick. Advertised name ``BerryMed`` unless
``local_name`` is given (BM1000-series devices advertise that name, so
several on one ward are told apart by address).

Both offer Device Information (manufacturer :data:`MANUFACTURER`, model and
serial from the scenario) and Battery Level 0x2A19 (read, notify; from the
model's battery; 100 on mains). :meth:`go_away` drops every connection,
stops advertising and removes the GATT application (the model keeps
running, values meanwhile are lost); :meth:`come_back` registers both again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from dbus_fast import BusType, DBusError, Message, MessageType, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.service import ServiceInterface

from devicegw.clock import Clock
from devicegw.errors import ScenarioError, TransportError
from drivers.oximeter import plx
from drivers.oximeter.berrymed import BERRYMED_NOTIFY_CHAR_UUID, BERRYMED_SERVICE_UUID
from drivers.oximeter.plx import (
    DeviceSensorStatus,
    MeasurementStatus,
    PlxDateTime,
    PlxFeatures,
    PlxSpotCheckMeasurement,
    SupportedFeatures,
)
from drivers.transport.ble_link import (
    BATTERY_LEVEL_UUID,
    BATTERY_SERVICE_UUID,
    DEVICE_INFORMATION_UUID,
    FIRMWARE_REVISION_UUID,
    MANUFACTURER_NAME_UUID,
    MODEL_NUMBER_UUID,
    SERIAL_NUMBER_UUID,
)
from simulators.oximeter_scenario import OximeterScenario
from simulators.oximeter_sim import BerryMedSim, PlxSim
from simulators.physiology import PhysioModel
from simulators.vm1_ble import (
    _ADAPTER_IFACE,
    _BLUEZ,
    _DEVICE_IFACE,
    MIN_REAL_SLEEP_S,
    _Advertisement,
    _Characteristic,
    _Service,
)

__all__ = [
    "MANUFACTURER",
    "BerryMedBleSimulator",
    "OximeterBleCounters",
    "PlxBleSimulator",
]

log = logging.getLogger(__name__)

MANUFACTURER = "devicegw oximeter simulator"
#: Device time between two rounds of the BerryMed run loop (25 bytes of stream per round).
TICK_S = 0.05

_PLX_MS_SUPPORT = (
    MeasurementStatus.MEASUREMENT_ONGOING
    | MeasurementStatus.QUESTIONABLE_MEASUREMENT_DETECTED
    | MeasurementStatus.MEASUREMENT_UNAVAILABLE
)
_PLX_DSS_SUPPORT = (
    DeviceSensorStatus.ERRATIC_SIGNAL_DETECTED
    | DeviceSensorStatus.SIGNAL_PROCESSING_IRREGULARITY_DETECTED
    | DeviceSensorStatus.LOW_PERFUSION_DETECTED
    | DeviceSensorStatus.SENSOR_UNCONNECTED_TO_USER
    | DeviceSensorStatus.SENSOR_DISCONNECTED
)


@dataclass(slots=True)
class OximeterBleCounters:
    """What went over (or did not go over) the simulated radio."""

    notifications_sent: int = 0  # notifications and indications emitted to a subscriber
    values_lost: int = 0  # due while nobody was subscribed (or while away)
    bytes_sent: int = 0  # BerryMed stream bytes notified
    bytes_lost: int = 0
    spot_checks_sent: int = 0
    disconnects_forced: int = 0


# --------------------------------------------------------------------------- common part


class _OximeterPeripheral:
    """GATT application + advertisement on one adapter, a run loop on the clock."""

    kind = "oximeter"
    protocol = ""

    def __init__(
        self,
        scenario: OximeterScenario,
        *,
        clock: Clock,
        adapter: str,
        bus_address: str | None,
        local_name: str,
        service_uuid: str,
        model: PhysioModel | None,
    ) -> None:
        if scenario.oximeter.protocol != self.protocol:
            raise ScenarioError(
                f"{scenario.name}: oximeter.protocol is {scenario.oximeter.protocol!r}; "
                f"this simulator speaks {self.protocol!r}"
            )
        self.scenario = scenario
        self.model = model if model is not None else PhysioModel(scenario)
        self.counters = OximeterBleCounters()
        self.adapter = adapter
        self.local_name = local_name
        self._clock = clock
        self._bus_address = bus_address
        self._adapter_path = f"/org/bluez/{adapter}"
        serial = "".join(c if c.isalnum() else "_" for c in scenario.oximeter.serial_no)
        self._root = f"/org/devicegw/{self.protocol}sim/{serial}"
        self._adv_path = f"{self._root}/advertisement0"
        self._bus: MessageBus | None = None
        self._task: asyncio.Task[None] | None = None
        self._t0 = 0.0
        self._sent_until = 0.0
        self._present = False
        self._battery_level: int | None = None
        # Subclasses add their service first, then call _build_common_gatt().
        self._chars: list[_Characteristic] = []
        self._exports: list[tuple[str, ServiceInterface]] = []
        self._service_uuid = service_uuid
        self.battery = _Characteristic(
            BATTERY_LEVEL_UUID, f"{self._root}/service9", ["read", "notify"]
        )

    # ------------------------------------------------------------------ public API

    @property
    def present(self) -> bool:
        """Advertising and connectable (False while :meth:`go_away` is in effect)."""
        return self._present

    def device_time(self) -> float:
        """Seconds since :meth:`start` on the injected clock (scenario time)."""
        return self._clock.monotonic() - self._t0

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("simulator already started")
        self._t0 = self._clock.monotonic()
        self._sent_until = 0.0
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
        self._task = asyncio.create_task(self._run(), name=f"{self.kind} {self.local_name}")

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
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
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

    def _build_common_gatt(self) -> None:
        """Device Information, Battery and the advertisement (after the subclass's service)."""
        ox = self.scenario.oximeter
        dis = f"{self._root}/service8"
        bas = f"{self._root}/service9"
        info = [
            (MANUFACTURER_NAME_UUID, MANUFACTURER),
            (MODEL_NUMBER_UUID, ox.model),
            (SERIAL_NUMBER_UUID, ox.serial_no),
            (FIRMWARE_REVISION_UUID, f"{ox.firmware_revision}"),
        ]
        self.battery.value = bytes([self._battery_pct(0.0)])
        self._exports.append((dis, _Service(DEVICE_INFORMATION_UUID)))
        self._exports += [
            (f"{dis}/char{i}", _Characteristic(uuid, dis, ["read"], text.encode("ascii")))
            for i, (uuid, text) in enumerate(info)
        ]
        self._exports += [(bas, _Service(BATTERY_SERVICE_UUID)), (f"{bas}/char0", self.battery)]
        self._chars.append(self.battery)
        self._exports.append(
            (self._adv_path, _Advertisement(self.local_name, [self._service_uuid]))
        )

    def _battery_pct(self, t: float) -> int:
        return max(0, min(100, math.ceil(self.model.battery_at(t))))

    # ------------------------------------------------------------------ run loop

    async def _run(self) -> None:
        clock = self._clock
        min_sleep = MIN_REAL_SLEEP_S * clock.scale if math.isfinite(clock.scale) else 0.0
        while True:
            now = self.device_time()
            if now > self._sent_until:
                self._transmit(self._sent_until, now)
                self._sent_until = now
                level = self._battery_pct(now)
                if level != self._battery_level:
                    self._battery_level = level
                    self.battery.send(bytes([level]))
            await clock.sleep(max(self._next_due(now) - now, min_sleep))

    def _transmit(self, t0: float, t1: float) -> None:
        """Send what is due in [t0, t1) of scenario time."""
        raise NotImplementedError

    def _next_due(self, now: float) -> float:
        return now + TICK_S

    def _send(self, char: _Characteristic, value: bytes) -> bool:
        sent = self._present and char.send(value)
        if sent:
            self.counters.notifications_sent += 1
        else:
            self.counters.values_lost += 1
        return sent

    # ------------------------------------------------------------------ BlueZ calls

    def _what(self) -> str:
        return f"{self.kind} BLE simulator {self.local_name!r}"

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
            raise TransportError(f"{self._what()}: BlueZ {member} on {path} failed: {detail}")
        result: list[Any] = reply.body
        return result


# --------------------------------------------------------------------------- PLX


class PlxBleSimulator(_OximeterPeripheral):
    """A PLX (0x1822) oximeter for a ``protocol = "plx"`` scenario; module docstring.

    Use as ``async with PlxBleSimulator(scenario, clock=clock, adapter="hci0") as sim:``.
    """

    kind = "PLX oximeter"
    protocol = "plx"

    def __init__(
        self,
        scenario: OximeterScenario,
        *,
        clock: Clock,
        adapter: str = "hci0",
        bus_address: str | None = None,
        local_name: str | None = None,
        spot_check_interval_s: float | None = None,
        model: PhysioModel | None = None,
    ) -> None:
        ox = scenario.oximeter
        super().__init__(
            scenario,
            clock=clock,
            adapter=adapter,
            bus_address=bus_address,
            local_name=local_name or f"{ox.model} {ox.serial_no}",
            service_uuid=plx.PLX_SERVICE_UUID,
            model=model,
        )
        if spot_check_interval_s is not None and not spot_check_interval_s > 0:
            raise ValueError("spot_check_interval_s must be positive")
        self.sim = PlxSim(self.model)
        self.spot_check_interval_s = spot_check_interval_s
        self.features = PlxFeatures(
            supported=(
                SupportedFeatures.MEASUREMENT_STATUS_SUPPORT
                | SupportedFeatures.DEVICE_AND_SENSOR_STATUS_SUPPORT
                | SupportedFeatures.PULSE_AMPLITUDE_INDEX
                | (
                    SupportedFeatures.TIMESTAMP_FOR_SPOT_CHECK
                    if spot_check_interval_s is not None
                    else SupportedFeatures(0)
                )
            ),
            measurement_status_support=_PLX_MS_SUPPORT,
            device_sensor_status_support=_PLX_DSS_SUPPORT,
        )
        svc = f"{self._root}/service0"
        self.continuous = _Characteristic(plx.PLX_CONTINUOUS_MEASUREMENT_UUID, svc, ["notify"])
        self.spot_check = _Characteristic(plx.PLX_SPOT_CHECK_MEASUREMENT_UUID, svc, ["indicate"])
        features = _Characteristic(
            plx.PLX_FEATURES_UUID, svc, ["read"], plx.encode_features(self.features)
        )
        chars = [self.continuous, features]
        if spot_check_interval_s is not None:
            chars.insert(0, self.spot_check)
        self._chars += [self.continuous, self.spot_check]
        self._exports.append((svc, _Service(plx.PLX_SERVICE_UUID)))
        self._exports += [(f"{svc}/char{i}", c) for i, c in enumerate(chars)]
        self._build_common_gatt()

    def _transmit(self, t0: float, t1: float) -> None:
        for _, value in self.sim.timed_frames_between(t0, t1):
            self._send(self.continuous, value)
        interval = self.spot_check_interval_s
        if interval is None:
            return
        first = math.ceil(t0 / interval - 1e-9)
        for k in range(max(first, 1), math.ceil(t1 / interval - 1e-9)):
            msg = self.sim.measurement(math.floor(k * interval * self.sim.rate_hz))
            if msg is None:
                continue  # battery empty: nothing sent
            now = self._clock.now()
            spot = PlxSpotCheckMeasurement(
                reading=msg.normal,
                timestamp=PlxDateTime(
                    now.year, now.month, now.day, now.hour, now.minute, now.second
                ),
                measurement_status=msg.measurement_status,
                device_sensor_status=msg.device_sensor_status,
                pulse_amplitude_index=msg.pulse_amplitude_index,
            )
            if self._send(self.spot_check, plx.encode_spot_check(spot)):
                self.counters.spot_checks_sent += 1

    def _next_due(self, now: float) -> float:
        """The next Continuous Measurement (or spot-check) is due at its grid time."""
        period = 1.0 / self.sim.rate_hz
        due = (math.floor(now / period + 1e-9) + 1) * period
        if self.spot_check_interval_s is not None:
            interval = self.spot_check_interval_s
            due = min(due, (math.floor(now / interval + 1e-9) + 1) * interval)
        return due


# --------------------------------------------------------------------------- BerryMed


class BerryMedBleSimulator(_OximeterPeripheral):
    """A BerryMed BCI oximeter for a ``protocol = "berrymed"`` scenario; module docstring."""

    kind = "BerryMed oximeter"
    protocol = "berrymed"

    def __init__(
        self,
        scenario: OximeterScenario,
        *,
        clock: Clock,
        adapter: str = "hci0",
        bus_address: str | None = None,
        local_name: str | None = None,
        chunk_bytes: int = 20,
        model: PhysioModel | None = None,
    ) -> None:
        super().__init__(
            scenario,
            clock=clock,
            adapter=adapter,
            bus_address=bus_address,
            local_name=local_name or "BerryMed",
            service_uuid=BERRYMED_SERVICE_UUID,
            model=model,
        )
        if not 1 <= chunk_bytes <= 512:
            raise ValueError("chunk_bytes must be 1-512 (an ATT value)")
        self.sim = BerryMedSim(self.model)
        self.chunk_bytes = chunk_bytes
        self._pending = bytearray()
        svc = f"{self._root}/service0"
        self.stream = _Characteristic(BERRYMED_NOTIFY_CHAR_UUID, svc, ["notify"])
        self._chars.append(self.stream)
        self._exports.append((svc, _Service(BERRYMED_SERVICE_UUID)))
        self._exports.append((f"{svc}/char0", self.stream))
        self._build_common_gatt()

    def _transmit(self, t0: float, t1: float) -> None:
        data = self.sim.frames_between(t0, t1)
        if not (self._present and self.stream.notifying):
            # Nobody listens: the bytes go into the void (and so does a partial chunk).
            self.counters.bytes_lost += len(self._pending) + len(data)
            self.counters.values_lost += (len(self._pending) + len(data)) // self.chunk_bytes
            self._pending.clear()
            return
        self._pending += data
        n = self.chunk_bytes
        while len(self._pending) >= n:
            chunk = bytes(self._pending[:n])
            del self._pending[:n]
            if self._send(self.stream, chunk):
                self.counters.bytes_sent += n
            else:
                self.counters.bytes_lost += n
