"""OximeterSample.valid: settled once at construction, the same answer as its definition."""

from __future__ import annotations

import dataclasses
import pickle

from hypothesis import given
from hypothesis import strategies as st

from drivers.oximeter.sample import GATING_FLAGS, OximeterSample, QualityFlag

VALUES = st.none() | st.floats(0, 100, allow_nan=False)


def _definition(spo2: float | None, pulse: float | None, quality: frozenset[QualityFlag]) -> bool:
    """Both values present and no gating flag (the module's docstring)."""
    return spo2 is not None and pulse is not None and not (quality & GATING_FLAGS)


@given(VALUES, VALUES, st.frozensets(st.sampled_from(list(QualityFlag))))
def test_valid_is_its_definition(
    spo2: float | None, pulse: float | None, quality: frozenset[QualityFlag]
) -> None:
    sample = OximeterSample(spo2=spo2, pulse_bpm=pulse, quality=quality, source="t")
    assert sample.valid is _definition(spo2, pulse, quality)
    # derived again wherever a sample is rebuilt: replace(), a pickle (a replay's workers)
    changed = dataclasses.replace(sample, spo2=None if spo2 is not None else 95.0)
    assert changed.valid is _definition(changed.spo2, pulse, quality)
    assert pickle.loads(pickle.dumps(sample)).valid is sample.valid


def test_valid_is_not_a_field_of_the_reading() -> None:
    """Not an argument, not compared or hashed, not in the repr: a reading is what it was."""
    a = OximeterSample(spo2=97.0, pulse_bpm=71.0, source="t")
    b = OximeterSample(spo2=97.0, pulse_bpm=71.0, source="t")
    assert a == b and hash(a) == hash(b)
    assert "valid" not in repr(a)
    assert "valid" not in {f.name for f in dataclasses.fields(a) if f.init}
    informational = frozenset({QualityFlag.POOR_SIGNAL, QualityFlag.MARGINAL_PERFUSION})
    assert OximeterSample(spo2=97.0, pulse_bpm=71.0, quality=informational, source="t").valid
    gated = frozenset({QualityFlag.POOR_SIGNAL, QualityFlag.LOW_PERFUSION})
    assert not OximeterSample(spo2=97.0, pulse_bpm=71.0, quality=gated, source="t").valid
