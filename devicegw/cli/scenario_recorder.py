"""Recordings made from scenarios in virtual time (``devicegw simulate --record``).

``devicegw simulate --scenario F --record DIR``: drives the
pure :class:`~simulators.vm1_model.Vm1Model` in virtual time (no pty, no
sleeping) and writes what a gateway would have recorded: the link opening,
the device's port-open IDENT, the gateway's handshake (GET_INFO, SET_CLOCK to
the virtual UTC, SET_RATE if the device is configured with ``output_rate_hz``)
as sent bytes with the device's answers, then every message the device sends,
received at the instant it is sent. Scripted link drops close the link (what
the device sends meanwhile is lost) and the gateway reopens 0.5 s after the
port returns; line noise and bit flips are injected like the pty simulator
does. The virtual gateway does not run the pipeline, so it never sends
GET_SESSION for a missed SESSION_END (scenarios in which the gateway needs the
device's session log replay as "end missed").

A Nonin oximeter scenario paired with a VM-1 scenario (``--oximeter``) adds
what the bed's SpO2 monitor would have been given (format version 2): the
oximeter link up at power-on, one sample per packet stamped on arrival (3 per
second, decoded by the production codec), and the bed's 1 s tick. BLE
oximeters (PLX, BerryMed) are simulated live only (``simulate --ble``).
"""

from __future__ import annotations

import heapq
import random
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from devicegw.config import Config, DeviceSettings, GatewaySettings, OximeterSettings
from devicegw.errors import ConfigError
from devicegw.recording.bed_inputs import encode_sample
from devicegw.recording.format import (
    BED_TICK,
    CLOSE,
    OPEN,
    OX_SAMPLE,
    OX_UP,
    RX,
    TX,
    RecordingWriter,
    utc_to_us,
)
from drivers.oximeter.nonin import NoninDecoder, to_sample
from drivers.vm1.framing import Deframer
from drivers.vm1.messages import DeviceMessage, GetInfo, HostCommand, SetClock, SetRate
from drivers.vm1.stream import encode_message_frame

if TYPE_CHECKING:
    from simulators.oximeter_scenario import OximeterScenario
    from simulators.scenario import Scenario

__all__ = [
    "DEFAULT_SIM_START",
    "SimRecordStats",
    "record_scenario",
    "simulate_record",
    "synthesized_device",
]

#: Virtual UTC at which ``simulate --record`` powers the devices on, unless told otherwise.
DEFAULT_SIM_START = datetime(2026, 1, 5, 8, 0, tzinfo=UTC)
_SIM_NAMESPACE = uuid.UUID("0b7e4a52-7d0f-4f57-9c1e-2a8f3b8e6d10")
#: Gateway's delay between the port reappearing and its reopen (its first backoff step).
SIM_REOPEN_DELAY_S = 0.5


@dataclass(slots=True)
class SimRecordStats:
    device_id: str
    scenario: str
    sim_seconds: float = 0.0
    frames: int = 0
    frames_lost: int = 0
    records: int = 0
    bytes: int = 0
    wall_s: float = 0.0


def synthesized_device(
    index: int, scenario: Scenario, *, output_rate_hz: int | None = None
) -> DeviceSettings:
    """Config of the ``index``-th simulated device when no --config is given."""
    serial = scenario.device.serial_no
    return DeviceSettings(
        id=f"neb-{serial}" if _ident_ok(serial) else f"neb-sim{index + 1:02d}",
        type="vm1",
        link={"kind": "serial", "port": f"sim://{serial}"},  # type: ignore[arg-type]
        bed=f"SIM{index + 1:02d}",
        subject_id=f"SIM-{index + 1:04d}",
        kit_number=f"K-SIM-{index + 1:04d}",
        output_rate_hz=output_rate_hz,
    )


def _ident_ok(text: str) -> bool:
    import re

    return re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,59}", text) is not None


def synthesized_oximeter(device: DeviceSettings, scenario: OximeterScenario) -> OximeterSettings:
    """Config of a simulated Nonin on ``device``'s bed when no --config is given."""
    serial = scenario.oximeter.serial_no
    return OximeterSettings(
        id=f"ox-{serial}" if _ident_ok(serial) else f"ox-{device.bed.lower()}",
        type="nonin_oem3",
        link={"kind": "serial", "port": f"sim://{serial}"},  # type: ignore[arg-type]
        bed=device.bed,
        subject_id=device.subject_id,
        model=scenario.oximeter.model,
        serial_no=serial,
    )


