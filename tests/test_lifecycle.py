"""The gateway's lifecycle on the wire: birth, death, rebirth; and a clean run checked whole.

Issue "MQTT contract": kill the gateway (SIGKILL), the broker publishes its
death (the last will: online false, the same ``birth_seq``); a restart gives a
new birth with a higher ``birth_seq``; a clean stop (SIGTERM) publishes the
offline status itself. And everything a gateway publishes during an end-to-end
run validates against its schema with no ``seq`` gaps within a birth.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from devicegw.contract.vocabulary import PAYLOAD_FEED, Feed, PayloadKind
from devicegw.edc.tail import TailProcessor
from tests.e2e_harness import running
from tests.mqtt_helpers import Collector, MosquittoBroker, Received, collecting
from tests.process_harness import kill9, start_gateway, stop

pytestmark = pytest.mark.e2e

STATUS_TOPIC = "devicegw/v2/+/+/status"  # gateway statuses only (device statuses are deeper)
GATEWAY_STATUS = "devicegw/v2/s1/gw-life/status"
# The keepalive is 30 s: a will within this proves it came from the closed socket.
PROMPT_S = 10.0


def write_config(path: Path, *, broker_port: int, data_dir: Path) -> Path:
    """A gateway with no devices: valid, and all it publishes is its own status."""
    path.write_text(
        f'[gateway]\nid = "gw-life"\nsite = "s1"\ndata_dir = "{data_dir}"\n'
        f'[broker]\nhost = "127.0.0.1"\nport = {broker_port}\n'
        "reconnect_initial_s = 0.2\nreconnect_max_s = 1.0\n"
    )
    return path


def statuses(col: Collector) -> list[dict[str, Any]]:
    return [m.json() for m in col.messages if m.topic == GATEWAY_STATUS]


async def next_status(col: Collector, *, online: bool, after: int, timeout: float = 30) -> Any:
    """The first gateway status with ``online`` among the messages from index ``after`` on."""

    def found(msgs: list[Received]) -> bool:
        return any(m.topic == GATEWAY_STATUS and m.json()["online"] is online for m in msgs[after:])

    await col.wait_for(found, timeout)
    return next(
        m.json()
        for m in col.messages[after:]
        if m.topic == GATEWAY_STATUS and m.json()["online"] is online
    )


async def retained_status(broker: MosquittoBroker) -> tuple[dict[str, Any], bool]:
    """What a subscriber arriving now is given: the broker's retained gateway status."""
    async with collecting(broker.host, broker.port, [STATUS_TOPIC]) as fresh:
        await fresh.wait_for(lambda m: len(m) >= 1, 10)
        first = fresh.messages[0]
        return first.json(), first.retain


def log_tail(log: Path) -> str:
    return log.read_text(errors="replace")[-4000:] if log.exists() else "(no log)"


