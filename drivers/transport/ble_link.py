"""VM-1 over Bluetooth LE (ICD section 4), with bleak on BlueZ.

A BLE characteristic value is one whole VM-1 payload (header + body, no flags,
escapes or CRC), so :class:`Vm1BleLink` is a :class:`~drivers.transport.base.Link`
whose unit is ``"message"``: ``read`` returns one payload exactly as the device
sent it and ``write`` sends one payload. The gateway hands each payload to the
payload codec once (:class:`drivers.vm1.stream.Vm1PayloadDecoder`); nothing is
framed on the way, so no CRC is made up and recordings store what the device sent.

Discovery (by address, by advertised name ``VM-1 <serial_no>`` or by the VM-1
service UUID, restricted to an allow-list) and the connection
(bleak-retry-connector's ``establish_connection``) are the shared
:class:`~drivers.transport.ble_central.BleCentral`. Once connected the link
subscribes to Status and Output (notify) and Events and Control point
(indicate) and reads Ident; Ident is delivered first, then whatever was
notified while it was being read, as a serial port's open IDENT comes first.
Every value, notification or read, is delivered by
:meth:`Vm1BleLink.read` in arrival order, so the core sees the same payload
sequence the serial link's deframer yields. Host commands are written to the
Control point with response.

Reconnecting is the caller's loop, as for serial: a lost link raises
:class:`~drivers.errors.TransportError` from ``read``; the caller closes it,
waits ``Backoff.next_delay()`` (capped, jittered: :mod:`drivers.backoff`) and
opens a new one (``NebulizerRunner.run`` does exactly this). Inside one ``open``
bleak-retry-connector retries the connect itself a few times with its own
short backoffs.

Choices where the ICD is silent:

- IDENT has no notify property, so GET_INFO's IDENT cannot arrive by itself.
  When the Control point indicates an OK ACK for GET_INFO (decoded by the VM-1
  codec) the link reads Ident and delivers the value after that ACK, which is
  the order serial gives.
- A device that connects but does not offer the VM-1 service (wrong device,
  or one whose GATT database is not up yet) is a failed open, not a link.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection
from typing import TYPE_CHECKING, Any, Final

from drivers.errors import ProtocolError, TransportError
from drivers.transport.base import LinkUnit
from drivers.transport.ble_central import BleCentral, Inbox
from drivers.vm1.codec import decode_payload
from drivers.vm1.messages import Ack, AckResult, MsgType

if TYPE_CHECKING:
    from bleak import BleakClient
    from bleak.backends.device import BLEDevice

__all__ = [
    "VM1_SERVICE_UUID",
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

_QUEUE_MAX = 4096  # ~6 minutes of 10 Hz OUTPUT; a core that stalls longer loses the link


def vm1_local_name(serial_no: str) -> str:
    """The advertised name of a VM-1 (ICD section 4): ``VM-1 <serial_no>``."""
    return f"VM-1 {serial_no}"


class Vm1BleLink:
    """One VM-1 over BLE, a message :class:`~drivers.transport.base.Link`; module docstring.

    ``allow`` lists the devices this gateway may use, by Bluetooth address or
    advertised name; anything else is never connected to. Pick the device with
    ``address`` or ``name`` (both optional: with neither, the first allow-listed
    device advertising the VM-1 service is used). ``adapter`` is BlueZ's adapter
    name (``hci0``); ``None`` means BlueZ's default adapter.
    """

    unit: LinkUnit = "message"

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
        self.central = BleCentral(
            service_uuid=VM1_SERVICE_UUID,
            label="VM-1",
            allow=allow,
            address=address,
            name=name,
            adapter=adapter,
            device_id=device_id,
            scan_timeout_s=scan_timeout_s,
            connect_attempts=connect_attempts,
            io_timeout_s=io_timeout_s,
        )
        self.device_id = device_id
        self._client: BleakClient | None = None
        self._inbox: Inbox[bytes] = Inbox(lambda: self.description, device_id, _QUEUE_MAX)
        self._closing = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._early: list[bytes] | None = None

    # ------------------------------------------------------------------ Link

    @property
    def description(self) -> str:
        return self.central.description

    @property
    def connected_address(self) -> str | None:
        """The address of the connected device, once open."""
        return self.central.connected_address

    async def find(self) -> BLEDevice:
        """Scan until an allow-listed device matching the target advertises."""
        return await self.central.find()

    async def open(self) -> None:
        if self._client is not None:
            raise TransportError(f"{self.description} is already open", device_id=self.device_id)
        self._closing = False
        self._inbox.reset()
        client = await self.central.connect(self._on_disconnected)
        self._client = client
        self._early = []  # values notified before Ident is read are delivered after it
        try:
            for uuid in SUBSCRIBED:
                await self.central.io(
                    client.start_notify(uuid, self._on_value), f"subscribe {uuid}"
                )
            ident = await self.central.io(client.read_gatt_char(VM1_IDENT_UUID), "read Ident")
        except BaseException:
            self._early = None
            await self.close()
            raise
        early, self._early = self._early, None
        self._inbox.put(bytes(ident))  # identity first, as a serial port's open IDENT
        for value in early:
            self._inbox.put(value)
        log.info("BLE link open: %s", self.description)

    async def read(self) -> bytes:
        """The next VM-1 payload as the device sent it; TransportError once the link is lost."""
        return await self._inbox.get()

    async def write(self, data: bytes) -> None:
        """Write one host-command payload to the Control point (with response)."""
        client = self._client
        if client is None or not client.is_connected:
            raise TransportError(f"{self.description} is not connected", device_id=self.device_id)
        await self.central.io(
            client.write_gatt_char(VM1_CONTROL_POINT_UUID, data, response=True),
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
            await self.central.disconnect(client)
        self._inbox.lose("closed", discard=True)  # unread values of a closed link are stale

    # ------------------------------------------------------------------ callbacks

    def _on_disconnected(self, client: BleakClient) -> None:
        if not self._closing:
            log.debug("BLE link %s: disconnected by the device or the radio", self.description)
            self._inbox.lose("disconnected")

    def _on_value(self, char: Any, data: bytearray) -> None:
        value = bytes(data)
        if self._early is not None:
            self._early.append(value)
        else:
            self._inbox.put(value)
        if str(getattr(char, "uuid", "")) == VM1_CONTROL_POINT_UUID and _acks_get_info(value):
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
            value = await self.central.io(client.read_gatt_char(VM1_IDENT_UUID), "read Ident")
        except TransportError as exc:
            log.debug("%s", exc)  # the lost link reaches read by itself
            return
        self._inbox.put(bytes(value))


def _acks_get_info(payload: bytes) -> bool:
    """Is this Control point value the device's OK ACK of GET_INFO? (Decoded by the codec.)"""
    try:
        msg = decode_payload(payload)
    except ProtocolError:
        return False  # the core counts it as a bad payload when it reads it
    return isinstance(msg, Ack) and msg.cmd == MsgType.GET_INFO and msg.result == AckResult.OK
