"""Simulator scenario files: TOML, validated once at load time (STYLE item 11).

A scenario describes one VM-1 device and what happens to it: when the
reservoir is filled, when the user presses the button, how fast the mesh
sprays, pauses, alarms, faults, and link-level trouble (the serial link
dropping, corrupted bytes). Every time is in seconds since the scenario
started, which is the device's power-on (``dev_ms`` 0). The format is written
down in ``simulators/scenarios/README.md``.

Everything invalid raises :class:`simulators.errors.ScenarioError` whose message
starts with the file and names the offending field, e.g.
``complete.toml: sessions[0].rate_ul_min: Input should be greater than 0``.
Only typed, frozen objects leave this module.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from drivers.vm1.messages import AlarmCode
from simulators.errors import ScenarioError

__all__ = [
    "AlarmSpec",
    "Corruption",
    "DeviceSpec",
    "FaultSpec",
    "LinkDrop",
    "PauseSpec",
    "RebootSpec",
    "Scenario",
    "SessionScript",
    "format_errors",
    "load_scenario",
    "parse_scenario",
    "read_toml",
]

#: Longest a treatment can run before the device ends it with TIMEOUT (ICD section 3).
SESSION_TIMEOUT_S = 40 * 60

Seconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Duration = Annotated[float, Field(gt=0, allow_inf_nan=False)]
U16 = Annotated[int, Field(ge=0, le=0xFFFF)]


class _Strict(BaseModel):
    """No unknown keys, no silent string-to-number coercion, immutable after load."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def _ascii_field(value: str, width: int) -> str:
    if not value.isascii() or "\x00" in value:
        raise ValueError("must be ASCII without NUL characters")
    if len(value) > width:
        raise ValueError(f"must be at most {width} characters")
    return value


class DeviceSpec(_Strict):
    """The device's identity (sent in IDENT) and its power supply."""

    model: str = "VM-1"
    serial_no: str = Field(min_length=1)
    firmware: str = "1.4.2"
    nominal_rate_ul_min: int = Field(default=400, ge=1, le=0xFFFF)
    reservoir_ul: int = Field(default=6000, ge=1, le=0xFFFE)
    last_session_no: int = Field(default=0, ge=0, le=0xFFFF_FFFE)
    #: On mains power: battery is reported as ``None`` (0xFF) and STATUS flag bit 1 is set.
    mains: bool = False
    #: Battery charge at power-on; not allowed together with ``mains = true``.
    battery_pct: float = Field(default=100.0, ge=0, le=100)
    #: Battery drain while the mesh is driven (percentage points per minute).
    battery_drain_pct_per_min: float = Field(default=0.5, ge=0, le=100)
    #: Device uptime when the scenario starts: dev_ms = (uptime + t) mod 2^32. Use it to
    #: make dev_ms wrap (after 2^32 ms, ~49.7 days) during a session.
    uptime_at_start_s: float = Field(default=0.0, ge=0, le=2**32 / 1000, allow_inf_nan=False)
    #: Seeds every random draw (rate noise, sensor noise, corruption), so a run is repeatable.
    seed: int = 0
    #: false: a faulty device that acknowledges GET_INFO but never sends IDENT (not at
    #: power-up, not on port open, not in reply), for testing identity before data.
    sends_ident: bool = True

    @field_validator("model", "serial_no")
    @classmethod
    def _width12(cls, value: str) -> str:
        return _ascii_field(value, 12)

    @field_validator("firmware")
    @classmethod
    def _width8(cls, value: str) -> str:
        return _ascii_field(value, 8)

    @model_validator(mode="after")
    def _power(self) -> Self:
        if self.mains and "battery_pct" in self.model_fields_set:
            raise ValueError("battery_pct: not allowed with mains = true (a mains device has none)")
        return self


class PauseSpec(_Strict):
    """The mesh pauses at ``at_s`` and resumes ``duration_s`` later.

    ``mouthpiece``: the mouthpiece leaves the lips (flag bit 0 -> 0), contact resumes.
    ``button``: a short button press pauses, another resumes.
    A pause longer than 10 minutes ends the session with USER_STOP at the 10-minute mark.
    """

    at_s: Seconds
    duration_s: Duration
    cause: Literal["mouthpiece", "button"] = "mouthpiece"


