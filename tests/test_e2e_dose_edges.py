"""Dose records at the edges, end to end (issue 10): device bytes -> broker -> export.

Each case of the issue is a shipped scenario (simulators/scenarios/edges/) played by
the VM-1 simulator on a real pty; the gateway follows it as it would a real device
and publishes to a private Mosquitto; the test reads the blinded event the EDC keeps
and its restricted detail from the broker, then exports the received events with
``devicegw export`` (SDTM EC + SUPPEC) as a data manager would. The frame-level
cases (every branch of each rule) are in tests/test_dose_edges.py.

Several devices run side by side in one gateway, as on a ward; each event is
matched to its device by serial number.
"""

from __future__ import annotations

import asyncio
import csv
import json
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B.bundle import Bundle

from devicegw.cli.main import main as devicegw_main
from devicegw.contract.payloads import dose_event_id
from devicegw.contract.vocabulary import REASON_FEED, Feed, Reason
from simulators.scenario import load_scenario
from tests.e2e_harness import E2E, SCENARIOS, running
from tests.mqtt_helpers import MosquittoBroker

pytestmark = pytest.mark.e2e

EDGES = SCENARIOS / "edges"


async def events_by_serial(
    e2e: E2E, expected: dict[str, int], timeout: float = 90.0
) -> dict[str, list[tuple[dict[str, Any], dict[str, Any]]]]:
    """Wait for ``expected[serial]`` dose events per device; (event, detail) pairs in
    session order, after the devices have finished their scripts (nothing more follows)."""
    total = sum(expected.values())
    await e2e.wait_dose_events(total, timeout=timeout)
    await asyncio.wait_for(asyncio.gather(*(s.wait_until_idle() for s in e2e.sims)), timeout)
    await asyncio.sleep(0.5)
    out: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]] = {}
    for event in e2e.dose_events():
        detail = await e2e.detail_of(event)
        out.setdefault(event["device"]["serial_no"], []).append((event, detail))
    assert {k: len(v) for k, v in out.items()} == expected
    for pairs in out.values():
        pairs.sort(key=lambda p: p[0]["times"]["gateway_end_utc"])
        for event, _ in pairs:
            for reason in event["reasons"]:
                assert REASON_FEED[Reason(reason)] is Feed.BLINDED, reason
    return out


class Exported:
    """What ``devicegw export`` makes of the events as received: EC rows by ECSPID (the
    event_id), the SUPPEC rows, and the FHIR MedicationAdministrations by id."""

    def __init__(
        self,
        ec: dict[str, dict[str, str]],
        supp: list[dict[str, str]],
        fhir: dict[str, dict[str, Any]],
    ) -> None:
        self.ec, self.supp, self.fhir = ec, supp, fhir

    def queried(self, event: dict[str, Any]) -> bool:
        seq = self.ec[event["event_id"]]["ECSEQ"]
        return any(
            r["QNAM"] == "QUERYFL" and r["QVAL"] == "Y" and r["IDVARVAL"] == seq
            for r in self.supp
            if r["USUBJID"] == self.ec[event["event_id"]]["USUBJID"]
        )


def export(tmp_path: Path, events: list[dict[str, Any]]) -> Exported:
    """``devicegw export`` in both formats; the FHIR bundle must validate (fhir.resources)."""
    jsonl = tmp_path / "received.jsonl"
    jsonl.write_text("".join(json.dumps(e) + "\n" for e in events), encoding="utf-8")
    cfg = tmp_path / "export.toml"
    cfg.write_text(
        '[gateway]\nid = "gw-test"\nsite = "site-042"\n'
        f'data_dir = "{tmp_path / "export-data"}"\n'
        '[broker]\nhost = "127.0.0.1"\n'
        '[trial]\nstudy_id = "CVD-042"\ntime_zone = "Europe/Berlin"\n'
        '[[devices]]\nid = "neb-x"\ntype = "vm1"\nbed = "B01"\n'
        'subject_id = "CVD-042-0001"\nkit_number = "K-1"\n'
        'link = { kind = "serial", port = "/dev/null" }\n',
        encoding="utf-8",
    )
    out = tmp_path / "sdtm"
    rc = devicegw_main(
        ["export", "--config", str(cfg), "--input", str(jsonl), "--output", str(out)]
    )
    assert rc == 0
    with (out / "ec.csv").open(encoding="utf-8") as f:
        ec = {row["ECSPID"]: row for row in csv.DictReader(f)}
    with (out / "suppec.csv").open(encoding="utf-8") as f:
        supp = list(csv.DictReader(f))
    fhir_path = tmp_path / "fhir.json"
    fhir_args = ["--format", "fhir", "--output", str(fhir_path)]
    rc = devicegw_main(["export", "--config", str(cfg), "--input", str(jsonl), *fhir_args])
    assert rc == 0
    Bundle.model_validate_json(fhir_path.read_bytes())
    bundle = json.loads(fhir_path.read_bytes())
    fhir = {e["resource"]["id"]: e["resource"] for e in bundle["entry"]}
    text = (out / "ec.csv").read_text() + (out / "suppec.csv").read_text()
    text += fhir_path.read_text()
    for restricted in ("reservoir", "fill_above", "implausible"):
        assert restricted not in text.lower()
    return Exported(ec, supp, fhir)


