"""What recording costs the daemon.

    .venv/bin/python benchmarks/recording_overhead.py [--devices 10] [--scale 10] [--seconds 15]

Two measurements, printed, no assertions:

1. Per record, in-process: the cost of ``RecordingWriter.bytes_received``
   (write to the OS per record, and batched per second) next to the cost of
   the pipeline's ``feed`` for the same bytes (a recorded 10 Hz session).

2. The daemon at a fixed load: ``devicegw simulate`` (ptys, a separate
   process) runs ``--devices`` nebulizers in long sessions at OUTPUT 20 Hz on
   a clock ``--scale`` times real time; ``devicegw run`` is started against
   them and a private Mosquitto for ``--seconds`` without and with
   ``--record``, alternately, twice each. The daemon's CPU time (user + sys,
   from ``wait4``) per run is compared. Needs ``mosquitto`` on the PATH.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devicegw.cli.replay import simulate_record, synthesized_device  # noqa: E402
from devicegw.config import parse_config  # noqa: E402
from devicegw.core.vm1_pipeline import Vm1Pipeline  # noqa: E402
from devicegw.recording.format import RX, RecordingWriter, iter_records  # noqa: E402
from simulators.scenario import load_scenario  # noqa: E402

DEVICEGW = [sys.executable, "-m", "devicegw.cli"]


class NullSink:
    def dose_record(self, *_: object) -> None: ...

    def device_status(self, *_: object) -> None: ...

    def device_detail(self, *_: object) -> None: ...

    def telemetry(self, *_: object) -> None: ...


def per_record() -> None:
    scenario = load_scenario(ROOT / "simulators" / "scenarios" / "complete.toml")
    with tempfile.TemporaryDirectory() as tmp:
        simulate_record([scenario], tmp)
        [path] = Path(tmp).glob("*.dgwrec")
        records = [r for r in iter_records(path) if r.kind == RX]
        device = synthesized_device(0, scenario)
        config = parse_config(
            {"gateway": {"id": "gw", "site": "s"}, "devices": [device.model_dump()]}
        )
        stamped = [(r.payload, r.utc, r.mono) for r in records]

        def feed_all() -> float:
            p = Vm1Pipeline(device, config, NullSink())
            p.link_up(stamped[0][1])
            t0 = time.perf_counter()
            for data, utc, mono in stamped:
                p.feed(data, utc, mono)
            return time.perf_counter() - t0

        def record_all(flush_s: float) -> float:
            w = RecordingWriter(Path(tmp) / f"w{flush_s}", config, flush_interval_s=flush_s)
            t0 = time.perf_counter()
            for data, utc, mono in stamped:
                w.bytes_received(device.id, data, utc, mono)
            w.close()
            return time.perf_counter() - t0

        n = len(stamped)
        feed = min(feed_all() for _ in range(3))
        rec0 = min(record_all(0.0) for _ in range(3))
        rec1 = min(record_all(1.0) for _ in range(3))
    print(f"per record ({n} rx records of a 10 Hz session, best of 3):")
    print(f"  pipeline feed                 {feed / n * 1e6:6.2f} us/record")
    print(
        f"  recorder, write per record    {rec0 / n * 1e6:6.2f} us/record "
        f"(+{rec0 / feed:.0%} of the pipeline)"
    )
    print(
        f"  recorder, batched per 1 s     {rec1 / n * 1e6:6.2f} us/record "
        f"(+{rec1 / feed:.0%} of the pipeline)"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def scenario_toml(i: int) -> str:
    return f"""name = "load-{i}"
[device]
serial_no = "VM1-L{i:04d}"
mains = true
seed = {i}
[[sessions]]
fill_at_s = 1
fill_ul = 6000
start_at_s = 2
rate_ul_min = 140
"""


def daemon_cpu(devices: int, scale: float, seconds: float) -> None:
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not os.path.exists(mosquitto):
        print("daemon CPU: skipped (mosquitto not installed)")
        return
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        port = free_port()
        conf = tmp / "mosquitto.conf"
        run_as = "user root\n" if os.geteuid() == 0 else ""
        conf.write_text(f"{run_as}listener {port} 127.0.0.1\nallow_anonymous true\n")
        broker = subprocess.Popen([mosquitto, "-c", str(conf)], stderr=subprocess.DEVNULL)
        links = tmp / "links"
        scen_args: list[str] = []
        for i in range(devices):
            f = tmp / f"load-{i}.toml"
            f.write_text(scenario_toml(i))
            scen_args += ["--scenario", str(f)]
        sim = subprocess.Popen(
            [
                *DEVICEGW,
                "simulate",
                *scen_args,
                "--link-dir",
                str(links),
                "--time-scale",
                str(scale),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=ROOT,
        )
        dev_lines = "".join(
            f'[[devices]]\nid = "neb-{i:02d}"\ntype = "vm1"\nbed = "B{i:02d}"\n'
            f'subject_id = "LOAD-{i:04d}"\nkit_number = "K-{i:04d}"\noutput_rate_hz = 20\n'
            f'link = {{ port = "{links}/usb-VM-1_VM1-L{i:04d}-if00" }}\n'
            for i in range(devices)
        )
        cfg = tmp / "gw.toml"
        cfg.write_text(
            f'[gateway]\nid = "gw-load"\nsite = "bench"\nlog_level = "WARNING"\n'
            f'data_dir = "{tmp / "data"}"\n[broker]\nhost = "127.0.0.1"\nport = {port}\n'
            + dev_lines
        )
        time.sleep(2.0)
        results: dict[bool, list[float]] = {False: [], True: []}
        sizes: list[int] = []
        try:
            for rnd in range(2):
                for record in (False, True):
                    args = [*DEVICEGW, "run", "--config", str(cfg), "--time-scale", str(scale)]
                    rec_dir = tmp / f"rec-{rnd}"
                    if record:
                        args += ["--record", str(rec_dir)]
                    gw = subprocess.Popen(
                        args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                    )
                    time.sleep(seconds)
                    gw.send_signal(signal.SIGTERM)
                    _, _, usage = os.wait4(gw.pid, 0)
                    gw.returncode = 0  # reaped by wait4
                    results[record].append(usage.ru_utime + usage.ru_stime)
                    if record:
                        sizes.append(sum(p.stat().st_size for p in rec_dir.glob("*.dgwrec")))
        finally:
            sim.terminate()
            sim.wait(10)
            broker.terminate()
            broker.wait(10)
    load = devices * (20 + 1) * scale
    print(
        f"daemon CPU at a fixed load: {devices} devices x (20 Hz OUTPUT + 1 Hz STATUS) x "
        f"clock {scale:g}x = ~{load:,.0f} frames/s, {seconds:g} s per run (incl. start-up)"
    )
    off, on = results[False], results[True]
    print(f"  without recording: {', '.join(f'{c:.2f}' for c in off)} s CPU")
    print(f"  with recording:    {', '.join(f'{c:.2f}' for c in on)} s CPU")
    print(
        f"  mean {sum(off) / len(off):.2f} s -> {sum(on) / len(on):.2f} s "
        f"({(sum(on) / sum(off) - 1):+.1%}); recorded {sum(sizes) / len(sizes) / 1e6:.1f} MB/run"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--devices", type=int, default=10)
    p.add_argument("--scale", type=float, default=10.0)
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--skip-daemon", action="store_true")
    args = p.parse_args()
    per_record()
    if not args.skip_daemon:
        daemon_cpu(args.devices, args.scale, args.seconds)


if __name__ == "__main__":
    main()
