"""Many-devices smoke test (issue 13): ~100 VM-1s on real ptys through one gateway.

What it proves: one gateway process opens and identifies 100 serial ports at once
(real pyserial on real pseudo-terminals, a private Mosquitto, one shared fast
ScaledClock), follows a short session on each, and publishes exactly one dose
event per device, each attributed to its own bed (subject, kit, serial, session
number) with the volume and verdict its session had. A port's trouble or load
does not leak into another bed's event.

What it does not prove: throughput or latency at ward scale (benchmarks/scale.py
measures those); OUTPUT is set to 1 Hz and time runs 10x, to keep the run
modest on a 2-core machine. Asserts counts and values, never durations.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from devicegw.runtime.descriptors import in_use, raise_soft_limit
from simulators.scenario import Scenario
from tests.e2e_harness import SHORT_DOSE, running, short_session
from tests.mqtt_helpers import MosquittoBroker

pytestmark = [pytest.mark.e2e, pytest.mark.many_devices]

#: DGW_MANY_DEVICES=5 for a quick look while developing.
DEVICES = int(os.environ.get("DGW_MANY_DEVICES", "100"))
TIME_SCALE = 10.0
#: Per device: the simulator's pty pair, the gateway's port, a margin.
DESCRIPTORS_PER_DEVICE = 4


@pytest.mark.timeout(300)
async def test_hundred_devices_each_get_their_own_correct_dose_event(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    allowed = raise_soft_limit()
    need = (in_use() or 0) + DESCRIPTORS_PER_DEVICE * DEVICES + 100
    assert allowed >= need, f"open-file limit {allowed} is below the {need} this test needs"
    scenarios: list[str | Path | Scenario] = [short_session(i + 1) for i in range(DEVICES)]
    async with running(
        mosquitto,
        tmp_path,
        scenarios,
        time_scale=TIME_SCALE,
        device_extra={"output_rate_hz": 1},
        sections={"dose_rules": SHORT_DOSE},
    ) as e2e:
        events = await e2e.wait_dose_events(DEVICES, timeout=240)
        await asyncio.gather(*(sim.wait_until_idle() for sim in e2e.sims))
        await asyncio.sleep(0.5)  # nothing more may follow
        events = e2e.dose_events()
        health = [r.health for r in e2e.gateway.runners]

    assert len(events) == DEVICES, f"{len(events)} dose events for {DEVICES} devices"
    by_serial = {e["device"]["serial_no"]: e for e in events}
    assert len(by_serial) == DEVICES  # one each, none twice
    for i in range(1, DEVICES + 1):
        event = by_serial[f"VM1-{i:06d}"]
        assert event["subject_id"] == f"CVD-042-{i:04d}"
        assert event["kit_number"] == f"K-{10000 + i}"
        assert event["session_no"] == i + 1
        assert event["verdict"] == "complete", (i, event["verdict"], event["reasons"])
        assert event["volume"]["delivered_ml"] == pytest.approx(0.5, abs=0.1)
    assert all(h.refusals == 0 and h.frames_bad == 0 for h in health)
