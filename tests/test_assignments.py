"""AssignmentService (issue 11): set, change, end, refuse; history by time; all audited.

Real parts: a real SQLite gateway store in tmp_path and the real audit trail.
"""

from __future__ import annotations

import sqlite3
from datetime import timedelta
from pathlib import Path

import pytest

from devicegw.core.ports import AuditKind
from devicegw.storage.assignments import (
    AssignmentRefused,
    AssignmentService,
    KitListError,
    current_of,
    load_kit_list,
)
from devicegw.storage.audit import AuditTrail, verify
from devicegw.storage.store import Store
from drivers.clock import ManualClock


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store.in_dir(tmp_path)
    yield s  # type: ignore[misc]
    s.close()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


def _service(store: Store, clock: ManualClock, **kw: object) -> AssignmentService:
    trail = AuditTrail(store, clock=clock, gateway_id="gw1")
    return AssignmentService(store, trail, clock=clock, **kw)  # type: ignore[arg-type]


def _kinds(store: Store) -> list[str]:
    return [r[0] for r in store.conn.execute("SELECT kind FROM audit ORDER BY seq")]


def test_assign_change_end_and_lookup_by_time(store: Store, clock: ManualClock) -> None:
    svc = _service(store, clock)
    t0 = clock.now()
    assert svc.in_force_at("B1", t0) is None
    a1 = svc.assign(
        bed="B1",
        subject_id="CVD-042-0017",
        kit_number="K-A",
        operator="nurse.lee",
        reason="admission",
    )
    clock.advance(3600)
    a2 = svc.assign(
        bed="B1",
        subject_id="CVD-042-0021",
        kit_number="K-B",
        operator="nurse.lee",
        reason="bed turnover",
    )
    clock.advance(3600)
    svc.end(bed="B1", operator="nurse.kim", reason="discharged")
    # A session's start time picks the assignment in force then, not now.
    assert svc.in_force_at("B1", t0 + timedelta(minutes=30)) == a1
    assert svc.in_force_at("B1", t0 + timedelta(minutes=90)) == a2
    assert svc.in_force_at("B1", t0 + timedelta(minutes=150)) is None
    assert svc.current() == {}
    assert [a.subject_id for a in svc.history("B1")] == ["CVD-042-0017", "CVD-042-0021", None]
    assert _kinds(store) == ["bed_assigned", "bed_assigned", "bed_unassigned"]
    assert verify(store).ok


def test_current_read_from_each_beds_latest_row_is_the_historys(
    store: Store, clock: ManualClock
) -> None:
    """``current()`` reads each bed's latest row only; it must equal the whole history's
    ``current_of`` through assignments, replacements, ends and a bed reassigned after one."""
    svc = _service(store, clock)
    steps = [
        ("B1", "CVD-042-0001", "K-1"),
        ("B2", "CVD-042-0002", "K-2"),
        ("B3", "CVD-042-0003", "K-3"),
        ("B1", "CVD-042-0004", "K-4"),  # replaces 0001 on B1
        ("B2", None, None),  # B2 ends
        ("B3", None, None),
        ("B3", "CVD-042-0001", "K-5"),  # 0001 again, now on B3
        ("B10", "CVD-042-0010", "K-10"),
    ]
    for bed, subject, kit in steps:
        clock.advance(60)
        if subject is None:
            svc.end(bed=bed, operator="nurse.lee", reason="discharged")
        else:
            svc.assign(
                bed=bed, subject_id=subject, kit_number=kit, operator="nurse.lee", reason="r"
            )
        assert svc.current() == current_of(svc.history())
    assert {b: a.subject_id for b, a in svc.current().items()} == {
        "B1": "CVD-042-0004",
        "B3": "CVD-042-0001",
        "B10": "CVD-042-0010",
    }
    with pytest.raises(AssignmentRefused, match="is assigned to bed B3"):
        svc.assign(
            bed="B2", subject_id="CVD-042-0001", kit_number="K-9", operator="n.l", reason="r"
        )


def test_history_survives_a_restart(tmp_path: Path, clock: ManualClock) -> None:
    with Store.in_dir(tmp_path) as s:
        _service(s, clock).assign(
            bed="B2", subject_id="CVD-042-0003", kit_number="K-7", operator="op", reason="start"
        )
    with Store.in_dir(tmp_path) as s:
        svc = _service(s, clock)
        assert svc.current()["B2"].kit_number == "K-7"


def test_rows_are_append_only(store: Store, clock: ManualClock) -> None:
    svc = _service(store, clock)
    svc.assign(bed="B1", subject_id="CVD-042-0017", kit_number="K-A", operator="op", reason="r")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        store.conn.execute("UPDATE assignment SET subject_id = 'X-1'")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        store.conn.execute("DELETE FROM assignment")


