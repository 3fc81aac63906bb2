"""HeldWrites (issue 14 item 2): order kept, latest-wins by key, bounded, retried.

The disk's refusal is SQLite's own error text here (``database or disk is full``);
the real full disk is tests/test_full_disk.py.
"""

from __future__ import annotations

import sqlite3

import pytest

from devicegw.storage.store import HeldWrites, is_disk_full


class Disk:
    def __init__(self) -> None:
        self.full = True
        self.written: list[str] = []

    def write(self, what: str) -> object:
        def do() -> None:
            if self.full:
                raise sqlite3.OperationalError("database or disk is full")
            self.written.append(what)

        return do


def test_held_in_order_latest_wins_and_retried() -> None:
    disk, held = Disk(), HeldWrites()
    assert not held.run("e1", disk.write("e1"))
    assert not held.run("status:a", disk.write("a1"))
    assert not held.run("e2", disk.write("e2"))
    assert not held.run("status:a", disk.write("a2"))  # replaces a1, goes last
    assert len(held) == 3 and held.dose_events() == 2 and held.full_since is not None
    assert held.retry() == 3
    disk.full = False
    assert held.retry() == 0
    assert disk.written == ["e1", "e2", "a2"]
    assert held.full_since is None
    assert held.run("e3", disk.write("e3"))
    assert disk.written[-1] == "e3"


def test_bounded_oldest_dropped_and_counted() -> None:
    disk, held = Disk(), HeldWrites(limit=3)
    for i in range(5):
        held.run(f"e{i}", disk.write(f"e{i}"))
    assert len(held) == 3 and held.dropped == 2


def test_other_errors_are_not_held() -> None:
    held = HeldWrites()

    def broken() -> None:
        raise sqlite3.IntegrityError("UNIQUE constraint failed")

    with pytest.raises(sqlite3.IntegrityError):
        held.run("x", broken)
    assert len(held) == 0
    assert is_disk_full(OSError(28, "No space left on device"))
    assert not is_disk_full(ValueError("full"))
