"""Follows one nebulizer's treatment sessions from its timestamped message stream.

Pure logic: messages in (each with the gateway's receive time), tracker events
out. No sockets, no clocks of its own, no globals, so the same stream always
yields the same sessions, live or replayed. Device times (``dev_ms``) are
unwrapped across the 2^32 ms wrap and are the timebase of every duration; the
gateway's UTC receive times are kept beside them.

Uptime that goes backwards is a device restart, not a wrap, unless it goes from
the last hour before 2^32 ms to the first hour after 0: a session open across a
restart is finished from the device's record, or from what was seen
(``device_restarted``), never with a negative or wrapped duration. A pause open
when the link drops ends at the drop and is marked ``cut_by_link``: the time
without a link is link-down time, not pause time.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from devicegw.contract.vocabulary import DataSource, Reason
from drivers.vm1.messages import (
    Alarm,
    DeviceMessage,
    DeviceState,
    EndReason,
    Ident,
    Output,
    SessionEnd,
    SessionRecord,
    SessionStart,
    Status,
)

_WRAP = 1 << 32
#: Uptime going from within this much of 2^32 ms to within this much of 0 is a wrap;
#: any other step backwards is a device restart.
_WRAP_WINDOW_MS = 3_600_000
#: Uptime a little behind the latest is reordering (BLE delivers notifications and
#: indications of different characteristics separately), not a restart.
_REORDER_MS = 5_000
#: A VM-1 reading of the reservoir level that means "unknown" (ICD: tilted, sensor blind).
RESERVOIR_UNKNOWN_UL = 0xFFFF
IN_SESSION = (DeviceState.NEBULIZING, DeviceState.PAUSED)
# Consecutive out-of-session STATUS messages before a missing SESSION_END is fetched.
_END_MISSED_AFTER = 2


class Rx(NamedTuple):
    """A decoded message with the gateway's clock readings at receipt.

    Immutable like a frozen dataclass, and built for every message received: a
    NamedTuple costs a third of one to make.
    """

    msg: DeviceMessage
    utc: datetime
    mono: float


@dataclass(frozen=True, slots=True)
class AlarmSpan:
    code: int
    raised_s: float | None  # seconds from session start; None if raised before it
    cleared_s: float | None  # None if still active at session end


@dataclass(frozen=True, slots=True)
class Pause:
    start_s: float  # seconds from session start
    duration_s: float
    cut_by_link: bool = False  # the link dropped during it: ends at the drop, true end unknown


@dataclass(frozen=True, slots=True)
class FinishedSession:
    """Everything known about one ended session, ready for the dose check."""

    session_no: int
    data_source: DataSource
    end_reason: EndReason | None  # None: the device's record of the end was unavailable
    fill_ul: int | None  # None: the level sensor read unknown (0xFFFF)
    residual_ul: int | None
    device_cum_ul: int | None  # None: the device never reported a total
    neb_ms: int | None  # None: unknown (the device's record was unavailable)
    duration_s: float | None  # device time from SESSION_START to SESSION_END
    gateway_start_utc: datetime | None
    gateway_end_utc: datetime
    device_start_wall_s: int | None  # device clock (Unix s) at start; None if never set
    device_end_wall_s: int | None
    device_start_ms: int | None  # raw dev_ms (uptime) at start / end
    device_end_ms: int | None
    #: OUTPUT sample times from session start (device time) and their rates: arrays, so
    #: the volume estimate takes them as they are (a tuple of a 5-minute dose's 3,000 floats
    #: costs more to build and to convert than the estimate itself).
    sample_times_s: Sequence[float]
    sample_rates_ul_min: Sequence[int]
    pauses: tuple[Pause, ...]
    alarms: tuple[AlarmSpan, ...]
    link_interruptions: int
    link_down_s: float
    frames_lost: int
    bad_frames: int
    flags: tuple[Reason, ...]
    #: With ``duration_s`` unknown: the least the session lasted (neb_ms, or what was seen).
    duration_at_least_s: float | None = None
    #: From the device's IDENT: what its reservoir holds and how fast it nebulizes.
    reservoir_capacity_ul: int | None = None
    nominal_rate_ul_min: int | None = None


@dataclass(frozen=True, slots=True)
class SessionStarted:
    session_no: int
    fill_ul: int | None


@dataclass(frozen=True, slots=True)
class SessionFinished:
    session: FinishedSession


@dataclass(frozen=True, slots=True)
class StateChanged:
    old: DeviceState | None
    new: DeviceState
    status: Status


@dataclass(frozen=True, slots=True)
class AlarmChanged:
    code: int
    active: bool


@dataclass(frozen=True, slots=True)
class FetchSessionRecord:
    """Ask the device for a session's record (GET_SESSION): its end was not seen live."""

    session_no: int


