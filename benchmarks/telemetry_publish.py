"""Telemetry through ``MqttPublisher`` to a private Mosquitto: the publisher's CPU per message.

A micro-benchmark for issue 13 (paho's per-message path): N telemetry messages are
handed to ``publish_telemetry`` in groups (as beds tick), the publisher writes them to
a private broker (never the machine's 1883; nothing subscribes), and the process's
CPU time (``time.process_time``) from the first message until paho's queue is empty
is printed with the number of ``send()`` calls and ``on_publish`` callbacks.

For a count that machine load does not change, run it under callgrind twice and
subtract (start-up is most of a short run)::

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        .venv/bin/python benchmarks/telemetry_publish.py -n 10000   # "Collected : N"
    valgrind ... benchmarks/telemetry_publish.py -n 0
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiomqtt  # noqa: E402

import devicegw  # noqa: E402
from devicegw.config import BrokerSettings  # noqa: E402
from devicegw.contract.payloads import Telemetry, TelemetryDetail  # noqa: E402
from devicegw.contract.topics import Topics  # noqa: E402
from devicegw.mqtt.publisher import MqttPublisher  # noqa: E402
from devicegw.storage.store import Store  # noqa: E402
from drivers.clock import SystemClock  # noqa: E402
from tests.mqtt_helpers import MosquittoBroker  # noqa: E402


async def run(n: int, group: int, tmp: Path) -> None:
    broker = MosquittoBroker(workdir=tmp, extra_conf="set_tcp_nodelay true\n")
    broker.start()
    clients: list[aiomqtt.Client] = []
    make = MqttPublisher._make_client

    def keep(self: MqttPublisher, birth_seq: int) -> aiomqtt.Client:
        clients.append(make(self, birth_seq))
        return clients[-1]

    MqttPublisher._make_client = keep  # type: ignore[method-assign]
    store = Store(tmp / "s.sqlite3")
    pub = MqttPublisher(
        BrokerSettings(host=broker.host, port=broker.port),
        client_id="bench",
        clock=SystemClock(),
        store=store,
        status_topic="devicegw/v2/site/gw/status",
        status_payload=lambda online: b'{"online":%s}' % (b"true" if online else b"false"),
    )
    topics = Topics("devicegw/v2", "site-1", "gw-1")
    beds = [f"neb-{i:03d}" for i in range(500)]
    now = datetime.now(UTC)
    # One tick of each bed: a blinded telemetry and its restricted detail.
    ticks = [
        (
            (
                topics.telemetry(b),
                Telemetry(
                    gateway_id="gw-1",
                    device_id=b,
                    utc=now,
                    state="nebulizing",
                    session_no=1,
                    elapsed_s=12.5,
                ),
            ),
            (
                topics.telemetry_detail(b),
                TelemetryDetail(
                    gateway_id="gw-1",
                    device_id=b,
                    utc=now,
                    session_no=1,
                    rate_ul_min=900,
                    delivered_ml=0.25,
                    reservoir_ml=2.75,
                    battery_pct=80,
                ),
            ),
        )
        for b in beds
    ]
    task = asyncio.create_task(pub.run())
    try:
        await asyncio.wait_for(pub.connected.wait(), 30)
        paho = clients[-1]._client
        sends = on_publish = 0
        send, callback = paho._sock_send, paho.on_publish
        assert callback is not None

        def counting_send(buf: bytes | bytearray) -> int:
            nonlocal sends
            sends += 1
            return send(buf)

        def counting_callback(*args: Any) -> None:
            nonlocal on_publish
            on_publish += 1
            callback(*args)

        paho._sock_send = counting_send  # type: ignore[method-assign]
        paho.on_publish = counting_callback
        cpu0, wall0 = time.process_time(), time.perf_counter()
        sent = 0
        while sent < n:
            for _ in range(group // 2):
                (t1, m1), (t2, m2) = ticks[(sent // 2) % len(ticks)]
                pub.publish_telemetry(t1, m1)
                pub.publish_telemetry(t2, m2)
                sent += 2
            await asyncio.sleep(0)
            await asyncio.sleep(0)
        while pub.stats.telemetry_published < sent or paho._out_packet:  # noqa: ASYNC110
            await asyncio.sleep(0.001)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        print(
            f"code {Path(devicegw.__file__).parent.parent}: {sent} messages, "
            f"dropped {pub.stats.telemetry_dropped}, send() {sends}, on_publish {on_publish}; "
            f"CPU {cpu:.3f} s ({1e6 * cpu / max(sent, 1):.1f} us/message), wall {wall:.3f} s"
        )
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        store.close()
        broker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=50_000, help="messages (default 50,000)")
    parser.add_argument("--group", type=int, default=20, help="messages per loop turn")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="telepub-") as tmp:
        asyncio.run(run(args.n, args.group, Path(tmp)))


if __name__ == "__main__":
    main()
