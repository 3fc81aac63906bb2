"""devicegw tail and the reference EDC client: the pure core, then end to end on Mosquitto."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from devicegw.contract.payloads import (
    DeviceDetail,
    DeviceIdentity,
    DeviceStatus,
    GatewayStatus,
    Telemetry,
    TelemetryDetail,
)
from devicegw.contract.schemas import MODELS, schemas, strict_schemas
from devicegw.edc import client, tail
from devicegw.edc.ack_store import AckStore, AckStoreError, StoreOutcome
from devicegw.edc.client import run_edc_client
from devicegw.edc.tail import (
    Printer,
    SequenceChecker,
    TailOptions,
    TailProcessor,
    contract_validators,
)
from devicegw.mqtt.publisher import stamp
from tests.mqtt_helpers import MosquittoBroker
from tests.test_contract import real_dose_event_json

ROOT = Path(__file__).resolve().parent.parent
BASE = "devicegw/v2/site-042/gw1"
DOSE_TOPIC = f"{BASE}/dose/neb-bed01"
NOW = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)


# -- payloads from the real models ---------------------------------------------------


def dose(**changes: Any) -> dict[str, Any]:
    event: dict[str, Any] = json.loads(real_dose_event_json())
    event.update(changes)
    return event


def gateway_status(online: bool = True) -> dict[str, Any]:
    status = GatewayStatus(
        gateway_id="gw1",
        site="site-042",
        online=online,
        version="0.1.0",
        config_sha256=None,
        devices=["neb-bed01"],
        since_utc=NOW,
    )
    out: dict[str, Any] = json.loads(status.model_dump_json())
    return out


def device_status(**changes: Any) -> dict[str, Any]:
    status = DeviceStatus(
        gateway_id="gw1",
        device_id="neb-bed01",
        connected=True,
        state="READY",
        identity=DeviceIdentity(
            device_id="neb-bed01", model="VM-1", serial_no="VM1-00381", firmware="2.4.1"
        ),
        last_seen_utc=NOW,
    )
    out: dict[str, Any] = json.loads(status.model_dump_json())
    out.update(changes)
    return out


def telemetry() -> dict[str, Any]:
    t = Telemetry(
        gateway_id="gw1",
        device_id="neb-bed01",
        utc=NOW,
        state="NEBULIZING",
        session_no=42,
        elapsed_s=12.5,
    )
    out: dict[str, Any] = json.loads(t.model_dump_json())
    return out


def telemetry_detail() -> dict[str, Any]:
    t = TelemetryDetail(
        gateway_id="gw1",
        device_id="neb-bed01",
        utc=NOW,
        session_no=42,
        rate_ul_min=400,
        delivered_ml=0.08,
        reservoir_ml=2.9,
        battery_pct=80,
    )
    out: dict[str, Any] = json.loads(t.model_dump_json())
    return out


def device_detail() -> dict[str, Any]:
    d = DeviceDetail(
        gateway_id="gw1",
        device_id="neb-bed01",
        connected=True,
        battery_pct=80,
        on_mains=False,
        reservoir_ml=3.0,
        fault_code=0,
        active_alarms=["MESH_BLOCKED"],
    )
    out: dict[str, Any] = json.loads(d.model_dump_json())
    return out


def dose_detail() -> dict[str, Any]:
    from tests.test_contract import real_dose_record

    out: dict[str, Any] = json.loads(real_dose_record().detail.model_dump_json())
    return out


def wire(
    payload: dict[str, Any], seq: int | None = None, birth: int = 1, redelivery: int = 0
) -> bytes:
    """The bytes a gateway publishes: the record, stamped with its delivery metadata."""
    raw = json.dumps(payload).encode()
    return raw if seq is None else stamp(raw, birth_seq=birth, seq=seq, redelivery=redelivery)


# -- schemas ------------------------------------------------------------------------


def test_tail_validates_with_the_strict_form_of_the_committed_schemas() -> None:
    validators = contract_validators()
    assert len(validators) == len(MODELS)
    strict = strict_schemas()
    for name, generated in schemas().items():
        committed = json.loads((ROOT / "docs" / "schemas" / name).read_text(encoding="utf-8"))
        assert committed == generated, f"docs/schemas/{name}: run `devicegw schema export`"
        event_type = committed["properties"]["event_type"]["const"]
        assert validators[event_type].schema == strict[name]
        # The strict one is the published one with every object closed, nothing else.
        assert '"additionalProperties": false' not in json.dumps(committed)
        assert strict[name]["additionalProperties"] is False


# -- TailProcessor ------------------------------------------------------------------


def test_a_real_dose_event_is_valid() -> None:
    result = TailProcessor().process(DOSE_TOPIC, wire(dose(), seq=7), retain=False, qos=1)
    assert result.valid, result.errors
    assert (result.event_type, result.errors, result.warnings) == ("dose_completion", (), ())
    assert result.payload["delivery"] == {"birth_seq": 1, "seq": 7, "redelivery": 0}
    line = result.to_json()
    assert set(line) >= {"topic", "retain", "qos", "valid", "errors", "payload"}
    assert (line["topic"], line["retain"], line["qos"], line["valid"]) == (
        DOSE_TOPIC,
        False,
        1,
        True,
    )


def test_every_payload_type_is_valid_on_its_topic() -> None:
    p = TailProcessor()
    for topic, payload in (
        (f"{BASE}/status", gateway_status()),
        (f"{BASE}/device/neb-bed01/status", device_status()),
        (f"{BASE}/telemetry/neb-bed01", telemetry()),
        (f"{BASE}/dose-detail/neb-bed01", dose_detail()),
        (f"{BASE}/device-detail/neb-bed01/status", device_detail()),
        (f"{BASE}/telemetry-detail/neb-bed01", telemetry_detail()),
    ):
        result = p.process(topic, wire(payload), retain=False)
        assert result.valid, (topic, result.errors)


def _without(key: str) -> dict[str, Any]:
    event = dose()
    del event[key]
    return event


@pytest.mark.parametrize(
    ("topic", "payload", "error"),
    [
        (DOSE_TOPIC, json.dumps(_without("verdict")), "(root): 'verdict' is a required property"),
        (
            DOSE_TOPIC,
            json.dumps(dose(session_no="42")),
            "session_no: '42' is not of type 'integer'",
        ),
        (DOSE_TOPIC, json.dumps(dose(verdict="fine")), "verdict: 'fine' is not one of"),
        (
            DOSE_TOPIC,
            json.dumps(dose(event_id="not-a-uuid")),
            "event_id: 'not-a-uuid' is not a 'uuid'",
        ),
        (
            DOSE_TOPIC,
            json.dumps(dose(times={**dose()["times"], "gateway_end_utc": "yesterday"})),
            "times/gateway_end_utc: 'yesterday' is not a 'date-time'",
        ),
        (DOSE_TOPIC, json.dumps(dose(arm="A")), "Additional properties are not allowed"),
        (DOSE_TOPIC, '{"verdict": "complete"', "not JSON"),
        (DOSE_TOPIC, "[1, 2]", "payload is not a JSON object"),
        (DOSE_TOPIC, '{"event_id": "x"}', "no event_type"),
        (DOSE_TOPIC, '{"event_type": "spo2"}', "unknown event_type 'spo2'"),
        (
            f"{BASE}/telemetry/neb-bed01",
            json.dumps(dose()),
            "topic carries telemetry payloads, got dose_completion",
        ),
        (
            DOSE_TOPIC,
            json.dumps(dose_detail()),
            "topic carries dose_completion payloads, got dose_",
        ),
        (
            f"{BASE}/device/neb-bed01/status",
            json.dumps(device_detail()),
            "topic carries device_status payloads, got device_detail",
        ),
        (
            f"{BASE}/telemetry/neb-bed01",
            json.dumps(telemetry_detail()),
            "topic carries telemetry payloads, got telemetry_detail",
        ),
        (DOSE_TOPIC, json.dumps(dose(fill_ml=3.0)), "Additional properties are not allowed"),
    ],
    ids=[
        "missing",
        "wrong-type",
        "bad-enum",
        "bad-uuid",
        "bad-time",
        "unknown-field",
        "not-json",
        "not-object",
        "no-type",
        "unknown-type",
        "wrong-topic",
        "detail-on-the-blinded-dose-topic",
        "device-detail-on-the-blinded-status-topic",
        "telemetry-detail-on-the-blinded-topic",
        "a-physical-field-in-the-blinded-event",
    ],
)
def test_invalid_payloads_are_flagged(topic: str, payload: str, error: str) -> None:
    result = TailProcessor().process(topic, payload.encode(), retain=False, qos=1)
    assert not result.valid
    assert any(error in e for e in result.errors), result.errors
    json.dumps(result.to_json())  # always printable as a JSON line


def test_a_consumer_may_ignore_unknown_fields() -> None:
    payload = wire(dose(field_from_v2_9={"x": 1}))
    strict = TailProcessor().process(DOSE_TOPIC, payload, retain=False)
    lenient = TailProcessor(unknown_fields="warn").process(DOSE_TOPIC, payload, retain=False)
    assert not strict.valid
    assert lenient.valid
    assert "field_from_v2_9" in lenient.warnings[0]


def test_the_published_schema_accepts_unknown_fields_the_strict_one_does_not() -> None:
    """The settled question: published schemas are forward compatible; our checks strict."""
    from jsonschema import Draft202012Validator

    name = "dose_completion.schema.json"
    newer = {**dose(field_from_v2_9={"x": 1})}
    newer["times"] = {**newer["times"], "nested_from_v2_9": 1}
    published = Draft202012Validator(schemas()[name])
    strict = Draft202012Validator(strict_schemas()[name])
    assert list(published.iter_errors(newer)) == []
    assert {e.validator for e in strict.iter_errors(newer)} == {"additionalProperties"}
    assert len(list(strict.iter_errors(newer))) == 2  # root and times


# -- sequence gaps ------------------------------------------------------------------


def run_seq(messages: list[tuple[dict[str, Any], bool]]) -> list[str | None]:
    checker = SequenceChecker()
    return [checker.check(payload, retained=retained) for payload, retained in messages]


def stamped(payload: dict[str, Any], seq: int, birth: int = 1) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(wire(payload, seq=seq, birth=birth))
    return out


def test_consecutive_seqs_pass_and_a_gap_is_flagged_once() -> None:
    notes = run_seq([(stamped(telemetry(), n), False) for n in (0, 1, 2, 5, 6)])
    assert notes == [None, None, None, "sequence gap: expected 3, got 5", None]


def test_gap_via_the_processor() -> None:
    p = TailProcessor()
    results = [p.process(DOSE_TOPIC, wire(dose(), seq=n), retain=False) for n in (3, 4, 9)]
    assert [r.warnings for r in results] == [(), (), ("sequence gap: expected 5, got 9",)]
    assert all(r.valid for r in results)


def test_counters_are_per_gateway() -> None:
    other = {**telemetry(), "gateway_id": "gw2"}
    notes = run_seq(
        [
            (stamped(telemetry(), 10), False),
            (stamped(other, 500), False),
            (stamped(telemetry(), 11), False),
            (stamped(other, 501), False),
            (stamped(dose(), 12), False),  # gateway.id for dose events
        ]
    )
    assert notes == [None] * 5


def test_retained_copies_are_never_gaps_and_set_no_baseline() -> None:
    notes = run_seq(
        [
            (stamped(gateway_status(), 0), True),  # the retained birth of this connection
            (stamped(device_status(), 3), True),
            (stamped(device_status(), 1), True),
            (stamped(telemetry(), 40), False),  # first live message: the baseline
            (stamped(telemetry(), 41), False),
        ]
    )
    assert notes == [None] * 5


def test_a_new_birth_restarts_the_count() -> None:
    notes = run_seq(
        [
            (stamped(telemetry(), 10, birth=4), False),
            (stamped(telemetry(), 11, birth=4), False),
            (stamped(gateway_status(), 0, birth=5), False),  # reconnected: seq from 0
            (stamped(device_status(), 1, birth=5), False),
            (stamped(telemetry(), 12, birth=4), False),  # a straggler of the old birth
            (stamped(gateway_status(online=False), 0, birth=5), False),  # the last will
            (stamped(telemetry(), 3, birth=5), False),
        ]
    )
    assert notes == [None, None, None, None, None, None, "sequence gap: expected 2, got 3"]


def test_going_back_without_a_birth_is_noted_but_is_not_a_gap() -> None:
    notes = run_seq([(stamped(telemetry(), n), False) for n in (7, 8, 8)])
    assert notes[2] is not None
    assert notes[2].startswith("sequence went back: expected 9, got 8")


def test_top_level_seq_with_birth_on_the_gateway_status() -> None:
    def flat(payload: dict[str, Any], seq: int, birth: int | None = None) -> dict[str, Any]:
        out = {**payload, "seq": seq}
        out.pop("delivery", None)
        return out if birth is None else {**out, "birth_seq": birth}

    notes = run_seq(
        [
            (flat(telemetry(), 1), False),
            (flat(telemetry(), 3), False),
            (flat(gateway_status(), 0, birth=2), False),
            (flat(telemetry(), 1), False),
        ]
    )
    assert notes == [None, "sequence gap: expected 2, got 3", None, None]


def test_the_restricted_feed_is_numbered_apart() -> None:
    """A restricted message (here a device alarm's detail) is no gap to a blinded reader."""
    blinded = [stamped(telemetry(), 0), stamped(device_status(), 1), stamped(dose(), 2)]
    restricted = [stamped(device_detail(), 0), stamped(dose_detail(), 1)]
    everything = [blinded[0], restricted[0], blinded[1], restricted[1], blinded[2]]
    assert run_seq([(p, False) for p in everything]) == [None] * 5
    assert run_seq([(p, False) for p in blinded]) == [None] * 3
    gap = run_seq([(blinded[0], False), (blinded[2], False)])
    assert gap == [None, "sequence gap: expected 1, got 2"]


def test_payloads_without_seq_are_ignored() -> None:
    notes = run_seq([(telemetry(), False), ({"seq": 5}, False), (stamped(telemetry(), 1), False)])
    assert notes == [None, None, None]


# -- AckStore -----------------------------------------------------------------------


def test_ack_store_keeps_the_first_of_each_event_id(tmp_path: Path) -> None:
    path = tmp_path / "doses.jsonl"
    store = AckStore(path)
    a = wire(dose(), seq=3)
    b = wire(dose(event_id="00000000-0000-5000-8000-000000000001"), seq=4)
    assert store.add(a, topic=DOSE_TOPIC) is StoreOutcome.STORED
    assert store.add(a, topic=DOSE_TOPIC) is StoreOutcome.DUPLICATE
    # A redelivery is stamped again: other delivery metadata, same record.
    resent = wire(dose(), seq=9, birth=2, redelivery=1)
    assert store.add(resent, topic=DOSE_TOPIC) is StoreOutcome.DUPLICATE
    assert store.add(b, topic=DOSE_TOPIC) is StoreOutcome.STORED
    lines = path.read_bytes().splitlines()
    assert lines == [a, b]  # exactly as received
    assert not store.rejects_path.exists()


def test_ack_store_reports_a_conflicting_copy(tmp_path: Path) -> None:
    store = AckStore(tmp_path / "doses.jsonl")
    store.add(wire(dose(), seq=3), topic=DOSE_TOPIC)
    changed = wire(dose(verdict="partial"), seq=4)
    assert store.add(changed, topic=DOSE_TOPIC) is StoreOutcome.CONFLICT
    assert len(store.path.read_bytes().splitlines()) == 1
    [reject] = [json.loads(x) for x in store.rejects_path.read_text().splitlines()]
    assert "already stored with other content" in reject["reason"]
    assert json.loads(reject["payload"])["verdict"] == "partial"


def test_ack_store_rejects_what_it_cannot_key(tmp_path: Path) -> None:
    store = AckStore(tmp_path / "doses.jsonl")
    assert store.add(b"{oops", topic=DOSE_TOPIC) is StoreOutcome.REJECTED
    assert store.add(b'{"verdict": "complete"}', topic=DOSE_TOPIC) is StoreOutcome.REJECTED
    assert not store.path.exists()
    reasons = [json.loads(x)["reason"] for x in store.rejects_path.read_text().splitlines()]
    assert reasons == ["not JSON", "no event_id"]


def test_ack_store_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "doses.jsonl"
    first = AckStore(path)
    first.add(wire(dose(), seq=3), topic=DOSE_TOPIC)
    before = path.read_bytes()
    again = AckStore(path)
    assert len(again) == 1
    assert dose()["event_id"] in again
    assert again.add(wire(dose(), seq=0, birth=2, redelivery=1), topic=DOSE_TOPIC) is (
        StoreOutcome.DUPLICATE
    )
    assert again.add(wire(dose(kit_number="K-1")), topic=DOSE_TOPIC) is StoreOutcome.CONFLICT
    assert path.read_bytes() == before


def test_ack_store_drops_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "doses.jsonl"
    AckStore(path).add(wire(dose(), seq=3), topic=DOSE_TOPIC)
    good = path.read_bytes()
    path.write_bytes(good + b'{"event_id": "00000000-0000-5000-8000-0000')  # crash mid-write
    store = AckStore(path)
    assert len(store) == 1
    assert path.read_bytes() == good


def test_ack_store_refuses_a_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "doses.jsonl"
    path.write_bytes(b"not json\n" + wire(dose()) + b"\n")
    with pytest.raises(AckStoreError, match=r"doses.jsonl:1: not a stored dose event") as info:
        AckStore(path)
    assert info.value.line == 1


def test_ack_store_write_failure_is_an_error_not_an_ack(tmp_path: Path) -> None:
    store = AckStore(tmp_path / "missing-dir" / "doses.jsonl")
    with pytest.raises(AckStoreError, match="cannot write"):
        store.add(wire(dose()), topic=DOSE_TOPIC)
    assert len(store) == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dose-events"], "--dose-events and --ack-store go together"),
        (["--ack-store", "x.jsonl"], "--dose-events and --ack-store go together"),
        (["--password-env", "DEVICEGW_TEST_UNSET_VAR"], "DEVICEGW_TEST_UNSET_VAR is not set"),
    ],
)
def test_cli_tail_refuses_bad_options(args: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "devicegw.cli", "tail", "--host", "127.0.0.1", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 2
    assert message in result.stderr


# -- end to end: the CLI against a real Mosquitto -----------------------------------


async def start_cli(*args: str) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "devicegw.cli",
        "tail",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    assert proc.stderr is not None

    async def subscribed() -> None:
        assert proc.stderr is not None
        while b"subscribed to" not in await proc.stderr.readline():
            if proc.returncode is not None:
                raise AssertionError("devicegw tail exited before subscribing")

    try:
        await asyncio.wait_for(subscribed(), 30)
    except BaseException:
        proc.kill()
        await proc.wait()
        raise
    return proc


async def finish(proc: asyncio.subprocess.Process) -> tuple[int, list[dict[str, Any]], str]:
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 30)
    except BaseException:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    lines = [json.loads(line) for line in stdout.decode().splitlines()]
    return proc.returncode, lines, stderr.decode()


