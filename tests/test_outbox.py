"""The durable outbox on its own: order, dedupe by event_id, latest-wins statuses, retention."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from devicegw.storage.outbox import Outbox
from devicegw.storage.store import Store

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
    ob.add("status", "s/dev1", b"1", qos=1, retain=True, now=NOW)
    ob.add("status", "s/dev1", b"2", qos=1, retain=True, now=NOW)
    [row] = ob.pending()
    assert row.payload == b"2"
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
    assert ob.has_event("e5") and ob.has_event("e4") and not ob.has_event("e0")
    assert ob.depth() == 1


def test_attempts_are_counted_for_redelivery(tmp_path: Path) -> None:
    ob = outbox(tmp_path)
    ob.add("dose", "t", b"{}", qos=1, retain=False, now=NOW, event_id="e")
    [row] = ob.pending()
    ob.mark_attempt(row.id)
    ob.mark_attempt(row.id)
    assert ob.pending()[0].attempts == 2
