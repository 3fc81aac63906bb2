"""VM-1 over Bluetooth LE (ICD section 4), with bleak on BlueZ.

A BLE characteristic value is one whole VM-1 payload (header + body, no flags,
escapes or CRC), so this link moves *payloads*, not a byte stream:

- :class:`PayloadLink` is the interface the gateway core programs against
  (``open``, ``read_payload``, ``send_payload``, ``close``, ``description``).
  Importing this module does not import bleak: bleak is imported when a link
  is opened, so the core never depends on it.
- :class:`Vm1BleLink` implements it: discovery by address, by advertised name
  (``VM-1 <serial_no>``) or by the VM-1 service UUID, restricted to an
  allow-list; connection with bleak-retry-connector's ``establish_connection``
  (retries on BlueZ's transient errors, GATT service cache validated before
  use); subscriptions to Status and Output (notify) and Events and Control
  point (indicate); Ident read once connected. Every value, notification or
  read, is delivered by :meth:`Vm1BleLink.read_payload` in arrival order, so
  the core sees the same payload sequence the serial link's deframer yields.
  Host commands are written to the Control point with response.
- :class:`FramedPayloadLink` wraps any PayloadLink as a
  :class:`~drivers.transport.base.ByteLink` (payload <-> serial frame), so the
  existing serial message path (``NebulizerRunner`` -> ``Vm1Pipeline``) runs
  over BLE unchanged.

Reconnecting is the caller's loop, as for serial: a lost link raises
:class:`~devicegw.errors.TransportError` from ``read_payload``; the caller
closes it, waits ``Backoff.next_delay()`` (capped, jittered:
:mod:`drivers.backoff`) and opens a new one (``NebulizerRunner.run`` does
exactly this). Inside one ``open`` bleak-retry-connector retries the connect
itself a few times with its own short backoffs.

Choices where the ICD is silent:

- IDENT has no notify property, so GET_INFO's IDENT cannot arrive by itself.
  When the Control point indicates an OK ACK for GET_INFO the link reads Ident
  and delivers the value after that ACK, which is the order serial gives.
- A device that connects but does not offer the VM-1 service (wrong device,
  or one whose GATT database is not up yet) is a failed open, not a link.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection
from typing import TYPE_CHECKING, Any, Final, Protocol

from drivers.errors import TransportError
from drivers.vm1.framing import Deframer, encode_frame

if TYPE_CHECKING:
    from bleak import BleakClient
    from bleak.backends.device import BLEDevice
    from bleak.backends.scanner import AdvertisementData

__all__ = [
    "VM1_SERVICE_UUID",
    "FramedPayloadLink",
    "PayloadLink",
    "Vm1BleLink",
    "vm1_local_name",
]

log = logging.getLogger(__name__)

# ICD section 4
VM1_SERVICE_UUID: Final = "7a1e0001-5c6b-4b8e-9d3a-2f4c6e8b1a00"
VM1_IDENT_UUID: Final = "7a1e0002-5c6b-4b8e-9d3a-2f4c6e8b1a00"
VM1_STATUS_UUID: Final = "7a1e0003-5c6b-4b8e-9d3a-2f4c6e8b1a00"
VM1_OUTPUT_UUID: Final = "7a1e0004-5c6b-4b8e-9d3a-2f4c6e8b1a00"
VM1_EVENTS_UUID: Final = "7a1e0005-5c6b-4b8e-9d3a-2f4c6e8b1a00"
VM1_CONTROL_POINT_UUID: Final = "7a1e0006-5c6b-4b8e-9d3a-2f4c6e8b1a00"
# Bluetooth SIG
DEVICE_INFORMATION_UUID: Final = "0000180a-0000-1000-8000-00805f9b34fb"
MANUFACTURER_NAME_UUID: Final = "00002a29-0000-1000-8000-00805f9b34fb"
MODEL_NUMBER_UUID: Final = "00002a24-0000-1000-8000-00805f9b34fb"
SERIAL_NUMBER_UUID: Final = "00002a25-0000-1000-8000-00805f9b34fb"
FIRMWARE_REVISION_UUID: Final = "00002a26-0000-1000-8000-00805f9b34fb"
BATTERY_SERVICE_UUID: Final = "0000180f-0000-1000-8000-00805f9b34fb"
BATTERY_LEVEL_UUID: Final = "00002a19-0000-1000-8000-00805f9b34fb"

#: Values the link subscribes to, in this order (indications last, so nothing they
#: answer can overtake the subscription).
SUBSCRIBED: Final = (VM1_STATUS_UUID, VM1_OUTPUT_UUID, VM1_EVENTS_UUID, VM1_CONTROL_POINT_UUID)

_ACK = 0x07
_GET_INFO = 0x81
_ACK_OK = 0
_QUEUE_MAX = 4096  # ~6 minutes of 10 Hz OUTPUT; a core that stalls longer loses the link


def vm1_local_name(serial_no: str) -> str:
    """The advertised name of a VM-1 (ICD section 4): ``VM-1 <serial_no>``."""
    return f"VM-1 {serial_no}"


class PayloadLink(Protocol):
    """A message link that can break and be reopened; one payload per call.

    ``read_payload`` returns one whole payload, or raises ``TransportError``
    when the link is gone; it never returns ``b""``.
    """

    @property
    def description(self) -> str: ...

    async def open(self) -> None: ...

    async def read_payload(self) -> bytes: ...

    async def send_payload(self, payload: bytes) -> None: ...

    async def close(self) -> None: ...


class _Lost:
    """Queue marker: the connection went away."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


