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
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from devicegw.runtime.assignment_commands import AssignRequest
from devicegw.storage.audit import verify
from devicegw.storage.store import Store
from simulators.scenario import Scenario, parse_scenario
from tests.e2e_harness import E2E, running
from tests.mqtt_helpers import MosquittoBroker, acl_mosquitto

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


async def devicegw_cli(command: str, config: Path, *args: str) -> tuple[int, str, str]:
    """The real command line in a process of its own: (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "devicegw.cli",
        command,
        "--config",
        str(config),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def devicegw_assign(config: Path, *args: str) -> tuple[int, str, str]:
    return await devicegw_cli("assign", config, *args)


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
    """The real command over the daemon's socket: applied (0), refused (2), unreachable (1);
    the kit list, kit reuse and its override; the dose numbered by the schedule."""
    cfg = cli_config(tmp_path)
    kits = tmp_path / "kits.csv"
    kits.write_text(
        "kit_number,subject_id\nK-0090,CVD-042-0090\nK-0091,CVD-042-0091\n", encoding="utf-8"
    )
    sections = {
        "trial": {"study_id": "CVD-042", "time_zone": "Europe/Berlin", "kit_list": str(kits)},
        "schedule": {},
    }
    who = ("--operator", "nurse.lee", "--reason", "admission")
    unassigned = {"subject_id": None, "kit_number": None}
    async with running(
        mosquitto,
        tmp_path,
        # The session starts 15 s (real) after the gateway: time for five CLI processes.
        [scenario("VM1-000504", 1500)],
        device_extra=unassigned,
        sections=sections,
    ) as e2e:
        await e2e.collector.wait_for(lambda msgs: any("/status" in m.topic for m in msgs), 30)
        rc, _, err = await devicegw_assign(
            cfg, "--bed", "B01", "--subject", "CVD-042-0090", "--kit", "K-0091", *who
        )
        assert rc == 2 and "not listed for subject CVD-042-0090" in err
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
        # The kit was used by that dose: giving it again needs an override reason.
        again = ("--bed", "B01", "--subject", "CVD-042-0090", "--kit", "K-0090", *who)
        rc, _, err = await devicegw_assign(cfg, *again)
        assert rc == 2 and "already used" in err
        rc, _, err = await devicegw_assign(cfg, *again, "--override-reason", "pharmacy re-issue")
        assert rc == 0, err
    assert (event["subject_id"], event["kit_number"]) == ("CVD-042-0090", "K-0090")
    assert event["dose_number"] == 1
    assert event["schedule"]["in_window"] is True
    assert event["schedule"]["time_zone"] == "Europe/Berlin"
    rc, _, err = await devicegw_assign(
        cfg, "--bed", "B01", "--subject", "CVD-042-0091", "--kit", "K-0091", *who
    )
    assert rc == 1 and "not reachable" in err  # the daemon has stopped
    with Store.in_dir(tmp_path / "gw-data") as store:
        assert verify(store).ok
        rows = store.conn.execute(
            "SELECT kind, body FROM audit WHERE kind IN ('bed_assigned', 'assignment_refused') "
            "ORDER BY seq"
        ).fetchall()
    uid = f"cli (uid {os.getuid()})"  # the kernel's word for who asked
    assert [(k, json.loads(b)["channel"]) for k, b in rows] == [
        ("assignment_refused", uid),  # kit not on the list
        ("bed_assigned", uid),
        ("assignment_refused", uid),  # no such bed
        ("assignment_refused", uid),  # an end with a subject
        ("assignment_refused", uid),  # the kit again, no override
        ("bed_assigned", uid),  # with the override reason
    ]


# -- over MQTT: the site's IWRS pushes assignments --------------------------------------

MQTT_USERS = {"devicegw-gw": "gw-pw", "iwrs": "iwrs-pw", "edc": "edc-pw", "blinded-dm": "dm-pw"}


@pytest.fixture
def acl_broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    with acl_mosquitto(tmp_path, MQTT_USERS) as broker:
        yield broker


async def ask_over_mqtt(
    broker: MosquittoBroker, user: str, as_level: str, base: str, command: dict[str, Any]
) -> dict[str, Any] | None:
    """Publish ``command`` as ``user`` to ``cmd/assign/{as_level}`` (MQTT 5, with a response
    topic and correlation data); the answer, or None if none came within 5 s."""
    response_topic = f"{base}/cmd/assign-response/{user}"
    correlation = uuid.uuid4().bytes
    async with aiomqtt.Client(
        broker.host,
        broker.port,
        username=user,
        password=MQTT_USERS[user],
        protocol=aiomqtt.ProtocolVersion.V5,
    ) as client:
        await client.subscribe(response_topic, qos=1)
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = response_topic
        props.CorrelationData = correlation
        await client.publish(
            f"{base}/cmd/assign/{as_level}", json.dumps(command), qos=1, properties=props
        )
        try:
            async with asyncio.timeout(5):
                async for message in client.messages:
                    assert message.properties is not None
                    assert message.properties.CorrelationData == correlation
                    answer: dict[str, Any] = json.loads(message.payload)  # type: ignore[arg-type]
                    return answer
        except TimeoutError:
            return None
    return None


async def test_assign_over_mqtt_from_an_allowed_account_only(
    acl_broker: MosquittoBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEVICEGW_TEST_GW_PASSWORD", MQTT_USERS["devicegw-gw"])
    command = {
        "bed": "B01",
        "subject_id": "CVD-042-0123",
        "kit_number": "K-0123",
        "operator": "iwrs",
        "reason": "randomised",
    }
    gw_auth = {
        "username": "devicegw-gw",
        "password_env": "DEVICEGW_TEST_GW_PASSWORD",
        "assign_users": ["iwrs"],
    }
    async with running(
        acl_broker,
        tmp_path,
        [scenario("VM1-000505", 1200)],  # 12 s at 100x: time to assign first
        broker_extra=gw_auth,
        collector_auth=("blinded-dm", MQTT_USERS["blinded-dm"]),  # the blinded feed
    ) as e2e:
        await e2e.collector.wait_for(lambda msgs: any("/status" in m.topic for m in msgs), 30)
        await until_subscribed(e2e)
        base = e2e.topics.base
        # Another valid account, on its own level: refused by the gateway, and told so.
        other = await ask_over_mqtt(
            acl_broker, "edc", "edc", base, {**command, "kit_number": "K-9"}
        )
        assert other is not None and other["event_type"] == "assign_answer"
        assert (other["applied"], other["message"]) == (False, "account edc may not assign")
        # The IWRS itself: applied.
        answer = await ask_over_mqtt(acl_broker, "iwrs", "iwrs", base, command)
        assert answer is not None and answer["applied"] is True, answer
        # Another account posing as the IWRS: the broker drops it (ACL); no answer.
        posing = await ask_over_mqtt(
            acl_broker, "edc", "iwrs", base, {**command, "kit_number": "K8"}
        )
        assert posing is None
        [event] = await e2e.wait_dose_events(1)
        assert e2e.gateway.assign_command is not None
        assert e2e.gateway.assign_command.commands == 2  # the posing one never arrived
    assert (event["subject_id"], event["kit_number"]) == ("CVD-042-0123", "K-0123")
    with Store.in_dir(tmp_path / "gw-data") as store:
        assert verify(store).ok
        rows = store.conn.execute("SELECT kind, body FROM audit ORDER BY seq").fetchall()
    mqtt_rows = [(k, json.loads(b)) for k, b in rows if '"mqtt (' in b]
    assert [(k, b["channel"]) for k, b in mqtt_rows] == [
        ("assignment_refused", "mqtt (edc)"),
        ("bed_assigned", "mqtt (iwrs)"),
    ]


async def until_subscribed(e2e: E2E) -> None:
    """The gateway subscribes right after its birth message; give the SUBACK a moment."""
    for _ in range(100):
        if e2e.gateway.publisher.stats.connected:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)


# -- corrections: a recorded dose re-attributed or voided, the original intact -----------


async def devicegw_correct(config: Path, *args: str) -> tuple[int, str, str]:
    return await devicegw_cli("correct", config, *args)


async def test_a_correction_supersedes_a_dose_and_the_export_applies_it(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    cfg = cli_config(tmp_path)
    who = ("--operator", "dm.keller", "--reason", "bed assigned late")
    unassigned = {"subject_id": None, "kit_number": None}
    async with running(
        mosquitto,
        tmp_path,
        [scenario("VM1-000506", 20), scenario("VM1-000507", 20)],
        device_extra=unassigned,
    ) as e2e:
        events = await e2e.wait_dose_events(2)
        late, test_run = sorted(events, key=lambda e: e["device"]["serial_no"])
        rc, out, err = await devicegw_correct(
            cfg, "--event", late["event_id"], "--subject", "CVD-042-0031", "--kit", "K-0031", *who
        )
        assert rc == 0, err
        rc, _, err = await devicegw_correct(cfg, "--event", test_run["event_id"], "--void", *who)
        assert rc == 0, err
        rc, _, err = await devicegw_correct(
            cfg, "--event", "4f6d068d-fc9d-552c-862c-d4ddafdebcb4", "--void", *who
        )
        assert rc == 2 and "no dose" in err
        await e2e.collector.wait_for(
            lambda msgs: len([m for m in msgs if "/dose-correction/" in m.topic]) >= 2, 30
        )
        corrections = [m.json() for m in e2e.collector.matching("/dose-correction/")]
        dose_lines = [m.payload.decode() for m in e2e.collector.matching("/dose/")]
    by_target = {c["supersedes"]: c for c in corrections}
    fix = by_target[late["event_id"]]
    assert (fix["action"], fix["subject_id"], fix["kit_number"]) == (
        "reattribute",
        "CVD-042-0031",
        "K-0031",
    )
    assert fix["previous_subject_id"] is None and fix["sequence"] == 1
    assert by_target[test_run["event_id"]]["action"] == "void"
    # The original records are untouched in the gateway's store; the audit verifies.
    with Store.in_dir(tmp_path / "gw-data") as store:
        assert verify(store).ok
        stored = store.conn.execute(
            "SELECT payload FROM outbox WHERE event_id = ?", (late["event_id"],)
        ).fetchone()
    assert json.loads(stored[0])["subject_id"] is None
    # The export (as the EDC stored the feed) applies both corrections.
    jsonl = tmp_path / "edc.jsonl"
    jsonl.write_text(
        "".join(line + "\n" for line in dose_lines)
        + "".join(json.dumps(c) + "\n" for c in corrections),
        encoding="utf-8",
    )
    export_cfg = tmp_path / "export.toml"
    export_cfg.write_text(
        cli_config(tmp_path).read_text() + '[trial]\nstudy_id = "CVD-042"\ntime_zone = "UTC"\n',
        encoding="utf-8",
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "devicegw.cli",
        "export",
        "--config",
        str(export_cfg),
        "--input",
        str(jsonl),
        "--format",
        "fhir",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err
    assert b"1 voided dose event(s) left out" in err
    [entry] = json.loads(out)["entry"]
    assert entry["resource"]["id"] == late["event_id"]
    assert entry["resource"]["subject"]["identifier"]["value"] == "CVD-042-0031"
