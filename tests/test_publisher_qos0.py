"""Telemetry's fast path (issue 13): queued straight on paho, stamped without a JSON round trip.

``queue_qos0`` relies on aiomqtt's private ``Client._client`` (pyproject pins aiomqtt
below 3): if a release renames it, the broker test here fails, not the ward.
``stamp_fresh`` must give what ``stamp`` gives, JSON for JSON, for every payload shape
we publish, and fall back to ``stamp`` for anything else.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from datetime import UTC, datetime
from pathlib import Path

import aiomqtt
import paho.mqtt.client
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from devicegw.config import BrokerSettings
from devicegw.contract.payloads import Telemetry, TelemetryDetail
from devicegw.mqtt.publisher import (
    MqttPublisher,
    encode,
    fixed_properties,
    no_delay,
    queue_qos0,
    stamp,
    stamp_fresh,
)
from devicegw.storage.store import Store
from drivers.clock import SystemClock
from tests.mqtt_helpers import MosquittoBroker

UTC_NOW = datetime(2026, 11, 29, 7, 30, 1, 250000, tzinfo=UTC)


def telemetry(device_id: str = "neb-001") -> Telemetry:
    return Telemetry(
        gateway_id="gw-1",
        device_id=device_id,
        utc=UTC_NOW,
        state="nebulizing",
        session_no=42,
        elapsed_s=12.5,
    )


def detail() -> TelemetryDetail:
    return TelemetryDetail(
        gateway_id="gw-1",
        device_id="neb-001",
        utc=UTC_NOW,
        session_no=None,
        rate_ul_min=900,
        delivered_ml=1e-7,
        reservoir_ml=2.75,
        battery_pct=None,
    )


@pytest.mark.parametrize(
    "payload",
    [
        telemetry(),
        detail(),
        # A device id that looks like the marker the fast path splits on.
        telemetry(device_id='x,"delivery":null,y'),
        telemetry(device_id="Bett-ü-7"),
    ],
)
def test_stamp_fresh_gives_what_stamp_gives(payload: Telemetry | TelemetryDetail) -> None:
    body = encode(payload)
    fast = stamp_fresh(body, birth_seq=7, seq=123_456)
    assert json.loads(fast) == json.loads(stamp(body, birth_seq=7, seq=123_456))
    decoded = json.loads(fast)
    assert list(decoded)[:3] == ["schema_version", "event_type", "delivery"]
    assert decoded["delivery"] == {"birth_seq": 7, "seq": 123_456, "redelivery": 0}
    assert type(payload).model_validate_json(fast).delivery is not None


@pytest.mark.parametrize(
    "body",
    [
        b'{"event_type":"telemetry","delivery":null,"x":1}',  # not our models' opening
        b'{"schema_version":"2.0","a":1,"b":2,"delivery":null,"x":1}',
        b'{"schema_version":"2.0","event_type":"telemetry","delivery":{"seq":1},"x":1}',
    ],
)
def test_stamp_fresh_falls_back_for_other_shapes(body: bytes) -> None:
    assert stamp_fresh(body, birth_seq=1, seq=2) == stamp(body, birth_seq=1, seq=2)


def test_fixed_properties_are_packed_once_as_paho_packs_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    plain = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    plain.MessageExpiryInterval = 60
    fixed = fixed_properties(expiry_s=60)
    assert fixed.pack() == plain.pack()  # type: ignore[no-untyped-call]
    assert fixed.MessageExpiryInterval == 60

    def refuse(self: Properties) -> bytes:
        raise AssertionError("packed again")

    monkeypatch.setattr(Properties, "pack", refuse)
    assert fixed.pack() == b"\x05\x02\x00\x00\x00<"  # length 5, expiry (2) = 60


async def test_queue_qos0_reaches_a_real_broker_in_order(mosquitto: MosquittoBroker) -> None:
    props = fixed_properties(expiry_s=60)  # what the publisher's telemetry carries
    received: list[tuple[str, bytes, int | None]] = []
    async with (
        aiomqtt.Client(mosquitto.host, mosquitto.port, protocol=aiomqtt.ProtocolVersion.V5) as sub,
        aiomqtt.Client(mosquitto.host, mosquitto.port, protocol=aiomqtt.ProtocolVersion.V5) as pub,
    ):
        assert isinstance(pub._client, paho.mqtt.client.Client)
        await sub.subscribe("t/#", qos=0)

        async def collect() -> None:
            async for msg in sub.messages:
                expiry = getattr(msg.properties, "MessageExpiryInterval", None)
                assert isinstance(msg.payload, bytes)
                received.append((str(msg.topic), msg.payload, expiry))
                if len(received) == 300:
                    return

        reader = asyncio.create_task(collect())
        for i in range(300):
            queue_qos0(pub, f"t/{i % 3}", b"%d" % i, props)
        await asyncio.wait_for(reader, 30)
    assert [int(p) for _, p, _ in received] == list(range(300))
    assert {t for t, _, _ in received} == {"t/0", "t/1", "t/2"}
    assert {e for _, _, e in received} == {60}


async def test_queue_qos0_raises_as_aiomqtt_does_when_not_connected(
    mosquitto: MosquittoBroker,
) -> None:
    client = aiomqtt.Client(mosquitto.host, mosquitto.port)
    async with client:
        pass
    with pytest.raises(aiomqtt.MqttCodeError):
        queue_qos0(client, "t/x", b"1", None)


async def test_no_delay_turns_nagle_off_on_the_broker_connection(
    mosquitto: MosquittoBroker,
) -> None:
    async with aiomqtt.Client(mosquitto.host, mosquitto.port) as client:
        sock = client._client.socket()
        assert isinstance(sock, socket.socket)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0  # paho's default
        no_delay(client)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


async def test_the_publisher_connects_without_nagle_delay(
    mosquitto: MosquittoBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nagle held a small QoS 0 packet until the broker's delayed ACK (up to ~40 ms)."""
    clients: list[aiomqtt.Client] = []
    make = MqttPublisher._make_client

    def keep(self: MqttPublisher, birth_seq: int) -> aiomqtt.Client:
        clients.append(make(self, birth_seq))
        return clients[-1]

    monkeypatch.setattr(MqttPublisher, "_make_client", keep)
    store = Store(tmp_path / "s.sqlite3")
    pub = MqttPublisher(
        BrokerSettings(host=mosquitto.host, port=mosquitto.port),
        client_id="nodelay-test",
        clock=SystemClock(),
        store=store,
        status_topic="devicegw/v2/s/g/status",
        status_payload=lambda online: b'{"online":%s}' % (b"true" if online else b"false"),
    )
    task = asyncio.create_task(pub.run())
    try:
        async with asyncio.timeout(30):
            await pub.connected.wait()
        sock = clients[-1]._client.socket()
        assert isinstance(sock, socket.socket)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        store.close()
