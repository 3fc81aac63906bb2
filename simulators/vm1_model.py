"""The VM-1 nebulizer as a pure model: scripted behaviour in, typed messages out.

No I/O and no clock: every call takes the time as seconds since power-on, and
the model emits each message with the exact ``dev_ms`` at which the device
would have sent it (``int(t_event * 1000) mod 2**32``, plus the scenario's
``uptime_at_start_s`` if the device was already on) and the device's own
``seq`` counter. Call :meth:`Vm1Model.advance` with non-decreasing times;
:meth:`Vm1Model.next_event_time` says when the next message is due, so a
driver loop can sleep exactly that long (see :mod:`simulators.vm1_pty`).

Internally everything is scheduled in integer milliseconds on one heap; the
physics (liquid level, the device's output integral, battery, ``neb_ms``) is
piecewise constant between events and integrated exactly at each event, so a
10-minute session at 10 Hz (6,000 OUTPUT messages) takes a few tens of
milliseconds.

Behaviour (ICD rev 1.0 section 3) and the choices made where the ICD is silent:

- Fill: the true level becomes ``fill_ul`` (the old residual is discarded),
  state READY (from IDLE, DONE, FAULT or READY; a fault is cleared by the
  refill). A fill during a running session is ignored.
- Button press (``start_at_s``) or host START in READY: SESSION_START with
  ``session_no = last_session_no + 1``, ``fill_ul`` = level sensor reading,
  ``wall_s`` = device clock (0 if never set); state NEBULIZING; the mouthpiece
  is at the lips (flag bit 0). A scripted button press when not READY (e.g.
  the host already started the session) is ignored.
- OUTPUT at the telemetry rate (default 10 Hz) while NEBULIZING or PAUSED, the
  first one period after SESSION_START; ``rate_ul_min`` is the device's
  estimate (0 while paused, tilted or dry), ``cum_ul`` the integral of that
  estimate since SESSION_START, ``breath`` alternates inhalation (40 %) and
  exhalation on a ~4 s cycle (UNKNOWN while the mouthpiece is off the lips).
  SET_RATE restarts the OUTPUT grid one new period after the command.
- STATUS every whole second since power-on, and at once whenever ``state``,
  ``flags`` or ``fault_code`` change (the ICD says "state"; flags such as mesh
  dry and mouthpiece are just as useful to a host straight away).
- Pauses: ``mouthpiece`` clears flag bit 0, ``button`` keeps it; both give
  state PAUSED; the scripted end of the pause (or host START) resumes. A pause
  reaching 10 minutes ends the session with USER_STOP at that moment.
- ``stop_at_s`` is a long button press: SESSION_END USER_STOP.
- The true output drains the liquid to ``residual_ul``; at that instant the
  mesh runs dry (flag bit 2, STATUS at once, estimate 0 but the mesh is still
  driven), and 3 s later SESSION_END COMPLETE, state DONE. The dry flag stays
  until the next fill.
- TIMEOUT 40 minutes after SESSION_START (pauses included).
- Faults: state FAULT with ``fault_code``; a running session ends with FAULT
  (SESSION_END first, then STATUS). FAULT lasts until the next fill.
- Alarms: raised/cleared as scripted, any u16 code. TILT inhibits the mesh
  drive (no output, not counted in ``neb_ms``) and makes the level sensor read
  unknown (``reservoir_ul = None``); MESH_BLOCKED cuts the true output to
  10 %. BATTERY_LOW is also raised automatically when the battery reading
  drops below 15 %. The battery drains only while the mesh is driven; at 0 %
  the session ends with LOW_BATTERY and no new session can start.
- ``neb_ms`` counts the time the mesh was driven: NEBULIZING, not tilted
  (the 3 s dry run-out included; pauses excluded).
- Physics: the true rate is the scripted rate times ``1 + rate_noise * x``
  where ``x`` is a slowly varying (2 s correlation) unit Gaussian redrawn
  every 100 ms; the estimate is the true rate times ``1 + rate_bias`` times
  2 % white noise. The level sensor reads the true level plus a per-fill
  offset (+-60 uL) plus noise (+-25 uL): always within the ICD's +-0.1 mL.
- Commands: every command gets an ACK (``acked_seq``, ``cmd``, ``result``)
  before any consequence (SESSION_START, IDENT, ...). A command identical to
  the previous one (same seq, type and arguments) is a resend: it is not
  executed again, the original result is ACKed again, and for the
  side-effect-free queries GET_INFO/GET_SESSION the reply is sent again (it
  was most likely lost together with the ACK).
- GET_SESSION serves the last 16 *ended* sessions since power-on; sessions
  from before power-on (``last_session_no`` of the scenario) and the running
  session give BAD_ARGUMENT.
- Level sensor faults (per session script): ``level_sensor = "blind"`` reads
  unknown (0xFFFF; ``None`` in STATUS) from the fill to the session's end;
  ``residual_reading_ul`` is what a drifting sensor reports at the end.
- Reboots (``[[reboots]]``): uptime, ``seq`` and the clock restart from zero,
  the telemetry rate returns to its default, alarms and faults clear, the
  device is IDLE with nothing loaded and sends IDENT. A running session is
  lost (its number stays used), or kept in the log ended with FAULT when the
  reboot says so. ``session_counter_to`` restarts the counter and erases the
  log (a board swap or re-flash).
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from drivers.vm1.messages import (
    FLAG_CLOCK_SET,
    FLAG_MAINS,
    FLAG_MESH_DRY,
    FLAG_MOUTHPIECE,
    Ack,
    AckResult,
    Alarm,
    AlarmCode,
    Breath,
    DeviceMessage,
    DeviceState,
    EndReason,
    GetInfo,
    GetSession,
    HostCommand,
    Ident,
    MsgType,
    Output,
    Ping,
    SessionEnd,
    SessionRecord,
    SessionStart,
    SetClock,
    SetRate,
    Start,
    Status,
    Stop,
)
from simulators.scenario import DeviceSpec, RebootSpec, Scenario, SessionScript

__all__ = ["SessionSummary", "Vm1Model"]

DEV_MS_MASK = 0xFFFF_FFFF
#: The level sensor's "unknown" reading on the wire (ICD section 2).
LEVEL_UNKNOWN_UL = 0xFFFF
STATUS_PERIOD_MS = 1000
PHYSICS_TICK_MS = 100
DRY_TO_COMPLETE_MS = 3000
PAUSE_LIMIT_MS = 10 * 60 * 1000
TIMEOUT_MS = 40 * 60 * 1000
RECORDS_KEPT = 16
DEFAULT_TELEMETRY_HZ = 10
BATTERY_LOW_PCT = 15
BLOCKED_OUTPUT_FACTOR = 0.10
NOISE_CORRELATION_S = 2.0
ESTIMATE_NOISE = 0.02
SENSOR_OFFSET_UL = 60.0
SENSOR_NOISE_UL = 8.0
SENSOR_NOISE_CLIP_UL = 25.0
BREATH_INHALE_FRACTION = 0.4

# Order of events due in the same millisecond.
_PRIO_PHYSICS = 0
_PRIO_SCRIPT = 1
_PRIO_DEVICE = 2
_PRIO_OUTPUT = 3
_PRIO_STATUS = 4

_AR_COEF = math.exp(-PHYSICS_TICK_MS / 1000 / NOISE_CORRELATION_S)
_AR_INNOVATION = math.sqrt(1.0 - _AR_COEF * _AR_COEF)


@dataclass(frozen=True, slots=True)
class SessionSummary:
    """One ended session: what the device recorded plus the simulator's ground truth."""

    session_no: int
    script_index: int
    reason: EndReason
    start_s: float
    end_s: float
    start_wall_s: int
    end_wall_s: int
    fill_ul: int  # sensor reading at start (as reported)
    residual_ul: int  # sensor reading at end (as reported)
    neb_ms: int
    cum_ul: int  # the device's estimate (as reported)
    true_fill_ul: float
    true_delivered_ul: float  # liquid that actually left as aerosol

    def record(self) -> SessionRecord:
        """The SESSION_RECORD body for this session (header fields left at 0)."""
        return SessionRecord(
            session_no=self.session_no,
            start_wall_s=self.start_wall_s,
            fill_ul=self.fill_ul,
            reason=self.reason,
            neb_ms=self.neb_ms,
            cum_ul=self.cum_ul,
            residual_ul=self.residual_ul,
            end_wall_s=self.end_wall_s,
        )


