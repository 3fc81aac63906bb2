"""Dose events -> SDTM EC + SUPPEC and FHIR R4 MedicationAdministration: golden files.

``tests/data/export/events.jsonl`` was built once by :func:`build_events` (the
real session tracker, dose check and record builder; the blinded half of each
record) and is kept as committed data: it is what an EDC has stored.
``events_v1.jsonl`` is what a contract 1.0 EDC stored before the migration
(with restricted reason codes in it). ``ec.csv``, ``suppec.csv`` and
``fhir.json`` are the expected outputs, compared byte for byte, made with
``trial.toml``. Regenerate all of them with::

    DEVICEGW_REGENERATE_EXPORT=1 .venv/bin/pytest tests/test_edc_export.py
"""

from __future__ import annotations

import csv
import io
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

from devicegw.config import Config, TrialSettings, load_config, parse_config
from devicegw.contract.payloads import DoseEvent
from devicegw.core.dose_check import assess
from devicegw.core.dose_event import build_dose_record
from devicegw.core.session_tracker import SessionFinished, SessionTracker
from devicegw.edc.export import (
    EC_COLUMNS,
    MASKED_PRODUCT,
    RESEARCH_STUDY_EXTENSION,
    SUPP_COLUMNS,
    ExportError,
    load_events,
    read_events,
    render,
    to_sdtm_ec,
)
from drivers.vm1.messages import AlarmCode, DeviceState, EndReason, Ident
from tests.session_stream import T0, StreamBuilder

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data" / "export"
EVENTS = DATA / "events.jsonl"
EVENTS_V1 = DATA / "events_v1.jsonl"
CONFIG = DATA / "trial.toml"
GOLDEN = {name: DATA / name for name in ("ec.csv", "suppec.csv", "fhir.json")}
REGENERATE = os.environ.get("DEVICEGW_REGENERATE_EXPORT") == "1"
DAY_MS = 86_400_000

# Words that would name or hint at an arm of this trial.
ARM_WORDS = re.compile(
    r"(?<![a-z])(arms?|exosomes?|saline|placebo|sham|active|control)(?![a-z])", re.I
)


def trial() -> TrialSettings:
    config = load_config(CONFIG)
    assert config.trial is not None
    return config.trial


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
    record = build_dose_record(
        session,
        assess(session, config.dose_rules),
        device=config.devices[device - 1],
        ident=ident,
        config=config,
    )
    return _stored(record.event)  # the EDC stores the blinded half only


def _stored(event: DoseEvent) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(event.model_dump_json())
    # Delivery metadata (seq numbers) is stamped per send and is not part of
    # the record; the committed input has none. The export ignores it either
    # way (tested below).
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
    # Subject 3: stopped before anything left the reservoir (low battery): not given ...
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
    event["volume"]["delivered_ml"] = None
    event["volume"]["delivered_fraction"] = None
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
    for fmt in ("sdtm-ec", "fhir"):
        for name, text in render(stored, fmt, trial=trial()).items():  # type: ignore[arg-type]
            GOLDEN[name].write_text(text, encoding="utf-8")


if REGENERATE:
    _write_golden()


def rendered() -> dict[str, str]:
    events = load_events(EVENTS)
    return {**render(events, "sdtm-ec", trial=trial()), **render(events, "fhir", trial=trial())}


def rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


# -- golden outputs ----------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_export_matches_golden_file(name: str) -> None:
    assert rendered()[name] == GOLDEN[name].read_text(encoding="utf-8"), (
        f"{name} differs: if the change is intended, regenerate "
        "(see this module's docstring) and review the diff"
    )


def run_export(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "devicegw.cli", "export", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        cwd=ROOT,
        env=env,
    )


