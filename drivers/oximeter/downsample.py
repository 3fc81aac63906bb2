"""Oximeter signal processing: timestamped samples, and BerryMed's 100 Hz -> 1 Hz downsampler.

No I/O, no clock: every function takes the receive times it is given.

:class:`ReceivedSample` is one oximeter sample as the gateway received it
(every oximeter source yields these: ``drivers.transport.base.SampleSource``).

:class:`BerryMedDownsampler`: a BerryMed BCI sends ~100 packets/s; the
consumer gets **at most one sample per ``window_s``** (default 1 s) of gateway
clock time:

- a window starts at the receive time of its first packet; the first packet
  received ``window_s`` or more later closes it (the sample is delivered then)
  and starts the next window. Windows therefore start at least ``window_s``
  apart and each spans less than ``window_s``: one sample per window, delivered
  at most one packet interval after the window's last packet. (A sample's
  ``t_s`` is its last packet's receive time, so two consecutive ``t_s`` can be
  a little less than ``window_s`` apart; ``window_start_s`` never are.)
- SpO2 and pulse are the medians of the window's *valid* packets (both values
  present, no gating flag); if no packet is valid, the medians of the values
  that are present (the sample is then flagged or incomplete, hence not
  ``valid``); None if there are none;
- quality flags are the **union** over all packets of the window, so one
  artefact packet (e.g. "pulse searching") makes the whole second not
  ``valid``: a safety check would rather lose a second than use a doubtful one;
- signal strength is the median (rounded down), ``pleth`` keeps every
  plethysmogram sample of the window in order, ``packets`` says how many
  packets went in, ``window_start_s`` when the first arrived.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from drivers.oximeter import berrymed
from drivers.oximeter.berrymed import BerryMedPacket
from drivers.oximeter.sample import OximeterSample, QualityFlag

__all__ = ["BerryMedDownsampler", "ReceivedSample", "SampleKind"]

SampleKind = Literal["continuous", "spot_check"]


@dataclass(frozen=True, slots=True)
class ReceivedSample:
    """One oximeter sample as the gateway received it.

    ``t_s`` is ``clock.monotonic()`` when it arrived (BerryMed: its window's last
    packet), ``utc`` is ``clock.now()`` at that instant; ``window_start_s`` is the
    receive time of the first value that went into it (== ``t_s`` for PLX).
    """

    sample: OximeterSample
    t_s: float
    utc: datetime
    kind: SampleKind = "continuous"
    packets: int = 1
    window_start_s: float = math.nan

    def __post_init__(self) -> None:
        if math.isnan(self.window_start_s):
            object.__setattr__(self, "window_start_s", self.t_s)


class BerryMedDownsampler:
    """BerryMed packets (~100/s) -> at most one sample per ``window_s``; module docstring."""

    def __init__(self, window_s: float = 1.0, *, source: str = berrymed.SOURCE) -> None:
        if not window_s > 0:
            raise ValueError("window_s must be positive")
        self.window_s = window_s
        self.source = source
        self._samples: list[OximeterSample] = []
        self._start = 0.0
        self._last: tuple[float, datetime] | None = None

    @property
    def pending_packets(self) -> int:
        return len(self._samples)

    def add(self, t_s: float, utc: datetime, packet: BerryMedPacket) -> ReceivedSample | None:
        """Take one packet received at ``t_s``; returns the window it closed, if any."""
        out = None
        if self._samples and t_s - self._start >= self.window_s:
            out = self.flush()
        if not self._samples:
            self._start = t_s
        self._samples.append(berrymed.to_sample(packet, source=self.source))
        self._last = (t_s, utc)
        return out

    def flush(self) -> ReceivedSample | None:
        """The window so far as one sample (None if empty); starts a new window."""
        samples, self._samples = self._samples, []
        if not samples or self._last is None:
            return None
        t_s, utc = self._last
        return ReceivedSample(
            _aggregate(samples, source=self.source),
            t_s,
            utc,
            "continuous",
            packets=len(samples),
            window_start_s=self._start,
        )

    def clear(self) -> None:
        self._samples = []
        self._last = None


def _aggregate(samples: list[OximeterSample], *, source: str) -> OximeterSample:
    """Median of the valid values (else of the present ones), union of the flags."""
    pool = [s for s in samples if s.valid] or samples

    def median(values: list[float]) -> float | None:
        return float(statistics.median(values)) if values else None

    quality: set[QualityFlag] = set()
    for s in samples:
        quality |= s.quality
    strengths = [s.signal_strength for s in samples if s.signal_strength is not None]
    return OximeterSample(
        spo2=median([s.spo2 for s in pool if s.spo2 is not None]),
        pulse_bpm=median([s.pulse_bpm for s in pool if s.pulse_bpm is not None]),
        quality=frozenset(quality),
        signal_strength=math.floor(statistics.median(strengths)) if strengths else None,
        pleth=tuple(p for s in samples for p in s.pleth),
        source=source,
    )
