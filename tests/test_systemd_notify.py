"""sd_notify: the real daemon process talks to a unix datagram socket as systemd would.

The test plays systemd's side: it binds the socket named in NOTIFY_SOCKET with
SO_PASSCRED (so every datagram carries the sender's pid, as systemd checks for
NotifyAccess=main), starts `devicegw run` with WATCHDOG_USEC, and reads what
arrives. No systemd is needed (none runs here as PID 1).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from devicegw.config import parse_config
from devicegw.runtime import systemd_notify
from devicegw.runtime.gateway import Gateway
from devicegw.runtime.systemd_notify import Notifier
from drivers.clock import SystemClock
from tests.mqtt_helpers import MosquittoBroker, free_port
from tests.process_harness import DEVICEGW, ROOT

WATCHDOG_USEC = 400_000  # the daemon pings every 0.2 s


@dataclass(frozen=True)
class Datagram:
    pid: int
    fields: dict[str, str]


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    sock.bind(str(tmp_path / "notify.sock"))
    try:
        yield sock
    finally:
        sock.close()


def receive(sock: socket.socket, timeout: float) -> Datagram | None:
    """One datagram with the sender's pid (SCM_CREDENTIALS), or None after ``timeout``."""
    sock.settimeout(timeout)
    try:
        data, ancillary, _flags, _addr = sock.recvmsg(4096, socket.CMSG_SPACE(12))
    except TimeoutError:
        return None
    pid = -1
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            pid, _uid, _gid = struct.unpack("iII", payload[:12])
    fields = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
    return Datagram(pid, fields)


def receive_until(
    sock: socket.socket,
    done: Callable[[list[Datagram]], bool],
    timeout: float,
    into: list[Datagram],
) -> list[Datagram]:
    deadline = time.monotonic() + timeout
    while not done(into):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"not seen in {timeout} s; got {[d.fields for d in into]}")
        dgram = receive(sock, left)
        if dgram is not None:
            into.append(dgram)
    return into


