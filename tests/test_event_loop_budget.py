"""What keeps the one event loop free at scale (issue 13), each part on its own.

``benchmarks/scale.py`` measures the whole; these tests pin the behaviour the
figures depend on: which commits wait for an fsync (and that a finished session's,
fsync'ed off the loop, is published only after it), that decided records are
published before retained statuses, that the loop's lateness is measured and a
stall is logged once, that the daemon's start-up objects are frozen for the
garbage collector, and that no systemd task runs outside systemd.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import logging
import sqlite3
import weakref
from datetime import UTC, datetime
from pathlib import Path

import pytest

from devicegw.runtime import gc_policy, health, loop_lag
from devicegw.runtime.systemd_notify import Notifier
from devicegw.storage.outbox import Outbox
from devicegw.storage.store import Store
from drivers.clock import ManualClock

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def synchronous(store: Store) -> int:
    return int(store.conn.execute("PRAGMA synchronous").fetchone()[0])


FULL, NORMAL = 2, 1


def test_only_decided_records_wait_for_an_fsync(tmp_path: Path) -> None:
    store = Store(tmp_path / "gw.sqlite3")
    try:
        store.conn.execute("CREATE TABLE t (v INTEGER)")
        assert synchronous(store) == FULL
        with store.transaction(durable=False) as db:
            assert synchronous(store) == NORMAL
            db.execute("INSERT INTO t VALUES (1)")
        # Outside a non-durable transaction the connection is FULL again, so a statement
        # in autocommit mode (audit, meta) is durable.
        assert synchronous(store) == FULL
        with store.transaction() as db:
            assert synchronous(store) == FULL
            db.execute("INSERT INTO t VALUES (2)")
        with pytest.raises(RuntimeError), store.transaction(durable=False) as db:
            db.execute("INSERT INTO t VALUES (3)")
            raise RuntimeError("rolled back")
        assert synchronous(store) == FULL
        assert [r[0] for r in store.conn.execute("SELECT v FROM t ORDER BY v")] == [1, 2]
    finally:
        store.close()


def test_a_durable_write_nested_in_a_non_durable_one_is_still_committed_and_said(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = Store(tmp_path / "gw.sqlite3")
    try:
        store.conn.execute("CREATE TABLE t (v INTEGER)")
        with caplog.at_level(logging.ERROR), store.transaction(durable=False) as db:
            db.execute("INSERT INTO t VALUES (1)")
            with store.transaction() as inner:  # a bug in the caller: said, not fatal
                inner.execute("INSERT INTO t VALUES (2)")
        assert "durable write joined a non-durable transaction" in caplog.text
        assert store.conn.execute("SELECT COUNT(*) FROM t").fetchone()[0] == 2
        assert synchronous(store) == FULL
    finally:
        store.close()


def test_statuses_commit_without_an_fsync_and_wait_behind_decided_records(
    tmp_path: Path,
) -> None:
    ob = Outbox(Store(tmp_path / "gw.sqlite3"))
    try:
        ob.add("status", "s/dev1", b'{"v":1}', qos=1, retain=True, now=NOW)
        ob.add("dose", "d/dev1", b"{}", qos=1, retain=False, now=NOW, event_id="e1")
        ob.add("status", "device-detail/dev1", b"{}", qos=1, retain=True, now=NOW)
        ob.add("safety", "a/dev1", b"{}", qos=1, retain=False, now=NOW)
        everything = [r.kind for r in ob.pending()]
        assert everything == ["status", "dose", "status", "safety"]  # id order
        decided = ob.pending(latest_wins=False)
        assert [r.kind for r in decided] == ["dose", "safety"]
        statuses = ob.pending(latest_wins=True)
        assert [r.topic for r in statuses] == ["s/dev1", "device-detail/dev1"]
        # The cursor of each kind of row is its own.
        assert [r.kind for r in ob.pending(after_id=decided[0].id, latest_wins=False)] == ["safety"]
        ob.mark_attempts([r.id for r in decided])
        ob.mark_all_sent_or_hold([(decided[0], NOW), (statuses[0], NOW)])
        assert [r.topic for r in ob.pending()] == ["device-detail/dev1", "a/dev1"]
        assert [r.attempts for r in ob.pending(latest_wins=False)] == [1]
    finally:
        ob.store.close()


def test_the_loop_lag_is_counted_and_a_stall_logged_once_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen: list[float] = []
    lag = loop_lag.LoopLag(observers=[seen.append])
    with caplog.at_level(logging.WARNING, logger="devicegw.runtime.loop_lag"):
        lag.observe(0.001, 0.0)
        lag.observe(0.08, 0.1)
        lag.observe(1.5, 0.2)  # a stall: logged
        lag.observe(2.5, 10.0)  # within the minute: counted, not logged
        lag.observe(0.0, 70.0)  # a minute on: the one pending stall is summarised
        lag.observe(0.0, 80.0)
    assert (lag.samples, lag.over_50ms, lag.stalls, lag.max_s) == (6, 3, 2, 2.5)
    assert seen == [0.001, 0.08, 1.5, 2.5, 0.0, 0.0]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert "stalled 1 time(s) (the longest 1.5 s)" in lines[0]
    assert "stalled 1 time(s) (the longest 2.5 s)" in lines[1]


async def test_the_sampler_measures_a_blocked_loop() -> None:
    import asyncio
    import time

    lag = loop_lag.LoopLag()
    task = asyncio.create_task(loop_lag.run(lag, interval_s=0.01))
    await asyncio.sleep(0.05)
    time.sleep(0.2)  # noqa: ASYNC251 - the loop is blocked on purpose: the sampler wakes late
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert lag.samples >= 2
    assert lag.max_s >= 0.15


def test_startup_objects_are_frozen_for_the_collector() -> None:
    try:
        frozen = gc_policy.freeze_startup_objects()
        assert frozen > 1000 and gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()


class _Node:
    """A reference cycle's member (a device's task and its callbacks, say)."""

    def __init__(self) -> None:
        self.other: _Node | None = None


def test_refreeze_hides_the_devices_state_and_a_full_one_frees_frozen_cycles() -> None:
    try:
        gc_policy.freeze_startup_objects()
        a, b = _Node(), _Node()
        a.other, b.other = b, a  # made once the loop runs: not frozen at start
        assert gc.is_tracked(a) and gc.get_freeze_count() > 0
        before = gc.get_freeze_count()
        frozen, _ = gc_policy.refreeze(full=False)
        assert frozen > before  # the cycle (and whatever else was young) is frozen now
        ref = weakref.ref(a)
        del a, b  # garbage now, but frozen: an ordinary collection does not see it
        gc.collect()
        assert ref() is not None
        gc_policy.refreeze(full=True)  # the periodic full pass frees it
        assert ref() is None
        assert gc.get_freeze_count() > 0  # and what lives on is frozen again
    finally:
        gc.unfreeze()


async def test_keep_frozen_waits_for_the_devices_then_refreezes_fully_every_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[bool] = []
    monkeypatch.setattr(
        gc_policy, "refreeze", lambda *, full: calls.append(full) or (len(calls), 0.0)
    )
    clock = ManualClock()
    task = asyncio.create_task(gc_policy.keep_frozen(clock, settle_s=30, interval_s=600))
    await asyncio.sleep(0)  # asleep from t=0
    for at, expected in ((29, []), (30, [False]), (629, [False]), (630, [False, True])):
        clock.set(at)
        for _ in range(5):
            await asyncio.sleep(0)
        assert calls == expected, at
    clock.set(1230)
    for _ in range(5):
        await asyncio.sleep(0)
    try:
        assert calls == [False, True, True]
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def test_no_systemd_task_outside_systemd(tmp_path: Path) -> None:
    """Without NOTIFY_SOCKET the task returned at once and the supervisor logged it as a
    failure every ~1.5 s, for ever."""
    from devicegw.runtime.gateway import Gateway
    from drivers.clock import ManualClock
    from tests.session_stream import one_device_config

    config = one_device_config()
    config = config.model_copy(
        update={"gateway": config.gateway.model_copy(update={"data_dir": str(tmp_path)})}
    )
    for env, expected in (({}, False), ({"NOTIFY_SOCKET": "/run/systemd/notify"}, True)):
        gw = Gateway(config, clock=ManualClock(), notifier=Notifier.from_environment(env))
        try:
            names = [r.task_name for r in gw.supervised_runners()]
            assert ("systemd-notify" in names) is expected
            assert "loop-lag" in names
        finally:
            gw.close()


def _status_snapshot(devices: int = 2) -> health.GatewaySnapshot:
    dev = health.DeviceSnapshot(
        identity=health.DeviceIdentity("VM-1", 'VM1-"7"\n', "1.2"),
        port="/dev/ttyUSB0",
        connected=True,
        connects=1,
        open_failures=0,
        refusals=0,
        last_frame_age_s=0.1,
        frames_ok=100,
        frames_bad=0,
        frames_lost=0,
        refused=None,
        last_error="ü",
        identified=True,
        identity_note=None,
        held_before_ident=0,
        dropped_before_ident=0,
        idents_ignored=0,
        open_session=3,
    )
    ox = health.OximeterSnapshot("/dev/x", "B1", True, 0.2, 5, 0, 0, None)
    return health.GatewaySnapshot(
        gateway_id="g",
        site="s",
        utc=NOW.isoformat(),
        pid=1,
        broker={"host": "127.0.0.1", "nested": [1, {"a": (2, 3)}]},
        outbox_depth=0,
        store_bytes=0,
        store=health.StoreSnapshot(0, 0, 0, None, None, 0),
        descriptors_in_use=None,
        descriptors_limit=2,
        devices={
            f"d{i}": dev if i % 2 else dataclasses.replace(dev, identity=None, frames_ok=i)
            for i in range(devices)
        },
        oximeters={f"o{i}": dataclasses.replace(ox, samples=i) for i in range(devices // 2)},
        task_restarts={"x": 1},
        task_errors={},
        loop_lag=health.LoopLagSnapshot(1, 0.0, 0, 0),
    )


def test_the_status_snapshot_serialises_as_asdict_would() -> None:
    """health._plain replaced dataclasses.asdict (its deep copy cost the loop ~20 ms a round)."""
    snap = _status_snapshot()
    assert snap.to_json() == json.loads(json.dumps(dataclasses.asdict(snap)))
    assert json.dumps(snap.to_json()) == json.dumps(dataclasses.asdict(snap))


@pytest.mark.parametrize("devices", [0, 1, 2, health.SLICE, 2 * health.SLICE + 37])
async def test_the_status_file_is_encoded_in_slices_the_loop_runs_between(
    devices: int, tmp_path: Path
) -> None:
    """At 1,000 devices one snapshot built and encoded whole stopped the loop ~20 ms every
    2 s (issue 13): now a slice of devices per turn, and the same JSON object."""
    snap = _status_snapshot(devices)
    turns = 0
    done = False

    async def count_turns() -> None:
        nonlocal turns
        while not done:
            turns += 1
            await asyncio.sleep(0)

    counter = asyncio.create_task(count_turns())
    await asyncio.sleep(0)
    before = turns
    text = await health.encode_in_slices(snap)
    done = True
    await counter
    assert json.loads(text) == json.loads(json.dumps(dataclasses.asdict(snap)))
    slices = -(-devices // health.SLICE) + -(-(devices // 2) // health.SLICE)
    assert turns - before >= slices
    health.write_text(text, tmp_path)
    health.write(snap, tmp_path / "whole")
    assert health.read(tmp_path)[0] == health.read(tmp_path / "whole")[0]


# -- a finished session's fsync off the loop (Store.transaction(sync_later=True)) --------


async def _until_synced(store: Store) -> None:
    for _ in range(500):
        if store.synced_gen >= store.transaction_gen - 1:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the store's background fsync never completed")


async def test_a_finished_session_is_fsynced_off_the_loop_and_published_only_after(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path / "gw.sqlite3")
    ob = Outbox(store)
    woken: list[int] = []
    store.sync_listeners.append(lambda: woken.append(store.synced_gen))
    try:
        with store.transaction(sync_later=True):
            assert synchronous(store) == NORMAL  # no fsync at this commit
            assert store.deferring
            ob.add("dose", "d/dev1", b"{}", qos=1, retain=False, now=NOW, event_id="e1")
            ob.add("safety", "a/dev1", b"{}", qos=1, retain=False, now=NOW)
        assert synchronous(store) == FULL  # and back to FULL for everything else
        # A status committed after it is not held back; the decided rows are, until the
        # fsync (nothing has yielded to the loop yet, so it cannot have run).
        ob.add("status", "s/dev1", b"{}", qos=1, retain=True, now=NOW)
        assert ob.pending(latest_wins=False) == []
        assert ob.pending() == []  # in id order, nothing overtakes the held rows
        assert [r.topic for r in ob.pending(latest_wins=True)] == ["s/dev1"]
        await _until_synced(store)
        assert [r.kind for r in ob.pending(latest_wins=False)] == ["dose", "safety"]
        assert woken, "the publisher is told when more rows became publishable"
    finally:
        store.close()


async def test_safety_messages_share_a_background_fsync_and_wait_for_it(tmp_path: Path) -> None:
    """Fifty beds desaturating at once: fifty fsyncs on the event loop, one after the
    other, were the safety alerts' own p99 at 500 beds (issue 13)."""
    from pydantic import BaseModel

    from devicegw.config import BrokerSettings
    from devicegw.mqtt.publisher import MqttPublisher
    from drivers.clock import SystemClock

    class Alert(BaseModel):  # the payload's shape does not matter to the outbox
        bed: str

    store = Store(tmp_path / "gw.sqlite3")
    pub = MqttPublisher(
        BrokerSettings(),
        client_id="t",
        clock=SystemClock(),
        store=store,
        status_topic="s",
        status_payload=lambda online: b"{}",
    )
    try:
        before = store.synced_gen
        for bed in range(50):
            pub.publish_event(f"a/bed{bed}", Alert(bed=f"B{bed}"), device_id=f"ox-{bed}")
        assert synchronous(store) == FULL  # each commit was NORMAL; FULL again after
        assert store.synced_gen == before  # not one fsync yet: nothing yielded to the loop
        assert pub.outbox.pending(latest_wins=False) == []  # and nothing publishable
        await _until_synced(store)
        assert len(pub.outbox.pending(latest_wins=False, limit=100)) == 50
    finally:
        store.close()


