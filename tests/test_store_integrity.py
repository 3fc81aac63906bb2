"""Issue 14 item 3: a damaged store is not trusted, and one bad row does not block the rest.

Each failure from the issue, reproduced on a real SQLite file:

- the store deleted while the gateway was stopped: refused at start, as a process (exit
  status and one clear line), unless ``run --new-store`` confirms it (audited);
- 200 random bytes in an outbox page: that row is quarantined and reported, the others
  are published to a real Mosquitto;
- a damaged index page: found by quick_check at start, rebuilt, audited;
- a damaged audit page: ``audit verify`` names the record instead of raising;
- one byte changed in an unsent event's payload: refused by the publisher (never
  published) and named by ``audit verify``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from devicegw.config import BrokerSettings
from devicegw.contract.payloads import DoseRecord
from devicegw.contract.vocabulary import TopicKind
from devicegw.core.ports import AuditKind
from devicegw.mqtt.publisher import MqttPublisher, encode
from devicegw.storage.audit import AuditTrail, iter_records, verify, verify_store
from devicegw.storage.outbox import Outbox
from devicegw.storage.store import Store
from devicegw.storage.witness import StoreRefusedError, open_checked, write_witness
from drivers.clock import ManualClock, SystemClock
from tests.mqtt_helpers import MosquittoBroker, collecting
from tests.session_stream import T0
from tests.test_contract import real_dose_record

ROOT = Path(__file__).resolve().parents[1]
TOPIC = "devicegw/v2/s1/gw1"


def records(n: int) -> list[DoseRecord]:
    base = real_dose_record()
    out = []
    for i in range(n):
        event_id = uuid.UUID(int=1000 + i)
        event = base.event.model_copy(update={"event_id": event_id, "session_no": 40 + i})
        detail = base.detail.model_copy(update={"event_id": event_id})
        out.append(DoseRecord(event=event, detail=detail))
    return out


def fill(data_dir: Path, n: int = 3) -> list[DoseRecord]:
    """n unsent dose events (and details) with their audit records, as the gateway commits them."""
    made = records(n)
    opening = open_checked(data_dir)
    with opening.store as store:
        outbox = Outbox(store)
        trail = AuditTrail(store, clock=ManualClock(T0), gateway_id="gw1")
        trail.append(AuditKind.gateway_start, body={"version": "test"})
        for rec in made:
            with store.transaction():
                outbox.add(
                    TopicKind.DOSE,
                    f"{TOPIC}/dose/neb-bed01",
                    encode(rec.event),
                    qos=1,
                    retain=False,
                    now=T0,
                    device_id="neb-bed01",
                    event_id=str(rec.event.event_id),
                    detail=(f"{TOPIC}/dose-detail/neb-bed01", encode(rec.detail)),
                )
                trail.record_session_finished(rec)
        write_witness(data_dir, str(trail.head()))
    return made


def overwrite(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(data)


def page_of(path: Path, name: str) -> tuple[int, int]:
    """(offset, page size) of the root page of table or index ``name``."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        size = conn.execute("PRAGMA page_size").fetchone()[0]
        root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (name,)).fetchone()
    return (root[0] - 1) * size, size


def settings(broker: MosquittoBroker) -> BrokerSettings:
    return BrokerSettings(port=broker.port, reconnect_initial_s=0.1, reconnect_max_s=0.5)


async def publish_from(
    store: Store, broker: MosquittoBroker, *, want: int
) -> list[dict[str, object]]:
    """Run a publisher on ``store`` until ``want`` dose events arrived (or 30 s); their payloads."""
    async with collecting(broker.host, broker.port, [f"{TOPIC}/dose/#"]) as col:
        pub = MqttPublisher(
            settings(broker),
            client_id="integrity-test",
            clock=SystemClock(),
            store=store,
            status_topic=f"{TOPIC}/status",
            status_payload=lambda online: json.dumps(
                {"event_type": "gateway_status", "online": online}
            ).encode(),
        )
        task = asyncio.create_task(pub.run())
        try:
            with contextlib.suppress(TimeoutError):
                await col.wait_for(lambda m: len(m) >= want, 30)
            await asyncio.sleep(0.5)  # anything more would arrive now
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        return [m.json() for m in col.messages]


# -- the store deleted while stopped ----------------------------------------------------------


def write_config(tmp_path: Path, data_dir: Path) -> Path:
    cfg = tmp_path / "gw.toml"
    cfg.write_text(
        f'[gateway]\nid = "gw1"\nsite = "s1"\ndata_dir = "{data_dir}"\n'
        '[broker]\nhost = "127.0.0.1"\nport = 9\n'
    )
    return cfg


def test_a_deleted_store_is_refused_by_the_daemon(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    fill(data_dir)
    (data_dir / Store.FILE_NAME).unlink()
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "devicegw.cli",
            "run",
            "--config",
            str(write_config(tmp_path, data_dir)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "200"},
        check=False,
    )
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    line = [ln for ln in res.stderr.splitlines() if ln.startswith("devicegw:")]
    assert len(line) == 1, res.stderr
    assert "is missing" in line[0] and "--new-store" in line[0]
    assert not (data_dir / Store.FILE_NAME).exists()  # nothing created silently


