"""What the gateway must remember across a restart, per device: open sessions and watermarks.

An open session is journaled (its start, samples so far, pauses, alarms) so
that after ``kill -9`` it is finished correctly — from live data if the
device is still nebulizing, from the device's session record otherwise — and
never silently dropped. The journal row is deleted in the same transaction
that commits the session's dose event to the outbox.

The journal is incremental: the session's samples (``open.times`` and
``open.rates``, which grow by 10 a second at the VM-1's 10 Hz) are appended in
chunks to ``session_journal_samples`` -- each save writes only the samples that
are new since the last one -- while the small rest of the state is rewritten in
``session_journal``, both in one transaction. Before, every save rewrote every
sample, so its cost grew with the session's length (0.3-0.9 s per save with
1-4 M samples, the event loop stalled meanwhile; issue 13).

The watermark is the highest session number of a device (by model and
serial) that the gateway has recorded; on every (re)connect, sessions between
it and the device's ``last_session_no`` are fetched from the device's log.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
from array import array
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

from devicegw.core.ports import RecordedDose
from devicegw.storage.store import Store, is_disk_full

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS session_journal (
    device_id TEXT PRIMARY KEY,
    session_no INTEGER NOT NULL,
    state TEXT NOT NULL,
    updated_utc TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS session_journal_samples (
    device_id TEXT NOT NULL,
    session_no INTEGER NOT NULL,
    first INTEGER NOT NULL,
    n INTEGER NOT NULL,
    times TEXT NOT NULL,
    rates TEXT NOT NULL,
    PRIMARY KEY (device_id, session_no, first)
);
CREATE TABLE IF NOT EXISTS device_watermark (
    device_key TEXT PRIMARY KEY,
    session_no INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS device_counter_epoch (
    device_key TEXT PRIMARY KEY,
    epoch INTEGER NOT NULL
);
"""


#: The per-sample lists of a journaled open session, stored as appended chunks.
_SAMPLE_FIELDS = ("times", "rates")
#: In the head row's state: how many samples the chunks hold (absent: an older journal
#: row with its samples inline, still read as it is).
_COUNT_KEY = "journaled_samples"


def _dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


