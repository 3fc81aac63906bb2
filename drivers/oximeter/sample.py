"""The one oximeter reading every codec produces, whatever the device.

Each protocol reports signal quality its own way (PLX status bit fields,
BerryMed flag bits, Nonin per-frame status). They are all mapped onto
:class:`QualityFlag` so that downstream code asks one question, ``valid``,
instead of learning three vendors' bit layouts. Values the device marks as
missing are ``None``: a sample never carries a sentinel that could be
mistaken for a number.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

__all__ = ["GATING_FLAGS", "OximeterSample", "QualityFlag"]


class QualityFlag(StrEnum):
    """Why a reading may not be trusted; string values so they serialise as-is."""

    NO_SIGNAL = "no_signal"
    NO_FINGER = "no_finger"
    PROBE_UNPLUGGED = "probe_unplugged"
    SENSOR_DISPLACED = "sensor_displaced"
    SENSOR_ALARM = "sensor_alarm"
    SENSOR_FAULT = "sensor_fault"
    UNKNOWN_SENSOR = "unknown_sensor"
    EQUIPMENT_MALFUNCTION = "equipment_malfunction"
    SEARCHING = "searching"
    CALIBRATING = "calibrating"
    ARTIFACT = "artifact"
    INTERFERENCE = "interference"
    ERRATIC_SIGNAL = "erratic_signal"
    NON_PULSATILE = "non_pulsatile"
    INADEQUATE_SIGNAL = "inadequate_signal"
    OUT_OF_TRACK = "out_of_track"
    LOW_PERFUSION = "low_perfusion"
    QUESTIONABLE = "questionable"
    INVALID = "invalid"
    UNAVAILABLE = "unavailable"
    DISPLAY_HOLD = "display_hold"
    TEST_DATA = "test_data"
    # Informational: reported, but the value is still usable.
    MARGINAL_PERFUSION = "marginal_perfusion"
    POOR_SIGNAL = "poor_signal"
    EARLY_ESTIMATE = "early_estimate"
    # Gating again: a reading from the device's memory is not a live sample of the subject.
    FROM_STORAGE = "from_storage"


_INFORMATIONAL = frozenset(
    {
        QualityFlag.MARGINAL_PERFUSION,
        QualityFlag.POOR_SIGNAL,
        QualityFlag.EARLY_ESTIMATE,
    }
)

GATING_FLAGS: frozenset[QualityFlag] = frozenset(QualityFlag) - _INFORMATIONAL
"""Flags that make a sample unusable for clinical decisions (``valid`` is False).

Yellow/"marginal" perfusion and PLX "poor signal" are degraded but still
reported by the devices as measurements; red/low perfusion and everything
that says the value is not a live patient reading (held display, test or
demonstration data, calibration, a PLX reading from measurement storage) gate.
"""


@dataclass(frozen=True, slots=True, kw_only=True)
class OximeterSample:
    """One SpO2 / pulse-rate reading with its quality, from any supported oximeter.

    ``pulse_amplitude_index`` is the PLX PAI in percent; ``signal_strength``
    is the device's own coarse scale (BerryMed 0-15) and is not comparable
    across vendors; ``pleth`` holds the plethysmogram samples that arrived
    with this reading (BerryMed 1 per packet, Nonin 25 per packet).
    """

    spo2: float | None
    pulse_bpm: float | None
    quality: frozenset[QualityFlag] = field(default_factory=frozenset)
    pulse_amplitude_index: float | None = None
    signal_strength: int | None = None
    pleth: tuple[int, ...] = ()
    source: str
    #: Both values present and no gating flag: safe to use for decisions. Settled once,
    #: at construction: the monitor's path asks it several times per sample, and a
    #: property call each time was ~5 % of a replay's instructions.
    valid: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        quality = self.quality
        valid = (
            self.spo2 is not None
            and self.pulse_bpm is not None
            and (not quality or quality.isdisjoint(GATING_FLAGS))
        )
        object.__setattr__(self, "valid", valid)

    @property
    def gating(self) -> frozenset[QualityFlag]:
        """The subset of ``quality`` that makes this sample unusable."""
        return self.quality & GATING_FLAGS
