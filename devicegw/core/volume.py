"""Volume estimates from OUTPUT rate samples.

The device reports an instantaneous aerosol rate at ~10 Hz; integrating it over
the samples' own device times gives an estimate independent of the reservoir
level sensor. Gaps (lost frames, a dropped link) are bridged linearly and
reported, never hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True, slots=True)
class IntegralResult:
    volume_ul: float
    samples: int
    covered_s: float  # time spanned by samples spaced no more than the gap limit
    gap_s: float  # time spanned by longer silences, bridged linearly
    gaps: int


def integrate_rate(
    times_s: npt.ArrayLike,
    rates_ul_min: npt.ArrayLike,
    *,
    start_s: float | None = None,
    end_s: float | None = None,
    max_gap_s: float = 1.0,
) -> IntegralResult:
    """Trapezoid integral of rate (uL/min) over sample times (s) -> uL.

    ``start_s``/``end_s`` extend the integral to the session bounds by holding
    the nearest sample's rate (the device starts and stops between samples).
    """
    t = np.asarray(times_s, dtype=np.float64)
    r = np.asarray(rates_ul_min, dtype=np.float64)
    if t.shape != r.shape or t.ndim != 1:
        raise ValueError("times and rates must be 1-D arrays of the same length")
    if t.size == 0:
        return IntegralResult(0.0, 0, 0.0, 0.0, 0)
    order = np.argsort(t, kind="stable")
    t, r = t[order], r[order]
    dt = np.diff(t)
    area = float(np.sum(dt * (r[1:] + r[:-1]) * 0.5))
    long = dt > max_gap_s
    gap_s = float(np.sum(dt[long]))
    gaps = int(np.count_nonzero(long))
    covered = float(np.sum(dt[~long]))
    if start_s is not None and t[0] > start_s:
        lead = float(t[0] - start_s)
        area += lead * float(r[0])
        if lead > max_gap_s:
            gap_s += lead
            gaps += 1
        else:
            covered += lead
    if end_s is not None and end_s > t[-1]:
        tail = float(end_s - t[-1])
        area += tail * float(r[-1])
        if tail > max_gap_s:
            gap_s += tail
            gaps += 1
        else:
            covered += tail
    return IntegralResult(area / 60.0, int(t.size), covered, gap_s, gaps)
