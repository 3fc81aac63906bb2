"""The physiology model as protocol bytes: Nonin OEM III, BerryMed BCI and BLE PLX.

Pure generators (no I/O, no clock): ``frames_between(t0, t1)`` returns what
the device sends during [t0, t1) of scenario time, built with the codecs' own
encoders (STYLE item 4: the simulator runs the codec in reverse, so the
decoders under test are the production ones). Messages are on a fixed grid
(message ``k`` at ``k / rate``), so consecutive windows [t0, t1), [t1, t2)
never repeat or skip one, and the same window always gives the same bytes.

What each protocol says about the conditions of :class:`PhysioState`:

=================  ========================  ==========================  ==========================
condition          Nonin (STATUS bits)       BerryMed (flag bits)        PLX (status fields)
=================  ========================  ==========================  ==========================
normal             GPRF (green perfusion)    signal strength 6-9         MS measurement ongoing
motion artefact    ARTF + GPRF; bogus        pulse searching; bogus      DSS erratic signal +
                   values                    values, strength 1-3        signal processing
                                                                         irregularity, MS
                                                                         questionable; bogus values
low perfusion      RPRF (red perfusion)      signal strength 1 only:     DSS low perfusion, PAI 0.3
                                             BCI has no bit, values
                                             pass as valid (noisier)
finger removed     SNSA + OOT, no values     no finger, no values        DSS sensor unconnected to
                                                                         user, MS unavailable
sensor off         SNSD, no values           probe unplugged + no        DSS sensor disconnected,
                                             signal, no values           MS unavailable
battery empty      nothing sent              nothing sent                nothing sent
=================  ========================  ==========================  ==========================

Rates: Nonin 3 packets/s (25 frames of 5 bytes each, 75 frames/s), BerryMed
100 packets/s of 5 bytes, PLX one Continuous Measurement notification per
second. The pleth waveform is a sine at the baseline pulse rate, its
amplitude following the perfusion, with noise during motion.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from drivers.oximeter import berrymed, nonin, plx
from drivers.oximeter.nonin import NoninStatus
from drivers.oximeter.plx import (
    DeviceSensorStatus,
    MeasurementStatus,
    PlxContinuousMeasurement,
    SpO2PR,
)
from simulators.oximeter_scenario import OximeterScenario
from simulators.physiology import PhysioModel, PhysioState, hashed_uniform

__all__ = [
    "BERRYMED_HZ",
    "NONIN_PACKET_HZ",
    "PLX_HZ",
    "BerryMedSim",
    "NoninSim",
    "OximeterSim",
    "PlxSim",
    "make_sim",
]

NONIN_PACKET_HZ = 3
NONIN_FRAME_HZ = NONIN_PACKET_HZ * nonin.FRAMES_PER_PACKET  # 75
BERRYMED_HZ = 100
PLX_HZ = 1
_EPS = 1e-9
_PLETH_NOISE = 7


def _first_index(t: float, hz: int) -> int:
    """Index of the first message at or after ``t`` on a ``hz`` grid (robust to float error)."""
    return math.ceil(t * hz - _EPS)


def _pleth(model: PhysioModel, state: PhysioState, t: float, top: int, k: int) -> int:
    """One plethysmogram sample in 0..top."""
    if not state.finger_present:
        return 0
    mid = top / 2
    amp = mid * min(1.0, state.perfusion_index_pct / 4.0) * 0.8
    phase = 2.0 * math.pi * t * model.scenario.subject.baseline_pulse_bpm / 60.0
    value = mid + amp * math.sin(phase)
    if state.motion:
        value += mid * 0.6 * (2.0 * hashed_uniform(model.seed, _PLETH_NOISE, k) - 1.0)
    return min(top, max(0, round(value)))


def _int(value: float | None, top: int) -> int | None:
    return None if value is None else min(top, max(0, round(value)))


@dataclass(frozen=True, slots=True)
class NoninSim:
    """Nonin OEM III serial data format #2: 3 packets/s of 25 frames."""

    model: PhysioModel
    firmware_revision: int = 0x21
    rate_hz: int = NONIN_PACKET_HZ

    def packet(self, k: int) -> bytes | None:
        """The 125 bytes of packet ``k`` (sent at ``k / 3`` s); None if the device is off."""
        t = k / self.rate_hz
        state = self.model.value_at(t)
        if not state.powered:
            return None
        status = NoninStatus(0)
        if not state.sensor_connected:
            status |= NoninStatus.SNSD
        elif not state.finger_present:
            status |= NoninStatus.SNSA | NoninStatus.OOT
        else:
            status |= NoninStatus.RPRF if state.low_perfusion else NoninStatus.GPRF
            if state.motion:
                status |= NoninStatus.ARTF
        pleth = tuple(
            _pleth(self.model, state, t + i / NONIN_FRAME_HZ, 0xFF, k * 25 + i)
            for i in range(nonin.FRAMES_PER_PACKET)
        )
        packet = nonin.make_packet(
            hr=_int(state.measured_pulse_bpm, nonin.HR_MISSING - 1),
            spo2=_int(state.measured_spo2, 100),
            status=status,
            pleth=pleth,
            firmware_revision=self.firmware_revision,
        )
        return nonin.encode_packet(packet)

    def timed_frames_between(self, t0: float, t1: float) -> list[tuple[float, bytes]]:
        """(send time, 125-byte packet) for every packet due in [t0, t1)."""
        out = []
        for k in range(_first_index(t0, self.rate_hz), _first_index(t1, self.rate_hz)):
            data = self.packet(k)
            if data is not None:
                out.append((k / self.rate_hz, data))
        return out

    def frames_between(self, t0: float, t1: float) -> bytes:
        """The serial byte stream sent during [t0, t1)."""
        return b"".join(data for _, data in self.timed_frames_between(t0, t1))


