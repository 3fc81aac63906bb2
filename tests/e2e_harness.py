"""Runs simulated VM-1s on real ptys through the gateway to a real Mosquitto.

Simulator and gateway share one ScaledClock, so a 7-minute session takes a
few seconds of test time while every duration and verdict is computed in
device time, exactly as live.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devicegw.config import Config, parse_config
from devicegw.contract.topics import Topics
from devicegw.edc.tail import TailProcessor
from devicegw.runtime.gateway import Gateway
from drivers.clock import ScaledClock
from simulators.scenario import load_scenario
from simulators.vm1_pty import Vm1PtySimulator
from tests.mqtt_helpers import Collector, MosquittoBroker, collecting

SCENARIOS = Path(__file__).resolve().parent.parent / "simulators" / "scenarios"
TIME_SCALE = 100.0


def device_entry(index: int, port: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": f"neb-bed{index:02d}",
        "type": "vm1",
        "bed": f"B{index:02d}",
        "subject_id": f"CVD-042-{index:04d}",
        "kit_number": f"K-{10000 + index}",
        "link": {"kind": "serial", "port": port},
        **extra,
    }


def gateway_config(
    broker: MosquittoBroker, devices: list[dict[str, Any]], data_dir: Path
) -> Config:
    return parse_config(
        {
            "gateway": {"id": "gw-test", "site": "site-042", "data_dir": str(data_dir)},
            "broker": {
                "host": broker.host,
                "port": broker.port,
                "reconnect_initial_s": 0.2,
                "reconnect_max_s": 2.0,
            },
            "devices": devices,
        },
        sha256="0" * 64,
    )


@dataclass
class E2E:
    gateway: Gateway
    sims: list[Vm1PtySimulator]
    collector: Collector
    topics: Topics

    def dose_events(self) -> list[dict[str, Any]]:
        return [m.json() for m in self.collector.matching("/dose/")]

    async def wait_dose_events(self, n: int, timeout: float = 60.0) -> list[dict[str, Any]]:
        await self.collector.wait_for(
            lambda msgs: sum("/dose/" in m.topic for m in msgs) >= n, timeout
        )
        return self.dose_events()


@contextlib.asynccontextmanager
async def running(
    broker: MosquittoBroker,
    tmp_path: Path,
    scenarios: list[str | Path],
    *,
    extra_devices: list[dict[str, Any]] | None = None,
    device_extra: dict[str, Any] | None = None,
    time_scale: float = TIME_SCALE,
) -> AsyncIterator[E2E]:
    clock = ScaledClock(time_scale)
    async with contextlib.AsyncExitStack() as stack:
        sims = []
        for i, name in enumerate(scenarios):
            sim = Vm1PtySimulator(
                load_scenario(name if isinstance(name, Path) else SCENARIOS / f"{name}.toml"),
                clock=clock,
                link_dir=tmp_path,
                name=f"vm1-{i}",
            )
            sims.append(await stack.enter_async_context(sim))
        devices = [
            device_entry(i + 1, str(sim.path), **(device_extra or {})) for i, sim in enumerate(sims)
        ]
        devices += extra_devices or []
        config = gateway_config(broker, devices, tmp_path / "gw-data")
        gateway = Gateway(config, clock=clock)
        collector = await stack.enter_async_context(
            collecting(broker.host, broker.port, [f"{gateway.topics.base}/#"])
        )
        task = asyncio.create_task(gateway.run(), name="gateway-under-test")
        try:
            yield E2E(gateway, sims, collector, gateway.topics)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        assert_all_valid(collector)


def assert_all_valid(collector: Collector) -> None:
    """Every message the gateway published in the run validates against its schema."""
    checker = TailProcessor(check_sequence=False)
    invalid = [
        (m.topic, result.errors)
        for m in collector.messages
        if not (result := checker.process(m.topic, m.payload, m.retain, m.qos)).valid
    ]
    assert not invalid, f"published messages that fail the contract: {invalid[:3]}"