async def publish(broker: MosquittoBroker, *messages: tuple[str, bytes, bool]) -> None:
    async with aiomqtt.Client(broker.host, broker.port) as client:
        for topic, payload, retain in messages:
            await client.publish(topic, payload, qos=1, retain=retain)


@pytest.mark.e2e
async def test_cli_tail_json_flags_a_gap_and_an_invalid_payload(
    mosquitto: MosquittoBroker,
) -> None:
    status_topic, device_topic = f"{BASE}/status", f"{BASE}/device/neb-bed01/status"
    await publish(mosquitto, (status_topic, wire(gateway_status(), seq=0), True))
    proc = await start_cli(
        "--host", mosquitto.host, "--port", str(mosquitto.port), "--json", "--count", "5",
        "--timeout", "30",
    )  # fmt: skip
    broken = device_status()
    del broken["connected"]
    await publish(
        mosquitto,
        (device_topic, wire(device_status(), seq=1), False),
        (f"{BASE}/telemetry/neb-bed01", wire(telemetry(), seq=2), False),
        (DOSE_TOPIC, wire(dose(), seq=4), False),  # seq 3 never arrived
        (device_topic, wire(broken, seq=5), False),
    )
    rc, lines, stderr = await finish(proc)
    assert rc == 0, stderr
    assert [line["topic"] for line in lines] == [
        status_topic,
        device_topic,
        f"{BASE}/telemetry/neb-bed01",
        DOSE_TOPIC,
        device_topic,
    ]
    assert [line["retain"] for line in lines] == [True, False, False, False, False]
    assert [line["valid"] for line in lines] == [True, True, True, True, False]
    assert [line["warnings"] for line in lines[:3]] == [[], [], []]
    assert lines[3]["warnings"] == ["sequence gap: expected 3, got 4"]
    assert lines[4]["errors"] == ["(root): 'connected' is a required property"]
    assert lines[4]["warnings"] == []
    assert lines[3]["payload"]["event_id"] == dose()["event_id"]


