"""The audit trail: a valid chain, and every kind of tampering named by `audit verify`.

Tampering is done the way an attacker with the file would: a separate sqlite3
connection on the store file, triggers dropped first.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from devicegw.config import Config, parse_config
from devicegw.storage.audit import (
    GENESIS_HASH,
    AuditError,
    AuditHead,
    AuditKind,
    AuditRecord,
    AuditTrail,
    VerifyResult,
    canonical_json,
    iter_records,
    open_store,
    record_hash,
    verify,
)
from devicegw.storage.store import Store, StoreError
from drivers.clock import ManualClock
from tests.test_contract import real_dose_record

ROOT = Path(__file__).resolve().parent.parent
DEVICEGW = [sys.executable, "-m", "devicegw.cli"]
START = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)


def make_config(devices: list[dict[str, object]], *, sha: str = "ab" * 32) -> Config:
    return parse_config(
        {"gateway": {"id": "gw1", "site": "site-042"}, "devices": devices}, sha256=sha
    )


def device(dev_id: str, bed: str, subject: str, kit: str, port: str) -> dict[str, object]:
    return {
        "id": dev_id,
        "type": "vm1",
        "bed": bed,
        "subject_id": subject,
        "kit_number": kit,
        "link": {"kind": "serial", "port": port},
    }


BED1 = device("neb-bed01", "B01", "CVD-042-0017", "K-10234", "/dev/ttyUSB0")
BED2 = device("neb-bed02", "B02", "CVD-042-0021", "K-10240", "/dev/ttyUSB1")


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.in_dir(tmp_path / "data") as s:
        yield s


def fill(trail: AuditTrail, clock: ManualClock) -> None:
    """Eight records, the kinds a morning on the ward produces."""
    trail.append(AuditKind.gateway_start, body={"version": "0.1.0"})
    clock.advance(1)
    trail.record_assignments(make_config([BED1, BED2]), config_path="config/ward.toml")  # 2..4
    clock.advance(2)
    trail.append(
        AuditKind.device_identified,
        device_id="neb-bed01",
        body={
            "port": "/dev/ttyUSB0",
            "model": "VM-1",
            "serial_no": "VM1-00381",
            "firmware": "2.4.1",
        },
    )
    clock.advance(60)
    trail.append(
        AuditKind.session_started,
        device_id="neb-bed01",
        subject_id="CVD-042-0017",
        session_no=42,
        body={"fill_ml": 3.0, "data_source": "live"},
    )
    clock.advance(480.5)
    trail.append(
        AuditKind.session_finished,
        device_id="neb-bed01",
        subject_id="CVD-042-0017",
        session_no=42,
        body={"verdict": "complete", "reasons": [], "delivered_ml": 2.9, "end_reason": "complete"},
    )
    clock.advance(10)
    trail.append(AuditKind.gateway_stop, body={"reason": "signal"})


@pytest.fixture
def filled(store: Store, clock: ManualClock) -> Path:
    """A store file holding a valid eight-record trail; the store is closed again."""
    fill(AuditTrail(store, clock=clock, gateway_id="gw1"), clock)
    path = store.path
    store.close()
    return path


def tamper(path: Path, *statements: str | tuple[str, tuple[object, ...]]) -> None:
    """What an attacker does: drop the triggers, then edit the file directly."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        for trigger in ("audit_no_update", "audit_no_delete", "audit_append_only"):
            conn.execute(f"DROP TRIGGER IF EXISTS {trigger}")
        for st in statements:
            sql, params = (st, ()) if isinstance(st, str) else st
            conn.execute(sql, params)
    finally:
        conn.close()


def verify_file(path: Path, witness: AuditHead | None = None) -> VerifyResult:
    with Store(path) as s:
        return verify(s, witness=witness)


def forge_hash(head: Sequence[Any], body: str, prev_hash: str) -> str:
    """What an attacker recomputes: hash of ``head`` (seq..session_no), body, prev_hash."""
    seq, utc, gateway_id, kind, device_id, subject_id, session_no = head[:7]
    return record_hash(
        seq=seq,
        utc=utc,
        gateway_id=gateway_id,
        kind=kind,
        device_id=device_id,
        subject_id=subject_id,
        session_no=session_no,
        body=body,
        prev_hash=prev_hash,
    )


