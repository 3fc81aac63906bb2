"""Strings from devices are data, never markup or control codes (issue 14 item 6).

A simulated VM-1 identifies with serial ``ESC[2J ESC[31mX`` (clear the screen,
turn red) and firmware ``[/]`` + newline (a rich closing tag and a row
split); another, refused by the allow-list, with an OSC title-setting
sequence. The daemon runs as a process over real ptys; ``devicegw status`` and
``devicegw audit show`` run on a real pseudo-terminal, as an operator runs
them, wide and narrow. Their output shows the strings as visible escapes, one
row per record, and never the raw sequences; no MQTT topic level and no file
name is made from them.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import pty
import struct
import subprocess
import termios
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.mqtt_helpers import MosquittoBroker, collecting
from tests.process_harness import DEVICEGW, ROOT, run_cli, start_gateway, stop

pytestmark = pytest.mark.e2e

CLEAR_RED = "\x1b[2J\x1b[31mX"  # serial_no of the accepted device (10 of 12 characters)
BAD_FIRMWARE = "[/]\n"  # rich closing tag + newline
OSC_TITLE = "\x1b]0;PWN\x07"  # serial_no of the refused device
RAW = ("\x1b[2J", "\x1b[31mX", "\x1b]0;", "\x07", "[/]\n")
SCALE = 10.0


def scenario(tmp_path: Path, name: str, serial: str, firmware: str) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(
        f'name = "{name}"\n[device]\nserial_no = {json.dumps(serial)}\n'
        f"firmware = {json.dumps(firmware)}\nlast_session_no = 7\n"
        "[[sessions]]\nfill_at_s = 5\nfill_ul = 3000\nstart_at_s = 30\nrate_ul_min = 400\n"
    )
    return path


@contextlib.asynccontextmanager
async def simulate(paths: list[Path], link_dir: Path) -> AsyncIterator[list[str]]:
    """`devicegw simulate` as a process; yields the port of each device."""
    args = [a for p in paths for a in ("--scenario", str(p))]
    proc = await asyncio.create_subprocess_exec(
        *DEVICEGW,
        "simulate",
        *args,
        "--link-dir",
        str(link_dir),
        "--time-scale",
        str(SCALE),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        ports = []
        for _ in paths:
            line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
            assert "\x1b" not in line  # the simulator's own listing escapes them too
            ports.append(line.split()[1])
        yield ports
    finally:
        await stop(proc)


def on_a_terminal(*args: str, columns: int) -> tuple[int, str]:
    """Run ``devicegw ARGS`` with a real pty as its terminal; (exit code, all it wrote)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 60, columns, 0, 0))
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": str(columns), "LINES": "60"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen(
        [*DEVICEGW, *args], stdin=slave, stdout=slave, stderr=slave, cwd=ROOT, env=env
    )
    os.close(slave)
    chunks = []
    try:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        rc = proc.wait(timeout=60)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return rc, b"".join(chunks).decode("utf-8", errors="replace")


def assert_shown_as_data(out: str) -> None:
    assert "Traceback" not in out and "MarkupError" not in out, out[-3000:]
    for raw in RAW:
        assert raw not in out.replace("\r\n", "\n"), (raw, out[-3000:])


def note_of(out: str, device: str) -> str:
    """The last column of a device's row in the status table, wrapped lines joined."""
    lines = out.splitlines()
    start = next(i for i, ln in enumerate(lines) if f"│ {device} " in ln)
    cells = []
    for ln in lines[start:]:
        if not ln.startswith("│") or (ln is not lines[start] and ln.split("│")[1].strip()):
            break  # the table's border, or the next device's row
        cells.append(ln.split("│")[-2].strip())
    return " ".join(cells)


