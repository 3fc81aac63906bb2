from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mqtt_helpers import MosquittoBroker, mosquitto_binary, require


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A real Mosquitto on a free loopback port, private to the test."""
    require(mosquitto_binary() is not None, "mosquitto is not installed")
    broker = MosquittoBroker(workdir=tmp_path)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
