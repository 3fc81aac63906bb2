"""Telemetry's QoS 0 messages written as one paho out-packet per batch (issue 13).

For every QoS 0 message ``paho.Client.publish`` builds an ``MQTTMessage`` and an
``MQTTMessageInfo`` (with a ``threading.Condition``), queues an out-packet, and its
writer does one ``send()`` per packet and then, per packet, calls ``on_publish``
with a fresh ``ReasonCode`` and ``Properties``. At 500 beds that was ~15 % of the
event loop. Here a batch's PUBLISH packets are encoded by :func:`encode_publish`
(pure, no I/O), concatenated, and queued on paho as ONE out-packet: paho writes it
with one ``send()`` (a few if the socket is full: it keeps the position), updates
its keepalive clock as after any write, and calls ``on_publish`` and
``info._set_as_published()`` once, which is what :meth:`Qos0Batches.queue` awaits.

The wire format is MQTT 3.1.1 section 3.3 / MQTT 5 section 3.3 for QoS 0, retain
0, dup 0 (no packet identifier):

1. fixed header ``0x30``, then the remaining length as a variable byte integer
   (1-4 bytes, at most 268,435,455);
2. the topic as a UTF-8 string with a two-byte big-endian length;
3. MQTT 5 only: the properties (their own varint length first; ``0x00`` for none);
4. the payload, to the end of the packet.

paho's pieces used here are private (``Client._packet_queue``, ``_mid_generate``,
``_sock``, ``MQTTMessageInfo._set_as_published``): :func:`qos0_batches`
checks them once per process and the publisher falls back to one ``publish`` per
message when they are not as expected (tests/test_qos0_batch.py fails loudly then).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
from collections.abc import Iterable
from functools import cache

import aiomqtt
import paho.mqtt
import paho.mqtt.client as paho_client

log = logging.getLogger(__name__)

#: The largest remaining length a variable byte integer can carry (4 bytes).
MAX_REMAINING_LENGTH = 268_435_455
#: A UTF-8 string field's largest length (two-byte length prefix).
MAX_TOPIC_BYTES = 65_535
_PUBLISH_QOS0 = 0x30  # PUBLISH, dup 0, QoS 0, retain 0
_FORBIDDEN_IN_TOPIC = frozenset("+#\x00") | frozenset(map(chr, range(0x01, 0x20)))
_FORBIDDEN_IN_TOPIC |= frozenset(map(chr, range(0x7F, 0xA0)))  # DEL and the C1 controls


def remaining_length(n: int) -> bytes:
    """``n`` as MQTT's variable byte integer (1-4 bytes, little-endian groups of 7 bits)."""
    if not 0 <= n <= MAX_REMAINING_LENGTH:
        raise ValueError(f"remaining length out of range: {n}")
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        if n:
            out.append(digit | 0x80)
        else:
            out.append(digit)
            return bytes(out)


def topic_field(topic: str) -> bytes:
    """The topic as PUBLISH carries it (two-byte length + UTF-8); ValueError if unfit.

    A topic to publish on must be one concrete name: not empty, no wildcard (``+``,
    ``#``), no NUL or other control character, not a broker's ``$`` topic, encodable
    as UTF-8 (no lone surrogates) and at most 65,535 bytes. Our topics are built from
    checked levels (devicegw.contract.topics); this is the last line before the wire.
    """
    if not topic:
        raise ValueError("empty topic")
    if topic[0] == "$":
        raise ValueError(f"a $ topic is the broker's: {topic!r}")
    bad = _FORBIDDEN_IN_TOPIC.intersection(topic)
    if bad:
        raise ValueError(f"topic contains {sorted(bad)!r}: {topic!r}")
    encoded = topic.encode("utf-8")  # UnicodeEncodeError (a ValueError) on a surrogate
    if len(encoded) > MAX_TOPIC_BYTES:
        raise ValueError(f"topic longer than {MAX_TOPIC_BYTES} bytes")
    return len(encoded).to_bytes(2, "big") + encoded


def encode_publish(topic: bytes, properties: bytes | None, payload: bytes) -> bytes:
    """One QoS 0 PUBLISH packet, byte for byte as paho's ``_send_publish`` makes it.

    ``topic`` is a :func:`topic_field`; ``properties`` the packed MQTT 5 properties
    (with their length; ``b"\\x00"`` for none) or None for MQTT 3.1.1.
    """
    props = properties or b""
    n = len(topic) + len(props) + len(payload)
    if n < 128:  # the usual telemetry message is ~400 bytes: 2 bytes of length
        header = bytes((_PUBLISH_QOS0, n))
    elif n < 16_384:
        header = bytes((_PUBLISH_QOS0, (n & 0x7F) | 0x80, n >> 7))
    else:
        header = bytes((_PUBLISH_QOS0,)) + remaining_length(n)
    return b"".join((header, topic, props, payload))


class TopicFields:
    """:func:`topic_field` remembered per topic (telemetry has two topics per bed)."""

    def __init__(self, limit: int = 8192) -> None:
        self._fields: dict[str, bytes] = {}
        self._limit = limit

    def __call__(self, topic: str) -> bytes:
        field = self._fields.get(topic)
        if field is None:
            field = topic_field(topic)  # raises before anything is remembered
            if len(self._fields) >= self._limit:
                self._fields.clear()
            self._fields[topic] = field
        return field


class _BatchInfo(paho_client.MQTTMessageInfo):
    """paho's per-packet info, telling the event loop when the batch is written.

    paho calls ``_set_as_published`` when a QoS 0 out-packet's last byte is sent (in
    aiomqtt's writer callback, on the loop), or with ``rc = MQTT_ERR_CONN_LOST`` when it
    drops its queue for a reconnect.
    """

    __slots__ = ("written",)

    def __init__(self, mid: int, written: asyncio.Future[int]) -> None:
        super().__init__(mid)
        self.written = written

    def _set_as_published(self) -> None:
        super()._set_as_published()
        if not self.written.done():
            self.written.set_result(self.rc)