@pytest.mark.e2e
async def test_cli_tail_for_people_prints_one_line_per_message(
    mosquitto: MosquittoBroker,
) -> None:
    proc = await start_cli("--host", mosquitto.host, "--port", str(mosquitto.port), "--count", "1")
    await publish(mosquitto, (DOSE_TOPIC, wire(dose(), seq=0), False))
    proc_stdout, _ = await asyncio.wait_for(proc.communicate(), 30)
    text = proc_stdout.decode()
    assert proc.returncode == 0
    assert DOSE_TOPIC in text
    assert "dose_completion" in text
    assert "verdict=complete" in text
    assert "INVALID" not in text


@pytest.mark.e2e
async def test_cli_tail_timeout_before_count_fails(mosquitto: MosquittoBroker) -> None:
    proc = await start_cli(
        "--host", mosquitto.host, "--port", str(mosquitto.port), "--json",
        "--count", "1", "--timeout", "0.5",
    )  # fmt: skip
    rc, lines, stderr = await finish(proc)
    assert (rc, lines) == (tail.EXIT_TIMEOUT, [])
    assert "timed out" in stderr


@pytest.mark.e2e
async def test_reference_edc_client_keeps_the_first_of_each_event_id(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    store = tmp_path / "doses.jsonl"
    args = ["--host", mosquitto.host, "--port", str(mosquitto.port), "--json"]
    args += ["--dose-events", "--ack-store", str(store), "--client-id", "edc-e2e"]
    a = dose()
    b = dose(event_id="00000000-0000-5000-8000-000000000002", session_no=43)

    proc = await start_cli(*args, "--count", "3", "--timeout", "30")
    await publish(
        mosquitto,
        (DOSE_TOPIC, wire(a, seq=5), False),
        (DOSE_TOPIC, wire(a, seq=0, birth=2, redelivery=1), False),  # re-sent after a reconnect
        (DOSE_TOPIC, wire(b, seq=1, birth=2), False),
    )
    rc, lines, stderr = await finish(proc)
    assert rc == 0, stderr
    assert [line["store"] for line in lines] == ["stored", "duplicate", "stored"]
    stored = [json.loads(x) for x in store.read_text().splitlines()]
    assert [e["event_id"] for e in stored] == [a["event_id"], b["event_id"]]
    assert stored[0]["delivery"]["seq"] == 5  # the first copy, as received

    # Restarted: it knows what it has; a copy with other content is loud.
    proc = await start_cli(*args, "--count", "2", "--timeout", "30")
    c = dose(event_id="00000000-0000-5000-8000-000000000003", session_no=44)
    await publish(
        mosquitto,
        (DOSE_TOPIC, wire(dose(verdict="partial"), seq=2, birth=2), False),
        (DOSE_TOPIC, wire(c, seq=3, birth=2), False),
    )
    rc, lines, stderr = await finish(proc)
    assert rc == client.EXIT_CONFLICT
    assert "CONFLICT" in stderr
    assert [line["store"] for line in lines] == ["conflict", "stored"]
    assert len(store.read_text().splitlines()) == 3
    assert len((tmp_path / "doses.jsonl.rejects").read_text().splitlines()) == 1


class _DiskFull(AckStore):
    def add(self, payload: bytes, *, topic: str) -> StoreOutcome:
        raise AckStoreError("disk full", path=self.path)


async def _crash_then_restart(broker: MosquittoBroker, path: Path, client_id: str) -> int:
    """Receive one dose event with a store that cannot write, then restart with a good one."""
    options = TailOptions(host=broker.host, port=broker.port, count=1, client_id=client_id)
    printer = Printer(as_json=True, out=io.StringIO())
    subscribed = asyncio.Event()
    crashing = asyncio.create_task(
        run_edc_client(options, printer, store=_DiskFull(path), on_subscribed=subscribed.set)
    )
    await asyncio.wait_for(subscribed.wait(), 10)
    await publish(broker, (DOSE_TOPIC, wire(dose(), seq=1), False))
    with pytest.raises(AckStoreError):
        await asyncio.wait_for(crashing, 10)
    restarted = TailOptions(
        host=broker.host, port=broker.port, count=1, timeout=3.0, client_id=client_id
    )
    return await run_edc_client(restarted, printer, store=AckStore(path))


@pytest.mark.e2e
async def test_a_dose_event_is_acknowledged_only_once_it_is_on_disk(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    path = tmp_path / "doses.jsonl"
    assert await _crash_then_restart(mosquitto, path, "edc-ack") == 0
    # The broker sent it again: it had never been acknowledged.
    assert [json.loads(x)["event_id"] for x in path.read_text().splitlines()] == [
        dose()["event_id"]
    ]


@pytest.mark.e2e
async def test_control_with_automatic_acks_the_event_would_be_lost(
    mosquitto: MosquittoBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shows the test above tests something: paho's default acks on receipt."""

    class _AutoAck:
        def ack(self, mid: int, qos: int) -> None:
            pass

    monkeypatch.setattr(client, "_manual_acks", lambda client: _AutoAck())
    path = tmp_path / "doses.jsonl"
    assert await _crash_then_restart(mosquitto, path, "edc-autoack") == tail.EXIT_TIMEOUT
    assert not path.exists()


@pytest.mark.e2e
async def test_the_edc_client_sends_its_acks_without_nagle_delay(
    mosquitto: MosquittoBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its PUBACKs free the broker's in-flight window: TCP_NODELAY on its real socket
    (paho leaves Nagle on, so a PUBACK could wait ~40 ms for the broker's delayed ACK)."""
    seen: list[int] = []
    real = client.no_delay

    def checked(mqtt: aiomqtt.Client) -> None:
        sock = mqtt._client.socket()
        assert isinstance(sock, socket.socket)
        seen.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        real(mqtt)
        seen.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    monkeypatch.setattr(client, "no_delay", checked)
    options = TailOptions(host=mosquitto.host, port=mosquitto.port, count=1, timeout=10)
    printer = Printer(as_json=True, out=io.StringIO())
    subscribed = asyncio.Event()
    task = asyncio.create_task(
        run_edc_client(
            options, printer, store=AckStore(tmp_path / "d.jsonl"), on_subscribed=subscribed.set
        )
    )
    await asyncio.wait_for(subscribed.wait(), 10)
    await publish(mosquitto, (DOSE_TOPIC, wire(dose(), seq=1), False))
    assert await asyncio.wait_for(task, 15) == 0
    assert seen[0] == 0 and seen[1] != 0  # paho's default, then set