#: OUTPUT samples closer than this (device time) to the last kept one are not kept.
MIN_SAMPLE_SPACING_S = 0.015

TrackerEvent = SessionStarted | SessionFinished | StateChanged | AlarmChanged | FetchSessionRecord


@dataclass(slots=True)
class _Open:
    session_no: int
    fill_ul: int | None
    wall_s: int
    start_dev: float  # unwrapped device seconds
    start_raw_ms: int
    start_utc: datetime
    # The samples, packed (8 bytes each rather than a Python object per number: a session
    # flooded to millions of samples holds 16 B a sample, not ~68; issue 13).
    times: array[float] = field(default_factory=lambda: array("d"))
    rates: array[int] = field(default_factory=lambda: array("q"))
    last_cum_ul: int = 0
    # [start_dev, end_dev (-1 while open), 1.0 if cut by a link drop else 0.0]
    pauses: list[list[float]] = field(default_factory=list)
    alarms: list[list[float | int | None]] = field(default_factory=list)  # [code, raised, cleared]
    link_interruptions: int = 0
    link_down_s: float = 0.0
    frames_lost: int = 0
    bad_frames: int = 0
    flags: list[Reason] = field(default_factory=list)
    out_of_session_statuses: int = 0
    fetch_requested: bool = False
    last_dev: float = 0.0
    last_utc: datetime | None = None

    def to_json(self) -> dict[str, object]:
        """Everything needed to finish this session after a gateway restart."""
        out: dict[str, object] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            out[name] = value.isoformat() if isinstance(value, datetime) else value
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> _Open:
        values = dict(data)
        for name in ("start_utc", "last_utc"):
            if values.get(name) is not None:
                values[name] = datetime.fromisoformat(values[name])
        values["flags"] = [Reason(f) for f in values.get("flags", [])]
        values["times"] = array("d", values.get("times", []))
        values["rates"] = array("q", values.get("rates", []))
        # Journals written before pauses carried their cut flag hold [start, end].
        values["pauses"] = [[*p, 0.0] if len(p) == 2 else p for p in values.get("pauses", [])]
        return cls(**values)

    def close_pause(self, end_dev: float, *, cut: bool = False) -> None:
        if self.pauses and self.pauses[-1][1] < 0:
            self.pauses[-1][1] = end_dev
            self.pauses[-1][2] = 1.0 if cut else 0.0


