"""The runner contract (devicegw/runtime/supervise.py), end to end.

An unexpected exception in one oximeter's feed and in one bed's SpO2 tick,
while three VM-1s run their sessions: each failure is logged once with its
traceback, only the failing runner restarts (with backoff), and every dose
event still arrives. Real parts throughout: VM-1 and Nonin simulators on ptys,
the whole :class:`Gateway`, a real Mosquitto. The faults themselves are
injected by wrapping two bound methods of the gateway's own bed monitors (a
bug cannot be produced on demand any other way).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

import pytest

from devicegw.config import parse_config
from devicegw.core.bed_monitor import BedMonitor
from devicegw.runtime import supervise
from devicegw.runtime.gateway import Gateway
from drivers.clock import ScaledClock
from simulators.oximeter_pty import NoninPtySimulator
from simulators.oximeter_scenario import load_pair
from simulators.scenario import Scenario, load_scenario
from simulators.vm1_pty import Vm1PtySimulator
from tests.mqtt_helpers import MosquittoBroker, collecting

pytestmark = pytest.mark.e2e

SCENARIOS = Path(__file__).resolve().parent.parent / "simulators" / "scenarios"


class Injected(RuntimeError):
    """The bug under test."""


def own_serial(scenario: Scenario, bed: str) -> Scenario:
    """The scenario on a VM-1 of its own (three devices with one serial are one device)."""
    device = scenario.device.model_copy(update={"serial_no": f"VM1-{bed}"})
    return scenario.model_copy(update={"device": device})


def fail_once_on_call(n: int, original: Any, what: str) -> Any:
    """``original``, except that its ``n``-th call raises :class:`Injected`."""
    calls = 0

    def wrapper(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == n:
            raise Injected(what)
        return original(*args)

    return wrapper


async def test_a_bug_in_an_oximeter_feed_and_a_bed_tick_restarts_only_that_runner(
    mosquitto: MosquittoBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    clock = ScaledClock(100.0)
    ox_scen, vm1_scen = load_pair(SCENARIOS / "oximeter" / "oximeter_artefacts.toml")
    assert vm1_scen is not None
    plain = load_scenario(SCENARIOS / "complete.toml")
    beds = ["B01", "B02", "B03"]
    async with contextlib.AsyncExitStack() as stack:
        vm1s = [
            await stack.enter_async_context(
                Vm1PtySimulator(
                    own_serial(vm1_scen if bed != "B03" else plain, bed),
                    clock=clock,
                    link_dir=tmp_path,
                    name=f"vm1-{bed.lower()}",
                )
            )
            for bed in beds
        ]
        noninss = [
            await stack.enter_async_context(
                NoninPtySimulator(
                    ox_scen, clock=clock, link_dir=tmp_path, name=f"nonin-{bed.lower()}"
                )
            )
            for bed in beds[:2]
        ]
        devices: list[dict[str, Any]] = [
            {
                "id": f"neb-{bed.lower()}",
                "type": "vm1",
                "bed": bed,
                "subject_id": f"CVD-042-{i + 1:04d}",
                "kit_number": f"K-{10001 + i}",
                "link": {"kind": "serial", "port": str(sim.path)},
            }
            for i, (bed, sim) in enumerate(zip(beds, vm1s, strict=True))
        ]
        oximeters: list[dict[str, Any]] = [
            {
                "id": f"ox-{bed.lower()}",
                "type": "nonin_oem3",
                "bed": bed,
                "subject_id": f"CVD-042-{i + 1:04d}",
                "model": "OEM III",
                "serial_no": f"NONIN-{bed}",
                "link": {"kind": "serial", "port": str(sim.path)},
            }
            for i, (bed, sim) in enumerate(zip(beds, noninss, strict=False))
        ]
        config = parse_config(
            {
                "gateway": {"id": "gw-runner", "site": "s1", "data_dir": str(tmp_path / "data")},
                "broker": {"host": mosquitto.host, "port": mosquitto.port},
                "devices": devices,
                "oximeters": oximeters,
            }
        )
        gateway = await stack.enter_async_context(Gateway(config, clock=clock))
        b01: BedMonitor = gateway.beds["B01"]
        b02: BedMonitor = gateway.beds["B02"]
        # Bed B01's oximeter feed fails on its 20th sample (its runner is mid-stream),
        # bed B02's tick on its 5th second; bed B03 has no oximeter at all.
        b01.feed = fail_once_on_call(20, b01.feed, "oximeter feed bug")
        b02.tick = fail_once_on_call(5, b02.tick, "bed tick bug")
        col = await stack.enter_async_context(
            collecting(mosquitto.host, mosquitto.port, [f"{gateway.topics.base}/#"])
        )
        task = asyncio.create_task(gateway.run(), name="gateway-under-test")
        try:
            await col.wait_for(lambda msgs: sum("/dose/" in m.topic for m in msgs) >= 3, 120)
            ox_b01 = next(r for r in gateway.oximeter_runners if r.oximeter.id == "ox-b01")
            back = False
            for _ in range(600):  # the restarted oximeter runner reopened its port
                back = ox_b01.health.connects >= 2 and ox_b01.health.connected
                if back:
                    break
                await asyncio.sleep(0.05)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        doses = {m.topic.rsplit("/", 1)[-1]: m.json() for m in col.matching("/dose/")}

    # Every device's dose event arrived, judged as usual.
    assert sorted(doses) == ["neb-b01", "neb-b02", "neb-b03"]
    assert {d["verdict"] for d in doses.values()} == {"complete"}
    # Exactly the two failing runners were restarted, once each; nothing else.
    assert gateway.restarts.counts == {"oximeter-ox-b01": 1, "spo2-tick-B02": 1}
    assert gateway.restarts.last_error == {
        "oximeter-ox-b01": "Injected: oximeter feed bug",
        "spo2-tick-B02": "Injected: bed tick bug",
    }
    # ... and the oximeter runner came back on its own port.
    assert back
    assert ox_b01.health.last_error == "internal error: Injected: oximeter feed bug"
    # Each failure logged once, at ERROR, with its traceback.
    failures = [
        r for r in caplog.records if r.name == supervise.__name__ and r.levelno >= logging.ERROR
    ]
    assert sorted(
        (getattr(r, "task", None), r.exc_info[0] if r.exc_info else None) for r in failures
    ) == [("oximeter-ox-b01", Injected), ("spo2-tick-B02", Injected)]
    # The nebulizers were never restarted: one link each, never dropped.
    for runner in gateway.runners:
        assert runner.health.connects == 1, runner.device.id


async def test_a_task_that_swallows_its_cancellation_is_still_stopped() -> None:
    """Python 3.11 can lose a cancellation (wait_for, TaskGroup); the gateway's stop
    cancels again until the task has stopped (devicegw/runtime/gateway.py ``_stop``)."""
    from devicegw.runtime.gateway import _stop

    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                swallowed += 1
                if swallowed >= 3:
                    raise
                asyncio.current_task().uncancel()  # type: ignore[union-attr]

    task = asyncio.create_task(stubborn(), name="stubborn")
    await asyncio.sleep(0)
    await _stop([task])
    assert task.cancelled() and swallowed == 3
