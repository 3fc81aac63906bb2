"""Broker credentials from the config's password source, against a real Mosquitto
that refuses anonymous clients."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from devicegw.config import parse_config
from devicegw.runtime.gateway import Gateway
from drivers.clock import ScaledClock
from tests.mqtt_helpers import MosquittoBroker, collecting, mosquitto_binary, require


@pytest.fixture
def auth_broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    require(mosquitto_binary() is not None, "mosquitto is not installed")
    require(shutil.which("mosquitto_passwd") is not None, "mosquitto_passwd is not installed")
    broker = MosquittoBroker(workdir=tmp_path, users={"gw": "right-pw", "edc": "edc-pw"})
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def gateway(broker: MosquittoBroker, tmp_path: Path, password: str) -> Gateway:
    pw = tmp_path / "mqtt.pass"
    pw.write_text(password + "\n")
    config = parse_config(
        {
            "gateway": {"id": "gw-auth", "site": "s1", "data_dir": str(tmp_path / "data")},
            "broker": {
                "host": broker.host,
                "port": broker.port,
                "username": "gw",
                "password_file": str(pw),
                "reconnect_initial_s": 0.1,
                "reconnect_max_s": 0.5,
            },
        }
    )
    return Gateway(config, clock=ScaledClock(1.0))


async def test_password_login_publishes_birth(auth_broker: MosquittoBroker, tmp_path: Path) -> None:
    gw = gateway(auth_broker, tmp_path, "right-pw")
    async with collecting(
        auth_broker.host, auth_broker.port, ["devicegw/v2/#"], username="edc", password="edc-pw"
    ) as col:
        task = asyncio.create_task(gw.run())
        try:
            await col.wait_for(lambda m: any(x.topic.endswith("gw-auth/status") for x in m), 10)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    assert col.messages[0].json()["online"] is True


async def test_wrong_password_is_reported_and_retried(
    auth_broker: MosquittoBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gw = gateway(auth_broker, tmp_path, "wrong-pw")
    caplog.set_level(logging.DEBUG, logger="devicegw")
    task = asyncio.create_task(gw.run())
    try:
        for _ in range(100):
            if gw.publisher.stats.connect_failures >= 3:
                break
            await asyncio.sleep(0.05)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    stats = gw.publisher.stats
    assert stats.connect_failures >= 3  # keeps retrying, does not crash
    assert stats.connects == 0
    assert stats.last_error is not None
    assert "authori" in stats.last_error.lower() or "password" in stats.last_error.lower()
    text = caplog.text
    assert "wrong-pw" not in text  # secrets never logged
    assert "broker connection failed" in text
