"""Replay throughput, and how fast the scenario runner makes recordings.

    .venv/bin/python benchmarks/replay.py                      # 100 subjects x 10 sessions
    .venv/bin/python benchmarks/replay.py --subjects 10 --sessions 3
    .venv/bin/python benchmarks/replay.py --ward-month-sample  # extrapolate a 40-bed month

Step 1 generates one recording per subject with the scenario runner
(``devicegw simulate --record``; virtual time, the gateway's handshake
simulated, OUTPUT at 10 Hz, STATUS at 1 Hz, sessions ``--gap-s`` apart and
about 8 minutes long; every 10th session a user stop, every 7th a 2-minute
pause). Step 2 replays all of it on one core, as fast as possible, through
the same pipeline the daemon runs; step 3 again with ``play_parallel`` (one
device per task, ``--jobs`` processes). Printed figures, no assertions:

- frames/s: VM-1 frames decoded per second of wall time;
- x real time (ward): gateway time the recordings span / wall time (the
  subjects were recorded side by side, as on a ward);
- x real time (per device): sum of every device's recorded time / wall time
  (what one device's stream gets: the stricter figure).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devicegw.cli.replay import simulate_record  # noqa: E402
from devicegw.recording.player import Player, play_parallel  # noqa: E402
from simulators.scenario import Scenario, parse_scenario  # noqa: E402


def subject_scenario(i: int, sessions: int, gap_s: float) -> Scenario:
    scripts: list[dict[str, Any]] = []
    for k in range(sessions):
        t = 5.0 + k * gap_s
        s: dict[str, Any] = {
            "fill_at_s": t,
            "fill_ul": 3000,
            "start_at_s": t + 25,
            "rate_ul_min": 400,
            "rate_bias": 0.03,
            "residual_ul": 105,
        }
        n = i * sessions + k
        if n % 10 == 3:
            s["stop_at_s"] = t + 25 + 200  # user stop at about half
        elif n % 7 == 5:
            s["pauses"] = [{"at_s": t + 150, "duration_s": 120}]
        scripts.append(s)
    return parse_scenario(
        {
            "name": f"subject-{i:03d}",
            "device": {
                "serial_no": f"VM1-B{i:05d}",
                "last_session_no": 100,
                "mains": True,
                "seed": 1000 + i,
            },
            "sessions": scripts,
        }
    )


def generate(out: Path, subjects: int, sessions: int, gap_s: float, jobs: int) -> None:
    scenarios = [subject_scenario(i, sessions, gap_s) for i in range(subjects)]
    t0 = time.perf_counter()
    results = simulate_record(scenarios, out, jobs=jobs)
    wall = time.perf_counter() - t0
    frames = sum(r.frames for r in results)
    dev_s = sum(r.sim_seconds for r in results)
    size = sum(p.stat().st_size for p in out.glob("*.dgwrec"))
    cpu = sum(r.wall_s for r in results)
    print(f"scenario runner: {subjects} subjects x {sessions} sessions, {jobs} process(es)")
    print(f"  {frames:,} frames, {dev_s / 3600:,.1f} device-hours, {size / 1e6:,.1f} MB")
    print(
        f"  {wall:.1f} s wall ({cpu:.1f} s summed over workers): "
        f"{frames / cpu:,.0f} frames/s per core, {dev_s / wall:,.0f}x real time"
    )


def replay(out: Path) -> None:
    files = sorted(out.glob("*.dgwrec"))
    player = Player(files)
    s = player.run()
    verdicts = ", ".join(f"{k} {v}" for k, v in sorted(s.verdicts().items()))
    print(f"replay (one core, as fast as possible): {len(files)} files, {s.records:,} records")
    print(f"  {s.sessions} sessions ({verdicts})")
    print(f"  {s.frames:,} frames in {s.wall_s:.1f} s: {s.frames / s.wall_s:,.0f} frames/s")
    print(
        f"  x real time (ward, {s.span_s / 3600:.1f} h recorded side by side): "
        f"{s.span_s / s.wall_s:,.0f}x"
    )
    print(
        f"  x real time (per device, {s.device_seconds / 3600:,.1f} device-hours): "
        f"{s.device_seconds / s.wall_s:,.0f}x   (target >= 1,000x)"
    )


def replay_parallel(out: Path, jobs: int) -> None:
    """The same recordings, one device per task in ``jobs`` worker processes."""
    files = sorted(out.glob("*.dgwrec"))
    s = play_parallel(files, jobs=jobs)
    print(f"replay (play_parallel, {jobs} processes, as fast as possible): {len(files)} files")
    print(f"  {s.frames:,} frames in {s.wall_s:.1f} s: {s.frames / s.wall_s:,.0f} frames/s")
    print(
        f"  x real time (ward, {s.span_s / 3600:.1f} h recorded side by side): "
        f"{s.span_s / s.wall_s:,.0f}x   (target >= 1,000x)"
    )
    print(
        f"  x real time (per device, {s.device_seconds / 3600:,.1f} device-hours): "
        f"{s.device_seconds / s.wall_s:,.0f}x"
    )


def ward_month_sample(jobs: int) -> None:
    """Two beds x 2 days, then extrapolate to 40 beds x 30 days (2 sessions a day)."""
    beds, days, per_day = 2, 2, 2
    with tempfile.TemporaryDirectory() as tmp:
        scenarios = [subject_scenario(i, days * per_day, 86400 / per_day) for i in range(beds)]
        t0 = time.perf_counter()
        results = simulate_record(scenarios, tmp, jobs=1)
        wall = time.perf_counter() - t0
        frames = sum(r.frames for r in results)
        size = sum(p.stat().st_size for p in Path(tmp).glob("*.dgwrec"))
    scale = (40 * 30) / (beds * days)
    cores = min(jobs, os.cpu_count() or 1)
    print(f"ward-month sample: {beds} beds x {days} days ({per_day} sessions/day, STATUS 1 Hz)")
    print(f"  {frames:,} frames, {size / 1e6:.1f} MB in {wall:.1f} s on one core")
    print(
        f"  40 beds x 30 days ~ {frames * scale / 1e6:,.0f} M frames, {size * scale / 1e9:.1f} GB: "
        f"~{wall * scale / 60:.0f} min on one core, ~{wall * scale / 60 / cores:.0f} min "
        f"on {cores} core(s)"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--subjects", type=int, default=100)
    p.add_argument("--sessions", type=int, default=10)
    p.add_argument("--gap-s", type=float, default=1800.0, help="time between session starts")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--keep", default=None, help="write the recordings here and keep them")
    p.add_argument("--ward-month-sample", action="store_true")
    args = p.parse_args()
    if args.ward_month_sample:
        ward_month_sample(args.jobs)
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.keep) if args.keep else Path(tmp)
        generate(out, args.subjects, args.sessions, args.gap_s, args.jobs)
        replay(out)
        replay_parallel(out, args.jobs)


if __name__ == "__main__":
    main()
