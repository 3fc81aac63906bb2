"""The open-session journal is incremental (issue 13 item 2): each save appends only the
samples that are new, so its cost does not grow with the session's length, and a
restart reads back every sample. Real SQLite (the gateway's own Store) in a temp dir.

The kill -9 end-to-end tests (tests/test_durability.py) cover the restart through the
whole gateway; these pin the storage itself.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path

from devicegw.storage.journal import SessionJournal
from devicegw.storage.store import Store

UTC0 = datetime(2026, 1, 1, tzinfo=UTC)


def state(times: list[float], rates: list[int]) -> dict[str, object]:
    return {
        "open": {"session_no": 7, "fill_ul": 3000, "times": times, "rates": rates, "flags": []},
        "wrap_offset": 0,
        "last_raw_ms": 123,
    }


def stored_bytes(store: Store, device_id: str) -> int:
    (n,) = store.conn.execute(
        "SELECT COALESCE(SUM(LENGTH(times) + LENGTH(rates)), 0) FROM session_journal_samples"
        " WHERE device_id = ?",
        (device_id,),
    ).fetchone()
    (head,) = store.conn.execute(
        "SELECT LENGTH(state) FROM session_journal WHERE device_id = ?", (device_id,)
    ).fetchone()
    return int(n) + int(head)


def test_each_save_writes_only_the_new_samples_and_load_gives_them_all(tmp_path: Path) -> None:
    with Store.in_dir(tmp_path) as store:
        journal = SessionJournal(store)
        times: list[float] = []
        rates: list[int] = []
        before = 0
        growth = []
        for save in range(200):  # 200 saves of 50 samples (5 s at 10 Hz)
            for i in range(50):
                times.append(round((save * 50 + i) * 0.1, 3))
                rates.append(400 + i)
            journal.save("neb1", 7, state(times, rates), UTC0)
            now = stored_bytes(store, "neb1")
            growth.append(now - before)
            before = now
        # What one save adds is the same at the end as at the start: append, not rewrite.
        assert max(growth[1:]) < 2 * min(growth[1:])
        (chunks,) = store.conn.execute("SELECT COUNT(*) FROM session_journal_samples").fetchone()
        assert chunks == 200
        head = json.loads(store.conn.execute("SELECT state FROM session_journal").fetchone()[0])
        assert "times" not in head["open"] and head["journaled_samples"] == 10_000
        loaded = journal.load("neb1")
        assert loaded is not None
        got, updated = loaded
        assert got == state(times, rates)
        assert updated == UTC0
        # Saving again with nothing new adds no chunk.
        journal.save("neb1", 7, state(times, rates), UTC0)
        assert store.conn.execute("SELECT COUNT(*) FROM session_journal_samples").fetchone() == (
            200,
        )
        journal.clear("neb1", 7)
        assert journal.load("neb1") is None
        assert store.conn.execute("SELECT COUNT(*) FROM session_journal_samples").fetchone() == (0,)


def test_a_new_session_replaces_the_old_ones_samples(tmp_path: Path) -> None:
    with Store.in_dir(tmp_path) as store:
        journal = SessionJournal(store)
        journal.save("neb1", 7, state([0.0, 0.1, 0.2], [1, 2, 3]), UTC0)
        s8 = state([0.0], [9])
        s8["open"]["session_no"] = 8  # type: ignore[index]
        journal.save("neb1", 8, s8, UTC0)
        loaded = journal.load("neb1")
        assert loaded is not None and loaded[0] == s8
        journal.save("neb2", 7, state([5.0], [5]), UTC0)  # another device is separate
        assert journal.load("neb1") == (s8, UTC0)


def test_a_journal_row_from_before_holds_its_samples_inline_and_still_loads(
    tmp_path: Path,
) -> None:
    with Store.in_dir(tmp_path) as store:
        journal = SessionJournal(store)
        old = state([0.0, 0.1], [400, 401])
        store.conn.execute(
            "INSERT INTO session_journal (device_id, session_no, state, updated_utc)"
            " VALUES (?, ?, ?, ?)",
            ("neb1", 7, json.dumps(old), UTC0.isoformat()),
        )
        assert journal.load("neb1") == (old, UTC0)
        # and the next save continues it incrementally
        journal.save("neb1", 7, state([0.0, 0.1, 0.2], [400, 401, 402]), UTC0)
        assert journal.load("neb1") == (state([0.0, 0.1, 0.2], [400, 401, 402]), UTC0)


def test_a_long_session_save_costs_what_is_new(tmp_path: Path) -> None:
    """1 M samples journaled (the flooded device of issue 13), then one more save of 50:
    the bytes it writes are those 50 samples, not the million (counted, not timed)."""
    with Store.in_dir(tmp_path) as store:
        journal = SessionJournal(store)
        times = [i * 0.01 for i in range(1_000_000)]
        rates = [400] * 1_000_000
        journal.save("neb1", 7, state(times, rates), UTC0)
        before = stored_bytes(store, "neb1")
        times += [10_000.0 + i * 0.01 for i in range(50)]
        rates += [401] * 50
        t0 = time.process_time()
        journal.save("neb1", 7, state(times, rates), UTC0)
        cpu = time.process_time() - t0
        added = stored_bytes(store, "neb1") - before
        assert added < 2_000, added
        print(f"save of 50 new samples after 1 M: {added} B written, {cpu * 1000:.1f} ms CPU")
