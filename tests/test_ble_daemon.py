"""The daemon over BLE end to end, as separate processes, as a person would run it.

``devicegw simulate --ble`` (private bus + patched bluezoo + a VM-1 GATT
peripheral on hci0) and ``devicegw run`` (unmodified bleak on hci1, found via
``DBUS_SYSTEM_BUS_ADDRESS`` as printed by the simulator) publishing to a private
Mosquitto; an EDC-like subscriber checks the dose event and every message
against the contract. A missing dbus-daemon, bluezoo or mosquitto skips locally
and fails under CI=true.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from devicegw import cli
from devicegw.edc.tail import TailProcessor
from simulators import ble_sandbox
from simulators.ble_sandbox import bluezoo_available, dbus_daemon_binary
from tests.mqtt_helpers import MosquittoBroker, Received, collecting, require
from tests.process_harness import DEVICEGW, ROOT, stop

SCALE = 50
SERIAL = "VM1-000123"
NAME = f"VM-1 {SERIAL}"
EXPORT = "export DBUS_SYSTEM_BUS_ADDRESS="
COMPLETE = ROOT / "simulators" / "scenarios" / "complete.toml"


def later_start(tmp_path: Path) -> Path:
    """complete.toml with its session 4.5 minutes later (fill 275 s, start 300 s: 6 s at 50x).

    The shipped scenario starts its session 30 s after power-on, 0.6 s at 50x:
    before a freshly started gateway process has scanned, connected and shaken
    hands, so it would (rightly) reconcile the session from the device log. With
    the later start the gateway is connected first (about 0.5-1.5 s after the
    simulator's announcement here) and follows the session live.
    """
    text = COMPLETE.read_text()
    for old, new in (
        ("fill_at_s = 5\n", "fill_at_s = 275\n"),
        ("start_at_s = 30\n", "start_at_s = 300\n"),
    ):
        assert text.count(old) == 1, f"complete.toml changed: {old!r}"
        text = text.replace(old, new)
    path = tmp_path / "complete_later.toml"
    path.write_text(text)
    return path


def gateway_config(path: Path, *, broker: MosquittoBroker, link_line: str, data_dir: Path) -> Path:
    """The device's link is the line ``devicegw simulate --ble`` printed, verbatim."""
    path.write_text(
        f'[gateway]\nid = "gw-ble"\nsite = "s1"\ndata_dir = "{data_dir}"\n'
        f'[broker]\nhost = "{broker.host}"\nport = {broker.port}\n'
        "reconnect_initial_s = 0.2\nreconnect_max_s = 1.0\n"
        '[[devices]]\nid = "neb1"\ntype = "vm1"\nbed = "B1"\nsubject_id = "CVD-001"\n'
        f'kit_number = "K-1"\nexpected_serial = "{SERIAL}"\n{link_line}\n'
    )
    return path


def tail(path: Path) -> str:
    return path.read_text(errors="replace")[-4000:] if path.exists() else "(no log)"


@contextlib.asynccontextmanager
async def process(
    *args: str, log: Path, env: dict[str, str] | None = None, stdout: int | None = None
) -> AsyncIterator[asyncio.subprocess.Process]:
    """``devicegw <args>``, stderr into ``log``; SIGTERM (bounded) on the way out."""
    with open(log, "ab") as err:  # noqa: ASYNC230 - opening a log file once
        proc = await asyncio.create_subprocess_exec(
            *DEVICEGW,
            *args,
            cwd=ROOT,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=stdout if stdout is not None else asyncio.subprocess.DEVNULL,
            stderr=err,
        )
    try:
        yield proc
    finally:
        try:
            await stop(proc)
        except TimeoutError:
            proc.kill()
            await asyncio.wait_for(proc.wait(), 10)
            raise


async def read_announcement(
    proc: asyncio.subprocess.Process, log: Path, links: int = 1, within_s: float = 30.0
) -> list[str]:
    """The simulator's lines up to and including its ``links``-th config line."""
    assert proc.stdout is not None
    lines: list[str] = []

    async def read() -> None:
        assert proc.stdout is not None
        while sum(line.startswith("link = ") for line in lines) < links:
            raw = await proc.stdout.readline()
            if not raw:
                raise AssertionError(
                    f"devicegw simulate --ble exited ({await proc.wait()}) after {lines}; "
                    f"stderr: {tail(log)}"
                )
            lines.append(raw.decode().rstrip("\n"))

    try:
        await asyncio.wait_for(read(), within_s)
    except TimeoutError:
        raise AssertionError(f"no announcement in {within_s} s: {lines}; {tail(log)}") from None
    return lines


def check_all(messages: list[Received]) -> tuple[list[str], list[str]]:
    """Every message through the tail's strict contract checks: errors and sequence notes."""
    processor = TailProcessor()  # unknown fields are errors, sequences checked
    errors: list[str] = []
    notes: list[str] = []
    for m in messages:
        result = processor.process(m.topic, m.payload, m.retain, m.qos)
        errors += [f"{m.topic}: {e}" for e in result.errors]
        notes += [f"{m.topic}: {w}" for w in result.warnings]
    return errors, notes


@pytest.mark.e2e
@pytest.mark.timeout(150)
async def test_daemon_over_ble_publishes_the_live_dose_event(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    require(dbus_daemon_binary() is not None, "dbus-daemon is not installed (apt: dbus-daemon)")
    require(bluezoo_available(), "bluezoo is not installed (pip: devicegw[ble-sim])")
    sim_log, gw_log = tmp_path / "simulate.log", tmp_path / "gateway.log"
    scenario = later_start(tmp_path)
    async with process(
        "simulate", "--ble", "--scenario", str(scenario), "--time-scale", str(SCALE),
        log=sim_log, stdout=asyncio.subprocess.PIPE,
    ) as sim:  # fmt: skip
        lines = await read_announcement(sim, sim_log)
        # One line per device, the export line, a comment, one config line per device.
        assert lines[0].split("  ")[:3] == [SERIAL, f'"{NAME}"', "on hci0 (00:00:5E:00:53:01)"]
        [export] = [line for line in lines if line.startswith(EXPORT)]
        bus_address = export.removeprefix(EXPORT)
        assert bus_address.startswith("unix:path=/tmp/devicegw-bz-")
        link_line = lines[-1]
        assert link_line == f'link = {{ kind = "ble", name = "{NAME}", adapter = "hci1" }}'

        config = gateway_config(
            tmp_path / "gw.toml", broker=mosquitto, link_line=link_line, data_dir=tmp_path / "d"
        )
        env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": bus_address}
        async with (
            collecting(mosquitto.host, mosquitto.port, ["devicegw/#"]) as col,
            process(
                "run", "--config", str(config), "--time-scale", str(SCALE), log=gw_log, env=env
            ) as gw,
        ):
            try:
                await col.wait_for(lambda ms: any("/dose/" in m.topic for m in ms), 60)
            except TimeoutError:
                raise AssertionError(
                    f"no dose event in 60 s; gateway: {tail(gw_log)}\nsimulator: {tail(sim_log)}"
                ) from None
            await asyncio.sleep(0.5)  # the device status that follows the session end
            await stop(gw)
            assert gw.returncode == 0, tail(gw_log)
            await asyncio.sleep(0.3)  # the gateway's goodbye status
            messages = list(col.messages)
        await stop(sim)
        assert sim.returncode == 0, tail(sim_log)
    # The simulator tore its world down: the bus directory is gone.
    assert not Path(bus_address.removeprefix("unix:path=")).parent.exists()

    [dose] = [m.json() for m in messages if "/dose/" in m.topic]
    assert dose["session_no"] == 42
    assert dose["device"]["serial_no"] == SERIAL
    assert dose["verdict"] == "complete", dose["reasons"]
    [detail] = [m.json() for m in messages if "/dose-detail/" in m.topic]
    assert detail["event_id"] == dose["event_id"]
    assert detail["end_reason"] == "COMPLETE"
    assert dose["data_source"] == "live", "the gateway was connected before the session started"
    statuses = [m.json() for m in messages if m.topic.endswith("/device/neb1/status")]
    assert any(s["connected"] and s["identity"]["serial_no"] == SERIAL for s in statuses)

    errors, notes = check_all(messages)
    assert errors == []
    assert notes == []
    kinds = {m.json()["event_type"] for m in messages}
    assert {"gateway_status", "device_status", "dose_completion", "dose_detail"} <= kinds


# --------------------------------------------------------------------------- missing parts


def simulate_ble() -> list[str]:
    return ["simulate", "--ble", "--scenario", str(COMPLETE), "--time-scale", str(SCALE)]


def test_missing_dbus_daemon_is_one_clear_error_and_status_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setattr(ble_sandbox, "dbus_daemon_binary", lambda: None)
    assert cli.main(simulate_ble()) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith("devicegw simulate --ble: dbus-daemon is not installed")
    assert "apt-get install dbus-daemon" in err


def test_missing_bluezoo_is_one_clear_error_and_status_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setattr(ble_sandbox, "dbus_daemon_binary", lambda: "/usr/bin/dbus-daemon")
    monkeypatch.setitem(sys.modules, "bluezoo", None)  # import bluezoo -> ImportError
    assert cli.main(simulate_ble()) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith("devicegw simulate --ble: bluezoo is not installed")
    assert "devicegw[ble-sim]" in err


def test_two_scenarios_with_one_serial_are_refused_before_anything_starts(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    argv = [*simulate_ble(), "--scenario", str(COMPLETE)]
    assert cli.main(argv) == 2
    _, err = capsys.readouterr()
    assert "VM1-000123" in err and "own serial number" in err


def test_peripherals_get_an_adapter_each_and_never_the_gateways() -> None:
    assert ble_sandbox.peripheral_adapters(1) == ["hci0"]
    assert ble_sandbox.peripheral_adapters(3) == ["hci0", "hci2", "hci3"]
