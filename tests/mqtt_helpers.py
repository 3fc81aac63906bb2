"""Test helpers: a private Mosquitto process and a subscriber that collects messages."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(condition: bool, why: str) -> None:
    """Skip locally when a real part is missing; in CI a missing part is a failure."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required real component missing in CI: {why}")
    pytest.skip(why)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def free_port_outside_ephemeral() -> int:
    """A free loopback port below the ephemeral range, for a broker that a client tries
    thousands of times before it listens: a connect to a closed port in the ephemeral
    range can pick that very port as its source and connect to itself (TCP
    self-connect), holding the port the broker then cannot bind."""
    low = 20000
    with contextlib.suppress(OSError, ValueError, IndexError):
        low = min(low, int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0]))
    for port in range(low - 1, 1024, -1):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port below the ephemeral range")


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/bin/mosquitto") if os.path.exists(p)), None
    )


@dataclass
class MosquittoBroker:
    """A private broker on a free loopback port; never the machine's own on 1883."""

    workdir: Path
    port: int = field(default_factory=free_port)
    extra_conf: str = ""
    # user -> password; when given, anonymous clients are refused.
    users: dict[str, str] = field(default_factory=dict)
    # (cafile, certfile, keyfile): the listener speaks TLS only.
    tls: tuple[Path, Path, Path] | None = None
    # A whole configuration of its own (e.g. rendered from deploy/mosquitto/): used as it
    # is, listening on ``port``; the settings above are then ignored.
    config: str | None = None
    name: str = "mosquitto"
    proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return "127.0.0.1"

    def start(self) -> None:
        binary = mosquitto_binary()
        assert binary is not None
        conf = self.workdir / f"{self.name}-{self.port}.conf"
        # As root, mosquitto drops to user "mosquitto", which cannot read the test's tmp dir.
        run_as = "user root\n" if os.geteuid() == 0 else ""
        if self.config is not None:
            conf.write_text(run_as + self.config)
        else:
            conf.write_text(self._own_config(run_as))
        log = open(self.workdir / f"{self.name}-{self.port}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [binary, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2),
            ):
                return
            time.sleep(0.02)
        raise RuntimeError("mosquitto did not start listening")

    def _own_config(self, run_as: str) -> str:
        auth = "allow_anonymous true\n"
        if self.users:
            pwfile = self.workdir / f"passwd-{self.port}"
            pwfile.write_text("")
            for user, password in self.users.items():
                subprocess.run(
                    ["mosquitto_passwd", "-b", str(pwfile), user, password],
                    check=True,
                    capture_output=True,
                )
            pwfile.chmod(0o600)
            auth = f"allow_anonymous false\npassword_file {pwfile}\n"
        return (
            f"{run_as}listener {self.port} 127.0.0.1\n"
            f"{self._tls_conf()}"
            f"{auth}"
            f"persistence true\npersistence_location {self.workdir}/\n"
            "autosave_interval 1\n"
            f"{self.extra_conf}\n"
        )

    def _tls_conf(self) -> str:
        if self.tls is None:
            return ""
        ca, cert, key = self.tls
        return f"cafile {ca}\ncertfile {cert}\nkeyfile {key}\n"

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    retain: bool
    qos: int

    def json(self) -> Any:
        return json.loads(self.payload)


class Collector:
    """Subscribes like the EDC would and keeps everything it receives."""

    def __init__(
        self,
        host: str,
        port: int,
        topics: list[str],
        *,
        client_id: str | None = None,
        persistent: bool = False,
        username: str | None = None,
        password: str | None = None,
        tls_context: ssl.SSLContext | None = None,
    ):
        self.host, self.port, self.topics = host, port, topics
        self.username, self.password = username, password
        self.tls_context = tls_context
        self.client_id = client_id
        self.persistent = persistent
        self.messages: list[Received] = []
        self._changed = asyncio.Condition()
        self._ready = asyncio.Event()

    async def run(self) -> None:
        async with aiomqtt.Client(
            self.host,
            self.port,
            identifier=self.client_id,
            username=self.username,
            password=self.password,
            clean_session=False if self.persistent else None,
            tls_context=self.tls_context,
        ) as client:
            for t in self.topics:
                await client.subscribe(t, qos=1)
            self._ready.set()
            async for m in client.messages:
                payload = m.payload if isinstance(m.payload, bytes) else str(m.payload).encode()
                async with self._changed:
                    self.messages.append(Received(str(m.topic), payload, m.retain, m.qos))
                    self._changed.notify_all()

    async def ready(self) -> None:
        await asyncio.wait_for(self._ready.wait(), 10)

    def matching(self, fragment: str) -> list[Received]:
        return [m for m in self.messages if fragment in m.topic]

    async def wait_for(
        self, predicate: Callable[[list[Received]], bool], timeout: float
    ) -> list[Received]:
        async def _wait() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: predicate(self.messages))

        await asyncio.wait_for(_wait(), timeout)
        return self.messages


@contextlib.asynccontextmanager
async def collecting(
    host: str,
    port: int,
    topics: list[str],
    *,
    client_id: str | None = None,
    persistent: bool = False,
    username: str | None = None,
    password: str | None = None,
    tls_context: ssl.SSLContext | None = None,
) -> AsyncIterator[Collector]:
    collector = Collector(
        host,
        port,
        topics,
        client_id=client_id,
        persistent=persistent,
        username=username,
        password=password,
        tls_context=tls_context,
    )
    task = asyncio.create_task(collector.run(), name="test-collector")
    try:
        await collector.ready()
        yield collector
    finally:
        with contextlib.suppress(aiomqtt.MqttError):
            await cancel_and_wait(task)


async def cancel_and_wait(task: asyncio.Task[Any], timeout: float = 60.0) -> None:
    """Cancel ``task`` and wait for it to stop; a task that does not stop fails the test
    with its name and the stacks of the tasks still running, instead of hanging the run.

    ``asyncio.wait`` rather than ``wait_for``: on Python 3.11 ``wait_for`` waits forever
    for a task that ignores its cancellation.
    """
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if task in done:
        with contextlib.suppress(asyncio.CancelledError):
            task.result()
        return
    running = []
    for other in asyncio.all_tasks():
        if other is asyncio.current_task() or other.done():
            continue
        frames = other.get_stack(limit=3)
        where = " <- ".join(f"{f.f_code.co_name}:{f.f_lineno}" for f in frames)
        running.append(f"{other.get_name()} [{where}]")
    raise AssertionError(
        f"task {task.get_name()} did not stop within {timeout:g} s of being cancelled; "
        f"still running: {'; '.join(running)}"
    )


#: The contract's example ACL (docs/blinding.md), used as is by the tests that need one.
ACL_FILE = Path(__file__).resolve().parent.parent / "docs" / "blinding-mosquitto.acl"


@contextlib.contextmanager
def acl_mosquitto(tmp_path: Path, users: dict[str, str]) -> Iterator[MosquittoBroker]:
    """A private Mosquitto with these password accounts and the shipped ACL file."""
    require(mosquitto_binary() is not None, "mosquitto is not installed")
    require(shutil.which("mosquitto_passwd") is not None, "mosquitto_passwd is not installed")
    workdir = tmp_path / "broker"
    workdir.mkdir()
    broker = MosquittoBroker(workdir, users=users, extra_conf=f"acl_file {ACL_FILE}\n")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