def _alarm_code(value: Any) -> Any:
    """Accept ``0x0401``/``1025`` or a known name (``"TILT"``) or ``"0x0501"``."""
    if isinstance(value, str):
        name = value.strip()
        if name.upper() in AlarmCode.__members__:
            return int(AlarmCode[name.upper()])
        try:
            return int(name, 0)
        except ValueError:
            known = ", ".join(AlarmCode.__members__)
            raise ValueError(
                f"unknown alarm name {value!r}: use an integer code or one of {known}"
            ) from None
    return value


class AlarmSpec(_Strict):
    """An ALARM raised at ``at_s`` and cleared ``duration_s`` later (never, if omitted).

    Any u16 code is allowed, including codes ICD rev 1.0 does not know.
    Side effects on the treatment: TILT stops the output (and the level
    sensor reads unknown) while raised; MESH_BLOCKED cuts the output to 10 %.
    """

    at_s: Seconds
    code: U16
    duration_s: Duration | None = None

    @field_validator("code", mode="before")
    @classmethod
    def _named_code(cls, value: Any) -> Any:
        return _alarm_code(value)


class FaultSpec(_Strict):
    """A device fault: state FAULT with ``fault_code``; an active session ends with FAULT."""

    at_s: Seconds
    code: int = Field(ge=1, le=0xFFFF)


class SessionScript(_Strict):
    """One treatment: fill the reservoir, press the button, spray until something ends it."""

    #: When the user fills the reservoir (IDLE/DONE -> READY).
    fill_at_s: Seconds
    #: True reservoir level after filling, in microlitres.
    fill_ul: int = Field(ge=1, le=0xFFFE)
    #: When the user presses the button (READY -> NEBULIZING). Ignored if not READY then.
    start_at_s: Seconds
    #: True aerosol output rate while the mesh runs.
    rate_ul_min: float = Field(gt=0, le=5000)
    #: Relative standard deviation of the true rate's (slowly varying) noise.
    rate_noise: float = Field(default=0.05, ge=0, le=0.5)
    #: The device's rate-estimate bias for this session: reported = true x (1 + bias).
    rate_bias: float = Field(default=0.03, ge=-0.10, le=0.10)
    #: Liquid left when the mesh runs dry (not aerosolised).
    residual_ul: int = Field(default=105, ge=0, le=150)
    #: ``blind``: the level sensor reads unknown (0xFFFF) from this fill to the session's
    #: end (a tilted or fouled sensor): in SESSION_START, SESSION_END, the log and STATUS.
    level_sensor: Literal["ok", "blind"] = "ok"
    #: A drifting level sensor: the residual it reports at the session's end instead of
    #: the true level (e.g. above the fill); ``None``: the true level, within the ICD's
    #: +-0.1 mL.
    residual_reading_ul: int | None = Field(default=None, ge=0, le=0xFFFE)
    #: A long press of the button: session ends with USER_STOP.
    stop_at_s: Seconds | None = None
    pauses: tuple[PauseSpec, ...] = Field(default=(), strict=False, max_length=999)
    alarms: tuple[AlarmSpec, ...] = Field(default=(), strict=False)
    fault: FaultSpec | None = None

    @model_validator(mode="after")
    def _times(self) -> Self:
        if self.start_at_s <= self.fill_at_s:
            raise ValueError("start_at_s: must be after fill_at_s")
        if self.residual_ul >= self.fill_ul:
            raise ValueError("residual_ul: must be less than fill_ul")
        if self.stop_at_s is not None and self.stop_at_s <= self.start_at_s:
            raise ValueError("stop_at_s: must be after start_at_s")
        if self.fault is not None and self.fault.at_s <= self.start_at_s:
            raise ValueError("fault.at_s: must be after start_at_s")
        previous_end = self.start_at_s
        for i, pause in enumerate(self.pauses):
            if pause.at_s <= previous_end:
                raise ValueError(
                    f"pauses[{i}].at_s: must be after start_at_s and after the previous pause ends"
                )
            previous_end = pause.at_s + pause.duration_s
        return self


class RebootSpec(_Strict):
    """The device restarts at ``at_s`` (brown-out, watchdog, battery swap).

    Uptime (``dev_ms``), ``seq`` and the device clock start again from zero; the device
    sends IDENT as at power-up and comes back IDLE. A running session is lost, or with
    ``records_interrupted_session`` kept in the log ended with reason FAULT.
    ``session_counter_to``: the session counter restarts from this value and the log
    is erased, as after a board swap or a re-flash.
    """

    at_s: Seconds
    records_interrupted_session: bool = False
    session_counter_to: int | None = Field(default=None, ge=0, le=0xFFFF_FFFE)


class LinkDrop(_Strict):
    """The serial link disappears (USB unplugged) at ``at_s`` for ``duration_s``."""

    at_s: Seconds
    duration_s: Duration


