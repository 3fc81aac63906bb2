"""Pulse oximeters over Bluetooth LE, with bleak on BlueZ: PLX (0x1822) and BerryMed BCI.

Two small links with one API (:class:`OximeterBleLink`): ``open``,
``async read_sample() -> ReceivedSample``, ``close``, ``description``,
``connected_address``. Discovery, the allow-list and the connection are
:class:`~drivers.transport.ble_link.Vm1BleLink`'s own code, reused (a private
subclass only changes which service UUID a device must advertise and how the
target is named in errors), so both device kinds behave the same way:

- discovery by ``address``, by advertised ``name`` or, with neither, by the
  service UUID, and only ever of a device on ``allow`` (addresses compared
  case-insensitively, names exactly); an ``address``/``name`` that is not on
  the allow-list is a ``ValueError`` at construction;
- connection with bleak-retry-connector's ``establish_connection``
  (``BleakClientWithServiceCache``), which retries BlueZ's transient errors;
- every failure is a :class:`~devicegw.errors.TransportError` saying what is
  missing: no BlueZ on the system bus, no such adapter, no allow-listed
  device advertising, a connected device without the service, a link lost
  (``read_sample`` raises ``... lost: disconnected``, and keeps raising until
  the link is closed and opened again).

Every sample carries the gateway's receive time from the injected
:class:`~drivers.clock.Clock` (:class:`ReceivedSample`: ``t_s`` =
``clock.monotonic()``, the time axis of :mod:`devicegw.core.spo2_monitor`, and
``utc`` = ``clock.now()``).

:class:`PlxBleLink` (Bluetooth SIG Pulse Oximeter Service): after connecting
it reads PLX Features (0x2A60) into :attr:`PlxBleLink.features`, subscribes to
PLX Continuous Measurement (0x2A5F, notify) and, if the device offers it, to
PLX Spot-check Measurement (0x2A5E, indicate). Each value is decoded with
:mod:`drivers.oximeter.plx` and delivered as one sample (``kind``
``"continuous"`` or ``"spot_check"``). Features are informational: every
measurement's flags say what it carries, so a missing or malformed Features
value is logged and ``features`` stays None. A device offering neither
measurement is a failed open. A malformed measurement is logged, counted
(``stats.malformed``) and skipped; it does not drop the link.

:class:`BerryMedBleLink` (BerryMed BCI over the "transparent UART" service):
subscribes to the notify characteristic and feeds every notification into one
:class:`~drivers.oximeter.berrymed.BerryMedDecoder` (notifications are not
aligned to packets; a new decoder per connection). The device sends ~100
packets/s; the consumer gets **at most one sample per ``window_s``** (default
1 s) of gateway clock time, made by :class:`BerryMedDownsampler`:

- a window starts at the receive time of its first packet; the first packet
  received ``window_s`` or more later closes it (the sample is delivered then)
  and starts the next window. Windows therefore start at least ``window_s``
  apart and each spans less than ``window_s``: one sample per window, delivered
  at most one packet interval after the window's last packet. (A sample's
  ``t_s`` is its last packet's receive time, so two consecutive ``t_s`` can be
  a little less than ``window_s`` apart; ``window_start_s`` never are.)
- SpO2 and pulse are the medians of the window's *valid* packets (both values
  present, no gating flag); if no packet is valid, the medians of the values
  that are present (the sample is then flagged or incomplete, hence not
  ``valid``); None if there are none;
- quality flags are the **union** over all packets of the window, so one
  artefact packet (e.g. "pulse searching") makes the whole second not
  ``valid``: a safety check would rather lose a second than use a doubtful one;
- signal strength is the median (rounded down), ``pleth`` keeps every
  plethysmogram sample of the window in order, ``packets`` says how many
  packets went in, ``window_start_s`` when the first arrived;
- when the link is lost, the partial window is delivered before the loss is
  reported; ``close`` discards it.

Reconnecting is the caller's loop, as for the VM-1 link: close the lost link,
wait a capped, jittered :class:`~drivers.backoff.Backoff` delay, open again.
``devicegw.runtime`` owns that loop.
"""

from __future__ import annotations

import asyncio
import logging
import math
import statistics
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from drivers.clock import Clock, SystemClock
from drivers.errors import ProtocolError, TransportError
from drivers.oximeter import berrymed, plx
from drivers.oximeter.berrymed import BerryMedDecoder, BerryMedPacket
from drivers.oximeter.plx import PlxFeatures
from drivers.oximeter.sample import OximeterSample, QualityFlag
from drivers.transport.ble_link import Vm1BleLink, _Lost

if TYPE_CHECKING:
    from bleak import BleakClient
    from bleak.backends.device import BLEDevice
    from bleak.backends.scanner import AdvertisementData

