"""Issue 14 item 10: ``birth_seq`` grows on every successful connection, not every attempt.

docs/mqtt.md: a failed attempt uses no number, so after any outage the next birth is
exactly one higher than the last. A real Mosquitto, started only after the publisher
has failed to connect to its (free, loopback) port several times.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

from devicegw.config import BrokerSettings
from devicegw.mqtt.publisher import MqttPublisher
from devicegw.storage.store import Store
from drivers.clock import SystemClock
from tests.mqtt_helpers import MosquittoBroker, mosquitto_binary, require


async def test_failed_attempts_use_no_birth_seq(tmp_path: Path) -> None:
    require(mosquitto_binary() is not None, "mosquitto is not installed")
    broker = MosquittoBroker(workdir=tmp_path)  # not started yet: its port refuses
    settings = BrokerSettings(
        port=broker.port, reconnect_initial_s=0.05, reconnect_max_s=0.1, protocol="3.1.1"
    )
    store = Store(tmp_path / "gw.sqlite3")
    births: list[int] = []

    def status(online: bool) -> bytes:
        return json.dumps({"event_type": "gateway_status", "online": online}).encode()

    async def one_run() -> None:
        pub = MqttPublisher(
            settings,
            client_id="birth-test",
            clock=SystemClock(),
            store=store,
            status_topic="devicegw/v2/s/g/status",
            status_payload=status,
        )
        task = asyncio.create_task(pub.run())
        try:
            if not births:  # the first run: several refused attempts, then the broker appears
                async with asyncio.timeout(60):
                    while pub.stats.connect_failures < 5:  # noqa: ASYNC110 - polling a counter
                        await asyncio.sleep(0.02)
                assert pub.stats.birth_seq == 0
                broker.start()
            async with asyncio.timeout(60):
                await pub.connected.wait()
            births.append(pub.stats.birth_seq)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    try:
        await one_run()
        await one_run()  # a restart: persisted, one higher
    finally:
        broker.stop()
        store.close()
    assert births == [1, 2]
    with Store(tmp_path / "gw.sqlite3") as again:
        assert again.get_meta("birth_seq") == "2"