class Corruption(_Strict):
    """Line noise at ``at_s``: ``garbage`` = ``count`` random bytes between two frames;
    ``bitflip`` = one flipped bit in each of the next ``count`` frames."""

    at_s: Seconds
    kind: Literal["garbage", "bitflip"]
    count: int = Field(ge=1, le=100_000)


class Scenario(_Strict):
    """One simulated device and everything that happens to it."""

    name: str = ""
    description: str = ""
    device: DeviceSpec
    sessions: tuple[SessionScript, ...] = Field(strict=False)
    link_drops: tuple[LinkDrop, ...] = Field(default=(), strict=False)
    reboots: tuple[RebootSpec, ...] = Field(default=(), strict=False, max_length=999)
    corruption: tuple[Corruption, ...] = Field(default=(), strict=False)

    @model_validator(mode="after")
    def _order(self) -> Self:
        if not self.sessions:
            raise ValueError("sessions: at least one [[sessions]] table is required")
        for i, session in enumerate(self.sessions):
            if session.fill_ul > self.device.reservoir_ul:
                raise ValueError(
                    f"sessions[{i}].fill_ul: {session.fill_ul} exceeds "
                    f"device.reservoir_ul {self.device.reservoir_ul}"
                )
            if i and session.fill_at_s <= self.sessions[i - 1].start_at_s:
                raise ValueError(
                    f"sessions[{i}].fill_at_s: must be after sessions[{i - 1}].start_at_s"
                )
        previous_end = -math.inf
        for i, drop in enumerate(self.link_drops):
            if drop.at_s <= previous_end:
                raise ValueError(f"link_drops[{i}].at_s: must be after the previous link drop ends")
            previous_end = drop.at_s + drop.duration_s
        for i in range(1, len(self.reboots)):
            if self.reboots[i].at_s <= self.reboots[i - 1].at_s:
                raise ValueError(f"reboots[{i}].at_s: must be after the previous reboot")
        return self

    @property
    def end_of_script_s(self) -> float:
        """Time of the last scripted event (the device keeps running after it)."""
        times: list[float] = []
        for s in self.sessions:
            times += [s.fill_at_s, s.start_at_s]
            if s.stop_at_s is not None:
                times.append(s.stop_at_s)
            times += [p.at_s + p.duration_s for p in s.pauses]
            times += [a.at_s + (a.duration_s or 0.0) for a in s.alarms]
            if s.fault is not None:
                times.append(s.fault.at_s)
        times += [d.at_s + d.duration_s for d in self.link_drops]
        times += [r.at_s for r in self.reboots]
        times += [c.at_s for c in self.corruption]
        return max(times)


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


_NAMED = re.compile(r"^([A-Za-z_][\w.\[\]]*): (.*)$", re.DOTALL)


def format_errors(source: str, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors(include_url=False):
        where = _loc(tuple(err["loc"]))
        msg = str(err["msg"]).removeprefix("Value error, ")
        # Cross-field checks name their field at the front of the message.
        named = _NAMED.match(msg) if err["type"] == "value_error" else None
        if named:
            where = f"{where}.{named[1]}" if where else named[1]
            msg = named[2]
        if "input" in err and err["type"] not in ("missing", "extra_forbidden", "value_error"):
            got = repr(err["input"])
            msg += f" (got {got if len(got) <= 60 else got[:57] + '...'})"
        if err["type"] == "extra_forbidden":
            msg = "unknown field (not part of the scenario format)"
        lines.append(f"{where}: {msg}" if where else msg)
    return f"{source}: " + "; ".join(lines)


def parse_scenario(data: Mapping[str, Any], *, source: str = "<scenario>") -> Scenario:
    """Validate already-parsed TOML data; ``source`` prefixes error messages."""
    try:
        scenario = Scenario.model_validate(dict(data))
    except ValidationError as exc:
        raise ScenarioError(format_errors(source, exc)) from exc
    if not scenario.name:
        scenario = scenario.model_copy(update={"name": Path(source).stem})
    return scenario


def read_toml(path: Path) -> dict[str, Any]:
    """A scenario file's TOML data; unreadable or invalid files are a :class:`ScenarioError`."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ScenarioError(f"{path}: cannot read scenario file: {exc.strerror or exc}") from exc
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ScenarioError(f"{path}: not valid TOML: {exc}") from exc


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate one scenario file; every problem is a :class:`ScenarioError`."""
    path = Path(path)
    return parse_scenario(read_toml(path), source=str(path))