__all__ = [
    "BerryMedBleLink",
    "BerryMedDownsampler",
    "OximeterBleLink",
    "OximeterLinkStats",
    "PlxBleLink",
    "ReceivedSample",
    "SampleKind",
]

log = logging.getLogger(__name__)

SampleKind = Literal["continuous", "spot_check"]
_QUEUE_MAX = 4096  # > 1 h of 1 Hz samples; a consumer that stalls longer loses the link


@dataclass(frozen=True, slots=True)
class ReceivedSample:
    """One oximeter sample as the gateway received it.

    ``t_s`` is ``clock.monotonic()`` when it arrived (BerryMed: its window's last
    packet), ``utc`` is ``clock.now()`` at that instant; ``window_start_s`` is the
    receive time of the first value that went into it (== ``t_s`` for PLX).
    """

    sample: OximeterSample
    t_s: float
    utc: datetime
    kind: SampleKind = "continuous"
    packets: int = 1
    window_start_s: float = math.nan

    def __post_init__(self) -> None:
        if math.isnan(self.window_start_s):
            object.__setattr__(self, "window_start_s", self.t_s)


@dataclass(slots=True)
class OximeterLinkStats:
    """Counters of one link object, over all its connections."""

    connections: int = 0
    values: int = 0  # notifications and indications received
    samples: int = 0  # samples queued for read_sample
    malformed: int = 0  # PLX values that did not decode (skipped)
    packets: int = 0  # BerryMed packets decoded


# --------------------------------------------------------------------------- discovery + connect


