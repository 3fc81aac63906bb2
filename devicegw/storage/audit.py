"""The ALCOA+ audit trail: an append-only, hash-chained log in the gateway store.

Everything that creates or shapes a dose record is appended here: gateway
start/stop, the loaded configuration (its sha256), device (re)assignments,
device identification and refusal, session start/end with the verdict, and
sessions reconciled from a device's log. It lives in the ``audit`` table of
the one gateway store (:class:`devicegw.storage.store.Store`), beside the outbox, so
one file and one backup hold both.

Integrity, in three layers:

1. The code has no update or delete API: :meth:`AuditTrail.append` is the only
   writer, and it takes ``seq`` and ``prev_hash`` inside one
   ``BEGIN IMMEDIATE`` transaction so two writers cannot fork the chain.
2. SQLite triggers refuse ``UPDATE`` and ``DELETE`` of audit rows and any
   ``INSERT`` that is not the next link of the chain. Anyone holding the file
   can drop them; they stop accidents and casual edits, not an attacker.
3. Each record holds the sha256 of the previous record (``prev_hash``) and its
   own (``hash``), computed over its fields (see :func:`record_hash`).
   :func:`verify` walks the chain and names the first record where it breaks:
   an edited record no longer matches its hash; a deleted or reordered one
   breaks the next record's ``prev_hash`` or leaves a gap in ``seq``.

What a chain alone cannot show (stated plainly, because an auditor will ask):
the hashes are unkeyed, so removing the last records (tail truncation) leaves
a valid, shorter chain, and someone who rewrites a record *and recomputes
every hash after it* produces a valid chain too. Both are caught only by
comparing with a **witness**: the head ``(count, hash)`` that :func:`verify`
and :meth:`AuditTrail.head` report, recorded somewhere the gateway cannot
rewrite (the EDC, a monitoring visit log, a signed printout). Pass a recorded
witness to :func:`verify` (``devicegw audit verify --witness N:HASH``) and any
change to records 1..N, truncation included, fails verification.

The body of a record never carries the treatment arm: the configuration has
none, and :meth:`AuditTrail.append` refuses arm-like keys outright.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import sqlite3
import threading
from collections.abc import Generator, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from devicegw.core.ports import AuditKind
from devicegw.safe_text import printable
from devicegw.storage.outbox import payload_sha256
from devicegw.storage.store import Store, StoreError
from drivers.clock import Clock

if TYPE_CHECKING:
    from rich.console import RenderableType

    from devicegw.config import Config, DeviceSettings
    from devicegw.contract.payloads import DoseRecord

log = logging.getLogger(__name__)

GENESIS_HASH = "0" * 64

# Keys a body may never have, at any depth: the trial is blinded.
FORBIDDEN_BODY_KEYS = frozenset({"arm", "treatment_arm", "treatment", "allocation"})


class AuditError(StoreError):
    """The audit trail could not be written."""


def canonical_json(value: object) -> str:
    """Compact, key-sorted, UTF-8 JSON; NaN/Infinity are refused (not portable JSON)."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def record_hash(
    *,
    seq: int,
    utc: str,
    gateway_id: str | None,
    kind: str,
    device_id: str | None,
    subject_id: str | None,
    session_no: int | None,
    body: str,
    prev_hash: str,
) -> str:
    """sha256 (hex) of one record: the whole construction an auditor needs.

    The input is the UTF-8 encoding of the canonical JSON *array*
    ``[seq, utc, gateway_id, kind, device_id, subject_id, session_no, body,
    prev_hash]``, where ``body`` is the record's stored body text (itself
    canonical JSON) embedded as a JSON string, so a re-implementation hashes
    the stored bytes and never has to re-serialize numbers.
    """
    envelope = [seq, utc, gateway_id, kind, device_id, subject_id, session_no, body, prev_hash]
    return hashlib.sha256(canonical_json(envelope).encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class AuditRecord:
    seq: int
    utc: str
    gateway_id: str | None
    kind: str
    device_id: str | None
    subject_id: str | None
    session_no: int | None
    body_json: str
    prev_hash: str
    hash: str

    @property
    def body(self) -> dict[str, object]:
        """The parsed body; ``{"_unparsed": text}`` if a tamperer left invalid JSON."""
        try:
            value = json.loads(self.body_json)
        except ValueError:
            return {"_unparsed": self.body_json}
        return value if isinstance(value, dict) else {"_value": value}

    @property
    def time(self) -> datetime | None:
        try:
            t = datetime.fromisoformat(self.utc)
        except ValueError:
            return None
        return t if t.tzinfo is not None else t.replace(tzinfo=UTC)

    def computed_hash(self) -> str:
        return record_hash(
            seq=self.seq,
            utc=self.utc,
            gateway_id=self.gateway_id,
            kind=self.kind,
            device_id=self.device_id,
            subject_id=self.subject_id,
            session_no=self.session_no,
            body=self.body_json,
            prev_hash=self.prev_hash,
        )

    def to_json_dict(self) -> dict[str, object]:
        return {
            "seq": self.seq,
            "utc": self.utc,
            "gateway_id": self.gateway_id,
            "kind": self.kind,
            "device_id": self.device_id,
            "subject_id": self.subject_id,
            "session_no": self.session_no,
            "body": self.body,
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }


@dataclass(frozen=True, slots=True)
class AuditHead:
    """What an external witness should record: the number of records and the last hash."""

    count: int
    hash: str

    def __str__(self) -> str:
        return f"{self.count}:{self.hash}"

    @classmethod
    def parse(cls, text: str) -> AuditHead:
        """Parse ``N:HASH`` as printed by ``devicegw audit verify``."""
        count, sep, digest = text.partition(":")
        digest = digest.strip().lower()
        if not sep or not count.strip().isdigit() or len(digest) != 64:
            raise ValueError(f"a witness is N:HASH (64 hex digits), not {text!r}")
        int(digest, 16)
        return cls(int(count), digest)


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """Outcome of :func:`verify`.

    ``records`` and ``head`` cover the records that verified, in order; when
    ``ok`` they are the whole trail, and ``head`` is what a witness records.
    ``first_bad`` is the seq of the first record at which the chain fails.
    """

    ok: bool
    records: int
    head: AuditHead
    first_bad: int | None = None
    reason: str | None = None

    @property
    def head_hash(self) -> str:
        return self.head.hash

    def summary(self) -> str:
        if self.ok:
            return f"OK: {self.records} records, head {self.head.hash}"
        if self.first_bad is None:
            return f"FAILED: {self.reason}"
        return (
            f"FAILED at record {self.first_bad}: {self.reason} "
            f"({self.records} records verified before it, last good head {self.head})"
        )


_COLUMNS = "seq, utc, gateway_id, kind, device_id, subject_id, session_no, body, prev_hash, hash"

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS audit (
        seq INTEGER PRIMARY KEY,
        utc TEXT NOT NULL,
        gateway_id TEXT,
        kind TEXT NOT NULL,
        device_id TEXT,
        subject_id TEXT,
        session_no INTEGER,
        body TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL
    )""",
    """CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only: UPDATE refused'); END""",
    """CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only: DELETE refused'); END""",
    f"""CREATE TRIGGER IF NOT EXISTS audit_append_only BEFORE INSERT ON audit
    WHEN NEW.seq IS NOT (SELECT COALESCE(MAX(seq), 0) + 1 FROM audit)
      OR NEW.prev_hash IS NOT COALESCE(
           (SELECT hash FROM audit ORDER BY seq DESC LIMIT 1), '{GENESIS_HASH}')
    BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only: INSERT is not the next link');
    END""",
    # The publisher checks every dose row against its session_finished record; without
    # this it scanned the whole trail for each (issue 13: linear in the trail's age).
    "CREATE INDEX IF NOT EXISTS audit_by_device ON audit(device_id, kind)",
)
_TRIGGERS = ("audit_no_update", "audit_no_delete", "audit_append_only")


