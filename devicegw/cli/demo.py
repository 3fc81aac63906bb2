"""``devicegw demo``: an embedded broker, simulated beds on ptys, the gateway, live.

Everything the ward runs, on one laptop with no system package: three beds (B01
with a pulse oximeter and a scripted SpO2 dip, B02 a dose stopped at half, B03 a
later complete dose), each VM-1 speaking the real serial protocol over a
pseudo-terminal that the gateway opens with pyserial like a real port. The ward
dashboard is served by the gateway (its URL is printed); the terminal panel
below is an MQTT subscriber, exactly as the EDC would be.
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
#: The other demo beds: (bed, scenario, subject, kit).
DEMO_BEDS = (
    ("B02", DEMO_SCENARIO.parent / "demo" / "partial.toml", "DEMO-0002", "K-00002"),
    ("B03", DEMO_SCENARIO.parent / "demo" / "second.toml", "DEMO-0003", "K-00003"),
)
DEMO_TIMEOUT_S = 300.0
#: Longest real wait for the gateway to be listening before the devices start anyway.
LISTENING_TIMEOUT_S = 60.0


def demo_config(
    port: int,
    device_ports: list[tuple[str, str, str, str]],
    time_scale: float,
    data_dir: Path,
    oximeter_port: str | None = None,
    http_port: int | None = None,
) -> Config:
    """``device_ports``: (bed, port, subject, kit) per simulated VM-1; B01 is first."""
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
    data: dict[str, Any] = {
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
                "id": f"neb-{bed.lower()}",
                "type": "vm1",
                "bed": bed,
                "subject_id": subject,
                "kit_number": kit,
                "link": {"kind": "serial", "port": device_port},
            }
            for bed, device_port, subject, kit in device_ports
        ],
        "oximeters": oximeters,
        "spo2_rules": {"baseline_window_s": 60, "observation_window_s": 120},
    }
    if http_port is not None:
        data["http"] = {"listen": f"127.0.0.1:{http_port}", "loopback_role": "engineer"}
    return parse_config(data, sha256="demo")


def _view(states: dict[str, dict[str, Any]], scale: float, broker: str, url: str) -> Panel:
    t = Table("bed", "link", "state", "session", "elapsed", "delivered", "SpO2 alert", "verdict")
    for bed, state in states.items():
        elapsed = state.get("elapsed_s")
        delivered = state.get("delivered_ml")
        t.add_row(
            bed,
            "up" if state.get("connected") else "…",
            str(state.get("state") or "…"),
            "—" if state.get("session_no") is None else str(state["session_no"]),
            "—" if elapsed is None else f"{elapsed:6.1f} s",
            "—" if delivered is None else f"{delivered:5.2f} mL",
            state.get("spo2_alert", "none"),
            state.get("verdict", "—"),
        )
    title = f"devicegw demo — {scale:g}x real time, broker {broker}"
    if url:
        title += f" — dashboard {url}"
    return Panel(t, title=title, border_style="cyan")


async def run_demo(
    *,
    time_scale: float = 8.0,
    scenario: str | None = None,
    http_port: int | None = 8080,
    hold: bool = False,
) -> int:
    """The demo; ``scenario``: one bed with that VM-1 scenario instead of the three beds.
    ``hold``: after the doses, keep the dashboard up until Ctrl-C."""
    from simulators.oximeter_pty import NoninPtySimulator
    from simulators.oximeter_scenario import load_oximeter_scenario
    from simulators.scenario import load_scenario
    from simulators.vm1_pty import Vm1PtySimulator

    console = Console()
    clock = ScaledClock(time_scale)
    # The simulated devices stand still at power-on until the gateway listens to all of
    # them and the live view is subscribed: then the sessions are seen from their start.
    sim_clock = HeldClock(clock)
    beds = [("B01", Path(scenario) if scenario else DEMO_SCENARIO, "DEMO-0001", "K-00001")]
    if scenario is None:
        beds += list(DEMO_BEDS)
    with tempfile.TemporaryDirectory(prefix="devicegw-demo-") as tmp:
        async with contextlib.AsyncExitStack() as stack:
            broker = await stack.enter_async_context(EmbeddedBroker())
            ports = []
            for bed, path, subject, kit in beds:
                sim = await stack.enter_async_context(
                    Vm1PtySimulator(
                        load_scenario(path),
                        clock=sim_clock,
                        link_dir=Path(tmp),
                        name=f"vm1-{bed.lower()}",
                    )
                )
                ports.append((bed, str(sim.path), subject, kit))
            ox_port = None
            if scenario is None:  # bed B01 also has a pulse oximeter
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
                broker.port,
                ports,
                time_scale,
                Path(tmp) / "data",
                ox_port,
                http_port=None if http_port is None else _free_or_any(http_port),
            )
            gateway = await stack.enter_async_context(Gateway(config, clock=clock))
            url = ""
            server = None
            if config.http is not None:
                from devicegw.web.server import WebServer

                server = WebServer(gateway)
                gateway.extra_runners.append(server)
            topics = Topics(config.broker.topic_prefix, config.gateway.site, config.gateway.id)
            gw_task = asyncio.create_task(gateway.run(), name="gateway")
            starter: list[asyncio.Task[None]] = []
            if server is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(server.serving.wait(), LISTENING_TIMEOUT_S)
                url = f"http://127.0.0.1:{server.port}/"
                console.print(f"[bold]Ward dashboard:[/bold] {url}  (open it in a browser)")

            def subscribed() -> None:
                starter.append(
                    asyncio.create_task(_release_when_listening(gateway, sim_clock), name="start")
                )

            try:
                events = await _watch(
                    console,
                    broker,
                    topics,
                    time_scale,
                    [bed for bed, *_ in beds],
                    url,
                    on_subscribed=subscribed,
                )
                if hold and events:
                    console.print(f"doses done; the dashboard stays at {url} — Ctrl-C to stop")
                    with contextlib.suppress(asyncio.CancelledError):
                        await asyncio.Event().wait()
            finally:
                for task in [*starter, gw_task]:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
    if not events or "B01" not in events:
        console.print("[red]no dose event within the demo's time limit[/red]")
        return 1
    event = events["B01"]
    console.print(
        Panel(
            Syntax(json.dumps(event, indent=2), "json", word_wrap=True),
            title=f"dose-completion event on {topics.dose('neb-b01')}",
            border_style="green",
        )
    )
    for bed, ev in events.items():
        console.print(
            f"[bold]{bed}[/bold] [bold green]verdict: {ev['verdict']}[/bold green]  "
            f"delivered {ev['volume']['delivered_ml']} mL of {ev['volume']['prescribed_ml']} mL  "
            f"reasons: {ev['reasons'] or 'none'}"
        )
    spo2 = event.get("spo2") or {}
    if spo2.get("spo2_monitoring") == "monitored":
        stats = spo2["session"]
        console.print(
            f"[bold]SpO2[/bold] (B01): baseline {spo2['baseline']['spo2']} %, "
            f"nadir {stats['nadir_spo2']} %, "
            f"{len(stats['desaturations'])} desaturation(s), {spo2['alerts_raised']} alert(s), "
            f"coverage {stats['coverage_pct']} %"
        )
    return 0


def _device_of(topic: str) -> str:
    """The device level of a gateway topic (``.../device/{id}/status`` or ``.../{kind}/{id}``)."""
    parts = topic.split("/")
    return parts[-2] if parts[-1] == "status" and len(parts) >= 2 else parts[-1]


def _free_or_any(port: int) -> int:
    """``port`` if nothing listens there on loopback, else 0 (any free port)."""
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return 0
    return port


async def _release_when_listening(gateway: Gateway, devices: HeldClock) -> None:
    """Let the devices' time run once the gateway has identified the nebulizers and opened
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
    beds: list[str],
    url: str,
    *,
    on_subscribed: Callable[[], None],
) -> dict[str, dict[str, Any]]:
    """Follow the beds on MQTT until each has its dose event; the events by bed."""
    states: dict[str, dict[str, Any]] = {bed: {} for bed in beds}
    events: dict[str, dict[str, Any]] = {}
    bed_of = {f"neb-{bed.lower()}": bed for bed in beds}
    where = f"{broker.host}:{broker.port}"
    async with aiomqtt.Client(
        broker.host, broker.port, protocol=aiomqtt.ProtocolVersion.V311
    ) as client:
        await client.subscribe(f"{topics.base}/#", qos=1)
        on_subscribed()
        with (
            Live(_view(states, scale, where, url), console=console, refresh_per_second=8) as live,
            contextlib.suppress(TimeoutError),
        ):
            async with asyncio.timeout(DEMO_TIMEOUT_S):
                async for msg in client.messages:
                    body = json.loads(bytes(msg.payload))  # type: ignore[arg-type,unused-ignore]
                    bed = bed_of.get(_device_of(msg.topic.value))
                    if bed is None:
                        continue
                    state = states[bed]
                    kind = body.get("event_type")
                    # The demo is an engineering view: it reads the restricted
                    # feed too (delivered so far; docs/blinding.md).
                    if kind in (PayloadKind.TELEMETRY, PayloadKind.TELEMETRY_DETAIL):
                        state.update({k: v for k, v in body.items() if v is not None})
                    elif kind == PayloadKind.DEVICE_STATUS:
                        state["connected"] = body["connected"]
                        state["state"] = body["state"]
                    elif kind == PayloadKind.SAFETY_ALERT:
                        state["spo2_alert"] = (
                            f"{body['state'].upper()} at {body['offset_s']:.0f} s "
                            f"(SpO2 {body['spo2']})"
                        )
                    elif kind == PayloadKind.DOSE_COMPLETION:
                        state["verdict"] = body["verdict"]
                        events[bed] = dict(body)
                    live.update(_view(states, scale, where, url))
                    if len(events) == len(beds):
                        break
    return events