def test_cli_export_writes_the_golden_bytes(tmp_path: Path) -> None:
    base = ["--config", str(CONFIG), "--input", str(EVENTS)]
    result = run_export(*base, "--format", "sdtm-ec", "--output", str(tmp_path / "sdtm"))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "sdtm").iterdir()) == ["ec.csv", "suppec.csv"]
    for name in ("ec.csv", "suppec.csv"):
        assert (tmp_path / "sdtm" / name).read_bytes() == GOLDEN[name].read_bytes()
    result = run_export(*base, "--format", "fhir", "--output", str(tmp_path / "fhir.json"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "fhir.json").read_bytes() == GOLDEN["fhir.json"].read_bytes()


def test_the_same_bytes_whatever_the_machines_time_zone(tmp_path: Path) -> None:
    """Two TZ values far apart (and a DST zone): the exporter writes the same bytes."""
    outputs = []
    for tz in ("UTC", "America/Los_Angeles", "Asia/Kolkata"):
        out = tmp_path / tz.replace("/", "_")
        env = {**os.environ, "TZ": tz}
        base = ["--config", str(CONFIG), "--input", str(EVENTS)]
        result = run_export(*base, "--format", "sdtm-ec", "--output", str(out), env=env)
        assert result.returncode == 0, result.stderr
        result = run_export(*base, "--format", "fhir", "--output", str(out / "fhir.json"), env=env)
        assert result.returncode == 0, result.stderr
        outputs.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    assert outputs[0] == outputs[1] == outputs[2]
    assert outputs[0] == {name: path.read_bytes() for name, path in sorted(GOLDEN.items())}


def test_export_is_independent_of_input_order() -> None:
    lines = EVENTS.read_text(encoding="utf-8").splitlines()
    forward = render(read_events(lines), "sdtm-ec", trial=trial())
    assert render(read_events(list(reversed(lines))), "sdtm-ec", trial=trial()) == forward


def test_no_output_names_an_arm() -> None:
    for path in [EVENTS, *GOLDEN.values()]:
        text = path.read_text(encoding="utf-8")
        assert not ARM_WORDS.search(text), f"{path.name}: {ARM_WORDS.search(text)}"


def test_the_export_config_needs_a_trial(tmp_path: Path) -> None:
    cfg = tmp_path / "gw.toml"
    cfg.write_text('[gateway]\nid = "gw1"\nsite = "s1"\n', encoding="utf-8")
    result = run_export("--config", str(cfg), "--input", str(EVENTS), "--format", "fhir")
    assert result.returncode == 1
    assert "[trial] section with study_id and time_zone" in result.stderr


# -- SDTM EC + SUPPEC ----------------------------------------------------------------


def ec_rows() -> list[dict[str, str]]:
    return rows(GOLDEN["ec.csv"].read_text(encoding="utf-8"))


def supp_rows() -> list[dict[str, str]]:
    return rows(GOLDEN["suppec.csv"].read_text(encoding="utf-8"))


def test_ec_rows_are_ordered_and_keyed_per_subject() -> None:
    ec = ec_rows()
    assert list(ec[0]) == list(EC_COLUMNS)
    assert [r["USUBJID"] for r in ec] == [f"CVD-042-{i:04d}" for i in (1, 2, 3) for _ in (1, 2)]
    for r in ec:
        assert (r["STUDYID"], r["DOMAIN"], r["ECTRT"], r["ECMOOD"], r["ECPRESP"]) == (
            "CVD-042",
            "EC",
            MASKED_PRODUCT,
            "PERFORMED",
            "Y",
        )
        assert (r["ECDOSU"], r["ECDOSFRM"], r["ECROUTE"]) == (
            "mL",
            "SOLUTION",
            "RESPIRATORY (INHALATION)",
        )
        assert re.fullmatch(r"K-\d+", r["ECREFID"])
        # Site-local collected times with their offset (Europe/Berlin in November).
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+01:00", r["ECENDTC"])
    for subject in ("CVD-042-0001", "CVD-042-0002", "CVD-042-0003"):
        starts = [r["ECSTDTC"] or r["ECENDTC"] for r in ec if r["USUBJID"] == subject]
        assert starts == sorted(starts)
        seqs = [int(r["ECSEQ"]) for r in ec if r["USUBJID"] == subject]
        assert seqs == sorted(seqs) and len(set(seqs)) == 2


def test_local_times_are_the_utc_times_with_the_sites_offset() -> None:
    [first] = [e for e in load_events(EVENTS) if e.subject_id == "CVD-042-0001"][:1]
    start, _ = first.period()
    assert start is not None
    [row] = [r for r in ec_rows() if r["ECSPID"] == str(first.event_id)]
    local = (start + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S") + "+01:00"
    assert row["ECSTDTC"] == local


def test_ec_occurrence_and_doses() -> None:
    by_verdict: dict[str, list[dict[str, str]]] = {}
    supp = supp_rows()
    for r in ec_rows():
        [verdict] = [
            s["QVAL"]
            for s in supp
            if (s["USUBJID"], s["IDVARVAL"], s["QNAM"]) == (r["USUBJID"], r["ECSEQ"], "DOSVERD")
        ]
        by_verdict.setdefault(verdict, []).append(r)
    assert set(by_verdict) == {"COMPLETE", "PARTIAL", "DEVIATION", "ABORTED", "INDETERMINATE"}
    [complete] = by_verdict["COMPLETE"]
    assert (complete["ECOCCUR"], complete["ECDOSE"], complete["ECREASOC"]) == ("Y", "2.90", "")
    [partial] = by_verdict["PARTIAL"]
    assert (partial["ECOCCUR"], partial["ECDOSE"]) == ("Y", "1.50")
    [indeterminate] = by_verdict["INDETERMINATE"]
    assert (indeterminate["ECOCCUR"], indeterminate["ECDOSE"]) == ("", "")
    aborted = {(r["ECOCCUR"], r["ECDOSE"], r["ECREASOC"]) for r in by_verdict["ABORTED"]}
    # A dose not given: ECOCCUR=N with the reason, and an empty dose, never 0.00.
    assert aborted == {
        ("Y", "0.13", ""),
        ("N", "", "ENDED BY DEVICE, DURATION BELOW MINIMUM, DELIVERED BELOW MINIMUM"),
    }
    assert all(r["ECDOSE"] != "0.00" for r in ec_rows())


def test_verdicts_and_flags_are_supplemental_qualifiers() -> None:
    ec, supp = ec_rows(), supp_rows()
    assert not {"DOSVERD", "QUERYFL", "EXOCCUR", "EXADJ"} & set(ec[0])
    assert list(supp[0]) == list(SUPP_COLUMNS)
    keys = {(r["USUBJID"], r["ECSEQ"]) for r in ec}
    for s in supp:
        assert (s["STUDYID"], s["RDOMAIN"], s["IDVAR"]) == ("CVD-042", "EC", "ECSEQ")
        assert (s["USUBJID"], s["IDVARVAL"]) in keys  # every qualifier has its parent
        assert s["QVAL"]  # SUPPQUAL: no record with a null value
        assert re.fullmatch(r"[A-Z][A-Z0-9_]{0,7}", s["QNAM"])
        assert len(s["QLABEL"]) <= 40
        assert s["QORIG"] in ("Derived", "Assigned")
        assert s["QEVAL"] == ""
    assert sum(s["QNAM"] == "DOSVERD" for s in supp) == len(ec)
    assert sum(s["QNAM"] == "DATASRC" for s in supp) == len(ec)
    flagged = [s for s in supp if s["QNAM"] == "QUERYFL"]
    assert [f["QVAL"] for f in flagged] == ["Y"]  # the indeterminate, reconciled session
    reasons = {s["QVAL"] for s in supp if s["QNAM"] == "DOSRSN"}
    assert "pause_above_maximum" in reasons
    assert "ended_by_device, duration_below_minimum, delivered_below_minimum" in reasons


def test_sequence_numbers_stay_put_when_a_late_event_arrives() -> None:
    lines = EVENTS.read_text(encoding="utf-8").splitlines()
    full, _ = to_sdtm_ec(read_events(lines), trial=trial())
    seq = {r["ECSPID"]: r["ECSEQ"] for r in full}
    for late in range(len(lines)):
        early = [line for i, line in enumerate(lines) if i != late]
        partial, _ = to_sdtm_ec(read_events(early), trial=trial())
        assert {r["ECSPID"]: r["ECSEQ"] for r in partial} == {
            k: v for k, v in seq.items() if k != json.loads(lines[late])["event_id"]
        }


def test_two_doses_in_one_second_get_distinct_numbers() -> None:
    [line] = EVENTS.read_text(encoding="utf-8").splitlines()[:1]
    twin = json.loads(line)
    twin["event_id"] = "00000000-0000-5000-8000-00000000000a"
    ec, _ = to_sdtm_ec(read_events([line, json.dumps(twin)]), trial=trial())
    assert len({r["ECSEQ"] for r in ec}) == 2
    assert {int(r["ECSEQ"]) for r in ec} == {int(ec[0]["ECSEQ"]), int(ec[0]["ECSEQ"]) + 1}


def test_device_clock_is_used_for_both_ends_when_the_gateway_missed_the_start() -> None:
    events = {e.verdict: e for e in load_events(EVENTS)}
    reconciled = events["indeterminate"]
    assert reconciled.times.gateway_start_utc is None
    start, end = reconciled.period()
    assert (start, end) == (reconciled.times.device_start_utc, reconciled.times.device_end_utc)
    assert start is not None and end is not None
    assert timedelta(seconds=430) < end - start < timedelta(seconds=440)


# -- FHIR --------------------------------------------------------------------------


def fhir_bundle() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(GOLDEN["fhir.json"].read_text(encoding="utf-8"))
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
        # The study, from [trial] study_id.
        assert r["extension"] == [
            {
                "url": RESEARCH_STUDY_EXTENSION,
                "valueReference": {
                    "type": "ResearchStudy",
                    "identifier": {"system": "urn:trial:study", "value": "CVD-042"},
                },
            }
        ]
        assert r["subject"]["identifier"]["system"] == "urn:trial:subject"
        assert set(r["subject"]) == {"type", "identifier"}  # no names, no display
        assert r["medicationCodeableConcept"]["text"].startswith("Study drug (masked), kit K-")
        assert r["dosage"]["route"]["coding"][0]["code"] == "447694001"
        assert r["device"][0]["identifier"]["system"] == "urn:trial:device-serial"
        assert r["effectivePeriod"]["end"].endswith("Z")
        verdict = r["note"][0]["text"].split(":")[1].split(";")[0].strip()
        statuses.setdefault(verdict, set()).add(r["status"])
        if "dose" in r["dosage"]:
            dose = r["dosage"]["dose"]
            assert (dose["unit"], dose["system"], dose["code"]) == (
                "mL",
                "http://unitsofmeasure.org",
                "mL",
            )
            assert dose["value"] > 0
        else:
            assert r["status"] in ("not-done", "unknown")
        if r["status"] == "not-done":
            # The blinded reason: which physical cause ended it is restricted.
            assert "ended_by_device" in r["statusReason"][0]["text"]
            assert "battery" not in json.dumps(r)
    assert statuses == {
        "complete": {"completed"},
        "deviation": {"completed"},
        "partial": {"stopped"},
        "aborted": {"stopped", "not-done"},  # 0.13 mL given; nothing given
        "indeterminate": {"unknown"},
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
    newer["a_field_from_v2_9"] = {"x": 1}
    assert len(read_events([json.dumps(newer)])) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text(lines[0] + "\n" + '{"event_type": "telemetry"}\n', encoding="utf-8")
    with pytest.raises(ExportError, match=r"bad.jsonl: line 2: not a dose event"):
        load_events(bad)


def test_a_timestamp_without_an_offset_is_refused() -> None:
    event = json.loads(_lines()[0])
    event["times"]["gateway_end_utc"] = "2026-11-25T08:08:10"  # naive: whose local time?
    with pytest.raises(ExportError, match=r"^line 1: not a dose event") as info:
        read_events([json.dumps(event)])
    assert "times.gateway_end_utc" in str(info.value)
    assert "timezone" in str(info.value)


def test_a_newer_major_version_is_refused() -> None:
    event = json.loads(_lines()[0])
    event["schema_version"] = "3.0"
    with pytest.raises(ExportError, match=r"schema_version 3.0: this export reads contract"):
        read_events([json.dumps(event)])


def test_events_stored_before_the_v2_migration_export_blinded() -> None:
    """A 1.0 event still carries restricted reason codes: they never reach the output."""
    events = load_events(EVENTS_V1)
    assert {e.schema_version for e in events} == {"1.0"}
    raw = EVENTS_V1.read_text(encoding="utf-8")
    assert "ended_by_fault" in raw and "device_alarm" in raw
    files = {
        **render(events, "sdtm-ec", trial=trial()),
        **render(events, "fhir", trial=trial()),
    }
    for text in files.values():
        assert "ended_by_fault" not in text
        assert "device_alarm" not in text
    assert "ended_by_device, duration_below_minimum, delivered_below_minimum" in files["suppec.csv"]
    # The same doses as the v2 events: same ids, same rows.
    v2 = render(load_events(EVENTS), "sdtm-ec", trial=trial())
    assert rows(files["ec.csv"]) == rows(v2["ec.csv"])


def test_cli_export_reports_bad_input(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n", encoding="utf-8")
    result = run_export("--config", str(CONFIG), "--input", str(bad), "--format", "fhir")
    assert result.returncode == 1
    assert "line 1" in result.stderr


def test_cli_sdtm_ec_needs_an_output_directory() -> None:
    result = run_export("--config", str(CONFIG), "--input", str(EVENTS))
    assert result.returncode == 1
    assert "--output DIR" in result.stderr
