"""``devicegw demo``: an embedded broker, a simulated VM-1 on a pty, the gateway, live.

Everything the ward runs, on one laptop with no system package: the simulator
speaks the real serial protocol over a pseudo-terminal, the gateway opens it
with pyserial like a real port, and the live view below is an MQTT
subscriber, exactly as the EDC would be.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiomqtt
from rich.console import Console
from rich.live import Live
from rich.panel import Panel
from rich.syntax import Syntax
from rich.table import Table

import simulators
from devicegw.config import Config, parse_config
from devicegw.contract.topics import Topics
from devicegw.contract.vocabulary import PayloadKind
from devicegw.mqtt.embedded_broker import EmbeddedBroker
from devicegw.runtime.gateway import Gateway
from drivers.clock import HeldClock, ScaledClock

# The scenarios ship inside the simulators package (in a checkout and in the wheel).
DEMO_SCENARIO = Path(simulators.__file__).resolve().parent / "scenarios" / "demo.toml"
DEMO_OXIMETER = DEMO_SCENARIO.parent / "demo" / "oximeter.toml"
DEMO_TIMEOUT_S = 300.0
#: Longest real wait for the gateway to be listening before the devices start anyway.
LISTENING_TIMEOUT_S = 60.0


def demo_config(
    port: int,
    device_port: str,
    time_scale: float,
    data_dir: Path,
    oximeter_port: str | None = None,
) -> Config:
    oximeters = (
        [
            {
                "id": "ox-bed01",
                "type": "nonin_oem3",
                "bed": "B01",
                "subject_id": "DEMO-0001",
                "model": "OEM III",
                "serial_no": "NONIN-DEMO",
                "link": {"kind": "serial", "port": oximeter_port},
            }
        ]
        if oximeter_port
        else []
    )
    return parse_config(
        {
            "gateway": {
                "id": "gw-demo",
                "site": "demo",
                "log_format": "text",
                "log_level": "WARNING",
                "time_scale": time_scale,
                "data_dir": str(data_dir),
            },
            "broker": {
                "host": "127.0.0.1",
                "port": port,
                "protocol": "3.1.1",
                "reconnect_initial_s": 0.2,
            },
            "telemetry": {"interval_s": 1.0},
            "devices": [
                {
                    "id": "neb-bed01",
                    "type": "vm1",
                    "bed": "B01",
                    "subject_id": "DEMO-0001",
                    "kit_number": "K-00001",
                    "link": {"kind": "serial", "port": device_port},
                }
            ],
            "oximeters": oximeters,
            "spo2_rules": {"baseline_window_s": 60, "observation_window_s": 120},
        },
        sha256="demo",
    )


def _view(state: dict[str, Any], scale: float, broker: str, port: str) -> Panel:
    t = Table.grid(padding=(0, 2))
    t.add_column(style="bold cyan")
    t.add_column()
    t.add_row("broker", f"embedded amqtt on {broker}")
    t.add_row("device", f"simulated VM-1 on {port}")
    t.add_row("clock", f"{scale:g}x real time")
    t.add_row("connected", str(state.get("connected", "…")))
    t.add_row("state", str(state.get("state") or "…"))
    sess = state.get("session_no")
    t.add_row("session", "—" if sess is None else str(sess))
    elapsed = state.get("elapsed_s")
    t.add_row("elapsed", "—" if elapsed is None else f"{elapsed:6.1f} s")
    delivered = state.get("delivered_ml")
    t.add_row("delivered", "—" if delivered is None else f"{delivered:5.2f} mL (device estimate)")
    rate = state.get("rate_ul_min")
    t.add_row("rate", "—" if rate is None else f"{rate} µL/min")
    reservoir = state.get("reservoir_ml")
    t.add_row("reservoir", "—" if reservoir is None else f"{reservoir:5.2f} mL")
    t.add_row("SpO2 alert", state.get("spo2_alert", "none"))
    return Panel(t, title="devicegw demo — live session (MQTT telemetry)", border_style="cyan")


async def run_demo(*, time_scale: float = 8.0, scenario: str | None = None) -> int:
    from simulators.oximeter_pty import NoninPtySimulator
    from simulators.oximeter_scenario import load_oximeter_scenario
    from simulators.scenario import load_scenario
    from simulators.vm1_pty import Vm1PtySimulator

    console = Console()
    clock = ScaledClock(time_scale)
    # The simulated devices stand still at power-on until the gateway listens to both and
    # the live view is subscribed: then the session is seen from its start, at any speed.
    sim_clock = HeldClock(clock)
    scen = load_scenario(scenario or DEMO_SCENARIO)
    with tempfile.TemporaryDirectory(prefix="devicegw-demo-") as tmp:
        async with contextlib.AsyncExitStack() as stack:
            broker = await stack.enter_async_context(EmbeddedBroker())
            sim = await stack.enter_async_context(
                Vm1PtySimulator(scen, clock=sim_clock, link_dir=Path(tmp), name="vm1-bed01")
            )
            ox_port = None
            if scenario is None:  # the demo bed also has a pulse oximeter
                ox = await stack.enter_async_context(
                    NoninPtySimulator(
                        load_oximeter_scenario(DEMO_OXIMETER),
                        clock=sim_clock,
                        link_dir=Path(tmp),
                        name="nonin-bed01",
                    )
                )
                ox_port = str(ox.path)
            config = demo_config(
                broker.port, str(sim.path), time_scale, Path(tmp) / "data", ox_port
            )
            gateway = await stack.enter_async_context(Gateway(config, clock=clock))
            topics = Topics(config.broker.topic_prefix, config.gateway.site, config.gateway.id)
            gw_task = asyncio.create_task(gateway.run(), name="gateway")
            starter: list[asyncio.Task[None]] = []

            def subscribed() -> None:
                starter.append(
                    asyncio.create_task(_release_when_listening(gateway, sim_clock), name="start")
                )

            try:
                event = await _watch(
                    console, broker, topics, time_scale, str(sim.path), on_subscribed=subscribed
                )
            finally:
                for task in [*starter, gw_task]:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
    if event is None:
        console.print("[red]no dose event within the demo's time limit[/red]")
        return 1
    console.print(
        Panel(
            Syntax(json.dumps(event, indent=2), "json", word_wrap=True),
            title=f"dose-completion event on {topics.dose('neb-bed01')}",
            border_style="green",
        )
    )
    console.print(
        f"[bold green]verdict: {event['verdict']}[/bold green]  "
        f"delivered {event['volume']['delivered_ml']} mL of {event['volume']['prescribed_ml']} mL  "
        f"reasons: {event['reasons'] or 'none'}"
    )
    spo2 = event.get("spo2") or {}
    if spo2.get("spo2_monitoring") == "monitored":
        stats = spo2["session"]
        console.print(
            f"[bold]SpO2[/bold]: baseline {spo2['baseline']['spo2']} %, "
            f"nadir {stats['nadir_spo2']} %, "
            f"{len(stats['desaturations'])} desaturation(s), {spo2['alerts_raised']} alert(s), "
            f"coverage {stats['coverage_pct']} %"
        )
    return 0


async def _release_when_listening(gateway: Gateway, devices: HeldClock) -> None:
    """Let the devices' time run once the gateway has identified the nebulizer and opened
    every oximeter (or after LISTENING_TIMEOUT_S real seconds, whatever it has by then)."""
    try:
        async with asyncio.timeout(LISTENING_TIMEOUT_S):
            while True:  # the runners' health is plain state, polled (no event to wait on)
                if all(r.health.identified for r in gateway.runners) and all(
                    o.health.connected for o in gateway.oximeter_runners
                ):
                    break
                await asyncio.sleep(0.02)
    except TimeoutError:
        pass
    finally:
        devices.release()


async def _watch(
    console: Console,
    broker: EmbeddedBroker,
    topics: Topics,
    scale: float,
    port: str,
    *,
    on_subscribed: Callable[[], None],
) -> dict[str, Any] | None:
    state: dict[str, Any] = {}
    async with aiomqtt.Client(
        broker.host, broker.port, protocol=aiomqtt.ProtocolVersion.V311
    ) as client:
        await client.subscribe(f"{topics.base}/#", qos=1)
        on_subscribed()
        with Live(
            _view(state, scale, f"{broker.host}:{broker.port}", port),
            console=console,
            refresh_per_second=8,
        ) as live:
            try:
                async with asyncio.timeout(DEMO_TIMEOUT_S):
                    async for msg in client.messages:
                        body = json.loads(bytes(msg.payload))  # type: ignore[arg-type,unused-ignore]
                        kind = body.get("event_type")
                        # The demo is an engineering view: it reads the restricted
                        # feed too (rate, reservoir; docs/blinding.md).
                        if kind in (PayloadKind.TELEMETRY, PayloadKind.TELEMETRY_DETAIL):
                            state.update(body)
                        elif kind == PayloadKind.DEVICE_STATUS:
                            state["connected"] = body["connected"]
                            state["state"] = body["state"]
                        elif kind == PayloadKind.DEVICE_DETAIL:
                            if body.get("reservoir_ml") is not None:
                                state["reservoir_ml"] = body["reservoir_ml"]
                        elif kind == PayloadKind.SAFETY_ALERT:
                            state["spo2_alert"] = (
                                f"{body['state'].upper()} at {body['offset_s']:.0f} s into the "
                                f"session (SpO2 {body['spo2']}, baseline {body['baseline_spo2']})"
                            )
                        elif kind == PayloadKind.DOSE_COMPLETION:
                            live.update(_view(state, scale, f"{broker.host}:{broker.port}", port))
                            return dict(body)
                        live.update(_view(state, scale, f"{broker.host}:{broker.port}", port))
            except TimeoutError:
                return None
    return None
