"""The root of the one exception tree, at the bottom layer so everything can raise from it.

Codecs and transports raise these; the gateway (``devicegw.errors``) and the
simulators add their own branches under :class:`GatewayError`. Every error
carries the fields a log line or an operator needs, not just a message.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base of every error devicegw raises on purpose."""


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


class PortAbsentError(TransportError):
    """The port's path does not exist (unplugged): wait for it rather than retry."""

    def __init__(self, message: str, *, path: str, device_id: str | None = None) -> None:
        self.path = path
        super().__init__(message, device_id=device_id)
