"""File descriptors: raised toward the hard limit at start, budgeted per device, reported.

Each serial port is one descriptor (read through the event loop, so no
``select()`` ceiling at 1024: drivers/transport/serial_link.py); the store, its
WAL, the broker socket, inotify, D-Bus and logs need a few more. A gateway whose
devices cannot fit under the machine's hard limit is refused at start with one
line, not failing later one port at a time.
"""

from __future__ import annotations

import os
import resource
import time

from devicegw.config import Config

#: Store + WAL + shm, broker socket, inotify, D-Bus, logs, the health file, margin.
BASE_DESCRIPTORS = 64
#: A serial port (its descriptor, plus one while a replug is watched).
PER_SERIAL_DEVICE = 2
#: A BLE device shares the D-Bus connection; one for its notifications' plumbing.
PER_BLE_DEVICE = 1
#: Soft limit asked for when the hard limit is unlimited.
UNLIMITED_TARGET = 65_536


def needed(config: Config) -> int:
    """Descriptors the configured devices need at most."""
    links = [d.link for d in config.devices] + [o.link for o in config.oximeters]
    serial = sum(1 for link in links if link.kind == "serial")
    return BASE_DESCRIPTORS + PER_SERIAL_DEVICE * serial + PER_BLE_DEVICE * (len(links) - serial)


def hard_limit() -> int:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return UNLIMITED_TARGET if hard == resource.RLIM_INFINITY else int(hard)


def raise_soft_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (a default of 1024 is too few for
    a large ward); returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard_limit()
    if soft == resource.RLIM_INFINITY or soft >= target:
        return hard_limit() if soft == resource.RLIM_INFINITY else int(soft)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return int(soft)
    return target


#: (time.monotonic() of the count, the count) of the last :func:`in_use`.
_last_count: tuple[float, int | None] | None = None


def in_use(*, max_age_s: float = 0.0) -> int | None:
    """Descriptors this process holds (Linux /proc), or None where it cannot tell.

    ``max_age_s``: a count at most that old will do. Listing /proc/self/fd takes ~4 ms
    at 3,000 descriptors (500 beds), and the status snapshot, taken every 2 s on the
    event loop, does not need it fresher than every few seconds.
    """
    global _last_count
    now = time.monotonic()
    if _last_count is not None and now - _last_count[0] <= max_age_s:
        return _last_count[1]
    try:
        count: int | None = len(os.listdir("/proc/self/fd"))
    except OSError:
        count = None
    _last_count = (now, count)
    return count


def limit() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return hard_limit() if soft == resource.RLIM_INFINITY else int(soft)
