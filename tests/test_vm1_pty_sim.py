"""The VM-1 simulator behind a REAL pseudo-terminal, opened with pyserial like a real port."""

from __future__ import annotations

import asyncio
import io
import itertools
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import serial

from drivers.clock import ManualClock, ScaledClock
from drivers.vm1.framing import encode_frame
from drivers.vm1.messages import (
    Ack,
    AckResult,
    DeviceState,
    EndReason,
    GetInfo,
    Ident,
    Message,
    Output,
    SessionStart,
    SetRate,
    Status,
)
from drivers.vm1.stream import StreamStats, Vm1StreamDecoder, encode_message_frame
from simulators.errors import ScenarioError
from simulators.run import run_scenarios, simulate_main
from simulators.scenario import Scenario, parse_scenario
from simulators.vm1_pty import Vm1PtySimulator

SCENARIO_DIR = Path(__file__).resolve().parent.parent / "simulators" / "scenarios"
SCALE = 50  # 1 s of device time = 20 ms


def short_scenario(**extra: Any) -> Scenario:
    """400 uL at 600 uL/min from 2 s: COMPLETE after ~33 s device time (~0.7 s at 50x)."""
    data: dict[str, Any] = {
        "device": {"serial_no": "VM1-PTY01", "seed": 5, "mains": True},
        "sessions": [{"fill_at_s": 1, "fill_ul": 400, "start_at_s": 2, "rate_ul_min": 600}],
    }
    data.update(extra)
    return parse_scenario(data, source="short.toml")


@dataclass
class Capture:
    messages: list[Message]
    stats: StreamStats
    error: serial.SerialException | None


def read_port(
    path: Path,
    until: Callable[[list[Message]], bool],
    *,
    send: Sequence[bytes] = (),
    timeout_s: float = 5.0,
    started: threading.Event | None = None,
) -> Capture:
    """Open ``path`` with pyserial and decode until ``until`` holds or the port breaks."""
    port = serial.Serial(str(path), 115200, timeout=0.01)
    try:
        decoder = Vm1StreamDecoder()
        for data in send:
            port.write(data)
        got: list[Message] = []
        deadline = time.monotonic() + timeout_s  # a safety net, not a speed assertion
        while time.monotonic() < deadline:
            try:
                got += decoder.feed(port.read(4096))
            except serial.SerialException as exc:
                return Capture(got, decoder.stats, exc)
            if got and started is not None:
                started.set()
            if until(got):
                return Capture(got, decoder.stats, None)
        raise AssertionError(f"condition not met within {timeout_s} s; got {got[-5:]}")
    finally:
        port.close()


def lexists(path: str | Path) -> bool:
    """Does ``path`` exist as a name (a dangling symlink counts)? Instant on a tmpfs."""
    return os.path.lexists(path)


def has(cls: type[Message], n: int = 1) -> Callable[[list[Message]], bool]:
    return lambda got: sum(isinstance(m, cls) for m in got) >= n