async def test_per_session_audit_records_are_fsynced_off_the_loop(tmp_path: Path) -> None:
    """A ward starting its doses: each session_started (and device_identified) record was
    a FULL commit, an fsync on the event loop, per bed (issue 13). With sync_later the
    records are in the chain at once and on disk after the store's worker fsyncs."""
    from devicegw.core.ports import AuditKind
    from devicegw.storage.audit import AuditTrail, verify

    store = Store(tmp_path / "gw.sqlite3")
    try:
        trail = AuditTrail(store, clock=ManualClock(NOW), gateway_id="gw-t")
        await _until_synced(store)
        before = store.synced_gen
        for bed in range(20):
            trail.append(
                AuditKind.session_started,
                device_id=f"neb-{bed}",
                session_no=1,
                body={"kit_number": None},
                sync_later=True,
            )
        assert synchronous(store) == FULL  # each commit was NORMAL; FULL again after
        assert store.synced_gen == before  # not one fsync yet: nothing yielded to the loop
        result = verify(store)
        assert result.ok and result.records >= 20  # chained, readable at once
        await _until_synced(store)
        assert store.synced_gen > before
        trail.append(AuditKind.session_started, device_id="neb-x", session_no=2, body={})
        assert store.synced_gen == store.transaction_gen - 1  # the default: durable on return
        assert verify(store).ok
    finally:
        store.close()


