"""Simulated BLE pulse oximeters (PLX and BerryMed) through the standard BlueZ D-Bus API.

Like :mod:`simulators.vm1_ble` (both are :class:`~simulators.ble_peripheral.BlePeripheral`):
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
:class:`~drivers.clock.Clock` (scenario time = ``clock.monotonic()`` minus its
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

import math
from dataclasses import dataclass
from typing import Self

from drivers.clock import Clock
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
from simulators.ble_peripheral import (
    Advertisement,
    BlePeripheral,
    GattCharacteristic,
    GattService,
)
from simulators.errors import ScenarioError
from simulators.oximeter_scenario import OximeterScenario
from simulators.oximeter_sim import BerryMedSim, PlxSim
from simulators.physiology import PhysioModel

__all__ = [
    "MANUFACTURER",
    "BerryMedBleSimulator",
    "OximeterBleCounters",
    "PlxBleSimulator",
]

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


class _OximeterPeripheral(BlePeripheral):
    """A physiology model sent on the clock; what the PLX and BerryMed simulators share."""

    kind = "oximeter"
    protocol = ""
    counters: OximeterBleCounters

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
        super().__init__(
            clock=clock,
            adapter=adapter,
            bus_address=bus_address,
            local_name=local_name,
            app_name=f"{self.protocol}sim",
            serial_no=scenario.oximeter.serial_no,
        )
        self.scenario = scenario
        self.model = model if model is not None else PhysioModel(scenario)
        self.counters = OximeterBleCounters()
        self._sent_until = 0.0
        self._battery_level: int | None = None
        # Subclasses add their service first, then call _build_common_gatt().
        self._service_uuid = service_uuid
        self.battery = GattCharacteristic(
            BATTERY_LEVEL_UUID, f"{self._root}/service9", ["read", "notify"]
        )

    async def __aenter__(self) -> Self:
        """As the base, but a failed start also closes what it opened (the D-Bus connection)."""
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    def _power_on(self) -> None:
        self._sent_until = 0.0

    def _what(self) -> str:
        return f"{self.kind} BLE simulator {self.local_name!r}"

    def _task_name(self) -> str:
        return f"{self.kind} {self.local_name}"

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
        self._exports.append((dis, GattService(DEVICE_INFORMATION_UUID)))
        self._exports += [
            (f"{dis}/char{i}", GattCharacteristic(uuid, dis, ["read"], text.encode("ascii")))
            for i, (uuid, text) in enumerate(info)
        ]
        self._exports += [(bas, GattService(BATTERY_SERVICE_UUID)), (f"{bas}/char0", self.battery)]
        self._chars.append(self.battery)
        self._exports.append((self._adv_path, Advertisement(self.local_name, [self._service_uuid])))

    def _battery_pct(self, t: float) -> int:
        return max(0, min(100, math.ceil(self.model.battery_at(t))))

    # ------------------------------------------------------------------ run loop

    async def _run(self) -> None:
        clock = self._clock
        min_sleep = self._min_sleep()
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
        self.continuous = GattCharacteristic(plx.PLX_CONTINUOUS_MEASUREMENT_UUID, svc, ["notify"])
        self.spot_check = GattCharacteristic(plx.PLX_SPOT_CHECK_MEASUREMENT_UUID, svc, ["indicate"])
        features = GattCharacteristic(
            plx.PLX_FEATURES_UUID, svc, ["read"], plx.encode_features(self.features)
        )
        chars = [self.continuous, features]
        if spot_check_interval_s is not None:
            chars.insert(0, self.spot_check)
        self._chars += [self.continuous, self.spot_check]
        self._exports.append((svc, GattService(plx.PLX_SERVICE_UUID)))
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
        self.stream = GattCharacteristic(BERRYMED_NOTIFY_CHAR_UUID, svc, ["notify"])
        self._chars.append(self.stream)
        self._exports.append((svc, GattService(BERRYMED_SERVICE_UUID)))
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
