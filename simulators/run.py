"""Run several simulated devices at once: what ``devicegw simulate`` calls."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import TextIO

from drivers.clock import Clock
from simulators.errors import ScenarioError
from simulators.scenario import load_scenario
from simulators.vm1_pty import Vm1PtySimulator, default_link_name

__all__ = ["run_scenarios", "simulate_main"]

EXIT_SCENARIO = 2


@asynccontextmanager
async def run_scenarios(
    paths: Sequence[str | Path], clock: Clock, link_dir: str | Path
) -> AsyncIterator[list[Vm1PtySimulator]]:
    """Load every scenario (all validated before any pty is made), start one simulator each.

    Each device's port is ``<link_dir>/usb-VM-1_<serial_no>-if00``; two scenarios
    with the same serial number are a :class:`ScenarioError`. All simulators
    share ``clock`` and power on together; they are closed (ptys and symlinks
    removed) when the context exits.
    """
    scenarios = [load_scenario(p) for p in paths]
    seen: dict[str, str | Path] = {}
    for path, scenario in zip(paths, scenarios, strict=True):
        name = default_link_name(scenario)
        if name in seen:
            raise ScenarioError(
                f"{path}: device.serial_no {scenario.device.serial_no!r} is also used by "
                f"{seen[name]}; each simulated device needs its own serial number"
            )
        seen[name] = path
    async with AsyncExitStack() as stack:
        sims = []
        for scenario in scenarios:
            sim = Vm1PtySimulator(scenario, clock=clock, link_dir=link_dir)
            sims.append(await stack.enter_async_context(sim))
        yield sims


async def simulate_main(
    paths: Sequence[str | Path],
    *,
    clock: Clock,
    link_dir: str | Path,
    out: TextIO | None = None,
) -> int:
    """Run the scenarios until cancelled, after printing one line per device.

    Line format: ``<serial_no>  <stable path> -> <pty>  (<scenario name>)``.
    The devices keep running (STATUS at 1 Hz) after their scripts end. A bad
    scenario file prints the error to stderr and returns 2.
    """
    out = out if out is not None else sys.stdout
    try:
        async with run_scenarios(paths, clock, link_dir) as sims:
            for sim in sims:
                # A scenario's serial may hold control characters (hostile-device tests).
                serial = sim.scenario.device.serial_no.encode("unicode_escape").decode("ascii")
                name = sim.scenario.name.encode("unicode_escape").decode("ascii")
                out.write(f"{serial}  {sim.path} -> {sim.pts_path}  ({name})\n")
            out.flush()
            await asyncio.Event().wait()
    except ScenarioError as exc:
        sys.stderr.write(f"devicegw simulate: {exc}\n")
        return EXIT_SCENARIO
    return 0
