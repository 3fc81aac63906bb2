"""SpO2 safety overlay: a pulse oximeter watching each nebulization and the half hour after it.

Pure logic (STYLE items 5-7): timestamped oximeter samples and session
boundaries in, typed events out. No sockets, no clock of its own, no globals:
every input carries ``t_s``, the gateway's monotonic-like receive time in
seconds, so the same stream always gives the same events, live or replayed.
The caller publishes what comes out (alerts QoS 1 on their own topic, the
summary inside the dose event, the post-dose summary once the window closes).

One :class:`Spo2Monitor` per subject (one oximeter beside one nebulizer):

- :meth:`~Spo2Monitor.feed` every sample, also between sessions: valid samples
  of the last ``baseline_window_s`` are kept in a bounded ring for the baseline.
- :meth:`~Spo2Monitor.session_started` with the dose's correlation id (the
  dose event's ``event_id``). Baseline = median SpO2 and pulse of the valid
  samples in ``[start - baseline_window_s, start)`` (``pre_session``); if
  there are none, of the valid samples in the session's first
  ``baseline_fallback_s`` (``first_minute``, flagged); if none either,
  ``unavailable``. The relative criterion applies once the baseline is known
  (with the first-minute fallback: from the end of that minute); the absolute
  one from the start.
- :meth:`~Spo2Monitor.session_ended` returns :class:`SessionSpo2Summary` for
  the dose event and opens the observation window (``observation_window_s``).
- :meth:`~Spo2Monitor.tick` (or any later input) closes the window when its
  time has come and returns :class:`PostDoseSummary`.

Desaturation (on valid samples only). A valid sample is *low* if its SpO2 is
at least ``drop_points`` below the baseline (``relative_drop``) or below
``absolute_threshold`` (``absolute_below_90``). A run of low valid samples
starts at the first one; a valid non-low sample ends a run that has not yet
lasted ``sustain_s``. When a low valid sample arrives ``sustain_s`` or more
after the run's first one, the run is a desaturation and
:class:`SafetyAlertRaised` is returned at once, stamped with that sample's
time. It clears (:class:`SafetyAlertCleared`) when valid non-low samples have
been seen for ``clear_s`` without a low one in between; the event's duration
runs to the first of those recovery samples.

Samples that are not ``sample.valid`` (artefact, low perfusion, no finger,
sensor off, missing values, ...) are excluded and counted: they neither start
nor end an event, and their values are never looked at. Gaps: a stretch
without valid samples (invalid samples, or none) up to ``max_sample_gap_s``
inside a run is bridged, the run simply continues. A longer one resets a run
that has not yet reached ``sustain_s`` (the sustain must be shown by data, so
an artefact burst cannot stitch two low readings into an alert), but never
ends a raised event: the alert stays raised (nobody has seen the SpO2 come
back), the gap counts in the event's duration and in its ``invalid_gap_s``,
and a recovery in progress must start again (recovery must be shown by
``clear_s`` of continuous valid data too).

Coverage: a sample *holds* from its time to the next sample (or link drop),
at most ``max_sample_gap_s``; coverage % is the time held by valid samples
over the window's time, and time below the threshold is the time held by
valid samples below ``absolute_threshold``. Means are plain means of the
valid samples (devices sample at a fixed rate).

Windows: ``session`` = [start, end), ``observation`` = [end, end +
observation_window_s), ``session_and_observation`` = [start, end +
observation_window_s). Alerts continue through the observation window. An
alert still raised when the window closes is closed with ``clear_reason``
"monitoring_ended" (the desaturation is reported ``ongoing``), so no alert is
left dangling. A session starting before the previous dose's window closed
cuts that window short (``observation_truncated``, alerts "superseded").
Times that go backwards are treated as the latest time seen (and counted in
:attr:`Spo2Monitor.out_of_order`).
"""

from __future__ import annotations

import statistics
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from operator import sub
from typing import Literal

from devicegw.config import Spo2Rules
from devicegw.contract.spo2 import (
    BaselineOut,
    DesaturationKind,
    DesaturationOut,
    MonitoringState,
    OximeterRef,
    PostDoseSafetySummary,
    SafetyAlert,
    Spo2Summary,
    Spo2WindowStats,
    UnavailableReason,
)
from drivers.oximeter.sample import OximeterSample

