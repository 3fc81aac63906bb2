"""N beds on one gateway: VM-1 (10 Hz OUTPUT) + Nonin OEM III (75 frames/s) per bed, on ptys.

    .venv/bin/python benchmarks/scale.py --beds 50 100 200 [--scale 1] [--session-s 60]

For each N: a private Mosquitto (tests/mqtt_helpers.py's, on a free loopback
port), one simulator process holding N simulated VM-1s and N Nonin oximeters on
ptys (simulators/vm1_pty.py, simulators/oximeter_pty.py; sessions start within
10 s of each other, one ~``--session-s`` dose each), ``devicegw run`` against
them, and an EDC-like subscriber (QoS 1, everything under the gateway's base
topic). Prints: the gateway's CPU share of one core and peak RSS (from /proc),
dose events received and correct (verdict complete, subject and kit right),
dose end -> event at the subscriber (``gateway_end_utc`` -> receipt) and
telemetry ``utc`` -> subscriber, p50 / p99. Latencies are on the shared
:class:`~drivers.clock.ScaledClock` (both processes agree on UTC) divided by the
scale, i.e. real milliseconds. No assertions; not part of ``make test``.
"""

# A benchmark driver: blocking process starts and file opens before the measurement are fine.
# ruff: noqa: ASYNC110, ASYNC220, ASYNC230

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import aiomqtt

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from drivers.clock import ScaledClock  # noqa: E402
from simulators.oximeter_pty import NoninPtySimulator  # noqa: E402
from simulators.oximeter_pty import default_link_name as ox_link_name  # noqa: E402
from simulators.oximeter_scenario import OximeterScenario, parse_oximeter_scenario  # noqa: E402
from simulators.scenario import Scenario, parse_scenario  # noqa: E402
from simulators.vm1_pty import Vm1PtySimulator  # noqa: E402
from simulators.vm1_pty import default_link_name as vm1_link_name  # noqa: E402
from tests.mqtt_helpers import MosquittoBroker  # noqa: E402

DEVICEGW = [sys.executable, "-m", "devicegw.cli"]
FILL_UL = 1000


def vm1_scenario(i: int, session_s: float) -> Scenario:
    start = 15 + (i % 10)  # all within 10 s
    return parse_scenario(
        {
            "name": f"bed-{i}",
            "device": {"serial_no": f"VM1-S{i:04d}", "last_session_no": 41, "mains": True},
            "sessions": [
                {
                    "fill_at_s": start - 5,
                    "fill_ul": FILL_UL,
                    "start_at_s": start,
                    "rate_ul_min": round(FILL_UL * 1.02 / (session_s / 60)),
                }
            ],
        },
        source=f"bed-{i}",
    )


def ox_scenario(i: int) -> OximeterScenario:
    return parse_oximeter_scenario(
        {
            "name": f"ox-{i}",
            "bed": f"B{i:03d}",
            "subject_id": f"SCALE-{i:04d}",
            "oximeter": {"protocol": "nonin", "model": "OEM III", "serial_no": f"NX{i:05d}"},
            "subject": {"baseline_spo2": 96, "baseline_pulse_bpm": 76},
        },
        source=f"ox-{i}",
    )


async def run_sims(n: int, link_dir: Path, scale: float, session_s: float) -> None:
    """The simulator process: N VM-1s and N Nonins until SIGTERM."""
    clock = ScaledClock(scale)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    sims: list[Any] = []
    for i in range(n):
        sims.append(Vm1PtySimulator(vm1_scenario(i, session_s), clock=clock, link_dir=link_dir))
        sims.append(NoninPtySimulator(ox_scenario(i), clock=clock, link_dir=link_dir))
    for sim in sims:
        await sim.__aenter__()
    (link_dir / "ready").touch()
    await stop.wait()
    for sim in sims:
        await sim.__aexit__(None, None, None)


def gateway_toml(n: int, link_dir: Path, data_dir: Path, port: int, session_s: float) -> str:
    out = [
        f'[gateway]\nid = "gw-scale"\nsite = "bench"\nlog_level = "WARNING"\n'
        f'data_dir = "{data_dir}"\n[broker]\nhost = "127.0.0.1"\nport = {port}\n'
        # Short benchmark doses: 1 ml prescribed, at least 20 s.
        f"[dose_rules]\nprescribed_volume_ml = {FILL_UL / 1000}\nmin_duration_s = 20\n"
    ]
    for i in range(n):
        vm1 = link_dir / vm1_link_name(vm1_scenario(i, session_s))
        ox = link_dir / ox_link_name(ox_scenario(i))
        out.append(
            f'[[devices]]\nid = "neb-{i:03d}"\ntype = "vm1"\nbed = "B{i:03d}"\n'
            f'subject_id = "SCALE-{i:04d}"\nkit_number = "K-{i:04d}"\n'
            f'link = {{ kind = "serial", port = "{vm1}" }}\n'
            f'[[oximeters]]\nid = "ox-{i:03d}"\ntype = "nonin_oem3"\nbed = "B{i:03d}"\n'
            f'subject_id = "SCALE-{i:04d}"\nmodel = "OEM III"\nserial_no = "NX{i:05d}"\n'
            f'link = {{ kind = "serial", port = "{ox}", baudrate = 9600 }}\n'
        )
    return "".join(out)


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