def simulation_config(
    devices: list[DeviceSettings], oximeters: Sequence[OximeterSettings] = ()
) -> Config:
    return Config(
        gateway=GatewaySettings(id="gw-sim", site="site-sim"),
        devices=devices,
        oximeters=list(oximeters),
    )


class _BedInputs:
    """What the bed's SpO2 monitor would have been given, in virtual time.

    A Nonin's packets are decoded as the live serial source does (one sample per
    packet, stamped on arrival: sent and received at once here); the bed ticks every
    second from power-on, as the gateway's BedTicker does.
    """

    def __init__(
        self,
        scenario: OximeterScenario,
        oximeter: OximeterSettings,
        writer: RecordingWriter,
        device_id: str,
        utc0: int,
    ) -> None:
        from simulators.oximeter_sim import NoninSim, make_sim

        if scenario.oximeter.protocol != "nonin":
            raise ConfigError(
                f"{scenario.name}: simulate --record takes Nonin (serial) oximeters; "
                f"a {scenario.oximeter.protocol} oximeter is simulated with --ble"
            )
        sim = make_sim(scenario)
        assert isinstance(sim, NoninSim)
        self._sim = sim
        self._decoder = NoninDecoder()
        self._writer = writer
        self._device_id = device_id
        self._oximeter_id = oximeter.id.encode("utf-8")
        self._utc0 = utc0
        self._done_s = 0.0
        self._next_tick_s = 1.0

    def _append(self, kind: str, t: float, payload: bytes) -> None:
        self._writer.append(self._device_id, kind, t, self._utc0 + round(t * 1_000_000), payload)

    def link_up(self, t: float) -> None:
        self._append(OX_UP, t, self._oximeter_id)

    def until(self, t: float) -> None:
        """Everything the monitor was given up to and including ``t``."""
        if t < self._done_s:
            return
        for sent_s, data in self._sim.timed_frames_between(self._done_s, t + 1e-9):
            while self._next_tick_s < sent_s:
                self._append(BED_TICK, self._next_tick_s, b"")
                self._next_tick_s += 1.0
            for packet in self._decoder.feed(data):
                self._append(OX_SAMPLE, sent_s, encode_sample(to_sample(packet)))
        while self._next_tick_s <= t:
            self._append(BED_TICK, self._next_tick_s, b"")
            self._next_tick_s += 1.0
        self._done_s = t + 1e-9


