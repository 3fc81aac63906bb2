"""The ``S`` record payload: encode/decode round trip, and the decode cache's behaviour."""

from __future__ import annotations

import pytest

from devicegw.recording.bed_inputs import decode_sample, encode_sample
from devicegw.recording.format import RecordingError
from drivers.oximeter.sample import OximeterSample, QualityFlag


def _sample(spo2: float | None = 95.0, *quality: QualityFlag) -> OximeterSample:
    return OximeterSample(
        spo2=spo2, pulse_bpm=72.0, quality=frozenset(quality), source="nonin-oem3"
    )


@pytest.mark.parametrize(
    "sample",
    [
        _sample(),
        _sample(None, QualityFlag.NO_FINGER),
        _sample(88.0, QualityFlag.ARTIFACT, QualityFlag.MARGINAL_PERFUSION),
    ],
)
def test_round_trip_twice_gives_equal_samples(sample: OximeterSample) -> None:
    payload = encode_sample(sample)
    first = decode_sample(payload)
    again = decode_sample(bytes(payload))  # a cached decode: the same reading
    assert first == again == sample
    assert again.valid is sample.valid


def test_a_malformed_payload_fails_every_time() -> None:
    good = encode_sample(_sample())
    decode_sample(good)
    bad = good.replace(b'"spo2":95.0', b'"spo2":"95"')
    for _ in range(2):
        with pytest.raises(RecordingError, match="spo2 is not a number"):
            decode_sample(bad)
    with pytest.raises(RecordingError, match="not JSON"):
        decode_sample(good[:-1])


@pytest.mark.parametrize(
    ("spo2", "pulse", "quality", "valid"),
    [
        (95.0, 70.0, (), True),
        (None, 70.0, (), False),
        (95.0, None, (), False),
        (95.0, 70.0, (QualityFlag.MARGINAL_PERFUSION,), True),
        (95.0, 70.0, (QualityFlag.MARGINAL_PERFUSION, QualityFlag.ARTIFACT), False),
        (95.0, 70.0, (QualityFlag.LOW_PERFUSION,), False),
    ],
)
def test_valid_means_both_values_and_no_gating_flag(
    spo2: float | None, pulse: float | None, quality: tuple[QualityFlag, ...], valid: bool
) -> None:
    sample = OximeterSample(spo2=spo2, pulse_bpm=pulse, quality=frozenset(quality), source="x")
    assert sample.valid is valid
    assert sample.valid is (spo2 is not None and pulse is not None and not sample.gating)
