"""Serial transport: pyserial opens and configures the port, the event loop reads it.

Opens the port with the device's settings (VM-1: 115200 8N1, no flow
control), takes an exclusive lock so two gateways cannot share a port, and
discards whatever the OS buffered before we opened it: the device talks
continuously and a stale half-frame is worth nothing.

Reading and writing go through the event loop (``add_reader`` / ``add_writer``
on the descriptor, then ``os.read`` / ``os.write``), never through pyserial's
``read``, which calls ``select()``: ``select()`` refuses descriptors above 1023,
so with a few hundred ports open every read failed, once per loop iteration
(issue 13). pyserial opens the descriptor non-blocking; epoll has no such limit.

The reader stays registered while the port is open and reads into a bounded
buffer, as asyncio's own transports do: registering and removing it around every
read cost two ``epoll_ctl`` calls per read, about 7 % of the gateway's CPU at
500 beds (issue 13). A consumer that falls behind by :data:`_BUFFER_LIMIT`
pauses the reading (the OS buffers, then the device's bytes are dropped by the
tty, as with any slow reader) until it catches up.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import deque

import serial

from drivers.errors import PortAbsentError, TransportError
from drivers.transport.base import LinkUnit
from drivers.transport.port_watch import port_present

_READ_CHUNK = 4096
#: Bytes read ahead of the consumer before the reader pauses.
_BUFFER_LIMIT = 256 * 1024


class SerialLink:
    """A serial port as a :class:`~drivers.transport.base.Link` (a byte stream)."""

    unit: LinkUnit = "stream"

    def __init__(self, path: str, *, baudrate: int = 115200, device_id: str | None = None) -> None:
        self.path = path
        self.baudrate = baudrate
        self.device_id = device_id
        self._port: serial.Serial | None = None
        self._fd: int | None = None
        self._waiters: set[asyncio.Future[None]] = set()
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._reading = False
        self._failed: TransportError | None = None
        self._read_waiter: asyncio.Future[None] | None = None
        self._want = 1  # bytes the waiting reader asked for

    @property
    def description(self) -> str:
        return f"serial:{self.path}@{self.baudrate}"

    @property
    def fileno(self) -> int | None:
        """The open port's descriptor (None when closed)."""
        return self._fd

    async def open(self) -> None:
        if not port_present(self.path):
            raise PortAbsentError(
                f"serial port {self.path} does not exist", path=self.path, device_id=self.device_id
            )
        try:
            port = serial.Serial(
                self.path,
                self.baudrate,
                bytesize=serial.EIGHTBITS,
                parity=serial.PARITY_NONE,
                stopbits=serial.STOPBITS_ONE,
                xonxoff=False,
                rtscts=False,
                exclusive=True,
                timeout=0,
            )
        except (serial.SerialException, OSError, ValueError) as exc:
            raise TransportError(
                f"cannot open serial port {self.path}: {exc}", device_id=self.device_id
            ) from exc
        with contextlib.suppress(serial.SerialException, OSError):
            port.reset_input_buffer()
        fd = port.fileno()
        os.set_blocking(fd, False)
        self._port, self._fd = port, fd
        self._chunks.clear()
        self._buffered = 0
        self._failed = None

    def _fd_or_raise(self) -> int:
        if self._fd is None:
            raise TransportError(f"{self.path} is not open", device_id=self.device_id)
        return self._fd

    async def _ready(self, fd: int, *, write: bool) -> None:
        """Wait until ``fd`` is readable (or writable), one-shot, through the event loop."""
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        if write:
            loop.add_writer(fd, wake)
        else:
            loop.add_reader(fd, wake)
        self._waiters.add(ready)
        try:
            await ready
        finally:
            self._waiters.discard(ready)
            if write:
                loop.remove_writer(fd)
            else:
                loop.remove_reader(fd)

    async def read(self) -> bytes:
        return await self.read_at_least(1)

    async def read_at_least(self, n: int) -> bytes:
        """Everything buffered, once it is ``n`` bytes or more (or the port failed).

        A stream whose messages are long and arrive in pieces (a Nonin packet: 125
        bytes as 25 frames over a third of a second) wakes its reader once per
        message instead of once per piece: 75 task wake-ups a second per oximeter
        were the largest share of the loop's turns at 500 beds (issue 13). The bytes
        are read off the port as they come either way; only the wake-up waits.
        """
        want = max(1, min(n, _BUFFER_LIMIT))
        while True:
            if self._buffered >= want or (self._chunks and self._failed is not None):
                data = b"".join(self._chunks)
                self._chunks.clear()
                self._buffered = 0
                return data
            if self._failed is not None:
                raise self._failed
            fd = self._fd_or_raise()
            self._start_reading(fd)
            waiter = asyncio.get_running_loop().create_future()
            self._read_waiter = waiter
            self._want = want
            self._waiters.add(waiter)
            try:
                await waiter
            finally:
                self._waiters.discard(waiter)
                self._read_waiter = None

    def _start_reading(self, fd: int) -> None:
        if not self._reading:
            asyncio.get_running_loop().add_reader(fd, self._on_readable, fd)
            self._reading = True

    def _stop_reading(self, fd: int) -> None:
        if self._reading:
            asyncio.get_running_loop().remove_reader(fd)
            self._reading = False

    def _on_readable(self, fd: int) -> None:
        try:
            data = os.read(fd, _READ_CHUNK)
        except BlockingIOError:
            return
        except OSError as exc:  # EIO: the device or the pty's other side went away
            self._fail(fd, f"serial port {self.path} failed: {exc}")
            return
        if not data:
            # A tty in raw mode with VMIN=0 answers "nothing yet" with 0 bytes; 0 bytes
            # when the loop said "readable" is a port that went away (as pyserial judges it).
            self._fail(fd, f"serial port {self.path} closed")
            return
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered >= _BUFFER_LIMIT:
            self._stop_reading(fd)  # read() restarts it once the consumer has taken the bytes
        if self._buffered >= self._want:
            self._wake()

    def _fail(self, fd: int, message: str) -> None:
        self._failed = TransportError(message, device_id=self.device_id)
        self._stop_reading(fd)
        self._wake()

    def _wake(self) -> None:
        waiter = self._read_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            fd = self._fd_or_raise()
            try:
                n = os.write(fd, view)
            except BlockingIOError:
                await self._ready(fd, write=True)
                continue
            except OSError as exc:
                raise TransportError(
                    f"write to {self.path} failed: {exc}", device_id=self.device_id
                ) from exc
            view = view[n:]

    async def close(self) -> None:
        port, fd, self._port, self._fd = self._port, self._fd, None, None
        self._chunks.clear()
        self._buffered = 0
        self._reading = False
        if fd is not None:
            # Nothing may stay registered with the loop for a descriptor about to close.
            loop = asyncio.get_running_loop()
            loop.remove_reader(fd)
            loop.remove_writer(fd)
            for waiter in list(self._waiters):
                if not waiter.done():
                    waiter.set_exception(
                        TransportError(f"serial port {self.path} closed", device_id=self.device_id)
                    )
        if port is not None:
            with contextlib.suppress(serial.SerialException, OSError):
                port.close()
