"""N beds on one gateway: VM-1 (10 Hz OUTPUT) + Nonin OEM III (75 frames/s) per bed, on ptys.

    .venv/bin/python benchmarks/scale.py --beds 50 100 200 [--scale 1] [--session-s 60]

For each N: a private Mosquitto (tests/mqtt_helpers.py's, on a free loopback
port, ``set_tcp_nodelay`` as deploy/mosquitto/ sets it), one simulator process
holding N simulated VM-1s and N Nonin oximeters on ptys (simulators/vm1_pty.py,
simulators/oximeter_pty.py; sessions start within 10 s of each other, in ten
lockstep groups or, with ``--spread``, evenly; one ~``--session-s`` dose each),
``devicegw run`` against
them, and an EDC-like subscriber (QoS 1, everything under the gateway's base
topic). Prints: the gateway's CPU share of one core and peak RSS (from /proc),
dose events received and correct (verdict complete, subject and kit right),
dose end -> event at the subscriber (``gateway_end_utc`` -> receipt) and
telemetry ``utc`` -> subscriber, p50 / p99. Latencies are on the shared
:class:`~drivers.clock.ScaledClock` (both processes agree on UTC) divided by the
scale, i.e. real milliseconds. No assertions; not part of ``make test``.
"""

# A benchmark driver: blocking process starts and file opens before the measurement are fine.
# ruff: noqa: ASYNC110, ASYNC220, ASYNC230, ASYNC240

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
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

from devicegw.mqtt.publisher import no_delay  # noqa: E402
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
NICE_SIMULATORS = 10
#: Every this-many-th bed's subject desaturates during the session (safety-alert latency).
DIP_EVERY = 10


def start_s(i: int, n: int, spread: bool) -> float:
    """When bed i's session starts: all within 10 s of each other.

    By default in ten groups of n/10 beds whose sessions start (and end) in the same
    millisecond: simulated devices keep perfect step, which real ones, each on its own
    crystal, never do; ``spread`` starts them evenly over the 10 s instead.
    """
    return 15 + (10 * i / n if spread else i % 10)


def vm1_scenario(i: int, session_s: float, n: int, spread: bool) -> Scenario:
    start = start_s(i, n, spread)
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


def ox_scenario(i: int, n: int, spread: bool) -> OximeterScenario:
    spec: dict[str, Any] = {
        "name": f"ox-{i}",
        "bed": f"B{i:03d}",
        "subject_id": f"SCALE-{i:04d}",
        "oximeter": {"protocol": "nonin", "model": "OEM III", "serial_no": f"NX{i:05d}"},
        "subject": {"baseline_spo2": 96, "baseline_pulse_bpm": 76},
    }
    if i % DIP_EVERY == 0:
        # Down to ~86 % (below the 90 % threshold) during the session: an alert raised
        # ~10 s into the dip (sustain_s) and cleared ~10 s after it ends.
        start = start_s(i, n, spread)
        spec["desaturations"] = [
            {"at_s": start + 15, "depth_points": 10, "duration_s": 20, "ramp_s": 3}
        ]
    return parse_oximeter_scenario(spec, source=f"ox-{i}")