def test_without_an_event_loop_sync_later_is_an_ordinary_durable_commit(tmp_path: Path) -> None:
    store = Store(tmp_path / "gw.sqlite3")
    ob = Outbox(store)
    try:
        with store.transaction(sync_later=True):
            assert synchronous(store) == FULL
            ob.add("dose", "d/dev1", b"{}", qos=1, retain=False, now=NOW, event_id="e1")
        assert [r.kind for r in ob.pending()] == ["dose"]
    finally:
        store.close()


async def test_a_failing_fsync_holds_decided_rows_back_until_it_succeeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Mocked: a disk whose fsync fails cannot be made here; the failure is injected.
    store = Store(tmp_path / "gw.sqlite3")
    ob = Outbox(store)
    real = store._fsync_wal
    failures = [OSError(5, "Input/output error")] * 2

    def flaky() -> None:
        if failures:
            raise failures.pop()
        real()

    monkeypatch.setattr(store, "_fsync_wal", flaky)
    try:
        with store.transaction(sync_later=True):
            ob.add("dose", "d/dev1", b"{}", qos=1, retain=False, now=NOW, event_id="e1")
        await asyncio.sleep(0.2)
        assert failures and ob.pending() == []
        assert "cannot fsync the store's WAL" in caplog.text
        await _until_synced(store)  # retried once a second
        assert [r.kind for r in ob.pending()] == ["dose"]
        assert caplog.text.count("cannot fsync the store's WAL") == 1  # said once
    finally:
        store.close()


