"""Raw link events, for listeners that want the bytes themselves (the recorder).

Every device runner reports what crossed its link, with the gateway's clock
readings at that moment; a listener must be quick and must not raise.
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol


class LinkObserver(Protocol):
    def link_opened(self, device_id: str, description: str, utc: datetime, mono: float) -> None: ...

    def link_closed(self, device_id: str, reason: str, utc: datetime, mono: float) -> None: ...

    def bytes_received(self, device_id: str, data: bytes, utc: datetime, mono: float) -> None: ...

    def bytes_sent(self, device_id: str, data: bytes, utc: datetime, mono: float) -> None: ...