async def one_run(
    n: int, scale: float, session_s: float, profile: Path | None = None
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="dgw-scale-") as tmp_s:
        tmp = Path(tmp_s)
        links = tmp / "links"
        links.mkdir()
        broker = MosquittoBroker(workdir=tmp)
        broker.start()
        sim_args = ["--_sims", str(n), "--_links", str(links), "--scale", str(scale)]
        sims = subprocess.Popen(
            [sys.executable, __file__, *sim_args, "--session-s", str(session_s)],
            cwd=ROOT,
        )
        gw: subprocess.Popen[bytes] | None = None
        clock = ScaledClock(scale)
        dose: list[tuple[dict[str, Any], datetime]] = []
        telemetry_ms: list[float] = []
        try:
            while not (links / "ready").exists():
                await asyncio.sleep(0.2)
            cfg = tmp / "gw.toml"
            cfg.write_text(gateway_toml(n, links, tmp / "data", broker.port, session_s))
            async with aiomqtt.Client("127.0.0.1", broker.port, identifier="edc-bench") as sub:
                await sub.subscribe("#", qos=1)
                prof = [] if profile is None else ["-m", "cProfile", "-o", str(profile)]
                run = ["run", "--config", str(cfg), "--time-scale", str(scale)]
                gw = subprocess.Popen(
                    [sys.executable, *prof, "-m", "devicegw.cli", *run],
                    cwd=ROOT,
                    stderr=open(tmp / "gw.log", "wb"),  # noqa: SIM115
                )
                t0, cpu0, rss = time.monotonic(), proc_cpu_s(gw.pid), 0.0
                deadline = t0 + (40 + session_s * 1.5) / scale + 30
                last_sample = 0.0

                async def read() -> None:
                    async for msg in sub.messages:
                        now = clock.now()
                        topic = str(msg.topic)
                        if "/dose/" in topic or "/telemetry/" in topic:
                            body = json.loads(bytes(msg.payload))  # type: ignore[arg-type]
                            if "/dose/" in topic:
                                dose.append((body, now))
                            else:
                                sent = datetime.fromisoformat(body["utc"])
                                telemetry_ms.append((now - sent).total_seconds() * 1000 / scale)
                        if len(dose) >= n:
                            return

                reader = asyncio.create_task(read())
                while not reader.done() and time.monotonic() < deadline:
                    await asyncio.sleep(0.5)
                    if time.monotonic() - last_sample >= 2:
                        last_sample = time.monotonic()
                        rss = max(rss, proc_rss_mb(gw.pid))
                wall, cpu = time.monotonic() - t0, proc_cpu_s(gw.pid) - cpu0
                reader.cancel()
        finally:
            if gw is not None:
                gw.send_signal(signal.SIGTERM)
                gw.wait(30)
            sims.send_signal(signal.SIGTERM)
            sims.wait(30)
            broker.stop()
        correct = 0
        dose_ms = []
        for body, got in dose:
            i = int(body["subject_id"].split("-")[1])
            if body["verdict"] == "complete" and body["kit_number"] == f"K-{i:04d}":
                correct += 1
            elif os.environ.get("SCALE_DEBUG"):
                print(json.dumps(body)[:600])
            end = datetime.fromisoformat(body["times"]["gateway_end_utc"])
            dose_ms.append((got - end).total_seconds() * 1000 / scale)
        return {
            "beds": n,
            "cpu_share": cpu / wall,
            "rss_mb": rss,
            "events": len(dose),
            "correct": correct,
            "dose_p50": pct(dose_ms, 50),
            "dose_p99": pct(dose_ms, 99),
            "tel_p50": pct(telemetry_ms, 50),
            "tel_p99": pct(telemetry_ms, 99),
            "telemetry": len(telemetry_ms),
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--beds", type=int, nargs="+", default=[50, 100, 200])
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--session-s", type=float, default=60.0)
    ap.add_argument(
        "--profile", type=Path, help="run the gateway under cProfile, write stats here, print top"
    )
    ap.add_argument("--_sims", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--_links", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._sims is not None:
        asyncio.run(run_sims(args._sims, args._links, args.scale, args.session_s))
        return
    print(
        "beds | gateway CPU (one core) | RSS MB | dose events (correct) | "
        "dose end->event p50/p99 ms | telemetry->subscriber p50/p99 ms"
    )
    for n in args.beds:
        r = asyncio.run(one_run(n, args.scale, args.session_s, args.profile))
        print(
            f"{r['beds']} | {r['cpu_share']:.0%} | {r['rss_mb']:.0f} | "
            f"{r['events']}/{n} ({r['correct']}) | {r['dose_p50']:.0f} / {r['dose_p99']:.0f} | "
            f"{r['tel_p50']:.0f} / {r['tel_p99']:.0f} ({r['telemetry']} msgs)",
            flush=True,
        )
        if args.profile is not None and args.profile.exists():
            import pstats

            pstats.Stats(str(args.profile)).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
