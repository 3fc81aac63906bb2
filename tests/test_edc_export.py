"""Dose events -> SDTM EX-style CSV and FHIR R4 MedicationAdministration: golden files.

``tests/data/export/events.jsonl`` was built once by :func:`build_events` (the
real session tracker, dose check and event builder) and is kept as committed
data: it is what an EDC has stored, and stays readable whatever later minor
versions add. ``ex.csv`` and ``fhir.json`` are the expected outputs, compared
byte for byte. Regenerate all three with::

    DEVICEGW_REGENERATE_EXPORT=1 .venv/bin/pytest tests/test_edc_export.py
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B.bundle import Bundle

from devicegw.config import Config, parse_config
from devicegw.contract.payloads import DoseEvent
from devicegw.core.dose_check import assess
from devicegw.core.dose_event import build_dose_event
from devicegw.core.session_tracker import SessionFinished, SessionTracker
from devicegw.edc.export import (
    BLINDED_PRODUCT,
    EX_COLUMNS,
    ExportError,
    load_events,
    read_events,
    render,
    to_sdtm_ex,
)
from drivers.vm1.messages import AlarmCode, DeviceState, EndReason, Ident
from tests.session_stream import T0, StreamBuilder

DATA = Path(__file__).resolve().parent / "data" / "export"
EVENTS = DATA / "events.jsonl"
GOLDEN = {"sdtm-ex": DATA / "ex.csv", "fhir": DATA / "fhir.json"}
REGENERATE = os.environ.get("DEVICEGW_REGENERATE_EXPORT") == "1"
DAY_MS = 86_400_000

# Words that would name or hint at an arm of this trial.
ARM_WORDS = re.compile(
    r"(?<![a-z])(arms?|exosomes?|saline|placebo|sham|active|control)(?![a-z])", re.I
)


# -- the committed input, built once from the real code path ---------------------


def _config() -> Config:
    return parse_config(
        {
            "gateway": {"id": "gw-ward3", "site": "site-042"},
            "devices": [
                {
                    "id": f"neb-bed{i:02d}",
                    "type": "vm1",
                    "bed": f"B{i:02d}",
                    "subject_id": f"CVD-042-{i:04d}",
                    "kit_number": f"K-{10230 + i}",
                    "link": {"kind": "serial", "port": f"/dev/ttyUSB{i}"},
                }
                for i in (1, 2, 3)
            ],
        },
        sha256="ab" * 32,
    )


def _event(s: StreamBuilder, device: int, session_no: int) -> dict[str, Any]:
    config = _config()
    tracker = SessionTracker()
    [session] = [
        e.session for rx in s.out for e in tracker.feed(rx) if isinstance(e, SessionFinished)
    ]
    ident = Ident(
        model="VM-1",
        serial_no=f"VM1-0038{device}",
        firmware="2.4.1",
        nominal_rate_ul_min=400,
        reservoir_capacity_ul=6000,
        last_session_no=session_no - 1,
    )
    event = build_dose_event(
        session,
        assess(session, config.dose_rules),
        device=config.devices[device - 1],
        ident=ident,
        config=config,
    )
    return _stored(event)


def _stored(event: DoseEvent) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(event.model_dump_json())
    # Delivery metadata (seq numbers) is stamped per send and is not part of
    # the record; the committed input has none, like an event stored by a v1.0
    # subscriber. The export ignores it either way (tested below).
    out.pop("delivery", None)
    return out


def _stream(day: int, hour: int) -> StreamBuilder:
    start_ms = day * DAY_MS + hour * 3_600_000
    s = StreamBuilder(start_ms=start_ms)
    s.status(DeviceState.READY)
    return s


def _wall(s: StreamBuilder) -> int:
    """The device's clock at the stream's current time: set by the gateway, 3 s behind."""
    return int(T0.timestamp()) + s.t_ms // 1000 - 3


def build_events() -> list[dict[str, Any]]:
    """Two days of a three-bed ward: every verdict, both clocks, one reconciled session."""
    events = []
    # Subject 1: complete (with a pause), then partial (stopped by the user).
    s = _stream(0, 0)
    s.start(session_no=41, wall_s=_wall(s))
    s.nebulize(200)
    s.pause(45)
    s.nebulize(235)
    s.end(EndReason.COMPLETE, residual=105, neb_ms=435_000, session_no=41)
    events.append(_event(s, 1, 41))
    s = _stream(1, 0)
    s.start(session_no=42, wall_s=_wall(s))
    s.nebulize(225)
    s.end(EndReason.USER_STOP, residual=1500, neb_ms=225_000, session_no=42)
    events.append(_event(s, 1, 42))
    # Subject 2: a deviation (pauses too long), then aborted by a fault.
    s = _stream(0, 1)
    s.start(session_no=7, wall_s=_wall(s))
    for _ in range(3):
        s.nebulize(145)
        s.pause(250)
    s.end(EndReason.COMPLETE, residual=105, neb_ms=435_000, session_no=7)
    events.append(_event(s, 2, 7))
    s = _stream(1, 1)
    s.start(session_no=8, wall_s=_wall(s))
    s.nebulize(20)
    s.alarm(AlarmCode.OVER_TEMPERATURE, True)
    s.end(EndReason.FAULT, residual=2870, neb_ms=20_000, session_no=8)
    events.append(_event(s, 2, 8))
    # Subject 3: aborted before anything left the reservoir (low battery) ...
    s = _stream(0, 2)
    s.start(session_no=3, wall_s=_wall(s))
    s.nebulize(1, rate=0)
    s.end(EndReason.LOW_BATTERY, residual=3000, neb_ms=0, session_no=3)
    events.append(_event(s, 3, 3))
    # ... then a session the gateway only saw end: no gateway start, device
    # clock for both ends; and no usable volume estimate (indeterminate). The
    # tracker cannot produce that combination from a synthetic stream, so it
    # is a real event edited, then checked against the payload model.
    s = _stream(1, 2)
    s.start(session_no=4, wall_s=_wall(s))
    s.nebulize(435)
    s.end(EndReason.COMPLETE, residual=105, neb_ms=435_000, session_no=4)
    event = _event(s, 3, 4)
    event["data_source"] = "device_log"
    event["times"]["gateway_start_utc"] = None
    event["verdict"] = "indeterminate"
    event["reasons"] = ["volume_unknown", "reconciled_from_device_log"]
    for key in ("fill_ml", "residual_ml", "reservoir_drop_ml", "output_integral_ml"):
        event["volume"][key] = None
    for key in ("delivered_ml", "delivered_basis", "delivered_fraction", "max_disagreement_ml"):
        event["volume"][key] = None
    event["volume"]["estimates_agree"] = None
    events.append(_stored(DoseEvent.model_validate(event)))
    return events


def _write_golden() -> None:
    DATA.mkdir(parents=True, exist_ok=True)
    # Stored in arrival order, not sorted: the export must order them itself.
    order = [2, 0, 5, 3, 1, 4]
    events = build_events()
    EVENTS.write_text(
        "".join(json.dumps(events[i], separators=(",", ":")) + "\n" for i in order),
        encoding="utf-8",
    )
    stored = load_events(EVENTS)
    for fmt, path in GOLDEN.items():
        path.write_text(render(stored, fmt, study="CVD-042"), encoding="utf-8")  # type: ignore[arg-type]


if REGENERATE:
    _write_golden()


# -- golden outputs ----------------------------------------------------------------


@pytest.mark.parametrize("fmt", sorted(GOLDEN))
def test_export_matches_golden_file(fmt: str) -> None:
    text = render(load_events(EVENTS), fmt, study="CVD-042")  # type: ignore[arg-type]
    assert text == GOLDEN[fmt].read_text(encoding="utf-8"), (
        f"{GOLDEN[fmt].name} differs: if the change is intended, regenerate "
        "(see this module's docstring) and review the diff"
    )


@pytest.mark.parametrize("fmt", sorted(GOLDEN))
def test_cli_export_writes_the_golden_bytes(fmt: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["--input", str(EVENTS), "--format", fmt, "--study", "CVD-042", "--output", str(out)]
    result = subprocess.run(
        [sys.executable, "-m", "devicegw.cli", "export", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == GOLDEN[fmt].read_bytes()


def test_export_is_independent_of_input_order() -> None:
    lines = EVENTS.read_text(encoding="utf-8").splitlines()
    forward = render(read_events(lines), "fhir")
    assert render(read_events(list(reversed(lines))), "fhir") == forward


def test_no_output_names_an_arm() -> None:
    for path in [EVENTS, *GOLDEN.values()]:
        text = path.read_text(encoding="utf-8")
        assert not ARM_WORDS.search(text), f"{path.name}: {ARM_WORDS.search(text)}"


# -- SDTM EX mapping ---------------------------------------------------------------


def ex_rows() -> list[dict[str, str]]:
    return to_sdtm_ex(load_events(EVENTS), study="CVD-042")


def test_ex_rows_are_ordered_and_numbered_per_subject() -> None:
    rows = ex_rows()
    assert list(rows[0]) == list(EX_COLUMNS)
    keys = [(r["USUBJID"], int(r["EXSEQ"])) for r in rows]
    assert keys == [(f"CVD-042-{i:04d}", n) for i in (1, 2, 3) for n in (1, 2)]
    for r in rows:
        assert (r["STUDYID"], r["DOMAIN"], r["EXTRT"]) == ("CVD-042", "EX", BLINDED_PRODUCT)
        assert (r["EXDOSU"], r["EXDOSFRM"], r["EXROUTE"]) == (
            "mL",
            "SOLUTION",
            "RESPIRATORY (INHALATION)",
        )
        assert re.fullmatch(r"K-\d+", r["EXREFID"])
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", r["EXENDTC"])
    for subject in ("CVD-042-0001", "CVD-042-0002", "CVD-042-0003"):
        starts = [r["EXSTDTC"] for r in rows if r["USUBJID"] == subject]
        assert starts == sorted(starts)


def test_ex_verdict_mapping() -> None:
    by_verdict = {r["DOSVERD"]: r for r in ex_rows()}
    assert set(by_verdict) == {"COMPLETE", "PARTIAL", "DEVIATION", "ABORTED", "INDETERMINATE"}
    complete = by_verdict["COMPLETE"]
    assert (complete["EXOCCUR"], complete["EXADJ"], complete["QUERYFL"]) == ("Y", "", "")
    assert complete["EXDOSE"] == "2.90"  # reservoir drop 2.895 mL, half up
    partial = by_verdict["PARTIAL"]
    assert partial["EXOCCUR"] == "Y"
    assert partial["EXADJ"] == "PARTIAL DOSE: ended_by_user, delivered_below_minimum"
    assert by_verdict["DEVIATION"]["EXADJ"].startswith("PROTOCOL DEVIATION: ")
    assert "pause_above_maximum" in by_verdict["DEVIATION"]["EXADJ"]
    indeterminate = by_verdict["INDETERMINATE"]
    assert (indeterminate["EXOCCUR"], indeterminate["EXDOSE"], indeterminate["QUERYFL"]) == (
        "",
        "",
        "Y",
    )
    aborted = [r for r in ex_rows() if r["DOSVERD"] == "ABORTED"]
    assert {(r["EXDOSE"], r["EXOCCUR"]) for r in aborted} == {("0.13", "Y"), ("0.00", "N")}


def test_device_clock_is_used_for_both_ends_when_the_gateway_missed_the_start() -> None:
    events = {e.verdict: e for e in load_events(EVENTS)}
    reconciled = events["indeterminate"]
    assert reconciled.times.gateway_start_utc is None
    start, end = reconciled.period()
    assert (start, end) == (reconciled.times.device_start_utc, reconciled.times.device_end_utc)
    assert start is not None and end is not None
    assert timedelta(seconds=430) < end - start < timedelta(seconds=440)


# -- FHIR mapping ------------------------------------------------------------------


def fhir_bundle() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(GOLDEN["fhir"].read_text(encoding="utf-8"))
    return doc


def test_fhir_bundle_parses_as_fhir_r4b() -> None:
    # fhir.resources ships R4B (and R5) models; MedicationAdministration and
    # Bundle are the same in R4 and R4B.
    bundle = Bundle.model_validate(fhir_bundle())
    assert bundle.type == "collection"
    assert len(bundle.entry or []) == 6


def test_fhir_resources() -> None:
    statuses = {}
    for entry in fhir_bundle()["entry"]:
        r = entry["resource"]
        assert r["resourceType"] == "MedicationAdministration"
        assert entry["fullUrl"] == f"urn:uuid:{r['id']}"
        assert r["identifier"] == [{"system": "urn:ietf:rfc:3986", "value": entry["fullUrl"]}]
        assert r["subject"]["identifier"]["system"] == "urn:trial:subject"
        assert set(r["subject"]) == {"type", "identifier"}  # no names, no display
        assert r["medicationCodeableConcept"]["text"].startswith("Study drug (blinded), kit K-")
        assert r["dosage"]["route"]["coding"][0]["code"] == "447694001"
        assert r["device"][0]["identifier"]["system"] == "urn:trial:device-serial"
        verdict = r["note"][0]["text"].split(":")[1].split(";")[0].strip()
        statuses[verdict] = r["status"]
        if "dose" in r["dosage"]:
            dose = r["dosage"]["dose"]
            assert (dose["unit"], dose["system"], dose["code"]) == (
                "mL",
                "http://unitsofmeasure.org",
                "mL",
            )
        else:
            assert verdict == "indeterminate"
    assert statuses == {
        "complete": "completed",
        "deviation": "completed",
        "partial": "stopped",
        "aborted": "stopped",
        "indeterminate": "unknown",
    }


# -- input handling ----------------------------------------------------------------


def _lines() -> list[str]:
    return EVENTS.read_text(encoding="utf-8").splitlines()


def test_repeated_copies_are_dropped_even_with_other_delivery_metadata() -> None:
    lines = _lines()
    again = json.loads(lines[0])
    again["delivery"] = {"birth_seq": 9, "seq": 123, "redelivery": 1}
    events = read_events([*lines, lines[0], json.dumps(again)])
    assert len(events) == len(lines)


def test_a_conflicting_copy_is_an_error() -> None:
    lines = _lines()
    changed = json.loads(lines[0])
    changed["kit_number"] = "K-99999"
    with pytest.raises(ExportError, match="differs from line 1") as info:
        read_events([*lines, json.dumps(changed)])
    assert info.value.line == len(lines) + 1


def test_unknown_fields_are_ignored_and_bad_lines_named(tmp_path: Path) -> None:
    lines = _lines()
    newer = json.loads(lines[0])
    newer["a_field_from_v1_9"] = {"x": 1}
    assert len(read_events([json.dumps(newer)])) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text(lines[0] + "\n" + '{"event_type": "telemetry"}\n', encoding="utf-8")
    with pytest.raises(ExportError, match=r"bad.jsonl: line 2: not a dose event"):
        load_events(bad)


def test_cli_export_reports_bad_input(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n", encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "devicegw.cli", "export", "--input", str(bad)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 1
    assert "line 1" in result.stderr