class SessionTracker:
    """State machine for one VM-1: READY -> session open -> finished session."""

    def __init__(self, *, recent_limit: int = 64) -> None:
        self.identity: Ident | None = None
        self.status: Status | None = None
        self.active_alarms: set[int] = set()
        self._open: _Open | None = None
        self._finished: list[int] = []  # session numbers already finished (dedupe)
        self._recent_limit = recent_limit
        self._wrap_offset = 0
        self._last_raw_ms: int | None = None
        self._link_down_utc: datetime | None = None
        # Sessions whose end was missed, kept until the device's record arrives.
        self._awaiting: dict[int, _Open] = {}

    # -- restart recovery -------------------------------------------------------

    def snapshot(self) -> dict[str, object] | None:
        """The open session and the device-time unwrapping, for the journal."""
        if self._open is None:
            return None
        return {
            "open": self._open.to_json(),
            "wrap_offset": self._wrap_offset,
            "last_raw_ms": self._last_raw_ms,
        }

    def restore(self, snapshot: dict[str, Any], *, down_since: datetime) -> int:
        """Reopen a journaled session after a gateway restart; returns its session number.

        The time the gateway was away counts as a link interruption, and the
        session is flagged ``gateway_restart``: it will be finished from live
        data if the device is still in it, or from the device's session record.
        """
        o = _Open.from_json(snapshot["open"])
        o.link_interruptions += 1
        if Reason.GATEWAY_RESTART not in o.flags:
            o.flags.append(Reason.GATEWAY_RESTART)
        o.out_of_session_statuses = 0
        o.fetch_requested = False
        self._open = o
        self._wrap_offset = int(snapshot["wrap_offset"])
        raw = snapshot.get("last_raw_ms")
        self._last_raw_ms = None if raw is None else int(raw)
        self._link_down_utc = down_since
        return o.session_no

    def counter_reset(self) -> None:
        """The device's session numbers start again: the ones seen so far mean nothing."""
        self._finished.clear()

    # -- inputs ---------------------------------------------------------------

    @property
    def open_session_no(self) -> int | None:
        return self._open.session_no if self._open else None

    @property
    def open_session(self) -> _Open | None:
        return self._open

    def link_down(self, utc: datetime) -> None:
        self._link_down_utc = utc
        if self._open is not None:
            self._open.link_interruptions += 1
            # What the device did from here is unknown: a pause ends at the last thing seen.
            self._open.close_pause(self._open.last_dev, cut=True)

    def link_up(self, utc: datetime) -> None:
        if self._open is not None and self._link_down_utc is not None:
            # Never negative, even if the gateway clock was stepped back meanwhile.
            self._open.link_down_s += max(0.0, (utc - self._link_down_utc).total_seconds())
        self._link_down_utc = None

    def bad_frames(self, count: int) -> None:
        if self._open is not None:
            self._open.bad_frames += count

    def frames_lost(self, count: int) -> None:
        """Sequence gaps counted by the stream decoder (every device message, ACKs too)."""
        if self._open is not None:
            self._open.frames_lost += count

    def feed(self, rx: Rx) -> list[TrackerEvent]:
        msg = rx.msg
        raw_ms = msg.dev_ms
        last = self._last_raw_ms
        if last is not None and raw_ms >= last:
            # Uptime moving forward (nearly every message): what _restarted and _unwrap
            # decide for it, without the calls.
            self._last_raw_ms = raw_ms
            dev = (raw_ms + self._wrap_offset) / 1000.0
            if isinstance(msg, Output):
                self._on_output(msg, dev)
                return []
            if isinstance(msg, Status):
                return self._on_status(msg, dev)
            return self._dispatch(msg, dev, rx.utc, [])
        events: list[TrackerEvent] = []
        if self._restarted(raw_ms):
            events.extend(self._on_restart())
        return self._dispatch(msg, self._unwrap(raw_ms), rx.utc, events)

    def _dispatch(
        self, msg: DeviceMessage, dev: float, utc: datetime, events: list[TrackerEvent]
    ) -> list[TrackerEvent]:
        """``msg`` at unwrapped device time ``dev``; its events after ``events``."""
        if isinstance(msg, Output):
            self._on_output(msg, dev)
        elif isinstance(msg, Status):
            events.extend(self._on_status(msg, dev))
        elif isinstance(msg, SessionStart):
            events.extend(self._on_start(msg, dev, utc))
        elif isinstance(msg, SessionEnd):
            events.extend(self._on_end(msg, dev, utc))
        elif isinstance(msg, SessionRecord):
            events.extend(self._on_record(msg, utc))
        elif isinstance(msg, Alarm):
            events.extend(self._on_alarm(msg, dev))
        elif isinstance(msg, Ident):
            self.identity = msg
        return events  # an Ack changes nothing here

    def record_unavailable(self, session_no: int, utc: datetime) -> list[TrackerEvent]:
        """The device has no record of a session whose end was missed: finish it from
        what was seen (``session_record_unavailable``), rather than never."""
        o = self._awaiting.pop(session_no, None)
        if o is None and self._open is not None and self._open.session_no == session_no:
            if not self._open.fetch_requested:
                return []  # still running as far as the gateway knows: its end will come
            o = self._open
        if o is None or session_no in self._finished:
            return []
        o.close_pause(o.last_dev)
        if Reason.SESSION_RECORD_UNAVAILABLE not in o.flags:
            o.flags.append(Reason.SESSION_RECORD_UNAVAILABLE)
        seen = max(0.0, o.last_dev - o.start_dev)
        finished = self._finish(
            o,
            data_source=DataSource.LIVE,
            reason=None,
            residual_ul=None,
            cum_ul=o.last_cum_ul if o.times else None,
            neb_ms=None,
            duration_s=None,
            end_utc=utc,
            end_wall_s=None,
            end_raw_ms=None,
            duration_at_least_s=seen,
        )
        return [SessionFinished(finished)]

    # -- internals ------------------------------------------------------------

    def _restarted(self, raw_ms: int) -> bool:
        """Uptime went well back, and not across the 2^32 ms wrap: the device restarted."""
        last = self._last_raw_ms
        if last is None or raw_ms >= last - _REORDER_MS:
            return False
        return not _wrapped(last, raw_ms)

    def _on_restart(self) -> list[TrackerEvent]:
        """The device rebooted: its session is over; ask for its record, and start a new
        device timebase (a reboot is not a wrap)."""
        self._wrap_offset = 0
        self._last_raw_ms = None
        o = self._open
        if o is None:
            return []
        self._open = None
        o.close_pause(o.last_dev)
        if Reason.DEVICE_RESTARTED not in o.flags:
            o.flags.append(Reason.DEVICE_RESTARTED)
        self._awaiting[o.session_no] = o
        if o.fetch_requested:
            return []
        o.fetch_requested = True
        return [FetchSessionRecord(o.session_no)]

    def _unwrap(self, raw_ms: int) -> float:
        last = self._last_raw_ms
        if last is not None and raw_ms < last:
            if not _wrapped(last, raw_ms):
                # Slightly out of order: place it, but the latest time stays the latest.
                return (raw_ms + self._wrap_offset) / 1000.0
            self._wrap_offset += _WRAP
        self._last_raw_ms = raw_ms
        return (raw_ms + self._wrap_offset) / 1000.0

    def _on_output(self, msg: Output, dev: float) -> None:
        o = self._open
        if o is None:
            return
        t = dev - o.start_dev
        # Kept at most ~66 a second: the ICD's fastest OUTPUT rate is 50 Hz (SET_RATE), so
        # only a device flooding beyond it is thinned -- a session's memory then grows by
        # at most ~1 kB a second, not by whatever the link can carry (issue 13). A sample
        # out of order (earlier than the last) is kept, as before.
        if not o.times or not 0.0 <= t - o.times[-1] < MIN_SAMPLE_SPACING_S:
            o.times.append(t)
            o.rates.append(msg.rate_ul_min)
        o.last_cum_ul = msg.cum_ul
        o.last_dev = dev

    def _on_status(self, msg: Status, dev: float) -> list[TrackerEvent]:
        events: list[TrackerEvent] = []
        old = self.status.state if self.status else None
        self.status = msg
        o = self._open
        if o is not None:
            o.last_dev = max(o.last_dev, dev)
            if msg.state == DeviceState.PAUSED and not (o.pauses and o.pauses[-1][1] < 0):
                o.pauses.append([dev, -1.0, 0.0])
            elif msg.state != DeviceState.PAUSED:
                o.close_pause(dev)
            if msg.state in IN_SESSION:
                o.out_of_session_statuses = 0
            else:
                o.out_of_session_statuses += 1
                if o.out_of_session_statuses >= _END_MISSED_AFTER and not o.fetch_requested:
                    o.fetch_requested = True
                    if Reason.SESSION_END_MISSED not in o.flags:
                        o.flags.append(Reason.SESSION_END_MISSED)
                    events.append(FetchSessionRecord(o.session_no))
        if old != msg.state:
            events.append(StateChanged(old, msg.state, msg))
        return events

    def _on_start(self, msg: SessionStart, dev: float, utc: datetime) -> list[TrackerEvent]:
        events: list[TrackerEvent] = []
        if self._open is not None:
            if self._open.session_no == msg.session_no:
                return []  # repeated SESSION_START (e.g. resent after reconnect)
            prev = self._open
            if Reason.SESSION_END_MISSED not in prev.flags:
                prev.flags.append(Reason.SESSION_END_MISSED)
            if not prev.fetch_requested:
                prev.fetch_requested = True
                events.append(FetchSessionRecord(prev.session_no))
            self._awaiting[prev.session_no] = prev
            self._open = None
        reused = msg.session_no in self._finished
        if reused:
            # A device sends SESSION_START once, when a treatment starts: a finished number
            # starting again means its counter started again (board swap, re-flash).
            self._finished.clear()
        fill = None if msg.fill_ul == RESERVOIR_UNKNOWN_UL else msg.fill_ul
        self._open = _Open(
            session_no=msg.session_no,
            fill_ul=fill,
            wall_s=msg.wall_s,
            start_dev=dev,
            start_raw_ms=msg.dev_ms,
            start_utc=utc,
            last_dev=dev,
        )
        if reused:
            self._open.flags.append(Reason.DEVICE_COUNTER_RESET)
        events.append(SessionStarted(msg.session_no, fill))
        return events

    def _on_end(self, msg: SessionEnd, dev: float, utc: datetime) -> list[TrackerEvent]:
        o = self._open
        if msg.session_no in self._finished:
            return []
        if o is None or o.session_no != msg.session_no:
            # The start was not seen (gateway started mid-session): the device log has it.
            return [FetchSessionRecord(msg.session_no)]
        o.close_pause(dev)
        duration = dev - o.start_dev
        wall0 = o.wall_s or None
        finished = self._finish(
            o,
            data_source=DataSource.LIVE,
            reason=msg.reason,
            residual_ul=_level(msg.residual_ul),
            cum_ul=msg.cum_ul,
            neb_ms=msg.neb_ms,
            duration_s=duration,
            end_utc=utc,
            end_wall_s=(wall0 + round(duration)) if wall0 else None,
            end_raw_ms=msg.dev_ms,
        )
        return [SessionFinished(finished)]

    def _on_record(self, msg: SessionRecord, utc: datetime) -> list[TrackerEvent]:
        if msg.session_no in self._finished:
            return []
        o = self._open
        if o is None or o.session_no != msg.session_no:
            o = self._awaiting.pop(msg.session_no, None)
        elif o is self._open:
            self._open = None
        if o is not None:
            o.close_pause(o.last_dev)
            finished = self._finish(
                o,
                data_source=DataSource.LIVE,
                reason=msg.reason,
                residual_ul=_level(msg.residual_ul),
                cum_ul=msg.cum_ul,
                neb_ms=msg.neb_ms,
                duration_s=_record_duration(msg),
                end_utc=utc,
                end_wall_s=msg.end_wall_s or None,
                end_raw_ms=None,
                duration_at_least_s=max(msg.neb_ms / 1000.0, o.last_dev - o.start_dev),
            )
            return [SessionFinished(finished)]
        # A session the gateway never saw start: only the device's log speaks for it.
        self._remember(msg.session_no)
        duration = _record_duration(msg)
        finished = FinishedSession(
            session_no=msg.session_no,
            data_source=DataSource.DEVICE_LOG,
            end_reason=msg.reason,
            fill_ul=_level(msg.fill_ul),
            residual_ul=_level(msg.residual_ul),
            device_cum_ul=msg.cum_ul,
            neb_ms=msg.neb_ms,
            duration_s=duration,
            gateway_start_utc=None,
            gateway_end_utc=utc,
            device_start_wall_s=msg.start_wall_s or None,
            device_end_wall_s=msg.end_wall_s or None,
            device_start_ms=None,
            device_end_ms=None,
            sample_times_s=(),
            sample_rates_ul_min=(),
            pauses=(),
            alarms=(),
            link_interruptions=0,
            link_down_s=0.0,
            frames_lost=0,
            bad_frames=0,
            flags=(Reason.RECONCILED_FROM_DEVICE_LOG,),
            duration_at_least_s=None if duration is not None else msg.neb_ms / 1000.0,
            **self._device_facts(),
        )
        return [SessionFinished(finished)]

    def _on_alarm(self, msg: Alarm, dev: float) -> list[TrackerEvent]:
        was = msg.code in self.active_alarms
        if msg.active:
            self.active_alarms.add(msg.code)
        else:
            self.active_alarms.discard(msg.code)
        o = self._open
        if o is not None:
            rel = dev - o.start_dev
            if msg.active and not was:
                o.alarms.append([msg.code, rel, None])
            elif not msg.active:
                for span in reversed(o.alarms):
                    if span[0] == msg.code and span[2] is None:
                        span[2] = rel
                        break
                else:
                    o.alarms.append([msg.code, None, rel])
        if was == msg.active:
            return []
        return [AlarmChanged(msg.code, msg.active)]

    def _remember(self, session_no: int) -> None:
        self._finished.append(session_no)
        del self._finished[: -self._recent_limit]

    def _finish(
        self,
        o: _Open,
        *,
        data_source: DataSource,
        reason: EndReason | None,
        residual_ul: int | None,
        cum_ul: int | None,
        neb_ms: int | None,
        duration_s: float | None,
        end_utc: datetime,
        end_wall_s: int | None,
        end_raw_ms: int | None,
        duration_at_least_s: float | None = None,
    ) -> FinishedSession:
        if self._open is o:
            self._open = None
        self._remember(o.session_no)
        alarms = []
        for code, raised, cleared in o.alarms:
            alarms.append(
                AlarmSpan(
                    code=int(code or 0),
                    raised_s=None if raised is None else float(raised),
                    cleared_s=None if cleared is None else float(cleared),
                )
            )
        # Alarms still active at the end stay open (cleared_s None).
        return FinishedSession(
            session_no=o.session_no,
            data_source=data_source,
            end_reason=reason,
            fill_ul=o.fill_ul,
            residual_ul=residual_ul,
            device_cum_ul=cum_ul,
            neb_ms=neb_ms,
            duration_s=duration_s,
            gateway_start_utc=o.start_utc,
            gateway_end_utc=end_utc,
            device_start_wall_s=o.wall_s or None,
            device_end_wall_s=end_wall_s,
            device_start_ms=o.start_raw_ms,
            device_end_ms=end_raw_ms,
            sample_times_s=o.times[:],
            sample_rates_ul_min=o.rates[:],
            pauses=tuple(
                Pause(
                    start_s=p[0] - o.start_dev,
                    duration_s=max(0.0, p[1] - p[0]),
                    cut_by_link=p[2] > 0,
                )
                for p in o.pauses
                if p[1] >= 0
            ),
            alarms=tuple(alarms),
            link_interruptions=o.link_interruptions,
            link_down_s=round(o.link_down_s, 3),
            frames_lost=o.frames_lost,
            bad_frames=o.bad_frames,
            flags=tuple(o.flags),
            duration_at_least_s=None if duration_s is not None else duration_at_least_s,
            **self._device_facts(),
        )

    def _device_facts(self) -> dict[str, int | None]:
        ident = self.identity
        return {
            "reservoir_capacity_ul": ident.reservoir_capacity_ul if ident else None,
            "nominal_rate_ul_min": ident.nominal_rate_ul_min if ident else None,
        }


def _wrapped(last_ms: int, raw_ms: int) -> bool:
    """Did uptime pass 2^32 ms between these two readings (rather than restart)?"""
    return last_ms >= _WRAP - _WRAP_WINDOW_MS and raw_ms < _WRAP_WINDOW_MS


def _level(reservoir_ul: int) -> int | None:
    """A reservoir reading, or None for the ICD's "unknown" (0xFFFF)."""
    return None if reservoir_ul == RESERVOIR_UNKNOWN_UL else reservoir_ul


def _record_duration(record: SessionRecord) -> float | None:
    """A logged session's length from the device clock; unknown if it was never set."""
    if record.start_wall_s and record.end_wall_s >= record.start_wall_s:
        return float(record.end_wall_s - record.start_wall_s)
    return None


def wall_to_utc(wall_s: int | None) -> datetime | None:
    """Device clock value (Unix seconds) as UTC; None when the device clock was never set."""
    if not wall_s:
        return None
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(seconds=wall_s)
