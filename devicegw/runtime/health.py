"""Health snapshot of a running gateway, written to the data directory for `devicegw status`.

A file rather than a socket: nothing listens on the ward network, the snapshot
survives the process for a post-mortem, and any monitoring agent can read it.
It is replaced atomically, so a reader never sees half a file.

The snapshot is typed (:class:`GatewaySnapshot`) and built by the gateway
(:meth:`devicegw.runtime.gateway.Gateway.snapshot`); this module only writes
and reads it, and knows nothing of the gateway's insides.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

FILE_NAME = "status.json"
INTERVAL_S = 2.0
#: Devices built or encoded per turn of the event loop when the snapshot is refreshed
#: (:func:`run`): ~1-2 ms of the loop at a time rather than ~20 ms at 1,000 devices.
SLICE = 100
_COMPACT = (",", ":")
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class DeviceIdentity:
    """As the device sent it: data, shown escaped by `devicegw status`."""

    model: str
    serial_no: str
    firmware: str


@dataclass(frozen=True, slots=True)
class DeviceSnapshot:
    """One nebulizer."""

    identity: DeviceIdentity | None
    port: str
    connected: bool
    connects: int
    open_failures: int
    refusals: int
    last_frame_age_s: float | None
    frames_ok: int
    frames_bad: int
    frames_lost: int
    refused: str | None
    last_error: str | None
    identified: bool
    identity_note: str | None
    held_before_ident: int
    dropped_before_ident: int
    #: Repeats of the connection's IDENT within a second, not processed (an IDENT flood).
    idents_ignored: int
    open_session: int | None


@dataclass(frozen=True, slots=True)
class OximeterSnapshot:
    port: str
    bed: str
    connected: bool
    last_sample_age_s: float | None
    samples: int
    samples_gated: int
    checksum_errors: int
    last_error: str | None


@dataclass(frozen=True, slots=True)
class StoreSnapshot:
    """A full disk: decided writes held in memory until space returns (README "Disk")."""

    held_writes: int
    held_dose_events: int
    held_dropped: int
    disk_full_since: str | None
    last_error: str | None
    quarantined_rows: int


@dataclass(frozen=True, slots=True)
class LoopLagSnapshot:
    """How late the event loop woke (:mod:`devicegw.runtime.loop_lag`), since start."""

    samples: int
    max_s: float
    over_50ms: int
    stalls: int


@dataclass(frozen=True, slots=True)
class GatewaySnapshot:
    gateway_id: str
    site: str
    utc: str
    pid: int
    #: host, port and the publisher's counters (:class:`~devicegw.mqtt.publisher.PublisherStats`)
    broker: dict[str, Any]
    outbox_depth: int
    store_bytes: int
    store: StoreSnapshot
    #: file descriptors held now (None where /proc is not there) and the limit in force
    descriptors_in_use: int | None
    descriptors_limit: int
    devices: dict[str, DeviceSnapshot]
    oximeters: dict[str, OximeterSnapshot]
    #: supervised tasks restarted after an unexpected failure (a bug: see the log)
    task_restarts: dict[str, int]
    task_errors: dict[str, str]
    loop_lag: LoopLagSnapshot

    def to_json(self) -> dict[str, Any]:
        plain = _plain(self)
        assert isinstance(plain, dict)
        return plain


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}
_LEAVES = frozenset({str, int, float, bool, type(None)})


def _names(cls: type) -> tuple[str, ...]:
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = tuple(f.name for f in fields(cls))
    return names


def _plain(value: Any) -> Any:
    """``dataclasses.asdict`` without its deep copy of every leaf.

    Called every 2 s for up to 1,000 devices, in a worker thread that still holds the
    GIL: asdict took ~20 ms of the event loop's time each round at 500 beds.
    """
    names = _FIELD_NAMES.get(type(value))
    if names is None and is_dataclass(value) and not isinstance(value, type):
        names = _names(type(value))
    if names is not None:
        out = {name: getattr(value, name) for name in names}
    elif isinstance(value, dict):
        out = dict(value)
    elif isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    else:
        return value
    for key, item in out.items():
        if type(item) not in _LEAVES:
            out[key] = _plain(item)
    return out


def age(now_mono: float, then_mono: float | None) -> float | None:
    return None if then_mono is None else round(now_mono - then_mono, 3)


def write(snapshot: GatewaySnapshot, data_dir: Path | str) -> None:
    # Compact: json's C encoder (indent= takes the pure-Python one, ~5x slower).
    # `devicegw status` shows it readably; so does `python -m json.tool status.json`.
    write_text(json.dumps(snapshot.to_json(), separators=_COMPACT) + "\n", data_dir)


def write_text(text: str, data_dir: Path | str) -> None:
    """Replace the snapshot file with ``text`` atomically (or in place on a full disk)."""
    path = Path(data_dir) / FILE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    data = text.encode()
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError:
        # A full disk: overwrite the old snapshot in place (its blocks are allocated), so
        # `devicegw status` still shows what is held; if even that fails, try next time.
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
            with path.open("r+b") as f:
                f.write(data)
                f.truncate()


async def encode_in_slices(snapshot: GatewaySnapshot) -> str:
    """The same JSON object as :func:`write` writes, built :data:`SLICE` devices a turn.

    json's C encoder holds the GIL for a whole ``dumps``: in a worker thread, one
    ``dumps`` of 1,000 devices still stopped the event loop for ~8 ms. The devices and
    oximeters come last in the object (a JSON reader does not care about key order).
    """
    head = {
        name: _plain(getattr(snapshot, name))
        for name in _names(GatewaySnapshot)
        if name not in ("devices", "oximeters")
    }
    parts = [json.dumps(head, separators=_COMPACT)[:-1]]
    for name, table in (("devices", snapshot.devices), ("oximeters", snapshot.oximeters)):
        parts.append(f',"{name}":{{')
        # Each slice's '"key":{...}' pairs, comma-separated (the dumps without its braces).
        chunks = [
            json.dumps({k: _plain(v) for k, v in items}, separators=_COMPACT)[1:-1]
            async for items in in_slices(table.items())
        ]
        parts.append(",".join(chunks))
        parts.append("}")
    parts.append("}\n")
    return "".join(parts)


async def in_slices(items: Iterable[_T]) -> AsyncIterator[list[_T]]:
    """``items`` (copied first) in lists of :data:`SLICE`, the loop's turn after each."""
    every = list(items)
    for start in range(0, len(every), SLICE):
        yield every[start : start + SLICE]
        await asyncio.sleep(0)


async def run(snapshot: Callable[[], Awaitable[GatewaySnapshot]], data_dir: Path | str) -> None:
    """Refresh the snapshot every INTERVAL_S until cancelled.

    Real seconds, not the gateway clock: this is for the people and monitors
    watching the process, whatever speed a simulation runs at. The snapshot is
    built and encoded on the loop a slice of devices at a time (at 1,000 devices,
    whole, that stopped the loop for ~20 ms every 2 s: issue 13) and written by a
    worker thread.
    """
    while True:
        text = await encode_in_slices(await snapshot())
        await asyncio.to_thread(write_text, text, data_dir)
        await asyncio.sleep(INTERVAL_S)


def read(data_dir: Path) -> tuple[dict[str, Any], float]:
    """The last snapshot and its age in real seconds (a stale one means no running gateway)."""
    path = Path(data_dir) / FILE_NAME
    data: dict[str, Any] = json.loads(path.read_text())
    return data, time.time() - path.stat().st_mtime
