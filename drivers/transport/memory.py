"""The in-memory twin of a transport: a :class:`~drivers.transport.base.Link` with no OS below it.

A :class:`MemoryPort` is the device's end (what a simulator or a test drives);
:meth:`MemoryPort.link` makes the gateway's end, a :class:`MemoryLink` that
keeps the link contract exactly as the serial and BLE links do (the same suite,
``tests/test_link_contract.py``, runs against all three): ``open`` fails while
the port is unplugged, ``read`` never returns ``b""`` and raises
:class:`~drivers.errors.TransportError` once the device is gone (and keeps
raising until the link is closed and opened again), ``close`` is idempotent.

The port's ``unit`` says whether it carries a byte stream (serial-like: chunks
are passed on as written, the reader must deframe) or messages (BLE-like: one
chunk is one message). It is a real, deterministic backend, not a mock: use it
where a pty or a BLE sandbox would add nothing but time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from drivers.errors import TransportError
from drivers.link_unit import LinkUnit

__all__ = ["MemoryLink", "MemoryPort"]


class _Gone:
    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


class _Connection:
    """One open of the link: the chunks each way, until either end goes away."""

    def __init__(self) -> None:
        self.to_gateway: asyncio.Queue[bytes | _Gone] = asyncio.Queue()
        self.gone: str | None = None

    def end(self, reason: str) -> None:
        if self.gone is None:
            self.gone = reason
            self.to_gateway.put_nowait(_Gone(reason))


class MemoryPort:
    """The device's end of an in-memory link.

    ``on_open`` is called (with the port) each time the gateway opens a link to
    it, e.g. to send the IDENT a VM-1 sends when its port is opened.
    """

    def __init__(
        self,
        unit: LinkUnit = "stream",
        *,
        name: str = "port",
        on_open: Callable[[MemoryPort], None] | None = None,
    ) -> None:
        self.unit: LinkUnit = unit
        self.name = name
        self.present = True
        self.opens = 0
        self._on_open = on_open
        self._conn: _Connection | None = None
        self._to_device: asyncio.Queue[bytes] = asyncio.Queue()

    @property
    def connected(self) -> bool:
        return self._conn is not None and self._conn.gone is None

    def link(self, *, device_id: str | None = None) -> MemoryLink:
        """A new gateway end for this port (closed; call ``open``)."""
        return MemoryLink(self, device_id=device_id)

    def send(self, chunk: bytes) -> bool:
        """Device -> gateway; False (nothing sent) while no link is open."""
        conn = self._conn
        if conn is None or conn.gone is not None or not chunk:
            return False
        conn.to_gateway.put_nowait(bytes(chunk))
        return True

    async def receive(self) -> bytes:
        """The next chunk the gateway wrote on the current connection."""
        return await self._to_device.get()

    def unplug(self, reason: str = "unplugged") -> None:
        """The device goes away: an open link is lost, and opens fail until :meth:`plug`."""
        self.present = False
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.end(reason)

    def plug(self) -> None:
        self.present = True

    # ------------------------------------------------------------------ for MemoryLink

    def _connect(self) -> _Connection:
        old = self._conn
        if old is not None:
            old.end("replaced by a new connection")
        conn = self._conn = _Connection()
        while not self._to_device.empty():  # what an earlier connection wrote is not for this one
            self._to_device.get_nowait()
        self.opens += 1
        if self._on_open is not None:
            self._on_open(self)
        return conn

    def _disconnect(self, conn: _Connection) -> None:
        if self._conn is conn:
            self._conn = None


class MemoryLink:
    """The gateway's end of a :class:`MemoryPort`; a :class:`~drivers.transport.base.Link`."""

    def __init__(self, port: MemoryPort, *, device_id: str | None = None) -> None:
        self.port = port
        self.device_id = device_id
        self._conn: _Connection | None = None
        self._closed_reason = "not open"

    @property
    def unit(self) -> LinkUnit:
        return self.port.unit

    @property
    def description(self) -> str:
        return f"memory:{self.port.name}"

    async def open(self) -> None:
        if self._conn is not None:
            raise TransportError(f"{self.description} is already open", device_id=self.device_id)
        if not self.port.present:
            raise TransportError(f"{self.description} is not there", device_id=self.device_id)
        self._conn = self.port._connect()

    async def read(self) -> bytes:
        conn = self._conn
        if conn is None:
            raise TransportError(
                f"{self.description} {self._closed_reason}", device_id=self.device_id
            )
        item = await conn.to_gateway.get()
        if isinstance(item, _Gone):
            conn.to_gateway.put_nowait(item)  # every later read fails the same way
            raise TransportError(
                f"{self.description} lost: {item.reason}", device_id=self.device_id
            )
        return item

    async def write(self, data: bytes) -> None:
        conn = self._conn
        if conn is None or conn.gone is not None:
            why = self._closed_reason if conn is None else f"lost: {conn.gone}"
            raise TransportError(f"{self.description} {why}", device_id=self.device_id)
        self.port._to_device.put_nowait(bytes(data))

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        self._closed_reason = "is closed"
        if conn is not None:
            conn.end("closed")
            self.port._disconnect(conn)