def _utc_text(t: datetime) -> str:
    if t.tzinfo is None:
        raise ValueError("the audit clock must give timezone-aware times")
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _check_blinded(value: object, path: str = "body") -> None:
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{path}: audit body keys must be strings, not {key!r}")
            if key.lower() in FORBIDDEN_BODY_KEYS:
                raise ValueError(f"{path}.{key}: the audit trail never records a treatment arm")
            _check_blinded(item, f"{path}.{key}")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_blinded(item, f"{path}[{i}]")


def _row_to_record(row: tuple[Any, ...]) -> tuple[AuditRecord, str | None]:
    """A record from a raw row, and which fields have a type no writer stores (tampering)."""
    seq, utc, gateway_id, kind, device_id, subject_id, session_no, body, prev_hash, digest = row
    problems = [
        name
        for name, value, types in (
            ("utc", utc, (str,)),
            ("gateway_id", gateway_id, (str, type(None))),
            ("kind", kind, (str,)),
            ("device_id", device_id, (str, type(None))),
            ("subject_id", subject_id, (str, type(None))),
            ("session_no", session_no, (int, type(None))),
            ("body", body, (str,)),
            ("prev_hash", prev_hash, (str,)),
            ("hash", digest, (str,)),
        )
        if not isinstance(value, types)
    ]
    record = AuditRecord(
        seq=int(seq),
        utc=str(utc),
        gateway_id=None if gateway_id is None else str(gateway_id),
        kind=str(kind),
        device_id=None if device_id is None else str(device_id),
        subject_id=None if subject_id is None else str(subject_id),
        session_no=session_no if isinstance(session_no, int) else None,
        body_json=str(body),
        prev_hash=str(prev_hash),
        hash=str(digest),
    )
    return record, (f"{', '.join(problems)} of the wrong type" if problems else None)


