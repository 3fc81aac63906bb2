"""The gateway and the simulator as separate OS processes, so either can be SIGKILLed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEVICEGW = [sys.executable, "-m", "devicegw.cli"]


async def start_simulator(
    scenario: str, link_dir: Path, scale: float
) -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(
        *DEVICEGW,
        "simulate",
        "--scenario",
        f"simulators/scenarios/{scenario}.toml",
        "--link-dir",
        str(link_dir),
        "--time-scale",
        str(scale),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
    return proc, line.split()[1]


def write_config(path: Path, *, broker_port: int, port: str, data_dir: Path) -> Path:
    path.write_text(
        f'[gateway]\nid = "gw-proc"\nsite = "s1"\ndata_dir = "{data_dir}"\n'
        f'[broker]\nhost = "127.0.0.1"\nport = {broker_port}\n'
        "reconnect_initial_s = 0.2\nreconnect_max_s = 1.0\n"
        '[[devices]]\nid = "neb1"\ntype = "vm1"\nbed = "B1"\nsubject_id = "CVD-001"\n'
        f'kit_number = "K-1"\nlink = {{ kind = "serial", port = "{port}" }}\n'
    )
    return path


async def start_gateway(config: Path, scale: float, log: Path) -> asyncio.subprocess.Process:
    with open(log, "ab") as err:  # noqa: ASYNC230 - opening a log file once
        return await asyncio.create_subprocess_exec(
            *DEVICEGW,
            "run",
            "--config",
            str(config),
            "--time-scale",
            str(scale),
            cwd=ROOT,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=err,
        )


async def stop(proc: asyncio.subprocess.Process, sig: int = signal.SIGTERM) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        await asyncio.wait_for(proc.wait(), 20)


@contextlib.asynccontextmanager
async def simulator(scenario: str, link_dir: Path, scale: float) -> AsyncIterator[str]:
    proc, port = await start_simulator(scenario, link_dir, scale)
    try:
        yield port
    finally:
        await stop(proc)


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*DEVICEGW, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False
    )


def kill9(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGKILL)
