"""Publishes the gateway's payloads to the broker, reconnecting by itself.

aiomqtt does not reconnect, so this owns the loop: a fresh client per
connection, capped jittered backoff, MQTT 5 where the broker takes it (3.1.1
otherwise), the gateway's last will registered on every connect.

Dose events and device statuses come from the durable :class:`Outbox`: they
were committed before this code saw them, are published in order with a
bounded number in flight (QoS 1), and are marked sent only on the broker's
PUBACK; after a reconnect whatever was not acknowledged is sent again, with
``delivery.redelivery`` counting the earlier attempts. Telemetry is best
effort: a bounded in-memory buffer that drops the oldest and counts the drops.

Every message carries ``delivery = {birth_seq, seq}``: ``birth_seq`` grows on
every successful connection (persisted; a failed attempt uses no number),
``seq`` counts messages within it, per feed (docs/blinding.md): the blinded
feed (the birth is its 0) and the restricted feed are numbered apart, so a
restricted message (a device alarm, say) never shows as a gap to a blinded
subscriber. The last will is the offline gateway
status of the same ``birth_seq``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import sqlite3
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import aiomqtt
from paho.mqtt.client import MQTT_ERR_SUCCESS
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import BaseModel

from devicegw.config import BrokerSettings
from devicegw.contract.payloads import DoseRecord, encode_json
from devicegw.contract.vocabulary import PAYLOAD_FEED, Feed, PayloadKind, TopicKind
from devicegw.errors import ConfigError
from devicegw.mqtt.qos0_batch import Qos0Batches, TopicFields, encode_publish, qos0_batches
from devicegw.storage.outbox import LATEST_WINS, AddResult, Kind, Outbox, OutboxRow
from devicegw.storage.store import Store
from drivers.backoff import Backoff
from drivers.clock import Clock

log = logging.getLogger(__name__)

_LOOPBACK = ("127.0.0.1", "::1", "localhost")
TELEMETRY_EXPIRY_S = 60

#: A subscribed command's handler: (topic, payload, MQTT 5 properties or None) -> the reply
#: to publish (topic, payload, correlation data), or None for no reply.
CommandHandler = Callable[[str, bytes, Properties | None], tuple[str, bytes, bytes | None] | None]
SESSION_EXPIRY_S = 3600


def encode(payload: BaseModel) -> bytes:
    """The one JSON encoding of every payload (stable key order, UTC ISO times)."""
    return encode_json(payload)


def feed_of(payload: bytes) -> Feed:
    """The feed a payload belongs to, by its ``event_type`` (unknown: restricted, the safe side)."""
    try:
        event_type = json.loads(payload).get("event_type")
        return PAYLOAD_FEED[PayloadKind(event_type)]
    except (ValueError, AttributeError, KeyError):
        return Feed.RESTRICTED


#: How every payload model serialises its opening: two literal fields (no commas inside),
#: then ``delivery`` still unset. A fresh message is stamped by filling that in place.
_UNSTAMPED_HEAD = b'{"schema_version":'
_UNSTAMPED_DELIVERY = b',"delivery":null,'


def stamp_fresh(payload: bytes, *, birth_seq: int, seq: int) -> bytes:
    """:func:`stamp` for a payload just encoded here (telemetry), without a JSON round trip.

    At 500 beds telemetry is ~650 messages a second; decoding and re-encoding each one
    to add three numbers was a tenth of the publisher's time. Anything that does not
    open exactly as our models do takes the general path.
    """
    head, found, tail = payload.partition(_UNSTAMPED_DELIVERY)
    if not found or not head.startswith(_UNSTAMPED_HEAD) or head.count(b",") != 1:
        return stamp(payload, birth_seq=birth_seq, seq=seq)
    delivery = b',"delivery":{"birth_seq":%d,"seq":%d,"redelivery":0},' % (birth_seq, seq)
    return head + delivery + tail


def queue_qos0(
    client: aiomqtt.Client, topic: str, payload: bytes, properties: Properties | None
) -> None:
    """Queue one QoS 0 message on the connection without waiting for it to be written.

    Uses aiomqtt's underlying paho client, ``Client._client`` (private: pyproject pins
    aiomqtt below 3, and tests/test_publisher_qos0.py fails if the attribute changes):
    paho queues the packet and aiomqtt's writer callback sends it on the loop's next
    turn; aiomqtt ignores the publish callback of a message it did not wait for.
    Raises :class:`aiomqtt.MqttCodeError`, as ``aiomqtt.Client.publish`` does, when the
    connection cannot take it.
    """
    info = client._client.publish(topic, payload, 0, False, properties)
    if info.rc != MQTT_ERR_SUCCESS:
        raise aiomqtt.MqttCodeError(info.rc, "Could not publish message")


class _PackedOnce(Properties):
    """PUBLISH properties that never change once built: packed at the first publish only.

    paho packs a message's properties at every publish; for telemetry's one expiry
    that was ~3 % of the gateway's CPU at 500 beds. Build it with :func:`fixed_properties`.
    """

    def pack(self) -> bytes:
        packed: bytes | None = self.__dict__.get("_packed")
        if packed is None:
            packed = bytes(super().pack())  # type: ignore[no-untyped-call]
            object.__setattr__(self, "_packed", packed)  # Properties refuses other names
        return packed


def fixed_properties(*, expiry_s: int) -> Properties:
    props = _PackedOnce(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.MessageExpiryInterval = expiry_s
    props.pack()
    return props


def no_delay(client: aiomqtt.Client) -> None:
    """Send each packet as soon as it is written (TCP_NODELAY), as Mosquitto can.

    paho leaves Nagle's algorithm on: a small packet written while an earlier one is
    unacknowledged waits for that ACK, which the broker delays by up to ~40 ms when it
    has nothing to send back (QoS 0 telemetry). At 500 beds that wait was most of the
    telemetry's and safety alerts' p99 (issue 13).
    """
    sock = client._client.socket()
    if isinstance(sock, socket.socket):  # TLS included; not a websocket
        with contextlib.suppress(OSError):  # closed meanwhile: the next connection
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def stamp(payload: bytes, *, birth_seq: int, seq: int, redelivery: int = 0) -> bytes:
    """The payload with its delivery metadata; the record's own bytes are untouched otherwise."""
    obj = json.loads(payload)
    obj["delivery"] = {"birth_seq": birth_seq, "seq": seq, "redelivery": redelivery}
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


