"""Waits for a serial port's path to appear, so a replugged device is opened at once.

udev removes ``/dev/serial/by-id/<name>`` when a USB device is unplugged and
creates it again when it is back. While the path is absent there is nothing to
retry: the reconnect loop waits here instead of backing off, and opens the
port the moment the path exists again. Before, the retry delay kept growing
while the port was away, and a port back for 5 s was often never reopened.

The wait uses inotify on the nearest existing ancestor directory
(``/dev/serial/by-id``, or ``/dev/serial`` and ``/dev`` while udev has removed
the ``by-id`` directory itself, as it does when no serial device is left), via
the maintained ``asyncinotify``. A short poll of the path runs beside it as a
safety net (a symlink whose target appears later, an event missed while the
watch moves) and alone where inotify is not available.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

from asyncinotify import Inotify, Mask, Watch

log = logging.getLogger(__name__)

#: Re-check the path at least this often (real seconds) while inotify waits.
SAFETY_POLL_S = 0.5
#: Poll interval (real seconds) where inotify cannot be used.
FALLBACK_POLL_S = 0.1
_MASK = Mask.CREATE | Mask.MOVED_TO | Mask.ATTRIB | Mask.DELETE_SELF | Mask.MOVE_SELF


def port_present(path: str | os.PathLike[str]) -> bool:
    """Does the path lead to something (a symlink to a missing node does not)?"""
    return os.path.exists(path)


def _anchor(path: Path) -> Path:
    """The nearest ancestor directory of ``path`` that exists now."""
    for parent in path.absolute().parents:
        if parent.is_dir():
            return parent
    return Path("/")


async def wait_for_path(path: str | os.PathLike[str]) -> None:
    """Return as soon as ``path`` exists (real time: this is I/O, not domain time)."""
    target = Path(path)
    if port_present(target):
        return
    try:
        inotify = Inotify()
    except OSError as exc:  # no inotify (limits reached, another OS): a short poll
        log.debug("inotify unavailable (%s); polling %s", exc, target)
        while not port_present(target):  # noqa: ASYNC110 - polling a path is the point
            await asyncio.sleep(FALLBACK_POLL_S)
        return
    with inotify:
        watch: Watch | None = None
        watched: Path | None = None
        while not port_present(target):
            anchor = _anchor(target)
            if anchor != watched:
                if watch is not None:
                    with contextlib.suppress(OSError, ValueError):
                        inotify.rm_watch(watch)
                    watch = watched = None
                try:
                    watch = inotify.add_watch(anchor, _MASK)
                except OSError:
                    await asyncio.sleep(FALLBACK_POLL_S)  # the directory went away meanwhile
                    continue
                watched = anchor
                continue  # check again: the path may have appeared before the watch was set
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SAFETY_POLL_S):
                    await inotify.get()