def _loads_dict(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _has_table(conn: sqlite3.Connection) -> bool:
    row = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'audit'"
    ).fetchone()
    return row is not None


def _assignment_body(device: DeviceSettings) -> dict[str, object]:
    return {
        "device_id": device.id,
        "type": device.type,
        "bed": device.bed,
        "subject_id": device.subject_id,
        "kit_number": device.kit_number,
        "port": device.link.port_name,
    }


class AuditTrail:
    """The append-only writer of the audit trail in ``store``.

    Usage from the daemon::

        trail = AuditTrail(store, clock=clock, gateway_id=config.gateway.id)
        trail.append(AuditKind.gateway_start, body={"version": __version__})
        trail.record_assignments(config, config_path=path)
        ...
        trail.record_session_finished(event)

    Appends are synchronous and durable when they return (the store runs
    ``synchronous=FULL``). Called inside a transaction already open on the
    store's connection, an append joins it: the record is committed (or rolled
    back) together with whatever else that transaction writes, so a dose event
    in the outbox and its audit record cannot disagree.
    """

    def __init__(self, store: Store, *, clock: Clock, gateway_id: str) -> None:
        self._store = store
        self._clock = clock
        self.gateway_id = gateway_id
        self._lock = threading.Lock()
        self._coalescer = _Coalescer()
        self._held_seq = 0
        with self._transaction() as cur:
            existed = _has_table(store.conn)
            present = {
                r[0]
                for r in cur.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'audit'"
                )
            }
            for statement in _SCHEMA:
                cur.execute(statement)
        missing = [t for t in _TRIGGERS if t not in present]
        if existed and missing:
            log.warning(
                "audit trail triggers %s were missing from %s and have been recreated; "
                "run `devicegw audit verify`",
                ", ".join(missing),
                store.path,
            )

    # -- writing ---------------------------------------------------------------------------

    def append(
        self,
        kind: AuditKind,
        *,
        device_id: str | None = None,
        subject_id: str | None = None,
        session_no: int | None = None,
        body: Mapping[str, object],
        sync_later: bool = False,
    ) -> AuditRecord | None:
        """Append one record and return it once it is on disk.

        A device's repeated identification/refusal records are rate limited
        (:class:`_Coalescer`): above the limit nothing is appended (``None``) and
        the suppressed records are summarised in one ``audit_coalesced`` record.

        ``sync_later``: committed at once but fsync'ed by the store's worker thread,
        not on the event loop (``Store.transaction(sync_later=True)``), for records
        the daemon writes per session or per connection: 500 beds starting a session
        within seconds were 500 fsyncs on the loop. Nothing outside the gateway sees
        an audit record before it is synced (the witness is written after
        ``Store.sync_now``); a power cut in between takes it back, chain intact.
        """
        kind = AuditKind(kind)
        if device_id is not None and kind in COALESCED_KINDS:
            for summary in self._coalescer.flush_due(self._clock.monotonic()):
                self._append_summary(summary)
            if not self._coalescer.admit(device_id, kind, self._clock.monotonic(), self._now()):
                return None
        if self._store.conn.in_transaction:  # part of someone's transaction: theirs to hold
            return self._append_now(
                kind, device_id=device_id, subject_id=subject_id, session_no=session_no, body=body
            )
        appended: list[AuditRecord] = []

        def write() -> None:
            with (
                self._store.transaction(sync_later=True) if sync_later else contextlib.nullcontext()
            ):
                appended.append(
                    self._append_now(
                        kind,
                        device_id=device_id,
                        subject_id=subject_id,
                        session_no=session_no,
                        body=body,
                    )
                )

        # A full disk: held in memory and appended (in order) when space returns.
        self._held_seq += 1
        self._store.held.run(f"audit:{self._held_seq}", write)
        return appended[0] if appended else None

    def flush_coalesced(self, *, everything: bool = False) -> None:
        """Write the summaries of coalesced records whose window has closed (all at a stop)."""
        now = float("inf") if everything else self._clock.monotonic()
        for summary in self._coalescer.flush_due(now):
            self._append_summary(summary)

    def _append_summary(self, summary: _Suppressed) -> None:
        self._append_now(
            AuditKind.audit_coalesced,
            device_id=summary.device_id,
            body={
                "kind": summary.kind.value,
                "count": summary.count,
                "first_utc": summary.first_utc,
                "last_utc": summary.last_utc,
                "limit": COALESCE_LIMIT,
                "window_s": COALESCE_WINDOW_S,
            },
        )

    def _now(self) -> str:
        return _utc_text(self._clock.now())

    def _append_now(
        self,
        kind: AuditKind,
        *,
        device_id: str | None = None,
        subject_id: str | None = None,
        session_no: int | None = None,
        body: Mapping[str, object],
    ) -> AuditRecord:
        body_json = self._body_json(body)
        with self._transaction() as cur:
            return self._append_in(
                cur,
                kind,
                device_id=device_id,
                subject_id=subject_id,
                session_no=session_no,
                body_json=body_json,
            )

    def record_assignments(
        self, config: Config, *, config_path: str | Path | None = None
    ) -> list[AuditRecord]:
        """Record the configuration and device assignments, but only what changed.

        Appends ``config_loaded`` when ``config.source_sha256`` differs from the
        last recorded one; ``device_assigned`` for each device whose assignment
        (type, bed, subject, kit, port) differs from its last recorded one; and
        ``device_unassigned`` for each device assigned in the trail but absent
        from ``config``. All in one transaction; returns the appended records.
        """
        wanted = {d.id: (d, canonical_json(_assignment_body(d))) for d in config.devices}
        appended: list[AuditRecord] = []
        with self._transaction() as cur:
            last_config = cur.execute(
                "SELECT body FROM audit WHERE kind = ? ORDER BY seq DESC LIMIT 1",
                (AuditKind.config_loaded.value,),
            ).fetchone()
            last_sha = _loads_dict(last_config[0]).get("sha256") if last_config else None
            if last_sha != config.source_sha256:
                body = {
                    "sha256": config.source_sha256,
                    "path": None if config_path is None else str(config_path),
                }
                appended.append(
                    self._append_in(cur, AuditKind.config_loaded, body_json=canonical_json(body))
                )
            current: dict[str, str | None] = {}
            rows = cur.execute(
                "SELECT device_id, kind, body FROM audit WHERE kind IN (?, ?) ORDER BY seq",
                (AuditKind.device_assigned.value, AuditKind.device_unassigned.value),
            ).fetchall()
            for dev, kind, text in rows:
                current[dev] = text if kind == AuditKind.device_assigned.value else None
            for dev_id, (device, text) in wanted.items():
                if current.get(dev_id) != text:
                    appended.append(
                        self._append_in(
                            cur,
                            AuditKind.device_assigned,
                            device_id=dev_id,
                            subject_id=device.subject_id,
                            body_json=text,
                        )
                    )
            for dev_id, text in current.items():
                if text is not None and dev_id not in wanted:
                    last = _loads_dict(text)
                    gone: dict[str, object] = {"device_id": dev_id, "last_assignment": last}
                    appended.append(
                        self._append_in(
                            cur,
                            AuditKind.device_unassigned,
                            device_id=dev_id,
                            subject_id=last.get("subject_id"),
                            body_json=canonical_json(gone),
                        )
                    )
        return appended

    def record_session_finished(self, record: DoseRecord) -> AuditRecord:
        """Append ``session_finished`` for a dose record (the verdict and how it was reached).

        The gateway's own trail keeps the full reasons and the end reason (from the
        restricted detail): it is read by engineering roles, like the detail feed.
        """
        event, detail = record.event, record.detail
        event_json, detail_json = record.encoded()
        return self._append_now(
            AuditKind.session_finished,
            device_id=event.device.device_id,
            subject_id=event.subject_id,
            session_no=event.session_no,
            body={
                "event_id": str(event.event_id),
                "kit_number": event.kit_number,
                "serial_no": event.device.serial_no,
                "verdict": event.verdict,
                "reasons": list(detail.reasons),
                "delivered_ml": event.volume.delivered_ml,
                "delivered_basis": detail.volume.delivered_basis,
                "end_reason": detail.end_reason,
                "data_source": event.data_source,
                "config_sha256": event.config_sha256,
                # The stored bytes of the event and its detail (as the outbox holds them,
                # DoseRecord.encoded): a changed payload breaks this binding.
                "payload_sha256": payload_sha256(event_json),
                "detail_sha256": payload_sha256(detail_json),
            },
        )

    # -- reading ---------------------------------------------------------------------------

    def head(self) -> AuditHead:
        """The current head (count, hash) to hand to an external witness."""
        return _head(self._store.conn)

    # -- internals -------------------------------------------------------------------------

    @staticmethod
    def _body_json(body: Mapping[str, object]) -> str:
        if not isinstance(body, Mapping):
            raise TypeError("an audit body is a mapping of str to JSON values")
        _check_blinded(body)
        try:
            return canonical_json(dict(body))
        except (TypeError, ValueError) as exc:
            raise TypeError(f"an audit body must be plain JSON: {exc}") from exc

    def _transaction(self) -> _Transaction:
        return _Transaction(self._store, self._lock)

    def _append_in(
        self,
        cur: sqlite3.Cursor,
        kind: AuditKind,
        *,
        device_id: str | None = None,
        subject_id: str | None = None,
        session_no: int | None = None,
        body_json: str,
    ) -> AuditRecord:
        last = cur.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        seq = 1 if last is None else int(last[0]) + 1
        prev_hash = GENESIS_HASH if last is None else str(last[1])
        unsigned = AuditRecord(
            seq=seq,
            utc=_utc_text(self._clock.now()),
            gateway_id=self.gateway_id,
            kind=kind.value,
            device_id=device_id,
            subject_id=subject_id,
            session_no=session_no,
            body_json=body_json,
            prev_hash=prev_hash,
            hash="",
        )
        record = replace(unsigned, hash=unsigned.computed_hash())
        cur.execute(
            f"INSERT INTO audit ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                record.seq,
                record.utc,
                record.gateway_id,
                record.kind,
                record.device_id,
                record.subject_id,
                record.session_no,
                record.body_json,
                record.prev_hash,
                record.hash,
            ),
        )
        return record