@dataclass(slots=True)
class PublisherStats:
    connected: bool = False
    connects: int = 0
    connect_failures: int = 0
    birth_seq: int = 0
    dose_events_published: int = 0
    dose_details_published: int = 0
    statuses_published: int = 0
    telemetry_published: int = 0
    telemetry_dropped: int = 0
    redeliveries: int = 0
    quarantined: int = 0  # rows refused because their payload changed (see the outbox)
    command_errors: int = 0  # command handlers that raised (logged; the connection stays)
    protocol: str = ""
    last_error: str | None = None


def build_tls_context(settings: BrokerSettings) -> ssl.SSLContext | None:
    tls = settings.tls
    if not tls.enabled:
        return None
    try:
        ctx = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
        if tls.cert_file and tls.key_file:
            ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"broker.tls: cannot load certificates: {exc}", field="broker.tls"
        ) from exc
    if tls.insecure_skip_verify:
        if settings.host not in _LOOPBACK:
            raise ConfigError(
                "broker.tls.insecure_skip_verify is only allowed for a loopback broker",
                field="broker.tls.insecure_skip_verify",
            )
        log.warning("TLS certificate verification is OFF for loopback broker %s", settings.host)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class _LinkDown(Exception):
    """A publish failed because the connection broke: reconnect."""


#: Telemetry messages handed to the client in one go.
TELEMETRY_BATCH = 200