def row(path: Path, seq: int) -> tuple[Any, ...]:
    conn = sqlite3.connect(path)
    try:
        found: tuple[Any, ...] = conn.execute(
            "SELECT * FROM audit WHERE seq = ?", (seq,)
        ).fetchone()
        return found
    finally:
        conn.close()


# -- a valid chain ----------------------------------------------------------------------------


def test_appends_make_a_valid_chain(store: Store, clock: ManualClock) -> None:
    trail = AuditTrail(store, clock=clock, gateway_id="gw1")
    fill(trail, clock)
    records = list(iter_records(store))
    assert [r.seq for r in records] == list(range(1, 9))
    assert [r.kind for r in records] == [
        "gateway_start",
        "config_loaded",
        "device_assigned",
        "device_assigned",
        "device_identified",
        "session_started",
        "session_finished",
        "gateway_stop",
    ]
    assert records[0].prev_hash == GENESIS_HASH
    for before, after in itertools.pairwise(records):
        assert after.prev_hash == before.hash
    assert records[0].utc == "2026-03-02T08:00:00.000000Z"
    assert records[6].utc == "2026-03-02T08:09:03.500000Z"
    result = verify(store)
    assert result.ok, result.summary()
    assert result.records == 8
    assert result.head == AuditHead(8, records[-1].hash) == trail.head()
    assert result.summary() == f"OK: 8 records, head {records[-1].hash}"


def test_hash_is_the_documented_construction(store: Store, clock: ManualClock) -> None:
    """docs/audit.md tells an auditor how to recompute a hash; this is that recipe, by hand."""
    trail = AuditTrail(store, clock=clock, gateway_id="gw1")
    rec = trail.append(
        AuditKind.session_started,
        device_id="neb-bed01",
        subject_id="CVD-042-0017",
        session_no=7,
        body={"z": 1, "a": "µL", "x": 1.5e-7},
    )
    seq, utc, gw, kind, dev, subj, sess, body, prev, digest = row(store.path, 1)
    assert body == '{"a":"µL","x":1.5e-07,"z":1}'
    envelope = json.dumps(
        [seq, utc, gw, kind, dev, subj, sess, body, prev], separators=(",", ":"), ensure_ascii=False
    )
    assert digest == hashlib.sha256(envelope.encode("utf-8")).hexdigest() == rec.hash
    assert rec.hash == record_hash(
        seq=1,
        utc=str(utc),
        gateway_id="gw1",
        kind="session_started",
        device_id="neb-bed01",
        subject_id="CVD-042-0017",
        session_no=7,
        body=str(body),
        prev_hash=GENESIS_HASH,
    )


def test_empty_trail_verifies_and_missing_trail_does_not(store: Store, clock: ManualClock) -> None:
    missing = verify(store)
    assert not missing.ok
    assert "no audit trail" in missing.summary()
    AuditTrail(store, clock=clock, gateway_id="gw1")
    empty = verify(store)
    assert empty.ok
    assert empty.head == AuditHead(0, GENESIS_HASH)


def test_reopening_keeps_the_chain(store: Store, clock: ManualClock) -> None:
    AuditTrail(store, clock=clock, gateway_id="gw1").append(AuditKind.gateway_start, body={})
    again = AuditTrail(store, clock=clock, gateway_id="gw1")
    rec = again.append(AuditKind.gateway_stop, body={"reason": "signal"})
    assert rec.seq == 2
    assert verify(store).ok


# -- tampering directly on the file -----------------------------------------------------------


Tamper = Callable[[Path], None]


def edit_body(path: Path) -> None:
    tamper(
        path, "UPDATE audit SET body = replace(body, '\"complete\"', '\"partial\"') WHERE seq = 7"
    )


def edit_delivered_volume(path: Path) -> None:
    tamper(path, "UPDATE audit SET body = replace(body, '2.9', '3.0') WHERE seq = 7")


def edit_kind(path: Path) -> None:
    tamper(path, "UPDATE audit SET kind = 'device_identified' WHERE seq = 6")


def edit_subject(path: Path) -> None:
    tamper(path, "UPDATE audit SET subject_id = 'CVD-042-0099' WHERE seq = 3")


def edit_session_no_type(path: Path) -> None:
    tamper(path, "UPDATE audit SET session_no = 'forty-two' WHERE seq = 6")


def edit_time(path: Path) -> None:
    tamper(path, "UPDATE audit SET utc = '2026-03-02T07:00:00.000000Z' WHERE seq = 5")