def test_refusals_are_audited_with_a_one_line_reason(
    store: Store, clock: ManualClock, tmp_path: Path
) -> None:
    kits = tmp_path / "kits.csv"
    kits.write_text("kit_number,subject_id\nK-A,CVD-042-0017\nK-B,CVD-042-0017\n")
    svc = _service(store, clock, kit_list=load_kit_list(kits), subject_pattern=r"CVD-042-\d{4}")
    with pytest.raises(AssignmentRefused, match="study pattern"):
        svc.assign(bed="B1", subject_id="XYZ-1", kit_number="K-A", operator="op", reason="r")
    with pytest.raises(AssignmentRefused, match="not listed"):
        svc.assign(bed="B1", subject_id="CVD-042-0017", kit_number="K-Z", operator="op", reason="r")
    with pytest.raises(AssignmentRefused, match="operator"):
        svc.assign(bed="B1", subject_id="CVD-042-0017", kit_number="K-A", operator=" ", reason="r")
    with pytest.raises(AssignmentRefused, match="reason"):
        svc.assign(bed="B1", subject_id="CVD-042-0017", kit_number="K-A", operator="op", reason="")
    with pytest.raises(AssignmentRefused, match="not assigned"):
        svc.end(bed="B1", operator="op", reason="r")
    svc.assign(bed="B1", subject_id="CVD-042-0017", kit_number="K-A", operator="op", reason="r")
    with pytest.raises(AssignmentRefused, match="assigned to bed B1"):
        svc.assign(bed="B2", subject_id="CVD-042-0017", kit_number="K-B", operator="op", reason="r")
    kinds = _kinds(store)
    assert kinds.count(AuditKind.assignment_refused.value) == 6
    assert kinds[-2:] == ["bed_assigned", "assignment_refused"]
    assert verify(store).ok


def test_used_kit_needs_an_audited_override(store: Store, clock: ManualClock) -> None:
    svc = _service(store, clock)
    svc.assign(bed="B1", subject_id="CVD-042-0017", kit_number="K-A", operator="op", reason="r")
    svc.record_kit_used("K-A", "evt-1")
    with pytest.raises(AssignmentRefused, match="already used"):
        svc.assign(
            bed="B1", subject_id="CVD-042-0017", kit_number="K-A", operator="op", reason="again"
        )
    a = svc.assign(
        bed="B1",
        subject_id="CVD-042-0017",
        kit_number="K-A",
        operator="op",
        reason="again",
        override_reason="kit dropped, same kit re-issued by pharmacy",
    )
    assert a.override_reason is not None
    body = store.conn.execute(
        "SELECT body FROM audit WHERE kind = 'bed_assigned' ORDER BY seq DESC LIMIT 1"
    ).fetchone()[0]
    assert "pharmacy" in body


def test_kit_list_never_takes_an_arm(tmp_path: Path) -> None:
    bad = tmp_path / "kits.csv"
    bad.write_text("kit_number,subject_id,arm\nK-A,CVD-042-0017,sham\n")
    with pytest.raises(KitListError, match="not allowed"):
        load_kit_list(bad)
    dup = tmp_path / "dup.csv"
    dup.write_text("kit_number,subject_id\nK-A,CVD-042-0017\nK-A,CVD-042-0018\n")
    with pytest.raises(KitListError, match="twice"):
        load_kit_list(dup)


def test_assignments_command_lists_current_and_history(tmp_path: Path) -> None:
    """`devicegw assignments` as a process reads the history from the gateway store."""
    import json
    import subprocess
    import sys

    data = tmp_path / "data"
    clock = ManualClock()
    with Store.in_dir(data) as s:
        svc = _service(s, clock)
        svc.assign(
            bed="B1",
            subject_id="CVD-042-0017",
            kit_number="K-A",
            operator="nurse.lee",
            reason="admission",
        )
        clock.advance(60)
        svc.assign(
            bed="B2",
            subject_id="CVD-042-0021",
            kit_number="K-B",
            operator="nurse.lee",
            reason="admission",
        )
        clock.advance(60)
        svc.end(bed="B2", operator="nurse.kim", reason="[bold]discharged[/bold]")
    cfg = tmp_path / "gw.toml"
    cfg.write_text(
        f'[gateway]\nid = "gw1"\nsite = "s1"\ndata_dir = "{data}"\n'
        '[broker]\nhost = "127.0.0.1"\nport = 18830\n'
    )
    root = Path(__file__).resolve().parent.parent

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "devicegw.cli", "assignments", "--config", str(cfg), *args],
            capture_output=True,
            text=True,
            cwd=root,
            timeout=60,
            check=False,
        )

    res = cli("--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert list(out["current"]) == ["B1"]
    assert [a["bed"] for a in out["history"]] == ["B1", "B2", "B2"]
    assert out["history"][2]["subject_id"] is None
    res = cli("--bed", "B2")
    assert res.returncode == 0, res.stderr
    assert "CVD-042-0021" in res.stdout and "CVD-042-0017" not in res.stdout
    assert "[bold]" in res.stdout  # a reason is data, shown as typed, never markup
