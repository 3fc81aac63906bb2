"""Pulse oximeters over Bluetooth LE, with bleak on BlueZ: PLX (0x1822) and BerryMed BCI.

Two links with one API, the oximeter :class:`~drivers.transport.base.SampleSource`
(``open``, ``async read_samples() -> list[ReceivedSample]``, ``close``,
``description``) plus ``connected_address``. Discovery, the allow-list and the
connection are the shared :class:`~drivers.transport.ble_central.BleCentral`
(the same code the VM-1 link uses), so every BLE device behaves the same way;
see that module for what is found, when, and which errors say what. A link that
is lost raises ``... lost: disconnected`` from ``read_samples`` and keeps
raising until it is closed and opened again.

Every sample carries the gateway's receive time from the injected
:class:`~drivers.clock.Clock` (:class:`~drivers.oximeter.downsample.ReceivedSample`:
``t_s`` = ``clock.monotonic()``, the time axis of :mod:`devicegw.core.spo2_monitor`,
and ``utc`` = ``clock.now()``).

:class:`PlxBleLink` (Bluetooth SIG Pulse Oximeter Service): after connecting
it reads PLX Features (0x2A60) into :attr:`PlxBleLink.features`, subscribes to
PLX Continuous Measurement (0x2A5F, notify) and, if the device offers it, to
PLX Spot-check Measurement (0x2A5E, indicate). Each value is decoded with
:mod:`drivers.oximeter.plx` and delivered as one sample (``kind``
``"continuous"`` or ``"spot_check"``: which characteristic carried it, which is
why these links decode samples themselves rather than hand out raw values).
Features are informational: every measurement's flags say what it carries, so
a missing or malformed Features value is logged and ``features`` stays None.
A device offering neither measurement is a failed open. A malformed
measurement is logged, counted (``stats.malformed``) and skipped; it does not
drop the link.

:class:`BerryMedBleLink` (BerryMed BCI over the "transparent UART" service):
subscribes to the notify characteristic and feeds every notification into one
:class:`~drivers.oximeter.berrymed.BerryMedDecoder` (notifications are not
aligned to packets; a new decoder per connection). The ~100 packets/s go
through :class:`~drivers.oximeter.downsample.BerryMedDownsampler` (the signal
processing lives beside the codecs), so the consumer gets at most one sample
per ``window_s`` (default 1 s) of gateway clock time. When the link is lost,
the partial window is delivered before the loss is reported; ``close``
discards it.

Reconnecting is the caller's loop, as for the VM-1 link: close the lost link,
wait a capped, jittered :class:`~drivers.backoff.Backoff` delay, open again.
``devicegw.runtime`` owns that loop.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar

from drivers.clock import Clock, SystemClock
from drivers.errors import ProtocolError, TransportError
from drivers.oximeter import berrymed, plx
from drivers.oximeter.berrymed import BerryMedDecoder
from drivers.oximeter.downsample import BerryMedDownsampler, ReceivedSample, SampleKind
from drivers.oximeter.plx import PlxFeatures
from drivers.transport.ble_central import BleCentral, Inbox

if TYPE_CHECKING:
    from bleak import BleakClient
    from bleak.backends.device import BLEDevice

__all__ = [
    "BerryMedBleLink",
    "OximeterBleLink",
    "OximeterLinkStats",
    "PlxBleLink",
]

log = logging.getLogger(__name__)

_QUEUE_MAX = 4096  # > 1 h of 1 Hz samples; a consumer that stalls longer loses the link


@dataclass(slots=True)
class OximeterLinkStats:
    """Counters of one link object, over all its connections."""

    connections: int = 0
    values: int = 0  # notifications and indications received
    samples: int = 0  # samples queued for read_samples
    malformed: int = 0  # PLX values that did not decode (skipped)
    packets: int = 0  # BerryMed packets decoded


# --------------------------------------------------------------------------- common link


class OximeterBleLink:
    """Common part of :class:`PlxBleLink` and :class:`BerryMedBleLink` (module docstring).

    ``allow`` lists the devices this gateway may use (addresses or advertised
    names); pick one with ``address`` or ``name``, or with neither take the first
    allow-listed device advertising the service. ``adapter`` is BlueZ's adapter
    name (``hci0``; None for the default); ``clock`` stamps received samples.
    """

    SERVICE_UUID: ClassVar[str]
    LABEL: ClassVar[str]

    def __init__(
        self,
        *,
        allow: Collection[str],
        address: str | None = None,
        name: str | None = None,
        adapter: str | None = None,
        device_id: str | None = None,
        clock: Clock | None = None,
        scan_timeout_s: float = 10.0,
        connect_attempts: int = 3,
        io_timeout_s: float = 5.0,
    ) -> None:
        self.central = BleCentral(
            service_uuid=self.SERVICE_UUID,
            label=self.LABEL,
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
        self.clock: Clock = clock if clock is not None else SystemClock()
        self.stats = OximeterLinkStats()
        self._client: BleakClient | None = None
        self._closing = False
        self._inbox: Inbox[ReceivedSample] = Inbox(lambda: self.description, device_id, _QUEUE_MAX)

    # ------------------------------------------------------------------ SampleSource

    @property
    def description(self) -> str:
        return self.central.description

    @property
    def connected_address(self) -> str | None:
        """The address of the connected device, once open."""
        return self.central.connected_address

    @property
    def is_open(self) -> bool:
        return self._client is not None

    async def find(self) -> BLEDevice:
        """Scan until an allow-listed device matching the target advertises."""
        return await self.central.find()

    async def open(self) -> None:
        if self._client is not None:
            raise TransportError(f"{self.description} is already open", device_id=self.device_id)
        self._closing = False
        self._inbox.reset()
        client = await self.central.connect(self._disconnected)
        self._client = client
        try:
            self._reset()
            await self._start(client)
        except BaseException:
            await self.close()
            raise
        self.stats.connections += 1
        log.info("BLE oximeter link open: %s", self.description)

    async def read_samples(self) -> list[ReceivedSample]:
        """The next sample (one per call); TransportError once the link is lost (or closed)."""
        return [await self._inbox.get()]

    async def close(self) -> None:
        self._closing = True
        client, self._client = self._client, None
        if client is not None:
            await self.central.disconnect(client)
        self._reset()
        self._inbox.lose("closed", discard=True)  # unread samples of a closed link are stale

    # ------------------------------------------------------------------ for subclasses

    def _reset(self) -> None:
        """Forget per-connection state (a new connection starts clean)."""

    def _flush(self) -> None:
        """Deliver anything held back, before a loss is reported."""

    async def _start(self, client: BleakClient) -> None:
        raise NotImplementedError

    async def _subscribe(self, client: BleakClient, uuid: str, callback: Any) -> None:
        await self.central.io(client.start_notify(uuid, callback), f"subscribe {uuid}")

    def _stamp(self) -> tuple[float, datetime]:
        return self.clock.monotonic(), self.clock.now()

    def _deliver(self, item: ReceivedSample) -> None:
        self.stats.samples += 1
        self._inbox.put(item)

    def _disconnected(self, client: BleakClient) -> None:
        if self._closing or client is not self._client:
            return
        log.debug("BLE link %s: disconnected by the device or the radio", self.description)
        self._flush()
        self._inbox.lose("disconnected")


# --------------------------------------------------------------------------- PLX


class PlxBleLink(OximeterBleLink):
    """A Bluetooth SIG Pulse Oximeter (PLXS 0x1822); see the module docstring."""

    SERVICE_UUID: ClassVar[str] = plx.PLX_SERVICE_UUID
    LABEL: ClassVar[str] = "PLX oximeter"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.features: PlxFeatures | None = None
        self.spot_check_subscribed = False

    async def _start(self, client: BleakClient) -> None:
        service = client.services.get_service(plx.PLX_SERVICE_UUID)
        assert service is not None  # checked by open()
        offered = {str(c.uuid).lower() for c in service.characteristics}
        self.features = None
        if plx.PLX_FEATURES_UUID in offered:
            raw = await self.central.io(
                client.read_gatt_char(plx.PLX_FEATURES_UUID), "read PLX Features"
            )
            try:
                self.features = plx.decode_features(bytes(raw))
            except ProtocolError as exc:
                log.warning("BLE link %s: PLX Features ignored: %s", self.description, exc)
        else:
            log.warning("BLE link %s: device offers no PLX Features", self.description)
        continuous = plx.PLX_CONTINUOUS_MEASUREMENT_UUID in offered
        spot_check = plx.PLX_SPOT_CHECK_MEASUREMENT_UUID in offered
        if not (continuous or spot_check):
            raise TransportError(
                f"BLE link {self.description}: the PLX service offers neither Continuous "
                "nor Spot-check Measurement",
                device_id=self.device_id,
            )
        if continuous:
            await self._subscribe(client, plx.PLX_CONTINUOUS_MEASUREMENT_UUID, self._on_continuous)
        self.spot_check_subscribed = spot_check
        if spot_check:
            await self._subscribe(client, plx.PLX_SPOT_CHECK_MEASUREMENT_UUID, self._on_spot_check)

    def _on_continuous(self, char: Any, data: bytearray) -> None:
        self._on_value(data, "continuous")

    def _on_spot_check(self, char: Any, data: bytearray) -> None:
        self._on_value(data, "spot_check")

    def _on_value(self, data: bytearray, kind: SampleKind) -> None:
        t_s, utc = self._stamp()
        self.stats.values += 1
        try:
            msg = (
                plx.decode_continuous(data) if kind == "continuous" else plx.decode_spot_check(data)
            )
        except ProtocolError as exc:
            self.stats.malformed += 1
            log.warning("BLE link %s: %s skipped: %s", self.description, kind, exc)
            return
        self._deliver(ReceivedSample(plx.to_sample(msg), t_s, utc, kind))


# --------------------------------------------------------------------------- BerryMed


class BerryMedBleLink(OximeterBleLink):
    """A BerryMed BCI oximeter (BM1000 series); see the module docstring."""

    SERVICE_UUID: ClassVar[str] = berrymed.BERRYMED_SERVICE_UUID
    LABEL: ClassVar[str] = "BerryMed oximeter"

    def __init__(self, *, window_s: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.downsampler = BerryMedDownsampler(window_s)
        self.decoder = BerryMedDecoder()

    def _reset(self) -> None:
        self.decoder = BerryMedDecoder()
        self.downsampler.clear()

    def _flush(self) -> None:
        out = self.downsampler.flush()
        if out is not None:
            self._deliver(out)

    async def _start(self, client: BleakClient) -> None:
        await self._subscribe(client, berrymed.BERRYMED_NOTIFY_CHAR_UUID, self._on_bytes)

    def _on_bytes(self, char: Any, data: bytearray) -> None:
        t_s, utc = self._stamp()
        self.stats.values += 1
        packets = self.decoder.feed(data)
        self.stats.packets += len(packets)
        for packet in packets:
            out = self.downsampler.add(t_s, utc, packet)
            if out is not None:
                self._deliver(out)