def delete_middle(path: Path) -> None:
    tamper(path, "DELETE FROM audit WHERE seq = 4")


def delete_middle_and_renumber(path: Path) -> None:
    tamper(
        path,
        "DELETE FROM audit WHERE seq = 4",
        *[f"UPDATE audit SET seq = {n - 1} WHERE seq = {n}" for n in range(5, 9)],
    )


def delete_first_and_renumber(path: Path) -> None:
    tamper(
        path,
        "DELETE FROM audit WHERE seq = 1",
        *[f"UPDATE audit SET seq = {n - 1} WHERE seq = {n}" for n in range(2, 9)],
    )


def swap_contents(path: Path) -> None:
    """Reorder: records 5 and 6 trade places (every column but seq)."""
    cols = "utc, gateway_id, kind, device_id, subject_id, session_no, body, prev_hash, hash"
    r5, r6 = row(path, 5), row(path, 6)
    tamper(
        path,
        (f"UPDATE audit SET ({cols}) = (?, ?, ?, ?, ?, ?, ?, ?, ?) WHERE seq = 5", tuple(r6[1:])),
        (f"UPDATE audit SET ({cols}) = (?, ?, ?, ?, ?, ?, ?, ?, ?) WHERE seq = 6", tuple(r5[1:])),
    )


def swap_seq_numbers(path: Path) -> None:
    tamper(
        path,
        "UPDATE audit SET seq = -1 WHERE seq = 3",
        "UPDATE audit SET seq = 3 WHERE seq = 4",
        "UPDATE audit SET seq = 4 WHERE seq = -1",
    )


def insert_forged_in_middle(path: Path) -> None:
    """Shift 6.. up by one and insert a well-formed record 6 chained to record 5."""
    r5 = row(path, 5)
    head: tuple[object, ...] = (6, "2026-03-02T08:01:04.000000Z", "gw1", "session_finished")
    head += ("neb-bed02", "CVD-042-0021", 9)
    body = canonical_json({"verdict": "complete", "delivered_ml": 3.0})
    digest = forge_hash(head, body, r5[9])
    shifts = [f"UPDATE audit SET seq = {n + 1} WHERE seq = {n}" for n in range(8, 5, -1)]
    tamper(
        path,
        *shifts,
        ("INSERT INTO audit VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", (*head, body, r5[9], digest)),
    )


def edit_and_rehash(path: Path) -> None:
    """A smarter edit: record 7 rewritten with its own hash recomputed (not the ones after)."""
    r = row(path, 7)
    body = str(r[7]).replace('"complete"', '"partial"')
    digest = forge_hash(r, body, r[8])
    tamper(path, ("UPDATE audit SET body = ?, hash = ? WHERE seq = 7", (body, digest)))


@pytest.mark.parametrize(
    ("attack", "first_bad", "why"),
    [
        (edit_body, 7, "hash mismatch: record edited"),
        (edit_delivered_volume, 7, "hash mismatch: record edited"),
        (edit_kind, 6, "hash mismatch: record edited"),
        (edit_subject, 3, "hash mismatch: record edited"),
        (edit_session_no_type, 6, "hash mismatch: record edited (session_no of the wrong type)"),
        (edit_time, 5, "hash mismatch: record edited"),
        (delete_middle, 4, "sequence gap: record 4 missing (next is 5)"),
        (delete_middle_and_renumber, 4, "prev_hash does not match record 3: deleted or reordered"),
        (delete_first_and_renumber, 1, "prev_hash is not the genesis hash"),
        (swap_contents, 5, "prev_hash does not match record 4: deleted or reordered"),
        (swap_seq_numbers, 3, "prev_hash does not match record 2: deleted or reordered"),
        (insert_forged_in_middle, 7, "prev_hash does not match record 6: deleted or reordered"),
        (edit_and_rehash, 8, "prev_hash does not match record 7: deleted or reordered"),
    ],
)
def test_tampering_is_named(filled: Path, attack: Tamper, first_bad: int, why: str) -> None:
    attack(filled)
    result = verify_file(filled)
    assert not result.ok
    assert result.first_bad == first_bad
    assert why in str(result.reason)
    assert result.records == first_bad - 1
    assert f"FAILED at record {first_bad}: " in result.summary()


