"""Issue 14 item 2: a full disk does not kill the gateway, and no decided event is lost.

The gateway's data directory is a small tmpfs (``mount -t tmpfs -o size=40m``; as
root here, otherwise the test skips, or fails with CI=true). Simulated VM-1s on real
ptys, a real Mosquitto. Once the gateway runs, the disk is filled to the last byte;
sessions finish while it is full: their records are held in memory, the status says
so; then space is freed and every decided event is published exactly once.

(The gateway runs in this test's process, through the same harness as the other
end-to-end tests, so the test can read its held writes directly.)
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from devicegw.storage.store import Store, StoreError
from devicegw.storage.witness import open_checked
from tests.e2e_harness import running
from tests.mqtt_helpers import MosquittoBroker, require

SIZE_MB = 40


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "fs"
    mount.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={SIZE_MB}m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    require(res.returncode == 0, f"cannot mount a tmpfs (needs root): {res.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory: Path) -> Path:
    """Write a file until the disk refuses another byte."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as f:
        for size in (1 << 20, 1 << 12, 1):
            chunk = b"\0" * size
            while True:
                try:
                    f.write(chunk)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    return filler


async def test_full_disk_holds_decided_events_and_publishes_them_once(
    mosquitto: MosquittoBroker, small_disk: Path
) -> None:
    scenarios = ["two_sessions", "complete"]  # three sessions in all
    async with running(mosquitto, small_disk, scenarios) as e2e:
        gw = e2e.gateway
        await asyncio.wait_for(gw.publisher.connected.wait(), 30)
        filler = fill(small_disk)
        assert os.statvfs(small_disk).f_bavail == 0
        # Sessions finish on a full disk: held in memory, the gateway keeps running.
        async with asyncio.timeout(120):
            while gw.store.held.dose_events() < 1:  # noqa: ASYNC110 - polling the gateway
                await asyncio.sleep(0.1)
        snap = gw.snapshot().to_json()["store"]
        assert snap["held_dose_events"] >= 1 and snap["disk_full_since"] is not None
        assert e2e.dose_events() == []  # nothing decided was published before it was stored
        # Give the other sessions time to finish while the disk is still full.
        async with asyncio.timeout(120):
            while gw.store.held.dose_events() < 3:  # noqa: ASYNC110 - polling the gateway
                await asyncio.sleep(0.1)
        assert gw.restarts.counts == {}  # no task died
        filler.unlink()  # space returns
        events = await e2e.wait_dose_events(3, timeout=60)
        await asyncio.sleep(2.0)  # a duplicate would arrive now
        events = e2e.dose_events()
        assert len(gw.store.held) == 0
        assert gw.snapshot().store.disk_full_since is None
        # The retained gateway status said so on the broker: full, then free again.
        states = [
            m.json()["store"]
            for m in e2e.collector.matching("gw-test/status")
            if m.json().get("store") is not None
        ]
        assert any(s["disk_full"] and s["held_dose_events"] >= 1 for s in states), states
        assert states[-1]["disk_full"] is False, states
    counts = collections.Counter(e["event_id"] for e in events)
    assert len(counts) == 3
    assert set(counts.values()) == {1}, counts
    with contextlib.suppress(FileNotFoundError):
        filler.unlink()


def test_a_data_dir_with_less_than_the_wal_working_space_is_refused_at_start(
    small_disk: Path,
) -> None:
    """Below MIN_FREE_BYTES (the WAL's ~16 MB between checkpoints and as much again for a
    checkpoint) the store is not opened: one clear error now, not a full disk later."""
    keep = 20 * 2**20  # leave ~20 MB free: above the old 16 MB threshold, below 32 MB
    st = os.statvfs(small_disk)
    free = st.f_bavail * st.f_frsize
    (small_disk / "filler").write_bytes(b"\0" * (free - keep))
    with pytest.raises(StoreError, match=r"MB free for the gateway store .* at least 32 MB"):
        open_checked(small_disk / "data")
    assert not (small_disk / "data" / Store.FILE_NAME).exists()
    (small_disk / "filler").unlink()
    opening = open_checked(small_disk / "data")  # with the space back it opens
    opening.store.close()
