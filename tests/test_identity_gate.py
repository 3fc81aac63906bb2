"""Identity before data (issue 14 item 5).

Nothing a VM-1 sends becomes a session until an IDENT has been received on
that connection and accepted by the allow-list; what came before is held
(bounded) and replayed once it arrives. Never an ``event_id`` made from
``unknown:<device>``. The pipeline tests feed real serial frames; the end to
end test runs a faulty simulated device (ACKs GET_INFO, never sends IDENT) on
a real pty through the gateway to a real Mosquitto.
"""

from __future__ import annotations

import asyncio
import json
import tomllib
from pathlib import Path
from typing import Any

import pytest

from devicegw.config import Config, parse_config
from devicegw.contract.payloads import (
    dose_event_id,
)
from devicegw.core.vm1_pipeline import PRE_IDENT_HOLD, UnexpectedDeviceError, Vm1Pipeline
from devicegw.runtime.nebulizer_runner import NOT_IDENTIFIED
from devicegw.storage.journal import SessionJournal
from devicegw.storage.store import Store
from drivers.vm1.messages import EndReason, Ident
from tests.e2e_harness import SCENARIOS, running
from tests.mqtt_helpers import MosquittoBroker
from tests.session_stream import T0, ListSink, StreamBuilder, feed

SERIAL = "VM1-000123"


def config(expected_serial: str | None = SERIAL) -> Config:
    device: dict[str, Any] = {
        "id": "neb-bed01",
        "type": "vm1",
        "bed": "B01",
        "subject_id": "CVD-042-0001",
        "kit_number": "K-1",
        "link": {"kind": "serial", "port": "/dev/ttyUSB0"},
    }
    if expected_serial is not None:
        device["expected_serial"] = expected_serial
    return parse_config({"gateway": {"id": "gw", "site": "s1"}, "devices": [device]})


Sink = ListSink


def ident(b: StreamBuilder, serial: str = SERIAL, last_session_no: int = 41) -> None:
    b._rx(
        Ident,
        model="VM-1",
        serial_no=serial,
        firmware="1.4.2",
        nominal_rate_ul_min=400,
        reservoir_capacity_ul=6000,
        last_session_no=last_session_no,
    )


def session(b: StreamBuilder, seconds: float = 300) -> None:
    b.start()
    b.nebulize(seconds)
    b.end(EndReason.COMPLETE, residual=105, neb_ms=int(seconds * 1000))


def test_no_ident_no_session() -> None:
    """A whole session from a device that never identifies: held, dropped, counted; no event."""
    sink = Sink()
    p = Vm1Pipeline(config().devices[0], config(), sink)
    b = StreamBuilder()
    p.link_up(T0)
    session(b)
    feed(p, b)
    assert sink.events == []
    assert p.tracker.open_session is None and p.tracker.identity is None
    assert not p.identified
    assert p.health.held_before_ident == len(b.out)
    assert p.health.dropped_before_ident == len(b.out) - PRE_IDENT_HOLD


def test_frames_before_ident_are_replayed_once_it_arrives() -> None:
    """A session start just before the IDENT is kept; the event names the device."""
    sink = Sink()
    cfg = config()
    p = Vm1Pipeline(cfg.devices[0], cfg, sink)
    b = StreamBuilder()
    b.start()
    b.nebulize(5)
    p.link_up(b.out[0].utc)
    n = feed(p, b)
    assert p.tracker.open_session is None  # held, not used
    ident(b)
    b.nebulize(295)
    b.end(EndReason.COMPLETE, residual=105, neb_ms=300_000)
    feed(p, b, n)
    [event] = sink.events
    assert event.event_id == dose_event_id("VM-1", SERIAL, 42)
    assert event.device.serial_no == SERIAL
    [record] = sink.records
    assert record.detail.link.sample_count == 3000  # the held samples count too
    assert record.detail.link.frames_lost == 0  # replayed in order: no gap from the IDENT's seq
    assert p.health.dropped_before_ident == 0


