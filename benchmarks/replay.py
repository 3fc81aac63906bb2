"""Replay throughput, and how fast the scenario runner makes recordings.

    .venv/bin/python benchmarks/replay.py                      # 100 subjects x 10 sessions
    .venv/bin/python benchmarks/replay.py --subjects 10 --sessions 3
    .venv/bin/python benchmarks/replay.py --ward-month-sample  # extrapolate a 40-bed month
    .venv/bin/python benchmarks/replay.py --subjects 100 --sessions 2 --keep /tmp/ward
    .venv/bin/python benchmarks/replay.py --reuse /tmp/ward    # replay those again only
    .venv/bin/python benchmarks/replay.py --reuse /tmp/ward --parallel-only  # step 3 only
    .venv/bin/python benchmarks/replay.py --no-oximeter        # nebulizer-only beds (format v1)
    .venv/bin/python benchmarks/replay.py --subjects 20 --sessions 2 --gap-s 43200  # a BID ward

Step 1 generates one recording per subject with the scenario runner
(``devicegw simulate --record``; virtual time, the gateway's handshake
simulated, OUTPUT at 10 Hz, STATUS at 1 Hz, sessions ``--gap-s`` apart and
about 8 minutes long; every 10th session a user stop, every 7th a 2-minute
pause). Each subject also wears a Nonin oximeter (``simulate --record
--oximeter``: 3 samples/s from power-on, the bed's 1 s tick, format v2;
every 4th session has a desaturation during the dose) unless
``--no-oximeter``. Step 2 replays all of it on one core, as fast as
possible, through the same pipeline the daemon runs; step 3 again with
``play_parallel`` (one device per task, ``--jobs`` processes). Printed
figures, no assertions:

- frames/s, records/s: VM-1 frames decoded, records applied per second of wall time;
- x real time (ward): gateway time the recordings span / wall time (the
  subjects were recorded side by side, as on a ward);
- x real time (per device): sum of every device's recorded time / wall time
  (what one device's stream gets: the stricter figure);
- CPU: the one-core replay's CPU time (per record, and ward x per CPU
  second), and the parallel workers' summed CPU and the cores they got: the
  box is shared, so wall times alone vary from run to run.

The ward clock depends on how busy the beds are: between doses a bed costs
a STATUS frame, three oximeter samples and a tick per second; a dose and its
30-minute observation window cost ten OUTPUT frames more per second and the
SpO2 statistics (``--gap-s 1800``, the default, keeps every bed in one).
"""

from __future__ import annotations

import argparse
import logging
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
from simulators.oximeter_scenario import (  # noqa: E402
    OximeterScenario,
    parse_oximeter_scenario,
)
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


def subject_oximeter(i: int, sessions: int, gap_s: float) -> OximeterScenario:
    """A Nonin on subject ``i``; every 4th session a desaturation 3 minutes into the dose."""
    desats = [
        {"at_s": 5.0 + k * gap_s + 25 + 180, "depth_points": 8, "duration_s": 45}
        for k in range(sessions)
        if (i * sessions + k) % 4 == 1
    ]
    return parse_oximeter_scenario(
        {
            "name": f"oximeter-{i:03d}",
            "bed": f"SIM{i + 1:02d}",
            "subject_id": f"SIM-{i + 1:04d}",
            "oximeter": {"protocol": "nonin", "serial_no": f"NONIN-B{i:05d}", "seed": 500 + i},
            "subject": {"baseline_spo2": 95 - i % 3, "baseline_pulse_bpm": 70 + i % 20},
            "desaturations": desats,
        }
    )


def generate(
    out: Path, subjects: int, sessions: int, gap_s: float, jobs: int, oximeter: bool = True
) -> None:
    scenarios = [subject_scenario(i, sessions, gap_s) for i in range(subjects)]
    oximeters = [subject_oximeter(i, sessions, gap_s) for i in range(subjects)] if oximeter else []
    t0 = time.perf_counter()
    results = simulate_record(scenarios, out, jobs=jobs, oximeters=oximeters)
    wall = time.perf_counter() - t0
    frames = sum(r.frames for r in results)
    dev_s = sum(r.sim_seconds for r in results)
    size = sum(p.stat().st_size for p in out.glob("*.dgwrec"))
    cpu = sum(r.wall_s for r in results)
    beds = "nebulizer + oximeter" if oximeter else "nebulizer only"
    print(
        f"scenario runner: {subjects} subjects ({beds}) x {sessions} sessions, {jobs} process(es)"
    )
    print(f"  {frames:,} frames, {dev_s / 3600:,.1f} device-hours, {size / 1e6:,.1f} MB")
    print(
        f"  {wall:.1f} s wall ({cpu:.1f} s summed over workers): "
        f"{frames / cpu:,.0f} frames/s per core, {dev_s / wall:,.0f}x real time"
    )


