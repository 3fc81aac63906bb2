"""No hot loops, bounded logs (issue 13): a port that keeps failing costs a bounded number of
log lines and CPU, and the beds beside it get correct dose events.

Issue 13 saw one failing port write 711,621 log lines in a minute at 100 % CPU.
Now a link error that repeats closes the link and reopens it with backoff, a
stream that brings only line noise is closed the same way, and the same
message is logged once, then counted and summarised (RepeatedLog).

The flooding test is end to end on real ptys: healthy simulated VM-1s beside a
pty streaming random bytes at ~1 MB/s, through the gateway to a real Mosquitto.
The failing-read test drives the gateway's own NebulizerRunner over the
in-memory transport (drivers/transport/memory.py, a real backend with the link
contract): no OS port can be opened and then fail every read for ever (a pty
whose other end is closed disappears, so it fails to *open*, which was already
bounded). Assertions are counts (log lines, reconnects, CPU seconds per byte),
never wall-clock times.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import threading
import tty
from collections.abc import Iterator
from pathlib import Path

import pytest

from devicegw.config import parse_config
from devicegw.runtime import nebulizer_runner
from devicegw.runtime.log_summary import RepeatedLog
from devicegw.runtime.nebulizer_runner import NebulizerRunner
from drivers.backoff import Backoff
from drivers.clock import ManualClock, ScaledClock
from drivers.transport.memory import MemoryPort
from tests.e2e_harness import device_entry, running
from tests.mqtt_helpers import MosquittoBroker
from tests.test_e2e_assignments import scenario as one_dose  # a complete 3 ml dose
from tests.test_replug import NullSink

FLOOD_BYTES_PER_S = 1_000_000


def test_repeated_message_is_logged_once_then_summarised(caplog: pytest.LogCaptureFixture) -> None:
    clock = ManualClock()
    logger = logging.getLogger("test.repeats")
    repeats = RepeatedLog(logger, clock.monotonic)
    with caplog.at_level(logging.INFO, logger="test.repeats"):
        for _ in range(10_000):
            repeats.log(logging.WARNING, "device link lost: %s", "EIO", extra={"device_id": "d1"})
            clock.advance(0.001)  # 10 s of clock time in all: inside one window
        assert [r.getMessage() for r in caplog.records] == ["device link lost: EIO"]
        clock.advance(55)
        repeats.log(logging.WARNING, "device link lost: %s", "EIO")
        assert caplog.records[-1].getMessage() == (
            "device link lost: EIO (repeated 10000 times in the last 65 s)"
        )
        assert caplog.records[-1].__dict__["repeated"] == 10_000
        repeats.log(logging.WARNING, "device link lost: %s", "EPIPE")  # another message: logged
        repeats.log(logging.WARNING, "device link lost: %s", "EIO")  # counted
        repeats.flush()
        assert [r.getMessage() for r in caplog.records[-2:]] == [
            "device link lost: EPIPE",
            "device link lost: EIO (repeated 1 times in the last 1 s)",
        ]
        repeats.log(logging.WARNING, "device link lost: %s", "EIO")  # forgotten: in full again
        assert caplog.records[-1].getMessage() == "device link lost: EIO"
        assert len(caplog.records) == 5


async def test_a_port_whose_reads_fail_forever_is_reopened_with_backoff_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = ScaledClock(2000.0)  # backoff of 0.5-30 clock s: 0.25-15 real ms

    forty = asyncio.Event()

    def fail_at_once(port: MemoryPort) -> None:
        if port.opens > 40:
            forty.set()  # the 41st link stays up (quiet), so the runner is stopped while reading
            return
        port.unplug("read error (EIO)")  # the open connection is lost: every read fails
        port.plug()  # but the next open succeeds again

    port = MemoryPort(name="bad", on_open=fail_at_once)
    config = parse_config(
        {"gateway": {"id": "gw", "site": "s1"}, "devices": [device_entry(1, "/dev/null")]}
    )
    device = config.devices[0]
    runner = NebulizerRunner(
        device,
        config,
        link_factory=lambda: port.link(device_id=device.id),
        clock=clock,
        sink=NullSink(),
        backoff=Backoff(0.5, 30.0),
    )
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    start = clock.monotonic()
    with caplog.at_level(logging.DEBUG, logger=nebulizer_runner.__name__):
        task = asyncio.create_task(runner.run())
        try:
            async with asyncio.timeout(30):
                await forty.wait()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    span_clock_s = clock.monotonic() - start
    lines = [r for r in caplog.records if r.name == nebulizer_runner.__name__]
    lost = [r for r in lines if "device link lost" in r.getMessage()]
    # 40 failed links in ~10+ minutes of clock time: the message once, then at most one
    # summary per 60 clock seconds -- not 40 lines, and never one per read.
    assert lost[0].getMessage().startswith("device link lost: memory:bad lost: read error")
    assert span_clock_s >= 40 * 10  # the backoff reaches its 30 s cap (15-30 s) quickly
    assert len(lost) <= 1 + span_clock_s / 60 + 1
    assert len(lost) < port.opens / 2
    assert any("repeated" in r.getMessage() for r in lost)
    # Reopened with a growing delay, not at once: 40 opens took several clock minutes.
    assert runner._backoff.attempts >= 6
    cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    assert cpu < 40 * 0.05, f"{cpu:.2f} CPU s for 40 failed links"  # bounded work per attempt


@contextlib.contextmanager
def flooding_pty(link_dir: Path, rate: int = FLOOD_BYTES_PER_S) -> Iterator[tuple[str, list[int]]]:
    """A pty whose device end streams random bytes at ~``rate`` B/s (a thread, paced by a
    token bucket on bytes written, so a closed or full port does not make it spin)."""
    controller, device = os.openpty()
    tty.setraw(device)
    os.set_blocking(controller, False)
    path = link_dir / "flood-tty"
    path.symlink_to(os.ttyname(device))
    stop = threading.Event()
    written = [0]

    def flood() -> None:
        chunk = 4096
        while not stop.is_set():
            # Nobody has it open, or its buffer is full: those bytes are dropped, as a
            # device's UART would drop them.
            with contextlib.suppress(OSError):
                written[0] += os.write(controller, os.urandom(chunk))
            stop.wait(chunk / rate)

    thread = threading.Thread(target=flood, name="flood", daemon=True)
    thread.start()
    try:
        yield str(path), written
    finally:
        stop.set()
        thread.join(5)
        os.close(controller)
        os.close(device)


@pytest.mark.e2e
async def test_a_port_streaming_random_bytes_does_not_hurt_the_healthy_beds(
    mosquitto: MosquittoBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with flooding_pty(tmp_path) as (flood_path, written):
        flood = device_entry(9, flood_path)
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        with caplog.at_level(logging.INFO):
            async with running(
                mosquitto,
                tmp_path,
                [one_dose("VM1-000601", 20), one_dose("VM1-000602", 30)],
                extra_devices=[flood],
            ) as e2e:
                events = await e2e.wait_dose_events(2, timeout=90)
                await asyncio.wait_for(asyncio.gather(*(s.wait_until_idle() for s in e2e.sims)), 60)
                flood_health = next(
                    r for r in e2e.gateway.runners if r.device.id == "neb-bed09"
                ).health
                bad_frames, connects = flood_health.frames_bad, flood_health.connects
                t_clock = e2e.gateway.clock.monotonic()
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    assert sorted(e["subject_id"] for e in events) == ["CVD-042-0001", "CVD-042-0002"]
    assert all(e["verdict"] == "complete" for e in events)
    assert all(e["volume"]["delivered_fraction"] >= 0.9 for e in events)
    flood_lines = [r for r in caplog.records if r.__dict__.get("device_id") == "neb-bed09"]
    lost = [r for r in flood_lines if "device link lost" in r.getMessage()]
    assert lost and "no valid frame" in lost[0].getMessage()
    # The sessions took ~4 clock minutes: the noise port logs a few lines, never one per read.
    assert len(flood_lines) <= 30, [r.getMessage() for r in flood_lines][:40]
    # Only a bounded share of the flood is read at all: the noisy link is closed after
    # 64 KiB without a frame and reopened with backoff (0.5 s doubling to 30 s, clock), so
    # the bytes decoded from it per clock second are bounded whatever the port sends.
    assert bad_frames > 0
    assert 2 <= connects <= 8 + t_clock / 15
    noise_read_max = connects * (nebulizer_runner.NOISE_LIMIT_BYTES + 4096)
    cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    print(
        f"flood: {written[0]} B into the pty, <= {noise_read_max} B read, {connects} opens, "
        f"{bad_frames} bad frames, {cpu:.1f} CPU s (test process) for {t_clock:.0f} clock s"
    )
