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
from simulators.scenario import Scenario, load_scenario
from simulators.vm1_pty import Vm1PtySimulator
from tests.mqtt_helpers import Collector, MosquittoBroker, cancel_and_wait, collecting

SCENARIOS = Path(__file__).resolve().parent.parent / "simulators" / "scenarios"
TIME_SCALE = 100.0


#: The protocol's dose rules scaled to :func:`short_session` (0.5 mL in ~30 s, 1 Hz OUTPUT).
SHORT_DOSE = {"prescribed_volume_ml": 0.5, "min_duration_s": 10.0, "max_sample_gap_s": 3.0}


def short_session(index: int, serial_no: str | None = None) -> Scenario:
    """A ~40 s (device time) 0.5 mL COMPLETE session (with :data:`SHORT_DOSE` as the
    rules): serial ``VM1-<index>`` unless given, last session number ``index``."""
    base = load_scenario(SCENARIOS / "complete.toml")
    device = base.device.model_copy(
        update={
            "serial_no": serial_no or f"VM1-{index:06d}",
            "last_session_no": index,
            "seed": index,
        }
    )
    session = base.sessions[0].model_copy(
        update={
            "fill_at_s": 20.0,
            "start_at_s": 30.0,
            "fill_ul": 600,
            "rate_ul_min": 1000.0,
            "residual_ul": 100,
        }
    )
    return base.model_copy(
        update={"name": f"short-{index}", "device": device, "sessions": (session,)}
    )


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
    broker: MosquittoBroker,
    devices: list[dict[str, Any]],
    data_dir: Path,
    broker_extra: dict[str, Any] | None = None,
    sections: dict[str, Any] | None = None,
) -> Config:
    return parse_config(
        {
            **(sections or {}),
            "gateway": {"id": "gw-test", "site": "site-042", "data_dir": str(data_dir)},
            "broker": {
                "host": broker.host,
                "port": broker.port,
                "reconnect_initial_s": 0.2,
                "reconnect_max_s": 2.0,
                **(broker_extra or {}),
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
        """The blinded dose events (the EDC's feed)."""
        return [m.json() for m in self.collector.matching("/dose/")]

    def dose_details(self) -> list[dict[str, Any]]:
        """The restricted dose details (the engineering feed)."""
        return [m.json() for m in self.collector.matching("/dose-detail/")]

    async def detail_of(self, event: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        """The restricted detail with the same event_id as ``event`` (waits for it)."""

        def found(msgs: list[Any]) -> bool:
            return any(
                "/dose-detail/" in m.topic and m.json()["event_id"] == event["event_id"]
                for m in msgs
            )

        await self.collector.wait_for(found, timeout)
        return next(d for d in self.dose_details() if d["event_id"] == event["event_id"])

    async def wait_dose_events(self, n: int, timeout: float = 60.0) -> list[dict[str, Any]]:
        await self.collector.wait_for(
            lambda msgs: sum("/dose/" in m.topic for m in msgs) >= n, timeout
        )
        return self.dose_events()


@contextlib.asynccontextmanager
async def running(
    broker: MosquittoBroker,
    tmp_path: Path,
    scenarios: list[str | Path | Scenario],
    *,
    extra_devices: list[dict[str, Any]] | None = None,
    device_extra: dict[str, Any] | None = None,
    time_scale: float = TIME_SCALE,
    broker_extra: dict[str, Any] | None = None,
    collector_auth: tuple[str, str] | None = None,
    sections: dict[str, Any] | None = None,
) -> AsyncIterator[E2E]:
    """Simulators (scenario names under simulators/scenarios, or Scenario objects) on ptys,
    the gateway, and a collector subscribed to everything the gateway publishes.
    ``sections``: more config sections (e.g. ``{"schedule": {}}``)."""
    clock = ScaledClock(time_scale)
    async with contextlib.AsyncExitStack() as stack:
        sims = []
        for i, name in enumerate(scenarios):
            if isinstance(name, str):
                scenario = load_scenario(SCENARIOS / f"{name}.toml")
            elif isinstance(name, Path):
                scenario = load_scenario(name)
            else:
                scenario = name
            sim = Vm1PtySimulator(scenario, clock=clock, link_dir=tmp_path, name=f"vm1-{i}")
            sims.append(await stack.enter_async_context(sim))
        devices = [
            device_entry(i + 1, str(sim.path), **(device_extra or {})) for i, sim in enumerate(sims)
        ]
        devices += extra_devices or []
        config = gateway_config(broker, devices, tmp_path / "gw-data", broker_extra, sections)
        gateway = await stack.enter_async_context(Gateway(config, clock=clock))
        if config.http is not None:  # as `devicegw run` does: the dashboard in the gateway
            from devicegw.web.server import WebServer

            gateway.extra_runners.append(WebServer(gateway))
        username, password = collector_auth or (None, None)
        collector = await stack.enter_async_context(
            collecting(
                broker.host,
                broker.port,
                [f"{gateway.topics.base}/#"],
                username=username,
                password=password,
            )
        )
        task = asyncio.create_task(gateway.run(), name="gateway-under-test")
        try:
            yield E2E(gateway, sims, collector, gateway.topics)
        finally:
            await cancel_and_wait(task)
        assert_all_valid(collector)


def assert_all_valid(collector: Collector) -> None:
    """Every message the gateway published in the run validates against its *strict* schema.

    Strict (``devicegw tail``'s default): a field the models do not declare is an
    error here, although the published schemas allow it for consumers.
    """
    checker = TailProcessor(check_sequence=False, unknown_fields="error")
    invalid = [
        (m.topic, result.errors)
        for m in collector.messages
        if not (result := checker.process(m.topic, m.payload, m.retain, m.qos)).valid
    ]
    assert not invalid, f"published messages that fail the contract: {invalid[:3]}"
