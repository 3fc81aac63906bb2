"""What the gateway must remember across a restart, per device: open sessions and watermarks.

An open session is journaled (its start, samples so far, pauses, alarms) so
that after ``kill -9`` it is finished correctly — from live data if the
device is still nebulizing, from the device's session record otherwise — and
never silently dropped. The journal row is deleted in the same transaction
that commits the session's dose event to the outbox.

The watermark is the highest session number of a device (by model and
serial) that the gateway has recorded; on every (re)connect, sessions between
it and the device's ``last_session_no`` are fetched from the device's log.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
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
CREATE TABLE IF NOT EXISTS device_watermark (
    device_key TEXT PRIMARY KEY,
    session_no INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS device_counter_epoch (
    device_key TEXT PRIMARY KEY,
    epoch INTEGER NOT NULL
);
"""


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
        self.store.conn.execute(
            "INSERT INTO session_journal (device_id, session_no, state, updated_utc)"
            " VALUES (?, ?, ?, ?) ON CONFLICT(device_id) DO UPDATE SET"
            " session_no = excluded.session_no, state = excluded.state,"
            " updated_utc = excluded.updated_utc",
            (device_id, session_no, json.dumps(state, separators=(",", ":")), utc.isoformat()),
        )

    def load(self, device_id: str) -> tuple[dict[str, Any], datetime] | None:
        row = self.store.conn.execute(
            "SELECT state, updated_utc FROM session_journal WHERE device_id = ?", (device_id,)
        ).fetchone()
        if row is None:
            return None
        return json.loads(row[0]), datetime.fromisoformat(row[1])

    def clear(self, device_id: str, session_no: int) -> None:
        self._write(
            f"journal-clear:{device_id}:{session_no}", lambda: self._clear(device_id, session_no)
        )

    def _clear(self, device_id: str, session_no: int) -> None:
        self.store.conn.execute(
            "DELETE FROM session_journal WHERE device_id = ? AND session_no = ?",
            (device_id, session_no),
        )

    @contextlib.contextmanager
    def finishing(self, device_id: str, session_no: int) -> Iterator[None]:
        """Commit whatever is recorded inside together with clearing the session's journal row."""
        with self.store.transaction():
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
