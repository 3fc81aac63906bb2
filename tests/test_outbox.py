"""The durable outbox on its own: order, dedupe by event_id, latest-wins statuses, retention."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from devicegw.storage.outbox import DETAIL_KEY_SUFFIX, AddResult, Outbox
from devicegw.storage.store import Store
from tests.outbox_helpers import holds_event

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def outbox(tmp_path: Path, **kw: int) -> Outbox:
    return Outbox(Store(tmp_path / "gw.sqlite3"), **kw)


def test_rows_come_back_in_order_and_survive_reopening(tmp_path: Path) -> None:
    ob = outbox(tmp_path)
    for i in range(5):
        ob.add("dose", f"t/{i}", b"{}", qos=1, retain=False, now=NOW, event_id=f"e{i}")
    ob.store.close()
    ob = outbox(tmp_path)
    rows = ob.pending()
    assert [r.event_id for r in rows] == ["e0", "e1", "e2", "e3", "e4"]
    assert ob.depth() == 5


def test_same_event_id_is_stored_once_and_a_different_record_is_refused(tmp_path: Path) -> None:
    ob = outbox(tmp_path)
    first = ob.add("dose", "t", b'{"a":1}', qos=1, retain=False, now=NOW, event_id="e")
    again = ob.add("dose", "t", b'{"a":1}', qos=1, retain=False, now=NOW, event_id="e")
    other = ob.add("dose", "t", b'{"a":2}', qos=1, retain=False, now=NOW, event_id="e")
    assert (first.added, again.added, again.conflict) == (True, False, False)
    assert (other.added, other.conflict) == (False, True)
    assert [r.payload for r in ob.pending()] == [b'{"a":1}']


def test_statuses_are_latest_wins_and_deleted_when_sent(tmp_path: Path) -> None:
    ob = outbox(tmp_path)
    ob.add("status", "s/dev1", b'{"v":1}', qos=1, retain=True, now=NOW)
    ob.add("status", "s/dev1", b'{"v":2}', qos=1, retain=True, now=NOW)
    [row] = ob.pending()
    assert row.payload == b'{"v":2}'
    ob.mark_sent(row, NOW)
    assert ob.depth() == 0
    assert ob.store.conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 0


def test_sent_dose_events_are_kept_for_dedupe_up_to_the_retention(tmp_path: Path) -> None:
    ob = outbox(tmp_path, keep_sent_dose_events=3)
    for i in range(6):
        ob.add("dose", "t", b"{}", qos=1, retain=False, now=NOW, event_id=f"e{i}")
    for row in ob.pending()[:5]:
        ob.mark_sent(row, NOW)
    assert ob.prune() == 2  # 5 sent, keep the newest 3; the unsent one is never pruned
    assert holds_event(ob, "e5") and holds_event(ob, "e4") and not holds_event(ob, "e0")
    assert ob.depth() == 1


def test_attempts_are_counted_for_redelivery(tmp_path: Path) -> None:
    ob = outbox(tmp_path)
    ob.add("dose", "t", b"{}", qos=1, retain=False, now=NOW, event_id="e")
    [row] = ob.pending()
    ob.mark_attempts([row.id])
    ob.mark_attempts([row.id])
    assert ob.pending()[0].attempts == 2


# -- a dose event and its restricted detail (docs/blinding.md) -----------------------------


def add_dose(ob: Outbox, event: bytes, detail: bytes, event_id: str = "e") -> AddResult:
    return ob.add(
        "dose",
        "p/dose/d1",
        event,
        qos=1,
        retain=False,
        now=NOW,
        device_id="d1",
        event_id=event_id,
        detail=("p/dose-detail/d1", detail),
    )


def test_a_dose_event_and_its_detail_are_committed_together_event_first(tmp_path: Path) -> None:
    ob = outbox(tmp_path)
    assert add_dose(ob, b'{"e":1}', b'{"d":1}').added
    rows = ob.pending()
    assert [(r.kind, r.topic, r.payload, r.event_id) for r in rows] == [
        ("dose", "p/dose/d1", b'{"e":1}', "e"),
        ("dose-detail", "p/dose-detail/d1", b'{"d":1}', "e" + DETAIL_KEY_SUFFIX),
    ]
    assert all((r.qos, r.retain, r.device_id) == (1, False, "d1") for r in rows)
    assert holds_event(ob, "e")


def test_a_second_record_differing_in_either_half_is_a_conflict(tmp_path: Path) -> None:
    ob = outbox(tmp_path)
    add_dose(ob, b'{"e":1}', b'{"d":1}')
    again = add_dose(ob, b'{"e":1}', b'{"d":1}')
    other_detail = add_dose(ob, b'{"e":1}', b'{"d":2}')
    other_event = add_dose(ob, b'{"e":2}', b'{"d":1}')
    assert (again.added, again.conflict) == (False, False)
    assert (other_detail.added, other_detail.conflict) == (False, True)
    assert (other_event.added, other_event.conflict) == (False, True)
    assert ob.depth() == 2


def test_a_stored_detail_that_differs_refuses_both_halves(tmp_path: Path) -> None:
    ob = outbox(tmp_path)
    # A stray row holding the detail's key (whatever put it there): nothing half-written.
    ob.store.conn.execute(
        "INSERT INTO outbox (kind, topic, qos, retain, payload, event_id, created_utc)"
        " VALUES ('status', 'x', 1, 1, x'00', ?, ?)",
        ("e2" + DETAIL_KEY_SUFFIX, NOW.isoformat()),
    )
    result = add_dose(ob, b'{"e":1}', b'{"d":1}', event_id="e2")
    assert result.conflict  # the stored row differs: refused, not half-written
    assert not holds_event(ob, "e2")


def test_retention_keeps_a_dose_event_and_its_detail_together(tmp_path: Path) -> None:
    ob = outbox(tmp_path, keep_sent_dose_events=2)
    for i in range(4):
        add_dose(ob, b'{"e":%d}' % i, b'{"d":%d}' % i, event_id=f"e{i}")
    for row in ob.pending():
        ob.mark_sent(row, NOW)
    assert ob.prune() == 4  # two events beyond the limit, and their details
    keys = [r[0] for r in ob.store.conn.execute("SELECT event_id FROM outbox ORDER BY id")]
    assert keys == ["e2", "e2" + DETAIL_KEY_SUFFIX, "e3", "e3" + DETAIL_KEY_SUFFIX]
    # A pruned session decided again is recorded again, both halves.
    assert add_dose(ob, b'{"e":0}', b'{"d":0}', event_id="e0").added
    assert ob.depth() == 2
