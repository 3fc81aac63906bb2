"""The command line as users run it: real processes, real ptys, real Mosquitto."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.mqtt_helpers import MosquittoBroker, collecting

ROOT = Path(__file__).resolve().parent.parent
DEVICEGW = [sys.executable, "-m", "devicegw.cli"]


def run_cli(
    *args: str, timeout: float = 60, columns: int | None = None
) -> subprocess.CompletedProcess[str]:
    """The CLI as a process; ``columns`` sets the terminal width rich lays text out for."""
    env = None if columns is None else {**os.environ, "COLUMNS": str(columns)}
    return subprocess.run(
        [*DEVICEGW, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
        env=env,
    )


def test_check_config_ok(tmp_path: Path) -> None:
    """The example, with its CA file and data directory on this machine, passes whole."""
    import trustme

    ca = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca))
    text = (ROOT / "config" / "ward.toml").read_text()
    assert '"/etc/devicegw/ca.pem"' in text and '"var/devicegw"' in text
    local = tmp_path / "ward.toml"
    local.write_text(
        text.replace("/etc/devicegw/ca.pem", str(ca)).replace("var/devicegw", str(tmp_path / "d"))
    )
    res = run_cli("check-config", str(local))
    assert res.returncode == 0, res.stderr
    assert "OK" in res.stdout
    assert "neb-bed01" in res.stdout


def test_check_config_checks_the_machine_as_run_does() -> None:
    """The example as shipped names a CA file of the ward's machine: refused here, by both."""
    for cmd in (("check-config", "config/ward.toml"), ("run", "--config", "config/ward.toml")):
        res = run_cli(*cmd, timeout=20)
        assert res.returncode == 2, res
        assert "broker.tls.ca_file" in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1
    res = run_cli("check-config", "--file-only", "config/ward.toml")
    assert res.returncode == 0, res.stderr
    assert "NOT checked" in res.stdout


def test_bad_config_stops_the_daemon_with_one_message(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[gateway]\nid = "gw"\nsite = "s"\n[[devices]]\nid = "n1"\ntype = "nebulizer-x"\n'
        'bed = "B1"\nsubject_id = "CVD-1"\nkit_number = "K1"\nlink = { port = "/dev/x" }\n'
    )
    for cmd in (("check-config", str(bad)), ("run", "--config", str(bad))):
        res = run_cli(*cmd, timeout=20)
        assert res.returncode == 2
        assert "devices[0].type" in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1


def test_simulate_rejects_bad_scenario(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n[device]\nserial_no = "A"\n[[sessions]]\nrate_ul_min = -1\n')
    res = run_cli("simulate", "--scenario", str(bad), "--link-dir", str(tmp_path), timeout=20)
    assert res.returncode != 0
    assert "bad.toml" in res.stderr


@pytest.mark.e2e
async def test_daemon_and_simulator_processes(mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    """`devicegw simulate` and `devicegw run` as separate processes sharing a time scale."""
    scale = "60"
    sim = await asyncio.create_subprocess_exec(
        *DEVICEGW,
        "simulate",
        "--scenario",
        "simulators/scenarios/user_stop_half.toml",
        "--link-dir",
        str(tmp_path),
        "--time-scale",
        scale,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert sim.stdout is not None
        line = (await asyncio.wait_for(sim.stdout.readline(), 20)).decode()
        port = line.split()[1]
        assert Path(port).is_symlink(), line  # noqa: ASYNC240
        cfg = tmp_path / "gw.toml"
        cfg.write_text(
            f'[gateway]\nid = "gw-proc"\nsite = "s1"\ndata_dir = "{tmp_path / "data"}"\n'
            f'[broker]\nhost = "127.0.0.1"\nport = {mosquitto.port}\n'
            f'[[devices]]\nid = "neb1"\ntype = "vm1"\nbed = "B1"\nsubject_id = "CVD-001"\n'
            f'kit_number = "K-1"\nlink = {{ kind = "serial", port = "{port}" }}\n'
        )
        async with collecting("127.0.0.1", mosquitto.port, ["devicegw/v2/#"]) as col:
            gw = await asyncio.create_subprocess_exec(
                *DEVICEGW,
                "run",
                "--config",
                str(cfg),
                "--time-scale",
                scale,
                cwd=ROOT,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            try:
                await col.wait_for(lambda m: any("/dose/" in x.topic for x in m), 60)
                await asyncio.sleep(2.5)  # one health refresh after the event
                status = run_cli("status", "--config", str(cfg), "--json", timeout=20)
            finally:
                gw.send_signal(signal.SIGTERM)
                _, err = await asyncio.wait_for(gw.communicate(), 20)
            # A clean stop publishes the offline status itself.
            await col.wait_for(
                lambda m: any(
                    x.json()["event_type"] == "gateway_status" and not x.json()["online"] for x in m
                ),
                10,
            )
        assert gw.returncode == 0
        assert status.returncode == 0, status.stdout + status.stderr
        health = json.loads(status.stdout)
        assert health["stale"] is False
        assert health["broker"]["connected"] is True
        assert health["outbox_depth"] == 0
        assert health["broker"]["dose_events_published"] == 1
        dev = health["devices"]["neb1"]
        assert dev["connected"] is True
        assert dev["frames_ok"] > 100
        assert dev["last_frame_age_s"] is not None
        # Once the gateway is gone the snapshot goes stale and `status` says so.
        stale = run_cli("status", "--config", str(cfg), timeout=20)
        assert "gateway gw-proc" in stale.stdout
        [dose] = [m.json() for m in col.matching("/dose/")]
        assert dose["verdict"] == "partial"
        assert dose["device"]["serial_no"] == "VM1-000187"
        # Structured logs: every stderr line is one JSON object.
        records = [json.loads(x) for x in err.decode().splitlines() if x.strip()]
        assert any(r["msg"] == "session finished" and r["verdict"] == "partial" for r in records)
    finally:
        sim.send_signal(signal.SIGTERM)
        await asyncio.wait_for(sim.wait(), 20)


def test_demo_shows_session_and_event() -> None:
    # Wide enough that no line of the summary wraps, whatever its figures' widths.
    # 30x, not 100x: the demo bed's 25 s SpO2 dip is then almost a second of real time,
    # which a loaded host still samples (at 100x one run missed the alert).
    res = run_cli("demo", "--time-scale", "30", "--no-http", timeout=240, columns=500)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "dose-completion event" in res.stdout
    assert "verdict: complete" in res.stdout
    assert "SpO2 alert" in res.stdout  # the demo bed has an oximeter with a scripted dip
    assert "1 alert(s)" in res.stdout


def test_fatal_start_error_is_one_line(tmp_path: Path) -> None:
    """Issue 14 item 1: at start, what stops the gateway is said in one line, no traceback."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "devicegw.sqlite3").write_bytes(b"this is not a database\n" * 100)
    cfg = tmp_path / "gw.toml"
    cfg.write_text(
        f'[gateway]\nid = "gw-fatal"\nsite = "s1"\ndata_dir = "{data}"\nlog_format = "text"\n'
        '[broker]\nhost = "127.0.0.1"\nport = 1\n'
    )
    res = run_cli("run", "--config", str(cfg), timeout=30)
    assert res.returncode == 1, res
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("devicegw:")]
    assert len(lines) == 1, res.stderr
    assert "cannot start" in lines[0] and "devicegw.sqlite3" in lines[0]
