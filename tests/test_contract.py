"""The written MQTT contract (docs/schemas, docs/asyncapi.yaml) matches the code."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator
from pydantic import BaseModel

from devicegw.contract.payloads import DoseRecord
from devicegw.contract.schemas import MODELS, render, schemas
from devicegw.contract.topics import Topics
from devicegw.core.dose_check import assess
from devicegw.core.dose_event import build_dose_record
from devicegw.core.session_tracker import SessionFinished, SessionTracker
from drivers.vm1.messages import DeviceState, EndReason, Ident
from tests.session_stream import StreamBuilder, one_device_config

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SCHEMAS = DOCS / "schemas"
ASYNCAPI = DOCS / "asyncapi.yaml"
REGENERATE = "run `devicegw schema export docs/schemas` and commit the result"


def load_asyncapi() -> dict[str, Any]:
    doc = yaml.safe_load(ASYNCAPI.read_text(encoding="utf-8"))
    assert isinstance(doc, dict)
    return doc


def validator(schema_file: str) -> Draft202012Validator:
    schema = json.loads((SCHEMAS / schema_file).read_text(encoding="utf-8"))
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


def assert_valid(v: Draft202012Validator, instance: object) -> None:
    errors = sorted(v.iter_errors(instance), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


# -- (a) committed schemas are the models' schemas -------------------------------


@pytest.mark.parametrize("name", sorted(MODELS))
def test_committed_schema_matches_model(name: str) -> None:
    path = SCHEMAS / name
    assert path.exists(), f"{path} is missing: {REGENERATE}"
    assert path.read_text(encoding="utf-8") == render(schemas()[name]), (
        f"{path} differs from devicegw.contract.payloads: {REGENERATE}"
    )


def test_no_stale_schema_files() -> None:
    on_disk = {p.name for p in SCHEMAS.glob("*.json")}
    assert on_disk == set(MODELS), f"unexpected files in docs/schemas: {REGENERATE}"


def test_schemas_are_deterministic_and_identified() -> None:
    first, second = schemas(), schemas()
    assert {k: render(v) for k, v in first.items()} == {k: render(v) for k, v in second.items()}
    ids = set()
    for name, schema in first.items():
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        assert schema["$id"] == f"https://devicegw.invalid/schemas/v2/{name}"
        assert schema["title"]
        ids.add(schema["$id"])
    assert len(ids) == len(first)


# -- (b) the AsyncAPI document is consistent with the topics and schemas ---------


def topic_patterns() -> dict[str, str]:
    """Channel address (AsyncAPI `{param}` form, default prefix) per Topics method."""
    t = Topics("devicegw/v2", "{site}", "{gateway}")
    return {
        "dose": t.dose("{device}"),
        "dose_correction": t.dose_correction("{device}"),
        "dose_missed": t.dose_missed("{device}"),
        "assign_command": t.assign_command("{username}"),
        "assign_answer": t.assign_response("{username}"),
        "gateway_status": t.gateway_status(),
        "device_status": t.device_status("{device}"),
        "telemetry": t.telemetry("{device}"),
        "safety": t.safety("{device}"),
        "dose_detail": t.dose_detail("{device}"),
        "device_detail": t.device_detail("{device}"),
        "telemetry_detail": t.telemetry_detail("{device}"),
    }


def test_asyncapi_version_and_info() -> None:
    doc = load_asyncapi()
    assert doc["asyncapi"] == "3.0.0"
    assert doc["info"]["version"] == "2.0.0"
    assert "keep the first of each `event_id`" in doc["info"]["description"]


def test_every_channel_is_a_topic_and_every_topic_a_channel() -> None:
    doc = load_asyncapi()
    patterns = topic_patterns()
    addresses = {name: ch["address"] for name, ch in doc["channels"].items()}
    for name, address in addresses.items():
        assert address in patterns.values(), f"channel {name}: {address} is not a Topics topic"
        params = set(re.findall(r"\{(\w+)\}", address))
        assert set(doc["channels"][name].get("parameters", {})) == params, name
    assert set(patterns.values()) <= set(addresses.values())


def test_every_payload_ref_resolves_to_a_schema_file() -> None:
    doc = load_asyncapi()
    messages = doc["components"]["messages"]
    assert messages
    referenced = set()
    for name, msg in messages.items():
        ref = msg["payload"]["$ref"]
        assert ref.startswith("./schemas/"), f"{name}: payload $ref {ref} is not relative"
        target = (ASYNCAPI.parent / ref).resolve()
        assert target.is_file(), f"{name}: {ref} does not exist"
        referenced.add(target.name)
    assert referenced == set(MODELS)


def resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        node = node[part]
    return node


def test_internal_refs_resolve_and_operations_have_mqtt_bindings() -> None:
    doc = load_asyncapi()
    expected = {
        "dose": (1, False),
        "dose_correction": (1, False),
        "dose_missed": (1, False),
        "assign_command": (1, False),
        "assign_answer": (1, False),
        "gateway_status": (1, True),
        "device_status": (1, True),
        "telemetry": (0, False),
        "safety": (1, False),
        "dose_detail": (1, False),
        "device_detail": (1, True),
        "telemetry_detail": (0, False),
    }
    by_address = {v: k for k, v in topic_patterns().items()}
    for name, op in doc["operations"].items():
        # The gateway publishes; the one thing it receives is the assignment command.
        assert op["action"] == ("receive" if name == "receiveAssignCommand" else "send"), name
        channel = resolve(doc, op["channel"]["$ref"])
        for m in op["messages"]:
            resolve(doc, m["$ref"])
        for p in channel.get("parameters", {}).values():
            resolve(doc, p["$ref"])
        mqtt = op["bindings"]["mqtt"]
        assert mqtt["bindingVersion"] == "0.2.0"
        assert (mqtt["qos"], mqtt["retain"]) == expected[by_address[channel["address"]]], name
    for ch in doc["channels"].values():
        for m in ch["messages"].values():
            resolve(doc, m["$ref"])


def test_last_will_is_the_offline_gateway_status() -> None:
    doc = load_asyncapi()
    status_address = topic_patterns()["gateway_status"]
    v = validator("gateway_status.schema.json")
    for name, server in doc["servers"].items():
        assert server["protocol"] in ("mqtt", "secure-mqtt"), name
        assert "host" in server["variables"], name
        will = server["bindings"]["mqtt"]["lastWill"]
        assert will["topic"] == status_address
        assert (will["qos"], will["retain"]) == (1, True)
        payload = json.loads(will["message"])
        assert_valid(v, payload)
        assert payload["online"] is False


# -- (c) examples validate against the schema and the pydantic model -------------

SCHEMA_MODELS: dict[str, type[BaseModel]] = {name: model for name, (model, _) in MODELS.items()}


def examples() -> list[tuple[str, str, dict[str, Any]]]:
    doc = load_asyncapi()
    out = []
    for msg in doc["components"]["messages"].values():
        schema_file = Path(msg["payload"]["$ref"]).name
        assert msg.get("examples"), f"message {msg['name']} has no examples"
        out.extend((schema_file, ex["name"], ex["payload"]) for ex in msg["examples"])
    return out


@pytest.mark.parametrize(
    ("schema_file", "payload"),
    [pytest.param(f, p, id=f"{f}:{n}") for f, n, p in examples()],
)
def test_example_validates(schema_file: str, payload: dict[str, Any]) -> None:
    assert_valid(validator(schema_file), payload)
    model = SCHEMA_MODELS[schema_file].model_validate(payload)
    # The example is what the gateway would put on the wire, field for field.
    assert json.loads(model.model_dump_json()).keys() == payload.keys()


def test_examples_never_name_an_arm() -> None:
    def walk(node: object) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                assert not re.search(r"(^|_)arms?(_|$)|treatment|placebo|allocation", k, re.I), k
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
        elif isinstance(node, str):
            assert not re.search(r"placebo|active arm|treatment arm", node, re.I), node

    for _, _, payload in examples():
        walk(payload)


# -- (d) a dose event from the real code path validates --------------------------


def real_dose_record() -> DoseRecord:
    config = one_device_config(sha256="ab" * 32)
    s = StreamBuilder()
    s.status(DeviceState.READY)
    s.start()
    s.nebulize(200)
    s.pause(45)
    s.nebulize(235)
    s.end(EndReason.COMPLETE, residual=105, neb_ms=435_000)
    tracker = SessionTracker()
    events = [e for rx in s.out for e in tracker.feed(rx)]
    [session] = [e.session for e in events if isinstance(e, SessionFinished)]
    ident = Ident(
        model="VM-1",
        serial_no="VM1-00381",
        firmware="2.4.1",
        nominal_rate_ul_min=400,
        reservoir_capacity_ul=6000,
        last_session_no=41,
    )
    return build_dose_record(
        session,
        assess(session, config.dose_rules),
        device=config.devices[0],
        ident=ident,
        config=config,
    )


def real_dose_event_json() -> str:
    return real_dose_record().event.model_dump_json()


def test_real_dose_event_validates_against_exported_schema() -> None:
    record = real_dose_record()
    payload = json.loads(record.event.model_dump_json())
    detail = json.loads(record.detail.model_dump_json())
    assert payload["verdict"] == "complete"
    assert detail["pauses"]["count"] == 1
    assert detail["event_id"] == payload["event_id"]
    assert_valid(validator("dose_completion.schema.json"), payload)
    assert_valid(validator("dose_detail.schema.json"), detail)


# -- (e) the CLI check passes on the committed schemas ---------------------------


def test_cli_schema_check_passes() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "devicegw.cli", "schema", "check", str(SCHEMAS)],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_cli_schema_check_names_the_differing_file(tmp_path: Path) -> None:
    for p in SCHEMAS.glob("*.json"):
        (tmp_path / p.name).write_text(p.read_text(encoding="utf-8"), encoding="utf-8")
    (tmp_path / "telemetry.schema.json").write_text("{}\n", encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "devicegw.cli", "schema", "check", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 1
    assert "telemetry.schema.json" in result.stderr
    assert "devicegw schema export" in result.stderr


def test_cli_schema_export_writes_every_file(tmp_path: Path) -> None:
    out = tmp_path / "schemas"
    result = subprocess.run(
        [sys.executable, "-m", "devicegw.cli", "schema", "export", str(out)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert {p.name for p in out.iterdir()} == set(MODELS)
    for name in MODELS:
        assert name in result.stdout
        assert (out / name).read_text(encoding="utf-8") == (SCHEMAS / name).read_text(
            encoding="utf-8"
        )


@pytest.mark.parametrize(
    "hostile", ["\x1b[2J\x1b[31mX", "[/]\n", "a/b", "+", "#", "", "dev ice", "$SYS", "x" * 65]
)
def test_no_device_string_becomes_a_topic_level(hostile: str) -> None:
    """Issue 14 item 6: topics are made of configured ids only, and checked again here."""
    t = Topics("devicegw/v1", "site-042", "gw-1")
    for make in (t.dose, t.device_status, t.telemetry, t.safety):
        with pytest.raises(ValueError, match="not a topic level"):
            make(hostile)
    with pytest.raises(ValueError):
        Topics("devicegw/v1", hostile, "gw-1")
    if hostile != "a/b":  # two good levels make a good prefix
        with pytest.raises(ValueError):
            Topics(f"devicegw/{hostile}", "site-042", "gw-1")
