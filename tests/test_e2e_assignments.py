"""Bedside assignment end to end (issue 11): pty VM-1 -> daemon -> Mosquitto.

The assignment is made while the daemon runs, through the daemon's one way in
(``Gateway.assignments``, which the ``devicegw assign`` socket, MQTT and the
dashboard call too), and the dose event on the broker carries it; the audit
trail verifies afterwards.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from devicegw.runtime.assignment_commands import AssignRequest
from devicegw.storage.audit import verify
from devicegw.storage.store import Store
from simulators.scenario import Scenario, parse_scenario
from tests.e2e_harness import E2E, running
from tests.mqtt_helpers import MosquittoBroker

pytestmark = pytest.mark.e2e


def scenario(serial: str, start_s: float) -> Scenario:
    return parse_scenario(
        {
            "device": {"serial_no": serial, "last_session_no": 41, "mains": True},
            "sessions": [
                {
                    "fill_at_s": start_s - 5,
                    "fill_ul": 3000,
                    "start_at_s": start_s,
                    "rate_ul_min": 900,
                }
            ],
        },
        source=f"{serial}.toml",
    )


def assign(e2e: E2E, subject: str | None, kit: str | None, *, end: bool = False) -> None:
    result = e2e.gateway.assignments.apply(
        AssignRequest(
            bed="B01",
            subject_id=subject,
            kit_number=kit,
            end=end,
            operator="nurse.lee",
            reason="bedside",
            channel="cli",
        )
    )
    assert result.applied, result.message


async def until_session_open(e2e: E2E) -> None:
    """Telemetry flows only while a session runs (OUTPUT: NEBULIZING or PAUSED)."""
    await e2e.collector.wait_for(lambda msgs: any("/telemetry/" in m.topic for m in msgs), 30)
    assert e2e.gateway.snapshot().devices["neb-bed01"].open_session is not None


def audit_ok(tmp_path: Path) -> None:
    with Store.in_dir(tmp_path / "gw-data") as store:
        assert verify(store).ok


async def test_assigned_while_running_then_reassigned_mid_session(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    events: list[dict[str, Any]]
    async with running(mosquitto, tmp_path, [scenario("VM1-000501", 60)]) as e2e:
        # The config seeded CVD-042-0001; the nurse assigns the bed's real subject.
        assign(e2e, "CVD-042-0077", "K-0077")
        await until_session_open(e2e)
        assign(e2e, "CVD-042-0078", "K-0078")  # the next subject, while the dose runs
        events = await e2e.wait_dose_events(1)
    [event] = events
    assert (event["subject_id"], event["kit_number"]) == ("CVD-042-0077", "K-0077")
    assert "assignment_changed_during_session" in event["reasons"]
    assert event["verdict"] == "complete"
    audit_ok(tmp_path)


async def test_unassigned_bed_publishes_a_dose_with_no_subject(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    unassigned = {"subject_id": None, "kit_number": None}
    async with running(
        mosquitto, tmp_path, [scenario("VM1-000502", 30)], device_extra=unassigned
    ) as e2e:
        [event] = await e2e.wait_dose_events(1)
    assert event["subject_id"] is None and event["kit_number"] is None
    assert "unassigned" in event["reasons"]
    audit_ok(tmp_path)


async def test_an_ended_assignment_leaves_the_next_dose_unassigned(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    async with running(mosquitto, tmp_path, [scenario("VM1-000503", 60)]) as e2e:
        assign(e2e, None, None, end=True)  # discharged before the session
        [event] = await e2e.wait_dose_events(1)
    assert event["subject_id"] is None
    assert "unassigned" in event["reasons"]
    audit_ok(tmp_path)


async def devicegw_assign(config: Path, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "devicegw.cli",
        "assign",
        "--config",
        str(config),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def cli_config(tmp_path: Path) -> Path:
    path = tmp_path / "cli.toml"
    path.write_text(
        f'[gateway]\nid = "gw-test"\nsite = "site-042"\ndata_dir = "{tmp_path / "gw-data"}"\n'
        '[broker]\nhost = "127.0.0.1"\n',
        encoding="utf-8",
    )
    return path


async def test_devicegw_assign_talks_to_the_running_daemon(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    """The real command over the daemon's socket: applied (0), refused (2), unreachable (1)."""
    cfg = cli_config(tmp_path)
    who = ("--operator", "nurse.lee", "--reason", "admission")
    async with running(mosquitto, tmp_path, [scenario("VM1-000504", 120)]) as e2e:
        await e2e.collector.wait_for(lambda msgs: any("/status" in m.topic for m in msgs), 30)
        rc, out, err = await devicegw_assign(
            cfg, "--bed", "B01", "--subject", "CVD-042-0090", "--kit", "K-0090", *who
        )
        assert rc == 0, err
        assert "CVD-042-0090" in out
        rc, out, err = await devicegw_assign(
            cfg, "--bed", "B77", "--subject", "CVD-042-0091", "--kit", "K-0091", *who
        )
        assert rc == 2
        assert "refused: bed B77 has no nebulizer" in err
        rc, _, err = await devicegw_assign(cfg, "--bed", "B01", "--end", "--subject", "X", *who)
        assert rc == 2 and "no subject or kit" in err
        [event] = await e2e.wait_dose_events(1)
    assert (event["subject_id"], event["kit_number"]) == ("CVD-042-0090", "K-0090")
    rc, _, err = await devicegw_assign(
        cfg, "--bed", "B01", "--subject", "CVD-042-0092", "--kit", "K-0092", *who
    )
    assert rc == 1 and "not reachable" in err  # the daemon has stopped
    with Store.in_dir(tmp_path / "gw-data") as store:
        assert verify(store).ok
        rows = store.conn.execute(
            "SELECT body FROM audit WHERE kind = 'bed_assigned' ORDER BY seq"
        ).fetchall()
    channels = [json.loads(r[0])["channel"] for r in rows]
    assert channels == ["config", f"cli (uid {os.getuid()})"]  # the kernel's word for who
