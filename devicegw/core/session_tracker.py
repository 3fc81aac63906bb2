"""Follows one nebulizer's treatment sessions from its timestamped message stream.

Pure logic: messages in (each with the gateway's receive time), tracker events
out. No sockets, no clocks of its own, no globals, so the same stream always
yields the same sessions, live or replayed. Device times (``dev_ms``) are
unwrapped across the 2^32 ms wrap and are the timebase of every duration; the
gateway's UTC receive times are kept beside them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from devicegw.contract.vocabulary import DataSource, Reason
from drivers.vm1.messages import (
    Ack,
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
IN_SESSION = (DeviceState.NEBULIZING, DeviceState.PAUSED)
# Consecutive out-of-session STATUS messages before a missing SESSION_END is fetched.
_END_MISSED_AFTER = 2


@dataclass(frozen=True, slots=True)
class Rx:
    """A decoded message with the gateway's clock readings at receipt."""

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


@dataclass(frozen=True, slots=True)
class FinishedSession:
    """Everything known about one ended session, ready for the dose check."""

    session_no: int
    data_source: DataSource
    end_reason: EndReason
    fill_ul: int | None
    residual_ul: int | None
    device_cum_ul: int
    neb_ms: int
    duration_s: float | None  # device time from SESSION_START to SESSION_END
    gateway_start_utc: datetime | None
    gateway_end_utc: datetime
    device_start_wall_s: int | None  # device clock (Unix s) at start; None if never set
    device_end_wall_s: int | None
    device_start_ms: int | None  # raw dev_ms (uptime) at start / end
    device_end_ms: int | None
    sample_times_s: tuple[float, ...]  # OUTPUT sample times from session start (device time)
    sample_rates_ul_min: tuple[int, ...]
    pauses: tuple[Pause, ...]
    alarms: tuple[AlarmSpan, ...]
    link_interruptions: int
    link_down_s: float
    frames_lost: int
    bad_frames: int
    flags: tuple[Reason, ...]


@dataclass(frozen=True, slots=True)
class SessionStarted:
    session_no: int
    fill_ul: int


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


TrackerEvent = SessionStarted | SessionFinished | StateChanged | AlarmChanged | FetchSessionRecord