def scenarios(*names: str) -> list[Path]:
    return [EDGES / f"{name}.toml" for name in names]


def serial(name: str) -> str:
    return load_scenario(EDGES / f"{name}.toml").device.serial_no


async def test_implausible_and_unknown_readings_end_to_end(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    names = ("level_sensor_blind", "residual_above_fill", "overdose_fill")
    async with running(mosquitto, tmp_path, scenarios(*names)) as e2e:
        got = await events_by_serial(e2e, {serial(n): 1 for n in names})
    [(blind, blind_d)] = got[serial("level_sensor_blind")]
    [(drift, drift_d)] = got[serial("residual_above_fill")]
    [(over, over_d)] = got[serial("overdose_fill")]

    # 0xFFFF is unknown, never 65.535 mL: the rate integral decides.
    assert blind_d["volume"]["fill_ml"] is None
    assert blind_d["volume"]["residual_ml"] is None
    # A rate-based estimate decides (the integral, or the device's total if telemetry was
    # too thin, as on a loaded host), never the reservoir.
    assert blind_d["volume"]["delivered_basis"] in ("output_integral", "device_cum")
    assert blind["volume"]["delivered_ml"] == pytest.approx(2.95, abs=0.25)
    assert blind["verdict"] == "complete"
    assert "reservoir_unknown" in blind_d["reasons"]

    # Residual above fill: the drop is not believed; the dose was given.
    assert drift_d["volume"]["delivered_basis"] in ("output_integral", "device_cum")
    assert drift["volume"]["delivered_ml"] == pytest.approx(2.95, abs=0.25)
    assert drift["verdict"] == "complete"
    assert "reservoir_implausible" in drift_d["reasons"]

    # A double fill nebulized: a deviation, never complete.
    assert over["verdict"] == "deviation"
    assert "delivered_above_maximum" in over["reasons"]
    assert "fill_above_prescribed" in over_d["reasons"]
    assert over["volume"]["delivered_fraction"] > 1.8

    out = export(tmp_path, [blind, drift, over])
    assert float(out.ec[blind["event_id"]]["ECDOSE"]) == pytest.approx(2.95, abs=0.25)
    assert out.ec[drift["event_id"]]["ECOCCUR"] == "Y"
    assert float(out.ec[drift["event_id"]]["ECDOSE"]) == pytest.approx(2.95, abs=0.25)
    assert float(out.ec[over["event_id"]]["ECDOSE"]) > 5.5
    assert out.fhir[drift["event_id"]]["status"] == "completed"
    assert out.fhir[drift["event_id"]]["dosage"]["dose"]["value"] == pytest.approx(2.95, abs=0.25)
    assert "delivered_above_maximum" in out.fhir[over["event_id"]]["note"][0]["text"]


async def test_device_restarts_and_counter_resets_end_to_end(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    names = ("reboot_mid_session", "reboot_recorded", "counter_reset")
    expected = {
        serial("reboot_mid_session"): 2,
        serial("reboot_recorded"): 1,
        serial("counter_reset"): 2,
    }
    async with running(mosquitto, tmp_path, scenarios(*names)) as e2e:
        got = await events_by_serial(e2e, expected)

    # Rebooted after 25 days of uptime (past 2^31 ms) and lost the session: finished
    # from what was seen, a minute long, never negative nor taken for a wrap.
    (lost, lost_d), (after, _) = got[serial("reboot_mid_session")]
    assert lost["session_no"] == 42
    assert {"device_restarted", "session_record_unavailable"} <= set(lost["reasons"])
    assert lost_d["end_reason"] == "UNKNOWN"
    assert lost_d["times"]["duration_at_least_s"] == pytest.approx(60, abs=5)
    assert lost["times"]["duration_s"] is None or 0 < lost["times"]["duration_s"] < 120
    assert lost_d["volume"]["output_integral_ml"] < 0.6
    assert lost["verdict"] != "complete"
    assert after["session_no"] == 43 and after["verdict"] == "complete"
    assert "device_restarted" not in after["reasons"]

    # The device logged the interrupted session: finished from its record.
    [(logged, logged_d)] = got[serial("reboot_recorded")]
    assert "device_restarted" in logged["reasons"]
    assert "session_record_unavailable" not in logged["reasons"]
    assert logged_d["end_reason"] == "FAULT"
    assert logged_d["times"]["nebulizing_s"] == pytest.approx(60, abs=2)
    assert logged["verdict"] == "aborted"

    # Session 42 twice (a board swap): two doses, two ids, the first id unchanged.
    (first, _), (second, _) = got[serial("counter_reset")]
    assert first["session_no"] == second["session_no"] == 42
    assert first["event_id"] == str(dose_event_id("VM-1", serial("counter_reset"), 42))
    assert second["event_id"] != first["event_id"]
    assert "device_counter_reset" in second["reasons"]
    assert "device_counter_reset" not in first["reasons"]
    assert first["verdict"] == second["verdict"] == "complete"

    events = [lost, after, logged, first, second]
    out = export(tmp_path, events)
    assert set(out.ec) == set(out.fhir) == {e["event_id"] for e in events}
    # ECSEQ is unique within a subject (SDTM), also for a repeated session number.
    assert len({(row["USUBJID"], row["ECSEQ"]) for row in out.ec.values()}) == len(events)
    assert float(out.ec[second["event_id"]]["ECDOSE"]) == pytest.approx(2.95, abs=0.25)
    assert "device_counter_reset" in out.fhir[second["event_id"]]["note"][0]["text"]
    assert "device_restarted" in out.fhir[lost["event_id"]]["statusReason"][0]["text"]


async def test_outages_end_to_end(mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    names = ("pause_then_link_drop", "device_log_no_clock")
    async with running(mosquitto, tmp_path, scenarios(*names)) as e2e:
        got = await events_by_serial(e2e, {serial(n): 1 for n in names})
        snapshot = e2e.gateway.snapshot()

    # The pause ends at the link drop; the outage is not pause time.
    [(paused, paused_d)] = got[serial("pause_then_link_drop")]
    [item] = paused_d["pauses"]["items"]
    assert item["cut_by_link"] is True
    assert item["duration_s"] == pytest.approx(10, abs=2)
    assert paused_d["pauses"]["total_s"] < 15
    assert "pause_above_maximum" not in paused["reasons"]
    assert "pause_state_unknown" in paused["reasons"]
    assert paused["verdict"] == "complete"
    assert paused_d["link"]["interruptions"] == 1
    # One frame-loss count: the event's equals what `devicegw status` shows.
    assert paused_d["link"]["frames_lost"] == snapshot.devices["neb-bed01"].frames_lost

    # Logged by a device whose clock was lost: 2.9 mL in a minute of mesh time is more
    # than a VM-1 can nebulize (nominal 400 uL/min), so the volume is not believed and
    # the EDC gets a query, never a complete dose. The duration is unknown (no clock);
    # the least it lasted is the mesh time.
    [(unseen, unseen_d)] = got[serial("device_log_no_clock")]
    assert unseen["data_source"] == "device_log"
    assert unseen["times"]["device_start_utc"] is None
    assert unseen_d["times"]["nebulizing_s"] == pytest.approx(60, abs=10)
    assert unseen_d["times"]["duration_at_least_s"] == unseen_d["times"]["nebulizing_s"]
    assert unseen["verdict"] == "indeterminate"
    assert {"duration_unknown", "volume_unknown"} <= set(unseen["reasons"])
    assert "delivery_implausible" in unseen_d["reasons"]
    assert unseen["volume"]["delivered_ml"] is None

    out = export(tmp_path, [paused, unseen])
    assert out.ec[paused["event_id"]]["ECOCCUR"] == "Y"
    assert out.fhir[paused["event_id"]]["status"] == "completed"
    assert out.ec[unseen["event_id"]]["ECDOSE"] == ""
    assert out.queried(unseen) and not out.queried(paused)
    assert out.fhir[unseen["event_id"]]["status"] == "unknown"
    assert "dose" not in out.fhir[unseen["event_id"]]["dosage"]