def test_tail_truncation_leaves_a_valid_chain_but_changes_the_head(filled: Path) -> None:
    """The limitation a chain cannot fix: deleting the last records. The head is the witness."""
    before = verify_file(filled)
    witness = before.head
    tamper(filled, "DELETE FROM audit WHERE seq >= 7")
    after = verify_file(filled)
    assert after.ok
    assert after.records == 6
    assert after.head != witness
    assert after.head.hash != witness.hash
    # ...and a verify against the recorded witness catches it, naming the first missing record.
    caught = verify_file(filled, witness)
    assert not caught.ok
    assert caught.first_bad == 7
    assert "truncated" in str(caught.reason)


def test_a_witness_catches_a_fully_rehashed_rewrite(filled: Path) -> None:
    """Rewrite record 5 and recompute every hash after it: the chain is valid, the witness not."""
    witness = verify_file(filled).head
    conn = sqlite3.connect(filled, isolation_level=None)
    for trigger in ("audit_no_update", "audit_no_delete", "audit_append_only"):
        conn.execute(f"DROP TRIGGER {trigger}")
    rows = conn.execute("SELECT * FROM audit ORDER BY seq").fetchall()
    prev = str(rows[3][9])
    for r in rows[4:]:
        body = str(r[7]).replace("VM1-00381", "VM1-99999")
        digest = forge_hash(r, body, prev)
        conn.execute(
            "UPDATE audit SET body = ?, prev_hash = ?, hash = ? WHERE seq = ?",
            (body, prev, digest, r[0]),
        )
        prev = digest
    conn.close()
    assert verify_file(filled).ok
    caught = verify_file(filled, witness)
    assert not caught.ok
    assert caught.first_bad == 8
    assert "witnessed head" in str(caught.reason)
    # An earlier witness, before the rewrite point, still agrees.
    with Store(filled) as s:
        early = next(r for r in iter_records(s) if r.seq == 4)
        assert verify(s, witness=AuditHead(4, early.hash)).ok


# -- defence in depth: triggers -----------------------------------------------------------------

FORGED_REST = "'u', 'gw1', 'gateway_start', NULL, NULL, NULL, '{}', 'x', 'y'"


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE audit SET body = '{}' WHERE seq = 2",
        "UPDATE audit SET seq = 100 WHERE seq = 8",
        "DELETE FROM audit WHERE seq = 8",
        "DELETE FROM audit",
        f"INSERT INTO audit VALUES (3, {FORGED_REST})",
        f"INSERT INTO audit VALUES (9, {FORGED_REST})",
        f"INSERT INTO audit VALUES (10, {FORGED_REST})",
    ],
)
def test_triggers_refuse_changes_through_sql(filled: Path, sql: str) -> None:
    conn = sqlite3.connect(filled, isolation_level=None)
    try:
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute(sql)
    finally:
        conn.close()
    assert verify_file(filled).ok


