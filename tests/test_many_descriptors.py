"""No select() ceiling (issue 13): a serial port whose descriptor is above 1023 works.

pyserial's ``Serial.read`` calls ``select()``, which raises ``ValueError:
filedescriptor out of range`` for descriptors >= 1024; the gateway's serial link
reads through the event loop instead. Real pyserial on a real pseudo-terminal,
opened after 1,100 spare descriptors so its number is above 1023.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import tty
from collections.abc import Iterator
from pathlib import Path

import pytest

from drivers.transport.serial_link import SerialLink

SPARE = 1100


@pytest.fixture
def high_descriptors() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = SPARE + 200
    if hard != resource.RLIM_INFINITY and hard < want:
        pytest.fail(f"RLIMIT_NOFILE hard limit {hard} is below {want}: cannot test here")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    spare = [os.open(os.devnull, os.O_RDONLY) for _ in range(SPARE)]
    try:
        yield
    finally:
        for fd in spare:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_serial_port_above_descriptor_1023_reads_and_writes(high_descriptors: None) -> None:
    controller, device = os.openpty()
    tty.setraw(device)
    os.set_blocking(controller, False)
    link = SerialLink(os.ttyname(device), device_id="neb-high")
    try:
        await link.open()
        assert link.fileno is not None and link.fileno > 1023
        os.write(controller, b"\x7e from the device \x7e")
        got = b""
        async with asyncio.timeout(5):
            while len(got) < 19:
                got += await link.read()
        assert got == b"\x7e from the device \x7e"
        await link.write(b"GET_INFO" * 100)  # larger than one write may take at once
        sent = b""
        async with asyncio.timeout(5):
            while len(sent) < 800:
                await asyncio.sleep(0.01)
                with contextlib.suppress(BlockingIOError):
                    sent += os.read(controller, 4096)
        assert sent == b"GET_INFO" * 100
    finally:
        await link.close()
        os.close(controller)
        os.close(device)


async def test_close_wakes_a_pending_read() -> None:
    """Closing the link ends a read that is waiting, with a TransportError, not a hang."""
    from drivers.errors import TransportError

    controller, device = os.openpty()
    link = SerialLink(os.ttyname(device), device_id="neb-close")
    await link.open()
    reader = asyncio.create_task(link.read())
    await asyncio.sleep(0.05)
    await link.close()
    with pytest.raises(TransportError):
        async with asyncio.timeout(5):
            await reader
    os.close(controller)
    os.close(device)


def test_soft_limit_is_raised_toward_the_hard_limit() -> None:
    from devicegw.runtime import descriptors

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        now = descriptors.raise_soft_limit()
        assert now == descriptors.hard_limit() == descriptors.limit()
        assert now > 256
        used = descriptors.in_use()
        assert used is not None and 0 < used < now
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_ward_that_cannot_fit_is_refused_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """500 serial devices on a machine whose hard limit is 1,024 (the limit is patched:
    lowering the real one would bind the rest of the test run)."""
    from devicegw.config import parse_config
    from devicegw.errors import ConfigError
    from devicegw.runtime import descriptors
    from devicegw.runtime.preflight import preflight

    devices = [
        {
            "id": f"neb-{i:03d}",
            "type": "vm1",
            "bed": f"B{i:03d}",
            "subject_id": f"CVD-042-{i:04d}",
            "kit_number": f"K-{i:04d}",
            "link": {"kind": "serial", "port": f"/dev/devicegw/vm1-{i:03d}"},
        }
        for i in range(500)
    ]
    config = parse_config(
        {"gateway": {"id": "gw", "site": "s1", "data_dir": str(tmp_path)}, "devices": devices}
    )
    monkeypatch.setattr(descriptors, "hard_limit", lambda: 1024)
    with pytest.raises(ConfigError, match="500 devices need about 1064 file descriptors"):
        preflight(config)
    monkeypatch.setattr(descriptors, "hard_limit", lambda: 4096)
    preflight(config)


async def test_a_consumer_that_falls_behind_pauses_the_reading_and_loses_nothing() -> None:
    """The reader stays registered and reads ahead into a bounded buffer (issue 13): when
    the consumer stops taking bytes, the link reads at most ~256 KiB ahead, then leaves
    the rest to the OS (the writer waits), and resumes when the consumer catches up."""
    from drivers.transport import serial_link

    controller, device = os.openpty()
    tty.setraw(device)
    link = SerialLink(os.ttyname(device), device_id="neb-slow")
    data = bytes(range(256)) * (3 * serial_link._BUFFER_LIMIT // 256)  # 768 KiB
    loop = asyncio.get_running_loop()
    try:
        await link.open()
        first = await asyncio.wait_for(
            asyncio.gather(link.read(), loop.run_in_executor(None, os.write, controller, b"x")),
            5,
        )
        assert first[0] == b"x"
        writer = loop.run_in_executor(None, _write_all, controller, data)
        async with asyncio.timeout(10):
            while link._reading:  # noqa: ASYNC110 - polls the link: reads ahead until full, pauses
                await asyncio.sleep(0.01)
        assert serial_link._BUFFER_LIMIT <= link._buffered < serial_link._BUFFER_LIMIT + 4096
        assert not writer.done()  # the rest waits in the OS, nothing is dropped
        got = bytearray()
        async with asyncio.timeout(20):
            while len(got) < len(data):
                got += await link.read()
        await writer
        assert bytes(got) == data
    finally:
        await link.close()
        os.close(controller)
        os.close(device)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def test_a_recent_count_of_descriptors_is_reused_when_allowed(tmp_path: Path) -> None:
    from devicegw.runtime import descriptors

    fresh = descriptors.in_use()
    assert fresh is not None
    with open(tmp_path / "x", "wb"):  # one more descriptor
        assert descriptors.in_use(max_age_s=3600) == fresh  # the count just taken
        assert descriptors.in_use() == fresh + 1  # counted again