__all__ = [
    "RING_MAX_SAMPLES",
    "PostDoseSummary",
    "SafetyAlertCleared",
    "SafetyAlertRaised",
    "SessionSpo2Summary",
    "Spo2Context",
    "Spo2Event",
    "Spo2Monitor",
    "unavailable_summary",
]

#: Hard cap of the baseline ring (100 Hz for over 5 minutes); the newest samples are kept.
RING_MAX_SAMPLES = 32_768


@dataclass(frozen=True, slots=True)
class Spo2Context:
    """Who is being watched: copied into every payload."""

    gateway_id: str
    subject_id: str | None  # None: the bed was unassigned at the session's start
    bed: str
    device_id: str  # the nebulizer
    oximeter: OximeterRef | None  # None: no oximeter assigned to this bed


@dataclass(frozen=True, slots=True)
class SafetyAlertRaised:
    t_s: float
    alert: SafetyAlert


@dataclass(frozen=True, slots=True)
class SafetyAlertCleared:
    t_s: float
    alert: SafetyAlert


@dataclass(frozen=True, slots=True)
class SessionSpo2Summary:
    """At session end: the summary to embed in the dose-completion event."""

    t_s: float
    correlation_id: uuid.UUID
    summary: Spo2Summary


@dataclass(frozen=True, slots=True)
class PostDoseSummary:
    """When the observation window closes: publish ``summary``."""

    t_s: float
    correlation_id: uuid.UUID
    summary: PostDoseSafetySummary


Spo2Event = SafetyAlertRaised | SafetyAlertCleared | SessionSpo2Summary | PostDoseSummary


def unavailable_summary(
    correlation_id: uuid.UUID,
    reason: UnavailableReason,
    rules: Spo2Rules,
    *,
    session_s: float = 0.0,
    oximeter: OximeterRef | None = None,
) -> Spo2Summary:
    """The summary for a session nobody monitored (e.g. no oximeter assigned to the bed)."""
    return Spo2Summary(
        correlation_id=correlation_id,
        spo2_monitoring="unavailable",
        unavailable_reason=reason,
        oximeter=oximeter,
        baseline=BaselineOut(spo2=None, pulse_bpm=None, source="unavailable", n_samples=0),
        session=_Stats(0.0, 0.0).out(0.0, [], closed_at=max(0.0, session_s)),
        alerts_raised=0,
        flags=[],
        rules=rules.out(),
    )


# --------------------------------------------------------------------------- internals


def _r(x: float, nd: int = 3) -> float:
    return round(x, nd)


@dataclass(slots=True)
class _Stats:
    """Accumulators of one window [start, end)."""

    start: float
    end: float | None = None
    total: int = 0
    valid: int = 0
    excluded_flags: Counter[str] = field(default_factory=Counter)
    sum_spo2: float = 0.0
    sum_pulse: float = 0.0
    nadir: float | None = None
    nadir_t: float = 0.0
    covered_s: float = 0.0
    below_s: float = 0.0
    link_down_seen: bool = False

    def contains(self, t: float) -> bool:
        return t >= self.start and (self.end is None or t < self.end)

    def add_sample(self, t: float, sample: OximeterSample, valid: bool) -> None:
        """Count one sample; ``valid`` is ``sample.valid`` (the caller has it already)."""
        if t < self.start or (self.end is not None and t >= self.end):
            return
        self.total += 1
        if not valid:
            gating = sample.gating
            self.excluded_flags.update([str(f) for f in gating] if gating else ["missing_value"])
            return
        assert sample.spo2 is not None and sample.pulse_bpm is not None
        self.valid += 1
        self.sum_spo2 += sample.spo2
        self.sum_pulse += sample.pulse_bpm
        if self.nadir is None or sample.spo2 < self.nadir:
            self.nadir, self.nadir_t = sample.spo2, t

    def add_hold(self, a: float, b: float, below: bool) -> None:
        """A valid sample held over [a, b)."""
        lo = max(a, self.start)
        hi = b if self.end is None else min(b, self.end)
        if hi > lo:
            self.covered_s += hi - lo
            if below:
                self.below_s += hi - lo

    def out(
        self,
        origin: float,
        desats: list[DesaturationOut],
        *,
        closed_at: float | None = None,
        extra_hold: tuple[float, float, bool] | None = None,
    ) -> Spo2WindowStats:
        end = self.end if closed_at is None else closed_at
        assert end is not None
        covered, below = self.covered_s, self.below_s
        if extra_hold is not None:  # the last sample's hold, not final yet
            a, b, is_below = extra_hold
            lo, hi = max(a, self.start), min(b, end)
            if hi > lo:
                covered += hi - lo
                below += (hi - lo) if is_below else 0.0
        span = end - self.start
        return Spo2WindowStats(
            start_offset_s=_r(self.start - origin),
            end_offset_s=_r(end - origin),
            samples_total=self.total,
            samples_valid=self.valid,
            samples_excluded=self.total - self.valid,
            excluded_by_flag=dict(sorted(self.excluded_flags.items())),
            coverage_pct=_r(min(100.0, 100.0 * covered / span), 1) if span > 0 else 0.0,
            nadir_spo2=self.nadir,
            nadir_offset_s=None if self.nadir is None else _r(self.nadir_t - origin),
            mean_spo2=_r(self.sum_spo2 / self.valid, 2) if self.valid else None,
            mean_pulse_bpm=_r(self.sum_pulse / self.valid, 2) if self.valid else None,
            time_below_threshold_s=_r(below),
            desaturations=desats,
            alert_time_without_valid_data_s=_r(sum(d.invalid_gap_s for d in desats)),
        )


