"""What one chunk read from a link is: the vocabulary shared by transports and codecs.

Lives outside :mod:`drivers.transport` so sans-I/O codecs (and the core) can
name it without importing a transport; :mod:`drivers.transport.base` re-exports it.
"""

from __future__ import annotations

from typing import Literal

__all__ = ["LinkUnit"]

#: ``"stream"``: a chunk is any slice of a continuous byte stream (serial);
#: ``"message"``: a chunk is one whole message as the device sent it (a BLE value).
LinkUnit = Literal["stream", "message"]