def test_reopening_restores_dropped_triggers_and_warns(
    filled: Path, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    tamper(filled)
    with Store(filled) as s:
        AuditTrail(s, clock=clock, gateway_id="gw1")
        assert "triggers" in caplog.text
        with pytest.raises(sqlite3.IntegrityError):
            s.conn.execute("DELETE FROM audit")


def test_the_api_has_no_way_to_change_a_record() -> None:
    public = {name for name in dir(AuditTrail) if not name.startswith("_")}
    assert public == {
        "append",
        "flush_coalesced",
        "record_assignments",
        "record_session_finished",
        "head",
    }


def test_append_joins_an_outer_transaction(store: Store, clock: ManualClock) -> None:
    """Outbox row and audit record in one transaction: both commit or neither does."""
    trail = AuditTrail(store, clock=clock, gateway_id="gw1")
    store.conn.execute("CREATE TABLE outbox (id INTEGER PRIMARY KEY, payload TEXT)")
    store.conn.execute("BEGIN IMMEDIATE")
    store.conn.execute("INSERT INTO outbox (payload) VALUES ('dose')")
    trail.append(AuditKind.session_finished, body={"verdict": "complete"})
    store.conn.execute("ROLLBACK")
    assert trail.head().count == 0
    assert store.conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 0

    store.conn.execute("BEGIN IMMEDIATE")
    store.conn.execute("INSERT INTO outbox (payload) VALUES ('dose')")
    trail.record_assignments(make_config([BED1]))
    trail.append(AuditKind.session_finished, body={"verdict": "complete"})
    store.conn.execute("COMMIT")
    assert trail.head().count == 3
    assert verify(store).ok


class FailingClock(ManualClock):
    """A clock that breaks after ``ok`` readings (stands in for any failure mid-append)."""

    def __init__(self, ok: int) -> None:
        super().__init__(START)
        self.ok = ok

    def now(self) -> datetime:
        self.ok -= 1
        if self.ok < 0:
            raise RuntimeError("clock failed")
        return super().now()


@pytest.mark.parametrize("outer", [False, True])
def test_a_failed_batch_leaves_nothing_behind(store: Store, outer: bool) -> None:
    trail = AuditTrail(store, clock=FailingClock(ok=2), gateway_id="gw1")
    if outer:
        store.conn.execute("BEGIN IMMEDIATE")
    with pytest.raises(RuntimeError, match="clock failed"):
        trail.record_assignments(make_config([BED1, BED2]))  # 3 records; the third fails
    assert store.conn.in_transaction is outer  # the caller's transaction stays the caller's
    if outer:
        store.conn.execute("COMMIT")
    assert trail.head().count == 0
    assert verify(store).ok


def test_a_locked_store_is_an_audit_error(store: Store, clock: ManualClock) -> None:
    trail = AuditTrail(store, clock=clock, gateway_id="gw1")
    store.conn.execute("PRAGMA busy_timeout=0")
    other = sqlite3.connect(store.path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(AuditError, match="locked"):
            trail.append(AuditKind.gateway_start, body={})
        other.execute("ROLLBACK")
    finally:
        other.close()
    assert not store.conn.in_transaction
    assert trail.append(AuditKind.gateway_start, body={}).seq == 1


# -- bodies -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        {"arm": "active"},
        {"Treatment_Arm": "A"},
        {"session": {"allocation": "sham"}},
        {"items": [{"treatment": "x"}]},
    ],
)
def test_a_body_never_carries_a_treatment_arm(
    store: Store, clock: ManualClock, body: dict[str, object]
) -> None:
    trail = AuditTrail(store, clock=clock, gateway_id="gw1")
    with pytest.raises(ValueError, match="treatment arm"):
        trail.append(AuditKind.session_finished, body=body)
    assert trail.head().count == 0


@pytest.mark.parametrize("body", [{"t": datetime(2026, 1, 1)}, {"x": float("nan")}, {1: "a"}])
def test_a_body_is_plain_json(store: Store, clock: ManualClock, body: dict[Any, object]) -> None:
    trail = AuditTrail(store, clock=clock, gateway_id="gw1")
    with pytest.raises(TypeError):
        trail.append(AuditKind.gateway_start, body=body)
    assert trail.head().count == 0


def test_session_finished_from_a_dose_record(store: Store, clock: ManualClock) -> None:
    record = real_dose_record()
    event = record.event
    rec = AuditTrail(store, clock=clock, gateway_id="gw1").record_session_finished(record)
    assert (rec.kind, rec.device_id, rec.subject_id, rec.session_no) == (
        "session_finished",
        "neb-bed01",
        "CVD-042-0017",
        event.session_no,
    )
    assert rec.body["event_id"] == str(event.event_id)
    assert rec.body["verdict"] == event.verdict
    assert rec.body["delivered_ml"] == event.volume.delivered_ml
    assert rec.body["data_source"] == "live"
    assert set(rec.body) >= {"reasons", "end_reason", "kit_number", "config_sha256"}
    # The gateway's own trail keeps the restricted facts (engineering reads it).
    assert rec.body["end_reason"] == record.detail.end_reason
    assert rec.body["delivered_basis"] == record.detail.volume.delivered_basis
    assert verify(store).ok