def write_config(path: Path, broker: MosquittoBroker, ports: list[str], data_dir: Path) -> Path:
    path.write_text(
        f'[gateway]\nid = "gw-hostile"\nsite = "s1"\ndata_dir = "{data_dir}"\n'
        f'[broker]\nhost = "127.0.0.1"\nport = {broker.port}\n'
        "reconnect_initial_s = 0.2\nreconnect_max_s = 1.0\n"
        '[[devices]]\nid = "neb1"\ntype = "vm1"\nbed = "B1"\nsubject_id = "CVD-001"\n'
        f'kit_number = "K-1"\nlink = {{ kind = "serial", port = "{ports[0]}" }}\n'
        '[[devices]]\nid = "neb2"\ntype = "vm1"\nbed = "B2"\nsubject_id = "CVD-002"\n'
        f'kit_number = "K-2"\nexpected_serial = "VM1-000123"\n'
        f'link = {{ kind = "serial", port = "{ports[1]}" }}\n'
    )
    return path


async def wait_status(config: Path, timeout: float = 60) -> dict[str, object]:
    """`devicegw status --json` until neb1 is identified and neb2 refused."""
    deadline = time.monotonic() + timeout
    while True:
        res = await asyncio.to_thread(run_cli, "status", "--config", str(config), "--json")
        if res.returncode == 0:
            snap = json.loads(res.stdout)
            d1, d2 = snap["devices"]["neb1"], snap["devices"]["neb2"]
            if d1["identity"] and d2["refused"]:
                return snap  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, res.stdout + res.stderr
        await asyncio.sleep(0.5)


async def test_hostile_identity_through_status_and_audit_show(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    accepted = scenario(tmp_path, "clear-red", CLEAR_RED, BAD_FIRMWARE)
    refused = scenario(tmp_path, "osc-title", OSC_TITLE, "1.0")
    data_dir = tmp_path / "data"
    async with (
        simulate([accepted, refused], tmp_path / "links") as ports,
        collecting(mosquitto.host, mosquitto.port, ["#"]) as col,
    ):
        config = write_config(tmp_path / "gw.toml", mosquitto, ports, data_dir)
        gw = await start_gateway(config, SCALE, tmp_path / "gw.log")
        try:
            snap = await wait_status(config)
            # The status file keeps the strings as data (JSON escapes them).
            devices = snap["devices"]
            assert isinstance(devices, dict)
            assert devices["neb1"]["identity"]["serial_no"] == CLEAR_RED
            assert devices["neb1"]["identity"]["firmware"] == BAD_FIRMWARE
            for columns in (250, 80):
                rc, out = await asyncio.to_thread(
                    on_a_terminal, "status", "--config", str(config), columns=columns
                )
                assert rc == 0, out[-3000:]
                assert_shown_as_data(out)
                if columns == 250:  # (at 80 columns the table folds its cells)
                    assert "\\x1b[2J\\x1b[31mX" in out  # visible, whole
                    [row] = [ln for ln in out.splitlines() if "neb1" in ln]
                    assert "fw [/]\\n" in row  # the newline did not split the row
                    assert "\\x1b]0;PWN\\x07" in note_of(out, "neb2")  # the refusal names it
        finally:
            await stop(gw)
        topics = {m.topic for m in col.messages}
    assert topics
    for topic in topics:
        assert "\x1b" not in topic and "[/]" not in topic and "PWN" not in topic, topic
    for path in data_dir.rglob("*"):
        assert "\x1b" not in path.name and "[" not in path.name, path

    for columns in (250, 80):
        rc, out = await asyncio.to_thread(
            on_a_terminal, "audit", "show", "--config", str(config), columns=columns
        )
        assert rc == 0, out[-3000:]
        assert_shown_as_data(out)
        assert "\\x1b[2J\\x1b[31mX" in out
        assert "\\x1b]0;PWN\\x07" in out
        if columns == 250:
            [identified] = [ln for ln in out.splitlines() if "device_identified" in ln]
            assert "firmware=[/]\\n" in identified  # one record, one row
            assert "serial_no=\\x1b[2J\\x1b[31mX" in identified
            refusals = [ln for ln in out.splitlines() if "device_refused" in ln]
            assert refusals  # one per connect: the device keeps being refused
            assert all("serial_no=\\x1b]0;PWN\\x07" in row for row in refusals)