async def wait_for(cond: Callable[[], bool], timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not cond():  # noqa: ASYNC110 - polls simulator counters, no event to wait on
            await asyncio.sleep(0.002)


def check_clean_stream(cap: Capture) -> None:
    assert cap.stats.bad_payloads == 0
    seqs = [m.seq for m in cap.messages]
    assert all((b - a) % 256 == 1 for a, b in itertools.pairwise(seqs)), seqs


async def test_frames_arrive_on_the_symlink_and_decode(tmp_path: Path) -> None:
    async with Vm1PtySimulator(
        short_scenario(), clock=ScaledClock(SCALE), link_dir=tmp_path
    ) as sim:
        assert sim.path == tmp_path / "usb-VM-1_VM1-PTY01-if00"
        assert sim.path.is_symlink()
        assert os.readlink(sim.path) == sim.pts_path
        assert sim.pts_path is not None and sim.pts_path.startswith("/dev/pts/")
        cap = await asyncio.to_thread(read_port, sim.path, has(Output, 20))
    assert cap.error is None
    check_clean_stream(cap)
    assert cap.stats.crc_errors == 0
    # pyserial flushes the input on open; the simulator answers that with an IDENT.
    ident = next(m for m in cap.messages if isinstance(m, Ident))
    assert (ident.model, ident.serial_no) == ("VM-1", "VM1-PTY01")
    start = next(m for m in cap.messages if isinstance(m, SessionStart))
    assert start.dev_ms == 2000
    outputs = [m for m in cap.messages if isinstance(m, Output)]
    assert len(outputs) >= 20
    assert {b.dev_ms - a.dev_ms for a, b in itertools.pairwise(outputs)} == {100}
    assert sim.counters.frames_sent > 0 and sim.counters.port_opens >= 1
    assert not sim.path.exists()  # close() removed the symlink


async def test_get_info_and_command_errors_over_the_wire(tmp_path: Path) -> None:
    commands = [
        encode_message_frame(GetInfo(seq=5)),
        encode_frame(bytes([0x88, 6, 0, 0, 0, 0])),  # unknown command type
        encode_frame(bytes([0x86, 7, 0, 0, 0, 0])),  # SET_RATE without its body
        encode_message_frame(SetRate(hz=51, seq=8)),
    ]

    def done(got: list[Message]) -> bool:
        return any(isinstance(m, Ack) and m.acked_seq == 8 for m in got)

    async with Vm1PtySimulator(
        short_scenario(), clock=ScaledClock(SCALE), link_dir=tmp_path
    ) as sim:
        cap = await asyncio.to_thread(read_port, sim.path, done, send=commands)
    assert cap.error is None
    check_clean_stream(cap)
    acks = {m.acked_seq: m for m in cap.messages if isinstance(m, Ack)}
    assert (acks[5].cmd, acks[5].result) == (0x81, AckResult.OK)
    assert (acks[6].cmd, acks[6].result) == (0x88, AckResult.UNKNOWN_COMMAND)
    assert (acks[7].cmd, acks[7].result) == (0x86, AckResult.BAD_ARGUMENT)
    assert (acks[8].cmd, acks[8].result) == (0x86, AckResult.BAD_ARGUMENT)
    after_ack = cap.messages[cap.messages.index(acks[5]) + 1]
    assert isinstance(after_ack, Ident) and after_ack.serial_no == "VM1-PTY01"
    assert sim.counters.commands_received == 2 and sim.counters.commands_rejected == 2


async def test_set_rate_over_the_wire(tmp_path: Path) -> None:
    def fast_outputs(got: list[Message]) -> bool:
        out = [m.dev_ms for m in got if isinstance(m, Output)]
        return len(out) >= 10 and all(
            b - a == 20 for a, b in zip(out[-10:], out[-9:], strict=False)
        )

    async with Vm1PtySimulator(
        short_scenario(), clock=ScaledClock(SCALE), link_dir=tmp_path
    ) as sim:
        send = [encode_message_frame(SetRate(hz=50, seq=1))]
        cap = await asyncio.to_thread(read_port, sim.path, fast_outputs, send=send)
        assert sim.model.telemetry_hz == 50
    assert cap.error is None


async def test_link_drop_breaks_the_reader_and_a_new_pty_appears(tmp_path: Path) -> None:
    async with Vm1PtySimulator(
        short_scenario(), clock=ScaledClock(SCALE), link_dir=tmp_path
    ) as sim:
        first_pts = sim.pts_path
        started = threading.Event()
        reader = asyncio.create_task(
            asyncio.to_thread(read_port, sim.path, lambda got: False, started=started)
        )
        assert await asyncio.to_thread(started.wait, 5.0)
        sim.drop_link(3.0)
        cap = await reader
        assert isinstance(cap.error, serial.SerialException)  # the "unplug"
        last_seq_before = cap.messages[-1].seq
        await wait_for(lambda: sim.counters.link_drops == 1)
        # While down the by-id style link is gone, as udev removes it on unplug.
        if not sim.link_up:
            assert not lexists(sim.path)
        await sim.wait_link_up()
        assert sim.path.is_symlink() and os.readlink(sim.path) == sim.pts_path
        assert sim.counters.ptys_created == 2
        cap2 = await asyncio.to_thread(
            read_port, sim.path, lambda got: has(Ident)(got) and has(Output, 5)(got)
        )
        assert cap2.error is None
        assert any(isinstance(m, Ident) for m in cap2.messages)
        assert sim.counters.messages_lost_link_down > 0
        assert (cap2.messages[0].seq - last_seq_before) % 256 > 1  # frames were lost
        assert first_pts is not None


async def test_scripted_link_drop_and_idle(tmp_path: Path) -> None:
    scenario = short_scenario(link_drops=[{"at_s": 10, "duration_s": 5}])
    async with Vm1PtySimulator(scenario, clock=ScaledClock(SCALE), link_dir=tmp_path) as sim:
        async with asyncio.timeout(10):
            await sim.wait_until_idle()
        assert sim.link_up and sim.path.is_symlink()
        (summary,) = sim.model.history
        assert summary.reason is EndReason.COMPLETE
        assert sim.counters.link_drops == 1
        # 5 s down: ~50 OUTPUT + 5 STATUS never reached the wire.
        assert 50 <= sim.counters.messages_lost_link_down <= 60
        assert sim.counters.idents_sent >= 2  # power-up and link back


async def test_corruption_is_discarded_by_the_receiver(tmp_path: Path) -> None:
    scenario = short_scenario(
        corruption=[
            {"at_s": 3, "kind": "garbage", "count": 200},
            {"at_s": 4, "kind": "bitflip", "count": 6},
        ]
    )

    def past_six_s(got: list[Message]) -> bool:
        return any(m.dev_ms > 6000 for m in got)

    clock = ManualClock()
    async with Vm1PtySimulator(scenario, clock=clock, link_dir=tmp_path) as sim:
        reader = asyncio.create_task(asyncio.to_thread(read_port, sim.path, past_six_s))
        await wait_for(lambda: sim.counters.port_opens >= 1)  # the reader has the port open
        for _ in range(70):
            clock.advance(0.1)
            await asyncio.sleep(0.005)
        cap = await reader
    assert cap.error is None
    assert sim.counters.garbage_bytes_injected == 200
    assert sim.counters.frames_corrupted == 6
    assert cap.stats.bad_payloads == 0  # nothing decoded from noise
    assert cap.stats.frames_bad >= 6 and cap.stats.bytes_discarded >= 200
    assert cap.stats.frames_lost >= 6
    assert any(isinstance(m, Output) and m.dev_ms > 6000 for m in cap.messages)


async def test_nobody_reading_drops_bytes_and_a_new_reader_gets_no_backlog(tmp_path: Path) -> None:
    clock = ManualClock()
    scenario = short_scenario()
    async with Vm1PtySimulator(scenario, clock=clock, link_dir=tmp_path) as sim:
        for _ in range(20):
            clock.advance(60)  # 20 minutes: far more than the pty buffer holds
            await wait_for(lambda: sim.model.time_s >= clock.monotonic() - 1e-9)
        c = sim.counters
        assert c.bytes_dropped > 0 and c.frames_dropped > 0
        assert sim.model.history[0].reason is EndReason.COMPLETE

        def fresh(got: list[Message]) -> bool:
            return any(isinstance(m, Status) and m.dev_ms >= 1_201_000 for m in got)

        reader = asyncio.create_task(asyncio.to_thread(read_port, sim.path, fresh))
        await wait_for(lambda: sim.counters.port_opens >= 1)
        clock.advance(1.0)
        cap = await reader
    # pyserial's open() flushed the backlog: the first thing read is the port-open IDENT.
    assert isinstance(cap.messages[0], Ident)
    assert cap.messages[0].dev_ms == 1_200_000
    status = next(m for m in cap.messages if isinstance(m, Status))
    assert status.state is DeviceState.DONE


async def test_run_scenarios_and_simulate_main(tmp_path: Path) -> None:
    paths = [SCENARIO_DIR / "complete.toml", SCENARIO_DIR / "user_stop_half.toml"]
    clock = ManualClock()
    async with run_scenarios(paths, clock, tmp_path) as sims:
        assert [s.path.name for s in sims] == [
            "usb-VM-1_VM1-000123-if00",
            "usb-VM-1_VM1-000187-if00",
        ]
        assert all(s.path.is_symlink() for s in sims)
        assert sims[0].model.last_session_no == 41
    assert not any(lexists(s.path) for s in sims)

    with pytest.raises(ScenarioError, match="serial_no"):
        async with run_scenarios([paths[0], paths[0]], clock, tmp_path):
            pass

    out = io.StringIO()
    task = asyncio.create_task(simulate_main(paths, clock=clock, link_dir=tmp_path, out=out))
    await wait_for(lambda: out.getvalue().count("\n") == 2)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith(f"VM1-000123  {tmp_path}/usb-VM-1_VM1-000123-if00 -> /dev/pts/")
    assert lines[1].endswith("(user_stop_half)")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not any(lexists(s.path) for s in sims)


async def test_simulate_main_reports_a_bad_scenario(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[device]\nserial_no = "X"\n')
    assert await simulate_main([bad], clock=ManualClock(), link_dir=tmp_path) == 2


async def test_close_is_idempotent_and_cleans_up(tmp_path: Path) -> None:
    sim = Vm1PtySimulator(short_scenario(), clock=ManualClock(), link_dir=tmp_path / "links")
    await sim.start()
    pts = sim.pts_path
    assert pts is not None and lexists(pts)
    await sim.close()
    await sim.close()
    assert not lexists(sim.path)
    assert not sim.link_up