class MqttPublisher:
    """Owns the broker connection; producers call the ``publish_*`` methods and never block."""

    def __init__(
        self,
        settings: BrokerSettings,
        *,
        client_id: str,
        clock: Clock,
        store: Store,
        status_topic: str,
        status_payload: Callable[[bool], bytes],
        protocol: Literal["auto", "5", "3.1.1"] = "auto",
        telemetry_buffer: int = 512,  # messages: a telemetry tick is two (blinded + detail)
        max_inflight: int = 20,
    ) -> None:
        self._settings = settings
        self._client_id = client_id
        self._clock = clock
        self._store = store
        self.outbox = Outbox(store)
        # A record committed with sync_later becomes publishable when its fsync returns.
        store.sync_listeners.append(self._outbox_grew)
        self._status_topic = status_topic
        self._status_payload = status_payload
        self._protocol_pref = protocol
        self._use_v5 = protocol != "3.1.1"
        self._telemetry: deque[tuple[str, bytes, Feed]] = deque()
        # One set of telemetry properties for every message (paho packs them at publish;
        # building them per message was ~6 % of the gateway's CPU at 500 beds).
        self._telemetry_props = fixed_properties(expiry_s=TELEMETRY_EXPIRY_S)
        # The same, as encoded into a batch's PUBLISH packets (qos0_batch).
        self._telemetry_props_packed = bytes(self._telemetry_props.pack())  # type: ignore[no-untyped-call]
        self._topic_fields = TopicFields()
        self._unfit_topics: set[str] = set()  # said once each (ERROR)
        self._telemetry_max = telemetry_buffer
        self._max_inflight = max_inflight
        #: Rows the broker acknowledged, not yet marked sent (see _flush_acked).
        self._acked: list[tuple[OutboxRow, datetime]] = []
        #: Set when a row was committed or an in-flight slot freed: worth asking the store.
        self._outbox_changed = True
        self._wake = asyncio.Event()
        self._status_changed = False
        self._connected = asyncio.Event()
        self._seq: dict[Feed, int] = {}
        self.stats = PublisherStats(birth_seq=int(store.get_meta("birth_seq", "0") or 0))
        self._tls = build_tls_context(settings)
        self._password = settings.password()
        self._commands: list[tuple[str, CommandHandler]] = []
        #: Called with (kind, seconds from PUBLISH to PUBACK) for every durable record sent.
        self.latency_observers: list[Callable[[str, float], None]] = []

    def add_command(self, topic_filter: str, handler: CommandHandler) -> None:
        """Subscribe to ``topic_filter`` on every connection; ``handler`` answers each
        message with a reply ``(topic, payload, correlation_data)`` or None. A handler that
        raises is logged and the connection carries on."""
        self._commands.append((topic_filter, handler))

    # -- producer side ---------------------------------------------------------

    def _commit(
        self,
        kind: Kind,
        topic: str,
        payload: BaseModel,
        *,
        retain: bool,
        device_id: str | None,
        event_id: str | None = None,
    ) -> AddResult:
        """Commit to the outbox and wake the sender.

        Durable on return, except a safety message: fsync'ed by the store's worker
        thread and published only once that returned (Store.transaction
        ``sync_later``), so that the alerts of many beds raised at once share an
        fsync instead of each stalling the event loop for one (issue 13: 50 beds
        desaturating together). On a full disk the write is held in memory (the
        store's :class:`HeldWrites`; a status under its topic, latest wins) and
        committed when space returns.
        """
        body, now = encode(payload), self._clock.now()
        result = AddResult(added=False, conflict=False)

        def write() -> None:
            nonlocal result
            result = self.outbox.add(
                kind,
                topic,
                body,
                qos=1,
                retain=retain,
                now=now,
                device_id=device_id,
                event_id=event_id,
                sync_later=kind == TopicKind.SAFETY,
            )
            self._outbox_changed = True
            self._wake.set()

        key = f"{kind}:{topic}" if kind == TopicKind.STATUS else f"{kind}:{topic}:{id(body)}"
        self._store.held.run(key, write)
        return result

    def commit_dose(
        self,
        topic: str,
        record: DoseRecord,
        *,
        device_id: str,
        detail_topic: str,
    ) -> AddResult:
        """Commit a dose event and its restricted detail to the outbox, in one transaction,
        unique by the event's id; the connection loop publishes them (now, or after an
        outage). The bytes stored are the record's own encoding (``DoseRecord.encoded``),
        which the audit trail hashes too."""
        event, detail = record.encoded()
        result = self.outbox.add(
            TopicKind.DOSE,
            topic,
            event,
            qos=1,
            retain=False,
            now=self._clock.now(),
            device_id=device_id,
            event_id=str(record.event.event_id),
            detail=(detail_topic, detail),
        )
        self._outbox_changed = True
        self._wake.set()
        return result

    def publish_status(
        self, topic: str, payload: BaseModel, *, device_id: str | None = None
    ) -> None:
        """Retained status; latest wins per topic."""
        self._commit(TopicKind.STATUS, topic, payload, retain=True, device_id=device_id)

    def commit_unique(
        self,
        kind: Literal[TopicKind.DOSE_CORRECTION, TopicKind.DOSE_MISSED],
        topic: str,
        payload: BaseModel,
        *,
        device_id: str,
        event_id: str,
    ) -> None:
        """A dose correction or missed-dose notice: durable, QoS 1, unique by its
        (deterministic) ``event_id``, so committing it twice publishes it once."""
        self._commit(kind, topic, payload, retain=False, device_id=device_id, event_id=event_id)

    def publish_event(
        self, topic: str, payload: BaseModel, *, device_id: str | None = None
    ) -> None:
        """Any other must-deliver event (e.g. safety alerts): QoS 1, not retained."""
        self._commit(TopicKind.SAFETY, topic, payload, retain=False, device_id=device_id)

    def publish_telemetry(self, topic: str, payload: BaseModel) -> None:
        if len(self._telemetry) >= self._telemetry_max:
            self._telemetry.popleft()
            self.stats.telemetry_dropped += 1
        # The feed by the model's own kind (feed_of would decode the JSON again).
        kind = getattr(payload, "event_type", None)
        feed = (
            PAYLOAD_FEED.get(kind, Feed.RESTRICTED)
            if isinstance(kind, PayloadKind)
            else Feed.RESTRICTED
        )
        self._telemetry.append((topic, encode(payload), feed))
        self._wake.set()

    @property
    def connected(self) -> asyncio.Event:
        return self._connected

    # -- connection loop -------------------------------------------------------

    def _candidate_birth(self) -> int:
        """The ``birth_seq`` this connection will have if it succeeds (its will carries it)."""
        return self.stats.birth_seq + 1

    def _born(self, birth: int) -> None:
        """The broker accepted the connection: ``birth`` is used, persist it (docs/mqtt.md).

        A failed attempt uses no number: ``birth_seq`` counts connections, not attempts.
        """
        self.stats.birth_seq = birth
        try:
            self._store.set_meta("birth_seq", str(birth))
        except sqlite3.Error as exc:  # a full disk: the next birth is still higher in memory
            log.error("cannot persist birth_seq %d: %s", birth, exc)  # noqa: TRY400 - no traceback

    def _make_client(self, birth_seq: int) -> aiomqtt.Client:
        s = self._settings
        props = None
        if self._use_v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = SESSION_EXPIRY_S
        will = stamp(self._status_payload(False), birth_seq=birth_seq, seq=0)
        client = aiomqtt.Client(
            hostname=s.host,
            port=s.port,
            username=s.username,
            password=self._password.get_secret_value() if self._password else None,
            identifier=self._client_id,
            protocol=aiomqtt.ProtocolVersion.V5 if self._use_v5 else aiomqtt.ProtocolVersion.V311,
            will=aiomqtt.Will(self._status_topic, will, qos=1, retain=True),
            keepalive=s.keepalive_s,
            tls_context=self._tls,
            timeout=10,
            properties=props,
            max_inflight_messages=self._max_inflight,
            max_queued_outgoing_messages=10_000,
        )
        # aiomqtt warns above this many unfinished publish calls; we start up to
        # max_inflight QoS 1 records plus a telemetry batch on purpose.
        client.pending_calls_threshold = self._max_inflight + TELEMETRY_BATCH + 10
        return client

    async def run(self) -> None:
        """Run until cancelled; on cancellation publish the offline status if connected."""
        backoff = Backoff(self._settings.reconnect_initial_s, self._settings.reconnect_max_s)
        first_failure = True
        while True:
            birth_seq = self._candidate_birth()
            client = self._make_client(birth_seq)
            try:
                async with client:
                    no_delay(client)
                    self._born(birth_seq)
                    self.stats.connected = True
                    self.stats.connects += 1
                    self.stats.protocol = "5" if self._use_v5 else "3.1.1"
                    self.stats.last_error = None
                    self._connected.set()
                    backoff.reset()
                    first_failure = True
                    log.info(
                        "connected to broker",
                        extra={
                            "broker": f"{self._settings.host}:{self._settings.port}",
                            "mqtt_protocol": self.stats.protocol,
                            "birth_seq": birth_seq,
                        },
                    )
                    try:
                        await self._send_loop(client, birth_seq)
                    except asyncio.CancelledError:
                        await self._say_goodbye(client, birth_seq)
                        raise
            except (aiomqtt.MqttError, _LinkDown) as exc:
                # Disconnecting while being cancelled: the stop wins over a retry.
                _raise_if_cancelling()
                self.stats.last_error = str(exc)
                self.stats.connect_failures += 1
                if (
                    self._protocol_pref == "auto"
                    and self._use_v5
                    and self.stats.connects == 0
                    and _looks_like_protocol_refusal(exc)
                ):
                    log.warning("broker refused MQTT 5; falling back to 3.1.1")
                    self._use_v5 = False
                    continue
                level = logging.WARNING if first_failure else logging.DEBUG
                log.log(
                    level,
                    "broker connection failed: %s",
                    exc,
                    extra={"broker": f"{self._settings.host}:{self._settings.port}"},
                )
                first_failure = False
            finally:
                self.stats.connected = False
                self._connected.clear()
                self._flush_acked()  # before the next connection reads what is unsent
            await self._clock.sleep(backoff.next_delay())

    async def _say_goodbye(self, client: aiomqtt.Client, birth_seq: int) -> None:
        payload = stamp(
            self._status_payload(False), birth_seq=birth_seq, seq=self._take_seq(Feed.BLINDED)
        )
        with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
            async with asyncio.timeout(2.0):
                await client.publish(self._status_topic, payload, qos=1, retain=True)

    def republish_status(self) -> None:
        """The gateway's status changed (e.g. the disk filled): send it again, retained."""
        self._status_changed = True
        self._wake.set()

    def _take_seq(self, feed: Feed) -> int:
        seq = self._seq.get(feed, 0)
        self._seq[feed] = seq + 1
        return seq

    async def _send_loop(self, client: aiomqtt.Client, birth_seq: int) -> None:
        try:
            pruned = self.outbox.prune()  # bound the disk: old sent records beyond retention
        except sqlite3.Error as exc:  # a full disk: pruning waits for the next connection
            log.warning("cannot prune the outbox now: %s", exc)
            pruned = 0
        if pruned:
            log.info("pruned sent records from the outbox", extra={"rows": pruned})
        self._seq = {}
        birth = stamp(
            self._status_payload(True), birth_seq=birth_seq, seq=self._take_seq(Feed.BLINDED)
        )
        await client.publish(self._status_topic, birth, qos=1, retain=True)
        try:
            async with asyncio.TaskGroup() as tg:
                if self._commands:
                    for topic_filter, _ in self._commands:
                        await client.subscribe(topic_filter, qos=1)
                    tg.create_task(self._command_loop(client))
                await self._dispatch(client, birth_seq, tg)
        except ExceptionGroup as group:
            mqtt_errors, others = group.split((aiomqtt.MqttError, _LinkDown))
            if others is not None or mqtt_errors is None:
                raise
            raise _LinkDown(str(mqtt_errors.exceptions[0])) from None

    async def _dispatch(
        self, client: aiomqtt.Client, birth_seq: int, tg: asyncio.TaskGroup
    ) -> None:
        inflight: set[asyncio.Task[None]] = set()
        # One cursor for decided records, one for retained statuses: the decided go first.
        last_id = {False: 0, True: 0}
        sending: asyncio.Task[None] | None = None  # the telemetry batch being written
        batches = qos0_batches(client)  # None: one paho publish per message
        self._outbox_changed = True  # a new connection: whatever is unsent
        while True:
            self._wake.clear()
            free = self._max_inflight - len(inflight)
            self._flush_acked()
            rows: list[OutboxRow] = []
            # The store is asked only when something was committed or a slot freed: the
            # dispatcher also wakes for every telemetry message (1,000 a second at 500 beds).
            if self._outbox_changed and free > 0:
                self._outbox_changed = False
                for latest in (False, True):
                    if free - len(rows) > 0:
                        rows += self.outbox.pending(
                            after_id=last_id[latest], limit=free - len(rows), latest_wins=latest
                        )
                if len(rows) >= free:
                    self._outbox_changed = True  # more may be waiting
            if rows:
                with contextlib.suppress(sqlite3.Error):  # a full disk: only a counter
                    self.outbox.mark_attempts([row.id for row in rows])
            for row in rows:
                last_id[row.kind in LATEST_WINS] = row.id
                problem = self.outbox.check_binding(row)
                if problem is not None:
                    # Changed after its audit record bound it: refused, kept, reported.
                    self.outbox.quarantine(row.id, problem)
                    self.stats.quarantined += 1
                    continue
                payload = stamp(
                    row.payload,
                    birth_seq=birth_seq,
                    seq=self._take_seq(feed_of(row.payload)),
                    redelivery=row.attempts,
                )
                if row.attempts:
                    self.stats.redeliveries += 1
                task = tg.create_task(self._publish_row(client, row, payload))
                inflight.add(task)
                task.add_done_callback(self._task_done(inflight))
            if self._status_changed:
                self._status_changed = False
                status = stamp(
                    self._status_payload(True),
                    birth_seq=birth_seq,
                    seq=self._take_seq(Feed.BLINDED),
                )
                await client.publish(self._status_topic, status, qos=1, retain=True)
            # Telemetry goes out once the durable rows of this round are handed to the
            # client (they keep their place ahead of it), without waiting for their
            # PUBACKs: at 500 beds some QoS 1 record is nearly always in flight, and
            # telemetry waited behind it for up to ~0.3 s (issue 13).
            # In its own task (one batch at a time), so that the dispatcher is back for the
            # next decided record while the batch is being written.
            if self._telemetry and not rows and (sending is None or sending.done()):
                send = (
                    self._send_telemetry(client, birth_seq)
                    if batches is None
                    else self._send_telemetry_batch(batches, birth_seq)
                )
                sending = tg.create_task(send)
                sending.add_done_callback(lambda _: self._wake.set())
            _raise_if_cancelling()
            if not rows:
                await self._wake.wait()

    async def _send_telemetry_batch(self, batches: Qos0Batches, birth_seq: int) -> None:
        """Write up to TELEMETRY_BATCH queued messages as one paho out-packet (QoS 0).

        The messages' PUBLISH packets are encoded here (:mod:`qos0_batch`) and queued
        on paho together: one ``send()`` (a few if the socket is full) and one
        ``on_publish`` per batch instead of per message, and no per-message paho or
        aiomqtt objects (issue 13: paho's per-message path was ~15 % of the loop at
        500 beds). Awaiting the batch's write keeps the back-pressure: a slow broker
        holds the next batch back in our bounded deque, not in paho's unbounded queue.
        Not connected: :class:`aiomqtt.MqttCodeError` before anything leaves the deque.
        """
        batches.ensure_connected()
        props = self._telemetry_props_packed if batches.v5 else None
        fields = self._topic_fields
        packets: list[bytes] = []
        while self._telemetry and len(packets) < TELEMETRY_BATCH:
            topic, body, feed = self._telemetry.popleft()
            try:
                field = fields(topic)
            except ValueError as exc:
                self._refuse_topic(topic, exc)
                continue
            payload = stamp_fresh(body, birth_seq=birth_seq, seq=self._take_seq(feed))
            packets.append(encode_publish(field, props, payload))
        if not packets:
            return
        written = batches.queue(packets)
        self.stats.telemetry_published += len(packets)
        await batches.wait(written)

    def _refuse_topic(self, topic: str, exc: ValueError) -> None:
        """A telemetry message whose topic cannot go on the wire: dropped, counted,
        said once per topic (a bug upstream: topics are built from checked levels)."""
        self.stats.telemetry_dropped += 1
        if topic not in self._unfit_topics and len(self._unfit_topics) < 100:
            self._unfit_topics.add(topic)
            log.error("telemetry dropped: unfit topic %r: %s", topic, exc)

    async def _send_telemetry(self, client: aiomqtt.Client, birth_seq: int) -> None:
        """Hand up to TELEMETRY_BATCH queued messages to the client at once (QoS 0).

        The fallback for :meth:`_send_telemetry_batch` when paho's private API is
        not as :mod:`qos0_batch` expects.

        QoS 0 has nothing to wait for but the socket, so all but the last message go
        straight to paho's queue (:func:`queue_qos0`): aiomqtt's ``publish`` adds a
        coroutine, a task and an event per message only to learn that paho wrote it (a
        fifth of the gateway's CPU at 500 beds). The last goes through ``publish`` and
        is awaited: paho writes in order, so when it is out the whole batch is, and a
        slow broker holds the next batch back here instead of in paho's unbounded queue.
        """
        props = self._telemetry_props if self._use_v5 else None
        last: tuple[str, bytes] | None = None
        queued = 0
        try:
            while self._telemetry and queued < TELEMETRY_BATCH:
                topic, body, feed = self._telemetry.popleft()
                if last is not None:
                    queue_qos0(client, *last, props)
                last = topic, stamp_fresh(body, birth_seq=birth_seq, seq=self._take_seq(feed))
                queued += 1
            if last is not None:
                await client.publish(*last, qos=0, properties=props)
        except BaseException:
            queued -= 1  # the message that failed; those before it are with paho
            raise
        finally:
            self.stats.telemetry_published += max(queued, 0)

    def _flush_acked(self) -> None:
        """Mark what the broker acknowledged as sent (held in memory on a full disk)."""
        acked, self._acked = self._acked, []
        self.outbox.mark_all_sent_or_hold(acked)

    async def _command_loop(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            for topic_filter, handler in self._commands:
                if not message.topic.matches(topic_filter):
                    continue
                payload = message.payload if isinstance(message.payload, bytes) else b""
                try:
                    reply = handler(message.topic.value, payload, message.properties)
                except Exception:
                    self.stats.command_errors += 1
                    log.exception("a command handler failed", extra={"topic": topic_filter})
                    continue
                if reply is None:
                    continue
                topic, body, correlation = reply
                props = None
                if self._use_v5:
                    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
                    if correlation is not None:
                        props.CorrelationData = correlation
                await client.publish(topic, body, qos=1, properties=props)

    def _outbox_grew(self) -> None:
        self._outbox_changed = True
        self._wake.set()

    def _task_done(self, inflight: set[asyncio.Task[None]]) -> Callable[[asyncio.Task[None]], None]:
        def done(task: asyncio.Task[None]) -> None:
            inflight.discard(task)
            self._outbox_changed = True  # a free slot: rows beyond the last round may wait
            self._wake.set()

        return done

    async def _publish_row(self, client: aiomqtt.Client, row: OutboxRow, payload: bytes) -> None:
        started = time.perf_counter()
        await client.publish(row.topic, payload, qos=row.qos, retain=row.retain, timeout=30)
        # Real seconds from PUBLISH to PUBACK, for the operators' monitoring (/metrics).
        for observe in self.latency_observers:
            observe(row.kind, time.perf_counter() - started)
        # Marked sent with the others of this round, at the dispatcher's next turn.
        self._acked.append((row, self._clock.now()))
        if row.kind == TopicKind.DOSE:
            self.stats.dose_events_published += 1
        elif row.kind == TopicKind.DOSE_DETAIL:
            self.stats.dose_details_published += 1
        elif row.kind == TopicKind.STATUS:
            self.stats.statuses_published += 1


def _raise_if_cancelling() -> None:
    """Python 3.11's ``asyncio.wait_for`` (used inside aiomqtt) can swallow a
    cancellation that arrives as its future completes; re-raise it here."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _looks_like_protocol_refusal(exc: Exception) -> bool:
    if isinstance(exc, aiomqtt.MqttCodeError):
        rc = exc.rc
        value = getattr(rc, "value", rc)
        # 3.1.1 CONNACK 1 = unacceptable protocol version; v5 reason 132 = unsupported version.
        return value in (1, 132)
    return "protocol" in str(exc).lower()