@dataclass(slots=True)
class _Desat:
    """A run of low valid samples; a desaturation once ``raised_at`` is set."""

    start: float
    last_low: float
    nadir: float
    nadir_t: float
    relative: bool = False
    absolute: bool = False
    raised_at: float | None = None
    alert_no: int = 0
    recovery_start: float | None = None
    end: float | None = None  # first recovery sample of the clearing run
    covered: list[list[float]] = field(default_factory=list)  # merged valid holds

    @property
    def kind(self) -> DesaturationKind:
        if self.relative and self.absolute:
            return "both"
        return "relative_drop" if self.relative else "absolute_below_90"

    def add_cover(self, a: float, b: float) -> None:
        a = max(a, self.start)
        if b <= a:
            return
        if self.covered and a <= self.covered[-1][1]:
            self.covered[-1][1] = max(self.covered[-1][1], b)
        else:
            self.covered.append([a, b])

    def out(
        self, origin: float, until: float, extra_hold: tuple[float, float] | None
    ) -> DesaturationOut:
        end = self.end if self.end is not None and self.end <= until else None
        stop = until if end is None else end
        covered = sum(max(0.0, min(b, stop) - a) for a, b in self.covered)
        if extra_hold is not None and end is None:
            covered += max(0.0, min(extra_hold[1], stop) - max(extra_hold[0], self.start))
        duration = stop - self.start
        return DesaturationOut(
            start_offset_s=_r(self.start - origin),
            duration_s=_r(duration),
            nadir_spo2=self.nadir,
            nadir_offset_s=_r(self.nadir_t - origin),
            kind=self.kind,
            ongoing=end is None,
            invalid_gap_s=_r(max(0.0, duration - covered)),
        )


