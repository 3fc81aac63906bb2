"""JSON Schemas of every published payload, generated from the pydantic models.

The committed copies live in ``docs/schemas`` and are referenced by
``docs/asyncapi.yaml``; ``devicegw schema check docs/schemas`` (and the test
suite) fail when they drift from the models. Regenerate with
``devicegw schema export docs/schemas``.

Two readings of one contract (docs/contract.md, "Unknown fields"):

- :func:`schemas` are the **published** schemas: forward compatible, they
  never say ``additionalProperties: false``, so a consumer validating a
  payload from a newer ``2.x`` gateway still accepts it (the versioning policy
  only ever adds fields within a major version).
- :func:`strict_schemas` are what the gateway holds *itself* to: every object
  closed, so a field the models do not declare is an error. ``devicegw tail``
  (strict by default) and the test suite check the gateway's output with them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from devicegw.contract.base import TOPIC_VERSION
from devicegw.contract.payloads import (
    AssignAnswer,
    AssignCommand,
    DeviceDetail,
    DeviceStatus,
    DoseCorrection,
    DoseDetail,
    DoseEvent,
    DoseMissed,
    GatewayStatus,
    Telemetry,
    TelemetryDetail,
)
from devicegw.contract.spo2 import PostDoseSafetySummary, SafetyAlert

DRAFT_2020_12 = "https://json-schema.org/draft/2020-12/schema"
ID_BASE = f"https://devicegw.invalid/schemas/{TOPIC_VERSION}/"

# file name -> (model, title); the file name is part of the contract (stable $id).
MODELS: dict[str, tuple[type[BaseModel], str]] = {
    "dose_completion.schema.json": (DoseEvent, "devicegw dose_completion event (v2, blinded)"),
    "dose_correction.schema.json": (DoseCorrection, "devicegw dose_correction (v2, blinded)"),
    "dose_missed.schema.json": (DoseMissed, "devicegw dose_missed (v2, blinded)"),
    "assign_command.schema.json": (AssignCommand, "devicegw assign_command (v2, to the gateway)"),
    "assign_answer.schema.json": (AssignAnswer, "devicegw assign_answer (v2)"),
    "device_status.schema.json": (DeviceStatus, "devicegw device_status (v2, blinded)"),
    "gateway_status.schema.json": (GatewayStatus, "devicegw gateway_status (v2, blinded)"),
    "telemetry.schema.json": (Telemetry, "devicegw telemetry (v2, blinded)"),
    "safety_alert.schema.json": (SafetyAlert, "devicegw safety_alert (v2, blinded)"),
    "post_dose_safety_summary.schema.json": (
        PostDoseSafetySummary,
        "devicegw post_dose_safety_summary (v2, blinded)",
    ),
    "dose_detail.schema.json": (DoseDetail, "devicegw dose_detail (v2, restricted)"),
    "device_detail.schema.json": (DeviceDetail, "devicegw device_detail (v2, restricted)"),
    "telemetry_detail.schema.json": (
        TelemetryDetail,
        "devicegw telemetry_detail (v2, restricted)",
    ),
}


def _strict(name: str) -> dict[str, Any]:
    model, title = MODELS[name]
    schema = model.model_json_schema(mode="serialization")
    return {
        "$schema": DRAFT_2020_12,
        "$id": ID_BASE + name,
        **schema,
        "title": title,
    }


def _opened(node: Any) -> Any:
    """The schema with every ``additionalProperties: false`` removed (unknown fields allowed)."""
    if isinstance(node, dict):
        return {
            k: _opened(v)
            for k, v in node.items()
            if not (k == "additionalProperties" and v is False)
        }
    if isinstance(node, list):
        return [_opened(v) for v in node]
    return node


def schema_for(name: str) -> dict[str, Any]:
    """The published (forward-compatible) schema of one payload."""
    opened: dict[str, Any] = _opened(_strict(name))
    return opened


def schemas() -> dict[str, dict[str, Any]]:
    """File name -> published JSON Schema, for every payload the gateway publishes."""
    return {name: schema_for(name) for name in MODELS}


def strict_schemas() -> dict[str, dict[str, Any]]:
    """File name -> the closed schema the gateway's own output must meet."""
    return {name: _strict(name) for name in MODELS}


def render(schema: dict[str, Any]) -> str:
    """The exact bytes written to disk: stable key order, trailing newline."""
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def export(directory: Path) -> list[Path]:
    """Write every schema into ``directory``; returns the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, schema in schemas().items():
        path = directory / name
        path.write_text(render(schema), encoding="utf-8")
        written.append(path)
    return written


def check(directory: Path) -> list[str]:
    """Problems with the committed schemas in ``directory``; empty when up to date."""
    problems: list[str] = []
    for name, schema in schemas().items():
        path = directory / name
        try:
            committed = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            problems.append(f"{path}: missing")
            continue
        if committed != render(schema):
            problems.append(f"{path}: differs from the pydantic model")
    return problems
