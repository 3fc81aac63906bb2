"""The store's witness: a small file beside it that says a store existed, and its last head.

Issue 14 item 3: a store deleted while the gateway was stopped used to be
replaced silently by an empty one (unsent events lost, ``audit verify`` OK).
``devicegw.witness.json`` lives next to ``devicegw.sqlite3`` and records that a
store exists and the audit head (``N:HASH``) the gateway last saw in it. At
start (:func:`open_checked`):

- a witness without its store is refused with a clear message, unless the
  operator confirms a new store (``devicegw run --new-store``), which is then
  audited (``store_created``, with the witness it replaces);
- a store that does not hold the witnessed record ``N`` with that hash (an
  older copy, another gateway's store, a rewritten trail) is refused the same
  way;
- SQLite's ``quick_check`` runs; a damage is reported loudly (CRITICAL) and
  audited (``store_check``); ``REINDEX`` is tried (it repairs an index whose
  entries are wrong, not a page SQLite cannot parse), and the gateway runs
  on: rows it cannot read are quarantined one by one
  (:class:`devicegw.storage.outbox.Outbox`), the rest are published.
  ``devicegw audit verify`` reports the damage until the store is restored.

The witness is rewritten at start, every minute and at stop; it can lag the
store (never lead it), which the check allows.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from devicegw.storage.store import MIN_FREE_BYTES, Store, StoreError

log = logging.getLogger(__name__)

FILE_NAME = "devicegw.witness.json"


class StoreRefusedError(StoreError):
    """The store is missing or is not the one this gateway last wrote."""


@dataclass(slots=True)
class StoreOpening:
    """What :func:`open_checked` found, for the audit trail and the status."""

    store: Store
    created: bool = False
    replaced_witness: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)
    repaired: bool = False


def witness_path(data_dir: str | Path) -> Path:
    return Path(data_dir) / FILE_NAME


def read_witness(data_dir: str | Path) -> dict[str, Any] | None:
    path = witness_path(data_dir)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        # A damaged witness still says that a store existed.
        return {"damaged": str(exc)}
    return value if isinstance(value, dict) else {"damaged": "not a JSON object"}


def write_witness(data_dir: str | Path, head: str, *, now: datetime | None = None) -> bool:
    """Record the store's audit head ``N:HASH``; False (logged) if the disk refuses."""
    path = witness_path(data_dir)
    body = {
        "store": Store.FILE_NAME,
        "audit_head": head,
        "updated_utc": (now or datetime.now(UTC)).isoformat(),
        "note": "written by devicegw; a missing store next to this file is refused at start",
    }
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        log.error("cannot write the store witness %s: %s", path, exc)  # noqa: TRY400
        return False
    return True


def _witnessed_head(witness: dict[str, Any]) -> tuple[int, str] | None:
    text = witness.get("audit_head")
    if not isinstance(text, str):
        return None
    count, _, digest = text.partition(":")
    if not count.isdigit() or len(digest) != 64:
        return None
    return int(count), digest


def _store_holds(store: Store, count: int, digest: str) -> str | None:
    """Why the store does not hold record ``count`` with ``digest`` (None: it does)."""
    if count == 0:
        return None
    try:
        row = store.conn.execute("SELECT hash FROM audit WHERE seq = ?", (count,)).fetchone()
    except sqlite3.DatabaseError as exc:
        return f"its audit trail cannot be read ({exc})"
    if row is None:
        return f"its audit trail has no record {count}, which the witness recorded"
    if str(row[0]) != digest:
        return f"its audit record {count} differs from the witnessed one"
    return None


def _check_free_space(data_dir: Path, min_free_bytes: int) -> None:
    probe = data_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        st = os.statvfs(probe)
    except OSError:
        return  # the store's own open reports what is wrong
    free = st.f_bavail * st.f_frsize
    if free < min_free_bytes:
        raise StoreError(
            f"only {free / 2**20:.1f} MB free for the gateway store in {data_dir}; it needs at "
            f"least {min_free_bytes / 2**20:.0f} MB (SQLite's WAL working space and headroom, "
            "README 'Disk'): free some space"
        )


def open_checked(
    data_dir: str | Path, *, new_store: bool = False, min_free_bytes: int = MIN_FREE_BYTES
) -> StoreOpening:
    """Open the gateway's store after checking it against its witness and with quick_check."""
    data_dir = Path(data_dir)
    path = data_dir / Store.FILE_NAME
    witness = read_witness(data_dir)
    confirm = "start with `devicegw run --new-store` to confirm a new store (it is audited)"
    if witness is not None and not path.exists():
        if not new_store:
            raise StoreRefusedError(
                f"the gateway store {path} is missing, but {witness_path(data_dir)} says one "
                f"existed (audit head {witness.get('audit_head', '?')}); unsent dose events may "
                f"be lost. Restore it from a backup, or {confirm}"
            )
        _check_free_space(data_dir, min_free_bytes)
        log.warning("a new, empty gateway store replaces the missing %s (--new-store)", path)
        return StoreOpening(store=Store(path), created=True, replaced_witness=witness)
    created = not path.exists()
    _check_free_space(data_dir, min_free_bytes)
    store = Store(path)
    opening = StoreOpening(store=store, created=created)
    head = None if witness is None else _witnessed_head(witness)
    if head is not None:
        why = _store_holds(store, *head)
        if why is not None:
            if not new_store:
                store.close()
                raise StoreRefusedError(
                    f"the gateway store {path} is not the one this gateway last wrote: {why} "
                    f"(witness {witness_path(data_dir)}). Restore the right file, or {confirm}"
                )
            log.warning("the store %s replaces the witnessed one (--new-store): %s", path, why)
            opening.replaced_witness = witness
    problems = store.quick_check()
    if problems:
        log.error("the gateway store %s is damaged: %s", path, "; ".join(problems[:5]))
        opening.problems = problems
        remaining = store.repair_indexes()
        opening.repaired = not remaining
        if remaining:
            log.critical(
                "the gateway store %s is still damaged after rebuilding its indexes; running on, "
                "rows that cannot be read are quarantined: %s",
                path,
                "; ".join(remaining[:5]),
            )
        else:
            log.warning("the damaged indexes of %s were rebuilt; the store checks OK", path)
    return opening