@dataclass(slots=True)
class _Open:
    session_no: int
    fill_ul: int
    wall_s: int
    start_dev: float  # unwrapped device seconds
    start_raw_ms: int
    start_utc: datetime
    times: list[float] = field(default_factory=list)
    rates: list[int] = field(default_factory=list)
    last_cum_ul: int = 0
    pauses: list[list[float]] = field(default_factory=list)  # [start_dev, end_dev or nan]
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
        return cls(**values)


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
        self._last_seq: int | None = None
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

    # -- inputs ---------------------------------------------------------------

    @property
    def open_session_no(self) -> int | None:
        return self._open.session_no if self._open else None

    @property
    def open_session(self) -> _Open | None:
        return self._open

    def link_down(self, utc: datetime) -> None:
        self._link_down_utc = utc
        self._last_seq = None
        if self._open is not None:
            self._open.link_interruptions += 1

    def link_up(self, utc: datetime) -> None:
        if self._open is not None and self._link_down_utc is not None:
            # Never negative, even if the gateway clock was stepped back meanwhile.
            self._open.link_down_s += max(0.0, (utc - self._link_down_utc).total_seconds())
        self._link_down_utc = None
        self._last_seq = None

    def bad_frames(self, count: int) -> None:
        if self._open is not None:
            self._open.bad_frames += count

    def feed(self, rx: Rx) -> list[TrackerEvent]:
        msg = rx.msg
        self._count_seq(msg.seq)
        dev = self._unwrap(msg.dev_ms)
        if isinstance(msg, Output):
            self._on_output(msg, dev)
            return []
        if isinstance(msg, Status):
            return self._on_status(msg, dev)
        if isinstance(msg, SessionStart):
            return self._on_start(msg, dev, rx.utc)
        if isinstance(msg, SessionEnd):
            return self._on_end(msg, dev, rx.utc)
        if isinstance(msg, SessionRecord):
            return self._on_record(msg, rx.utc)
        if isinstance(msg, Alarm):
            return self._on_alarm(msg, dev)
        if isinstance(msg, Ident):
            self.identity = msg
            return []
        if isinstance(msg, Ack):
            return []
        return []  # pragma: no cover - the union is exhaustive

    # -- internals ------------------------------------------------------------

    def _count_seq(self, seq: int) -> None:
        if self._last_seq is not None and self._open is not None:
            self._open.frames_lost += (seq - self._last_seq - 1) % 256
        self._last_seq = seq

    def _unwrap(self, raw_ms: int) -> float:
        if self._last_raw_ms is not None and raw_ms < self._last_raw_ms - (_WRAP >> 1):
            self._wrap_offset += _WRAP
        self._last_raw_ms = raw_ms
        return (raw_ms + self._wrap_offset) / 1000.0

    def _on_output(self, msg: Output, dev: float) -> None:
        o = self._open
        if o is None:
            return
        o.times.append(dev - o.start_dev)
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
                o.pauses.append([dev, -1.0])
            elif msg.state != DeviceState.PAUSED and o.pauses and o.pauses[-1][1] < 0:
                o.pauses[-1][1] = dev
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
        if msg.session_no in self._finished:
            return events
        self._open = _Open(
            session_no=msg.session_no,
            fill_ul=msg.fill_ul,
            wall_s=msg.wall_s,
            start_dev=dev,
            start_raw_ms=msg.dev_ms,
            start_utc=utc,
            last_dev=dev,
        )
        self._last_seq = msg.seq
        events.append(SessionStarted(msg.session_no, msg.fill_ul))
        return events

    def _on_end(self, msg: SessionEnd, dev: float, utc: datetime) -> list[TrackerEvent]:
        o = self._open
        if msg.session_no in self._finished:
            return []
        if o is None or o.session_no != msg.session_no:
            # The start was not seen (gateway started mid-session): the device log has it.
            return [FetchSessionRecord(msg.session_no)]
        if o.pauses and o.pauses[-1][1] < 0:
            o.pauses[-1][1] = dev
        duration = dev - o.start_dev
        wall0 = o.wall_s or None
        finished = self._finish(
            o,
            data_source=DataSource.LIVE,
            reason=msg.reason,
            residual_ul=msg.residual_ul,
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
            if o.pauses and o.pauses[-1][1] < 0:
                o.pauses[-1][1] = o.last_dev
            finished = self._finish(
                o,
                data_source=DataSource.LIVE,
                reason=msg.reason,
                residual_ul=msg.residual_ul,
                cum_ul=msg.cum_ul,
                neb_ms=msg.neb_ms,
                duration_s=_record_duration(msg),
                end_utc=utc,
                end_wall_s=msg.end_wall_s or None,
                end_raw_ms=None,
            )
            return [SessionFinished(finished)]
        # A session the gateway never saw start: only the device's log speaks for it.
        self._remember(msg.session_no)
        finished = FinishedSession(
            session_no=msg.session_no,
            data_source=DataSource.DEVICE_LOG,
            end_reason=msg.reason,
            fill_ul=msg.fill_ul,
            residual_ul=msg.residual_ul,
            device_cum_ul=msg.cum_ul,
            neb_ms=msg.neb_ms,
            duration_s=_record_duration(msg),
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
        reason: EndReason,
        residual_ul: int,
        cum_ul: int,
        neb_ms: int,
        duration_s: float | None,
        end_utc: datetime,
        end_wall_s: int | None,
        end_raw_ms: int | None,
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
            sample_times_s=tuple(o.times),
            sample_rates_ul_min=tuple(o.rates),
            pauses=tuple(
                Pause(start_s=p[0] - o.start_dev, duration_s=max(0.0, p[1] - p[0]))
                for p in o.pauses
                if p[1] >= 0
            ),
            alarms=tuple(alarms),
            link_interruptions=o.link_interruptions,
            link_down_s=round(o.link_down_s, 3),
            frames_lost=o.frames_lost,
            bad_frames=o.bad_frames,
            flags=tuple(o.flags),
        )


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
