"""A subject's SpO2 and pulse as a pure, seeded function of time (what an oximeter would see).

No I/O and no clock: :meth:`PhysioModel.value_at` takes the time in seconds
since the scenario started (the injected clock drives it from outside) and
always returns the same :class:`PhysioState` for the same time and seed, in
whatever order it is asked. Every random draw is a hash of (seed, stream,
index), not a stateful generator, which is what makes that possible.

Model (parameters from :mod:`simulators.oximeter_scenario`):

- True SpO2 = baseline + slow drift - desaturation depth, clipped to 50-100 %;
  true pulse = baseline + slow drift + the desaturation's pulse rise.
  Drift is smooth value noise (Gaussian knots every ``drift_period_s``,
  smoothstep-interpolated, SD about ``*_drift_sd``).
- A desaturation is a trapezoid: the true SpO2 falls linearly by
  ``depth_points`` over ``ramp_s``, stays there ``duration_s``, recovers
  over ``ramp_s``.
- The *measured* values are what the sensor computes: true values plus
  measurement noise (a new Gaussian value every second, as a device updates
  its averaged reading about once a second), three times the noise during
  low perfusion. During motion artefact the measured values are corrupted:
  SpO2 reads 4-25 points low, pulse 30 below to 50 above; the simulators
  flag those with the protocol's status bits. With the finger out of the
  probe or the sensor unplugged there is no measured value (None).
- Precedence: sensor off > finger removed > motion > low perfusion.
- Battery: ``battery_pct - battery_drain_pct_per_h * t / 3600``; at 0 % the
  device is off (``powered`` False) and sends nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from simulators.oximeter_scenario import OximeterScenario

__all__ = ["PhysioModel", "PhysioState", "hashed_uniform"]

SPO2_MIN = 50.0
MOTION_SPO2_ERROR = (4.0, 25.0)  # points below the true value
MOTION_PULSE_ERROR = (-30.0, 50.0)  # bpm
LOW_PERFUSION_NOISE = 3.0
LOW_PERFUSION_PI = 0.3  # % pulse amplitude index

# Noise streams.
_SPO2_DRIFT = 1
_PULSE_DRIFT = 2
_SPO2_NOISE = 3
_PULSE_NOISE = 4
_MOTION_SPO2 = 5
_MOTION_PULSE = 6
_MASK64 = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64 finaliser: a fast, well-spread 64-bit hash."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def hashed_uniform(seed: int, stream: int, k: int) -> float:
    """Uniform in (0, 1), a pure function of its arguments."""
    h = _mix(_mix(_mix(seed & _MASK64) ^ stream) ^ (k & _MASK64))
    return ((h >> 11) + 0.5) / float(1 << 53)


def _gauss(seed: int, stream: int, k: int) -> float:
    """Standard normal (Box-Muller on two hashed uniforms)."""
    u1 = hashed_uniform(seed, stream, 2 * k)
    u2 = hashed_uniform(seed, stream, 2 * k + 1)
    return math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)


def _smooth(seed: int, stream: int, t: float, period: float) -> float:
    """Smooth value noise: Gaussian knots every ``period`` s, smoothstep in between."""
    x = t / period
    k = math.floor(x)
    f = x - k
    w = f * f * (3.0 - 2.0 * f)
    # Normalised so the SD stays about 1 between the knots as well.
    a, b = _gauss(seed, stream, k), _gauss(seed, stream, k + 1)
    return (a * (1.0 - w) + b * w) / math.sqrt((1.0 - w) ** 2 + w * w)


@dataclass(frozen=True, slots=True, kw_only=True)
class PhysioState:
    """The subject and the probe at one instant."""

    t_s: float
    spo2: float  # true arterial saturation, %
    pulse_bpm: float  # true pulse rate
    measured_spo2: float | None  # what the sensor computes; None without a reading
    measured_pulse_bpm: float | None
    sensor_connected: bool
    finger_present: bool
    motion: bool
    low_perfusion: bool
    perfusion_index_pct: float
    battery_pct: float
    powered: bool

    @property
    def trustworthy(self) -> bool:
        """A reading the device itself would report as good."""
        return (
            self.sensor_connected
            and self.finger_present
            and not self.motion
            and not self.low_perfusion
        )


class PhysioModel:
    """One subject and probe following an :class:`OximeterScenario`; see the module docstring."""

    def __init__(self, scenario: OximeterScenario, seed: int | None = None) -> None:
        self.scenario = scenario
        self.seed = scenario.oximeter.seed if seed is None else seed

    def desaturation_at(self, t: float) -> tuple[float, float]:
        """(SpO2 points below the unperturbed value, pulse rise) from scripted desaturations."""
        for d in self.scenario.desaturations:
            if not d.at_s <= t < d.end_s:
                continue
            x = t - d.at_s
            if d.ramp_s > 0 and x < d.ramp_s:
                frac = x / d.ramp_s
            elif x < d.ramp_s + d.duration_s:
                frac = 1.0
            else:
                frac = max(0.0, (d.end_s - t) / d.ramp_s) if d.ramp_s > 0 else 0.0
            return d.depth_points * frac, d.pulse_rise_bpm * frac
        return 0.0, 0.0

    def battery_at(self, t: float) -> float:
        ox = self.scenario.oximeter
        return max(0.0, ox.battery_pct - ox.battery_drain_pct_per_h * max(t, 0.0) / 3600.0)

    def value_at(self, t: float) -> PhysioState:
        sc = self.scenario
        subj = sc.subject
        seed = self.seed
        depth, rise = self.desaturation_at(t)
        spo2 = subj.baseline_spo2 + subj.spo2_drift_sd * _smooth(
            seed, _SPO2_DRIFT, t, subj.drift_period_s
        )
        spo2 = min(100.0, max(SPO2_MIN, spo2 - depth))
        pulse = (
            subj.baseline_pulse_bpm
            + subj.pulse_drift_sd * _smooth(seed, _PULSE_DRIFT, t, subj.drift_period_s)
            + rise
        )
        pulse = max(20.0, pulse)

        sensor_connected = not any(p.contains(t) for p in sc.sensor_off)
        finger = sensor_connected and not any(p.contains(t) for p in sc.finger_removed)
        motion = finger and any(p.contains(t) for p in sc.motion)
        low_perf = finger and any(p.contains(t) for p in sc.low_perfusion)
        battery = self.battery_at(t)

        second = math.floor(t)
        measured_spo2: float | None = None
        measured_pulse: float | None = None
        if finger:
            scale = LOW_PERFUSION_NOISE if low_perf else 1.0
            measured_spo2 = spo2 + scale * subj.spo2_noise_sd * _gauss(seed, _SPO2_NOISE, second)
            measured_pulse = pulse + scale * subj.pulse_noise_sd * _gauss(
                seed, _PULSE_NOISE, second
            )
            if motion:
                u_spo2 = hashed_uniform(seed, _MOTION_SPO2, second)
                u_pulse = hashed_uniform(seed, _MOTION_PULSE, second)
                lo, hi = MOTION_SPO2_ERROR
                measured_spo2 = spo2 - (lo + (hi - lo) * u_spo2)
                lo, hi = MOTION_PULSE_ERROR
                measured_pulse = pulse + lo + (hi - lo) * u_pulse
            measured_spo2 = min(100.0, max(0.0, measured_spo2))
            measured_pulse = min(300.0, max(20.0, measured_pulse))
        return PhysioState(
            t_s=t,
            spo2=spo2,
            pulse_bpm=pulse,
            measured_spo2=measured_spo2,
            measured_pulse_bpm=measured_pulse,
            sensor_connected=sensor_connected,
            finger_present=finger,
            motion=motion,
            low_perfusion=low_perf,
            perfusion_index_pct=LOW_PERFUSION_PI if low_perf else subj.perfusion_index_pct,
            battery_pct=battery,
            powered=battery > 0.0,
        )
