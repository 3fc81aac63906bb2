"""Bluetooth SIG Pulse Oximeter Service (PLXS 1.0.1, 0x1822): characteristic codecs.

Covers PLX Spot-check Measurement (0x2A5E), PLX Continuous Measurement
(0x2A5F) and PLX Features (0x2A60). Decoders take one characteristic value
(a BLE notification/indication is always one whole value, so there is no
stream decoder here) and raise :class:`ProtocolError` when it is malformed;
encoders serve the simulator. All multi-byte fields are little-endian and
SpO2, pulse rate and PAI are IEEE 11073 SFLOATs (:mod:`.sfloat`).

Layouts implemented (bit 0 = least significant):

Continuous flags: 0 SpO2PR-Fast present, 1 SpO2PR-Slow present,
2 Measurement Status present, 3 Device and Sensor Status present,
4 Pulse Amplitude Index present, 5-7 RFU. Fields in that order after
SpO2PR-Normal (SpO2 then PR).

Spot-check flags: 0 Timestamp present, 1 Measurement Status present,
2 Device and Sensor Status present, 3 PAI present, 4 device clock is not
set, 5-7 RFU. Fields: SpO2PR, Timestamp (Date Time: year u16, month, day,
hours, minutes, seconds; 0 year/month/day = unknown), status, D&S status, PAI.

Measurement Status (u16): 0-4 RFU, 5 measurement ongoing, 6 early estimated
data, 7 validated data, 8 fully qualified data, 9 data from measurement
storage, 10 data for demonstration, 11 data for testing, 12 calibration
ongoing, 13 measurement unavailable, 14 questionable measurement detected,
15 invalid measurement detected.

Device and Sensor Status (u24): 0 extended display update ongoing,
1 equipment malfunction, 2 signal processing irregularity, 3 inadequate
signal, 4 poor signal, 5 low perfusion, 6 erratic signal, 7 non-pulsatile
signal, 8 questionable pulse, 9 signal analysis ongoing, 10 sensor
interference, 11 sensor unconnected to user, 12 unknown sensor connected,
13 sensor displaced, 14 sensor malfunctioning, 15 sensor disconnected,
16-23 RFU.

PLX Features: Supported Features u16 (0 measurement status support present,
1 device and sensor status support present, 2 spot-check measurement
storage, 3 spot-check timestamp, 4 SpO2PR-Fast, 5 SpO2PR-Slow, 6 PAI,
7 multiple bonds, 8-15 RFU), then Measurement Status Support u16 if bit 0,
then Device and Sensor Status Support u24 if bit 1.

Choices where the specification leaves room:

- RFU bits of the status fields are kept on the decoded flags (IntFlag keeps
  unknown bits), so a later revision's bit is passed on, not rejected.
- RFU flag bits are ignored. Bytes left over after the last field the flags
  announce are a ProtocolError *unless* an RFU flag bit is set: with only
  known bits set, extra bytes mean the flags and the payload disagree, but a
  future revision may append a field behind a new flag bit.
- A PAI field that is present but carries an SFLOAT special value decodes to
  ``None``, the same as an absent field, so it re-encodes as absent.
- Values are kept as sent (a SpO2 of 104 stays 104 on the measurement);
  :func:`to_sample` turns SpO2 outside 0-100 and negative pulse rates into
  "no value" with :attr:`QualityFlag.INVALID`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import IntFlag

from drivers.errors import ProtocolError
from drivers.oximeter.sample import OximeterSample, QualityFlag
from drivers.oximeter.sfloat import decode_sfloat, encode_sfloat

__all__ = [
    "PLX_CONTINUOUS_MEASUREMENT_UUID",
    "PLX_FEATURES_UUID",
    "PLX_SERVICE_UUID",
    "PLX_SPOT_CHECK_MEASUREMENT_UUID",
    "RECORD_ACCESS_CONTROL_POINT_UUID",
    "DeviceSensorStatus",
    "MeasurementStatus",
    "PlxContinuousMeasurement",
    "PlxDateTime",
    "PlxFeatures",
    "PlxSpotCheckMeasurement",
    "SpO2PR",
    "SupportedFeatures",
    "decode_continuous",
    "decode_features",
    "decode_spot_check",
    "encode_continuous",
    "encode_features",
    "encode_spot_check",
    "quality_flags",
    "to_sample",
]


def _sig_uuid(short: int) -> str:
    """Full 128-bit form of a SIG-assigned 16-bit UUID, as bleak reports it."""
    return f"0000{short:04x}-0000-1000-8000-00805f9b34fb"


PLX_SERVICE_UUID = _sig_uuid(0x1822)
PLX_SPOT_CHECK_MEASUREMENT_UUID = _sig_uuid(0x2A5E)
PLX_CONTINUOUS_MEASUREMENT_UUID = _sig_uuid(0x2A5F)
PLX_FEATURES_UUID = _sig_uuid(0x2A60)
RECORD_ACCESS_CONTROL_POINT_UUID = _sig_uuid(0x2A52)  # stored spot-checks, optional

SOURCE = "ble-plx"


class MeasurementStatus(IntFlag):
    """PLX Measurement Status (16 bits); bits 0-4 are RFU."""

    MEASUREMENT_ONGOING = 1 << 5
    EARLY_ESTIMATED_DATA = 1 << 6
    VALIDATED_DATA = 1 << 7
    FULLY_QUALIFIED_DATA = 1 << 8
    DATA_FROM_MEASUREMENT_STORAGE = 1 << 9
    DATA_FOR_DEMONSTRATION = 1 << 10
    DATA_FOR_TESTING = 1 << 11
    CALIBRATION_ONGOING = 1 << 12
    MEASUREMENT_UNAVAILABLE = 1 << 13
    QUESTIONABLE_MEASUREMENT_DETECTED = 1 << 14
    INVALID_MEASUREMENT_DETECTED = 1 << 15


class DeviceSensorStatus(IntFlag):
    """PLX Device and Sensor Status (24 bits); bits 16-23 are RFU."""

    EXTENDED_DISPLAY_UPDATE_ONGOING = 1 << 0
    EQUIPMENT_MALFUNCTION_DETECTED = 1 << 1
    SIGNAL_PROCESSING_IRREGULARITY_DETECTED = 1 << 2
    INADEQUATE_SIGNAL_DETECTED = 1 << 3
    POOR_SIGNAL_DETECTED = 1 << 4
    LOW_PERFUSION_DETECTED = 1 << 5
    ERRATIC_SIGNAL_DETECTED = 1 << 6
    NONPULSATILE_SIGNAL_DETECTED = 1 << 7
    QUESTIONABLE_PULSE_DETECTED = 1 << 8
    SIGNAL_ANALYSIS_ONGOING = 1 << 9
    SENSOR_INTERFERENCE_DETECTED = 1 << 10
    SENSOR_UNCONNECTED_TO_USER = 1 << 11
    UNKNOWN_SENSOR_CONNECTED = 1 << 12
    SENSOR_DISPLACED = 1 << 13
    SENSOR_MALFUNCTIONING = 1 << 14
    SENSOR_DISCONNECTED = 1 << 15


class SupportedFeatures(IntFlag):
    """PLX Features "Supported Features" (16 bits); bits 8-15 are RFU."""

    MEASUREMENT_STATUS_SUPPORT = 1 << 0
    DEVICE_AND_SENSOR_STATUS_SUPPORT = 1 << 1
    MEASUREMENT_STORAGE_FOR_SPOT_CHECK = 1 << 2
    TIMESTAMP_FOR_SPOT_CHECK = 1 << 3
    SPO2PR_FAST = 1 << 4
    SPO2PR_SLOW = 1 << 5
    PULSE_AMPLITUDE_INDEX = 1 << 6
    MULTIPLE_BONDS = 1 << 7


# Flags-byte bits.
_CONT_FAST = 0x01
_CONT_SLOW = 0x02
_CONT_STATUS = 0x04
_CONT_DSS = 0x08
_CONT_PAI = 0x10
_SPOT_TIMESTAMP = 0x01
_SPOT_STATUS = 0x02
_SPOT_DSS = 0x04
_SPOT_PAI = 0x08
_SPOT_CLOCK_NOT_SET = 0x10
_FLAGS_RFU = 0xE0
_FEATURES_RFU = 0xFF00

_U16 = 0xFFFF
_U24 = 0xFFFFFF


@dataclass(frozen=True, slots=True)
class SpO2PR:
    """One SpO2 (%) / pulse rate (bpm) pair; None where the device sent a special value."""

    spo2: float | None
    pulse_rate: float | None


@dataclass(frozen=True, slots=True)
class PlxDateTime:
    """Bluetooth Date Time; year, month and day 0 mean "not known" per the SIG definition."""

    year: int
    month: int
    day: int
    hours: int
    minutes: int
    seconds: int

    def to_datetime(self) -> datetime | None:
        """Naive device-local datetime, or None if the date is unknown or impossible."""
        if not (self.year and self.month and self.day):
            return None
        try:
            return datetime(self.year, self.month, self.day, self.hours, self.minutes, self.seconds)
        except ValueError:
            return None  # e.g. 31 February: the fields are in range, the date is not


@dataclass(frozen=True, slots=True, kw_only=True)
class PlxContinuousMeasurement:
    """PLX Continuous Measurement; absent optional fields are None."""

    normal: SpO2PR
    fast: SpO2PR | None = None
    slow: SpO2PR | None = None
    measurement_status: MeasurementStatus | None = None
    device_sensor_status: DeviceSensorStatus | None = None
    pulse_amplitude_index: float | None = None  # percent


@dataclass(frozen=True, slots=True, kw_only=True)
class PlxSpotCheckMeasurement:
    """PLX Spot-check Measurement; absent optional fields are None."""

    reading: SpO2PR
    timestamp: PlxDateTime | None = None
    measurement_status: MeasurementStatus | None = None
    device_sensor_status: DeviceSensorStatus | None = None
    pulse_amplitude_index: float | None = None  # percent
    device_clock_not_set: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class PlxFeatures:
    """PLX Features: what the sensor can report, read once after connecting."""

    supported: SupportedFeatures
    measurement_status_support: MeasurementStatus | None = None
    device_sensor_status_support: DeviceSensorStatus | None = None


# --------------------------------------------------------------------------- wire helpers


class _Reader:
    """Little-endian field reader that names the characteristic in every error."""

    __slots__ = ("_data", "_pos", "_what")

    def __init__(self, data: bytes | bytearray | memoryview, what: str) -> None:
        self._data = bytes(data)
        self._pos = 0
        self._what = what

    def _take(self, n: int, field: str) -> bytes:
        end = self._pos + n
        if end > len(self._data):
            raise ProtocolError(
                f"{self._what}: {len(self._data)} bytes end inside {field} (needs {end})"
            )
        chunk = self._data[self._pos : end]
        self._pos = end
        return chunk

    def uint(self, n: int, field: str) -> int:
        return int.from_bytes(self._take(n, field), "little")

    def sfloat(self, field: str) -> float | None:
        return decode_sfloat(self.uint(2, field))

    def spo2pr(self, field: str) -> SpO2PR:
        return SpO2PR(self.sfloat(f"{field} SpO2"), self.sfloat(f"{field} PR"))

    def finish(self, allow_trailing: bool) -> None:
        extra = len(self._data) - self._pos
        if extra and not allow_trailing:
            raise ProtocolError(
                f"{self._what}: {extra} byte(s) after the last field the flags announce"
            )


def _u(value: int, n: int, field: str) -> bytes:
    if not 0 <= value < 1 << (8 * n):
        raise ProtocolError(f"{field} {value!r} does not fit in {8 * n} bits")
    return value.to_bytes(n, "little")


def _sf(value: float | None) -> bytes:
    return encode_sfloat(value).to_bytes(2, "little")


def _pair(pair: SpO2PR) -> bytes:
    return _sf(pair.spo2) + _sf(pair.pulse_rate)


def _read_datetime(reader: _Reader) -> PlxDateTime:
    dt = PlxDateTime(
        year=reader.uint(2, "timestamp year"),
        month=reader.uint(1, "timestamp month"),
        day=reader.uint(1, "timestamp day"),
        hours=reader.uint(1, "timestamp hours"),
        minutes=reader.uint(1, "timestamp minutes"),
        seconds=reader.uint(1, "timestamp seconds"),
    )
    _check_datetime(dt)
    return dt


def _check_datetime(dt: PlxDateTime) -> None:
    """Date Time ranges: year 1582-9999 or 0, month 0-12, day 0-31, h 0-23, min/s 0-59."""
    ok = (
        (dt.year == 0 or 1582 <= dt.year <= 9999)
        and 0 <= dt.month <= 12
        and 0 <= dt.day <= 31
        and 0 <= dt.hours <= 23
        and 0 <= dt.minutes <= 59
        and 0 <= dt.seconds <= 59
    )
    if not ok:
        raise ProtocolError(f"spot-check timestamp out of range: {dt}")


def _encode_datetime(dt: PlxDateTime) -> bytes:
    _check_datetime(dt)
    return _u(dt.year, 2, "year") + bytes((dt.month, dt.day, dt.hours, dt.minutes, dt.seconds))


# --------------------------------------------------------------------------- continuous


def decode_continuous(data: bytes | bytearray | memoryview) -> PlxContinuousMeasurement:
    """PLX Continuous Measurement value -> measurement; ProtocolError if malformed."""
    reader = _Reader(data, "PLX Continuous Measurement")
    flags = reader.uint(1, "flags")
    normal = reader.spo2pr("SpO2PR-Normal")
    fast = reader.spo2pr("SpO2PR-Fast") if flags & _CONT_FAST else None
    slow = reader.spo2pr("SpO2PR-Slow") if flags & _CONT_SLOW else None
    status = (
        MeasurementStatus(reader.uint(2, "Measurement Status")) if flags & _CONT_STATUS else None
    )
    dss = (
        DeviceSensorStatus(reader.uint(3, "Device and Sensor Status"))
        if flags & _CONT_DSS
        else None
    )
    pai = reader.sfloat("Pulse Amplitude Index") if flags & _CONT_PAI else None
    reader.finish(allow_trailing=bool(flags & _FLAGS_RFU))
    return PlxContinuousMeasurement(
        normal=normal,
        fast=fast,
        slow=slow,
        measurement_status=status,
        device_sensor_status=dss,
        pulse_amplitude_index=pai,
    )


def encode_continuous(msg: PlxContinuousMeasurement) -> bytes:
    """Characteristic value for ``msg``; optional fields are sent when not None."""
    flags = 0
    body = _pair(msg.normal)
    if msg.fast is not None:
        flags |= _CONT_FAST
        body += _pair(msg.fast)
    if msg.slow is not None:
        flags |= _CONT_SLOW
        body += _pair(msg.slow)
    if msg.measurement_status is not None:
        flags |= _CONT_STATUS
        body += _u(int(msg.measurement_status), 2, "Measurement Status")
    if msg.device_sensor_status is not None:
        flags |= _CONT_DSS
        body += _u(int(msg.device_sensor_status), 3, "Device and Sensor Status")
    if msg.pulse_amplitude_index is not None:
        flags |= _CONT_PAI
        body += _sf(msg.pulse_amplitude_index)
    return bytes((flags,)) + body


# --------------------------------------------------------------------------- spot-check


def decode_spot_check(data: bytes | bytearray | memoryview) -> PlxSpotCheckMeasurement:
    """PLX Spot-check Measurement value -> measurement; ProtocolError if malformed."""
    reader = _Reader(data, "PLX Spot-check Measurement")
    flags = reader.uint(1, "flags")
    reading = reader.spo2pr("SpO2PR-Spot-check")
    timestamp = _read_datetime(reader) if flags & _SPOT_TIMESTAMP else None
    status = (
        MeasurementStatus(reader.uint(2, "Measurement Status")) if flags & _SPOT_STATUS else None
    )
    dss = (
        DeviceSensorStatus(reader.uint(3, "Device and Sensor Status"))
        if flags & _SPOT_DSS
        else None
    )
    pai = reader.sfloat("Pulse Amplitude Index") if flags & _SPOT_PAI else None
    reader.finish(allow_trailing=bool(flags & _FLAGS_RFU))
    return PlxSpotCheckMeasurement(
        reading=reading,
        timestamp=timestamp,
        measurement_status=status,
        device_sensor_status=dss,
        pulse_amplitude_index=pai,
        device_clock_not_set=bool(flags & _SPOT_CLOCK_NOT_SET),
    )


def encode_spot_check(msg: PlxSpotCheckMeasurement) -> bytes:
    """Characteristic value for ``msg``; optional fields are sent when not None."""
    flags = _SPOT_CLOCK_NOT_SET if msg.device_clock_not_set else 0
    body = _pair(msg.reading)
    if msg.timestamp is not None:
        flags |= _SPOT_TIMESTAMP
        body += _encode_datetime(msg.timestamp)
    if msg.measurement_status is not None:
        flags |= _SPOT_STATUS
        body += _u(int(msg.measurement_status), 2, "Measurement Status")
    if msg.device_sensor_status is not None:
        flags |= _SPOT_DSS
        body += _u(int(msg.device_sensor_status), 3, "Device and Sensor Status")
    if msg.pulse_amplitude_index is not None:
        flags |= _SPOT_PAI
        body += _sf(msg.pulse_amplitude_index)
    return bytes((flags,)) + body


# --------------------------------------------------------------------------- features


def decode_features(data: bytes | bytearray | memoryview) -> PlxFeatures:
    """PLX Features value -> features; ProtocolError if malformed."""
    reader = _Reader(data, "PLX Features")
    supported = SupportedFeatures(reader.uint(2, "Supported Features"))
    ms_support = (
        MeasurementStatus(reader.uint(2, "Measurement Status Support"))
        if supported & SupportedFeatures.MEASUREMENT_STATUS_SUPPORT
        else None
    )
    dss_support = (
        DeviceSensorStatus(reader.uint(3, "Device and Sensor Status Support"))
        if supported & SupportedFeatures.DEVICE_AND_SENSOR_STATUS_SUPPORT
        else None
    )
    reader.finish(allow_trailing=bool(int(supported) & _FEATURES_RFU))
    return PlxFeatures(
        supported=supported,
        measurement_status_support=ms_support,
        device_sensor_status_support=dss_support,
    )


def encode_features(msg: PlxFeatures) -> bytes:
    """Characteristic value for ``msg``; the support fields must match the feature bits."""
    supported = int(msg.supported)
    has_ms = bool(supported & SupportedFeatures.MEASUREMENT_STATUS_SUPPORT)
    has_dss = bool(supported & SupportedFeatures.DEVICE_AND_SENSOR_STATUS_SUPPORT)
    if has_ms != (msg.measurement_status_support is not None):
        raise ProtocolError("measurement_status_support must be given iff its feature bit is set")
    if has_dss != (msg.device_sensor_status_support is not None):
        raise ProtocolError("device_sensor_status_support must be given iff its feature bit is set")
    out = _u(supported, 2, "Supported Features")
    if msg.measurement_status_support is not None:
        out += _u(int(msg.measurement_status_support), 2, "Measurement Status Support")
    if msg.device_sensor_status_support is not None:
        out += _u(int(msg.device_sensor_status_support), 3, "Device and Sensor Status Support")
    return out


# --------------------------------------------------------------------------- samples

_MS_QUALITY: tuple[tuple[MeasurementStatus, QualityFlag], ...] = (
    (MeasurementStatus.EARLY_ESTIMATED_DATA, QualityFlag.EARLY_ESTIMATE),
    (MeasurementStatus.DATA_FROM_MEASUREMENT_STORAGE, QualityFlag.FROM_STORAGE),
    (MeasurementStatus.DATA_FOR_DEMONSTRATION, QualityFlag.TEST_DATA),
    (MeasurementStatus.DATA_FOR_TESTING, QualityFlag.TEST_DATA),
    (MeasurementStatus.CALIBRATION_ONGOING, QualityFlag.CALIBRATING),
    (MeasurementStatus.MEASUREMENT_UNAVAILABLE, QualityFlag.UNAVAILABLE),
    (MeasurementStatus.QUESTIONABLE_MEASUREMENT_DETECTED, QualityFlag.QUESTIONABLE),
    (MeasurementStatus.INVALID_MEASUREMENT_DETECTED, QualityFlag.INVALID),
)

_DSS_QUALITY: tuple[tuple[DeviceSensorStatus, QualityFlag], ...] = (
    (DeviceSensorStatus.EXTENDED_DISPLAY_UPDATE_ONGOING, QualityFlag.DISPLAY_HOLD),
    (DeviceSensorStatus.EQUIPMENT_MALFUNCTION_DETECTED, QualityFlag.EQUIPMENT_MALFUNCTION),
    (DeviceSensorStatus.SIGNAL_PROCESSING_IRREGULARITY_DETECTED, QualityFlag.ARTIFACT),
    (DeviceSensorStatus.INADEQUATE_SIGNAL_DETECTED, QualityFlag.INADEQUATE_SIGNAL),
    (DeviceSensorStatus.POOR_SIGNAL_DETECTED, QualityFlag.POOR_SIGNAL),
    (DeviceSensorStatus.LOW_PERFUSION_DETECTED, QualityFlag.LOW_PERFUSION),
    (DeviceSensorStatus.ERRATIC_SIGNAL_DETECTED, QualityFlag.ERRATIC_SIGNAL),
    (DeviceSensorStatus.NONPULSATILE_SIGNAL_DETECTED, QualityFlag.NON_PULSATILE),
    (DeviceSensorStatus.QUESTIONABLE_PULSE_DETECTED, QualityFlag.QUESTIONABLE),
    (DeviceSensorStatus.SIGNAL_ANALYSIS_ONGOING, QualityFlag.SEARCHING),
    (DeviceSensorStatus.SENSOR_INTERFERENCE_DETECTED, QualityFlag.INTERFERENCE),
    (DeviceSensorStatus.SENSOR_UNCONNECTED_TO_USER, QualityFlag.NO_FINGER),
    (DeviceSensorStatus.UNKNOWN_SENSOR_CONNECTED, QualityFlag.UNKNOWN_SENSOR),
    (DeviceSensorStatus.SENSOR_DISPLACED, QualityFlag.SENSOR_DISPLACED),
    (DeviceSensorStatus.SENSOR_MALFUNCTIONING, QualityFlag.SENSOR_FAULT),
    (DeviceSensorStatus.SENSOR_DISCONNECTED, QualityFlag.PROBE_UNPLUGGED),
)


def quality_flags(
    measurement_status: MeasurementStatus | None,
    device_sensor_status: DeviceSensorStatus | None,
) -> frozenset[QualityFlag]:
    """Map PLX status bits onto the gateway's quality flags (absent fields: no flags)."""
    out: set[QualityFlag] = set()
    if measurement_status is not None:
        out.update(q for bit, q in _MS_QUALITY if measurement_status & bit)
    if device_sensor_status is not None:
        out.update(q for bit, q in _DSS_QUALITY if device_sensor_status & bit)
    return frozenset(out)


def to_sample(
    msg: PlxContinuousMeasurement | PlxSpotCheckMeasurement, *, source: str = SOURCE
) -> OximeterSample:
    """The gateway sample for a PLX measurement (the Normal pair for continuous ones).

    SpO2 outside 0-100 % or a negative pulse rate becomes "no value" with
    :attr:`QualityFlag.INVALID`, since a physically impossible number must
    not reach a dose check.
    """
    pair = msg.normal if isinstance(msg, PlxContinuousMeasurement) else msg.reading
    quality = set(quality_flags(msg.measurement_status, msg.device_sensor_status))
    spo2, pulse = pair.spo2, pair.pulse_rate
    if spo2 is not None and not 0.0 <= spo2 <= 100.0:
        spo2 = None
        quality.add(QualityFlag.INVALID)
    if pulse is not None and pulse < 0.0:
        pulse = None
        quality.add(QualityFlag.INVALID)
    return OximeterSample(
        spo2=spo2,
        pulse_bpm=pulse,
        quality=frozenset(quality),
        pulse_amplitude_index=msg.pulse_amplitude_index,
        source=source,
    )
