"""One long session flooded with OUTPUT frames: what the journal and the session's memory cost.

    .venv/bin/python benchmarks/long_session.py                    # 4 h of device time at 1,000 Hz
    .venv/bin/python benchmarks/long_session.py --hours 1 --hz 50  # the ICD's fastest legal rate

A VM-1 that sends OUTPUT far above the ICD's 50 Hz maximum (a fault, or a
hostile port) for hours: the frames go, as serial bytes, through the gateway's
own :class:`~devicegw.core.vm1_pipeline.Vm1Pipeline` with a real store
(SQLite, WAL) and the incremental session journal, as fast as one core can
feed them, on device time (the journal snapshots every 5 s of it). Printed per
simulated half hour: frames fed, samples the open session holds, the journal's
last save (ms, bytes it added to the store), the slowest save so far, the
process's RSS. At the end: the dose event's verdict and sample count.

What it shows (issue 13): before, each snapshot rewrote every sample
(0.3-0.9 s at 1-4 M samples, the event loop stalled meanwhile, RSS 150 -> 440
MB); now a save writes only what is new, and the session keeps at most ~66
samples a second (the ICD's 50 Hz with margin), so both stay flat. No
assertions; not part of ``make test``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devicegw.core.vm1_pipeline import Vm1Pipeline  # noqa: E402
from devicegw.storage.journal import SessionJournal  # noqa: E402
from devicegw.storage.outbox import Outbox  # noqa: E402
from devicegw.storage.store import Store  # noqa: E402
from drivers.vm1.messages import (  # noqa: E402
    DeviceState,
    EndReason,
    Ident,
    Output,
    SessionEnd,
    SessionStart,
    Status,
)
from drivers.vm1.stream import encode_message_frame  # noqa: E402
from tests.session_stream import one_device_config  # noqa: E402
from tests.test_dose_edges import OutboxSink  # noqa: E402

T0 = datetime(2026, 11, 25, 8, 0, tzinfo=UTC)


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class TimedJournal(SessionJournal):
    """The real journal, with each save timed and the store's growth measured."""

    def __init__(self, store: Store) -> None:
        super().__init__(store)
        self.last_ms = 0.0
        self.max_ms = 0.0
        self.saves = 0

    def save(
        self, device_id: str, session_no: int, state: dict[str, object], utc: datetime
    ) -> None:
        t = time.perf_counter()
        super().save(device_id, session_no, state, utc)
        self.last_ms = (time.perf_counter() - t) * 1000
        self.max_ms = max(self.max_ms, self.last_ms)
        self.saves += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hours", type=float, default=4.0, help="device time the session lasts")
    ap.add_argument("--hz", type=int, default=1000, help="OUTPUT frames per device second")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="dgw-long-") as tmp:
        store = Store(Path(tmp) / "gw.sqlite3")
        journal = TimedJournal(store)
        cfg = one_device_config()
        sink = OutboxSink(Outbox(store))
        p = Vm1Pipeline(cfg.devices[0], cfg, sink, journal=journal)
        p.link_up(T0)
        seq = 0
        t_ms = 10_000

        def send(msg_cls: type, **fields: object) -> None:
            nonlocal seq
            msg = msg_cls(seq=seq, dev_ms=t_ms % (1 << 32), **fields)
            seq = (seq + 1) % 256
            p.feed(encode_message_frame(msg), T0 + timedelta(milliseconds=t_ms), t_ms / 1e3)

        send(
            Ident,
            model="VM-1",
            serial_no="VM1-000123",
            firmware="1.4.2",
            nominal_rate_ul_min=400,
            reservoir_capacity_ul=6000,
            last_session_no=41,
        )
        send(Status, state=DeviceState.READY, reservoir_ul=3000, battery_pct=80, flags=0x09)
        send(SessionStart, session_no=42, fill_ul=3000, wall_s=1_795_507_200)
        send(Status, state=DeviceState.NEBULIZING, reservoir_ul=3000, battery_pct=80, flags=0x09)
        total = round(args.hours * 3600 * args.hz)
        step_ms = 1000 / args.hz
        # The fill (3 mL) delivered over the whole flood, so the dose rules see a whole dose.
        rate = max(1, round(2900 / (args.hours * 60)))
        report_every = round(1800 * args.hz)
        print(
            "device time | frames fed | samples held | last journal save ms | "
            "slowest save ms | RSS MB | wall s"
        )
        wall0 = time.perf_counter()
        start_ms = t_ms
        for i in range(1, total + 1):
            t_ms = start_ms + round(i * step_ms)
            send(Output, rate_ul_min=rate, cum_ul=round(i * step_ms / 60_000 * rate))
            if i % report_every == 0 or i == total:
                o = p.tracker.open_session
                held = 0 if o is None else len(p.tracker.snapshot()["open"]["times"])  # type: ignore[index]
                print(
                    f"{i / args.hz / 3600:.1f} h | {i:,} | {held:,} | "
                    f"{journal.last_ms:.1f} | {journal.max_ms:.1f} | "
                    f"{rss_mb():.0f} | {time.perf_counter() - wall0:.0f}",
                    flush=True,
                )
        cum = round(total * step_ms / 60_000 * rate)
        send(
            SessionEnd,
            session_no=42,
            reason=EndReason.COMPLETE,
            neb_ms=round(total * step_ms),
            cum_ul=cum,
            residual_ul=max(0, 3000 - cum),
        )
        [record] = sink.records
        print(
            f"dose event: verdict {record.event.verdict}, rate samples "
            f"{record.detail.rate.samples:,} of {total:,} frames; "
            f"{journal.saves} journal saves, the slowest {journal.max_ms:.1f} ms; "
            f"RSS {rss_mb():.0f} MB"
        )
        store.close()


if __name__ == "__main__":
    main()
