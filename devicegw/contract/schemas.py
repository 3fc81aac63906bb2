"""JSON Schemas of every published payload, generated from the pydantic models.

The committed copies live in ``docs/schemas`` and are referenced by
``docs/asyncapi.yaml``; ``devicegw schema check docs/schemas`` (and the test
suite) fail when they drift from the models. Regenerate with
``devicegw schema export docs/schemas``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from devicegw.contract.payloads import DeviceStatus, DoseEvent, GatewayStatus, Telemetry
from devicegw.contract.spo2 import PostDoseSafetySummary, SafetyAlert

DRAFT_2020_12 = "https://json-schema.org/draft/2020-12/schema"
ID_BASE = "https://devicegw.invalid/schemas/v1/"

# file name -> (model, title); the file name is part of the contract (stable $id).
MODELS: dict[str, tuple[type[BaseModel], str]] = {
    "dose_completion.schema.json": (DoseEvent, "devicegw dose_completion event (v1)"),
    "device_status.schema.json": (DeviceStatus, "devicegw device_status (v1)"),
    "gateway_status.schema.json": (GatewayStatus, "devicegw gateway_status (v1)"),
    "telemetry.schema.json": (Telemetry, "devicegw telemetry (v1)"),
    "safety_alert.schema.json": (SafetyAlert, "devicegw safety_alert (v1)"),
    "post_dose_safety_summary.schema.json": (
        PostDoseSafetySummary,
        "devicegw post_dose_safety_summary (v1)",
    ),
}


def schema_for(name: str) -> dict[str, Any]:
    model, title = MODELS[name]
    schema = model.model_json_schema(mode="serialization")
    return {
        "$schema": DRAFT_2020_12,
        "$id": ID_BASE + name,
        **schema,
        "title": title,
    }


def schemas() -> dict[str, dict[str, Any]]:
    """File name -> JSON Schema, for every payload the gateway publishes."""
    return {name: schema_for(name) for name in MODELS}


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