def test_new_store_is_confirmed_and_audited(tmp_path: Path) -> None:
    from devicegw.config import parse_config
    from devicegw.runtime.gateway import Gateway

    data_dir = tmp_path / "data"
    fill(data_dir)
    (data_dir / Store.FILE_NAME).unlink()
    with pytest.raises(StoreRefusedError, match="missing"):
        open_checked(data_dir)
    config = parse_config(
        {
            "gateway": {"id": "gw1", "site": "s1", "data_dir": str(data_dir)},
            "broker": {"host": "127.0.0.1", "port": 9},
        }
    )
    gw = Gateway(config, clock=ManualClock(T0), new_store=True)

    async def briefly() -> None:
        task = asyncio.create_task(gw.run())
        await asyncio.sleep(0.3)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(briefly())
    kinds = [r.kind for r in iter_records(gw.store)]
    assert "store_created" in kinds
    created = next(r for r in iter_records(gw.store) if r.kind == "store_created")
    assert "--new-store" in str(created.body["why"])
    assert verify(gw.store).ok
    gw.store.close()
    open_checked(data_dir).store.close()  # the new witness names the new store: accepted


def test_a_different_store_is_refused(tmp_path: Path) -> None:
    """An older copy (or another gateway's store) in place of the witnessed one."""
    data_dir = tmp_path / "data"
    fill(data_dir)
    (data_dir / Store.FILE_NAME).unlink()
    other = tmp_path / "other"
    fill(other, n=1)  # a shorter trail
    os.replace(other / Store.FILE_NAME, data_dir / Store.FILE_NAME)
    with pytest.raises(StoreRefusedError, match="not the one this gateway last wrote"):
        open_checked(data_dir)


# -- 200 random bytes in an outbox page ----------------------------------------------------------


async def test_a_damaged_outbox_row_is_quarantined_and_the_rest_published(
    tmp_path: Path, mosquitto: MosquittoBroker
) -> None:
    data_dir = tmp_path / "data"
    made = fill(data_dir, n=3)
    db = data_dir / Store.FILE_NAME
    raw = db.read_bytes()
    victim = encode(made[1].event)
    at = raw.find(victim)
    assert at > 0
    overwrite(db, at + 40, random.Random(14).randbytes(200))
    opening = open_checked(data_dir)
    with opening.store as store:
        got = await publish_from(store, mosquitto, want=2)
        ids = sorted(str(p["event_id"]) for p in got)
        assert ids == sorted(str(r.event_id) for r in (made[0].event, made[2].event))
        quarantined = Outbox(store).quarantined()
        assert len(quarantined) == 1
        report = verify_store(store)
        assert not report.ok
        assert any("quarantined" in line for line in report.lines())


# -- a damaged index page ----------------------------------------------------------------------


def test_a_damaged_index_is_noticed_at_start_and_reported(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    fill(data_dir, n=3)
    db = data_dir / Store.FILE_NAME
    offset, _ = page_of(db, "sqlite_autoindex_outbox_1")
    overwrite(db, offset, random.Random(7).randbytes(200))  # its header and cell pointers
    opening = open_checked(data_dir)
    with opening.store as store:
        assert opening.problems, "quick_check found nothing"
        assert "Page" in opening.problems[0]
        # The gateway runs on: every unsent row is still read (the index holds no data) ...
        assert len(Outbox(store).pending()) == 6
        # ... and `audit verify` says the store is damaged.
        report = verify_store(store)
        assert not report.ok and report.integrity


# -- a damaged audit page ----------------------------------------------------------------------


def test_a_damaged_audit_page_is_named_not_raised(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    fill(data_dir, n=3)
    db = data_dir / Store.FILE_NAME
    offset, size = page_of(db, "audit")
    overwrite(db, offset + size - 400, random.Random(3).randbytes(200))
    with Store(db) as store:
        result = verify(store)  # never raises
        assert not result.ok
        assert result.first_bad is not None
        assert f"record {result.first_bad}" in result.summary()
    res = subprocess.run(
        [sys.executable, "-m", "devicegw.cli", "audit", "verify", "--store", str(db)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    assert "FAILED at record" in res.stdout


# -- one byte changed in an unsent event's payload -------------------------------------------


async def test_a_changed_payload_is_refused_and_named(
    tmp_path: Path, mosquitto: MosquittoBroker
) -> None:
    data_dir = tmp_path / "data"
    made = fill(data_dir, n=2)
    db = data_dir / Store.FILE_NAME
    raw = db.read_bytes()
    victim = encode(made[0].event)
    delivered = f'"delivered_ml":{made[0].event.volume.delivered_ml}'.encode()
    at = raw.find(victim)
    pos = raw.find(delivered, at)
    assert at > 0 and at < pos < at + len(victim)
    digit = pos + len(delivered) - 2  # a digit of the delivered volume: 2.895 -> 2.805 style
    changed = b"0" if raw[digit : digit + 1] != b"0" else b"1"
    overwrite(db, digit, changed)
    with Store(db) as store:
        report = verify_store(store)
        assert report.audit.ok  # the chain itself is intact ...
        assert not report.ok  # ... but the outbox no longer matches it
        named = [p for p in report.outbox if str(made[0].event.event_id) in p]
        assert named and "differs from the sha256 bound in audit record" in named[0]
        got = await publish_from(store, mosquitto, want=1)
        assert [p["event_id"] for p in got] == [str(made[1].event.event_id)]
        assert any("payload differs" in why for _, why in Outbox(store).quarantined())
    res = subprocess.run(  # noqa: ASYNC221 - the CLI as a process, after the broker part
        [sys.executable, "-m", "devicegw.cli", "audit", "verify", "--store", str(db)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert res.returncode == 1
    assert "outbox: FAILED: outbox row" in res.stdout
