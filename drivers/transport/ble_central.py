"""The gateway's side of every BLE link: discovery, allow-list, connection, timed I/O.

One :class:`BleCentral` per link object, used (not inherited) by the VM-1 link
(:mod:`drivers.transport.ble_link`) and the oximeter links
(:mod:`drivers.transport.ble_oximeter_link`), so every BLE device behaves the
same way:

- discovery by ``address``, by advertised ``name`` or, with neither, by the
  service UUID, and only ever of a device on ``allow`` (addresses compared
  case-insensitively, names exactly); an ``address``/``name`` that is not on
  the allow-list is a ``ValueError`` at construction;
- connection with bleak-retry-connector's ``establish_connection``
  (``BleakClientWithServiceCache``: retries BlueZ's transient errors, GATT
  service cache validated before use);
- every failure is a :class:`~drivers.errors.TransportError` saying what is
  missing: no BlueZ on the system bus, no such adapter, no allow-listed device
  advertising, a connected device without the service, an I/O that timed out.

Importing this module does not import bleak: bleak is imported when a link is
opened, so code that only builds links never depends on it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from drivers.errors import TransportError

if TYPE_CHECKING:
    from bleak import BleakClient
    from bleak.backends.device import BLEDevice
    from bleak.backends.scanner import AdvertisementData

__all__ = ["BleCentral", "Inbox"]

_T = TypeVar("_T")

log = logging.getLogger(__name__)


class BleCentral:
    """Finds, connects to and talks with one allow-listed device offering ``service_uuid``.

    ``label`` names the device kind in descriptions and errors ("VM-1",
    "PLX oximeter"). ``adapter`` is BlueZ's adapter name (``hci0``); ``None``
    means BlueZ's default adapter.
    """

    def __init__(
        self,
        *,
        service_uuid: str,
        label: str,
        allow: Collection[str],
        address: str | None = None,
        name: str | None = None,
        adapter: str | None = None,
        device_id: str | None = None,
        scan_timeout_s: float = 10.0,
        connect_attempts: int = 3,
        io_timeout_s: float = 5.0,
    ) -> None:
        if not allow:
            raise ValueError("a BLE link needs a non-empty allow-list of addresses or names")
        self._allow_addresses = {a.upper() for a in allow}
        self._allow_names = set(allow)
        if address is not None and address.upper() not in self._allow_addresses:
            raise ValueError(f"BLE address {address} is not on the allow-list")
        if name is not None and name not in self._allow_names:
            raise ValueError(f"BLE name {name!r} is not on the allow-list")
        self.service_uuid = service_uuid
        self.label = label
        self.address = address
        self.name = name
        self.adapter = adapter
        self.device_id = device_id
        self.scan_timeout_s = scan_timeout_s
        self.connect_attempts = connect_attempts
        self.io_timeout_s = io_timeout_s
        self.connected_address: str | None = None

    @property
    def description(self) -> str:
        target = self.connected_address or self.address or self.name or f"{self.label} service"
        return f"ble:{self.adapter or 'default'}/{target}"

    # ------------------------------------------------------------------ discovery

    async def find(self) -> BLEDevice:
        """Scan until an allow-listed device matching the target advertises."""
        from bleak import BleakScanner
        from bleak.exc import BleakError

        try:
            device = await BleakScanner.find_device_by_filter(
                self.matches, timeout=self.scan_timeout_s, **self._bluez_args()
            )
        except (BleakError, OSError, EOFError) as exc:
            raise self._bluetooth_unavailable(exc) from exc
        if device is None:
            raise TransportError(
                f"{self._target_text()} not found: no allow-listed device advertised within "
                f"{self.scan_timeout_s:g} s on adapter {self.adapter or 'default'}",
                device_id=self.device_id,
            )
        return device

    def matches(self, device: BLEDevice, adv: AdvertisementData) -> bool:
        """Is this advertisement the allow-listed device we are looking for?"""
        name = adv.local_name or device.name
        if device.address.upper() not in self._allow_addresses and name not in self._allow_names:
            return False
        if self.address is not None:
            return device.address.upper() == self.address.upper()
        if self.name is not None:
            return name == self.name
        return self.service_uuid in adv.service_uuids

    def _target_text(self) -> str:
        if self.address is not None:
            return f"{self.label} at {self.address}"
        if self.name is not None:
            return f"{self.label} {self.name!r}"
        return f"{self.label} (by service)"

    def _bluez_args(self) -> dict[str, Any]:
        return {"bluez": {"adapter": self.adapter}} if self.adapter else {}

    def _bluetooth_unavailable(self, exc: BaseException) -> TransportError:
        text = str(exc) or type(exc).__name__
        if "not found" in text and "adapter" in text:
            why = f"Bluetooth adapter {self.adapter} not found"
        elif isinstance(exc, OSError | EOFError) or "ServiceUnknown" in text:
            why = "BlueZ is not reachable on the system D-Bus (bluetoothd not running?)"
        else:
            why = "Bluetooth is not available"
        return TransportError(f"{why}: {text}", device_id=self.device_id)

    # ------------------------------------------------------------------ connection

    async def connect(self, on_disconnected: Callable[[BleakClient], None]) -> BleakClient:
        """Find the device, connect, and check it offers the service (else disconnect, raise)."""
        from bleak.exc import BleakError
        from bleak_retry_connector import BleakClientWithServiceCache, establish_connection

        device = await self.find()
        try:
            client = await establish_connection(
                BleakClientWithServiceCache,
                device,
                self.device_id or device.address,
                disconnected_callback=on_disconnected,
                max_attempts=self.connect_attempts,
                **self._bluez_args(),
            )
        except (BleakError, OSError, EOFError, TimeoutError) as exc:
            raise TransportError(
                f"cannot connect to BLE device {device.address} ({device.name}): {exc}",
                device_id=self.device_id,
            ) from exc
        self.connected_address = device.address
        if client.services.get_service(self.service_uuid) is None:
            await self.disconnect(client)
            raise TransportError(
                f"BLE device {device.address} ({device.name}) does not offer the "
                f"{self.label} service",
                device_id=self.device_id,
            )
        return client

    async def io(self, awaitable: Any, what: str) -> Any:
        """Await one GATT operation with the I/O timeout; failures become TransportError."""
        from bleak.exc import BleakError

        try:
            async with asyncio.timeout(self.io_timeout_s):
                return await awaitable
        except (BleakError, OSError, EOFError, TimeoutError) as exc:
            raise TransportError(
                f"BLE link {self.description}: {what} failed: {exc!r}", device_id=self.device_id
            ) from exc

    async def disconnect(self, client: BleakClient) -> None:
        """Disconnect, logging (not raising) a failure: the link is being dropped anyway."""
        from bleak.exc import BleakError

        try:
            async with asyncio.timeout(self.io_timeout_s):
                await client.disconnect()
        except (BleakError, OSError, EOFError, TimeoutError) as exc:
            log.warning("BLE link %s: disconnect failed: %r", self.description, exc)


class _Lost:
    """Inbox marker: the connection went away."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


