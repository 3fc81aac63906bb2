"""Telemetry batches as one paho out-packet (issue 13): the encoding, paho's private API,
and batches through a real Mosquitto over MQTT 5 and 3.1.1.

The encoder must give paho's own bytes (``Client._send_publish``) for every length
class of the remaining-length varint; ``paho_problem()`` must be None on the paho
we pin: if a paho release changes ``_packet_queue`` or how its writer marks a QoS 0
packet written, the test here fails, not the ward (the publisher would fall back to
one ``publish`` per message and say so once).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Literal

import aiomqtt
import paho.mqtt.client as paho_client
import pytest
from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from devicegw.config import BrokerSettings
from devicegw.contract.payloads import Telemetry
from devicegw.mqtt import qos0_batch
from devicegw.mqtt.publisher import TELEMETRY_BATCH, MqttPublisher, fixed_properties, queue_qos0
from devicegw.mqtt.qos0_batch import (
    MAX_REMAINING_LENGTH,
    TopicFields,
    encode_publish,
    qos0_batches,
    remaining_length,
    topic_field,
)
from devicegw.storage.store import Store
from drivers.clock import SystemClock
from tests.mqtt_helpers import MosquittoBroker
from tests.test_publisher_qos0 import UTC_NOW

EXPIRY = fixed_properties(expiry_s=60).pack()  # type: ignore[no-untyped-call]
V5, V311 = aiomqtt.ProtocolVersion.V5, aiomqtt.ProtocolVersion.V311


# -- the encoding ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "golden"),
    [
        (0, "00"),
        (127, "7f"),
        (128, "8001"),
        (16_383, "ff7f"),
        (16_384, "808001"),
        (2_097_151, "ffff7f"),
        (2_097_152, "80808001"),
        (MAX_REMAINING_LENGTH, "ffffff7f"),
    ],
)
def test_remaining_length_golden(n: int, golden: str) -> None:
    assert remaining_length(n) == bytes.fromhex(golden)


@pytest.mark.parametrize("n", [-1, MAX_REMAINING_LENGTH + 1])
def test_remaining_length_out_of_range(n: int) -> None:
    with pytest.raises(ValueError, match="remaining length"):
        remaining_length(n)


def test_publish_golden_bytes() -> None:
    """Telemetry's shape by hand: fixed header, varint, topic, expiry property, payload."""
    v5 = encode_publish(topic_field("a/b"), EXPIRY, b"{}")
    assert v5 == bytes.fromhex("30 0d 0003 612f62 05 0200 00003c 7b7d")
    v311 = encode_publish(topic_field("a/b"), None, b"{}")
    assert v311 == bytes.fromhex("30 07 0003 612f62 7b7d")
    assert encode_publish(topic_field("ü"), b"\x00", b"") == bytes.fromhex("30 05 0002 c3bc 00")


def _paho_bytes(topic: str, payload: bytes, v5: bool, props: bool) -> bytes:
    """The PUBLISH packet paho itself would queue for this message."""
    client = paho_client.Client(
        CallbackAPIVersion.VERSION2,
        protocol=paho_client.MQTTv5 if v5 else paho_client.MQTTv311,
    )
    queued: list[bytes] = []

    def capture(command: int, packet: bytes, mid: int, qos: int, info: object = None) -> int:
        queued.append(bytes(packet))
        return paho_client.MQTT_ERR_SUCCESS

    client._packet_queue = capture  # type: ignore[method-assign,assignment]
    client._sock = object()  # type: ignore[assignment]  # "connected" for _send_publish
    properties = fixed_properties(expiry_s=60) if (v5 and props) else None
    client.publish(topic, payload, 0, False, properties)
    client._sock = None
    return queued[0]


@pytest.mark.parametrize("v5", [True, False])
@pytest.mark.parametrize("props", [True, False])
@pytest.mark.parametrize(
    "size",  # payload sizes around each varint boundary, and a telemetry-sized one
    [0, 1, 100, 400, 120, 121, 122, 16_370, 16_380, 16_400, 2_097_140, 2_097_160],
)
def test_publish_is_byte_for_byte_what_paho_queues(v5: bool, props: bool, size: int) -> None:
    topic = "devicegw/v2/site-1/gw-1/telemetry/neb-ü01"
    payload = bytes(i % 251 for i in range(size))
    if v5:
        properties: bytes | None = EXPIRY if props else b"\x00"
    else:
        properties = None
    ours = encode_publish(topic_field(topic), properties, payload)
    assert ours == _paho_bytes(topic, payload, v5, props)


