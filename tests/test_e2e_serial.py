"""End to end: simulator on a real pty -> gateway -> real Mosquitto -> subscriber.

Nothing is mocked: the simulator speaks the ICD's bytes over a pseudo-terminal,
the gateway opens it with pyserial like a real port, and the test subscribes
to the broker as the EDC would.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from devicegw.contract.payloads import DoseDetail, DoseEvent, dose_event_id
from tests.e2e_harness import running
from tests.mqtt_helpers import MosquittoBroker

pytestmark = pytest.mark.e2e

ARM_WORDS = ("arm", "exosome", "saline", "placebo", "sham", "treatment", "active")


async def one_event(
    mosquitto: MosquittoBroker, tmp_path: Path, scenario: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The blinded dose event and its restricted detail."""
    async with running(mosquitto, tmp_path, [scenario]) as e2e:
        [event] = await e2e.wait_dose_events(1)
        detail = await e2e.detail_of(event)
        # Wait for the device to settle and make sure no second event follows.
        await asyncio.wait_for(e2e.sims[0].wait_until_idle(), 30)
        await asyncio.sleep(0.5)
        assert len(e2e.dose_events()) == 1
        DoseEvent.model_validate(event)  # the wire JSON is a valid payload
        DoseDetail.model_validate(detail)
        return event, detail


