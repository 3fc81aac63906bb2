"""The durable outbox: nothing that makes a dose record is lost between decision and broker.

A dose event or device status is committed here (SQLite, WAL,
synchronous=FULL) before any network I/O, and marked sent only after the
broker's PUBACK. Rows are published in insertion order (so per device in
order). Dose events are unique by ``event_id``: a second, different record for
the same session is refused and reported, never published. A dose event's
restricted detail (docs/blinding.md) is committed in the same transaction,
right after it, keyed ``<event_id>/detail``: both or neither, and a later
record differing in either half is a conflict. Device statuses are
latest-wins per topic. Sent statuses are deleted; sent dose events are kept
(they are the gateway's record of what it delivered, and the dedupe key) up to
a retention limit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, get_args

from devicegw.contract.vocabulary import TopicKind
from devicegw.storage.store import Store

log = logging.getLogger(__name__)

#: Retained, latest-wins kinds: committed without an fsync of their own (store.py), and
#: published after the decided records waiting with them (``pending(latest_wins=...)``).
LATEST_WINS = frozenset({TopicKind.STATUS})  # device detail statuses are STATUS rows too
_LATEST_WINS_SQL = ", ".join(f"'{k.value}'" for k in sorted(LATEST_WINS))

#: What the outbox holds: every durable kind (telemetry never enters it).
Kind = Literal[
    TopicKind.DOSE,
    TopicKind.DOSE_DETAIL,
    TopicKind.DOSE_CORRECTION,
    TopicKind.DOSE_MISSED,
    TopicKind.STATUS,
    TopicKind.SAFETY,
]

#: The ``event_id`` column of a dose event's detail row: ``<event_id>`` + this.
DETAIL_KEY_SUFFIX = "/detail"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    device_id TEXT,
    topic TEXT NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    payload BLOB NOT NULL,
    event_id TEXT UNIQUE,
    created_utc TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    sent_utc TEXT
);
CREATE INDEX IF NOT EXISTS outbox_unsent ON outbox(id) WHERE sent_utc IS NULL;
"""

_COLUMNS = "id, kind, device_id, topic, qos, retain, payload, event_id, attempts"
_KINDS = frozenset(k.value for k in get_args(Kind))  # what a stored row's kind may be


def payload_sha256(payload: bytes) -> str:
    """What the audit trail binds a dose event's (and its detail's) stored bytes with."""
    return hashlib.sha256(payload).hexdigest()


def binding_problem(conn: sqlite3.Connection, row: OutboxRow) -> str | None:
    """Does a dose row's payload match the hash its ``session_finished`` audit record holds?

    None when it does, or when no record binds it (a store from before payload
    hashes, or a gateway run without an audit trail): nothing to compare with.
    """
    if row.kind not in (TopicKind.DOSE, TopicKind.DOSE_DETAIL) or row.event_id is None:
        return None
    is_detail = row.kind == TopicKind.DOSE_DETAIL
    event_id = row.event_id[: -len(DETAIL_KEY_SUFFIX)] if is_detail else row.event_id
    field = "detail_sha256" if is_detail else "payload_sha256"
    like = f'%"event_id":"{event_id}"%'
    try:
        # The device's own records first (indexed: audit_by_device); the whole trail only
        # if they hold none, so a record with an unexpected device_id is still found.
        bodies = []
        if row.device_id is not None:
            bodies = conn.execute(
                "SELECT seq, body FROM audit WHERE device_id = ? AND kind = 'session_finished'"
                " AND body LIKE ? ORDER BY seq",
                (row.device_id, like),
            ).fetchall()
        if not bodies:
            bodies = conn.execute(
                "SELECT seq, body FROM audit WHERE kind = 'session_finished'"
                " AND body LIKE ? ORDER BY seq",
                (like,),
            ).fetchall()
    except sqlite3.OperationalError:  # no audit table: nothing binds it
        return None
    except sqlite3.DatabaseError as exc:
        what = f"outbox row {row.id} ({row.kind} {row.event_id})"
        return f"{what}: its audit binding is unreadable: {exc}"
    for seq, body in bodies:
        try:
            value = json.loads(body)
        except (ValueError, TypeError):
            continue
        if not isinstance(value, dict) or value.get("event_id") != event_id:
            continue
        expected = value.get(field)
        if expected is None:
            return None
        if expected != payload_sha256(row.payload):
            return (
                f"outbox row {row.id} ({row.kind} {row.event_id}): payload differs from the "
                f"sha256 bound in audit record {seq}: changed after it was recorded"
            )
        return None
    return None


@dataclass(frozen=True, slots=True)
class OutboxRow:
    id: int
    kind: Kind
    device_id: str | None
    topic: str
    qos: int
    retain: bool
    payload: bytes
    event_id: str | None
    attempts: int