class _ScenarioRecording:
    """One scenario played in virtual time, written as a gateway would have recorded it.

    The device model answers; this class plays the gateway's side of the link:
    open and close, the handshake, the bytes each way, and the scripted link
    faults (drops, line noise, bit flips) at their times.
    """

    def __init__(
        self,
        scenario: Scenario,
        writer: RecordingWriter,
        *,
        device: DeviceSettings,
        start_utc: datetime,
        bed: _BedInputs | None = None,
    ) -> None:
        from simulators.vm1_model import Vm1Model

        self.scenario = scenario
        self.model = Vm1Model.from_scenario(scenario)
        self.writer = writer
        self.device = device
        self.dev_id = device.id
        self.stats = SimRecordStats(device.id, scenario.name)
        self.utc0 = utc_to_us(start_utc)
        self.bed = bed
        self.rng = random.Random(f"vm1/{scenario.device.seed}/link")
        self.link_up = False
        self.bitflips = 0
        self.host_seq = 0
        self._order = 10_000  # tie-breaker of link events scheduled while playing

    def us(self, t: float) -> int:
        return self.utc0 + round(t * 1_000_000)

    def emit(self, msgs: list[DeviceMessage], t: float) -> None:
        """What the device sends at ``t``: received, or lost while the link is down."""
        if not msgs:
            return
        if not self.link_up:
            self.stats.frames_lost += len(msgs)
            return
        frames = [encode_message_frame(m) for m in msgs]
        if self.bitflips:
            i = len(frames) - min(self.bitflips, len(frames))
            for j in range(i, len(frames)):
                f = bytearray(frames[j])
                f[self.rng.randrange(1, len(f) - 1)] ^= 1 << self.rng.randrange(8)
                frames[j] = bytes(f)
                self.bitflips -= 1
        self.stats.frames += len(frames)
        self.writer.append(self.dev_id, RX, t, self.us(t), b"".join(frames))

    def command(self, cmd: HostCommand, t: float) -> None:
        cmd = replace(cmd, seq=self.host_seq)
        self.host_seq = (self.host_seq + 1) & 0xFF
        self.writer.append(self.dev_id, TX, t, self.us(t), encode_message_frame(cmd))
        self.emit(self.model.handle_command(cmd, t), t)

    def connect(self, t: float) -> None:
        """The gateway opens the port: the device's IDENT, then the handshake."""
        self.emit(self.model.advance(t), t)  # lost: the link is still down
        self.link_up = True
        serial = self.scenario.device.serial_no
        self.writer.append(self.dev_id, OPEN, t, self.us(t), f"simulated {serial}".encode())
        self.emit([self.model.ident_message(t)], t)  # the device's port-open IDENT
        self.command(GetInfo(), t + 0.002)
        self.command(SetClock(unix_s=self.us(t + 0.004) // 1_000_000), t + 0.004)
        if self.device.output_rate_hz is not None:
            self.command(SetRate(hz=self.device.output_rate_hz), t + 0.006)

    def link_event(self, events: list[tuple[float, int, str, float]], at: float) -> None:
        """A scripted fault at ``at`` (the heap's head, already popped into the args)."""
        _, _, kind, arg = heapq.heappop(events)
        self.emit(self.model.advance(at), at)
        if kind == "drop" and self.link_up:
            self.link_up = False
            self.writer.append(self.dev_id, CLOSE, at, self.us(at), b"simulated link drop")
            self._order += 1
            heapq.heappush(events, (at + arg + SIM_REOPEN_DELAY_S, self._order, "reopen", 0.0))
        elif kind == "reopen" and not self.link_up:
            self.connect(at)
        elif kind == "garbage" and self.link_up:
            self.writer.append(self.dev_id, RX, at, self.us(at), self._junk(int(arg)))
        elif kind == "bitflip":
            self.bitflips += int(arg)

    def _junk(self, n: int) -> bytes:
        """Line noise that holds no valid frame by chance."""
        junk = b""
        for _ in range(100):
            junk = bytes(self.rng.getrandbits(8) for _ in range(n))
            if not Deframer().feed(b"\x7e" + junk + b"\x7e"):
                break
        return junk

    def scripted_events(self) -> list[tuple[float, int, str, float]]:
        """(time, order, kind, arg) like the pty simulator's link events, as a heap."""
        events: list[tuple[float, int, str, float]] = []
        for i, drop in enumerate(self.scenario.link_drops):
            events.append((drop.at_s, i, "drop", drop.duration_s))
        for i, c in enumerate(self.scenario.corruption):
            events.append((c.at_s, 1000 + i, c.kind, float(c.count)))
        heapq.heapify(events)
        self._order = 10_000
        return events

    def run(self, until_s: float | None, tail_s: float) -> float:
        """Play to ``until_s`` (or ``tail_s`` after the script ends); returns the end time."""
        events = self.scripted_events()
        model = self.model
        bed = self.bed
        if bed is not None:
            bed.link_up(0.0)
        self.connect(0.0)
        end = until_s
        while True:
            nt = model.next_event_time()
            if events and events[0][0] <= nt:
                at = events[0][0]
                if end is not None and at > end:
                    break
                if bed is not None:
                    bed.until(at)
                self.link_event(events, at)
                continue
            if end is None and model.scripted_done and not events:
                end = model.time_s + tail_s
            if end is not None and nt > end:
                break
            if bed is not None:
                bed.until(nt)
            # next_event_time() is ms / 1000: nudge it so advance()'s floor(t * 1000) reaches it.
            self.emit(model.advance(nt + 0.0004), nt)
        t_end = end if end is not None else model.time_s
        if bed is not None:
            bed.until(t_end)
        if self.link_up:
            self.writer.append(self.dev_id, CLOSE, t_end, self.us(t_end), b"closed")
        return t_end


def record_scenario(
    scenario: Scenario,
    out_dir: str | Path,
    *,
    config: Config,
    device: DeviceSettings,
    start_utc: datetime = DEFAULT_SIM_START,
    until_s: float | None = None,
    tail_s: float = 10.0,
    run_id: str | None = None,
    flush_interval_s: float = 60.0,
    oximeter: OximeterScenario | None = None,
) -> SimRecordStats:
    """Run one scenario in virtual time and write its recording; see the module docstring."""
    t_wall = time.perf_counter()
    dev_id = device.id
    if run_id is None:
        run_id = str(
            uuid.uuid5(
                _SIM_NAMESPACE, f"{scenario.name}/{scenario.device.serial_no}/{start_utc}/{dev_id}"
            )
        )
    writer = RecordingWriter(
        out_dir,
        config,
        run_id=run_id,
        flush_interval_s=flush_interval_s,
        source="simulator",
        header_extra={
            dev_id: {
                "scenario": scenario.name,
                "serial_no": scenario.device.serial_no,
                "seed": scenario.device.seed,
                "handshake": "simulated (GET_INFO, SET_CLOCK, SET_RATE if configured)",
            }
        },
    )
    bed = None
    if oximeter is not None:
        settings = config.oximeter_for(device)
        if settings is None:
            raise ConfigError(
                f"oximeter scenario {oximeter.name}: the config has no oximeter on bed {device.bed}"
            )
        bed = _BedInputs(oximeter, settings, writer, dev_id, utc_to_us(start_utc))
    recording = _ScenarioRecording(scenario, writer, device=device, start_utc=start_utc, bed=bed)
    t_end = recording.run(until_s, tail_s)
    writer.close()
    stats = recording.stats
    stats.sim_seconds = t_end
    stats.records = writer.stats.records
    stats.bytes = writer.stats.bytes
    stats.wall_s = time.perf_counter() - t_wall
    return stats


def _record_job(
    args: tuple[
        Scenario, Path, Config, DeviceSettings, datetime, float | None, OximeterScenario | None
    ],
) -> SimRecordStats:
    scenario, out_dir, config, device, start, until, oximeter = args
    return record_scenario(
        scenario,
        out_dir,
        config=config,
        device=device,
        start_utc=start,
        until_s=until,
        oximeter=oximeter,
    )


def simulate_record(
    scenarios: Sequence[Scenario],
    out_dir: str | Path,
    *,
    config: Config | None = None,
    start_utc: datetime = DEFAULT_SIM_START,
    until_s: float | None = None,
    output_rate_hz: int | None = None,
    jobs: int = 1,
    oximeters: Sequence[OximeterScenario | None] = (),
) -> list[SimRecordStats]:
    """Record every scenario; device ``i`` is ``config.devices[i]`` (or synthesized).

    ``oximeters[i]``: a Nonin scenario on scenario ``i``'s bed (or None).
    """
    if len(oximeters) > len(scenarios):
        raise ConfigError(f"{len(oximeters)} oximeter scenarios for {len(scenarios)} devices")
    paired = list(oximeters) + [None] * (len(scenarios) - len(oximeters))
    if config is not None:
        if len(config.devices) < len(scenarios):
            raise ConfigError(
                f"{len(scenarios)} scenarios but only {len(config.devices)} devices in the config"
            )
        devices = list(config.devices[: len(scenarios)])
    else:
        devices = [
            synthesized_device(i, s, output_rate_hz=output_rate_hz) for i, s in enumerate(scenarios)
        ]
        config = simulation_config(
            devices,
            [
                synthesized_oximeter(d, ox)
                for d, ox in zip(devices, paired, strict=True)
                if ox is not None
            ],
        )
    out = Path(out_dir)
    jobs_args = [
        (s, out, config, d, start_utc, until_s, ox)
        for s, d, ox in zip(scenarios, devices, paired, strict=True)
    ]
    if jobs <= 1 or len(scenarios) == 1:
        return [_record_job(a) for a in jobs_args]
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(_record_job, jobs_args))
