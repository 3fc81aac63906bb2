"""Store-and-forward over the ward broker's bridge: the uplink is cut for a minute.

Two real Mosquitto processes on loopback, configured from the shipped files in
``deploy/mosquitto/``, each included from a main file like Debian's (only
listener ports, file paths and the central broker's address are replaced; every
queue, persistence, session and TLS setting is the shipped one):

    gateway ──► ward broker ══ TLS bridge, client cert ══► uplink relay ──► central broker ──► EDC

The gateway runs in-process with simulated VM-1s on real ptys, as the ward's
``devicegw`` user (password, ACL). The uplink relay stands for the hospital
network: cut, it stops carrying bytes in either direction for a minute of real
time (a dead router upstream: connections hang, nothing is refused or reset,
the bridge finds out by its keepalive), while sessions finish on the ward.
The EDC is a QoS 1 subscriber with a persistent session on the central broker,
over TLS with its own client certificate.

Asserted: during the cut the gateway hands every finished session to the ward
broker (its outbox drains) and nothing reaches the EDC; after the cut every dose
event reaches the EDC, none lost, and copies of one event are identical apart
from ``delivery`` (docs/contract.md). The bridge's state topic on the central
broker, which the hospital's monitoring watches, turns 0 during the cut (the
central broker drops the silent bridge after 1.5 keepalives) and 1 after it.
This is the one long test (~90 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import ssl
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

from devicegw.config import parse_config
from devicegw.runtime.gateway import Gateway
from drivers.clock import ScaledClock
from simulators.scenario import load_scenario
from simulators.vm1_pty import Vm1PtySimulator
from tests.e2e_harness import SCENARIOS, assert_all_valid, device_entry
from tests.mqtt_helpers import Collector, MosquittoBroker, collecting, free_port, mosquitto_binary
from tests.mqtt_helpers import require as require_real
from tests.outbox_helpers import holds_event

pytestmark = pytest.mark.e2e

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "mosquitto"
SCALE = 20.0
CUT_S = 60.0  # how long the uplink is down, in real seconds
EDC_TOPIC = "devicegw/v2/+/+/dose/+"
BRIDGE_ID = "devicegw-ward3-bridge"  # remote_clientid in the shipped file = the cert's CN
# One VM-1 each; two_sessions has two sessions, the others one: 6 dose events. At
# SCALE the first ends ~12 s after the start, the last ~65 s (during the cut).
SCENARIO_NAMES = ["user_stop_half", "complete", "link_drop", "pause_2min", "two_sessions"]
EXPECTED_EVENTS = 6


def render(conf: str, replace: dict[str, str]) -> str:
    """The shipped config with the value of each named directive replaced.

    Each directive must occur exactly once: if the shipped file is edited so that
    one disappears or doubles, this fails instead of testing something else.
    """
    lines = conf.splitlines()
    for key, value in replace.items():
        hits = [i for i, line in enumerate(lines) if re.match(rf"{re.escape(key)}(\s|$)", line)]
        assert len(hits) == 1, f"{key!r} occurs {len(hits)} times in the shipped config"
        lines[hits[0]] = f"{key} {value}"
    return "\n".join(lines) + "\n"


class Uplink:
    """A TCP relay standing for the hospital network between the ward and the central broker.

    :meth:`cut` stops it carrying bytes in both directions, without closing or
    refusing anything (a router upstream died: TCP just stalls); :meth:`restore`
    lets the held bytes through again, in order, nothing lost.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.connections = 0

    async def __aenter__(self) -> Uplink:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    def cut(self) -> None:
        self._flowing.clear()

    def restore(self) -> None:
        self._flowing.set()

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._flowing.wait()  # a connection attempt during the cut hangs
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._spawn(self._pipe(reader, up_writer))
        self._spawn(self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()


def debian_mosquitto(workdir: Path, snippet_name: str, snippet: str) -> str:
    """A main mosquitto.conf like Debian's, with the shipped file in its conf.d/."""
    conf_d = workdir / "conf.d"
    conf_d.mkdir()
    (conf_d / snippet_name).write_text(snippet)
    return (
        f"persistence true\npersistence_location {workdir}/\n"
        f"log_dest stderr\ninclude_dir {conf_d}\n"
    )


def _pem(tmp: Path, name: str, blob: trustme.Blob) -> Path:
    path = tmp / name
    blob.write_to_path(str(path))
    return path


def client_context(ca: trustme.CA, cert: trustme.LeafCert) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    cert.configure_cert(ctx)
    return ctx


@dataclass
class Site:
    """The two brokers, the uplink between them and the credentials the test clients use."""

    ward: MosquittoBroker
    central: MosquittoBroker
    uplink: Uplink
    edc_tls: ssl.SSLContext
    monitoring_tls: ssl.SSLContext
    passwords: dict[str, str]


def ward_passwords(path: Path, passwords: dict[str, str]) -> Path:
    """The ward broker's password file, made with mosquitto_passwd as deploy/README.md says."""
    path.write_text("")
    for user, password in passwords.items():
        subprocess.run(
            ["mosquitto_passwd", "-b", str(path), user, password], check=True, capture_output=True
        )
    return path


@contextlib.asynccontextmanager
async def bridged_site(tmp_path: Path) -> AsyncIterator[Site]:
    """Central broker, uplink relay and ward broker, all from the shipped configs."""
    require_real(mosquitto_binary() is not None, "mosquitto is not installed")
    require_real(shutil.which("mosquitto_passwd") is not None, "mosquitto_passwd is missing")
    pki = tmp_path / "pki"
    pki.mkdir()
    ca = trustme.CA()
    ca_pem = _pem(pki, "hospital-ca.pem", ca.cert_pem)
    server = ca.issue_cert("127.0.0.1", "localhost", common_name="mqtt-central")
    bridge = ca.issue_cert(BRIDGE_ID, common_name=BRIDGE_ID)
    edc = ca.issue_cert("edc", common_name="edc")
    monitoring = ca.issue_cert("monitoring", common_name="monitoring")

    central_dir = tmp_path / "central"
    central_dir.mkdir()
    shutil.copy(DEPLOY / "central-example.acl", central_dir / "central.acl")
    central_port = free_port()
    central = MosquittoBroker(
        workdir=central_dir,
        port=central_port,
        name="central",
        config=debian_mosquitto(
            central_dir,
            "central.conf",
            render(
                (DEPLOY / "central-example.conf").read_text(),
                {
                    "listener": f"{central_port} 127.0.0.1",
                    "cafile": str(ca_pem),
                    "certfile": str(_pem(pki, "central.pem", server.cert_chain_pems[0])),
                    "keyfile": str(_pem(pki, "central.key", server.private_key_pem)),
                    "acl_file": str(central_dir / "central.acl"),
                },
            ),
        ),
    )
    ward_dir = tmp_path / "ward"
    ward_dir.mkdir()
    passwords = {"devicegw": "gw-secret", "devicegw-monitor": "monitor-secret"}
    passwd = ward_passwords(ward_dir / "devicegw-ward.passwd", passwords)
    shutil.copy(DEPLOY / "devicegw-ward.acl", ward_dir / "devicegw-ward.acl")
    central.start()
    try:
        async with Uplink(central_port) as uplink:
            ward_port = free_port()
            ward = MosquittoBroker(
                workdir=ward_dir,
                port=ward_port,
                name="ward",
                config=debian_mosquitto(
                    ward_dir,
                    "devicegw-ward.conf",
                    render(
                        (DEPLOY / "devicegw-ward.conf").read_text(),
                        {
                            "listener": f"{ward_port} 127.0.0.1",
                            "password_file": str(passwd),
                            "acl_file": str(ward_dir / "devicegw-ward.acl"),
                            "address": f"127.0.0.1:{uplink.port}",
                            "bridge_cafile": str(ca_pem),
                            "bridge_certfile": str(
                                _pem(pki, "bridge.pem", bridge.cert_chain_pems[0])
                            ),
                            "bridge_keyfile": str(_pem(pki, "bridge.key", bridge.private_key_pem)),
                        },
                    ),
                ),
            )
            ward.start()
            try:
                yield Site(
                    ward,
                    central,
                    uplink,
                    client_context(ca, edc),
                    client_context(ca, monitoring),
                    passwords,
                )
            finally:
                ward.stop()
    finally:
        central.stop()


def identity(event: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in event.items() if k != "delivery"}


def dose_ids(col: Collector) -> set[str]:
    return {m.json()["event_id"] for m in col.matching("/dose/")}


@pytest.mark.timeout(420)
async def test_uplink_cut_for_a_minute_while_sessions_finish(tmp_path: Path) -> None:
    clock = ScaledClock(SCALE)
    async with contextlib.AsyncExitStack() as stack:
        site = await stack.enter_async_context(bridged_site(tmp_path))
        ward, central, uplink, passwords = site.ward, site.central, site.uplink, site.passwords
        edc = await stack.enter_async_context(
            collecting(
                central.host,
                central.port,
                [EDC_TOPIC],
                client_id="edc",
                persistent=True,
                tls_context=site.edc_tls,
            )
        )
        # The hospital's monitoring watches the bridge's state on the central broker.
        central_watch = await stack.enter_async_context(
            collecting(
                central.host,
                central.port,
                [f"$SYS/broker/connection/{BRIDGE_ID}/state"],
                tls_context=site.monitoring_tls,
            )
        )
        monitor = await stack.enter_async_context(
            collecting(
                ward.host,
                ward.port,
                ["devicegw/v2/#", "$SYS/broker/connection/#"],
                username="devicegw-monitor",
                password=passwords["devicegw-monitor"],
            )
        )
        (tmp_path / "mqtt.pass").write_text(passwords["devicegw"] + "\n")
        sims = []
        for i, name in enumerate(SCENARIO_NAMES):
            sim = Vm1PtySimulator(
                load_scenario(SCENARIOS / f"{name}.toml"),
                clock=clock,
                link_dir=tmp_path,
                name=f"vm1-{i}",
            )
            sims.append(await stack.enter_async_context(sim))
        config = parse_config(
            {
                "gateway": {"id": "gw-ward3", "site": "site-042", "data_dir": str(tmp_path / "gw")},
                "broker": {
                    "host": ward.host,
                    "port": ward.port,
                    "username": "devicegw",
                    "password_file": str(tmp_path / "mqtt.pass"),
                },
                "devices": [device_entry(i + 1, str(s.path)) for i, s in enumerate(sims)],
            },
            sha256="0" * 64,
        )
        gateway = Gateway(config, clock=clock)
        task = asyncio.create_task(gateway.run(), name="gateway-under-test")
        try:
            # 1. The path works end to end: a dose event reaches the EDC over the bridge.
            await edc.wait_for(lambda m: len(m) >= 1, 90)

            # 2. The uplink goes down for a minute while sessions finish on the ward.
            uplink.cut()
            cut_at = time.monotonic()
            on_ward_at_cut = dose_ids(monitor)  # a superset of what may have crossed
            await monitor.wait_for(
                lambda m: (
                    len({x.json()["event_id"] for x in m if "/dose/" in x.topic})
                    >= len(on_ward_at_cut) + 3
                ),
                CUT_S,
            )
            # The ward broker took them (PUBACK): the gateway's outbox is empty.
            while gateway.publisher.outbox.depth() > 0:
                assert time.monotonic() - cut_at < CUT_S, "the ward broker did not take the events"
                await asyncio.sleep(0.2)
            await asyncio.sleep(max(0.0, CUT_S - (time.monotonic() - cut_at)))  # the outage
            during_cut = dose_ids(monitor) - on_ward_at_cut
            assert dose_ids(edc) <= on_ward_at_cut, "an event crossed a cut uplink"
            # The central broker gave the silent bridge up (keepalive) and said so (last will).
            assert [m.payload for m in central_watch.messages][-1:] == [b"0"]
            uplink.restore()

            # 3. Every dose event reaches the EDC.
            await monitor.wait_for(
                lambda m: (
                    len({x.json()["event_id"] for x in m if "/dose/" in x.topic}) >= EXPECTED_EVENTS
                ),
                120,
            )
            await edc.wait_for(
                lambda m: len({x.json()["event_id"] for x in m}) >= EXPECTED_EVENTS, 120
            )
            await central_watch.wait_for(lambda m: m[-1].payload == b"1", 30)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # None lost: the EDC has every event the gateway committed and published.
    published = dose_ids(monitor)
    assert len(published) == EXPECTED_EVENTS
    assert dose_ids(edc) == published
    assert all(holds_event(gateway.publisher.outbox, e) for e in published)
    assert len(during_cut) >= 3
    # Duplicates only as the contract allows: same event_id, identical record bar `delivery`.
    first: dict[str, dict[str, Any]] = {}
    for m in edc.messages:
        event = m.json()
        assert identity(first.setdefault(event["event_id"], event)) == identity(event)
    assert all(m.qos == 1 for m in edc.messages)
    assert_all_valid(edc)
    # They crossed on a new bridge connection: the central broker had dropped the silent
    # one (keepalive), and what the old one carried unacknowledged was sent again.
    assert uplink.connections >= 2
    # Connected again after the cut, on both sides.
    states = [m.payload for m in monitor.matching(f"$SYS/broker/connection/{BRIDGE_ID}/state")]
    assert states and states[-1] == b"1"
    assert [m.payload for m in central_watch.messages][-1:] == [b"1"]