class _Central(Vm1BleLink):
    """Vm1BleLink's discovery, allow-list, connect and I/O helpers for another service.

    Only ``find``, ``_connect``, ``_io`` and the allow-list checks of the parent
    are used; the parent's VM-1 ``open``/``read_payload``/``send_payload`` never are.
    """

    def __init__(
        self,
        owner: OximeterBleLink,
        *,
        allow: Collection[str],
        address: str | None,
        name: str | None,
        adapter: str | None,
        device_id: str | None,
        scan_timeout_s: float,
        connect_attempts: int,
        io_timeout_s: float,
    ) -> None:
        super().__init__(
            allow=allow,
            address=address,
            name=name,
            adapter=adapter,
            device_id=device_id,
            scan_timeout_s=scan_timeout_s,
            connect_attempts=connect_attempts,
            io_timeout_s=io_timeout_s,
        )
        self._owner = owner
        self.connected_to: str | None = None

    @property
    def description(self) -> str:
        target = self.connected_to or self.address or self.name or f"{self._owner.LABEL} service"
        return f"ble:{self.adapter or 'default'}/{target}"

    def _matches(self, device: BLEDevice, adv: AdvertisementData) -> bool:
        if self.address is not None or self.name is not None:
            return super()._matches(device, adv)
        name = adv.local_name or device.name
        allowed = device.address.upper() in self._allow_addresses or name in self._allow_names
        return allowed and self._owner.SERVICE_UUID in adv.service_uuids

    def _target_text(self) -> str:
        label = self._owner.LABEL
        if self.address is not None:
            return f"{label} at {self.address}"
        if self.name is not None:
            return f"{label} {self.name!r}"
        return f"{label} (by service)"

    def _on_disconnected(self, client: BleakClient) -> None:
        self._owner._disconnected(client)


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
        self._central = _Central(
            self,
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
        self._queue: asyncio.Queue[ReceivedSample | _Lost] = asyncio.Queue(_QUEUE_MAX)

    # ------------------------------------------------------------------ public API

    @property
    def description(self) -> str:
        return self._central.description

    @property
    def connected_address(self) -> str | None:
        """The address of the connected device, once open."""
        return self._central.connected_to

    @property
    def is_open(self) -> bool:
        return self._client is not None

    async def find(self) -> BLEDevice:
        """Scan until an allow-listed device matching the target advertises."""
        return await self._central.find()

    async def open(self) -> None:
        if self._client is not None:
            raise TransportError(f"{self.description} is already open", device_id=self.device_id)
        self._closing = False
        self._queue = asyncio.Queue(_QUEUE_MAX)
        device = await self._central.find()
        client = await self._central._connect(device)
        self._client = client
        self._central.connected_to = device.address
        try:
            self._require_service(client, device)
            self._reset()
            await self._start(client)
        except BaseException:
            await self.close()
            raise
        self.stats.connections += 1
        log.info("BLE oximeter link open: %s", self.description)

    def _require_service(self, client: BleakClient, device: BLEDevice) -> None:
        if client.services.get_service(self.SERVICE_UUID) is None:
            raise TransportError(
                f"BLE device {device.address} ({device.name}) does not offer the "
                f"{self.LABEL} service",
                device_id=self.device_id,
            )

    async def read_sample(self) -> ReceivedSample:
        """The next sample; TransportError once the link is lost (or closed)."""
        item = await self._queue.get()
        if isinstance(item, _Lost):
            self._queue.put_nowait(item)  # every later read fails the same way
            raise TransportError(
                f"BLE link {self.description} lost: {item.reason}", device_id=self.device_id
            )
        return item

    async def close(self) -> None:
        self._closing = True
        client, self._client = self._client, None
        if client is not None:
            from bleak.exc import BleakError

            try:
                async with asyncio.timeout(self._central.io_timeout_s):
                    await client.disconnect()
            except (BleakError, OSError, EOFError, TimeoutError) as exc:
                log.warning("BLE link %s: disconnect failed: %r", self.description, exc)
        self._reset()
        while not self._queue.empty():  # unread samples of a closed link are stale
            self._queue.get_nowait()
        self._queue.put_nowait(_Lost("closed"))

    # ------------------------------------------------------------------ for subclasses

    def _reset(self) -> None:
        """Forget per-connection state (a new connection starts clean)."""

    def _flush(self) -> None:
        """Deliver anything held back, before a loss is reported."""

    async def _start(self, client: BleakClient) -> None:
        raise NotImplementedError

    async def _subscribe(self, client: BleakClient, uuid: str, callback: Any) -> None:
        await self._central._io(client.start_notify(uuid, callback), f"subscribe {uuid}")

    def _stamp(self) -> tuple[float, datetime]:
        return self.clock.monotonic(), self.clock.now()

    def _deliver(self, item: ReceivedSample | _Lost) -> None:
        if isinstance(item, ReceivedSample):
            self.stats.samples += 1
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            log.warning("BLE link %s: reader stalled, dropping the link", self.description)
            while not self._queue.empty():
                self._queue.get_nowait()
            self._queue.put_nowait(_Lost("reader stalled, queue overflow"))

    def _disconnected(self, client: BleakClient) -> None:
        if self._closing or client is not self._client:
            return
        log.debug("BLE link %s: disconnected by the device or the radio", self.description)
        self._flush()
        self._deliver(_Lost("disconnected"))


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
            raw = await self._central._io(
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


class BerryMedDownsampler:
    """BerryMed packets (~100/s) -> at most one sample per ``window_s``; module docstring."""

    def __init__(self, window_s: float = 1.0, *, source: str = berrymed.SOURCE) -> None:
        if not window_s > 0:
            raise ValueError("window_s must be positive")
        self.window_s = window_s
        self.source = source
        self._samples: list[OximeterSample] = []
        self._start = 0.0
        self._last: tuple[float, datetime] | None = None

    @property
    def pending_packets(self) -> int:
        return len(self._samples)

    def add(self, t_s: float, utc: datetime, packet: BerryMedPacket) -> ReceivedSample | None:
        """Take one packet received at ``t_s``; returns the window it closed, if any."""
        out = None
        if self._samples and t_s - self._start >= self.window_s:
            out = self.flush()
        if not self._samples:
            self._start = t_s
        self._samples.append(berrymed.to_sample(packet, source=self.source))
        self._last = (t_s, utc)
        return out

    def flush(self) -> ReceivedSample | None:
        """The window so far as one sample (None if empty); starts a new window."""
        samples, self._samples = self._samples, []
        if not samples or self._last is None:
            return None
        t_s, utc = self._last
        return ReceivedSample(
            _aggregate(samples, source=self.source),
            t_s,
            utc,
            "continuous",
            packets=len(samples),
            window_start_s=self._start,
        )

    def clear(self) -> None:
        self._samples = []
        self._last = None


def _aggregate(samples: list[OximeterSample], *, source: str) -> OximeterSample:
    """Median of the valid values (else of the present ones), union of the flags."""
    pool = [s for s in samples if s.valid] or samples

    def median(values: list[float]) -> float | None:
        return float(statistics.median(values)) if values else None

    quality: set[QualityFlag] = set()
    for s in samples:
        quality |= s.quality
    strengths = [s.signal_strength for s in samples if s.signal_strength is not None]
    return OximeterSample(
        spo2=median([s.spo2 for s in pool if s.spo2 is not None]),
        pulse_bpm=median([s.pulse_bpm for s in pool if s.pulse_bpm is not None]),
        quality=frozenset(quality),
        signal_strength=math.floor(statistics.median(strengths)) if strengths else None,
        pleth=tuple(p for s in samples for p in s.pleth),
        source=source,
    )


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