class Inbox(Generic[_T]):
    """Values from BLE callbacks, in arrival order, for one reader; then the loss, forever.

    ``put`` is called from bleak's callbacks and never blocks: a reader that
    falls ``maxsize`` values behind loses the link (what is queued is stale, and
    the gap must be visible). After :meth:`lose`, every ``get`` raises
    TransportError until :meth:`reset`.
    """

    def __init__(self, describe: Callable[[], str], device_id: str | None, maxsize: int) -> None:
        self._describe = describe
        self._device_id = device_id
        self._maxsize = maxsize
        self._queue: asyncio.Queue[_T | _Lost] = asyncio.Queue(maxsize)

    def reset(self) -> None:
        """Empty, for a new connection."""
        self._queue = asyncio.Queue(self._maxsize)

    def put(self, item: _T) -> None:
        self._put(item)

    def lose(self, reason: str, *, discard: bool = False) -> None:
        """Report the loss after what is queued (or instead of it, with ``discard``)."""
        if discard:
            self._drain()
        self._put(_Lost(reason))

    async def get(self) -> _T:
        item = await self._queue.get()
        if isinstance(item, _Lost):
            self._queue.put_nowait(item)  # every later read fails the same way
            raise TransportError(
                f"BLE link {self._describe()} lost: {item.reason}", device_id=self._device_id
            )
        return item

    def _put(self, item: _T | _Lost) -> None:
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            log.warning("BLE link %s: reader stalled, dropping the link", self._describe())
            self._drain()
            self._queue.put_nowait(_Lost("reader stalled, queue overflow"))

    def _drain(self) -> None:
        while not self._queue.empty():
            self._queue.get_nowait()
