"""Dose events through a broker that is SIGKILLed K times: delivered, lost, duplicated, drained.

    .venv/bin/python benchmarks/outage.py                      # 1,000 sessions, 3 kills
    .venv/bin/python benchmarks/outage.py --sessions 200 --kills 5 --outage-s 1 --rate 100

Loopback only, bounded in time. A private Mosquitto (tests/mqtt_helpers.py's
MosquittoBroker: free port, ``persistence true``, ``autosave_interval 1``;
never the machine's broker on 1883), an EDC-like subscriber (fixed client id,
``clean_session=False``, QoS 1, reconnecting after every kill and
re-subscribing, as the reference EDC client does under its supervisor), and the
gateway's real MqttPublisher with its durable outbox in a temporary Store. N
real DoseEvent payloads (the fixture event of tests/data/export, varied over
40 beds and N session numbers, event ids derived as the gateway does) are
committed to the outbox at a steady rate; meanwhile the broker is SIGKILLed K
times at evenly spread points and restarted after ``--outage-s``. At the end
it waits (bounded by ``--timeout``) for the outbox to drain and the subscriber
to have every event the broker acknowledged, then prints figures. No
assertions.

Two hops, measured separately: "published+acked by broker" (the outbox row
is marked sent on the broker's PUBACK: where the gateway's guarantee ends)
and "received by subscriber" (what the broker then delivered). A SIGKILL can
drop what the broker held only in memory (saved at most every second): such
events count as acked but not received, and the notes say so.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiomqtt  # noqa: E402

from devicegw.config import BrokerSettings  # noqa: E402
from devicegw.contract.payloads import (  # noqa: E402
    DoseDetail,
    DoseEvent,
    DoseRecord,
    GatewayStatus,
    dose_event_id,
)
from devicegw.contract.topics import Topics  # noqa: E402
from devicegw.mqtt.publisher import MqttPublisher, encode  # noqa: E402
from devicegw.storage.store import Store  # noqa: E402
from drivers.clock import SystemClock  # noqa: E402
from tests.mqtt_helpers import MosquittoBroker, mosquitto_binary  # noqa: E402
from tests.test_contract import real_dose_record  # noqa: E402

FIXTURE = ROOT / "tests" / "data" / "export" / "events.jsonl"
TOPICS = Topics("devicegw/v2", "site-bench", "gw-bench")
EDC_CLIENT_ID = "bench-edc"
BEDS = 40


# -- the events -----------------------------------------------------------------------


def template_event() -> DoseEvent:
    """A realistic dose event: the first 'complete' one of the export fixture."""
    for line in FIXTURE.read_text(encoding="utf-8").splitlines():
        event = DoseEvent.model_validate_json(line)
        if event.verdict == "complete":
            return event
    raise SystemExit(f"{FIXTURE}: no complete dose event")


def synthetic_events(n: int) -> list[DoseEvent]:
    """N distinct sessions over BEDS devices; event ids derived as the gateway derives them."""
    base = template_event()
    model = base.device.model or "VM-1"
    events = []
    for i in range(n):
        bed = i % BEDS + 1
        serial = f"VM1-{bed:05d}"
        session_no = 100 + i // BEDS
        events.append(
            base.model_copy(
                update={
                    "event_id": dose_event_id(model, serial, session_no),
                    "session_no": session_no,
                    "subject_id": f"CVD-042-{bed:04d}",
                    "kit_number": f"K-{10000 + bed}",
                    "bed": f"B{bed:02d}",
                    "device": base.device.model_copy(
                        update={"device_id": f"neb-bed{bed:02d}", "serial_no": serial}
                    ),
                }
            )
        )
    assert len({e.event_id for e in events}) == n
    return events


def detail_for(event: DoseEvent, template: DoseDetail) -> DoseDetail:
    """The restricted detail committed with ``event`` (a real one, re-keyed)."""
    return template.model_copy(
        update={"event_id": event.event_id, "session_no": event.session_no, "device": event.device}
    )


def identity(record: dict[str, Any]) -> str:
    """A record without its delivery metadata, canonically: what every copy must share."""
    return json.dumps({k: v for k, v in record.items() if k != "delivery"}, sort_keys=True)


# -- the EDC ---------------------------------------------------------------------------


@dataclass
class Subscriber:
    """Persistent-session QoS 1 subscriber that reconnects (same id) after every kill."""

    host: str
    port: int
    topic: str
    received: list[tuple[float, bytes]] = field(default_factory=list)
    connects: int = 0
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        while True:
            try:
                async with aiomqtt.Client(
                    self.host,
                    self.port,
                    identifier=EDC_CLIENT_ID,
                    clean_session=False,
                    keepalive=5,
                    timeout=5,
                ) as client:
                    self.connects += 1
                    await client.subscribe(self.topic, qos=1)
                    self.ready.set()
                    async for m in client.messages:
                        payload = m.payload if isinstance(m.payload, bytes) else b""
                        self.received.append((time.monotonic(), payload))
                        self.changed.set()
            except aiomqtt.MqttError:
                pass
            await asyncio.sleep(0.1)

    def distinct(self) -> set[str]:
        return {json.loads(p)["event_id"] for _, p in self.received}


# -- the run ---------------------------------------------------------------------------


@dataclass
class Outage:
    killed_at: float
    restarted_at: float = 0.0
    depth_at_restart: int = 0
    backlog_last_id: int = 0  # the newest outbox row at the restart
    drained_at: float | None = None  # every row of that backlog acked by the broker


@dataclass
class Run:
    events: list[DoseEvent]
    publisher: MqttPublisher
    store: Store
    subscriber: Subscriber
    outages: list[Outage] = field(default_factory=list)
    max_depth: int = 0
    t0: float = 0.0
    feed_done_at: float = 0.0
    complete_at: float | None = None
    timed_out: bool = False


async def feed(run: Run, rate: float) -> None:
    start = time.monotonic()
    template = real_dose_record().detail
    for i, event in enumerate(run.events):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        device_id = event.device.device_id
        run.publisher.commit_dose(
            TOPICS.dose(device_id),
            DoseRecord(event, detail_for(event, template)),
            device_id=device_id,
            detail_topic=TOPICS.dose_detail(device_id),
        )
    run.feed_done_at = time.monotonic()


async def kill_broker(
    run: Run, broker: MosquittoBroker, kills: int, span: float, outage_s: float
) -> None:
    for k in range(1, kills + 1):
        # Evenly spread over the feed, but never before the previous outage's restart.
        await asyncio.sleep(max(0.0, run.t0 + span * k / (kills + 1) - time.monotonic()))
        outage = Outage(killed_at=time.monotonic())
        await asyncio.to_thread(broker.kill)  # SIGKILL
        run.outages.append(outage)
        await asyncio.sleep(outage_s)
        await asyncio.to_thread(broker.start)
        outage.restarted_at = time.monotonic()
        outage.depth_at_restart = run.publisher.outbox.depth()
        row = run.store.conn.execute("SELECT COALESCE(MAX(id), 0) FROM outbox").fetchone()
        outage.backlog_last_id = int(row[0])


async def monitor(run: Run) -> None:
    """Samples the outbox every 10 ms: its maximum depth, and when each outage's backlog
    (the rows unsent at the restart; new ones keep coming) has been acked by the broker."""
    while True:
        run.max_depth = max(run.max_depth, run.publisher.outbox.depth())
        # Only the latest outage can drain: one not drained by the next kill never did.
        latest = run.outages[-1] if run.outages else None
        if latest and latest.restarted_at and latest.drained_at is None:
            (left,) = run.store.conn.execute(
                "SELECT COUNT(*) FROM outbox WHERE sent_utc IS NULL AND id <= ?",
                (latest.backlog_last_id,),
            ).fetchone()
            if left == 0:
                latest.drained_at = time.monotonic()
        await asyncio.sleep(0.01)


def acked_ids(store: Store) -> set[str]:
    rows = store.conn.execute(
        "SELECT event_id FROM outbox WHERE kind = 'dose' AND sent_utc IS NOT NULL"
    ).fetchall()
    return {r[0] for r in rows}


async def wait_complete(run: Run, limit_s: float) -> None:
    """Until the outbox is empty and the subscriber has every event the broker acked."""
    deadline = time.monotonic() + limit_s
    n = len(run.events)
    while time.monotonic() < deadline:
        if run.publisher.outbox.depth() == 0:
            acked = acked_ids(run.store)
            if len(acked) == n and acked <= run.subscriber.distinct():
                run.complete_at = time.monotonic()
                return
        run.subscriber.changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(run.subscriber.changed.wait(), 0.2)
    run.timed_out = True


async def bench(args: argparse.Namespace, workdir: Path) -> None:
    broker = MosquittoBroker(workdir=workdir, extra_conf="max_queued_messages 100000")
    broker.start()
    store = Store(workdir / "gw" / Store.FILE_NAME)
    started = SystemClock().now()

    def status_payload(online: bool) -> bytes:
        return encode(
            GatewayStatus(
                gateway_id=TOPICS.gateway,
                site=TOPICS.site,
                online=online,
                version="bench",
                config_sha256=None,
                devices=[f"neb-bed{b:02d}" for b in range(1, BEDS + 1)],
                since_utc=started if online else None,
            )
        )

    publisher = MqttPublisher(
        BrokerSettings(
            host=broker.host,
            port=broker.port,
            keepalive_s=5,
            reconnect_initial_s=0.1,
            reconnect_max_s=0.5,
        ),
        client_id="devicegw-bench",
        clock=SystemClock(),
        store=store,
        status_topic=TOPICS.gateway_status(),
        status_payload=status_payload,
    )
    subscriber = Subscriber(broker.host, broker.port, TOPICS.all_dose_events())
    run = Run(synthetic_events(args.sessions), publisher, store, subscriber)
    committed = {str(e.event_id): identity(json.loads(encode(e))) for e in run.events}

    tasks: list[asyncio.Task[Any]] = []
    try:
        tasks.append(asyncio.create_task(subscriber.run(), name="edc"))
        await asyncio.wait_for(subscriber.ready.wait(), 10)
        tasks.append(asyncio.create_task(publisher.run(), name="publisher"))
        await asyncio.wait_for(publisher.connected.wait(), 10)
        await asyncio.sleep(1.5)  # let one autosave record the EDC's subscription
        tasks.append(asyncio.create_task(monitor(run), name="monitor"))
        run.t0 = time.monotonic()
        span = args.sessions / args.rate
        killer = asyncio.create_task(
            kill_broker(run, broker, args.kills, span, args.outage_s), name="killer"
        )
        await feed(run, args.rate)
        await killer
        await wait_complete(run, args.timeout)
        await asyncio.sleep(args.grace_s)  # late duplicates
    finally:
        for task in reversed(tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await task
        broker.stop()
    end = time.monotonic()
    report(args, run, committed, end)
    store.close()


def report(args: argparse.Namespace, run: Run, committed: dict[str, str], end: float) -> None:
    n = len(run.events)
    copies: dict[str, list[str]] = {}
    redelivered_copies = 0
    for _, payload in run.subscriber.received:
        record = json.loads(payload)
        copies.setdefault(record["event_id"], []).append(identity(record))
        if (record.get("delivery") or {}).get("redelivery", 0) > 0:
            redelivered_copies += 1
    delivered = len(copies)
    duplicates = sum(len(c) - 1 for c in copies.values())
    conflicting = sum(len(set(c)) > 1 for c in copies.values())
    altered = sum(any(x != committed.get(eid) for x in c) for eid, c in copies.items())
    acked = acked_ids(run.store)
    acked_not_received = acked - copies.keys()
    stats = run.publisher.stats

    print(f"outage benchmark: mosquitto {broker_version()}, loopback, publisher QoS 1")
    print(f"  sessions (N)                      {n:>8,}")
    print(f"  broker SIGKILLs (K)               {len(run.outages):>8}   ({args.outage_s:g} s each)")
    print(f"  feed rate                         {args.rate:>8g} /s")
    print(f"  published+acked by broker         {len(acked):>8,}   (outbox rows marked sent)")
    print(f"  not acked (still in outbox)       {run.publisher.outbox.depth():>8,}")
    print(f"  received by subscriber (distinct) {delivered:>8,}   = delivered")
    print(f"  lost (N - delivered)              {n - delivered:>8,}")
    print(f"    of which acked by the broker    {len(acked_not_received):>8,}")
    print(f"  duplicates (copies beyond first)  {duplicates:>8,}")
    print(f"  conflicting duplicates            {conflicting:>8,}   (must be 0)")
    print(f"  copies differing from committed   {altered:>8,}   (must be 0)")
    print(f"  redeliveries by the publisher     {stats.redeliveries:>8,}")
    print(f"  copies received with redelivery>0 {redelivered_copies:>8,}")
    print(f"  publisher connects                {stats.connects:>8}")
    print(f"  subscriber connects               {run.subscriber.connects:>8}")
    print(f"  max outbox depth                  {run.max_depth:>8,}")
    for i, o in enumerate(run.outages, 1):
        drain = (
            f"{o.drained_at - o.restarted_at:.2f} s"
            if o.drained_at
            else "not (before the next kill)"
        )
        print(
            f"  outage {i}: killed at {o.killed_at - run.t0:6.2f} s, backlog at restart "
            f"{o.depth_at_restart:>4}, backlog acked {drain} after the restart"
        )
    if run.outages:
        last = run.outages[-1]
        drain = f"{last.drained_at - last.restarted_at:.2f} s" if last.drained_at else "never"
        print(f"  time to drain after last restart  {drain:>8}   (its backlog acked by the broker)")
    if run.complete_at is not None:
        print(
            f"  subscriber complete               {run.complete_at - run.feed_done_at:>6.2f} s"
            " after the last event was committed"
        )
    print(f"  total wall time                   {end - run.t0:>6.2f} s")
    print("notes:")
    if run.timed_out:
        print(f"  - TIMED OUT after {args.timeout:g} s waiting for the outbox and the subscriber.")
    if acked_not_received:
        print(
            f"  - {len(acked_not_received)} event(s) were acknowledged by the broker (PUBACK) but"
            " never reached the subscriber: the SIGKILLed broker lost them (Mosquitto keeps"
            " queued messages in memory and saves them every autosave_interval = 1 s). The"
            " gateway's guarantee ends at the broker's PUBACK; surviving a broker crash needs a"
            " broker that persists before acknowledging, or an end-to-end reconciliation."
        )
    else:
        print("  - every event the broker acknowledged reached the subscriber.")
    if duplicates:
        print(
            "  - duplicates are expected (QoS 1 is at-least-once; a kill loses PUBACKs and the"
            " broker's own saved-but-delivered state); the EDC keeps the first of each event_id."
        )


def broker_version() -> str:
    import subprocess

    binary = mosquitto_binary()
    if binary is None:
        return "?"
    out = subprocess.run([binary, "-h"], capture_output=True, text=True, check=False).stdout
    first = out.splitlines()[0] if out else ""
    return first.removeprefix("mosquitto version ").strip() or "?"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sessions", type=int, default=1000, help="dose events to publish (N)")
    p.add_argument("--kills", type=int, default=3, help="broker SIGKILLs during the feed (K)")
    p.add_argument("--outage-s", type=float, default=2.0, help="broker down time per kill")
    p.add_argument("--rate", type=float, default=50.0, help="dose events committed per second")
    p.add_argument("--timeout", type=float, default=60.0, help="max wait for the drain at the end")
    p.add_argument("--grace-s", type=float, default=1.0, help="wait for late duplicates")
    p.add_argument("-v", "--verbose", action="store_true", help="gateway log on stderr")
    args = p.parse_args()
    if mosquitto_binary() is None:
        raise SystemExit("mosquitto is not installed")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.CRITICAL)
    # aiomqtt warns for every publish beyond 10 pending: expected with 20 in flight.
    logging.getLogger("mqtt").setLevel(logging.INFO if args.verbose else logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="outage-bench-") as tmp:
        asyncio.run(bench(args, Path(tmp)))


if __name__ == "__main__":
    main()