def _decode(data: bytes, *, v5: bool) -> list[tuple[str, bytes | None, bytes]]:
    """A test-side reader of concatenated QoS 0 PUBLISH packets: (topic, props, payload)."""
    out: list[tuple[str, bytes | None, bytes]] = []
    pos = 0
    while pos < len(data):
        assert data[pos] == 0x30
        pos += 1
        n, shift = 0, 0
        while True:
            byte = data[pos]
            pos += 1
            n |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        end = pos + n
        assert end <= len(data)
        tlen = int.from_bytes(data[pos : pos + 2], "big")
        topic = data[pos + 2 : pos + 2 + tlen].decode("utf-8")
        pos += 2 + tlen
        props: bytes | None = None
        if v5:
            plen = data[pos]  # short property sets only (< 128 bytes)
            props = data[pos : pos + 1 + plen]
            pos += 1 + plen
        out.append((topic, props, data[pos:end]))
        pos = end
    return out


_TOPIC = st.text(
    alphabet=st.characters(exclude_categories=("Cs", "Cc"), exclude_characters="+#$"),
    min_size=1,
    max_size=40,
)


@given(
    messages=st.lists(st.tuples(_TOPIC, st.binary(max_size=300)), min_size=1, max_size=20),
    v5=st.booleans(),
)
def test_back_to_back_packets_round_trip(messages: list[tuple[str, bytes]], v5: bool) -> None:
    props = EXPIRY if v5 else None
    data = b"".join(encode_publish(topic_field(t), props, p) for t, p in messages)
    assert _decode(data, v5=v5) == [(t, props, p) for t, p in messages]


@pytest.mark.parametrize(
    "topic",
    [
        "",
        "a/+/b",
        "a/#",
        "#",
        "a\x00b",
        "a\nb",
        "a\x7fb",
        "a\x85b",
        "$SYS/broker",
        "a/\ud800",  # a lone surrogate is no UTF-8
        "x" * 65_536,
        "ü" * 32_768,  # 65,536 bytes
    ],
)
def test_unfit_topics_are_refused(topic: str) -> None:
    with pytest.raises(ValueError):
        topic_field(topic)
    fields = TopicFields()
    with pytest.raises(ValueError):
        fields(topic)
    with pytest.raises(ValueError):
        fields(topic)


def test_the_longest_topic_and_a_remembered_one() -> None:
    assert topic_field("x" * 65_535)[:2] == b"\xff\xff"
    fields = TopicFields(limit=2)
    first = fields("a/b")
    assert fields("a/b") is first
    fields("c")
    fields("d")  # over the limit: forgotten and made again, same bytes
    assert fields("a/b") == first == b"\x00\x03a/b"


# -- paho's private API ---------------------------------------------------------------


def test_paho_private_api_is_as_the_batches_expect() -> None:
    """If this fails, a paho release changed what qos0_batch relies on: telemetry would
    go one message at a time (slower, still correct). Re-check qos0_batch against the
    new paho before changing the pin in pyproject.toml."""
    assert qos0_batch._paho_problem() is None


async def test_a_changed_paho_falls_back_and_says_so_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def renamed() -> str:
        return "paho.mqtt.client.Client._packet_queue is missing"

    monkeypatch.setattr(qos0_batch, "paho_problem", renamed)
    monkeypatch.setattr(qos0_batch, "_said", set())
    client = aiomqtt.Client("127.0.0.1", 1)  # never connected
    with caplog.at_level(logging.WARNING, logger=qos0_batch.__name__):
        assert qos0_batches(client) is None
        assert qos0_batches(client) is None
    said = [r for r in caplog.records if "one message at a time" in r.getMessage()]
    assert len(said) == 1
    assert "_packet_queue is missing" in said[0].getMessage()


# -- a real broker --------------------------------------------------------------------


Received = tuple[str, bytes, int | None]