async def test_a_rolled_back_session_commit_does_not_hold_the_outbox_for_ever(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path / "gw.sqlite3")
    ob = Outbox(store)
    try:
        with pytest.raises(RuntimeError), store.transaction(sync_later=True):
            ob.add("dose", "d/dev1", b"{}", qos=1, retain=False, now=NOW, event_id="e1")
            raise RuntimeError("the session's audit record failed")
        ob.add("dose", "d/dev2", b"{}", qos=1, retain=False, now=NOW, event_id="e2")
        await _until_synced(store)
        assert [r.topic for r in ob.pending()] == ["d/dev2"]
    finally:
        store.close()


async def test_closing_the_store_syncs_what_is_not_yet_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(tmp_path / "gw.sqlite3")
    ob = Outbox(store)
    synced: list[bool] = []
    real = store._fsync_wal
    monkeypatch.setattr(store, "_fsync_wal", lambda: (synced.append(True), real())[1])
    with store.transaction(sync_later=True):
        ob.add("dose", "d/dev1", b"{}", qos=1, retain=False, now=NOW, event_id="e1")
    store.close()  # before the loop ran the background fsync
    assert synced
    await asyncio.sleep(0)


# -- WAL checkpoints off the loop (Store.checkpoint_in_background) --------------------


async def test_the_wal_is_checkpointed_by_a_worker_not_by_the_loops_commits(
    tmp_path: Path,
) -> None:
    """SQLite checkpointed inside the commit that crossed 1,000 WAL pages: an fsync of
    the WAL, the copy and an fsync of the file, every ~3 s at 500 beds, on the loop."""
    store = Store(tmp_path / "gw.sqlite3")
    try:
        assert store.conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 1000
        store.conn.execute("CREATE TABLE t (v BLOB)")
        main_file = tmp_path / "gw.sqlite3"
        before = main_file.stat().st_size
        task = asyncio.create_task(store.checkpoint_in_background(interval_s=0.01))
        await asyncio.sleep(0)
        try:
            # The loop's own checkpoint only as a safety net, far above SQLite's 1,000.
            assert store.conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 4000
            for i in range(40):  # ~2,500 pages: twice past SQLite's threshold, not the net
                with store.transaction(durable=False) as db:
                    db.execute("INSERT INTO t VALUES (?)", (bytes([i]) * 250_000,))
            for _ in range(500):
                if store.checkpoints >= 2 and main_file.stat().st_size > before + 9_000_000:
                    break
                await asyncio.sleep(0.01)
            assert store.checkpoints >= 2
            assert main_file.stat().st_size > before + 9_000_000  # copied into the file
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        assert store.conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 1000
        assert store.conn.execute("SELECT COUNT(*), SUM(LENGTH(v)) FROM t").fetchone() == (
            40,
            40 * 250_000,
        )
    finally:
        store.close()
    reopened = Store(tmp_path / "gw.sqlite3")
    try:
        assert reopened.conn.execute("SELECT COUNT(*) FROM t").fetchone()[0] == 40
    finally:
        reopened.close()


