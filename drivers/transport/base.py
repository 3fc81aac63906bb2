"""The one small interface every byte transport implements (serial, in-memory, ...)."""

from __future__ import annotations

from typing import Protocol


class ByteLink(Protocol):
    """A bidirectional byte stream that can break and be reopened.

    ``read`` returns at least one byte, or raises ``TransportError`` when the
    link is gone (unplugged, closed by the peer); it never returns ``b""``.
    """

    @property
    def description(self) -> str: ...

    async def open(self) -> None: ...

    async def read(self) -> bytes: ...

    async def write(self, data: bytes) -> None: ...

    async def close(self) -> None: ...