@contextlib.asynccontextmanager
async def pub_and_sub(
    broker: MosquittoBroker, protocol: aiomqtt.ProtocolVersion, expect: int
) -> AsyncIterator[tuple[aiomqtt.Client, asyncio.Task[list[Received]]]]:
    async with (
        aiomqtt.Client(broker.host, broker.port, protocol=protocol) as sub,
        aiomqtt.Client(broker.host, broker.port, protocol=protocol, timeout=30) as pub,
    ):
        await sub.subscribe("t/#", qos=0)

        async def collect() -> list[Received]:
            received: list[Received] = []
            async for msg in sub.messages:
                assert isinstance(msg.payload, bytes)
                expiry = getattr(msg.properties, "MessageExpiryInterval", None)
                received.append((str(msg.topic), msg.payload, expiry))
                if len(received) == expect:
                    break
            return received

        reader = asyncio.create_task(collect())
        try:
            yield pub, reader
        finally:
            if not reader.done():
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader


def count_calls(monkeypatch: pytest.MonkeyPatch, obj: Any, name: str) -> list[int]:
    calls: list[int] = []
    original: Callable[..., Any] = getattr(obj, name)

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(obj, name, counting)
    return calls


@pytest.mark.parametrize("protocol", [V5, V311], ids=["mqtt5", "mqtt311"])
async def test_a_batch_arrives_complete_in_order_byte_identical(
    mosquitto: MosquittoBroker,
    protocol: aiomqtt.ProtocolVersion,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    n = 500
    messages = [(f"t/{i % 7}/ü", b"%d:" % i + bytes(range(256)) * (i % 3)) for i in range(n)]
    v5 = protocol == V5
    async with pub_and_sub(mosquitto, protocol, n + 2) as (pub, reader):
        batches = qos0_batches(pub)
        assert batches is not None
        assert batches.v5 == v5
        paho = pub._client
        on_publish = count_calls(monkeypatch, paho, "on_publish")
        sends = count_calls(monkeypatch, paho, "_sock_send")
        paho._last_msg_out = 0.0
        mids = paho._last_mid
        props = EXPIRY if v5 else None
        written = batches.queue(encode_publish(topic_field(t), props, p) for t, p in messages)
        await batches.wait(written)
        assert len(on_publish) == 1  # one callback for the batch, not one per message
        assert 1 <= len(sends) < n
        assert paho._last_mid == mids % 65_535 + 1  # one mid for the batch
        batch_clock = paho._last_msg_out
        # paho's keepalive clock after a batch is what its own publish leaves: paho
        # 2.2.0's writer returns early when its queue is empty, so neither moves it
        # (it then pings every keepalive interval whatever is sent).
        paho._last_msg_out = 0.0
        queue_qos0(pub, "t/clock", b"x", None)
        await pub.publish("t/clock", b"y", qos=0)
        assert (paho._last_msg_out > 0.0) == (batch_clock > 0.0)
        received = await asyncio.wait_for(reader, 30)
    assert [(t, p) for t, p, _ in received[:n]] == messages
    assert {e for _, _, e in received[:n]} == ({60} if v5 else {None})


async def test_a_batch_bigger_than_the_socket_buffer_arrives_whole(
    mosquitto: MosquittoBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """2 MB in one out-packet: paho writes what the socket takes and keeps its place."""
    n, size = 200, 10_000
    messages = [(f"t/{i}", bytes([i % 256]) * size) for i in range(n)]
    async with pub_and_sub(mosquitto, V5, n) as (pub, reader):
        batches = qos0_batches(pub)
        assert batches is not None
        sock = pub._client.socket()
        assert isinstance(sock, socket.socket)
        # Loopback would take the 2 MB at once: a small send buffer, as a slow link has.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32_768)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < 2_000_000
        sends = count_calls(monkeypatch, pub._client, "_sock_send")
        written = batches.queue(encode_publish(topic_field(t), EXPIRY, p) for t, p in messages)
        assert not written.done()  # written by aiomqtt's writer callback, on the loop
        await batches.wait(written)
        received = await asyncio.wait_for(reader, 60)
        assert len(sends) > 1  # the socket took it in parts
    assert [(t, p) for t, p, _ in received] == messages
    assert {e for _, _, e in received} == {60}


async def test_not_connected_raises_as_aiomqtt_does(mosquitto: MosquittoBroker) -> None:
    client = aiomqtt.Client(mosquitto.host, mosquitto.port)
    async with client:
        batches = qos0_batches(client)
        assert batches is not None
    with pytest.raises(aiomqtt.MqttCodeError) as raised:
        batches.queue([encode_publish(topic_field("t/x"), None, b"1")])
    assert raised.value.rc == paho_client.MQTT_ERR_NO_CONN
    assert not client._client._out_packet  # nothing was queued


async def test_a_batch_never_takes_the_mid_of_a_qos1_message_in_flight(
    mosquitto: MosquittoBroker,
) -> None:
    """paho's numbers wrap: the batch's on_publish must not complete a QoS 1 publish."""
    async with aiomqtt.Client(mosquitto.host, mosquitto.port) as pub:
        batches = qos0_batches(pub)
        assert batches is not None
        paho = pub._client
        taken = paho._last_mid % 65_535 + 1  # the number the batch would get next
        paho._out_messages[taken] = paho_client.MQTTMessage(taken, b"t/q")
        waiting = asyncio.Event()
        pub._pending_publishes[taken] = waiting  # as aiomqtt's publish waits for a PUBACK
        try:
            await batches.wait(batches.queue([encode_publish(topic_field("t/x"), None, b"1")]))
            assert paho._last_mid == taken % 65_535 + 1
            assert not waiting.is_set()
        finally:
            del paho._out_messages[taken]
            pub._pending_publishes.pop(taken, None)


# -- through the publisher ------------------------------------------------------------


def _tele(i: int) -> Telemetry:
    return Telemetry(
        gateway_id="gw-1",
        device_id=f"neb-{i:03d}",
        utc=UTC_NOW,
        state="nebulizing",
        session_no=i,
        elapsed_s=float(i),
    )


@pytest.mark.parametrize(
    ("protocol", "batched"),
    [("5", True), ("3.1.1", True), ("5", False)],
    ids=["mqtt5", "mqtt311", "mqtt5-fallback"],
)
async def test_the_publisher_sends_telemetry_in_order_with_its_expiry(
    mosquitto: MosquittoBroker,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    protocol: Literal["5", "3.1.1"],
    batched: bool,
) -> None:
    if not batched:
        monkeypatch.setattr(qos0_batch, "paho_problem", lambda: "pretend paho changed")
    n = 3 * TELEMETRY_BATCH + 17  # several batches
    store = Store(tmp_path / "s.sqlite3")
    pub = MqttPublisher(
        BrokerSettings(host=mosquitto.host, port=mosquitto.port),
        client_id="batch-test",
        clock=SystemClock(),
        store=store,
        status_topic="devicegw/v2/s/g/status",
        status_payload=lambda online: b'{"online":%s}' % (b"true" if online else b"false"),
        protocol=protocol,
        telemetry_buffer=n,
    )
    version = V5 if protocol == "5" else V311
    async with pub_and_sub(mosquitto, version, n) as (_, reader):
        task = asyncio.create_task(pub.run())
        try:
            async with asyncio.timeout(30):
                await pub.connected.wait()
            for i in range(n):
                pub.publish_telemetry(f"t/tele/neb-{i % 5}", _tele(i))
            received = await asyncio.wait_for(reader, 30)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            store.close()
    assert [t for t, _, _ in received] == [f"t/tele/neb-{i % 5}" for i in range(n)]
    bodies = [json.loads(p) for _, p, _ in received]
    assert [b["session_no"] for b in bodies] == list(range(n))
    assert [b["delivery"]["seq"] for b in bodies] == list(range(1, n + 1))  # birth is 0
    assert {b["delivery"]["birth_seq"] for b in bodies} == {pub.stats.birth_seq}
    assert {e for _, _, e in received} == ({60} if protocol == "5" else {None})
    assert pub.stats.telemetry_published == n
    assert pub.stats.telemetry_dropped == 0


async def test_an_unfit_topic_is_dropped_and_the_batch_goes_on(
    mosquitto: MosquittoBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = Store(tmp_path / "s.sqlite3")
    pub = MqttPublisher(
        BrokerSettings(host=mosquitto.host, port=mosquitto.port),
        client_id="batch-unfit",
        clock=SystemClock(),
        store=store,
        status_topic="devicegw/v2/s/g/status",
        status_payload=lambda online: b"{}",
    )
    async with pub_and_sub(mosquitto, V5, 2) as (_, reader):
        task = asyncio.create_task(pub.run())
        try:
            async with asyncio.timeout(30):
                await pub.connected.wait()
            pub.publish_telemetry("t/a", _tele(1))
            pub.publish_telemetry("t/+/wild", _tele(2))
            pub.publish_telemetry("t/b", _tele(3))
            received = await asyncio.wait_for(reader, 30)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            store.close()
    assert [t for t, _, _ in received] == ["t/a", "t/b"]
    assert pub.stats.telemetry_dropped == 1
    assert any("unfit topic" in r.getMessage() for r in caplog.records)