def test_a_dose_is_encoded_once_for_the_outbox_and_the_audit(
    store: Store, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The outbox stores, and the audit trail hashes, the same bytes: the record's own
    encoding, made once (issue 13: two encodings per dose on the event loop at 500 beds)."""
    from devicegw.contract.payloads import DoseDetail, DoseEvent
    from devicegw.mqtt.publisher import encode
    from devicegw.storage.outbox import Outbox, payload_sha256

    record = real_dose_record()
    calls: list[str] = []
    for model in (DoseEvent, DoseDetail):
        original = model.model_dump_json

        def counted(self: Any, *args: Any, _original: Any = original, **kw: Any) -> str:
            calls.append(type(self).__name__)
            return str(_original(self, *args, **kw))

        monkeypatch.setattr(model, "model_dump_json", counted)
    event_json, detail_json = record.encoded()
    assert record.encoded() == (event_json, detail_json)
    Outbox(store).add(
        "dose",
        "d/neb-bed01",
        event_json,
        qos=1,
        retain=False,
        now=clock.now(),
        event_id=str(record.event.event_id),
        detail=("dd/neb-bed01", detail_json),
    )
    rec = AuditTrail(store, clock=clock, gateway_id="gw1").record_session_finished(record)
    assert sorted(calls) == ["DoseDetail", "DoseEvent"]  # once each, for both stores
    assert rec.body["payload_sha256"] == payload_sha256(event_json)
    assert rec.body["detail_sha256"] == payload_sha256(detail_json)
    monkeypatch.undo()
    assert (event_json, detail_json) == (encode(record.event), encode(record.detail))
    assert record == type(record)(record.event, record.detail)  # the cache is not compared


# -- record_assignments -------------------------------------------------------------------------


def kinds(records: list[AuditRecord]) -> list[tuple[str, str | None]]:
    return [(r.kind, r.device_id) for r in records]


def test_record_assignments_appends_only_changes(store: Store, clock: ManualClock) -> None:
    trail = AuditTrail(store, clock=clock, gateway_id="gw1")
    first = trail.record_assignments(make_config([BED1, BED2]), config_path="ward.toml")
    assert kinds(first) == [
        ("config_loaded", None),
        ("device_assigned", "neb-bed01"),
        ("device_assigned", "neb-bed02"),
    ]
    assert first[0].body == {"sha256": "ab" * 32, "path": "ward.toml"}
    assert first[1].body == {
        "device_id": "neb-bed01",
        "type": "vm1",
        "bed": "B01",
        "subject_id": "CVD-042-0017",
        "kit_number": "K-10234",
        "port": "/dev/ttyUSB0",
    }
    assert first[1].subject_id == "CVD-042-0017"

    # A restart with the same file: nothing new.
    assert trail.record_assignments(make_config([BED1, BED2])) == []
    # Another AuditTrail on the same store (a gateway restart) reads the state from the trail.
    assert (
        AuditTrail(store, clock=clock, gateway_id="gw1").record_assignments(
            make_config([BED1, BED2])
        )
        == []
    )

    # Bed 2 gets a new subject and kit; the file changed, so its hash did too.
    bed2_new = {**BED2, "subject_id": "CVD-042-0030", "kit_number": "K-10301"}
    second = trail.record_assignments(make_config([BED1, bed2_new], sha="cd" * 32))
    assert kinds(second) == [("config_loaded", None), ("device_assigned", "neb-bed02")]
    assert second[1].body["subject_id"] == "CVD-042-0030"

    # A comment-only edit: new hash, same assignments.
    third = trail.record_assignments(make_config([BED1, bed2_new], sha="ef" * 32))
    assert kinds(third) == [("config_loaded", None)]

    # Same hash but a port changed (e.g. a config parsed from another source): only the device.
    bed1_moved = {**BED1, "link": {"kind": "serial", "port": "/dev/ttyUSB7"}}
    fourth = trail.record_assignments(make_config([bed1_moved, bed2_new], sha="ef" * 32))
    assert kinds(fourth) == [("device_assigned", "neb-bed01")]

    # Bed 2 leaves the configuration, then comes back with its last assignment.
    fifth = trail.record_assignments(make_config([bed1_moved], sha="01" * 32))
    assert kinds(fifth) == [("config_loaded", None), ("device_unassigned", "neb-bed02")]
    assert fifth[1].body["last_assignment"]["kit_number"] == "K-10301"  # type: ignore[index]
    sixth = trail.record_assignments(make_config([bed1_moved, bed2_new], sha="ef" * 32))
    assert kinds(sixth) == [("config_loaded", None), ("device_assigned", "neb-bed02")]
    assert verify(store).ok


def test_iter_records_filters(filled: Path) -> None:
    with Store(filled) as s:
        bed1 = list(iter_records(s, device_id="neb-bed01"))
        assert [r.seq for r in bed1] == [3, 5, 6, 7]
        late = list(iter_records(s, since=datetime(2026, 3, 2, 8, 1, tzinfo=UTC)))
        assert [r.seq for r in late] == [6, 7, 8]


def test_open_store_never_creates_one(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no gateway store"):
        open_store(tmp_path / "nope.sqlite3")
    assert not (tmp_path / "nope.sqlite3").exists()


def test_witness_text_round_trips() -> None:
    head = AuditHead(8, "a" * 64)
    assert AuditHead.parse(str(head)) == head
    for bad in ("8", "x:" + "a" * 64, "8:abc", "8:" + "g" * 64):
        with pytest.raises(ValueError):
            AuditHead.parse(bad)


# -- the command line ---------------------------------------------------------------------------


def run_cli(*args: str, columns: int = 200) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": str(columns)}
    return subprocess.run(
        [*DEVICEGW, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env,
        check=False,
    )


def test_cli_verify_ok_and_failure(filled: Path) -> None:
    ok = run_cli("audit", "verify", "--store", str(filled))
    assert ok.returncode == 0, ok.stderr
    with Store(filled) as s:
        head = verify(s).head
    assert ok.stdout.splitlines()[0] == f"OK: 8 records, head {head.hash}"
    assert "store integrity_check: OK" in ok.stdout

    witnessed = run_cli("audit", "verify", "--store", str(filled), "--witness", str(head))
    assert witnessed.returncode == 0, witnessed.stdout + witnessed.stderr

    edit_body(filled)
    bad = run_cli("audit", "verify", "--store", str(filled))
    assert bad.returncode == 1
    assert "FAILED at record 7: hash mismatch: record edited" in bad.stdout


def test_cli_verify_names_a_deleted_record_and_a_truncation(filled: Path) -> None:
    with Store(filled) as s:
        head = verify(s).head
    tamper(filled, "DELETE FROM audit WHERE seq = 8")
    res = run_cli("audit", "verify", "--store", str(filled), "--witness", str(head))
    assert res.returncode == 1
    assert "FAILED at record 8" in res.stdout
    assert "truncated" in res.stdout
    delete_middle(filled)
    res = run_cli("audit", "verify", "--store", str(filled))
    assert res.returncode == 1
    assert "FAILED at record 4: sequence gap" in res.stdout


def test_cli_verify_with_config_uses_the_data_dir(filled: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "gw.toml"
    cfg.write_text(f'[gateway]\nid = "gw1"\nsite = "s1"\ndata_dir = "{filled.parent}"\n')
    res = run_cli("audit", "verify", "--config", str(cfg))
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("OK: 8 records, head ")


def test_cli_verify_without_a_store_fails_and_creates_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "none" / "devicegw.sqlite3"
    res = run_cli("audit", "verify", "--store", str(missing))
    assert res.returncode == 1
    assert "no gateway store" in res.stderr
    assert not missing.parent.exists()
    res = run_cli("audit", "verify")
    assert res.returncode == 2  # argparse: --config or --store is required


def test_cli_show_table_and_json(filled: Path) -> None:
    wanted = ("config_loaded", "session_finished", "CVD-042-0017", "verdict=complete")
    for columns in (200, 80):  # a table when wide; one header line + details when narrow
        res = run_cli("audit", "show", "--store", str(filled), columns=columns)
        assert res.returncode == 0, res.stderr
        assert max(len(line) for line in res.stdout.splitlines()) <= columns
        for text in wanted:
            assert text in res.stdout
        assert "2026-03-02 08:09:03Z" in res.stdout

    res = run_cli("audit", "show", "--store", str(filled), "--json", "--device", "neb-bed01")
    assert res.returncode == 0, res.stderr
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["seq"] for r in lines] == [3, 5, 6, 7]
    assert lines[3]["body"]["verdict"] == "complete"
    assert lines[3]["session_no"] == 42
    assert set(lines[0]) == {
        "seq",
        "utc",
        "gateway_id",
        "kind",
        "device_id",
        "subject_id",
        "session_no",
        "body",
        "prev_hash",
        "hash",
    }

    res = run_cli(
        "audit", "show", "--store", str(filled), "--json", "--since", "2026-03-02T08:01:00Z"
    )
    assert [json.loads(line)["seq"] for line in res.stdout.splitlines()] == [6, 7, 8]
    res = run_cli("audit", "show", "--store", str(filled), "--since", "yesterday")
    assert res.returncode == 2
    assert "--since" in res.stderr