async def test_complete_session(mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    event, detail = await one_event(mosquitto, tmp_path, "complete")
    assert event["verdict"] == "complete"
    assert event["reasons"] == []
    assert event["session_no"] == 42
    assert event["subject_id"] == "CVD-042-0001"
    assert event["kit_number"] == "K-10001"
    assert event["device"]["serial_no"] == "VM1-000123"
    assert event["device"]["firmware"] == "1.4.2"
    assert uuid.UUID(event["event_id"]) == dose_event_id("VM-1", "VM1-000123", 42)
    assert event["volume"]["delivered_fraction"] >= 0.9
    assert event["times"]["duration_s"] == pytest.approx(438, abs=5)
    assert event["times"]["device_start_utc"] is not None  # the gateway set the device clock
    assert detail["end_reason"] == "COMPLETE"
    vol = detail["volume"]
    assert vol["fill_ml"] == pytest.approx(3.0, abs=0.1)
    assert vol["reservoir_drop_ml"] == pytest.approx(2.895, abs=0.15)
    assert vol["output_integral_ml"] == pytest.approx(2.98, abs=0.15)
    assert vol["estimates_agree"] is True
    assert vol["delivered_ml"] == event["volume"]["delivered_ml"]
    assert detail["rate"]["samples"] > 4000
    assert detail["rate"]["mean_ul_min"] == pytest.approx(400, rel=0.1)
    assert detail["link"]["bad_frames"] == 0
    assert detail["link"]["frames_lost"] == 0
    assert detail["link"]["sample_count"] > 4000  # 10 Hz for ~7 minutes


async def test_event_never_names_the_arm(mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    event, detail = await one_event(mosquitto, tmp_path, "complete")
    keys: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                keys.append(k.lower())
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(event)
    walk(detail)
    text = (json.dumps(event) + json.dumps(detail)).lower()
    for word in ARM_WORDS:
        assert not any(word == k or k.startswith(word + "_") for k in keys), word
        assert f'"{word}"' not in text, word


async def test_user_stop_at_half_is_partial(mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    event, detail = await one_event(mosquitto, tmp_path, "user_stop_half")
    assert event["verdict"] == "partial"
    assert detail["end_reason"] == "USER_STOP"
    assert "ended_by_user" in event["reasons"]
    assert "delivered_below_minimum" in event["reasons"]
    assert event["volume"]["delivered_fraction"] == pytest.approx(0.5, abs=0.1)


async def test_two_minute_pause_is_recorded(mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    event, detail = await one_event(mosquitto, tmp_path, "pause_2min")
    assert event["verdict"] == "complete"
    assert "pauses" not in event  # pause detail is restricted (docs/blinding.md)
    assert detail["pauses"]["count"] == 1
    assert detail["pauses"]["total_s"] == pytest.approx(120, abs=2)
    assert detail["times"]["duration_s"] - detail["times"]["nebulizing_s"] == pytest.approx(
        120, abs=3
    )


async def test_corrupted_bytes_are_counted_and_verdict_holds(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    async with running(mosquitto, tmp_path, ["corrupt_bytes"]) as e2e:
        [event] = await e2e.wait_dose_events(1)
        detail = await e2e.detail_of(event)
        sim = e2e.sims[0]
        runner = e2e.gateway.runners[0]
        assert sim.counters.garbage_bytes_injected + sim.counters.frames_corrupted > 0
    assert event["verdict"] == "complete"
    assert detail["link"]["bad_frames"] > 0
    assert runner.health.frames_bad >= detail["link"]["bad_frames"]
    # Lost OUTPUT frames are bridged; the volume estimates still agree.
    assert detail["volume"]["estimates_agree"] is True


async def test_link_drop_mid_session_reconnects(mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    async with running(mosquitto, tmp_path, ["link_drop"]) as e2e:
        [event] = await e2e.wait_dose_events(1)
        detail = await e2e.detail_of(event)
        await asyncio.wait_for(e2e.sims[0].wait_until_idle(), 30)
        await asyncio.sleep(0.5)
        assert len(e2e.dose_events()) == 1
        runner = e2e.gateway.runners[0]
        assert runner.health.connects >= 2
        statuses = [m.json() for m in e2e.collector.matching("/device/neb-bed01/status")]
    # The drop was seen and reported, never hidden; the dose is still right.
    assert detail["link"]["interruptions"] >= 1
    assert detail["link"]["down_s"] > 5
    assert "link_interrupted" in detail["reasons"]
    assert "link_interrupted" not in event["reasons"]  # link detail is restricted
    assert event["verdict"] == "complete"
    assert event["volume"]["delivered_fraction"] >= 0.9
    assert any(s["connected"] is False for s in statuses)
    assert statuses[-1]["connected"] is True


async def test_missing_port_does_not_stop_other_devices(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-port"
    extra = [
        {
            "id": "neb-ghost",
            "type": "vm1",
            "bed": "B99",
            "subject_id": "CVD-042-0099",
            "kit_number": "K-19999",
            "link": {"kind": "serial", "port": str(missing)},
        }
    ]
    async with running(mosquitto, tmp_path, ["complete"], extra_devices=extra) as e2e:
        [event] = await e2e.wait_dose_events(1)
        ghost = [m.json() for m in e2e.collector.matching("/device/neb-ghost/status")]
    assert event["verdict"] == "complete"
    assert ghost, "the missing device's status was published"
    assert ghost[-1]["connected"] is False
    assert "does not exist" in ghost[-1]["error"]


async def test_unexpected_serial_is_refused(mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    async with running(
        mosquitto, tmp_path, ["complete"], device_extra={"expected_serial": "VM1-999999"}
    ) as e2e:
        await e2e.collector.wait_for(
            lambda msgs: any(
                "/device/neb-bed01/status" in m.topic and (m.json().get("error") or "")
                for m in msgs
            ),
            30,
        )
        runner = e2e.gateway.runners[0]
        await asyncio.sleep(1.0)
        assert e2e.dose_events() == []
    assert runner.health.refused is not None
    assert "VM1-000123" in runner.health.refused


async def test_gateway_status_and_will(mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    async with running(mosquitto, tmp_path, ["complete"]) as e2e:
        await e2e.collector.wait_for(
            lambda msgs: any(m.topic.endswith("gw-test/status") for m in msgs), 20
        )
        collector = e2e.collector
    births = [m.json() for m in collector.matching("gw-test/status")]
    assert births[0]["online"] is True
    assert births[0]["devices"] == ["neb-bed01"]


async def test_broker_restart_mid_session(mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    """The broker goes away mid-session; the gateway reconnects by itself and the EDC,
    on a persistent session, still gets the session's event exactly once per event_id."""
    from tests.mqtt_helpers import collecting

    edc_topic = "devicegw/v2/+/+/dose/+"
    async with collecting(
        mosquitto.host, mosquitto.port, [edc_topic], client_id="edc-1", persistent=True
    ):
        pass  # registers the persistent subscription
    async with running(mosquitto, tmp_path, ["complete"]) as e2e:
        await e2e.collector.wait_for(lambda m: any("/telemetry/" in x.topic for x in m), 20)
        mosquitto.stop()
        # Wait for the gateway to notice (a loaded machine may take a while), then keep the
        # broker away ~100 s of device time.
        async with asyncio.timeout(30):
            while e2e.gateway.publisher.stats.connected:  # noqa: ASYNC110 - polling a stats flag
                await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)
        assert e2e.gateway.publisher.stats.connected is False
        mosquitto.start()
        async with collecting(
            mosquitto.host, mosquitto.port, [edc_topic], client_id="edc-1", persistent=True
        ) as edc:
            await edc.wait_for(lambda m: len(m) >= 1, 60)
            await asyncio.wait_for(e2e.sims[0].wait_until_idle(), 30)
            await asyncio.sleep(0.5)
            events = [m.json() for m in edc.messages]
        assert e2e.gateway.publisher.stats.connects >= 2
    assert len({e["event_id"] for e in events}) == 1
    assert all(e == events[0] for e in events)  # any redelivery is byte-identical
    assert events[0]["verdict"] == "complete"
