"""Issue 13: one misbehaving device or port entry does not affect the other beds.

- Two configured ports that are one device (its by-id link and a second name for it):
  both entries are refused, each status saying which other entry it collides with,
  logged once; the other beds' dose events are correct.
- Two devices reporting the same serial number: the second to identify itself is
  refused while the first is connected (their sessions would get the same event ids),
  status says why, logged once; the first's and the other beds' events are correct.
- A device flooding IDENT: repeats are counted and ignored, reported once (log and
  status note); its own dose event and the other beds' are correct.

Real simulators on real ptys, the real gateway, a private Mosquitto.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tty
from pathlib import Path
from typing import Any

import pytest

from devicegw.core.vm1_pipeline import IDENT_FLOOD_REPORT, IDENT_REPEAT_MIN_S
from devicegw.runtime.link_factory import (
    SharedPortError,
    link_factory,
    oximeter_source_factory,
    serial_ports,
)
from drivers.clock import ManualClock
from drivers.transport.base import Link, SampleSource
from simulators.scenario import Scenario
from tests.e2e_harness import (
    E2E,
    SHORT_DOSE,
    device_entry,
    gateway_config,
    running,
    short_session,
)
from tests.mqtt_helpers import MosquittoBroker

pytestmark = pytest.mark.e2e

TIME_SCALE = 10.0
OPTIONS: dict[str, Any] = {
    "time_scale": TIME_SCALE,
    "device_extra": {"output_rate_hz": 1},
    "sections": {"dose_rules": SHORT_DOSE},
}


def assert_correct(event: dict[str, Any], bed: int, scenario: Scenario) -> None:
    """The event is bed ``bed``'s, from ``scenario``'s device, a complete 0.5 mL dose."""
    assert event["subject_id"] == f"CVD-042-{bed:04d}"
    assert event["kit_number"] == f"K-{10000 + bed}"
    assert event["device"]["serial_no"] == scenario.device.serial_no
    assert event["session_no"] == scenario.device.last_session_no + 1
    assert event["verdict"] == "complete", event["reasons"]
    assert event["volume"]["delivered_ml"] == pytest.approx(0.5, abs=0.1)


async def settle(e2e: E2E) -> list[dict[str, Any]]:
    """Every simulator done with its session, and a moment for anything late."""
    await asyncio.wait_for(asyncio.gather(*(s.wait_until_idle() for s in e2e.sims)), 60)
    await asyncio.sleep(0.5)
    return e2e.dose_events()


def statuses(e2e: E2E, device_id: str) -> list[dict[str, Any]]:
    topic = e2e.topics.device_status(device_id)
    return [m.json() for m in e2e.collector.messages if m.topic == topic]


def logged(caplog: pytest.LogCaptureFixture, device_id: str, text: str) -> int:
    return sum(
        1
        for r in caplog.records
        if getattr(r, "device_id", None) == device_id
        and r.levelno >= logging.WARNING
        and text in r.getMessage()
    )


async def test_two_ports_for_one_device_are_both_refused(
    mosquitto: MosquittoBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    scenarios = [short_session(1), short_session(2)]
    # Bed 3's port is a second name for bed 1's device (as /dev/ttyUSB0 is for its by-id link).
    alias = tmp_path / "ttyUSB0"
    alias.symlink_to(tmp_path / "vm1-0")  # where running() puts the first simulator's port
    async with running(
        mosquitto,
        tmp_path,
        scenarios,
        extra_devices=[device_entry(3, str(alias), output_rate_hz=1)],
        **OPTIONS,
    ) as e2e:
        [event] = await e2e.wait_dose_events(1, timeout=60)
        events = await settle(e2e)
        health = {r.device.id: r.health for r in e2e.gateway.runners}
        bed1_status, bed3_status = statuses(e2e, "neb-bed01"), statuses(e2e, "neb-bed03")

    assert len(events) == 1  # neither name of the shared device was used
    assert_correct(event, 2, scenarios[1])
    for device_id, other in (("neb-bed01", str(alias)), ("neb-bed03", str(tmp_path / "vm1-0"))):
        h = health[device_id]
        assert h.connects == 0 and h.open_failures >= 1
        assert h.last_error is not None and "same device" in h.last_error
        assert other in h.last_error
        assert logged(caplog, device_id, "same device") == 1  # once, not per retry
    assert bed1_status and "same device" in (bed1_status[-1]["error"] or "")
    assert bed3_status and "same device" in (bed3_status[-1]["error"] or "")
    assert health["neb-bed02"].open_failures == 0


async def test_a_nebulizer_and_an_oximeter_named_on_one_device_are_both_refused(
    tmp_path: Path,
) -> None:
    """The same guard for every serial entry: real pty, real pyserial; a port that shares
    its device with no other entry opens."""
    controller, device = os.openpty()
    tty.setraw(device)
    alias = tmp_path / "ttyUSB1"
    alias.symlink_to(os.ttyname(device))
    cfg = gateway_config(
        MosquittoBroker(tmp_path),  # not started: only its address goes into the config
        [device_entry(1, os.ttyname(device))],
        tmp_path / "gw-data",
        sections={
            "oximeters": [
                {
                    "id": "ox-bed01",
                    "type": "nonin_oem3",
                    "bed": "B01",
                    "subject_id": "CVD-042-0001",
                    "link": {"port": str(alias)},
                }
            ]
        },
    )
    entries = serial_ports([*cfg.devices, *cfg.oximeters])
    links: list[Link | SampleSource] = [
        link_factory(cfg.devices[0], entries)(),
        oximeter_source_factory(cfg.oximeters[0], ManualClock(), entries)(),
    ]
    try:
        for link in links:
            with pytest.raises(SharedPortError, match="same device"):
                await link.open()
        alone = link_factory(cfg.devices[0], [])()  # the oximeter entry gone: it opens
        await alone.open()
        await alone.close()
    finally:
        os.close(controller)
        os.close(device)


async def test_second_device_with_the_same_serial_is_refused(
    mosquitto: MosquittoBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    twin = short_session(1, serial_no="VM1-000777")
    # The same serial and session counter: without the refusal both sessions would get
    # one event id (model, serial, session number) for two subjects.
    scenarios = [
        twin,
        twin.model_copy(update={"name": "twin-b"}),
        short_session(3),
    ]
    async with running(mosquitto, tmp_path, scenarios, **OPTIONS) as e2e:
        await e2e.wait_dose_events(2, timeout=60)
        events = await settle(e2e)
        health = {r.device.id: r.health for r in e2e.gateway.runners}
        all_statuses = {d: statuses(e2e, d) for d in health}

    twins = [e for e in events if e["device"]["serial_no"] == "VM1-000777"]
    assert len(twins) == 1 and len(events) == 2
    winner = 1 if twins[0]["subject_id"] == "CVD-042-0001" else 2
    loser = f"neb-bed{3 - winner:02d}"
    assert_correct(twins[0], winner, twin)
    assert_correct(next(e for e in events if e not in twins), 3, scenarios[2])
    h = health[loser]
    assert h.refusals >= 1 and h.refused is not None
    assert "two devices with one serial number" in h.refused
    assert f"neb-bed{winner:02d}" in h.refused
    assert any(
        "two devices with one serial number" in (s["error"] or "") for s in all_statuses[loser]
    )
    assert logged(caplog, loser, "device refused") == 1  # once, not per reconnect
    assert health[f"neb-bed{winner:02d}"].refusals == 0
    assert health["neb-bed03"].refusals == 0


async def test_device_flooding_ident_is_contained(
    mosquitto: MosquittoBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    scenarios = [short_session(1), short_session(2), short_session(3)]
    async with running(mosquitto, tmp_path, scenarios, **OPTIONS) as e2e:
        flooder = e2e.sims[0]
        topic = e2e.topics.device_status("neb-bed01")
        await e2e.collector.wait_for(  # identified: its status names its serial
            lambda msgs: any(
                m.topic == topic and (m.json()["identity"] or {}).get("serial_no") for m in msgs
            ),
            30,
        )

        async def flood() -> None:
            while True:
                flooder.repeat_ident(50)
                await asyncio.sleep(0.005)

        task = asyncio.create_task(flood())
        try:
            await e2e.wait_dose_events(3, timeout=60)
            events = await settle(e2e)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        health = {r.device.id: r.health for r in e2e.gateway.runners}
        flooder_statuses = statuses(e2e, "neb-bed01")

    assert flooder.counters.idents_sent > 1000
    assert len(events) == 3
    for bed, scenario in enumerate(scenarios, start=1):
        assert_correct(
            next(e for e in events if e["subject_id"] == f"CVD-042-{bed:04d}"), bed, scenario
        )
    h = health["neb-bed01"]
    assert h.idents_ignored > 1000
    assert h.identity_note is not None and "repeats its IDENT" in h.identity_note
    assert logged(caplog, "neb-bed01", "repeats its IDENT") == 1
    # Statuses follow the device's state, not its IDENTs: one per processed IDENT at most.
    session_device_s = 40 / IDENT_REPEAT_MIN_S
    assert len(flooder_statuses) < session_device_s
    for device_id in ("neb-bed02", "neb-bed03"):  # the port-open IDENT and GET_INFO's answer
        assert health[device_id].idents_ignored < IDENT_FLOOD_REPORT
        assert health[device_id].identity_note is None