@contextlib.asynccontextmanager
async def gateway_process(config: Path, log: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    proc = await start_gateway(config, 1.0, log)
    try:
        yield proc
    except BaseException:
        print(log_tail(log))  # the gateway's own account, with the failure
        raise
    finally:
        await stop(proc)


async def test_sigkill_gives_a_death_and_a_restart_a_higher_birth(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path / "gw.toml", broker_port=mosquitto.port, data_dir=tmp_path / "d")
    async with collecting(mosquitto.host, mosquitto.port, [STATUS_TOPIC]) as col:
        async with gateway_process(cfg, tmp_path / "gw1.log") as gw:
            birth = await next_status(col, online=True, after=0)
            b = birth["delivery"]["birth_seq"]
            assert b >= 1
            assert birth["delivery"] == {"birth_seq": b, "seq": 0, "redelivery": 0}
            assert birth["gateway_id"] == "gw-life"
            assert birth["devices"] == []
            assert birth["since_utc"] is not None
            # The birth is retained: a late subscriber is told the gateway is online.
            retained, flag = await retained_status(mosquitto)
            assert flag is True
            assert retained == birth

            seen = len(col.messages)
            kill9(gw)
            killed = time.monotonic()
            await gw.wait()
            assert gw.returncode == -signal.SIGKILL
            death = await next_status(col, online=False, after=seen, timeout=PROMPT_S)
            waited = time.monotonic() - killed
        # The broker published the last will: offline, the same birth, stamped at connect.
        assert death["delivery"] == {"birth_seq": b, "seq": 0, "redelivery": 0}
        assert death["gateway_id"] == "gw-life"
        assert death["since_utc"] is None
        assert waited < PROMPT_S
        retained, flag = await retained_status(mosquitto)
        assert flag is True
        assert retained == death

        seen = len(col.messages)
        async with gateway_process(cfg, tmp_path / "gw2.log"):
            rebirth = await next_status(col, online=True, after=seen)
            assert rebirth["delivery"]["birth_seq"] > b
            assert rebirth["delivery"]["seq"] == 0
            retained, _ = await retained_status(mosquitto)
            assert retained == rebirth
    onlines = [s["delivery"]["birth_seq"] for s in statuses(col) if s["online"]]
    assert onlines == sorted(set(onlines)), "each birth once, in increasing order"


async def test_clean_stop_publishes_offline_itself(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path / "gw.toml", broker_port=mosquitto.port, data_dir=tmp_path / "d")
    async with collecting(mosquitto.host, mosquitto.port, [STATUS_TOPIC]) as col:
        async with gateway_process(cfg, tmp_path / "gw.log") as gw:
            birth = await next_status(col, online=True, after=0)
            b = birth["delivery"]["birth_seq"]
            seen = len(col.messages)
            await stop(gw, signal.SIGTERM)
            assert gw.returncode == 0
            goodbye = await next_status(col, online=False, after=seen, timeout=PROMPT_S)
        await asyncio.sleep(1.0)  # a will, if the broker (wrongly) sent one too, would be here
        offline = [s for s in statuses(col)[1:] if not s["online"]]
    # Sent by the gateway: the next seq of its birth, not the will's seq 0.
    assert goodbye["delivery"]["birth_seq"] == b
    assert goodbye["delivery"]["seq"] >= 1
    assert goodbye["since_utc"] is None
    # A clean DISCONNECT discards the will: exactly one offline status.
    assert offline == [goodbye]
    retained, flag = await retained_status(mosquitto)
    assert flag is True
    assert retained == goodbye


def check_all(
    messages: list[Received],
) -> tuple[list[str], list[str], dict[tuple[int, str], list[int]]]:
    """Every message through the tail's contract checks: errors, seq notes, and the seqs
    per (birth, feed): the blinded and the restricted feed are numbered apart."""
    processor = TailProcessor()
    errors: list[str] = []
    notes: list[str] = []
    seqs: dict[tuple[int, str], list[int]] = {}
    for m in messages:
        result = processor.process(m.topic, m.payload, m.retain, m.qos)
        errors += [f"{m.topic}: {e}" for e in result.errors]
        notes += [f"{m.topic}: {w}" for w in result.warnings]
        payload = json.loads(m.payload)
        delivery = payload.get("delivery")
        assert delivery is not None, f"{m.topic}: published without delivery metadata"
        if not m.retain:
            feed = PAYLOAD_FEED[PayloadKind(payload["event_type"])]
            seqs.setdefault((delivery["birth_seq"], feed), []).append(delivery["seq"])
    return errors, notes, seqs


@pytest.mark.parametrize(
    "scenarios",
    [["complete"], ["pause_2min"], ["complete", "pause_2min"]],
    ids=["complete", "pause_2min", "both"],
)
async def test_every_message_of_a_run_is_valid_and_gapless(
    mosquitto: MosquittoBroker, tmp_path: Path, scenarios: list[str]
) -> None:
    async with running(mosquitto, tmp_path, scenarios) as e2e:
        await e2e.wait_dose_events(len(scenarios))
        for sim in e2e.sims:
            await asyncio.wait_for(sim.wait_until_idle(), 30)
        stats = e2e.gateway.publisher.stats

        def published() -> int:  # the birth, the outbox rows acked, the telemetry sent
            return (
                1
                + stats.statuses_published
                + stats.dose_events_published
                + stats.dose_details_published
                + stats.telemetry_published
            )

        await asyncio.sleep(0.5)
        await e2e.collector.wait_for(lambda msgs: len(msgs) >= published(), 10)
        messages = list(e2e.collector.messages)
        sent = published()
        base = e2e.topics.base
    assert all(m.topic.startswith(f"{base}/") for m in messages)
    kinds = {json.loads(m.payload)["event_type"] for m in messages}
    assert kinds == {
        "gateway_status",
        "device_status",
        "telemetry",
        "dose_completion",
        # the restricted feed (docs/blinding.md)
        "device_detail",
        "telemetry_detail",
        "dose_detail",
    }

    errors, notes, seqs = check_all(messages)
    assert errors == []
    # Telemetry (QoS 0) may legitimately be dropped under pressure; not in this light run.
    assert stats.telemetry_dropped == 0
    assert notes == []
    # One connection, and on each feed every seq from 0 up, each once, in order.
    assert sorted(seqs) == [(stats.birth_seq, Feed.BLINDED), (stats.birth_seq, Feed.RESTRICTED)]
    for received in seqs.values():
        assert received == list(range(len(received)))
    assert sum(map(len, seqs.values())) == sent  # nothing lost at the end either