class SessionJournal:
    def __init__(self, store: Store) -> None:
        self.store = store
        store.conn.executescript(_SCHEMA)

    def save(
        self, device_id: str, session_no: int, state: dict[str, object], utc: datetime
    ) -> None:
        try:
            self._save(device_id, session_no, state, utc)
        except sqlite3.Error as exc:
            if not is_disk_full(exc):
                raise
            # A full disk: the next snapshot (5 s on) tries again; the session goes on in memory.
            log.debug("journal snapshot skipped, the disk is full", extra={"device_id": device_id})

    def commit_decided(self, key: str, write: Callable[[], object]) -> bool:
        """Commit a decided record now, or hold it in memory while the disk is full.

        ``write`` is the whole transaction (outbox, audit, journal row); it is retried
        as a whole (:class:`devicegw.storage.store.HeldWrites`). False: held.
        """
        return self.store.held.run(key, write)

    def _save(
        self, device_id: str, session_no: int, state: dict[str, object], utc: datetime
    ) -> None:
        head = dict(state)
        open_ = state.get("open")
        conn = self.store.conn
        # A snapshot, replaced 5 s on: no fsync of its own (store.py). The dose event that
        # finishes the session is a durable commit, and deletes it.
        with self.store.transaction(durable=False):
            if isinstance(open_, dict) and all(
                isinstance(open_.get(f), (list, array)) for f in _SAMPLE_FIELDS
            ):
                times, rates = open_["times"], open_["rates"]
                head["open"] = {k: v for k, v in open_.items() if k not in _SAMPLE_FIELDS}
                # What is already on disk for this session (another session's chunks go).
                # Index ranges of the primary key (device_id, session_no, first): a long
                # session holds thousands of chunks, and "!=" or MAX(first + n) walked them
                # all at every save (3 ms after 4 h of a flooding device).
                for other in ("session_no < ?", "session_no > ?"):
                    conn.execute(
                        f"DELETE FROM session_journal_samples WHERE device_id = ? AND {other}",
                        (device_id, session_no),
                    )
                last = conn.execute(
                    "SELECT first + n FROM session_journal_samples"
                    " WHERE device_id = ? AND session_no = ? ORDER BY first DESC LIMIT 1",
                    (device_id, session_no),
                ).fetchone()
                saved = 0 if last is None else int(last[0])
                if saved > len(times) or len(times) != len(rates):  # not ours to extend
                    conn.execute(
                        "DELETE FROM session_journal_samples WHERE device_id = ?", (device_id,)
                    )
                    saved = 0
                n = min(len(times), len(rates)) - saved
                if n > 0:
                    conn.execute(
                        "INSERT INTO session_journal_samples"
                        " (device_id, session_no, first, n, times, rates)"
                        " VALUES (?, ?, ?, ?, ?, ?)",
                        (
                            device_id,
                            session_no,
                            saved,
                            n,
                            _dumps(list(times[saved : saved + n])),
                            _dumps(list(rates[saved : saved + n])),
                        ),
                    )
                head[_COUNT_KEY] = saved + max(n, 0)
            conn.execute(
                "INSERT INTO session_journal (device_id, session_no, state, updated_utc)"
                " VALUES (?, ?, ?, ?) ON CONFLICT(device_id) DO UPDATE SET"
                " session_no = excluded.session_no, state = excluded.state,"
                " updated_utc = excluded.updated_utc",
                (device_id, session_no, _dumps(head), utc.isoformat()),
            )

    def load(self, device_id: str) -> tuple[dict[str, Any], datetime] | None:
        row = self.store.conn.execute(
            "SELECT session_no, state, updated_utc FROM session_journal WHERE device_id = ?",
            (device_id,),
        ).fetchone()
        if row is None:
            return None
        session_no, state = int(row[0]), json.loads(row[1])
        count = state.pop(_COUNT_KEY, None)
        if count is not None and isinstance(state.get("open"), dict):
            times: list[Any] = []
            rates: list[Any] = []
            for first, chunk_t, chunk_r in self.store.conn.execute(
                "SELECT first, times, rates FROM session_journal_samples"
                " WHERE device_id = ? AND session_no = ? ORDER BY first",
                (device_id, session_no),
            ):
                if first != len(times):  # written in one transaction with the head: not expected
                    log.error(
                        "journaled samples not contiguous (%d expected, %d found): keeping %d",
                        len(times),
                        first,
                        len(times),
                        extra={"device_id": device_id, "session_no": session_no},
                    )
                    break
                times += json.loads(chunk_t)
                rates += json.loads(chunk_r)
            state["open"]["times"] = times[:count]
            state["open"]["rates"] = rates[:count]
        return state, datetime.fromisoformat(row[2])

    def clear(self, device_id: str, session_no: int) -> None:
        self._write(
            f"journal-clear:{device_id}:{session_no}", lambda: self._clear(device_id, session_no)
        )

    def _clear(self, device_id: str, session_no: int) -> None:
        for table in ("session_journal", "session_journal_samples"):
            self.store.conn.execute(
                f"DELETE FROM {table} WHERE device_id = ? AND session_no = ?",
                (device_id, session_no),
            )

    @contextlib.contextmanager
    def finishing(self, device_id: str, session_no: int) -> Iterator[None]:
        """Commit whatever is recorded inside together with clearing the session's journal row.

        fsync'ed off the event loop (``sync_later``): the outbox publishes nothing of it
        until the fsync returns (devicegw/storage/store.py)."""
        with self.store.transaction(sync_later=True):
            yield
            self.clear(device_id, session_no)

    def is_recorded(self, event_id: str) -> bool:
        """Is a dose event with this id already in the outbox (sent or not), or held?"""
        if event_id in self.store.held:
            return True
        try:
            row = self.store.conn.execute(
                "SELECT 1 FROM outbox WHERE event_id = ?", (event_id,)
            ).fetchone()
        except sqlite3.OperationalError:  # no outbox table yet: nothing recorded
            return False
        return row is not None

    def watermark(self, model: str, serial_no: str) -> int | None:
        row = self.store.conn.execute(
            "SELECT session_no FROM device_watermark WHERE device_key = ?",
            (f"{model}/{serial_no}",),
        ).fetchone()
        return None if row is None else int(row[0])

    def _write(self, key: str, write: Callable[[], object]) -> None:
        """Inside a transaction: part of it. Alone: held in memory if the disk is full."""
        if self.store.conn.in_transaction:
            write()
        else:
            self.store.held.run(key, write)

    def recorded_dose(self, event_id: str) -> RecordedDose | None:
        """The dose event with this id in the outbox, or None if it is not recorded.

        Its gateway end time tells a session number the device repeats after a counter
        reset from the same session fetched again: a new dose starts after the old ended.
        """
        try:
            row = self.store.conn.execute(
                "SELECT payload FROM outbox WHERE event_id = ?", (event_id,)
            ).fetchone()
        except sqlite3.OperationalError:
            return None
        if row is None:
            return None
        try:
            end = datetime.fromisoformat(json.loads(row[0])["times"]["gateway_end_utc"])
        except (ValueError, KeyError, TypeError):
            end = None  # not readable: treated as the same dose (never a second record)
        return RecordedDose(gateway_end_utc=end)

    def counter_epoch(self, model: str, serial_no: str) -> int:
        row = self.store.conn.execute(
            "SELECT epoch FROM device_counter_epoch WHERE device_key = ?",
            (f"{model}/{serial_no}",),
        ).fetchone()
        return 0 if row is None else int(row[0])

    def start_counter_epoch(self, model: str, serial_no: str, session_no: int) -> int:
        """The device's session counter started again: a new epoch, the watermark set
        back to where the device is now; returns the new epoch."""
        key = f"{model}/{serial_no}"
        with self.store.transaction():
            epoch = self.counter_epoch(model, serial_no) + 1
            self.store.conn.execute(
                "INSERT INTO device_counter_epoch (device_key, epoch) VALUES (?, ?)"
                " ON CONFLICT(device_key) DO UPDATE SET epoch = excluded.epoch",
                (key, epoch),
            )
            self.store.conn.execute(
                "INSERT INTO device_watermark (device_key, session_no) VALUES (?, ?)"
                " ON CONFLICT(device_key) DO UPDATE SET session_no = excluded.session_no",
                (key, session_no),
            )
        return epoch

    def raise_watermark(self, model: str, serial_no: str, session_no: int) -> None:
        self._write(
            f"watermark:{model}/{serial_no}:{session_no}",
            lambda: self._raise_watermark(model, serial_no, session_no),
        )

    def _raise_watermark(self, model: str, serial_no: str, session_no: int) -> None:
        self.store.conn.execute(
            "INSERT INTO device_watermark (device_key, session_no) VALUES (?, ?)"
            " ON CONFLICT(device_key) DO UPDATE SET session_no ="
            " MAX(session_no, excluded.session_no)",
            (f"{model}/{serial_no}", session_no),
        )
