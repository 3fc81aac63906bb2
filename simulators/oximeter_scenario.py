"""Oximeter simulator scenarios: TOML, validated once at load time (STYLE item 11).

An oximeter scenario describes one subject's physiology and one pulse
oximeter on that subject: baseline SpO2 and pulse, noise and drift, scripted
desaturations, and the periods when the reading cannot be trusted (motion
artefact, low perfusion, finger out of the probe, sensor unplugged). All
times are seconds since the scenario starts, on the same time axis as a VM-1
scenario (its power-on), so the two can run side by side on one bed: ``bed``
and ``subject_id`` name the bed and subject of the gateway configuration, and
``vm1_scenario`` optionally names the VM-1 scenario file (relative to this
file) it is written against. :func:`load_pair` loads both. The shipped files
live in ``simulators/scenarios/oximeter/`` (every ``*.toml`` directly in
``simulators/scenarios/`` is a VM-1 scenario).

Format (every field but ``bed``, ``subject_id`` and ``oximeter.serial_no``
has a default)::

    name = "oximeter_desat"            # default: the file name without .toml
    description = "free text"
    bed = "B01"                        # gateway config bed (letters, digits, . _ -)
    subject_id = "S-0001"              # pseudonymous subject ID (A-Z, 0-9, -)
    vm1_scenario = "../complete.toml"  # optional: the VM-1 scenario on the same bed

    [oximeter]
    protocol = "nonin"                 # "nonin" (serial, OEM III format #2) | "berrymed" | "plx"
    model = "OEM III"                  # free text, <= 32 ASCII characters
    serial_no = "NONIN-0001"           # ASCII, <= 32; names the pty symlink
    firmware_revision = 33             # Nonin frame 4 byte (0-255)
    battery_pct = 100                  # at scenario start; the device stops at 0 %
    battery_drain_pct_per_h = 0        # 0: mains/USB powered
    seed = 7                           # every random draw derives from it

    [subject]
    baseline_spo2 = 96                 # % (70-100)
    baseline_pulse_bpm = 80            # (30-200)
    spo2_noise_sd = 0.4                # measurement noise, SpO2 points (new value each second)
    pulse_noise_sd = 1.0               # bpm
    spo2_drift_sd = 0.5                # slow physiological drift, SpO2 points
    pulse_drift_sd = 2.0               # bpm
    drift_period_s = 120               # drift correlation time
    perfusion_index_pct = 4.0          # PLX pulse amplitude index when perfusion is normal

    [[desaturations]]                  # in time order, not overlapping
    at_s = 210                         # the SpO2 starts to fall
    depth_points = 8                   # lowest true SpO2 = baseline - depth (+ drift)
    duration_s = 45                    # time at the lowest level
    ramp_s = 10                        # fall and recovery each take this long (default 10)
    pulse_rise_bpm = 10                # pulse goes up by this much at the lowest level

    [[motion]]                         # values corrupted (bogus, often low) AND flagged
    at_s = 100
    duration_s = 20
    [[low_perfusion]]                  # noisier values, flagged where the protocol can
    [[finger_removed]]                 # no values, "no finger"/sensor alarm flags
    [[sensor_off]]                     # no values, "sensor disconnected" flags

Cross-field rules: within each list, entries are in time order and do not
overlap (a desaturation spans ``at_s`` to ``at_s + 2 ramp_s + duration_s``).
Errors are :class:`simulators.errors.ScenarioError` naming the file and field.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from simulators.errors import ScenarioError
from simulators.scenario import Scenario, format_errors, load_scenario, read_toml

# The same shapes the gateway's config accepts for a bed and a pseudonymous subject.
TopicSegment = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
SubjectId = Annotated[str, StringConstraints(pattern=r"^[A-Z0-9][A-Z0-9-]{2,31}$")]

__all__ = [
    "DesaturationSpec",
    "OximeterScenario",
    "OximeterSpec",
    "PeriodSpec",
    "SubjectSpec",
    "load_oximeter_scenario",
    "load_pair",
    "parse_oximeter_scenario",
]

Seconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Duration = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Protocol = Literal["nonin", "berrymed", "plx"]


class _Strict(BaseModel):
    """No unknown keys, no silent string-to-number coercion, immutable after load."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class OximeterSpec(_Strict):
    """The device: which protocol it speaks, its identity and its battery."""

    protocol: Protocol = "nonin"
    model: str = "OEM III"
    serial_no: str = Field(min_length=1)
    firmware_revision: int = Field(default=0x21, ge=0, le=0xFF)
    battery_pct: float = Field(default=100.0, ge=0, le=100, allow_inf_nan=False)
    battery_drain_pct_per_h: float = Field(default=0.0, ge=0, le=1000, allow_inf_nan=False)
    seed: int = 0

    @field_validator("model", "serial_no")
    @classmethod
    def _ascii(cls, value: str) -> str:
        if not value.isascii() or not value.isprintable() or len(value) > 32:
            raise ValueError("must be at most 32 printable ASCII characters")
        return value


