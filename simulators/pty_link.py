"""The pty half of the serial simulators: a pseudo-terminal behind a by-id style symlink.

Both serial simulators (:mod:`simulators.vm1_pty`, :mod:`simulators.oximeter_pty`)
are reached the way a ward device is: through a stable symlink to the current
``/dev/pts/N``. The pty, the symlink and the simulator's start/close around
them are the same for both, so they live here.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import struct
import termios
import tty
from abc import abstractmethod
from pathlib import Path

from drivers.clock import Clock
from drivers.errors import TransportError
from simulators.lifecycle import ClockedSimulator

__all__ = ["Pty", "PtySimulator", "point_symlink", "remove_symlink", "write_master"]


class Pty:
    """One pseudo-terminal pair: raw slave kept open by us, non-blocking master in packet mode."""

    def __init__(self) -> None:
        master, slave = os.openpty()
        try:
            tty.setraw(slave)  # at once: no echo of our own frames, no CR/LF mangling
            fcntl.ioctl(master, termios.TIOCPKT, struct.pack("i", 1))
            os.set_blocking(master, False)
            self.name = os.ttyname(slave)
        except BaseException:
            os.close(master)
            os.close(slave)
            raise
        self.master = master
        self.slave = slave

    def close(self) -> None:
        for fd in (self.master, self.slave):
            with contextlib.suppress(OSError):
                os.close(fd)


def point_symlink(link: Path, target: str, owner: object) -> None:
    """Point ``link`` at ``target`` atomically (as udev maintains /dev/serial/by-id).

    ``owner`` keeps the temporary name apart from other simulators in this process.
    """
    if os.path.lexists(link) and not link.is_symlink():
        raise TransportError(f"{link} exists and is not a symlink; refusing to replace it")
    tmp = link.with_name(f".{link.name}.{os.getpid()}.{id(owner)}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)


def remove_symlink(link: Path, target: str) -> None:
    """Remove ``link`` if it still points at ``target`` (not a newer pty's link)."""
    with contextlib.suppress(OSError):
        if os.readlink(link) == target:
            link.unlink()


def write_master(pty: Pty, data: bytes) -> int:
    """Write to the master; bytes that do not fit (EAGAIN) or find no link (EIO) are dropped."""
    try:
        return os.write(pty.master, data)
    except BlockingIOError:
        return 0
    except OSError as exc:
        if exc.errno != errno.EIO:
            raise
        return 0


class PtySimulator(ClockedSimulator):
    """A simulator reachable at :attr:`path`; subclasses open and close the pty."""

    task_prefix = "pty-sim"

    def __init__(self, *, clock: Clock, link_dir: str | Path, name: str) -> None:
        self._clock = clock
        self._link_dir = Path(link_dir)
        self._name = name
        self._pty: Pty | None = None
        self._t0 = 0.0
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def path(self) -> Path:
        """The stable port path (a symlink to the current ``/dev/pts/N``; absent while down)."""
        return self._link_dir / self._name

    @property
    def pts_path(self) -> str | None:
        """The current pty slave, or None while the link is down."""
        return None if self._pty is None else self._pty.name

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("simulator already started")
        self._link_dir.mkdir(parents=True, exist_ok=True)
        self._t0 = self._clock.monotonic()
        self._power_on()
        self._task = asyncio.create_task(self._run(), name=f"{self.task_prefix} {self._name}")

    async def close(self) -> None:
        """Stop the device, close the pty and remove the symlink. Re-raises a crash of the loop."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._stop_task()
        finally:
            self._close_link(unlink=True)

    @abstractmethod
    def _power_on(self) -> None:
        """Open the link at device time 0 (before the run loop starts)."""

    @abstractmethod
    async def _run(self) -> None: ...

    @abstractmethod
    def _close_link(self, *, unlink: bool) -> None:
        """Close the pty (and remove its symlink when ``unlink``)."""