async def test_a_failing_checkpoint_is_said_once_and_tried_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Mocked: a disk that refuses a checkpoint cannot be made here (root ignores modes);
    # the checkpointer's connection is swapped for one that raises as SQLite would.
    store = Store(tmp_path / "gw.sqlite3")

    class Refusing:
        calls = 0

        def execute(self, sql: str) -> object:
            Refusing.calls += 1
            if Refusing.calls <= 3:
                raise sqlite3.OperationalError("database or disk is full")
            return store.conn.execute("SELECT 1")

        def close(self) -> None:
            pass

    store._checkpointer = Refusing()  # type: ignore[assignment]
    try:
        with caplog.at_level(logging.WARNING, logger="devicegw.storage.store"):
            for _ in range(5):
                store._checkpoint()
        said = [r.getMessage() for r in caplog.records]
        assert sum("cannot checkpoint" in m for m in said) == 1
        assert sum("succeed again" in m for m in said) == 1
        assert store.checkpoints == 2
    finally:
        store.close()


async def test_the_gateway_snapshot_in_slices_is_the_whole_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from devicegw.runtime.gateway import Gateway
    from tests.session_stream import one_device_config

    config = one_device_config()
    config = config.model_copy(
        update={"gateway": config.gateway.model_copy(update={"data_dir": str(tmp_path)})}
    )
    monkeypatch.setattr(health, "SLICE", 1)
    gw = Gateway(config, clock=ManualClock(), notifier=Notifier.from_environment({}))
    try:
        assert gw.runners
        assert await gw.snapshot_in_slices() == gw.snapshot()
    finally:
        gw.close()