class Vm1BleLink:
    """One VM-1 over BLE; see the module docstring.

    ``allow`` lists the devices this gateway may use, by Bluetooth address or
    advertised name; anything else is never connected to. Pick the device with
    ``address`` or ``name`` (both optional: with neither, the first allow-listed
    device advertising the VM-1 service is used). ``adapter`` is BlueZ's adapter
    name (``hci0``); ``None`` means BlueZ's default adapter.
    """

    def __init__(
        self,
        *,
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
        self.address = address
        self.name = name
        self.adapter = adapter
        self.device_id = device_id
        self.scan_timeout_s = scan_timeout_s
        self.connect_attempts = connect_attempts
        self.io_timeout_s = io_timeout_s
        self._client: BleakClient | None = None
        self._queue: asyncio.Queue[bytes | _Lost] = asyncio.Queue(_QUEUE_MAX)
        self._closing = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._connected_address: str | None = None

    # ------------------------------------------------------------------ PayloadLink

    @property
    def description(self) -> str:
        target = self._connected_address or self.address or self.name or "VM-1 service"
        return f"ble:{self.adapter or 'default'}/{target}"

    @property
    def connected_address(self) -> str | None:
        """The address of the connected device, once open."""
        return self._connected_address

    async def open(self) -> None:
        if self._client is not None:
            raise TransportError(f"{self.description} is already open", device_id=self.device_id)
        self._closing = False
        self._queue = asyncio.Queue(_QUEUE_MAX)
        device = await self.find()
        client = await self._connect(device)
        self._client = client
        self._connected_address = device.address
        try:
            self._require_vm1_service(client, device)
            for uuid in SUBSCRIBED:
                await self._io(client.start_notify(uuid, self._on_value), f"subscribe {uuid}")
            ident = await self._io(client.read_gatt_char(VM1_IDENT_UUID), "read Ident")
            self._put(bytes(ident))
        except BaseException:
            await self.close()
            raise
        log.info("BLE link open: %s", self.description)

    def _require_vm1_service(self, client: BleakClient, device: BLEDevice) -> None:
        if client.services.get_service(VM1_SERVICE_UUID) is None:
            raise TransportError(
                f"BLE device {device.address} ({device.name}) does not offer the VM-1 service",
                device_id=self.device_id,
            )

    async def read_payload(self) -> bytes:
        item = await self._queue.get()
        if isinstance(item, _Lost):
            self._queue.put_nowait(item)  # every later read fails the same way
            raise TransportError(
                f"BLE link {self.description} lost: {item.reason}", device_id=self.device_id
            )
        return item

    async def send_payload(self, payload: bytes) -> None:
        client = self._client
        if client is None or not client.is_connected:
            raise TransportError(f"{self.description} is not connected", device_id=self.device_id)
        await self._io(
            client.write_gatt_char(VM1_CONTROL_POINT_UUID, payload, response=True),
            "write Control point",
        )

    async def close(self) -> None:
        self._closing = True
        client, self._client = self._client, None
        tasks, self._tasks = self._tasks, set()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        if client is not None:
            from bleak.exc import BleakError

            try:
                async with asyncio.timeout(self.io_timeout_s):
                    await client.disconnect()
            except (BleakError, OSError, EOFError, TimeoutError) as exc:
                log.warning("BLE link %s: disconnect failed: %r", self.description, exc)
        while not self._queue.empty():  # unread values of a closed link are stale
            self._queue.get_nowait()
        self._queue.put_nowait(_Lost("closed"))

    # ------------------------------------------------------------------ discovery

    async def find(self) -> BLEDevice:
        """Scan until an allow-listed device matching the target advertises."""
        from bleak import BleakScanner
        from bleak.exc import BleakError

        try:
            device = await BleakScanner.find_device_by_filter(
                self._matches, timeout=self.scan_timeout_s, **self._bluez_args()
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

    def _matches(self, device: BLEDevice, adv: AdvertisementData) -> bool:
        name = adv.local_name or device.name
        if device.address.upper() not in self._allow_addresses and name not in self._allow_names:
            return False
        if self.address is not None:
            return device.address.upper() == self.address.upper()
        if self.name is not None:
            return name == self.name
        return VM1_SERVICE_UUID in adv.service_uuids

    def _target_text(self) -> str:
        if self.address is not None:
            return f"VM-1 at {self.address}"
        if self.name is not None:
            return f"VM-1 {self.name!r}"
        return "VM-1 (by service)"

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

    async def _connect(self, device: BLEDevice) -> BleakClient:
        from bleak.exc import BleakError
        from bleak_retry_connector import BleakClientWithServiceCache, establish_connection

        try:
            client = await establish_connection(
                BleakClientWithServiceCache,
                device,
                self.device_id or device.address,
                disconnected_callback=self._on_disconnected,
                max_attempts=self.connect_attempts,
                **self._bluez_args(),
            )
        except (BleakError, OSError, EOFError, TimeoutError) as exc:
            raise TransportError(
                f"cannot connect to BLE device {device.address} ({device.name}): {exc}",
                device_id=self.device_id,
            ) from exc
        return client

    async def _io(self, awaitable: Any, what: str) -> Any:
        from bleak.exc import BleakError

        try:
            async with asyncio.timeout(self.io_timeout_s):
                return await awaitable
        except (BleakError, OSError, EOFError, TimeoutError) as exc:
            raise TransportError(
                f"BLE link {self.description}: {what} failed: {exc!r}", device_id=self.device_id
            ) from exc

    # ------------------------------------------------------------------ callbacks

    def _on_disconnected(self, client: BleakClient) -> None:
        if not self._closing:
            log.debug("BLE link %s: disconnected by the device or the radio", self.description)
            self._put(_Lost("disconnected"))

    def _on_value(self, char: Any, data: bytearray) -> None:
        value = bytes(data)
        self._put(value)
        uuid = str(getattr(char, "uuid", ""))
        if (
            uuid == VM1_CONTROL_POINT_UUID
            and len(value) == 9
            and value[0] == _ACK
            and value[7] == _GET_INFO
            and value[8] == _ACK_OK
        ):
            task = asyncio.get_running_loop().create_task(
                self._read_ident_after_ack(), name=f"{self.description} ident"
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _read_ident_after_ack(self) -> None:
        client = self._client
        if client is None:
            return
        try:
            value = await self._io(client.read_gatt_char(VM1_IDENT_UUID), "read Ident")
        except TransportError as exc:
            log.debug("%s", exc)  # the lost link reaches read_payload by itself
            return
        self._put(bytes(value))

    def _put(self, item: bytes | _Lost) -> None:
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            # The core stopped reading: what is queued is stale, and the gap must be visible.
            log.warning("BLE link %s: reader stalled, dropping the link", self.description)
            while not self._queue.empty():
                self._queue.get_nowait()
            self._queue.put_nowait(_Lost("reader stalled, queue overflow"))


class FramedPayloadLink:
    """A :class:`PayloadLink` seen as a :class:`~drivers.transport.base.ByteLink`.

    ``read`` returns each payload as one serial frame; ``write`` takes serial
    frames and sends each payload in them. This lets the serial message path
    (deframer, pipeline, ``NebulizerRunner``) run over BLE without a change.
    """

    def __init__(self, link: PayloadLink) -> None:
        self.link = link
        self._deframer = Deframer()

    @property
    def description(self) -> str:
        return self.link.description

    async def open(self) -> None:
        self._deframer = Deframer()
        await self.link.open()

    async def read(self) -> bytes:
        return encode_frame(await self.link.read_payload())

    async def write(self, data: bytes) -> None:
        for payload in self._deframer.feed(data):
            await self.link.send_payload(payload)

    async def close(self) -> None:
        await self.link.close()
