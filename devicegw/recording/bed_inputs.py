"""What a bed's SpO2 monitor was given, recorded beside its nebulizer's link.

A dose event's ``spo2`` section and the post-dose summary depend on the oximeter
samples, the oximeter link going up and down, and the bed's 1 s tick, in the
order the monitor saw them relative to the nebulizer's bytes. Recording those
calls (not the oximeter's raw bytes) in the nebulizer's own file keeps that order
exactly -- one writer, one event loop -- whatever the oximeter's transport (serial
Nonin at 75 frames/s, BLE PLX or BerryMed), at about one record per sample the
monitor uses. ``pleth`` waveforms are not recorded: the monitor does not use them.

Record kinds (format version 2, docs/recording-format.md): ``S`` sample (JSON),
``U``/``D`` oximeter link up/down (the oximeter id), ``K`` tick (empty).
"""

from __future__ import annotations

import json
from typing import Any

from devicegw.config import Config, DeviceSettings, OximeterSettings
from devicegw.core.bed_monitor import BedMonitor, SafetySink
from devicegw.recording.format import (
    BED_TICK,
    OX_DOWN,
    OX_SAMPLE,
    OX_UP,
    RecordingError,
    RecordingWriter,
    utc_to_us,
)
from drivers.clock import Clock
from drivers.oximeter.sample import OximeterSample, QualityFlag

__all__ = ["RecordingBedMonitor", "decode_sample", "encode_sample"]


def encode_sample(sample: OximeterSample) -> bytes:
    """The ``S`` payload: every field the monitor reads, compact JSON, keys sorted."""
    data: dict[str, Any] = {
        "spo2": sample.spo2,
        "pulse_bpm": sample.pulse_bpm,
        "quality": sorted(sample.quality),
        "pai": sample.pulse_amplitude_index,
        "strength": sample.signal_strength,
        "source": sample.source,
    }
    return json.dumps(data, separators=(",", ":"), sort_keys=True).encode("ascii")


def _number(data: dict[str, Any], key: str) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RecordingError(f"oximeter sample record: {key} is not a number")
    return float(value)


#: Decoded ``S`` payloads by their bytes. A subject's readings repeat (integer SpO2 and
#: pulse, a few quality sets), so a replayed ward mostly finds its samples here instead of
#: parsing JSON three times a second per bed; samples are frozen, so sharing one is safe.
#: (A plain dict: a subclass with ``__missing__`` costs ~4x more per lookup, since
#: subscripting a dict subclass goes through a Python-level slot.)
DECODED_SAMPLES: dict[bytes, OximeterSample] = {}
_DECODED_MAX = 8192


def decode_sample(payload: bytes) -> OximeterSample:
    """An ``S`` payload back into the sample; anything malformed is a RecordingError."""
    sample = DECODED_SAMPLES.get(payload)
    if sample is None:
        sample = _decode_sample(payload)
        if len(DECODED_SAMPLES) >= _DECODED_MAX:
            DECODED_SAMPLES.clear()  # rare: a bounded cache, not an LRU
        DECODED_SAMPLES[payload] = sample
    return sample


def _decode_sample(payload: bytes) -> OximeterSample:
    try:
        data = json.loads(payload)
    except ValueError as exc:
        raise RecordingError(f"oximeter sample record is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise RecordingError("oximeter sample record is not a JSON object")
    quality_raw = data.get("quality", [])
    source = data.get("source")
    strength = data.get("strength")
    if not isinstance(quality_raw, list) or not isinstance(source, str):
        raise RecordingError("oximeter sample record: bad quality or source")
    if strength is not None and (isinstance(strength, bool) or not isinstance(strength, int)):
        raise RecordingError("oximeter sample record: strength is not an integer")
    try:
        quality = frozenset(QualityFlag(q) for q in quality_raw)
    except ValueError as exc:
        raise RecordingError(f"oximeter sample record: {exc}") from exc
    return OximeterSample(
        spo2=_number(data, "spo2"),
        pulse_bpm=_number(data, "pulse_bpm"),
        quality=quality,
        pulse_amplitude_index=_number(data, "pai"),
        signal_strength=strength,
        source=source,
    )


class RecordingBedMonitor(BedMonitor):
    """A bed monitor that records each input in its nebulizer's recording, then acts on it."""

    def __init__(
        self,
        config: Config,
        device: DeviceSettings,
        oximeter: OximeterSettings,
        sink: SafetySink,
        *,
        writer: RecordingWriter,
        clock: Clock,
    ) -> None:
        super().__init__(config, device, oximeter, sink)
        self._writer = writer
        self._clock = clock
        self._oximeter_id = oximeter.id.encode("utf-8")

    def _record(self, kind: str, t: float, payload: bytes) -> None:
        self._writer.append(self.device.id, kind, t, utc_to_us(self._clock.now()), payload)

    def feed(self, t: float, sample: OximeterSample) -> None:
        self._record(OX_SAMPLE, t, encode_sample(sample))
        super().feed(t, sample)

    def oximeter_down(self, t: float) -> None:
        self._record(OX_DOWN, t, self._oximeter_id)
        super().oximeter_down(t)

    def oximeter_up(self, t: float) -> None:
        self._record(OX_UP, t, self._oximeter_id)
        super().oximeter_up(t)

    def tick(self, t: float) -> None:
        self._record(BED_TICK, t, b"")
        super().tick(t)