_PACKET_QUEUE_PARAMS = ["self", "command", "packet", "mid", "qos", "info"]


def _paho_problem() -> str | None:
    """What about paho's private API is not as this module expects, or None."""
    version = getattr(paho.mqtt, "__version__", "")
    if not version.startswith("2."):
        return f"paho-mqtt {version or '?'} (expected 2.x)"
    cls = paho_client.Client
    for name in ("_packet_queue", "_mid_generate", "_packet_write"):
        if not callable(getattr(cls, name, None)):
            return f"paho.mqtt.client.Client.{name} is missing"
    params = list(inspect.signature(cls._packet_queue).parameters)
    if params != _PACKET_QUEUE_PARAMS:
        return f"Client._packet_queue{tuple(params)} (expected {tuple(_PACKET_QUEUE_PARAMS)})"
    info = paho_client.MQTTMessageInfo
    if not callable(getattr(info, "_set_as_published", None)):
        return "MQTTMessageInfo._set_as_published is missing"
    if getattr(paho_client, "PUBLISH", None) != 0x30:
        return "paho.mqtt.client.PUBLISH is not 0x30"
    # The writer must still say a QoS 0 PUBLISH is out through its info.
    source = inspect.getsource(cls._packet_write)
    if "_set_as_published" not in source or "'pos'" not in source:
        return "Client._packet_write no longer marks a QoS 0 packet's info as published"
    return None


@cache
def paho_problem() -> str | None:
    """:func:`_paho_problem`, looked at once per process."""
    return _paho_problem()


def _instance_problem(client: aiomqtt.Client) -> str | None:
    paho = getattr(client, "_client", None)
    if not isinstance(paho, paho_client.Client):
        return "aiomqtt.Client._client is not a paho client"
    for name in ("_sock", "_protocol", "_out_messages", "_out_packet"):
        if not hasattr(paho, name):
            return f"the paho client has no {name}"
    return None


_said: set[str] = set()


def qos0_batches(client: aiomqtt.Client) -> Qos0Batches | None:
    """Batched QoS 0 writes on ``client``, or None (the caller publishes one message at
    a time) if paho's private pieces are not as expected: said once per process."""
    problem = paho_problem() or _instance_problem(client)
    if problem is None:
        return Qos0Batches(client)
    if problem not in _said:
        _said.add(problem)
        log.warning("telemetry is published one message at a time: %s", problem)
    return None


class Qos0Batches:
    """Queues batches of QoS 0 PUBLISH packets on one aiomqtt client's paho client."""

    def __init__(self, client: aiomqtt.Client) -> None:
        """Build it with :func:`qos0_batches`, which checks paho first."""
        self._client = client
        self._paho: paho_client.Client = client._client

    @property
    def v5(self) -> bool:
        return bool(self._paho._protocol == paho_client.MQTTv5)

    def ensure_connected(self) -> None:
        """Raise :class:`aiomqtt.MqttCodeError` as ``aiomqtt.Client.publish`` does when
        paho would refuse a publish (it checks for a socket: ``MQTT_ERR_NO_CONN``)."""
        if self._paho._sock is None:
            raise aiomqtt.MqttCodeError(paho_client.MQTT_ERR_NO_CONN, "Could not publish message")

    def queue(self, packets: Iterable[bytes]) -> asyncio.Future[int]:
        """Queue ``packets`` (from :func:`encode_publish`) as one out-packet, one write.

        Raises :class:`aiomqtt.MqttCodeError` when the client is not connected (nothing
        is queued then). The future is done once paho has written the last byte; its
        result is paho's rc: ``MQTT_ERR_SUCCESS``, or ``MQTT_ERR_CONN_LOST`` if paho
        dropped its queue for a reconnect (aiomqtt never asks paho to reconnect; a
        connection lost otherwise leaves the future pending, as aiomqtt's ``publish``
        waits then, until the timeout or the publisher's TaskGroup ends it).
        """
        self.ensure_connected()
        paho = self._paho
        data = b"".join(packets)
        written: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        # A QoS 0 packet carries no mid on the wire, but paho's callback does, and
        # aiomqtt completes whichever publish waits under it: never one of a QoS 1
        # message still in flight (paho's numbers wrap at 65,535).
        mid = paho._mid_generate()
        while mid in paho._out_messages:
            mid = paho._mid_generate()
        rc = paho._packet_queue(paho_client.PUBLISH, data, mid, 0, _BatchInfo(mid, written))
        if rc not in (paho_client.MQTT_ERR_SUCCESS, paho_client.MQTT_ERR_AGAIN):
            # Only when paho writes at once itself (no aiomqtt writer registered).
            written.cancel()
            raise aiomqtt.MqttCodeError(rc, "Could not publish message")
        return written

    async def wait(self, written: asyncio.Future[int]) -> None:
        """Wait until a :meth:`queue`'d batch is written.

        Raises :class:`aiomqtt.MqttError` when that takes longer than the client's
        timeout, as ``aiomqtt.Client.publish`` does, and :class:`aiomqtt.MqttCodeError`
        if paho reports the batch lost.
        """
        timeout = self._client.timeout
        try:
            async with asyncio.timeout(None if timeout == math.inf else timeout):
                rc = await written
        except TimeoutError:
            raise aiomqtt.MqttError("Operation timed out") from None
        finally:
            written.cancel()  # not done only if we were cancelled or timed out
        if rc != paho_client.MQTT_ERR_SUCCESS:
            raise aiomqtt.MqttCodeError(rc, "Could not publish message")
