"""One exception tree for the whole gateway, so callers can catch by meaning.

Drivers, simulators and the core all raise from here; every error carries the
fields a log line or an operator needs, not just a message.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base of every error devicegw raises on purpose."""


class ConfigError(GatewayError):
    """The configuration file is missing, unreadable or invalid."""

    def __init__(self, message: str, *, path: str | None = None, field: str | None = None) -> None:
        self.path = path
        self.field = field
        super().__init__(message)


class ProtocolError(GatewayError):
    """Bytes or a payload that do not follow the device's interface document."""


class TransportError(GatewayError):
    """A link (serial port, BLE connection) could not be opened or broke."""

    def __init__(self, message: str, *, device_id: str | None = None) -> None:
        self.device_id = device_id
        super().__init__(message)


class DeviceTimeoutError(GatewayError, TimeoutError):
    """A device did not answer a command in time."""

    def __init__(
        self, message: str, *, device_id: str | None = None, command: str | None = None
    ) -> None:
        self.device_id = device_id
        self.command = command
        super().__init__(message)


class ScenarioError(GatewayError):
    """A simulator scenario file is invalid."""