#: Device-originated kinds a device can repeat at will (an IDENT flood): rate limited.
COALESCED_KINDS = frozenset({AuditKind.device_identified, AuditKind.device_refused})
#: Per device and kind: at most this many records per window; the rest are counted.
COALESCE_LIMIT = 10
COALESCE_WINDOW_S = 60.0


@dataclass(slots=True)
class _Suppressed:
    device_id: str
    kind: AuditKind
    count: int
    first_utc: str
    last_utc: str


@dataclass(slots=True)
class _Window:
    start: float
    written: int = 0
    suppressed: _Suppressed | None = None


class _Coalescer:
    """At most :data:`COALESCE_LIMIT` records per device and kind per window.

    Beyond it, records are counted (first and last time) and summarised in one
    ``audit_coalesced`` record when the window closes, with a WARNING when the
    suppression starts: a device cannot flood the trail (issue 14 item 7), and
    the trail still says that it tried, how often and when.
    """

    def __init__(self) -> None:
        self._windows: dict[tuple[str, AuditKind], _Window] = {}

    def admit(self, device_id: str, kind: AuditKind, mono: float, utc: str) -> bool:
        key = (device_id, kind)
        window = self._windows.get(key)
        if window is None or mono - window.start >= COALESCE_WINDOW_S:
            window = self._windows[key] = _Window(start=mono)
        if window.written < COALESCE_LIMIT:
            window.written += 1
            return True
        if window.suppressed is None:
            window.suppressed = _Suppressed(device_id, kind, 0, utc, utc)
            log.warning(
                "device %s repeats %s beyond %d records per %.0f s: coalescing them in the "
                "audit trail (count, first and last time)",
                printable(device_id),
                kind.value,
                COALESCE_LIMIT,
                COALESCE_WINDOW_S,
                extra={"device_id": device_id},
            )
        window.suppressed.count += 1
        window.suppressed.last_utc = utc
        return False

    def flush_due(self, mono: float) -> list[_Suppressed]:
        """Summaries of windows that have closed (all of them for ``inf``)."""
        due: list[_Suppressed] = []
        for key, window in list(self._windows.items()):
            if mono - window.start >= COALESCE_WINDOW_S:
                if window.suppressed is not None:
                    due.append(window.suppressed)
                del self._windows[key]
        return due