@dataclass(slots=True)
class _Dose:
    correlation_id: uuid.UUID
    start: float
    start_utc: datetime | None
    baseline_spo2: float | None = None
    baseline_pulse: float | None = None
    baseline_source: Literal["pre_session", "first_minute", "unavailable"] = "unavailable"
    baseline_n: int = 0
    baseline_final: bool = False
    fallback: list[tuple[float, float, float]] = field(default_factory=list)  # (t, spo2, pulse)
    end: float | None = None
    obs_end: float | None = None
    session: _Stats = field(init=False)
    observation: _Stats | None = None
    combined: _Stats = field(init=False)
    run: _Desat | None = None
    desats: list[_Desat] = field(default_factory=list)  # raised ones, in order
    alerts_raised: int = 0
    last_valid_t: float | None = None
    flags: list[str] = field(default_factory=list)
    #: session, combined and (once open) observation: what windows() returns, kept
    #: rather than rebuilt twice per sample.
    _windows: tuple[_Stats, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.session = _Stats(self.start)
        self.combined = _Stats(self.start)
        self._windows = (self.session, self.combined)

    def flag(self, name: str) -> None:
        if name not in self.flags:
            self.flags.append(name)

    def open_observation(self, observation: _Stats) -> None:
        self.observation = observation
        self._windows = (self.session, self.combined, observation)

    def windows(self) -> tuple[_Stats, ...]:
        return self._windows

    def baseline_out(self) -> BaselineOut:
        return BaselineOut(
            spo2=self.baseline_spo2,
            pulse_bpm=self.baseline_pulse,
            source=self.baseline_source,
            n_samples=self.baseline_n,
        )


class Spo2Monitor:
    """SpO2 overlay for one subject; see the module docstring for the rules."""

    def __init__(self, rules: Spo2Rules, context: Spo2Context) -> None:
        self.rules = rules
        self.context = context
        self.out_of_order = 0
        self._ring: deque[tuple[float, float, float]] = deque(maxlen=RING_MAX_SAMPLES)
        self._last_t: float | None = None
        # The latest sample still holding: (time, valid, spo2 below threshold).
        self._hold: tuple[float, bool, bool] | None = None
        self._link_up = True
        self._dose: _Dose | None = None

    # ------------------------------------------------------------------ inputs

    @property
    def correlation_id(self) -> uuid.UUID | None:
        """The dose being monitored (session or observation window), if any."""
        return None if self._dose is None else self._dose.correlation_id

    def feed(self, t_s: float, sample: OximeterSample) -> list[Spo2Event]:
        last = self._last_t
        if last is not None and t_s < last:
            t = self._time(t_s)
        else:
            self._last_t = t = t_s  # in order (nearly always): what _time decides, inline
        valid = sample.valid
        spo2 = sample.spo2
        rules = self.rules
        below = valid and spo2 is not None and spo2 < rules.absolute_threshold
        dose = self._dose
        if dose is None:
            # Between doses (most of a ward's day) only the baseline ring is kept (what
            # _keep does, inline): _advance has no deadline without a dose, and a hold
            # counts only in a dose's windows.
            self._hold = (t, valid, below)
            self._link_up = True
            if valid:
                ring = self._ring
                ring.append((t, spo2, sample.pulse_bpm))  # type: ignore[arg-type]
                horizon = t - rules.baseline_window_s
                if ring[0][0] < horizon:  # one out for one in, once the window is full
                    ring.popleft()
                    if ring[0][0] < horizon:
                        self._trim(ring, t)
            return []
        events = self._advance(t)
        self._end_hold(t)
        self._hold = (t, valid, below)
        self._link_up = True
        if valid:
            self._keep(t, sample)
        dose = self._dose
        if dose is None:
            return events
        for w in dose.windows():
            w.add_sample(t, sample, valid)
        if not valid:
            return events
        assert sample.spo2 is not None and sample.pulse_bpm is not None
        if not dose.baseline_final and t < dose.start + self.rules.baseline_fallback_s:
            dose.fallback.append((t, sample.spo2, sample.pulse_bpm))
        events += self._detect(dose, t, sample.spo2)
        dose.last_valid_t = t
        return events

    def _keep(self, t: float, sample: OximeterSample) -> None:
        """A valid sample into the baseline ring; older than the baseline window drops out."""
        assert sample.spo2 is not None and sample.pulse_bpm is not None
        ring = self._ring
        ring.append((t, sample.spo2, sample.pulse_bpm))
        self._trim(ring, t)

    def _trim(self, ring: deque[tuple[float, float, float]], t: float) -> None:
        horizon = t - self.rules.baseline_window_s
        while ring and ring[0][0] < horizon:
            ring.popleft()

    def session_started(
        self, t_s: float, correlation_id: uuid.UUID, *, start_utc: datetime | None = None
    ) -> list[Spo2Event]:
        """A nebulization session began; ``start_utc`` (if known) dates the published events."""
        t = self._time(t_s)
        events = self._advance(t)
        prev = self._dose
        if prev is not None:
            if prev.end is None:
                prev.flag("session_end_missed")
                events += self._end_session(prev, t)
            if self._dose is prev:
                prev.flag("observation_truncated")
                events += self._close(prev, t, truncated=True)
        dose = _Dose(correlation_id=correlation_id, start=t, start_utc=start_utc)
        lo = t - self.rules.baseline_window_s
        pre = [(ts, s, p) for (ts, s, p) in self._ring if lo <= ts < t]
        if pre and self._covered_s(pre, t) >= self.rules.baseline_min_valid_s:
            self._set_baseline(dose, pre, "pre_session")
        elif pre:
            dose.flag("baseline_pre_session_inadequate")
        if not self._link_up:
            for w in dose.windows():
                w.link_down_seen = True
        self._dose = dose
        return events

    def session_ended(self, t_s: float) -> list[Spo2Event]:
        """The session ended: its summary now; the observation window starts."""
        t = self._time(t_s)
        events = self._advance(t)
        dose = self._dose
        if dose is None or dose.end is not None:
            return events
        return events + self._end_session(dose, t)

    def tick(self, t_s: float) -> list[Spo2Event]:
        """Let time pass without a sample: closes the observation window when it is due."""
        last = self._last_t
        if last is not None and t_s < last:
            t = self._time(t_s)
        else:
            self._last_t = t = t_s  # in order: what _time decides, inline (a tick a second)
        return [] if self._dose is None else self._advance(t)

    def link_down(self, t_s: float) -> list[Spo2Event]:
        """The oximeter link broke: the last sample holds no longer than now."""
        t = self._time(t_s)
        events = self._advance(t)
        self._end_hold(t)
        self._hold = None
        self._link_up = False
        if self._dose is not None:
            self._dose.flag("link_interrupted")
            for w in self._dose.windows():
                if w.contains(t):
                    w.link_down_seen = True
        return events

    def link_up(self, t_s: float) -> list[Spo2Event]:
        t = self._time(t_s)
        events = self._advance(t)
        self._link_up = True
        return events

    # ------------------------------------------------------------------ time

    def _time(self, t: float) -> float:
        if self._last_t is not None and t < self._last_t:
            self.out_of_order += 1
            t = self._last_t
        self._last_t = t
        return t

    def _advance(self, t: float) -> list[Spo2Event]:
        """Deadlines up to ``t``: the first-minute baseline, then the window's end."""
        dose = self._dose
        if dose is None:
            return []
        if not dose.baseline_final and t >= dose.start + self.rules.baseline_fallback_s:
            self._finish_baseline(dose)
        if dose.obs_end is not None and t >= dose.obs_end:
            return self._close(dose, dose.obs_end, truncated=False)
        return []

    def _end_hold(self, t: float) -> None:
        """Finalise the latest sample's hold interval, which ends at ``t`` (or earlier)."""
        hold = self._hold
        if hold is None:
            return
        t0, valid, below = hold
        if not valid:
            return
        t1 = min(t, t0 + self.rules.max_sample_gap_s)
        dose = self._dose
        if dose is None or t1 <= t0:
            return
        for w in dose.windows():
            w.add_hold(t0, t1, below)
        if dose.run is not None:
            dose.run.add_cover(t0, t1)

    def _pending_hold(self, until: float) -> tuple[float, float, bool] | None:
        hold = self._hold
        if hold is None or not hold[1]:
            return None
        return hold[0], min(until, hold[0] + self.rules.max_sample_gap_s), hold[2]

    # ------------------------------------------------------------------ baseline

    def _covered_s(self, values: list[tuple[float, float, float]], until: float) -> float:
        """Seconds the valid samples ``(t, spo2, pulse)`` speak for, each for at most
        ``max_sample_gap_s`` (a baseline needs enough of them, not one reading)."""
        gap = self.rules.max_sample_gap_s
        times = [v[0] for v in values]
        ends = times[1:]
        ends.append(until)
        # min(max(0.0, end - t), gap) per sample, summed in order (a non-positive span adds
        # nothing): 4x cheaper than the min/max calls, for a 5-minute baseline's ~900
        # samples judged at each session's start and end (issue 13).
        return sum((d if d < gap else gap for d in map(sub, ends, times) if d > 0.0), 0.0)

    def _set_baseline(
        self,
        dose: _Dose,
        values: list[tuple[float, float, float]],
        source: Literal["pre_session", "first_minute"],
    ) -> None:
        dose.baseline_spo2 = _r(statistics.median(v[1] for v in values), 2)
        dose.baseline_pulse = _r(statistics.median(v[2] for v in values), 2)
        dose.baseline_source = source
        dose.baseline_n = len(values)
        dose.baseline_final = True
        dose.fallback = []
        if dose.baseline_spo2 < self.rules.absolute_threshold:
            # Already below the threshold: only a drop from here is a desaturation, or
            # the subject would be alerted at every dose for standing still.
            dose.flag("low_baseline")

    def _finish_baseline(self, dose: _Dose) -> None:
        end = dose.start + self.rules.baseline_fallback_s
        if dose.fallback and self._covered_s(dose.fallback, end) >= self.rules.baseline_min_valid_s:
            self._set_baseline(dose, dose.fallback, "first_minute")
            dose.flag("baseline_first_minute")
        else:
            dose.baseline_final = True
            dose.fallback = []
            dose.flag("baseline_unavailable")

    # ------------------------------------------------------------------ detection

    def _detect(self, dose: _Dose, t: float, spo2: float) -> list[Spo2Event]:
        rules = self.rules
        base = dose.baseline_spo2
        relative = base is not None and base - spo2 >= rules.drop_points
        low_baseline = base is not None and base < rules.absolute_threshold
        absolute = spo2 < rules.absolute_threshold and not low_baseline
        low = relative or absolute
        run = dose.run
        if (
            run is not None
            and dose.last_valid_t is not None
            and t - dose.last_valid_t > rules.max_sample_gap_s
        ):
            if run.raised_at is None:
                run = dose.run = None  # the sustain must be shown by data
            else:
                run.recovery_start = None  # and so must the recovery
        if run is None:
            if not low:
                return []
            run = dose.run = _Desat(start=t, last_low=t, nadir=spo2, nadir_t=t)
        if low:
            run.last_low = t
            run.recovery_start = None
            run.relative |= relative
            run.absolute |= absolute
            if spo2 < run.nadir:
                run.nadir, run.nadir_t = spo2, t
            if run.raised_at is None:
                if t - run.start >= rules.sustain_s:
                    return [self._raise(dose, run, t, spo2)]
                return []
            return []
        if run.raised_at is None:
            dose.run = None  # a dip shorter than the sustain time
            return []
        if run.recovery_start is None:
            run.recovery_start = t
        if t - run.recovery_start >= rules.clear_s:
            run.end = run.recovery_start
            dose.run = None
            return [self._clear(dose, run, t, spo2, "recovered")]
        return []

    def _raise(self, dose: _Dose, run: _Desat, t: float, spo2: float) -> SafetyAlertRaised:
        run.raised_at = t
        dose.alerts_raised += 1
        run.alert_no = dose.alerts_raised
        dose.desats.append(run)
        return SafetyAlertRaised(t, self._alert(dose, run, t, spo2, "raised", None))

    def _clear(
        self,
        dose: _Dose,
        run: _Desat,
        t: float,
        spo2: float | None,
        reason: Literal["recovered", "monitoring_ended", "superseded"],
    ) -> SafetyAlertCleared:
        return SafetyAlertCleared(t, self._alert(dose, run, t, spo2, "cleared", reason))

    def _alert(
        self,
        dose: _Dose,
        run: _Desat,
        t: float,
        spo2: float | None,
        state: Literal["raised", "cleared"],
        reason: Literal["recovered", "monitoring_ended", "superseded"] | None,
    ) -> SafetyAlert:
        ctx = self.context
        alert_id = uuid.uuid5(dose.correlation_id, f"safety_alert/{run.alert_no}")
        offset = t - dose.start
        end = run.end if run.end is not None else t
        return SafetyAlert(
            event_id=uuid.uuid5(alert_id, state),
            alert_id=alert_id,
            state=state,
            clear_reason=reason,
            correlation_id=dose.correlation_id,
            gateway_id=ctx.gateway_id,
            subject_id=ctx.subject_id,
            bed=ctx.bed,
            device_id=ctx.device_id,
            oximeter_device_id=None if ctx.oximeter is None else ctx.oximeter.device_id,
            phase="session" if dose.end is None or t < dose.end else "observation",
            offset_s=_r(offset),
            utc=None if dose.start_utc is None else dose.start_utc + timedelta(seconds=offset),
            kind=run.kind,
            spo2=spo2,
            nadir_spo2=run.nadir,
            baseline_spo2=dose.baseline_spo2,
            baseline_source=dose.baseline_source if dose.baseline_final else "unavailable",
            desaturation_start_offset_s=_r(run.start - dose.start),
            duration_s=_r(end - run.start),
        )

    # ------------------------------------------------------------------ windows

    def _monitoring(
        self, w: _Stats, stats: Spo2WindowStats
    ) -> tuple[MonitoringState, UnavailableReason | None]:
        if self.context.oximeter is None:
            return "unavailable", "no_oximeter_assigned"
        if w.valid:
            if stats.coverage_pct < self.rules.min_coverage_pct:
                return "monitoring_inadequate", None
            return "monitored", None
        if w.link_down_seen:
            return "unavailable", "oximeter_disconnected"
        return "unavailable", "no_samples" if w.total == 0 else "no_valid_samples"

    def _desats_out(
        self, dose: _Dose, lo: float, until: float, extra: tuple[float, float, bool] | None
    ) -> list[DesaturationOut]:
        """Desaturations overlapping [lo, until), as known at ``until``."""
        hold = None if extra is None else (extra[0], extra[1])
        return [
            d.out(dose.start, until, hold)
            for d in dose.desats
            if d.start < until and (d.end is None or d.end > lo)
        ]

    def _end_session(self, dose: _Dose, t: float) -> list[Spo2Event]:
        if not dose.baseline_final:
            self._finish_baseline(dose)
        dose.end = t
        dose.session.end = t
        dose.obs_end = t + self.rules.observation_window_s
        dose.combined.end = dose.obs_end
        dose.open_observation(_Stats(t, dose.obs_end, link_down_seen=not self._link_up))
        extra = self._pending_hold(t)
        session_stats = dose.session.out(
            dose.start, self._desats_out(dose, dose.start, t, extra), extra_hold=extra
        )
        state, reason = self._monitoring(dose.session, session_stats)
        summary = Spo2Summary(
            correlation_id=dose.correlation_id,
            spo2_monitoring=state,
            unavailable_reason=reason,
            oximeter=self.context.oximeter,
            baseline=dose.baseline_out(),
            session=session_stats,
            alerts_raised=dose.alerts_raised,
            flags=list(dose.flags),
            rules=self.rules.out(),
        )
        events: list[Spo2Event] = [SessionSpo2Summary(t, dose.correlation_id, summary)]
        if dose.obs_end <= t:
            events += self._close(dose, t, truncated=False)
        return events

    def _close(self, dose: _Dose, t: float, *, truncated: bool) -> list[Spo2Event]:
        """Close the observation window at ``t``: the post-dose summary."""
        assert dose.end is not None and dose.observation is not None
        events: list[Spo2Event] = []
        run = dose.run
        if run is not None and run.raised_at is not None:
            reason: Literal["superseded", "monitoring_ended"] = (
                "superseded" if truncated else "monitoring_ended"
            )
            events.append(self._clear(dose, run, t, None, reason))
        dose.run = None
        extra = self._pending_hold(t)
        dose.observation.end = t
        dose.combined.end = t
        combined_stats = dose.combined.out(
            dose.start, self._desats_out(dose, dose.start, t, extra), extra_hold=extra
        )
        state, reason_code = self._monitoring(dose.combined, combined_stats)
        ctx = self.context
        summary = PostDoseSafetySummary(
            event_id=uuid.uuid5(dose.correlation_id, "post_dose_safety_summary"),
            correlation_id=dose.correlation_id,
            gateway_id=ctx.gateway_id,
            subject_id=ctx.subject_id,
            bed=ctx.bed,
            device_id=ctx.device_id,
            oximeter=ctx.oximeter,
            spo2_monitoring=state,
            unavailable_reason=reason_code,
            session_start_utc=dose.start_utc,
            session_end_offset_s=_r(dose.end - dose.start),
            observation_end_offset_s=_r(t - dose.start),
            observation_truncated=truncated,
            baseline=dose.baseline_out(),
            session_and_observation=combined_stats,
            observation=dose.observation.out(
                dose.start,
                self._desats_out(dose, dose.end, t, extra),
                extra_hold=extra,
            ),
            alerts_raised=dose.alerts_raised,
            flags=list(dose.flags),
            rules=self.rules.out(),
        )
        events.append(PostDoseSummary(t, dose.correlation_id, summary))
        self._dose = None
        return events