def test_daemon_reports_ready_watchdog_status_and_stopping(
    mosquitto: MosquittoBroker, notify_socket: socket.socket, tmp_path: Path
) -> None:
    config = tmp_path / "gw.toml"
    config.write_text(
        f'[gateway]\nid = "gw-sd"\nsite = "s1"\ndata_dir = "{tmp_path / "data"}"\n'
        f'[broker]\nhost = "127.0.0.1"\nport = {mosquitto.port}\n'
        "reconnect_initial_s = 0.2\nreconnect_max_s = 1.0\n"
        # A device whose port does not exist: the gateway is ready all the same.
        '[[devices]]\nid = "neb1"\ntype = "vm1"\nbed = "B1"\nsubject_id = "CVD-001"\n'
        f'kit_number = "K-1"\nlink = {{ kind = "serial", port = "{tmp_path / "no-tty"}" }}\n'
    )
    env = {
        **os.environ,
        "NOTIFY_SOCKET": notify_socket.getsockname(),
        "WATCHDOG_USEC": str(WATCHDOG_USEC),
    }
    with open(tmp_path / "gw.log", "wb") as log:
        proc = subprocess.Popen(
            [*DEVICEGW, "run", "--config", str(config)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    got: list[Datagram] = []
    try:
        receive_until(
            notify_socket,
            lambda d: (
                sum("WATCHDOG" in x.fields for x in d) >= 5
                and any("broker connected" in x.fields.get("STATUS", "") for x in d)
            ),
            timeout=60,
            into=got,
        )
        proc.send_signal(signal.SIGTERM)
        receive_until(
            notify_socket, lambda d: any("STOPPING" in x.fields for x in d), timeout=30, into=got
        )
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    # Every message comes from the daemon's own (main) process: NotifyAccess=main holds.
    assert {d.pid for d in got} == {proc.pid}
    first = got[0].fields
    assert first["READY"] == "1"
    assert "nebulizers 0/1 connected" in first["STATUS"]
    assert sum("READY" in d.fields for d in got) == 1
    watchdogs = [i for i, d in enumerate(got) if d.fields.get("WATCHDOG") == "1"]
    assert len(watchdogs) >= 5 and watchdogs[0] > 0  # READY first, then the pings
    assert got[-1].fields.get("STOPPING") == "1"
    assert "broker connected" in " ".join(d.fields.get("STATUS", "") for d in got)


def _drain(sock: socket.socket) -> list[bytes]:
    """Every datagram already queued on the (non-blocking) socket."""
    out = []
    try:
        while True:
            out.append(sock.recv(4096))
    except BlockingIOError:
        return out


async def test_a_stuck_event_loop_stops_the_watchdog(
    notify_socket: socket.socket, tmp_path: Path
) -> None:
    """The ping is sent by the event loop itself: while the loop is blocked, none goes out."""
    config = parse_config(
        {
            "gateway": {"id": "gw-sd", "site": "s1", "data_dir": str(tmp_path / "data")},
            "broker": {"host": "127.0.0.1", "port": free_port()},  # nobody there
        }
    )
    gw = Gateway(config, clock=SystemClock())
    notifier = Notifier(notify_socket.getsockname(), watchdog_usec=100_000)  # ping every 50 ms
    loop = asyncio.get_running_loop()
    notify_socket.setblocking(False)

    async def next_message() -> bytes:
        return await asyncio.wait_for(loop.sock_recv(notify_socket, 4096), 10)

    task = asyncio.create_task(systemd_notify.run(gw.snapshot, notifier))
    try:
        while await next_message() != b"WATCHDOG=1":
            pass
        _drain(notify_socket)  # everything sent so far is read
        time.sleep(0.5)  # noqa: ASYNC251 - deliberately block the loop for ten ping intervals
        assert _drain(notify_socket) == []  # a stuck loop sends nothing: systemd would restart
        pings = 0
        while pings < 2:  # once the loop runs again, so does the watchdog
            pings += await next_message() == b"WATCHDOG=1"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        gw.store.close()
    assert b"STOPPING=1" in b"".join(_drain(notify_socket))


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = Notifier.from_environment({"WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled
    assert notifier.ping_interval_s is None
    assert notifier.ready("x") is False
    assert notifier.watchdog() is False


def test_watchdog_settings_from_the_environment() -> None:
    env = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "30000000"}
    assert Notifier.from_environment(env).ping_interval_s == 15.0
    # WATCHDOG_PID names another process (inherited environment): not ours to serve.
    other = {**env, "WATCHDOG_PID": str(os.getpid() + 1)}
    assert Notifier.from_environment(other).ping_interval_s is None
    mine = {**env, "WATCHDOG_PID": "4242"}
    assert Notifier.from_environment(mine, pid=4242).ping_interval_s == 15.0
    for bad in ("soon", "0", "-5"):
        assert Notifier.from_environment({**env, "WATCHDOG_USEC": bad}).ping_interval_s is None
    # A relative or non-unix address is refused (vsock: is not supported).
    assert not Notifier("vsock:2:1234").enabled


def test_abstract_socket_and_one_line_status() -> None:
    name = f"devicegw-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        notifier = Notifier("@" + name)
        assert notifier.status("line one\nREADY=1\x1b[2J")
        sock.settimeout(5)
        message = sock.recv(4096).decode()
        notifier.close()
    # A newline in a status cannot smuggle in another protocol field.
    assert message.split("\n") == ["STATUS=line one READY=1 [2J"]


def test_send_failure_is_logged_once_and_never_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier(str(tmp_path / "gone.sock"), watchdog_usec=1_000_000)
    with caplog.at_level(logging.DEBUG, logger="devicegw.runtime.systemd_notify"):
        assert notifier.watchdog() is False
        assert notifier.watchdog() is False
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert notifier.sent == 0
    notifier.close()
