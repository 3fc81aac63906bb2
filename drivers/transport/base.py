"""The one link contract every transport implements: serial, BLE and the in-memory twin.

A link moves *chunks* of bytes between the gateway and one device. What a
chunk is depends on the transport, and the link says so in :attr:`Link.unit`:

- ``"stream"``: a chunk is any slice of a continuous byte stream (a serial
  port's read); message boundaries are the codec's business (a deframer).
- ``"message"``: a chunk is one whole message exactly as the device sent it
  (a BLE characteristic value: ICD section 4 says a VM-1 value is one payload,
  with no flags, escapes or CRC), so it goes to the payload codec as it is.

Everything else is the same for every backend, and ``tests/test_link_contract.py``
runs one suite against each:

- ``open`` connects (raises :class:`~drivers.errors.TransportError` if it cannot);
- ``read`` returns one non-empty chunk, or raises ``TransportError`` once the
  link is gone (unplugged, disconnected, closed), and keeps raising until the
  link is closed and opened again; it never returns ``b""``;
- ``write`` sends one chunk (a message link: one whole message);
- ``close`` is idempotent and never raises for a link that is already gone.

Reconnecting is the caller's loop (``devicegw.runtime.reconnect``): close the
lost link, wait a capped, jittered backoff, open a new one.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from drivers.link_unit import LinkUnit
from drivers.oximeter.downsample import ReceivedSample

__all__ = ["BatchingLink", "ByteLink", "Link", "LinkUnit", "SampleSource"]


class Link(Protocol):
    """A bidirectional link that can break and be reopened; see the module docstring."""

    @property
    def unit(self) -> LinkUnit:
        """``"stream"`` (chunks are slices of a byte stream) or ``"message"`` (one message each)."""
        ...

    @property
    def description(self) -> str: ...

    async def open(self) -> None: ...

    async def read(self) -> bytes: ...

    async def write(self, data: bytes) -> None: ...

    async def close(self) -> None: ...


@runtime_checkable
class BatchingLink(Protocol):
    """A stream link that can hold its reader until a whole message may be there.

    Optional (serial has it): ``read_at_least(n)`` returns everything buffered once it
    is ``n`` bytes or more, or what is left when the link fails (then it raises, as
    ``read`` does). A codec that knows how long its message is asks for the rest of it.
    """

    async def read_at_least(self, n: int) -> bytes: ...


#: The name the runtime has always used; the same contract.
ByteLink = Link


class SampleSource(Protocol):
    """An oximeter as the gateway reads it: timestamped samples, whatever the transport.

    A serial oximeter is an adapter over a stream :class:`Link`
    (:class:`drivers.transport.adapters.NoninSerialSource`); a BLE oximeter link
    is a sample source itself, because which GATT characteristic carried a value
    is part of its meaning (PLX continuous vs spot-check). ``read_samples``
    returns at least one sample, or raises ``TransportError`` once the link is gone.
    """

    @property
    def description(self) -> str: ...

    async def open(self) -> None: ...

    async def read_samples(self) -> list[ReceivedSample]: ...

    async def close(self) -> None: ...