@dataclass(frozen=True, slots=True)
class AddResult:
    added: bool
    conflict: bool  # same event_id already stored with different content


class Outbox:
    def __init__(self, store: Store, *, keep_sent_dose_events: int = 200_000) -> None:
        self.store = store
        self.keep_sent = keep_sent_dose_events
        store.conn.executescript(_SCHEMA)
        columns = {r[1] for r in store.conn.execute("PRAGMA table_info(outbox)")}
        if "quarantined" not in columns:
            # Why a row is not published (unreadable, or its payload changed): kept, reported.
            store.conn.execute("ALTER TABLE outbox ADD COLUMN quarantined TEXT")
        self._skip: set[int] = set()  # quarantined rows the store could not mark
        self._sent_unmarked: set[int] = set()  # acknowledged; marking held by a full disk
        self.quarantined_now = 0  # rows quarantined by this process
        #: (transaction number, row id) of rows committed with sync_later and not known to
        #: be on disk yet: pending() gives no decided row from the first of them on.
        self._unsynced: deque[tuple[int, int]] = deque()

    def add(
        self,
        kind: Kind,
        topic: str,
        payload: bytes,
        *,
        qos: int,
        retain: bool,
        now: datetime,
        device_id: str | None = None,
        event_id: str | None = None,
        detail: tuple[str, bytes] | None = None,
        sync_later: bool = False,
    ) -> AddResult:
        """Commit one record; ``detail`` is a dose event's restricted (topic, payload).

        The detail needs ``event_id``; it is inserted in the same transaction,
        with the same qos and retain flag, or not at all. ``sync_later``: fsync'ed
        off the event loop, and not published before (Store.transaction).
        """
        if detail is not None and event_id is None:
            raise ValueError("a detail record needs the event_id of its dose event")
        # A retained status is replaced by the next one: no fsync of its own (store.py).
        durable = kind not in LATEST_WINS
        with self.store.transaction(durable=durable, sync_later=durable and sync_later) as db:
            rows = [(kind, topic, payload, event_id)]
            if detail is not None and event_id is not None:
                rows.append(
                    (TopicKind.DOSE_DETAIL, detail[0], detail[1], event_id + DETAIL_KEY_SUFFIX)
                )
            if event_id is not None:
                stored = [
                    db.execute("SELECT payload FROM outbox WHERE event_id = ?", (key,)).fetchone()
                    for _, _, _, key in rows
                ]
                if any(
                    row is not None and bytes(row[0]) != new[2]
                    for row, new in zip(stored, rows, strict=True)
                ):
                    log.error(
                        "a different record for an already recorded dose was refused",
                        extra={"event_id": event_id, "device_id": device_id},
                    )
                    return AddResult(added=False, conflict=True)
                if stored[0] is not None:
                    # Recorded. A half pruned by retention is not published again.
                    return AddResult(added=False, conflict=False)
                rows = [new for row, new in zip(stored, rows, strict=True) if row is None]
            if kind == TopicKind.STATUS:
                db.execute("DELETE FROM outbox WHERE topic = ? AND sent_utc IS NULL", (topic,))
            for row_kind, row_topic, row_payload, row_key in rows:
                cursor = db.execute(
                    "INSERT INTO outbox (kind, device_id, topic, qos, retain, payload, event_id,"
                    " created_utc) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        row_kind,
                        device_id,
                        row_topic,
                        qos,
                        int(retain),
                        row_payload,
                        row_key,
                        now.isoformat(),
                    ),
                )
                if self.store.deferring and cursor.lastrowid is not None:
                    self._unsynced.append((self.store.transaction_gen, cursor.lastrowid))
        return AddResult(added=True, conflict=False)

    def _first_unsynced_id(self) -> int | None:
        """The first decided row not known to be on disk (Store, sync_later), if any."""
        unsynced = self._unsynced
        while unsynced and self.store.is_synced(unsynced[0][0]):
            unsynced.popleft()
        return unsynced[0][1] if unsynced else None

    def pending(
        self, *, after_id: int = 0, limit: int = 100, latest_wins: bool | None = None
    ) -> list[OutboxRow]:
        """Unsent rows in order; a row that cannot be read or decoded is quarantined, not fatal.

        ``latest_wins``: only retained statuses (True), only the other records (False),
        or all (None). The publisher asks for the decided records first, so that a
        burst of statuses (500 sessions ending) does not delay dose events.

        Issue 14 item 3: one damaged row (random bytes in its page) must not stop
        the others. Text columns are read as bytes and decoded here; if SQLite
        cannot read the page at all, rows are read one by one around it.
        """
        kinds = ""
        if latest_wins is not None:
            kinds = f" AND kind {'IN' if latest_wins else 'NOT IN'} ({_LATEST_WINS_SQL})"
        conn = self.store.conn
        saved = conn.text_factory
        conn.text_factory = bytes
        try:
            try:
                raw = conn.execute(
                    f"SELECT {_COLUMNS} FROM outbox WHERE sent_utc IS NULL AND quarantined IS NULL"
                    f" AND id > ?{kinds} ORDER BY id LIMIT ?",
                    (after_id, limit + len(self._skip) + len(self._sent_unmarked)),
                ).fetchall()
            except sqlite3.DatabaseError as exc:
                why = f"outbox: reading rows after {after_id} failed ({exc}); reading one by one"
                log.error(why)  # noqa: TRY400 - the error is the message
                raw = self._one_by_one(after_id, limit)
        finally:
            conn.text_factory = saved
        rows: list[OutboxRow] = []
        unsynced_from = self._first_unsynced_id()
        for r in raw:
            if len(rows) >= limit:
                break
            if r[0] in self._skip or r[0] in self._sent_unmarked:
                continue
            row, problem = _decode(r)
            if row is None:
                self.quarantine(int(r[0]), problem or "unreadable")
                continue
            # The query filtered already; rows read one by one around damage are not.
            if latest_wins is not None and (row.kind in LATEST_WINS) != latest_wins:
                continue
            if unsynced_from is not None and row.id >= unsynced_from and latest_wins is not True:
                break  # committed, not yet fsync'ed: not published yet (store.py)
            rows.append(row)
        return rows

    def _one_by_one(self, after_id: int, limit: int) -> list[tuple[object, ...]]:
        conn = self.store.conn
        try:
            top_row = conn.execute(
                "SELECT seq FROM sqlite_sequence WHERE name = 'outbox'"
            ).fetchone()
            top = int(top_row[0]) if top_row else after_id
        except (sqlite3.DatabaseError, ValueError, TypeError):
            top = after_id + limit
        out: list[tuple[object, ...]] = []
        for row_id in range(after_id + 1, top + 1):
            if len(out) >= limit:
                break
            try:
                r = conn.execute(
                    f"SELECT {_COLUMNS}, sent_utc, quarantined FROM outbox WHERE id = ?",
                    (row_id,),
                ).fetchone()
            except sqlite3.DatabaseError as exc:
                self.quarantine(row_id, f"SQLite cannot read the row: {exc}")
                continue
            if r is not None and r[9] is None and r[10] is None:
                out.append(tuple(r[:9]))
        return out

    def quarantine(self, row_id: int, why: str) -> None:
        """Keep a row out of publishing, with the reason; reported, never deleted."""
        self._skip.add(row_id)
        self.quarantined_now += 1
        log.error("outbox row %d quarantined, not published: %s", row_id, why)
        try:
            self.store.conn.execute(
                "UPDATE outbox SET quarantined = ? WHERE id = ?", (why[:500], row_id)
            )
        except sqlite3.Error as exc:
            log.error("outbox row %d: cannot mark it quarantined: %s", row_id, exc)  # noqa: TRY400

    def quarantined(self) -> list[tuple[int, str]]:
        """Rows kept out of publishing, with why (this process's unmarked ones too)."""
        marked = {
            int(r[0]): str(r[1])
            for r in self.store.conn.execute(
                "SELECT id, quarantined FROM outbox WHERE quarantined IS NOT NULL ORDER BY id"
            )
        }
        for row_id in self._skip:
            marked.setdefault(row_id, "unreadable (not marked: the store refused the write)")
        return sorted(marked.items())

    def check_binding(self, row: OutboxRow) -> str | None:
        return binding_problem(self.store.conn, row)

    def mark_sent(self, row: OutboxRow, now: datetime) -> None:
        # Not fsync'ed (store.py): a mark lost to a power cut means one more copy, which
        # subscribers drop by event_id (delivery is at least once).
        with self.store.transaction(durable=False) as db:
            if row.kind == TopicKind.STATUS:
                db.execute("DELETE FROM outbox WHERE id = ?", (row.id,))
            else:
                db.execute("UPDATE outbox SET sent_utc = ? WHERE id = ?", (now.isoformat(), row.id))

    def mark_attempts(self, row_ids: Sequence[int]) -> None:
        """Count a publishing attempt for each of a round of rows, in one transaction.

        Not fsync'ed (store.py): a count lost to a power cut only undercounts attempts.
        """
        with self.store.transaction(durable=False) as db:
            db.executemany(
                "UPDATE outbox SET attempts = attempts + 1 WHERE id = ?", [(i,) for i in row_ids]
            )

    def mark_all_sent_or_hold(self, acked: Sequence[tuple[OutboxRow, datetime]]) -> None:
        """Mark the rows acknowledged since the last call sent, in one transaction (one
        commit per round, not per row; issue 13). On a full disk the marks are held in
        memory and the rows are never sent twice meanwhile (``_sent_unmarked``)."""
        if not acked:
            return
        ids = [row.id for row, _ in acked]
        self._sent_unmarked.update(ids)

        def write() -> None:
            with self.store.transaction(durable=False):
                for row, now in acked:
                    self.mark_sent(row, now)
            self._sent_unmarked.difference_update(ids)

        self.store.held.run(f"sent:{ids[0]}+{len(ids)}", write)

    def depth(self) -> int:
        row = self.store.conn.execute(
            "SELECT COUNT(*) FROM outbox WHERE sent_utc IS NULL AND quarantined IS NULL"
        ).fetchone()
        return int(row[0])

    def oldest_unsent_utc(self) -> datetime | None:
        """When the oldest record still waiting for the broker was committed (None: none)."""
        row = self.store.conn.execute(
            "SELECT MIN(created_utc) FROM outbox WHERE sent_utc IS NULL AND quarantined IS NULL"
        ).fetchone()
        return None if row is None or row[0] is None else datetime.fromisoformat(row[0])

    def prune(self) -> int:
        """Drop the oldest sent dose events beyond the retention limit; never unsent ones.

        Details are not counted: a sent detail goes with its dose event.
        """
        with self.store.transaction() as db:
            events = db.execute(
                "DELETE FROM outbox WHERE sent_utc IS NOT NULL AND kind != ? AND id NOT IN"
                " (SELECT id FROM outbox WHERE sent_utc IS NOT NULL AND kind != ?"
                " ORDER BY id DESC LIMIT ?)",
                (TopicKind.DOSE_DETAIL, TopicKind.DOSE_DETAIL, self.keep_sent),
            ).rowcount
            details = db.execute(
                "DELETE FROM outbox WHERE kind = ? AND sent_utc IS NOT NULL"
                " AND substr(event_id, 1, length(event_id) - ?) NOT IN"
                " (SELECT event_id FROM outbox WHERE kind = ?)",
                (TopicKind.DOSE_DETAIL, len(DETAIL_KEY_SUFFIX), TopicKind.DOSE),
            ).rowcount
        return int(events + details)