@dataclass(frozen=True, slots=True)
class BerryMedSim:
    """BerryMed BCI over BLE: 100 packets/s of 5 bytes (a byte stream across notifications)."""

    model: PhysioModel
    rate_hz: int = BERRYMED_HZ

    def packet(self, k: int) -> bytes | None:
        t = k / self.rate_hz
        state = self.model.value_at(t)
        if not state.powered:
            return None
        pleth = _pleth(self.model, state, t, 0x7F, k)
        bpm = self.model.scenario.subject.baseline_pulse_bpm
        beat = math.floor(t * bpm / 60.0) != math.floor((t - 1 / self.rate_hz) * bpm / 60.0)
        if not state.finger_present:
            strength = 0
        elif state.motion:
            strength = 1 + math.floor(3 * hashed_uniform(self.model.seed, _PLETH_NOISE + 1, k))
        elif state.low_perfusion:
            strength = 1
        else:
            u = hashed_uniform(self.model.seed, _PLETH_NOISE + 2, k // self.rate_hz)
            strength = 6 + math.floor(4 * u)
        packet = berrymed.BerryMedPacket(
            signal_strength=min(strength, 15),
            no_signal=not state.sensor_connected,
            probe_unplugged=not state.sensor_connected,
            pulse_beep=beat and state.finger_present,
            pleth=pleth,
            bargraph=min(15, pleth * 15 // 0x7F) if state.finger_present else 0,
            no_finger=state.sensor_connected and not state.finger_present,
            searching=state.motion,
            pulse_rate=_int(state.measured_pulse_bpm, berrymed.PR_INVALID - 1),
            spo2=_int(state.measured_spo2, 100),
        )
        return berrymed.encode_packet(packet)

    def timed_frames_between(self, t0: float, t1: float) -> list[tuple[float, bytes]]:
        out = []
        for k in range(_first_index(t0, self.rate_hz), _first_index(t1, self.rate_hz)):
            data = self.packet(k)
            if data is not None:
                out.append((k / self.rate_hz, data))
        return out

    def frames_between(self, t0: float, t1: float) -> bytes:
        """The byte stream sent during [t0, t1) (BLE notifications may split it anywhere)."""
        return b"".join(data for _, data in self.timed_frames_between(t0, t1))


_MS_NORMAL = MeasurementStatus.MEASUREMENT_ONGOING
_DSS_MOTION = (
    DeviceSensorStatus.ERRATIC_SIGNAL_DETECTED
    | DeviceSensorStatus.SIGNAL_PROCESSING_IRREGULARITY_DETECTED
)


@dataclass(frozen=True, slots=True)
class PlxSim:
    """Bluetooth PLX: one Continuous Measurement value (notification) per second."""

    model: PhysioModel
    rate_hz: int = PLX_HZ

    def measurement(self, k: int) -> PlxContinuousMeasurement | None:
        t = k / self.rate_hz
        state = self.model.value_at(t)
        if not state.powered:
            return None
        ms = _MS_NORMAL
        dss = DeviceSensorStatus(0)
        if not state.sensor_connected:
            ms |= MeasurementStatus.MEASUREMENT_UNAVAILABLE
            dss |= DeviceSensorStatus.SENSOR_DISCONNECTED
        elif not state.finger_present:
            ms |= MeasurementStatus.MEASUREMENT_UNAVAILABLE
            dss |= DeviceSensorStatus.SENSOR_UNCONNECTED_TO_USER
        else:
            if state.motion:
                ms |= MeasurementStatus.QUESTIONABLE_MEASUREMENT_DETECTED
                dss |= _DSS_MOTION
            if state.low_perfusion:
                dss |= DeviceSensorStatus.LOW_PERFUSION_DETECTED
        spo2 = None if state.measured_spo2 is None else round(state.measured_spo2, 1)
        pulse = None if state.measured_pulse_bpm is None else round(state.measured_pulse_bpm, 1)
        return PlxContinuousMeasurement(
            normal=SpO2PR(spo2, pulse),
            measurement_status=ms,
            device_sensor_status=dss,
            pulse_amplitude_index=(
                round(state.perfusion_index_pct, 1) if state.finger_present else None
            ),
        )

    def timed_frames_between(self, t0: float, t1: float) -> list[tuple[float, bytes]]:
        out = []
        for k in range(_first_index(t0, self.rate_hz), _first_index(t1, self.rate_hz)):
            msg = self.measurement(k)
            if msg is not None:
                out.append((k / self.rate_hz, plx.encode_continuous(msg)))
        return out

    def frames_between(self, t0: float, t1: float) -> list[bytes]:
        """Characteristic values notified during [t0, t1), one per notification."""
        return [data for _, data in self.timed_frames_between(t0, t1)]


OximeterSim = NoninSim | BerryMedSim | PlxSim


def make_sim(scenario: OximeterScenario, model: PhysioModel | None = None) -> OximeterSim:
    """The simulator for the scenario's ``oximeter.protocol``."""
    model = model if model is not None else PhysioModel(scenario)
    protocol = scenario.oximeter.protocol
    if protocol == "nonin":
        return NoninSim(model, firmware_revision=scenario.oximeter.firmware_revision)
    if protocol == "berrymed":
        return BerryMedSim(model)
    return PlxSim(model)