@dataclass(slots=True)
class _Session:
    """Mutable state of the running treatment."""

    session_no: int
    script_index: int
    script: SessionScript
    start_ms: int
    start_wall_s: int
    fill_reading: int
    true_fill_ul: float
    rng: random.Random
    breath_cycle_ms: int
    breath_phase_ms: int
    neb_ms: float = 0.0
    cum_ul: float = 0.0
    noise_x: float = 0.0
    estimate_noise: float = 0.0
    pause_cause: str | None = None
    dry_since_ms: int | None = None
    output_base_ms: int = 0
    output_index: int = 0
    scripted_pause: int | None = None  # key of the scripted pause in progress


_Handler = Callable[[int, int], None]


class Vm1Model:
    """A VM-1 nebulizer following a script; see the module docstring for its behaviour."""

    def __init__(
        self,
        device: DeviceSpec,
        sessions: Sequence[SessionScript],
        seed: int | None = None,
        reboots: Sequence[RebootSpec] = (),
    ) -> None:
        self.device = device
        self.sessions = tuple(sessions)
        self.reboots = tuple(reboots)
        self._seed = device.seed if seed is None else seed
        self._uptime_ms = round(device.uptime_at_start_s * 1000)
        self._sensor_rng = random.Random(f"vm1/{self._seed}/sensor")

        self._heap: list[tuple[int, int, int, _Handler, int]] = []
        self._counter = 0
        self._now_ms = 0
        self._phys_ms = 0
        self._out: list[DeviceMessage] = []
        self._seq = 0

        self._state = DeviceState.IDLE
        self._fault_code = 0
        self._mouthpiece = False
        self._mesh_dry = True  # nothing on the mesh before the first fill
        self._level_ul = 0.0
        self._level_blind = False
        self._sensor_offset = 0.0
        self._residual_ul = 0.0
        self._battery: float | None = None if device.mains else device.battery_pct
        self._clock: tuple[int, int] | None = None  # (unix_s, at dev ms)
        self._hz = DEFAULT_TELEMETRY_HZ
        self._last_session_no = device.last_session_no
        self._alarms: set[int] = set()
        self._loaded: int | None = None  # index of the script whose liquid is in the reservoir
        self._active: _Session | None = None
        self._gen = 0  # bumped when a session ends: its pending events go stale
        self._rate_gen = 0  # bumped whenever the output rates change
        self._output_gen = 0  # bumped when the OUTPUT grid restarts (SET_RATE)
        self._pause_gen = 0
        self._true_rate = 0.0  # uL/min, current
        self._est_rate = 0.0  # uL/min, the device's current estimate
        self._next_tick_ms = 0
        self._records: deque[SessionSummary] = deque(maxlen=RECORDS_KEPT)
        self.history: list[SessionSummary] = []
        #: Scripted events that did nothing (with the reason), for tests and debugging.
        self.notes: list[str] = []
        self._last_command: HostCommand | None = None
        self._last_result = AckResult.OK
        self._pending_script = 0

        self._schedule(0, _PRIO_STATUS, self._on_status_tick, 0)
        if self._battery_low():
            self._schedule(0, _PRIO_SCRIPT, self._on_power_on_battery_low, 0)
        for i, s in enumerate(self.sessions):
            self._script(s.fill_at_s, self._on_fill, i)
            self._script(s.start_at_s, self._on_button_start, i)
            if s.stop_at_s is not None:
                self._script(s.stop_at_s, self._on_button_stop, i)
            for j, p in enumerate(s.pauses):
                self._script(p.at_s, self._on_pause, i * 1000 + j)
                self._script(p.at_s + p.duration_s, self._on_resume, i * 1000 + j)
            for a in s.alarms:
                self._script(a.at_s, self._on_alarm_raise, a.code)
                if a.duration_s is not None:
                    self._script(a.at_s + a.duration_s, self._on_alarm_clear, a.code)
            if s.fault is not None:
                self._script(s.fault.at_s, self._on_fault, s.fault.code)
        for i, r in enumerate(self.reboots):
            self._script(r.at_s, self._on_reboot, i)

    @classmethod
    def from_scenario(cls, scenario: Scenario) -> Vm1Model:
        return cls(scenario.device, scenario.sessions, reboots=scenario.reboots)

    # ------------------------------------------------------------------ public API

    @property
    def time_s(self) -> float:
        """Device time (seconds since power-on) up to which the model has run."""
        return self._now_ms / 1000

    @property
    def state(self) -> DeviceState:
        return self._state

    @property
    def telemetry_hz(self) -> int:
        return self._hz

    @property
    def true_level_ul(self) -> float:
        """The real liquid level (the sensor reports it with an error of up to 0.1 mL)."""
        return self._level_ul

    @property
    def battery_pct(self) -> int | None:
        return self._battery_reading()

    @property
    def last_session_no(self) -> int:
        return self._last_session_no

    @property
    def active_alarms(self) -> frozenset[int]:
        return frozenset(self._alarms)

    @property
    def session_active(self) -> bool:
        return self._active is not None

    @property
    def scripted_done(self) -> bool:
        """Every scripted event has happened and no session is running."""
        return self._pending_script == 0 and self._active is None

    def next_event_time(self) -> float:
        """Device time (s) of the next scheduled event; STATUS makes this at most 1 s away."""
        return self._heap[0][0] / 1000

    def advance(self, t: float) -> list[DeviceMessage]:
        """Run the device up to ``t`` s after power-on; return every message sent meanwhile."""
        limit = math.floor(t * 1000)
        out: list[DeviceMessage] = []
        self._out = out
        heap = self._heap
        while heap and heap[0][0] <= limit:
            at, _, _, handler, arg = heapq.heappop(heap)
            self._now_ms = at
            handler(at, arg)
        self._now_ms = max(self._now_ms, limit)
        return out

    def ident_message(self, t: float) -> Ident:
        """The IDENT the device sends at power-up, on port open and for GET_INFO.

        Call :meth:`advance` up to ``t`` first so messages stay in time order.
        """
        now = max(self._now_ms, math.floor(t * 1000))
        return self._ident(now)

    def handle_command(self, cmd: HostCommand, t: float) -> list[DeviceMessage]:
        """Process one host command received at ``t``.

        Returns the messages due up to ``t`` (as :meth:`advance` would), then the
        ACK, then the command's consequences.
        """
        out = self.advance(t)
        now = self._now_ms
        if cmd == self._last_command:
            self._ack(now, cmd.seq, _cmd_type(cmd), self._last_result)
            if self._last_result is AckResult.OK and isinstance(cmd, GetInfo | GetSession):
                self._execute(cmd, now)
            return out
        result = self._check(cmd)
        self._last_command = cmd
        self._last_result = result
        self._ack(now, cmd.seq, _cmd_type(cmd), result)
        if result is AckResult.OK:
            self._execute(cmd, now)
        return out

    def reject_command(
        self, cmd_type: int, seq: int, result: AckResult, t: float
    ) -> list[DeviceMessage]:
        """ACK a command that could not be decoded (UNKNOWN_COMMAND, or BAD_ARGUMENT
        for a known type with a malformed body)."""
        out = self.advance(t)
        self._ack(self._now_ms, seq, cmd_type, result)
        return out

    def session_summaries(self) -> list[SessionSummary]:
        """The sessions the device still holds for GET_SESSION (oldest first)."""
        return list(self._records)

    # ------------------------------------------------------------------ scheduling

    def _schedule(self, at_ms: int, prio: int, handler: _Handler, arg: int) -> None:
        self._counter += 1
        heapq.heappush(self._heap, (at_ms, prio, self._counter, handler, arg))

    def _script(self, at_s: float, handler: _Handler, arg: int) -> None:
        self._pending_script += 1
        self._schedule(round(at_s * 1000), _PRIO_SCRIPT, handler, arg)

    def _take_seq(self) -> int:
        seq = self._seq
        self._seq = (seq + 1) & 0xFF
        return seq

    # ------------------------------------------------------------------ readings

    def _wall_s(self, now: int) -> int:
        if self._clock is None:
            return 0
        unix_s, at_ms = self._clock
        return (unix_s + (now - at_ms) // 1000) & 0xFFFF_FFFF

    def _level_reading(self) -> int | None:
        if self._level_blind:
            return None
        if self._level_ul <= 0:
            return 0
        noise = self._sensor_rng.gauss(0.0, SENSOR_NOISE_UL)
        noise = max(-SENSOR_NOISE_CLIP_UL, min(SENSOR_NOISE_CLIP_UL, noise))
        value = round(self._level_ul + self._sensor_offset + noise)
        return max(0, min(self.device.reservoir_ul, value))

    def _battery_reading(self) -> int | None:
        if self._battery is None:
            return None
        return max(0, min(100, math.ceil(self._battery)))

    def _battery_empty(self) -> bool:
        return self._battery is not None and self._battery <= 0

    def _battery_low(self) -> bool:
        reading = self._battery_reading()
        return reading is not None and reading < BATTERY_LOW_PCT

    def _flags(self) -> int:
        flags = 0
        if self._mouthpiece:
            flags |= FLAG_MOUTHPIECE
        if self._battery is None:
            flags |= FLAG_MAINS
        if self._mesh_dry:
            flags |= FLAG_MESH_DRY
        if self._clock is not None:
            flags |= FLAG_CLOCK_SET
        return flags

    def _status_key(self) -> tuple[DeviceState, int, int]:
        return (self._state, self._flags(), self._fault_code)

    def _breath(self, s: _Session, now: int) -> Breath:
        if s.pause_cause == "mouthpiece":
            return Breath.UNKNOWN
        phase = (now - s.start_ms + s.breath_phase_ms) % s.breath_cycle_ms
        if phase < s.breath_cycle_ms * BREATH_INHALE_FRACTION:
            return Breath.INHALATION
        return Breath.EXHALATION

    # ------------------------------------------------------------------ emitting

    def _ident(self, now: int) -> Ident:
        d = self.device
        return Ident(
            model=d.model,
            serial_no=d.serial_no,
            firmware=d.firmware,
            nominal_rate_ul_min=d.nominal_rate_ul_min,
            reservoir_capacity_ul=d.reservoir_ul,
            last_session_no=self._last_session_no,
            seq=self._take_seq(),
            dev_ms=(now + self._uptime_ms) & DEV_MS_MASK,
        )

    def _emit_status(self, now: int) -> None:
        self._out.append(
            Status(
                state=self._state,
                reservoir_ul=None if AlarmCode.TILT in self._alarms else self._level_reading(),
                battery_pct=self._battery_reading(),
                flags=self._flags(),
                fault_code=self._fault_code,
                seq=self._take_seq(),
                dev_ms=(now + self._uptime_ms) & DEV_MS_MASK,
            )
        )

    def _emit_status_if_changed(self, now: int, before: tuple[DeviceState, int, int]) -> None:
        if self._status_key() != before:
            self._emit_status(now)

    def _ack(self, now: int, acked_seq: int, cmd: int, result: AckResult) -> None:
        self._out.append(
            Ack(
                acked_seq=acked_seq,
                cmd=cmd,
                result=result,
                seq=self._take_seq(),
                dev_ms=(now + self._uptime_ms) & DEV_MS_MASK,
            )
        )

    def _emit_alarm(self, now: int, code: int, active: bool) -> None:
        self._out.append(
            Alarm(
                code=code,
                active=active,
                seq=self._take_seq(),
                dev_ms=(now + self._uptime_ms) & DEV_MS_MASK,
            )
        )

    # ------------------------------------------------------------------ physics

    def _driven(self) -> bool:
        """Is the mesh being driven (counts toward neb_ms, drains the battery)?"""
        return (
            self._active is not None
            and self._state is DeviceState.NEBULIZING
            and AlarmCode.TILT not in self._alarms
        )

    def _integrate(self, to_ms: int) -> None:
        dt = to_ms - self._phys_ms
        if dt <= 0:
            return
        self._phys_ms = to_ms
        s = self._active
        if s is None or not self._driven():
            return
        s.neb_ms += dt
        if self._battery is not None:
            self._battery = max(
                0.0, self._battery - self.device.battery_drain_pct_per_min * dt / 60_000
            )
        if self._true_rate <= 0:
            return
        drop = self._true_rate * dt / 60_000
        available = max(0.0, self._level_ul - self._residual_ul)
        fraction = 1.0
        if drop > available:
            fraction = available / drop
            drop = available
        self._level_ul -= drop
        s.cum_ul += self._est_rate * dt / 60_000 * fraction

    def _update_rates(self, now: int) -> None:
        """Recompute the current rates after anything that changes them (call after _integrate)."""
        self._rate_gen += 1
        s = self._active
        if s is None or not self._driven() or self._mesh_dry:
            self._true_rate = self._est_rate = 0.0
            return
        true = s.script.rate_ul_min * (1.0 + s.script.rate_noise * s.noise_x)
        if AlarmCode.MESH_BLOCKED in self._alarms:
            true *= BLOCKED_OUTPUT_FACTOR
        true = max(0.0, true)
        self._true_rate = true
        self._est_rate = true * (1.0 + s.script.rate_bias) * (1.0 + s.estimate_noise)
        if true > 0:
            remaining = self._level_ul - self._residual_ul
            dry_at = now + max(0, math.ceil(remaining / true * 60_000))
            if dry_at < self._next_tick_ms:
                self._schedule(dry_at, _PRIO_PHYSICS, self._on_mesh_dry, self._rate_gen)

    # ------------------------------------------------------------------ sessions

    def _start_session(self, now: int) -> None:
        index = self._loaded
        assert index is not None  # READY always has a loaded script
        script = self.sessions[index]
        self._last_session_no = (self._last_session_no + 1) & 0xFFFF_FFFF
        no = self._last_session_no
        rng = random.Random(f"vm1/{self._seed}/session/{no}")
        cycle = round(rng.uniform(3600, 4400))
        s = _Session(
            session_no=no,
            script_index=index,
            script=script,
            start_ms=now,
            start_wall_s=self._wall_s(now),
            fill_reading=_wire_level(self._level_reading()),
            true_fill_ul=self._level_ul,
            rng=rng,
            breath_cycle_ms=cycle,
            breath_phase_ms=rng.randrange(cycle),
            noise_x=rng.gauss(0.0, 1.0),
            estimate_noise=rng.gauss(0.0, ESTIMATE_NOISE),
            output_base_ms=now,
        )
        before = self._status_key()
        self._integrate(now)
        self._active = s
        self._residual_ul = float(script.residual_ul)
        self._out.append(
            SessionStart(
                session_no=no,
                fill_ul=s.fill_reading,
                wall_s=s.start_wall_s,
                seq=self._take_seq(),
                dev_ms=(now + self._uptime_ms) & DEV_MS_MASK,
            )
        )
        self._state = DeviceState.NEBULIZING
        self._mouthpiece = True
        self._emit_status_if_changed(now, before)
        gen = self._gen
        self._next_tick_ms = now + PHYSICS_TICK_MS
        self._schedule(self._next_tick_ms, _PRIO_PHYSICS, self._on_physics_tick, gen)
        self._schedule(now + TIMEOUT_MS, _PRIO_DEVICE, self._on_timeout, gen)
        self._restart_outputs(now)
        self._update_rates(now)

    def _restart_outputs(self, now: int) -> None:
        s = self._active
        if s is None:
            return
        self._output_gen += 1
        s.output_base_ms = now
        s.output_index = 1
        self._schedule(now + 1000 // self._hz, _PRIO_OUTPUT, self._on_output, self._output_gen)

    def _end_session(self, now: int, reason: EndReason) -> None:
        s = self._active
        assert s is not None
        self._integrate(now)
        before = self._status_key()
        residual = _wire_level(self._level_reading())
        if s.script.residual_reading_ul is not None:
            residual = s.script.residual_reading_ul
        neb_ms = min(round(s.neb_ms), 0xFFFF_FFFF)
        cum_ul = min(int(s.cum_ul), 0xFFFF_FFFF)
        self._out.append(
            SessionEnd(
                session_no=s.session_no,
                reason=reason,
                neb_ms=neb_ms,
                cum_ul=cum_ul,
                residual_ul=residual,
                seq=self._take_seq(),
                dev_ms=(now + self._uptime_ms) & DEV_MS_MASK,
            )
        )
        self._log_session(s, now, reason, residual, neb_ms, cum_ul)
        self._active = None
        self._gen += 1
        self._pause_gen += 1
        self._state = DeviceState.FAULT if reason is EndReason.FAULT else DeviceState.DONE
        self._mouthpiece = False
        self._update_rates(now)
        self._emit_status_if_changed(now, before)
        self._level_blind = False  # blind until the session's end, STATUS at the end included

    def _log_session(
        self, s: _Session, now: int, reason: EndReason, residual: int, neb_ms: int, cum_ul: int
    ) -> None:
        """Keep an ended session in the device's log (GET_SESSION) and the history."""
        summary = SessionSummary(
            session_no=s.session_no,
            script_index=s.script_index,
            reason=reason,
            start_s=s.start_ms / 1000,
            end_s=now / 1000,
            start_wall_s=s.start_wall_s,
            end_wall_s=self._wall_s(now),
            fill_ul=s.fill_reading,
            residual_ul=residual,
            neb_ms=neb_ms,
            cum_ul=cum_ul,
            true_fill_ul=s.true_fill_ul,
            true_delivered_ul=s.true_fill_ul - self._level_ul,
        )
        self._records.append(summary)
        self.history.append(summary)

    def _pause(self, now: int, cause: str) -> None:
        s = self._active
        assert s is not None
        self._integrate(now)
        before = self._status_key()
        s.pause_cause = cause
        self._state = DeviceState.PAUSED
        if cause == "mouthpiece":
            self._mouthpiece = False
        self._update_rates(now)
        self._emit_status_if_changed(now, before)
        self._pause_gen += 1
        self._schedule(now + PAUSE_LIMIT_MS, _PRIO_DEVICE, self._on_pause_limit, self._pause_gen)

    def _resume(self, now: int, *, contact: bool) -> None:
        s = self._active
        assert s is not None
        self._integrate(now)
        before = self._status_key()
        s.pause_cause = None
        self._state = DeviceState.NEBULIZING
        if contact:
            self._mouthpiece = True
        self._pause_gen += 1
        self._update_rates(now)
        self._emit_status_if_changed(now, before)

    # ------------------------------------------------------------------ event handlers

    def _on_status_tick(self, now: int, _: int) -> None:
        self._integrate(now)
        self._emit_status(now)
        self._schedule(now + STATUS_PERIOD_MS, _PRIO_STATUS, self._on_status_tick, 0)

    def _on_physics_tick(self, now: int, gen: int) -> None:
        s = self._active
        if gen != self._gen or s is None:
            return
        self._integrate(now)
        self._next_tick_ms = now + PHYSICS_TICK_MS
        self._schedule(self._next_tick_ms, _PRIO_PHYSICS, self._on_physics_tick, gen)
        gauss = s.rng.gauss
        s.noise_x = _AR_COEF * s.noise_x + _AR_INNOVATION * gauss(0.0, 1.0)
        s.estimate_noise = gauss(0.0, ESTIMATE_NOISE)
        if self._battery is not None:
            if self._battery_low():
                self._raise_alarm(now, AlarmCode.BATTERY_LOW)
            if self._battery <= 0:
                self._end_session(now, EndReason.LOW_BATTERY)
                return
        self._update_rates(now)

    def _on_mesh_dry(self, now: int, rate_gen: int) -> None:
        s = self._active
        if rate_gen != self._rate_gen or s is None or self._mesh_dry:
            return
        self._integrate(now)
        before = self._status_key()
        self._mesh_dry = True
        s.dry_since_ms = now
        self._update_rates(now)
        self._emit_status_if_changed(now, before)
        self._schedule(now + DRY_TO_COMPLETE_MS, _PRIO_DEVICE, self._on_dry_complete, self._gen)

    def _on_dry_complete(self, now: int, gen: int) -> None:
        if gen == self._gen and self._active is not None:
            self._end_session(now, EndReason.COMPLETE)

    def _on_timeout(self, now: int, gen: int) -> None:
        if gen == self._gen and self._active is not None:
            self._end_session(now, EndReason.TIMEOUT)

    def _on_pause_limit(self, now: int, pause_gen: int) -> None:
        if pause_gen == self._pause_gen and self._active is not None:
            self._end_session(now, EndReason.USER_STOP)

    def _on_output(self, now: int, output_gen: int) -> None:
        s = self._active
        if output_gen != self._output_gen or s is None:
            return
        self._integrate(now)
        rate = (
            0 if self._state is not DeviceState.NEBULIZING else min(round(self._est_rate), 0xFFFF)
        )
        self._out.append(
            Output(
                rate_ul_min=rate,
                cum_ul=min(int(s.cum_ul), 0xFFFF_FFFF),
                breath=self._breath(s, now),
                seq=self._take_seq(),
                dev_ms=(now + self._uptime_ms) & DEV_MS_MASK,
            )
        )
        s.output_index += 1
        at = s.output_base_ms + s.output_index * 1000 // self._hz
        self._schedule(at, _PRIO_OUTPUT, self._on_output, output_gen)

    def _on_fill(self, now: int, index: int) -> None:
        self._pending_script -= 1
        if self._active is not None:
            self.notes.append(
                f"{now} ms: fill of session script {index} ignored (a session is running)"
            )
            return
        self._integrate(now)
        before = self._status_key()
        script = self.sessions[index]
        self._level_ul = float(script.fill_ul)
        self._level_blind = script.level_sensor == "blind"
        self._residual_ul = float(script.residual_ul)
        self._sensor_offset = self._sensor_rng.uniform(-SENSOR_OFFSET_UL, SENSOR_OFFSET_UL)
        self._mesh_dry = False
        self._loaded = index
        self._state = DeviceState.READY
        self._fault_code = 0
        self._emit_status_if_changed(now, before)

    def _on_button_start(self, now: int, index: int) -> None:
        self._pending_script -= 1
        if self._state is not DeviceState.READY or self._loaded != index:
            self.notes.append(
                f"{now} ms: button start of script {index} ignored in {self._state.name}"
            )
            return
        if self._battery_empty():
            self.notes.append(f"{now} ms: button start of script {index} ignored (battery empty)")
            return
        self._start_session(now)

    def _on_button_stop(self, now: int, index: int) -> None:
        self._pending_script -= 1
        s = self._active
        if s is None or s.script_index != index:
            self.notes.append(
                f"{now} ms: stop of script {index} ignored (its session is not running)"
            )
            return
        self._end_session(now, EndReason.USER_STOP)

    def _on_pause(self, now: int, key: int) -> None:
        self._pending_script -= 1
        index, j = divmod(key, 1000)
        s = self._active
        if s is None or s.script_index != index or self._state is not DeviceState.NEBULIZING:
            self.notes.append(
                f"{now} ms: pause {j} of script {index} ignored in {self._state.name}"
            )
            return
        s.scripted_pause = key
        self._pause(now, self.sessions[index].pauses[j].cause)

    def _on_resume(self, now: int, key: int) -> None:
        self._pending_script -= 1
        index = key // 1000
        s = self._active
        if s is None or s.script_index != index or s.scripted_pause != key:
            return
        s.scripted_pause = None
        if self._state is DeviceState.PAUSED:
            self._resume(now, contact=True)
        elif not self._mouthpiece:
            # The host resumed while the mouthpiece was off; contact now restores the flag.
            before = self._status_key()
            self._mouthpiece = True
            self._emit_status_if_changed(now, before)

    def _on_alarm_raise(self, now: int, code: int) -> None:
        self._pending_script -= 1
        self._raise_alarm(now, code)

    def _on_power_on_battery_low(self, now: int, _: int) -> None:
        self._raise_alarm(now, AlarmCode.BATTERY_LOW)

    def _raise_alarm(self, now: int, code: int) -> None:
        if code in self._alarms:
            return
        self._integrate(now)
        self._alarms.add(code)
        self._emit_alarm(now, code, True)
        if code in (AlarmCode.TILT, AlarmCode.MESH_BLOCKED):
            self._update_rates(now)

    def _on_alarm_clear(self, now: int, code: int) -> None:
        self._pending_script -= 1
        if code not in self._alarms:
            return
        self._integrate(now)
        self._alarms.discard(code)
        self._emit_alarm(now, code, False)
        if code in (AlarmCode.TILT, AlarmCode.MESH_BLOCKED):
            self._update_rates(now)

    def _on_fault(self, now: int, code: int) -> None:
        self._pending_script -= 1
        if self._active is not None:
            self._fault_code = code
            self._end_session(now, EndReason.FAULT)
            return
        before = self._status_key()
        self._state = DeviceState.FAULT
        self._fault_code = code
        self._emit_status_if_changed(now, before)

    def _on_reboot(self, now: int, index: int) -> None:
        self._pending_script -= 1
        spec = self.reboots[index]
        s = self._active
        if s is not None:
            self._integrate(now)
            if spec.records_interrupted_session:
                # The log entry a device with non-volatile logging writes on its way down.
                residual = _wire_level(self._level_reading())
                neb_ms = min(round(s.neb_ms), 0xFFFF_FFFF)
                cum_ul = min(int(s.cum_ul), 0xFFFF_FFFF)
                self._log_session(s, now, EndReason.FAULT, residual, neb_ms, cum_ul)
            self.notes.append(f"{now} ms: reboot interrupted session {s.session_no}")
        if spec.session_counter_to is not None:
            self._last_session_no = spec.session_counter_to
            self._records.clear()
        self._active = None
        self._gen += 1
        self._pause_gen += 1
        self._output_gen += 1
        self._rate_gen += 1
        self._true_rate = 0.0
        self._est_rate = 0.0
        self._loaded = None
        self._level_blind = False
        self._mesh_dry = True
        self._mouthpiece = False
        self._alarms.clear()
        self._fault_code = 0
        self._state = DeviceState.IDLE
        self._clock = None
        self._hz = DEFAULT_TELEMETRY_HZ
        self._seq = 0
        self._last_command = None
        # dev_ms restarts from zero at this instant.
        self._uptime_ms = -now
        if self.device.sends_ident:
            self._out.append(self._ident(now))
        self._emit_status(now)
        if self._battery_low():
            self._raise_alarm(now, AlarmCode.BATTERY_LOW)

    # ------------------------------------------------------------------ commands

    def _check(self, cmd: HostCommand) -> AckResult:
        if isinstance(cmd, Start):
            if self._state is DeviceState.PAUSED:
                return AckResult.OK
            if self._state is DeviceState.READY and not self._battery_empty():
                return AckResult.OK
            return AckResult.BAD_STATE
        if isinstance(cmd, Stop):
            if self._state in (DeviceState.NEBULIZING, DeviceState.PAUSED):
                return AckResult.OK
            return AckResult.BAD_STATE
        if isinstance(cmd, SetRate):
            return AckResult.OK if 1 <= cmd.hz <= 50 else AckResult.BAD_ARGUMENT
        if isinstance(cmd, GetSession):
            if any(r.session_no == cmd.session_no for r in self._records):
                return AckResult.OK
            return AckResult.BAD_ARGUMENT
        return AckResult.OK

    def _execute(self, cmd: HostCommand, now: int) -> None:
        if isinstance(cmd, GetInfo):
            if self.device.sends_ident:
                self._out.append(self._ident(now))
        elif isinstance(cmd, SetClock):
            before = self._status_key()
            self._clock = (cmd.unix_s, now)
            self._emit_status_if_changed(now, before)
        elif isinstance(cmd, Start):
            if self._state is DeviceState.PAUSED:
                self._resume(now, contact=False)
            else:
                self._start_session(now)
        elif isinstance(cmd, Stop):
            self._end_session(now, EndReason.HOST_STOP)
        elif isinstance(cmd, SetRate):
            self._hz = cmd.hz
            self._restart_outputs(now)
        elif isinstance(cmd, GetSession):
            for r in self._records:
                if r.session_no == cmd.session_no:
                    self._out.append(
                        replace(
                            r.record(),
                            seq=self._take_seq(),
                            dev_ms=(now + self._uptime_ms) & DEV_MS_MASK,
                        )
                    )
                    break
        else:
            assert isinstance(cmd, Ping)


_COMMAND_TYPES: dict[type[HostCommand], MsgType] = {
    GetInfo: MsgType.GET_INFO,
    SetClock: MsgType.SET_CLOCK,
    Start: MsgType.START,
    Stop: MsgType.STOP,
    Ping: MsgType.PING,
    SetRate: MsgType.SET_RATE,
    GetSession: MsgType.GET_SESSION,
}


def _wire_level(reading: int | None) -> int:
    """SESSION_START/END and SESSION_RECORD carry an unknown level as 0xFFFF."""
    return LEVEL_UNKNOWN_UL if reading is None else reading


def _cmd_type(cmd: HostCommand) -> int:
    return int(_COMMAND_TYPES[type(cmd)])
