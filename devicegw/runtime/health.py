"""Health snapshot of a running gateway, written to the data directory for `devicegw status`.

A file rather than a socket: nothing listens on the ward network, the snapshot
survives the process for a post-mortem, and any monitoring agent can read it.
It is replaced atomically, so a reader never sees half a file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from devicegw.runtime.gateway import Gateway

FILE_NAME = "status.json"
INTERVAL_S = 2.0


def snapshot(gw: Gateway) -> dict[str, Any]:
    now_mono = gw.clock.monotonic()
    stats = gw.publisher.stats
    devices = {}
    for runner in gw.runners:
        h = runner.health
        ident = runner.tracker.identity
        devices[runner.device.id] = {
            # As the device sent it: data, shown escaped by `devicegw status`.
            "identity": None
            if ident is None
            else {"model": ident.model, "serial_no": ident.serial_no, "firmware": ident.firmware},
            "port": runner.device.link.port_name,
            "connected": h.connected,
            "connects": h.connects,
            "open_failures": h.open_failures,
            "refusals": h.refusals,
            "last_frame_age_s": (
                None if h.last_frame_mono is None else round(now_mono - h.last_frame_mono, 3)
            ),
            "frames_ok": h.frames_ok,
            "frames_bad": h.frames_bad,
            "frames_lost": h.frames_lost,
            "refused": h.refused,
            "last_error": h.last_error,
            "identified": h.identified,
            "identity_note": h.identity_note,
            "held_before_ident": h.held_before_ident,
            "dropped_before_ident": h.dropped_before_ident,
            "open_session": runner.tracker.open_session_no,
        }
    oximeters = {}
    for ox in gw.oximeter_runners:
        oh = ox.health
        oximeters[ox.oximeter.id] = {
            "port": ox.oximeter.link.port_name,
            "bed": ox.oximeter.bed,
            "connected": oh.connected,
            "last_sample_age_s": (
                None if oh.last_sample_mono is None else round(now_mono - oh.last_sample_mono, 3)
            ),
            "samples": oh.samples,
            "samples_gated": oh.samples_gated,
            "checksum_errors": oh.checksum_errors,
            "last_error": oh.last_error,
        }
    return {
        "gateway_id": gw.config.gateway.id,
        "site": gw.config.gateway.site,
        "utc": gw.clock.now().isoformat(),
        "pid": os.getpid(),
        "broker": {
            "host": gw.config.broker.host,
            "port": gw.config.broker.port,
            **asdict(stats),
        },
        "outbox_depth": gw.publisher.outbox.depth(),
        "store_bytes": gw.store.size_bytes(),
        # A full disk: decided writes held in memory until space returns (README "Disk").
        "store": {
            "held_writes": len(gw.store.held),
            "held_dose_events": gw.store.held.dose_events(),
            "held_dropped": gw.store.held.dropped,
            "disk_full_since": (
                None if gw.store.held.full_since is None else gw.store.held.full_since.isoformat()
            ),
            "last_error": gw.store.held.last_error,
            "quarantined_rows": gw.publisher.outbox.quarantined_now,
        },
        "devices": devices,
        "oximeters": oximeters,
        # Supervised tasks restarted after an unexpected failure (a bug: see the log).
        "task_restarts": dict(gw.restarts.counts),
        "task_errors": dict(gw.restarts.last_error),
    }


def write(gw: Gateway) -> None:
    path = Path(gw.config.gateway.data_dir) / FILE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    text = (json.dumps(snapshot(gw), indent=2) + "\n").encode()
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_bytes(text)
        os.replace(tmp, path)
    except OSError:
        # A full disk: overwrite the old snapshot in place (its blocks are allocated), so
        # `devicegw status` still shows what is held; if even that fails, try next time.
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
            with path.open("r+b") as f:
                f.write(text)
                f.truncate()


async def run(gw: Gateway) -> None:
    """Refresh the snapshot every INTERVAL_S until cancelled.

    Real seconds, not the gateway clock: this is for the people and monitors
    watching the process, whatever speed a simulation runs at.
    """
    while True:
        write(gw)
        await asyncio.sleep(INTERVAL_S)


def read(data_dir: Path) -> tuple[dict[str, Any], float]:
    """The last snapshot and its age in real seconds (a stale one means no running gateway)."""
    path = Path(data_dir) / FILE_NAME
    data: dict[str, Any] = json.loads(path.read_text())
    return data, time.time() - path.stat().st_mtime
