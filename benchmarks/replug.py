"""Replug latency: a VM-1's port unplugged and plugged back, in real time.

    .venv/bin/python benchmarks/replug.py                  # 8 cycles, 5 s away, 5 s back
    .venv/bin/python benchmarks/replug.py --cycles 20 --away 2 --back 3

A simulated VM-1 on a real pty behind a by-id style symlink; the gateway's
own runner (``NebulizerRunner``) keeps it connected. Each cycle removes the
symlink and the pty (as udev does on unplug) for ``--away`` seconds, then
brings them back for ``--back`` seconds. Printed per cycle: real seconds from
the symlink's return to the port being open, and to the device being
identified (IDENT accepted: its data is used). Issue 14's field test of the
old loop: 2.23, 1.97, 1.46, 1.29 s and four times not at all.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devicegw.config import parse_config  # noqa: E402
from devicegw.runtime.link_factory import link_factory  # noqa: E402
from devicegw.runtime.nebulizer_runner import NebulizerRunner  # noqa: E402
from drivers.clock import SystemClock  # noqa: E402
from simulators.scenario import load_scenario  # noqa: E402
from simulators.vm1_pty import Vm1PtySimulator  # noqa: E402
from tests.test_replug import NullSink, until  # noqa: E402


async def main(cycles: int, away_s: float, back_s: float) -> None:
    clock = SystemClock()
    scenario = load_scenario(ROOT / "simulators" / "scenarios" / "complete.toml")
    with tempfile.TemporaryDirectory() as tmp:
        async with Vm1PtySimulator(scenario, clock=clock, link_dir=tmp, name="vm1") as sim:
            config = parse_config(
                {
                    "gateway": {"id": "gw", "site": "s1"},
                    "devices": [
                        {
                            "id": "neb1",
                            "type": "vm1",
                            "bed": "B1",
                            "subject_id": "CVD-001",
                            "kit_number": "K-1",
                            "link": {"kind": "serial", "port": str(sim.path)},
                        }
                    ],
                }
            )
            device = config.devices[0]
            runner = NebulizerRunner(
                device, config, link_factory=link_factory(device), clock=clock, sink=NullSink()
            )
            task = asyncio.create_task(runner.run())
            opened: list[float] = []
            identified: list[float] = []
            missed = 0
            try:
                await until(lambda: runner.health.identified, 20)
                for i in range(cycles):
                    connects = runner.health.connects
                    sim.drop_link(away_s)
                    await until(lambda: not sim.link_up, 10)
                    await sim.wait_link_up()
                    back = time.monotonic()
                    if await until(lambda c=connects: runner.health.connects > c, back_s):
                        opened.append(time.monotonic() - back)
                    if await until(
                        lambda: runner.health.identified,
                        max(0.0, back_s - (time.monotonic() - back)),
                    ):
                        identified.append(time.monotonic() - back)
                        print(
                            f"cycle {i + 1}: open after {opened[-1] * 1000:.0f} ms, "
                            f"identified after {identified[-1] * 1000:.0f} ms"
                        )
                    else:
                        missed += 1
                        print(f"cycle {i + 1}: not reopened within {back_s:g} s")
                    await asyncio.sleep(max(0.0, back_s - (time.monotonic() - back)))
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    if identified:
        print(
            f"{len(identified)}/{cycles} reopened; identified after median "
            f"{statistics.median(identified) * 1000:.0f} ms, max {max(identified) * 1000:.0f} ms; "
            f"open after median {statistics.median(opened) * 1000:.0f} ms"
        )
    print(f"missed: {missed}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cycles", type=int, default=8)
    p.add_argument("--away", type=float, default=5.0)
    p.add_argument("--back", type=float, default=5.0)
    a = p.parse_args()
    asyncio.run(main(a.cycles, a.away, a.back))