def test_refused_ident_discards_what_was_held() -> None:
    sink = Sink()
    cfg = config()
    p = Vm1Pipeline(cfg.devices[0], cfg, sink)
    b = StreamBuilder()
    session(b, 60)
    ident(b, serial="VM1-999999")
    p.link_up(b.out[0].utc)
    with pytest.raises(UnexpectedDeviceError, match="VM1-999999"):
        feed(p, b)
    assert sink.events == []
    assert p.tracker.open_session is None and p.tracker.identity is None


def test_identity_is_asked_again_on_every_connection() -> None:
    """After a reconnect the identity of the previous connection does not count."""
    sink = Sink()
    cfg = config(expected_serial=None)
    p = Vm1Pipeline(cfg.devices[0], cfg, sink)
    b = StreamBuilder()
    ident(b)
    p.link_up(b.out[0].utc)
    n = feed(p, b)
    assert p.identified
    p.link_down(b.out[-1].utc)
    p.link_up(b.out[-1].utc)
    assert not p.identified
    session(b, 60)
    feed(p, b, n)
    assert sink.events == []  # held until this connection's IDENT


def test_restart_frames_before_ident_finish_the_journaled_session(tmp_path: Path) -> None:
    """Issue 14: after a restart, frames before the IDENT reply made `unknown:` events."""
    cfg = config()
    store = Store(tmp_path / "gw.sqlite3")
    journal = SessionJournal(store)
    b = StreamBuilder()
    ident(b)
    b.start()
    b.nebulize(120)
    first = Vm1Pipeline(cfg.devices[0], cfg, Sink(), journal=journal)
    first.link_up(b.out[0].utc)
    n = feed(first, b)
    assert first.tracker.open_session_no == 42
    # The gateway is killed; a new one restores the session from the journal.
    sink = Sink()
    second = Vm1Pipeline(cfg.devices[0], cfg, sink, journal=journal)
    assert second.tracker.open_session_no == 42
    b.skip(10)
    second.link_up(b.out[-1].utc)
    b.nebulize(180)  # the device went on; these arrive before the IDENT reply
    b.end(EndReason.COMPLETE, residual=105, neb_ms=300_000)
    n = feed(second, b, n)
    assert sink.events == []
    ident(b, last_session_no=42)
    feed(second, b, n)
    [event] = sink.events
    assert event.event_id == dose_event_id("VM-1", SERIAL, 42)
    assert event.device.serial_no == SERIAL
    assert "gateway_restart" in event.reasons or event.link.interruptions >= 1
    store.close()


# -- end to end ------------------------------------------------------------------------


def mute_scenario(tmp_path: Path) -> Path:
    """complete.toml, played by a device that ACKs GET_INFO but never sends IDENT."""
    text = (SCENARIOS / "complete.toml").read_text()
    assert "[device]\n" in text
    path = tmp_path / "mute.toml"
    path.write_text(text.replace("[device]\n", "[device]\nsends_ident = false\n"))
    assert tomllib.loads(path.read_text())["device"]["sends_ident"] is False
    return path


@pytest.mark.e2e
async def test_device_that_never_identifies_publishes_no_dose(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    async with running(
        mosquitto,
        tmp_path,
        [mute_scenario(tmp_path)],
        device_extra={"expected_serial": SERIAL},
    ) as e2e:
        sim = e2e.sims[0]
        runner = e2e.gateway.runners[0]
        await asyncio.wait_for(sim.wait_until_idle(), 60)  # the whole session has been sent
        # The gateway kept asking (the handshake is retried) and said why it does not use it.
        await e2e.collector.wait_for(
            lambda msgs: any(
                "/device/" in m.topic and m.json().get("error") == NOT_IDENTIFIED for m in msgs
            ),
            30,
        )
        assert sim.counters.commands_received >= 3
        assert sim.counters.idents_sent == 0
        health = runner.health
        assert health.connected and not health.identified
        assert health.dropped_before_ident > 0
        assert health.held_before_ident > health.dropped_before_ident
        assert runner.tracker.open_session is None
        assert e2e.dose_events() == []
        statuses = [m.json() for m in e2e.collector.matching("/device/")]
        assert statuses and all(s["identity"]["serial_no"] is None for s in statuses)
    everything = json.dumps([m.payload.decode() for m in e2e.collector.messages])
    assert "unknown:" not in everything
