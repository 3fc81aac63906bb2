"""Serial transport over pyserial-asyncio-fast (USB CDC-ACM, RS-232, or a pty).

Opens the port with the device's settings (VM-1: 115200 8N1, no flow
control), takes an exclusive lock so two gateways cannot share a port, and
discards whatever the OS buffered before we opened it: the device talks
continuously and a stale half-frame is worth nothing.
"""

from __future__ import annotations

import asyncio
import contextlib

import serial
import serial_asyncio_fast

from drivers.errors import PortAbsentError, TransportError
from drivers.transport.base import LinkUnit
from drivers.transport.port_watch import port_present

_READ_CHUNK = 4096


class SerialLink:
    """A serial port as a :class:`~drivers.transport.base.Link` (a byte stream)."""

    unit: LinkUnit = "stream"

    def __init__(self, path: str, *, baudrate: int = 115200, device_id: str | None = None) -> None:
        self.path = path
        self.baudrate = baudrate
        self.device_id = device_id
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    @property
    def description(self) -> str:
        return f"serial:{self.path}@{self.baudrate}"

    async def open(self) -> None:
        if not port_present(self.path):
            raise PortAbsentError(
                f"serial port {self.path} does not exist", path=self.path, device_id=self.device_id
            )
        try:
            reader, writer = await serial_asyncio_fast.open_serial_connection(
                url=self.path,
                baudrate=self.baudrate,
                bytesize=serial.EIGHTBITS,
                parity=serial.PARITY_NONE,
                stopbits=serial.STOPBITS_ONE,
                xonxoff=False,
                rtscts=False,
                exclusive=True,
            )
        except (serial.SerialException, OSError, ValueError) as exc:
            raise TransportError(
                f"cannot open serial port {self.path}: {exc}", device_id=self.device_id
            ) from exc
        port = getattr(writer.transport, "serial", None)
        if port is not None:
            with contextlib.suppress(serial.SerialException, OSError):
                port.reset_input_buffer()
        self._reader, self._writer = reader, writer

    async def read(self) -> bytes:
        if self._reader is None:
            raise TransportError(f"{self.path} is not open", device_id=self.device_id)
        try:
            data = await self._reader.read(_READ_CHUNK)
        except (serial.SerialException, OSError) as exc:
            raise TransportError(
                f"serial port {self.path} failed: {exc}", device_id=self.device_id
            ) from exc
        if not data:
            raise TransportError(f"serial port {self.path} closed", device_id=self.device_id)
        return data

    async def write(self, data: bytes) -> None:
        if self._writer is None:
            raise TransportError(f"{self.path} is not open", device_id=self.device_id)
        try:
            self._writer.write(data)
            await self._writer.drain()
        except (serial.SerialException, OSError, ConnectionError) as exc:
            raise TransportError(
                f"write to {self.path} failed: {exc}", device_id=self.device_id
            ) from exc

    async def close(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
