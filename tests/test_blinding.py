"""The blinded feed and the restricted feed (docs/blinding.md).

Unit level: every reason code has a feed, the blinded payloads have no key
that could carry device physics, a dose record's two halves, and an alarm that
never shows as a blinded message. End to end (ptys -> gateway -> Mosquitto):
the ACL of docs/blinding.md keeps the restricted feed from blinded users while
the EDC gets every dose, and two groups of subjects whose devices differ only
in output rate and residual (as two arms might) are indistinguishable on the
blinded feed beyond times and volumes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from devicegw.config import parse_config
from devicegw.contract.payloads import DoseRecord
from devicegw.contract.schemas import MODELS, strict_schemas
from devicegw.contract.topics import feed_subscriptions
from devicegw.contract.vocabulary import (
    BLINDED_STAND_IN,
    PAYLOAD_FEED,
    REASON_FEED,
    Feed,
    PayloadKind,
    Reason,
    blinded_reasons,
)
from devicegw.core.dose_check import assess
from devicegw.core.dose_event import build_dose_record
from devicegw.core.session_tracker import SessionFinished, SessionTracker
from devicegw.core.vm1_pipeline import Vm1Pipeline
from drivers.vm1.messages import AlarmCode, DeviceState, EndReason, Ident
from drivers.vm1.stream import encode_message_frame
from simulators.scenario import Scenario, parse_scenario
from tests.e2e_harness import running
from tests.mqtt_helpers import MosquittoBroker, acl_mosquitto, collecting
from tests.session_stream import StreamBuilder, one_device_config

ROOT = Path(__file__).resolve().parent.parent
ACL_FILE = ROOT / "docs" / "blinding-mosquitto.acl"
BLINDING_DOC = ROOT / "docs" / "blinding.md"

# A key that could hold device physics: a rate, a fill, a residual, an integral,
# a device total, an alarm, nebulizing or pause time, the reservoir, the battery...
PHYSICAL_KEY = re.compile(
    r"rate|fill|residual|integral|cum|alarm|nebuliz|pause|reservoir|battery|mains|"
    r"end_reason|basis|estimate|disagree|fault|uptime|link",
    re.IGNORECASE,
)
# (keys that hold a rate but of something else: the dose rules' names and SpO2)
NOT_PHYSICAL = {"max_total_pause_s", "pulse_bpm", "mean_pulse_bpm"}


# -- vocabulary --------------------------------------------------------------------


def test_every_reason_code_has_a_feed() -> None:
    """A new reason code fails here until someone decides who may see it."""
    assert set(REASON_FEED) == set(Reason)
    for restricted, stand_in in BLINDED_STAND_IN.items():
        assert REASON_FEED[restricted] is Feed.RESTRICTED
        assert REASON_FEED[stand_in] is Feed.BLINDED
    assert set(PAYLOAD_FEED) == set(PayloadKind)


def test_blinded_reasons_replace_drop_and_keep_order() -> None:
    got = blinded_reasons(
        [
            "ended_by_fault",
            "duration_below_minimum",
            "device_alarm",
            "ended_by_timeout",  # the same stand-in again: once
            "a_code_from_a_later_version",  # not reviewed: dropped
            "delivered_below_minimum",
        ]
    )
    assert got == ["ended_by_device", "duration_below_minimum", "delivered_below_minimum"]


# -- payload shapes ------------------------------------------------------------------


def property_names(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "properties" and isinstance(value, dict):
                yield from value
            yield from property_names(value)
    elif isinstance(node, list):
        for value in node:
            yield from property_names(value)


def test_blinded_payloads_have_no_physical_key() -> None:
    for name, schema in strict_schemas().items():
        model = MODELS[name][0]
        kind = PayloadKind(model.model_fields["event_type"].default)
        physical = {k for k in property_names(schema) if PHYSICAL_KEY.search(k)} - NOT_PHYSICAL
        if PAYLOAD_FEED[kind] is Feed.BLINDED:
            assert physical == set(), f"{name}: {sorted(physical)}"
        else:
            assert physical, f"{name}: a restricted payload with nothing physical in it?"


def record(stream: StreamBuilder) -> DoseRecord:
    config = one_device_config(sha256="ab" * 32)
    tracker = SessionTracker()
    [session] = [
        e.session for rx in stream.out for e in tracker.feed(rx) if isinstance(e, SessionFinished)
    ]
    return build_dose_record(
        session,
        assess(session, config.dose_rules),
        device=config.devices[0],
        ident=IDENT,
        config=config,
    )


IDENT = Ident(
    model="VM-1",
    serial_no="VM1-00381",
    firmware="2.4.1",
    nominal_rate_ul_min=400,
    reservoir_capacity_ul=6000,
    last_session_no=41,
)


def test_a_dose_record_splits_into_a_blinded_event_and_its_detail() -> None:
    s = StreamBuilder()
    s.status(DeviceState.READY)
    s.start()
    s.nebulize(20)
    s.skip(3)  # lost OUTPUT frames: a telemetry gap
    s.alarm(AlarmCode.MESH_BLOCKED, True)
    s.nebulize(10, rate=60)
    s.end(EndReason.FAULT, residual=2800, neb_ms=30_000)
    rec = record(s)
    event, detail = rec.event, rec.detail
    assert event.event_id == detail.event_id
    assert event.verdict == detail.verdict == "aborted"
    # Every reason on the detail; on the event only blinded ones, the fault as ended_by_device.
    assert {"ended_by_fault", "device_alarm", "telemetry_gap"} <= set(detail.reasons)
    assert event.reasons == blinded_reasons(detail.reasons)
    assert "ended_by_device" in event.reasons
    assert all(REASON_FEED[Reason(r)] is Feed.BLINDED for r in event.reasons)
    assert event.volume.delivered_ml == detail.volume.delivered_ml
    assert [a.name for a in detail.alarms] == ["MESH_BLOCKED"]
    assert detail.rate.samples == 300
    assert detail.rate.nominal_ul_min == 400
    blob = event.model_dump_json()
    for word in ("MESH_BLOCKED", "FAULT", "fill", "residual", "alarm", "rate"):
        assert word not in blob


class ListSink:
    def __init__(self) -> None:
        self.sent: list[tuple[str, Any]] = []

    def dose_record(self, device_id: str, record: DoseRecord) -> None:
        self.sent += [("dose", record.event), ("dose-detail", record.detail)]

    def device_status(self, device_id: str, status: Any) -> None:
        self.sent.append(("status", status))

    def device_detail(self, device_id: str, detail: Any) -> None:
        self.sent.append(("device-detail", detail))

    def telemetry(self, device_id: str, telemetry: Any, detail: Any) -> None:
        self.sent += [("telemetry", telemetry), ("telemetry-detail", detail)]


def test_an_alarm_is_never_a_blinded_message() -> None:
    """Raised and cleared mid-session: the restricted device detail changes, nothing blinded."""
    config = parse_config(
        {
            "gateway": {"id": "gw1", "site": "site-042"},
            "telemetry": {"enabled": False},
            "devices": [
                {
                    "id": "neb-bed01",
                    "type": "vm1",
                    "bed": "B01",
                    "subject_id": "CVD-042-0017",
                    "kit_number": "K-10234",
                    "link": {"kind": "serial", "port": "/dev/ttyUSB0"},
                }
            ],
        }
    )
    sink = ListSink()
    pipeline = Vm1Pipeline(config.devices[0], config, sink)
    s = StreamBuilder()
    s.ident()
    s.status(DeviceState.READY)
    s.start()
    s.nebulize(5)
    before = len(s.out)
    s.alarm(AlarmCode.MESH_BLOCKED, True)
    s.nebulize(5)
    s.alarm(AlarmCode.MESH_BLOCKED, False)
    s.nebulize(5)
    after = len(s.out)
    s.end(EndReason.COMPLETE, residual=2900, neb_ms=15_000)
    pipeline.link_up(s.out[0].utc)
    for rx in [*s.out[:before]]:
        pipeline.feed(encode_message_frame(rx.msg), rx.utc, rx.mono)
    first = len(sink.sent)
    for rx in s.out[before:after]:
        pipeline.feed(encode_message_frame(rx.msg), rx.utc, rx.mono)
    during = [kind for kind, _ in sink.sent[first:]]
    assert during == ["device-detail", "device-detail"]  # raised, cleared
    raised = sink.sent[first][1]
    assert raised.active_alarms == ["MESH_BLOCKED"]


# -- the Mosquitto ACL of docs/blinding.md -----------------------------------------

GATEWAY_USER = "devicegw-gw"
USERS = {GATEWAY_USER: "gw-pw", "edc": "edc-pw", "blinded-dm": "dm-pw", "biomed-eng": "eng-pw"}


def test_the_acl_file_grants_exactly_the_feeds_and_the_doc_shows_it() -> None:
    text = ACL_FILE.read_text(encoding="utf-8")
    assert text in BLINDING_DOC.read_text(encoding="utf-8"), "docs/blinding.md shows the file"
    grants: dict[str, set[str]] = {}
    user = None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("user "):
            user = line.split()[1]
        elif line.startswith("topic ") and user is not None:
            grants.setdefault(user, set()).add(line)
    feeds = feed_subscriptions("devicegw/v2")
    blinded = {f"topic read {t}" for t in feeds[Feed.BLINDED]}
    assert grants["edc"] == blinded
    assert grants["blinded-dm"] == blinded
    assert grants["biomed-eng"] == {"topic read devicegw/v2/#"}
    assert grants[GATEWAY_USER] == {
        "topic write devicegw/v2/#",
        "topic read devicegw/v2/+/+/cmd/assign/+",  # bedside assignment commands
    }


@pytest.fixture
def acl_broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    with acl_mosquitto(tmp_path, USERS) as broker:
        yield broker


def marker() -> bytes:
    """A valid blinded telemetry payload, published last: everything before it was routed."""
    return json.dumps(
        {
            "schema_version": "2.0",
            "event_type": "telemetry",
            "delivery": None,
            "gateway_id": "gw-test",
            "device_id": "marker",
            "utc": "2026-11-25T08:00:00Z",
            "state": None,
            "session_no": None,
            "elapsed_s": None,
        }
    ).encode()


@pytest.mark.e2e
async def test_blinded_users_never_receive_the_restricted_feed(
    acl_broker: MosquittoBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEVICEGW_TEST_GW_PASSWORD", USERS[GATEWAY_USER])
    restricted = feed_subscriptions("devicegw/v2")[Feed.RESTRICTED]
    host, port = acl_broker.host, acl_broker.port
    async with (
        collecting(
            host,
            port,
            ["devicegw/v2/+/+/dose/+"],
            client_id="edc-acl",
            persistent=True,
            username="edc",
            password=USERS["edc"],
        ) as edc,
        # A blinded reader asking for everything, and for the restricted topics by name.
        collecting(
            host,
            port,
            ["devicegw/v2/#", *restricted],
            username="blinded-dm",
            password=USERS["blinded-dm"],
        ) as blinded,
        running(
            acl_broker,
            tmp_path,
            ["complete", "user_stop_half"],
            broker_extra={"username": GATEWAY_USER, "password_env": "DEVICEGW_TEST_GW_PASSWORD"},
            collector_auth=("biomed-eng", USERS["biomed-eng"]),  # engineering sees both feeds
        ) as e2e,
    ):
        events = await e2e.wait_dose_events(2)
        details = [await e2e.detail_of(event) for event in events]
        assert e2e.collector.matching("/telemetry-detail/")
        assert e2e.collector.matching("/device-detail/")
        # Everything the engineering client got was routed; then a marker, last.
        async with aiomqtt.Client(
            host, port, username=GATEWAY_USER, password=USERS[GATEWAY_USER]
        ) as gw:
            topic = f"{e2e.topics.telemetry('marker')}"
            await gw.publish(topic, marker(), qos=1)
        await blinded.wait_for(lambda msgs: any(m.topic == topic for m in msgs), 30)
        await edc.wait_for(lambda msgs: len(msgs) >= 2, 30)
    # The blinded reader: the blinded feed, and nothing restricted.
    got = {m.topic.split("/")[4] for m in blinded.messages}
    assert {"dose", "device", "status", "telemetry"} <= got
    assert not got & {"dose-detail", "device-detail", "telemetry-detail"}
    kinds = {m.json()["event_type"] for m in blinded.messages}
    assert not kinds & {"dose_detail", "device_detail", "telemetry_detail"}
    # The EDC: every dose, exactly the gateway's.
    assert sorted(m.json()["event_id"] for m in edc.messages) == sorted(
        e["event_id"] for e in events
    )
    assert {d["event_id"] for d in details} == {e["event_id"] for e in events}


# -- two groups of subjects, as two arms might be ------------------------------------

GROUPS = {
    # Same fill, same protocol; only the product's behaviour differs.
    "A": {"rate_ul_min": 450, "residual_ul": 60},
    "B": {"rate_ul_min": 300, "residual_ul": 150},
}
PER_GROUP = 3


def subject_scenario(group: str, index: int) -> Scenario:
    serial = f"VM1-{group}{index:05d}"
    session = {"fill_ul": 3000, "rate_noise": 0.05, "rate_bias": 0.03, **GROUPS[group]}
    return parse_scenario(
        {
            "name": f"group-{group}-{index}",
            "device": {
                "serial_no": serial,
                "firmware": "1.4.2",
                "last_session_no": 10,
                "battery_pct": 90,  # drains with nebulizing time: must stay restricted
                "seed": 1000 + 10 * ord(group) + index,
            },
            "sessions": [  # the morning and evening dose, compressed
                {"fill_at_s": 5, "start_at_s": 30, **session},
                {"fill_at_s": 700, "start_at_s": 730, **session},
            ],
        },
        source=f"group-{group}-{index}",
    )


# Fields allowed to differ between the groups: times and volumes (the protocol needs
# them; docs/blinding.md says what they can reveal), identity (each subject's own),
# and delivery metadata (per send).
EXEMPT = re.compile(
    r"^(times\..*|volume\.delivered_(ml|fraction)|utc|elapsed_s|last_seen_utc|since_utc"
    r"|event_id|subject_id|kit_number|bed|device_id|device\..*|identity\..*"
    r"|spo2\.correlation_id|delivery\..*)$"
)


def leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted path, value) of every leaf; list items share their list's path."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from leaves(value, f"{prefix}{key}.")
    elif isinstance(node, list):
        if not node:
            yield prefix.rstrip("."), "[]"
        for value in node:
            yield from leaves(value, prefix)
    else:
        yield prefix.rstrip("."), node


@dataclass
class FieldValues:
    values_all: list[Any] = field(repr=False)
    values: set[Any]
    lows: set[Any]  # each device's lowest numeric value
    highs: set[Any]  # ... and highest


def field_values(payloads: list[dict[str, Any]], path: str) -> FieldValues:
    every: list[Any] = []
    per_device: dict[str, list[float]] = {}
    for p in payloads:
        device = p.get("device_id") or p["device"]["device_id"]
        for key, value in leaves(p):
            if key != path:
                continue
            every.append(value)
            if isinstance(value, int | float) and not isinstance(value, bool):
                per_device.setdefault(device, []).append(value)
    return FieldValues(
        values_all=every,
        values={json.dumps(v) if isinstance(v, list | dict) else v for v in every},
        lows={min(v) for v in per_device.values()},
        highs={max(v) for v in per_device.values()},
    )


def separates(a: set[Any], b: set[Any]) -> bool:
    """The field tells the groups apart: no value in common, or numeric ranges apart."""
    if not a or not b:
        return False
    if a.isdisjoint(b):
        return True
    numbers_a = {v for v in a if isinstance(v, int | float) and not isinstance(v, bool)}
    numbers_b = {v for v in b if isinstance(v, int | float) and not isinstance(v, bool)}
    if numbers_a and numbers_b:
        return max(numbers_a) < min(numbers_b) or max(numbers_b) < min(numbers_a)
    return False


@pytest.mark.e2e
@pytest.mark.timeout(240)
async def test_two_groups_differing_in_rate_and_residual_look_alike_blinded(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    scenarios = [subject_scenario(g, i) for g in GROUPS for i in range(PER_GROUP)]
    async with running(mosquitto, tmp_path, scenarios, device_extra={"output_rate_hz": 2}) as e2e:
        sessions = len(scenarios) * 2
        events = await e2e.wait_dose_events(sessions, timeout=180)
        for event in events:
            await e2e.detail_of(event)
        messages = list(e2e.collector.messages)
    topics = e2e.topics
    group_of = {f"neb-bed{i + 1:02d}": s.name.split("-")[1] for i, s in enumerate(scenarios)}
    blinded_levels = {"dose", "device", "telemetry", "safety", "status"}

    def group(payload: dict[str, Any]) -> str | None:
        device = payload.get("device_id") or (payload.get("device") or {}).get("device_id")
        return group_of.get(device)

    by_type: dict[str, dict[str, list[dict[str, Any]]]] = {}
    details: dict[str, list[dict[str, Any]]] = {"A": [], "B": []}
    for m in messages:
        level = m.topic.removeprefix(topics.base + "/").split("/")[0]
        payload = m.json()
        g = group(payload)
        if g is None:
            continue  # the gateway's own status
        if level in blinded_levels:
            by_type.setdefault(payload["event_type"], {"A": [], "B": []})[g].append(payload)
        elif level == "dose-detail":
            details[g].append(payload)

    doses = by_type["dose_completion"]
    assert len(doses["A"]) == len(doses["B"]) == PER_GROUP * 2
    assert {e["verdict"] for e in doses["A"] + doses["B"]} == {"complete"}
    assert {"device_status", "telemetry"} <= set(by_type)

    for event_type, groups in by_type.items():
        # Exactly the same keys in every payload of a type, whichever group.
        shapes = {frozenset(path for path, _ in leaves(p)) for p in groups["A"] + groups["B"]}
        assert len(shapes) == 1, f"{event_type}: payloads differ in their keys"
        # No field that is not a time, a volume or an identity tells the groups apart.
        for path in sorted(next(iter(shapes))):
            if EXEMPT.match(path):
                continue
            per_group = {g: field_values(groups[g], path) for g in GROUPS}
            a, b = (set(map(json.dumps, per_group[g].values_all)) for g in GROUPS)
            assert not separates(*(per_group[g].values for g in GROUPS)), (
                f"{event_type}.{path}: {a} vs {b}"
            )
            # A value that drifts over a run (a battery, say) can overlap in its whole
            # range and still part the groups at each device's low or high end.
            for extreme in ("lows", "highs"):
                ends = [getattr(per_group[g], extreme) for g in GROUPS]
                assert not separates(*ends), f"{event_type}.{path}: per-device {extreme} {ends}"
            if event_type == "dose_completion":
                assert a == b, f"dose_completion.{path}: {a} vs {b}"

    # The test has teeth: on the restricted feed the same sessions are told apart.
    def values(path: str, g: str) -> set[Any]:
        return {v for d in details[g] for k, v in leaves(d) if k == path}

    for path in ("rate.mean_ul_min", "volume.residual_ml", "times.nebulizing_s"):
        assert separates(values(path, "A"), values(path, "B")), path
