"""The gateway's one durable store: a SQLite file in the data directory.

WAL with ``synchronous=FULL`` for decided records (dose events, audit entries,
assignments): a transaction that returned is on disk, even if the gateway is
killed or the power fails the next instant. Records that the next moment
replaces anyway -- the open-session journal's 5 s snapshots, retained statuses,
an outbox row's "sent" mark -- commit with ``synchronous=NORMAL``
(``transaction(durable=False)``): in WAL mode that is still atomic and survives
``kill -9`` (the WAL is in the OS's cache), only a power cut can take the last
of them back, and the next FULL commit makes every earlier one durable too.
Each FULL commit waits for an fsync on the event loop; at 500 beds the
snapshots alone were 100 a second (issue 13).

A session's decided record (its dose event, audit entry and journal clear, in one
transaction) commits with ``transaction(sync_later=True)``: NORMAL at commit, then
the WAL is fsync'ed in a worker thread (:meth:`Store._sync_pending`) instead of on
the event loop, where 500 sessions ending together spent ~4-8 ms each waiting for
the disk (issue 13). Until that fsync returns the record is not *published*: the
outbox holds back every decided row from the first one not yet synced
(:meth:`Store.is_synced`), and the witness file is written only after
:meth:`Store.sync_now`. A power cut before the fsync takes the whole transaction
back (the session is still in its journal and in the device's log), and nothing
outside the gateway saw it.

SQLite copies the WAL back into the main file (a checkpoint: fsync the WAL, copy,
fsync the file) inside whichever commit crosses 1,000 pages. At 500 beds that was
every ~3 s, 10-80 ms each, on the event loop. The daemon runs
:meth:`Store.checkpoint_in_background` instead: a PASSIVE checkpoint every second
from a worker thread with a connection of its own (writers go on meanwhile), and
the loop's own automatic checkpoint only as a safety net at 4,000 pages (a burst
faster than the worker: 500 beds starting). Tools and tests that do not run it
keep SQLite's automatic checkpoints.

The outbox, the session journal and the audit trail keep their tables here, so
one file (and one backup) holds everything that makes a dose record.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

from devicegw.errors import GatewayError

log = logging.getLogger(__name__)


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class StoreError(GatewayError):
    """The durable store cannot be opened or written."""


def is_disk_full(exc: BaseException) -> bool:
    """Is this SQLite (or OS) error a full disk or quota (SQLITE_FULL, ENOSPC, EDQUOT)?"""
    while exc is not None:
        if isinstance(exc, sqlite3.Error):
            code = getattr(exc, "sqlite_errorcode", None)
            if code is not None and code & 0xFF == sqlite3.SQLITE_FULL:
                return True
            if "disk is full" in str(exc) or "disk I/O error" in str(exc):
                return True
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc = exc.__cause__  # type: ignore[assignment]
    return False


#: Free space the data directory must have at start: the WAL's working space (up to
#: SAFETY_NET_PAGES, ~16 MB, while the daemon runs; a checkpoint needs as much again in
#: the main file). README "Disk".
MIN_FREE_BYTES = 32 * 1024 * 1024
#: SQLite's own checkpoint threshold (pages), restored when the background one stops.
AUTOCHECKPOINT_PAGES = 1000
#: How often the daemon's worker thread checkpoints the WAL (Store.checkpoint_in_background).
CHECKPOINT_INTERVAL_S = 1.0
#: Meanwhile the loop's own checkpoint stays as a safety net, at this many pages (16 MB):
#: only a burst faster than the worker reaches it (500 beds starting: ~60 MB in ~5 s).
SAFETY_NET_PAGES = 4000
#: After a checkpoint the WAL file is cut back to this size (a burst left it large).
WAL_SIZE_LIMIT_BYTES = 16 * 1024 * 1024
#: Decided writes the disk refused, kept in memory at most (README "Disk").
HELD_LIMIT = 10_000


class HeldWrites:
    """Decided writes a full disk refused: kept in memory, in order, and retried.

    Issue 14 item 2: a full disk must not kill the gateway or lose a decided
    event. :meth:`run` tries a write (a callable doing one transaction); if the
    disk is full it is kept under its key (a later write under the same key
    replaces it: latest-wins statuses) and :meth:`retry` commits what it can,
    in order, once space returns. Bounded: beyond :data:`HELD_LIMIT` the oldest
    is dropped and counted (CRITICAL), which needs ~10,000 decided writes while
    the disk stays full.
    """

    def __init__(self, limit: int = HELD_LIMIT) -> None:
        self._writes: dict[str, Callable[[], object]] = {}
        self.limit = limit
        self.dropped = 0
        self.last_error: str | None = None
        self.full_since: datetime | None = None

    def __len__(self) -> int:
        return len(self._writes)

    def __contains__(self, key: object) -> bool:
        return key in self._writes

    def dose_events(self) -> int:
        """Held dose records (keyed by their ``event_id``; other writes by ``what:...``)."""
        return sum(1 for key in self._writes if ":" not in key)

    def run(self, key: str, write: Callable[[], object]) -> bool:
        """Write now (True) or, if the disk is full, hold it (False); other errors raise."""
        if self._writes:  # keep the order: nothing overtakes what is held
            self._hold(key, write, None)
            self.retry()
            return key not in self._writes
        try:
            write()
        except Exception as exc:
            if not is_disk_full(exc):
                raise
            self._hold(key, write, exc)
            return False
        return True

    def _hold(self, key: str, write: Callable[[], object], exc: BaseException | None) -> None:
        if exc is not None:
            self.last_error = str(exc)
            if self.full_since is None:
                self.full_since = datetime.now(UTC)
                log.error(
                    "the disk is full: decided writes are held in memory and retried (%s)", exc
                )
        self._writes.pop(key, None)
        self._writes[key] = write
        while len(self._writes) > self.limit:
            oldest = next(iter(self._writes))
            del self._writes[oldest]
            self.dropped += 1
            log.critical("held writes over %d: the oldest (%s) is dropped", self.limit, oldest)

    def retry(self) -> int:
        """Commit what is held, in order, until the disk refuses again; how many remain."""
        for key in list(self._writes):
            write = self._writes[key]
            try:
                write()
            except Exception as exc:
                if is_disk_full(exc):
                    self.last_error = str(exc)
                    return len(self._writes)
                log.exception("a held write failed for another reason; kept: %s", key)
                return len(self._writes)
            del self._writes[key]
        if self.full_since is not None:
            log.warning("disk space is back: every held write is committed")
        self.full_since = None
        self.last_error = None
        return 0


class Store:
    FILE_NAME = "devicegw.sqlite3"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.held = HeldWrites()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Autocommit mode: every statement outside an explicit BEGIN is its own transaction.
            self.conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=FULL")
            self._full_sync = True
            self._want_full = True
            self._deferring = False
            #: Top-level transactions so far; a transaction inside is number _gen + 1.
            self._gen = 0
            #: Every transaction up to this number is on disk (a FULL commit or an fsync).
            self.synced_gen = 0
            self._deferred_gen = 0  # the last sync_later transaction
            self._sync_task: asyncio.Task[None] | None = None
            self._sync_failing = False
            #: Called (on the event loop) when an fsync made more transactions durable.
            self.sync_listeners: list[Callable[[], None]] = []
            self.conn.execute("PRAGMA foreign_keys=ON")
            self.conn.execute("PRAGMA busy_timeout=5000")
            #: The background checkpointer's own connection (checkpoint_in_background).
            self._checkpointer: sqlite3.Connection | None = None
            self._checkpoint_lock = threading.Lock()
            self._checkpoint_failing = False
            self.checkpoints = 0
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the gateway store {self.path}: {exc}") from exc

    @classmethod
    def in_dir(cls, data_dir: str | Path) -> Store:
        return cls(Path(data_dir) / cls.FILE_NAME)

    def _sync_mode(self, full: bool) -> None:
        if full != self._full_sync:  # a PRAGMA is allowed only outside a transaction
            self.conn.execute("PRAGMA synchronous=FULL" if full else "PRAGMA synchronous=NORMAL")
            self._full_sync = full

    @property
    def transaction_gen(self) -> int:
        """The number the transaction in progress will have (see :meth:`is_synced`)."""
        return self._gen + 1

    @property
    def deferring(self) -> bool:
        """Inside a ``sync_later`` transaction: what it commits is not on disk at return."""
        return self.conn.in_transaction and self._deferring

    def is_synced(self, gen: int) -> bool:
        return gen <= self.synced_gen

    @contextlib.contextmanager
    def transaction(
        self, *, durable: bool = True, sync_later: bool = False
    ) -> Iterator[sqlite3.Connection]:
        """One atomic transaction, fsync'ed at commit unless ``durable`` is False (see the
        module's docstring). Nested calls join the outer one. Outside a non-durable
        transaction the connection is always FULL, so a statement in autocommit mode
        (audit, meta) is durable.

        ``sync_later``: durable, but fsync'ed by a worker thread after the commit
        (the module's docstring says who waits for it). Without a running event loop
        it is an ordinary durable transaction."""
        if self.conn.in_transaction:
            if durable and not self._deferring:
                self._want_full = True
            yield self.conn
            return
        deferring = sync_later and _loop_running()
        full = durable and not deferring
        self._deferring = deferring
        self._want_full = full
        self._sync_mode(full)
        committed = False
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
                self.conn.execute("COMMIT")
            except BaseException:
                # Also after a failed COMMIT (a full disk): SQLite may or may not have rolled
                # back by itself; either way nothing of this transaction is kept.
                if self.conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self.conn.execute("ROLLBACK")
                raise
            committed = True
            if self._want_full and not self._full_sync:
                # A bug: a durable write nested in a non-durable transaction. A checkpoint
                # syncs the WAL first, so the commit is made durable all the same.
                log.error("a durable write joined a non-durable transaction; syncing now")
                self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        finally:
            self._gen += 1
            self._deferring = False
            if committed and full:
                self.synced_gen = self._gen  # the fsync of a FULL commit covers the whole WAL
            elif deferring:
                # Rolled back too: the outbox may hold this number for a row that is gone.
                self._deferred_gen = self._gen
                self._request_sync()
            with contextlib.suppress(sqlite3.Error):
                self._sync_mode(True)

    # -- fsync off the event loop (sync_later) ------------------------------------------

    def _request_sync(self) -> None:
        loop = asyncio.get_running_loop()
        task = self._sync_task
        # A task of an earlier event loop (asyncio.run twice with one store) never runs.
        if task is None or task.done() or task.get_loop() is not loop:
            self._sync_task = loop.create_task(self._sync_pending(), name="store-sync")

    async def _sync_pending(self) -> None:
        while self.synced_gen < self._deferred_gen:
            target = self._gen
            try:
                await asyncio.to_thread(self._fsync_wal)
            except OSError as exc:
                if not self._sync_failing:
                    log.error(  # noqa: TRY400 - the error is the message
                        "cannot fsync the store's WAL: %s; decided records are held back "
                        "from the broker until it succeeds",
                        exc,
                    )
                self._sync_failing = True
                await asyncio.sleep(1.0)
                continue
            if self._sync_failing:
                log.warning("the store's WAL fsync succeeds again")
                self._sync_failing = False
            self.synced_gen = max(self.synced_gen, target)
            for listener in self.sync_listeners:
                listener()

    def _fsync_wal(self) -> None:
        try:
            fd = os.open(f"{self.path}-wal", os.O_RDONLY)
        except FileNotFoundError:
            return  # checkpointed into the main file (which a checkpoint syncs) and gone
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def sync_now(self) -> None:
        """Every committed transaction on disk now (blocking): before the witness, at close."""
        if self.synced_gen >= self._gen:
            return
        target = self._gen
        self._fsync_wal()
        self.synced_gen = max(self.synced_gen, target)

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        self._meta_table()
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        self._meta_table()
        self.conn.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?)"
            " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def _meta_table(self) -> None:
        self.conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")

    def quick_check(self, *, full: bool = False) -> list[str]:
        """SQLite's ``quick_check`` (or the full ``integrity_check``): the problems, [] if none.

        A damaged file that SQLite cannot even read is one problem, not an exception.
        """
        pragma = "integrity_check" if full else "quick_check"
        try:
            rows = self.conn.execute(f"PRAGMA {pragma}(100)").fetchall()
        except sqlite3.DatabaseError as exc:
            return [f"{pragma} could not read the file: {exc}"]
        problems = [str(r[0]) for r in rows]
        return [] if problems == ["ok"] else problems

    def repair_indexes(self) -> list[str]:
        """Rebuild every index from its table (a damaged index holds no data); problems left."""
        try:
            self.conn.execute("REINDEX")
        except sqlite3.DatabaseError as exc:
            return [f"REINDEX failed: {exc}"]
        return self.quick_check(full=True)

    def free_bytes(self) -> int:
        """Free space for this process in the store's directory."""
        st = os.statvfs(self.path.parent)
        return st.f_bavail * st.f_frsize

    def size_bytes(self) -> int:
        """Disk used by the store, WAL included."""
        total = 0
        for suffix in ("", "-wal", "-shm"):
            p = Path(str(self.path) + suffix)
            if p.exists():
                total += p.stat().st_size
        return total

    # -- checkpoints off the event loop -----------------------------------------------

    async def checkpoint_in_background(self, interval_s: float = CHECKPOINT_INTERVAL_S) -> None:
        """Checkpoint the WAL from a worker thread every ``interval_s`` until cancelled.

        Meanwhile the loop's connection checkpoints only past :data:`SAFETY_NET_PAGES`
        (a burst of writes faster than the worker), not at SQLite's 1,000; cancelled,
        at 1,000 again. A checkpoint that fails (a full disk) is said once and tried
        again next time.
        """
        self.conn.execute(f"PRAGMA wal_autocheckpoint={SAFETY_NET_PAGES}")
        self.conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT_BYTES}")
        try:
            while True:
                await asyncio.sleep(interval_s)
                await asyncio.to_thread(self._checkpoint)
        finally:
            with contextlib.suppress(sqlite3.Error):
                self.conn.execute(f"PRAGMA wal_autocheckpoint={AUTOCHECKPOINT_PAGES}")

    def _checkpoint(self) -> None:
        with self._checkpoint_lock:
            try:
                if self._checkpointer is None:
                    self._checkpointer = sqlite3.connect(
                        self.path, isolation_level=None, check_same_thread=False
                    )
                    # NORMAL: the WAL is fsync'ed before the copy and the file after it.
                    self._checkpointer.execute("PRAGMA synchronous=NORMAL")
                self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            except sqlite3.Error as exc:
                if not self._checkpoint_failing:
                    log.error("cannot checkpoint the store's WAL: %s; trying again", exc)  # noqa: TRY400
                self._checkpoint_failing = True
                return
            if self._checkpoint_failing:
                log.warning("the store's WAL checkpoints succeed again")
                self._checkpoint_failing = False
            self.checkpoints += 1

    def close(self) -> None:
        try:
            if self._deferred_gen > self.synced_gen:
                self.sync_now()
        except OSError as exc:
            log.error("cannot fsync the store's WAL at close: %s", exc)  # noqa: TRY400
        finally:
            if self._sync_task is not None:
                self._sync_task.cancel()
            with self._checkpoint_lock:  # a checkpoint still running in its thread ends first
                if self._checkpointer is not None:
                    self._checkpointer.close()
                    self._checkpointer = None
            self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