class SubjectSpec(_Strict):
    """The subject's physiology at rest."""

    baseline_spo2: float = Field(default=96.0, ge=70, le=100, allow_inf_nan=False)
    baseline_pulse_bpm: float = Field(default=80.0, ge=30, le=200, allow_inf_nan=False)
    spo2_noise_sd: float = Field(default=0.4, ge=0, le=3)
    pulse_noise_sd: float = Field(default=1.0, ge=0, le=10)
    spo2_drift_sd: float = Field(default=0.5, ge=0, le=3)
    pulse_drift_sd: float = Field(default=2.0, ge=0, le=20)
    drift_period_s: float = Field(default=120.0, ge=5, le=3600)
    perfusion_index_pct: float = Field(default=4.0, gt=0, le=20)


class DesaturationSpec(_Strict):
    """True SpO2 falls by ``depth_points`` over ``ramp_s``, stays ``duration_s``, recovers."""

    at_s: Seconds
    depth_points: float = Field(gt=0, le=40, allow_inf_nan=False)
    duration_s: Duration
    ramp_s: float = Field(default=10.0, ge=0, le=600, allow_inf_nan=False)
    pulse_rise_bpm: float = Field(default=0.0, ge=-30, le=60, allow_inf_nan=False)

    @property
    def end_s(self) -> float:
        return self.at_s + 2 * self.ramp_s + self.duration_s


class PeriodSpec(_Strict):
    """A condition lasting from ``at_s`` for ``duration_s``."""

    at_s: Seconds
    duration_s: Duration

    @property
    def end_s(self) -> float:
        return self.at_s + self.duration_s

    def contains(self, t: float) -> bool:
        return self.at_s <= t < self.end_s


Periods = Annotated[tuple[PeriodSpec, ...], Field(default=(), strict=False)]


class OximeterScenario(_Strict):
    """One subject with one oximeter, and everything that happens to the reading."""

    name: str = ""
    description: str = ""
    bed: TopicSegment
    subject_id: SubjectId
    vm1_scenario: str | None = None
    oximeter: OximeterSpec
    subject: SubjectSpec = SubjectSpec()
    desaturations: tuple[DesaturationSpec, ...] = Field(default=(), strict=False)
    motion: Periods
    low_perfusion: Periods
    finger_removed: Periods
    sensor_off: Periods

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        lists: dict[str, Sequence[DesaturationSpec | PeriodSpec]] = {
            "desaturations": self.desaturations,
            "motion": self.motion,
            "low_perfusion": self.low_perfusion,
            "finger_removed": self.finger_removed,
            "sensor_off": self.sensor_off,
        }
        for label, items in lists.items():
            previous_end = -1.0
            for i, item in enumerate(items):
                if item.at_s < previous_end:
                    raise ValueError(
                        f"{label}[{i}].at_s: must not be before the previous one ends "
                        f"({previous_end:g} s)"
                    )
                previous_end = item.end_s
        return self

    @property
    def end_of_script_s(self) -> float:
        """End of the last scripted episode or period (0 if there is none)."""
        ends = [d.end_s for d in self.desaturations]
        for periods in (self.motion, self.low_perfusion, self.finger_removed, self.sensor_off):
            ends += [p.end_s for p in periods]
        return max(ends, default=0.0)


def parse_oximeter_scenario(
    data: Mapping[str, Any], *, source: str = "<oximeter scenario>"
) -> OximeterScenario:
    """Validate already-parsed TOML data; ``source`` prefixes error messages."""
    try:
        scenario = OximeterScenario.model_validate(dict(data))
    except ValidationError as exc:
        raise ScenarioError(format_errors(source, exc)) from exc
    if not scenario.name:
        scenario = scenario.model_copy(update={"name": Path(source).stem})
    return scenario


def load_oximeter_scenario(path: str | Path) -> OximeterScenario:
    """Read and validate one oximeter scenario file; every problem is a ScenarioError."""
    path = Path(path)
    return parse_oximeter_scenario(read_toml(path), source=str(path))


def load_pair(path: str | Path) -> tuple[OximeterScenario, Scenario | None]:
    """The oximeter scenario at ``path`` and the VM-1 scenario it names (if any)."""
    path = Path(path)
    oximeter = load_oximeter_scenario(path)
    if oximeter.vm1_scenario is None:
        return oximeter, None
    return oximeter, load_scenario(path.parent / oximeter.vm1_scenario)