async def run_sims(
    n: int, link_dir: Path, scale: float, session_s: float, spread: bool = False
) -> None:
    """The simulator process: N VM-1s and N Nonins until SIGTERM.

    At nice 10: the simulated devices stand in for hardware that does not share the
    gateway's CPU. On two cores, 500 beds' simulators need most of one; at the same
    priority they took turns with the gateway and the broker, and the gateway's
    latencies measured the scheduler, not the gateway.
    """
    os.nice(NICE_SIMULATORS)
    clock = ScaledClock(scale)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    sims: list[Any] = []
    for i in range(n):
        vm1, ox = vm1_scenario(i, session_s, n, spread), ox_scenario(i, n, spread)
        sims.append(Vm1PtySimulator(vm1, clock=clock, link_dir=link_dir))
        sims.append(NoninPtySimulator(ox, clock=clock, link_dir=link_dir))
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
        # The link names depend on the bed only, not on when its session starts.
        vm1 = link_dir / vm1_link_name(vm1_scenario(i, session_s, n, False))
        ox = link_dir / ox_link_name(ox_scenario(i, n, False))
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
    n: int,
    scale: float,
    session_s: float,
    profile: Path | None = None,
    keep: Path | None = None,
    series: Path | None = None,
    spread: bool = False,
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="dgw-scale-") as tmp_s:
        tmp = Path(tmp_s)
        links = tmp / "links"
        links.mkdir()
        # As deploy/mosquitto/devicegw-ward.conf: no Nagle delay towards the subscribers.
        broker = MosquittoBroker(workdir=tmp, extra_conf="set_tcp_nodelay true\n")
        broker.start()
        sim_args = ["--_sims", str(n), "--_links", str(links), "--scale", str(scale)]
        sims = subprocess.Popen(
            [
                sys.executable,
                __file__,
                *sim_args,
                "--session-s",
                str(session_s),
                *(["--spread"] if spread else []),
            ],
            cwd=ROOT,
        )
        gw: subprocess.Popen[bytes] | None = None
        clock = ScaledClock(scale)
        # (the event, received on the shared clock, received in s since the gateway started)
        dose: list[tuple[dict[str, Any], datetime, float]] = []
        telemetry_ms: list[float] = []
        alert_ms: list[float] = []
        lag: dict[str, Any] = {}
        kinds: dict[str, int] = {}
        samples: list[tuple[float, str, float]] = []  # (s since the gateway started, kind, ms)
        try:
            while not (links / "ready").exists():
                await asyncio.sleep(0.2)
            cfg = tmp / "gw.toml"
            cfg.write_text(gateway_toml(n, links, tmp / "data", broker.port, session_s))
            async with aiomqtt.Client("127.0.0.1", broker.port, identifier="edc-bench") as sub:
                no_delay(sub)  # as `devicegw edc-client` does: PUBACKs out at once
                await sub.subscribe("#", qos=1)
                prof = [] if profile is None else ["-m", "cProfile", "-o", str(profile)]
                run = ["run", "--config", str(cfg), "--time-scale", str(scale)]
                gw = subprocess.Popen(
                    [sys.executable, *prof, "-m", "devicegw.cli", *run],
                    cwd=ROOT,
                    stderr=open(tmp / "gw.log", "wb"),  # noqa: SIM115
                )
                t0, cpu0, rss = time.monotonic(), proc_cpu_s(gw.pid), 0.0
                sim_cpu0 = proc_cpu_s(sims.pid)
                broker_cpu0, own_cpu0 = proc_cpu_s(broker.proc.pid), time.process_time()
                deadline = t0 + (40 + session_s * 1.5) / scale + 30
                last_sample = 0.0

                async def read() -> None:
                    async for msg in sub.messages:
                        now = clock.now()
                        topic = str(msg.topic)
                        # <base>/<kind>/<device>[/status]: counted by kind (and status)
                        rest = topic.partition("/gw-scale/")[2].split("/")
                        kind = "/".join(rest[:1] + rest[2:])
                        kinds[kind] = kinds.get(kind, 0) + 1
                        if "/dose/" in topic or "/telemetry/" in topic or "/safety/" in topic:
                            body = json.loads(bytes(msg.payload))  # type: ignore[arg-type]
                            if "/dose/" in topic:
                                dose.append((body, now, time.monotonic() - t0))
                            elif "/safety/" in topic:
                                # The alert's utc: when the deciding sample was received.
                                if body.get("event_type") == "safety_alert" and body.get("utc"):
                                    sent = datetime.fromisoformat(body["utc"])
                                    alert_ms.append((now - sent).total_seconds() * 1000 / scale)
                                    samples.append((time.monotonic() - t0, "alert", alert_ms[-1]))
                            else:
                                sent = datetime.fromisoformat(body["utc"])
                                ms = (now - sent).total_seconds() * 1000 / scale
                                telemetry_ms.append(ms)
                                samples.append((time.monotonic() - t0, "telemetry", ms))
                        if len(dose) >= n:
                            return

                reader = asyncio.create_task(read())
                while not reader.done() and time.monotonic() < deadline:
                    await asyncio.sleep(0.5)
                    if time.monotonic() - last_sample >= 2:
                        last_sample = time.monotonic()
                        rss = max(rss, proc_rss_mb(gw.pid))
                wall, cpu = time.monotonic() - t0, proc_cpu_s(gw.pid) - cpu0
                sim_cpu = proc_cpu_s(sims.pid) - sim_cpu0
                broker_cpu = proc_cpu_s(broker.proc.pid) - broker_cpu0
                own_cpu = time.process_time() - own_cpu0
                reader.cancel()
                with contextlib.suppress(OSError, ValueError):
                    status = json.loads((tmp / "data" / "status.json").read_text())
                    lag = status.get("loop_lag") or {}
        finally:
            if gw is not None:
                gw.send_signal(signal.SIGTERM)
                gw.wait(30)
            sims.send_signal(signal.SIGTERM)
            sims.wait(30)
            broker.stop()
            if keep is not None:
                keep.mkdir(parents=True, exist_ok=True)
                for src, name in (
                    (tmp / "gw.log", f"gw-{n}.log"),
                    (tmp / "data" / "devicegw.sqlite3", f"store-{n}.sqlite3"),
                    (tmp / "data" / "status.json", f"status-{n}.json"),
                ):
                    if src.exists():
                        shutil.copyfile(src, keep / name)
        correct = 0
        dose_ms = []
        for body, got, got_s in dose:
            i = int(body["subject_id"].split("-")[1])
            if body["verdict"] == "complete" and body["kit_number"] == f"K-{i:04d}":
                correct += 1
            elif os.environ.get("SCALE_DEBUG"):
                print(json.dumps(body)[:600])
            end = datetime.fromisoformat(body["times"]["gateway_end_utc"])
            dose_ms.append((got - end).total_seconds() * 1000 / scale)
            samples.append((got_s, "dose_end", dose_ms[-1]))
        if series is not None:
            with series.open("a") as out:
                out.writelines(f"{n},{t:.3f},{kind},{ms:.1f}\n" for t, kind, ms in samples)
        return {
            "beds": n,
            "cpu_share": cpu / wall,
            "sim_cpu_share": sim_cpu / wall,
            "broker_cpu_share": broker_cpu / wall,
            "subscriber_cpu_share": own_cpu / wall,
            "rss_mb": rss,
            "events": len(dose),
            "correct": correct,
            "dose_p50": pct(dose_ms, 50),
            "dose_p99": pct(dose_ms, 99),
            "tel_p50": pct(telemetry_ms, 50),
            "tel_p99": pct(telemetry_ms, 99),
            "telemetry": len(telemetry_ms),
            "alerts": len(alert_ms),
            "alert_p50": pct(alert_ms, 50),
            "alert_p99": pct(alert_ms, 99),
            "lag_max": lag.get("max_s", float("nan")) * 1000,
            "kinds": dict(sorted(kinds.items())),
            "wall_s": wall,
            "lag_over": lag.get("over_50ms", 0) / max(1, lag.get("samples", 0)),
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--beds", type=int, nargs="+", default=[50, 100, 200])
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--session-s", type=float, default=60.0)
    ap.add_argument(
        "--profile", type=Path, help="run the gateway under cProfile, write stats here, print top"
    )
    ap.add_argument(
        "--keep", type=Path, help="copy each run's gateway log and status.json into this dir"
    )
    ap.add_argument(
        "--series",
        type=Path,
        help="write every latency sample (s since the gateway started, kind, ms) to this CSV",
    )
    ap.add_argument(
        "--spread",
        action="store_true",
        help="start the sessions evenly over 10 s, not in ten lockstep groups",
    )
    ap.add_argument("--_sims", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--_links", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._sims is not None:
        asyncio.run(run_sims(args._sims, args._links, args.scale, args.session_s, args.spread))
        return
    print(
        "beds | gateway CPU (one core) | simulators CPU | RSS MB | dose events (correct) | "
        "dose end->event p50/p99 ms | telemetry->subscriber p50/p99 ms | "
        "safety alert->subscriber p50/p99 ms | event loop late: max ms, share of samples > 50 ms"
    )
    for n in args.beds:
        r = asyncio.run(
            one_run(
                n, args.scale, args.session_s, args.profile, args.keep, args.series, args.spread
            )
        )
        print(
            f"{r['beds']} | {r['cpu_share']:.0%} | {r['sim_cpu_share']:.0%} | {r['rss_mb']:.0f} | "
            f"{r['events']}/{n} ({r['correct']}) | {r['dose_p50']:.0f} / {r['dose_p99']:.0f} | "
            f"{r['tel_p50']:.0f} / {r['tel_p99']:.0f} ({r['telemetry']} msgs) | "
            f"{r['alert_p50']:.0f} / {r['alert_p99']:.0f} ({r['alerts']} msgs) | "
            f"{r['lag_max']:.0f} ms, {r['lag_over']:.1%}",
            flush=True,
        )
        per_s = ", ".join(f"{k} {v / r['wall_s']:.0f}" for k, v in r["kinds"].items())
        print(f"    messages/s at the subscriber by topic kind: {per_s}", flush=True)
        print(
            f"    CPU of the broker {r['broker_cpu_share']:.0%}, of the subscriber (this "
            f"process) {r['subscriber_cpu_share']:.0%}; load average {os.getloadavg()[0]:.1f}",
            flush=True,
        )
        if args.profile is not None and args.profile.exists():
            import pstats

            pstats.Stats(str(args.profile)).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