def replay(out: Path) -> None:
    files = sorted(out.glob("*.dgwrec"))
    player = Player(files)
    cpu0 = time.process_time()
    s = player.run()
    cpu = time.process_time() - cpu0
    verdicts = ", ".join(f"{k} {v}" for k, v in sorted(s.verdicts().items()))
    print(f"replay (one core, as fast as possible): {len(files)} files, {s.records:,} records")
    print(f"  {s.sessions} sessions ({verdicts})")
    print(
        f"  {s.frames:,} frames, {s.records:,} records in {s.wall_s:.1f} s: "
        f"{s.frames / s.wall_s:,.0f} frames/s, {s.records / s.wall_s:,.0f} records/s"
    )
    print(
        f"  x real time (ward, {s.span_s / 3600:.1f} h recorded side by side): "
        f"{s.span_s / s.wall_s:,.0f}x   (target >= 1,000x)"
    )
    print(
        f"  x real time (per device, {s.device_seconds / 3600:,.1f} device-hours): "
        f"{s.device_seconds / s.wall_s:,.0f}x"
    )
    print(
        f"  CPU {cpu:.1f} s ({cpu / max(s.records, 1) * 1e6:.2f} us per record); "
        f"ward {s.span_s / cpu:,.0f}x per CPU second"
    )


def replay_parallel(out: Path, jobs: int) -> None:
    """The same recordings, one device per task in ``jobs`` worker processes."""
    files = sorted(out.glob("*.dgwrec"))
    before = os.times()
    s = play_parallel(files, jobs=jobs)
    after = os.times()
    workers = (after.children_user + after.children_system) - (
        before.children_user + before.children_system
    )
    print(f"replay (play_parallel, {jobs} processes, as fast as possible): {len(files)} files")
    print(
        f"  {s.frames:,} frames, {s.records:,} records in {s.wall_s:.1f} s: "
        f"{s.frames / s.wall_s:,.0f} frames/s, {s.records / s.wall_s:,.0f} records/s"
    )
    print(
        f"  x real time (ward, {s.span_s / 3600:.1f} h recorded side by side): "
        f"{s.span_s / s.wall_s:,.0f}x   (target >= 1,000x)"
    )
    print(
        f"  x real time (per device, {s.device_seconds / 3600:,.1f} device-hours): "
        f"{s.device_seconds / s.wall_s:,.0f}x"
    )
    if workers > 0:  # 0 when everything ran in this process (jobs 1, or one device)
        ideal = workers / min(jobs, len(files))
        print(
            f"  workers' CPU {workers:.1f} s in {s.wall_s:.1f} s wall "
            f"({workers / s.wall_s:.2f} cores busy); with {min(jobs, len(files))} idle cores "
            f"~{ideal:.1f} s = ~{s.span_s / ideal:,.0f}x ward"
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
    p.add_argument("--reuse", default=None, help="replay the recordings in this dir, make none")
    p.add_argument("--no-oximeter", action="store_true", help="nebulizer-only beds (format v1)")
    p.add_argument(
        "--parallel-only",
        action="store_true",
        help="replay only with play_parallel (skip the one-core Player.run: a shorter run)",
    )
    p.add_argument("--ward-month-sample", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.ERROR)  # not the alerts' log lines: the figures
    if args.ward_month_sample:
        ward_month_sample(args.jobs)
        return
    print(f"machine: {os.cpu_count()} cores, load average {_load()} before the run")
    if args.reuse:
        if not args.parallel_only:
            replay(Path(args.reuse))
        replay_parallel(Path(args.reuse), args.jobs)
        print(f"machine load average after the run: {_load()}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.keep) if args.keep else Path(tmp)
        generate(
            out, args.subjects, args.sessions, args.gap_s, args.jobs, oximeter=not args.no_oximeter
        )
        if not args.parallel_only:
            replay(out)
        replay_parallel(out, args.jobs)
    print(f"machine load average after the run: {_load()}")


def _load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    main()