class _Transaction:
    """The audit's own transaction on the store's connection.

    On its own: ``BEGIN IMMEDIATE`` ... ``COMMIT``, so seq and prev_hash are read
    and written under the write lock and the append is durable on return.
    Inside a transaction someone else opened on the connection (e.g. the outbox
    committing a dose event and its audit record together): a ``SAVEPOINT``, so
    the audit records commit or roll back with that outer transaction.
    """

    def __init__(self, store: Store, lock: threading.Lock) -> None:
        self._store = store
        self._lock = lock
        self._cur: sqlite3.Cursor | None = None
        self._nested = False

    def _error(self, exc: BaseException) -> AuditError:
        return AuditError(f"cannot write the audit trail in {self._store.path}: {exc}")

    def __enter__(self) -> sqlite3.Cursor:
        self._lock.acquire()
        try:
            self._cur = self._store.conn.cursor()
            self._nested = self._store.conn.in_transaction
            self._cur.execute("SAVEPOINT audit_append" if self._nested else "BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            self._lock.release()
            raise self._error(exc) from exc
        except BaseException:
            self._lock.release()
            raise
        return self._cur

    def __exit__(self, exc_type: type[BaseException] | None, exc: object, tb: object) -> None:
        assert self._cur is not None
        cur = self._cur
        try:
            if exc_type is None:
                try:
                    cur.execute("RELEASE audit_append" if self._nested else "COMMIT")
                except sqlite3.Error as err:
                    self._rollback(cur)
                    raise self._error(err) from err
            else:
                self._rollback(cur)
                if isinstance(exc, sqlite3.Error):
                    raise self._error(exc) from exc
        finally:
            cur.close()
            self._lock.release()

    def _rollback(self, cur: sqlite3.Cursor) -> None:
        with contextlib.suppress(sqlite3.Error):
            if self._nested:
                cur.execute("ROLLBACK TO audit_append")
                cur.execute("RELEASE audit_append")
            else:
                cur.execute("ROLLBACK")


def _head(conn: sqlite3.Connection) -> AuditHead:
    if not _has_table(conn):
        return AuditHead(0, GENESIS_HASH)
    row = conn.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
    return AuditHead(0, GENESIS_HASH) if row is None else AuditHead(int(row[0]), str(row[1]))


def open_store(path: str | Path) -> Store:
    """Open an existing gateway store (e.g. a copy for an offline audit); never create one."""
    p = Path(path)
    if not p.is_file():
        raise StoreError(f"no gateway store at {p}")
    return Store(p)


def iter_records(
    store: Store, *, device_id: str | None = None, since: datetime | None = None
) -> Generator[AuditRecord, None, None]:
    """Records in ``seq`` order, optionally for one device and from a UTC time on."""
    conn = store.conn
    if not _has_table(conn):
        return
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    if device_id is None:
        cur = conn.execute(f"SELECT {_COLUMNS} FROM audit ORDER BY seq")
    else:
        cur = conn.execute(
            f"SELECT {_COLUMNS} FROM audit WHERE device_id = ? ORDER BY seq", (device_id,)
        )
    try:
        for row in cur:
            record, _ = _row_to_record(row)
            if since is not None:
                t = record.time
                if t is not None and t < since:
                    continue
            yield record
    finally:
        cur.close()


def verify(store: Store, *, witness: AuditHead | None = None) -> VerifyResult:
    """Walk the chain by ``seq`` and report the first record at which it fails.

    Checks, per record, in this order: ``seq`` continues from the previous
    record (a gap names the first missing seq); ``prev_hash`` equals the
    previous record's hash (deletion or reordering); the stored ``hash``
    recomputes (an edit). With ``witness`` (a head recorded earlier), also
    checks that record ``witness.count`` exists and has ``witness.hash``,
    which is what catches truncation and wholesale rewrites.

    Works on any copy of the store (copy the ``-wal`` file with it, or use
    ``sqlite3 .backup``); it reads only.
    """
    conn = store.conn
    if not _has_table(conn):
        return VerifyResult(
            ok=False,
            records=0,
            head=AuditHead(0, GENESIS_HASH),
            reason=f"no audit trail in {store.path}",
        )
    count = 0
    prev_hash = GENESIS_HASH
    witnessed = False

    def fail(seq: int, reason: str) -> VerifyResult:
        return VerifyResult(
            ok=False, records=count, head=AuditHead(count, prev_hash), first_bad=seq, reason=reason
        )

    saved = conn.text_factory
    # Damaged text must name its record (as an edit), not raise UnicodeDecodeError.
    conn.text_factory = _lenient_text
    try:
        rows = conn.execute(f"SELECT {_COLUMNS} FROM audit ORDER BY seq")
    except sqlite3.DatabaseError as exc:
        conn.text_factory = saved
        return fail(1, f"the audit table cannot be read (damaged store): {exc}")
    try:
        for row in _rows_or_damage(rows):
            if isinstance(row, sqlite3.DatabaseError):
                return fail(
                    count + 1,
                    f"the store is damaged from here on (SQLite: {row}); "
                    f"records after {count} cannot be read",
                )
            record, malformed = _row_to_record(row)
            expected = count + 1
            if record.seq > expected:
                missing = (
                    f"record {expected} missing"
                    if record.seq == expected + 1
                    else f"records {expected}-{record.seq - 1} missing"
                )
                return fail(expected, f"sequence gap: {missing} (next is {record.seq})")
            if record.seq < expected:
                return fail(record.seq, f"sequence number {record.seq}, expected {expected}")
            if record.prev_hash != prev_hash:
                if count == 0:
                    why = "prev_hash is not the genesis hash: earlier records deleted or reordered"
                else:
                    why = f"prev_hash does not match record {count}: deleted or reordered"
                return fail(record.seq, why)
            if malformed is not None:
                return fail(record.seq, f"hash mismatch: record edited ({malformed})")
            if record.computed_hash() != record.hash:
                return fail(record.seq, "hash mismatch: record edited")
            if witness is not None and record.seq == witness.count:
                if record.hash != witness.hash:
                    return fail(
                        record.seq,
                        f"hash differs from the witnessed head {witness}: "
                        "this record or earlier ones were rewritten",
                    )
                witnessed = True
            count = record.seq
            prev_hash = record.hash
    finally:
        rows.close()
        conn.text_factory = saved
    if witness is not None and not witnessed and witness.count > 0:
        return fail(
            count + 1,
            f"trail ends at record {count} but a witness recorded {witness.count} records: "
            "truncated",
        )
    return VerifyResult(ok=True, records=count, head=AuditHead(count, prev_hash))


def _lenient_text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


def _rows_or_damage(
    rows: sqlite3.Cursor,
) -> Generator[tuple[Any, ...] | sqlite3.DatabaseError, None, None]:
    """The cursor's rows; a read error ends them as one last item instead of raising."""
    while True:
        try:
            row = rows.fetchone()
        except sqlite3.DatabaseError as exc:
            yield exc
            return
        if row is None:
            return
        yield row


@dataclass(frozen=True, slots=True)
class StoreReport:
    """``devicegw audit verify``: the whole store, one line per finding."""

    audit: VerifyResult
    integrity: list[str]
    outbox: list[str]
    quarantined: list[str]

    @property
    def ok(self) -> bool:
        return self.audit.ok and not self.integrity and not self.outbox

    def lines(self) -> list[str]:
        out = [self.audit.summary()]  # first: the chain (what a witness records)
        out.append(
            "store integrity_check: OK"
            if not self.integrity
            else f"store integrity_check: FAILED: {'; '.join(self.integrity[:20])}"
        )
        if self.outbox:
            out += [f"outbox: FAILED: {p}" for p in self.outbox]
        else:
            out.append("outbox: OK (every row readable, every dose payload as its audit bound it)")
        out += [f"quarantined (not published): {q}" for q in self.quarantined]
        return out


def verify_store(store: Store, *, witness: AuditHead | None = None) -> StoreReport:
    """The full check: SQLite's integrity_check, the audit chain, the outbox against the chain."""
    from devicegw.storage.outbox import verify_outbox

    conn = store.conn
    try:
        quarantined = [
            f"outbox row {r[0]}: {r[1]}"
            for r in conn.execute(
                "SELECT id, quarantined FROM outbox WHERE quarantined IS NOT NULL ORDER BY id"
            )
        ]
    except sqlite3.DatabaseError:
        quarantined = []
    return StoreReport(
        audit=verify(store, witness=witness),
        integrity=store.quick_check(full=True),
        outbox=verify_outbox(conn),
        quarantined=quarantined,
    )


def summarize_body(record: AuditRecord, *, width: int = 100) -> str:
    """One line for a table: ``key=value`` pairs of the body, columns already shown left out."""
    shown = {"device_id", "subject_id", "session_no"}
    parts = []
    for key, value in record.body.items():
        if key in shown and value in (record.device_id, record.subject_id, record.session_no):
            continue
        text = value if isinstance(value, str) else canonical_json(value)
        parts.append(f"{key}={text}")
    # Bodies hold what devices sent (serials, firmware): shown as data, never as control codes.
    return printable(" ".join(parts), limit=width)


def parse_since(text: str) -> datetime:
    """An ISO 8601 time or date for ``--since``; naive means UTC."""
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--since: not an ISO 8601 time: {text!r}") from None
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def records_table(records: Iterable[AuditRecord], *, width: int = 160) -> RenderableType:
    """Records for ``devicegw audit show`` (full detail: ``--json``).

    A table on a console ``width`` of 120 columns or more; below that, each
    record is one header line with its details indented underneath, which
    stays readable on an 80-column terminal or in a piped file.
    """
    from rich import box
    from rich.console import Group
    from rich.padding import Padding
    from rich.table import Table
    from rich.text import Text

    def cells(r: AuditRecord) -> tuple[str, str, str, str, str, str]:
        t = r.time
        raw = (
            str(r.seq),
            r.utc if t is None else t.strftime("%Y-%m-%d %H:%M:%SZ"),
            r.kind,
            r.device_id or "",
            r.subject_id or "",
            "" if r.session_no is None else str(r.session_no),
        )
        seq, utc, kind, dev, subject, session = (printable(v, limit=80) for v in raw)
        return seq, utc, kind, dev, subject, session

    if width < 120:
        lines: list[RenderableType] = []
        for r in records:
            seq, utc, kind, dev, subject, session = cells(r)
            head = f"{seq:>5}  {utc}  {kind}"
            head += "".join(f"  {v}" for v in (dev, subject) if v)
            head += f"  #{session}" if session else ""
            lines.append(Text(head, style="bold"))
            details = Text(summarize_body(r, width=400), overflow="fold")
            lines.append(Padding(details, (0, 0, 0, 7)))
        return Group(*lines)

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for name in ("seq", "utc", "kind", "device", "subject", "session"):
        table.add_column(
            name, no_wrap=True, justify="right" if name in ("seq", "session") else "left"
        )
    table.add_column("details", overflow="fold", ratio=1)
    for r in records:
        # Text cells: rich never reads a stored string as markup.
        table.add_row(*(Text(c) for c in cells(r)), Text(summarize_body(r, width=400)))
    return table