def _text(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8")  # strict: an invalid byte is damage
    if isinstance(value, str):
        return value
    raise TypeError(f"{type(value).__name__} where text was stored")


def _decode(r: tuple[object, ...]) -> tuple[OutboxRow | None, str | None]:
    """An :class:`OutboxRow` from raw column values, or why it cannot be one."""
    try:
        row_id, kind, device_id, topic, qos, retain, payload, event_id, attempts = r
        kind_text = _text(kind)
        topic_text = _text(topic)
        if kind_text not in _KINDS or not topic_text:
            return None, f"unknown kind {kind_text!r} or no topic"
        if not isinstance(payload, bytes | str):
            return None, "payload of the wrong type"
        body = payload if isinstance(payload, bytes) else payload.encode("utf-8")
        if not isinstance(json.loads(body), dict):
            return None, "payload is not a JSON object"
        if not isinstance(qos, int) or not isinstance(retain, int) or not isinstance(attempts, int):
            return None, "qos, retain or attempts of the wrong type"
        return (
            OutboxRow(
                int(str(row_id)),
                kind_text,  # type: ignore[arg-type]
                _text(device_id),
                topic_text,
                qos,
                bool(retain),
                body,
                _text(event_id),
                attempts,
            ),
            None,
        )
    except (UnicodeDecodeError, ValueError, TypeError) as exc:
        return None, f"undecodable row: {type(exc).__name__}: {str(exc)[:200]}"


def verify_outbox(conn: sqlite3.Connection) -> list[str]:
    """Read-only: every outbox row readable, every dose payload as its audit record bound it.

    One line per problem, naming the row (``devicegw audit verify``).
    """
    problems: list[str] = []
    try:
        has = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'outbox'"
        ).fetchone()
    except sqlite3.DatabaseError as exc:
        return [f"outbox: cannot be read: {exc}"]
    if has is None:
        return []
    saved = conn.text_factory
    conn.text_factory = bytes
    try:
        raw = conn.execute(f"SELECT {_COLUMNS} FROM outbox ORDER BY id").fetchall()
    except sqlite3.DatabaseError as exc:
        return [f"outbox: cannot be read whole (damaged page): {exc}"]
    finally:
        conn.text_factory = saved
    for r in raw:
        row, why = _decode(r)
        if row is None:
            problems.append(f"outbox row {r[0]}: {why}")
            continue
        bad = binding_problem(conn, row)
        if bad is not None:
            problems.append(bad)
    return problems
