"""The gateway's branch of the one exception tree (rooted in :mod:`drivers.errors`).

The device-facing errors are defined once, in the bottom layer, and re-exported
here so the gateway's code catches by meaning from one place.
"""

from __future__ import annotations

from drivers.errors import (
    DeviceTimeoutError,
    GatewayError,
    PortAbsentError,
    ProtocolError,
    TransportError,
)

__all__ = [
    "ConfigError",
    "DeviceTimeoutError",
    "GatewayError",
    "PortAbsentError",
    "ProtocolError",
    "TransportError",
]


class ConfigError(GatewayError):
    """The configuration file is missing, unreadable or invalid."""

    def __init__(self, message: str, *, path: str | None = None, field: str | None = None) -> None:
        self.path = path
        self.field = field
        super().__init__(message)
