"""systemd's service notification protocol (sd_notify(3)): readiness, watchdog, status.

Under ``Type=notify`` systemd names a unix datagram socket in ``$NOTIFY_SOCKET``;
the service sends newline-separated ``KEY=VALUE`` fields to it: ``READY=1`` once it
serves, ``WATCHDOG=1`` at least every half of ``$WATCHDOG_USEC`` (or systemd
kills and restarts it), ``STATUS=...`` for ``systemctl status``, ``STOPPING=1`` on
the way out. Without ``$NOTIFY_SOCKET`` (a shell, a container, the tests) every
call is a no-op.

Why no library: ``sdnotify`` on PyPI is untyped and unmaintained since 2017,
``systemd-python`` needs libsystemd's headers and a compiler to install, and the
protocol is one ``sendto`` of a datagram. A send never blocks the event loop
(non-blocking socket; a full receive queue drops that one message) and never
raises: the first failure is logged as a warning, later ones at DEBUG.

The watchdog ping comes from a task on the gateway's event loop, so it stops
when the loop is stuck (a blocking call, a busy loop) and systemd restarts the
daemon. One device in trouble never stops it: runners contain their failures.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Mapping

from devicegw.runtime.health import GatewaySnapshot

log = logging.getLogger(__name__)

#: How often the STATUS= line is refreshed when it changed (real seconds).
STATUS_INTERVAL_S = 5.0
#: Never ping faster than this, whatever WATCHDOG_USEC says.
MIN_PING_INTERVAL_S = 0.05


def _printable(text: str) -> str:
    """One line of plain text: a newline would start a new protocol field."""
    return "".join(ch if ch.isprintable() else " " for ch in text)


class Notifier:
    """Sends sd_notify messages to one socket address (or nowhere)."""

    def __init__(self, address: str | None, *, watchdog_usec: int | None = None) -> None:
        self._address: str | bytes | None = None
        if address:
            if address.startswith("@"):  # abstract namespace
                self._address = b"\0" + address[1:].encode()
            elif address.startswith("/"):
                self._address = address
            else:
                log.warning(
                    "NOTIFY_SOCKET %r is not a unix socket path; not notifying systemd", address
                )
        self.watchdog_usec = watchdog_usec if self._address is not None else None
        self._sock: socket.socket | None = None
        self._failed = False
        self.sent = 0

    @classmethod
    def from_environment(
        cls, environ: Mapping[str, str] | None = None, *, pid: int | None = None
    ) -> Notifier:
        """The notifier systemd asked for; a no-op one outside a ``Type=notify`` service."""
        env = os.environ if environ is None else environ
        return cls(env.get("NOTIFY_SOCKET"), watchdog_usec=_watchdog_usec(env, pid))

    @property
    def enabled(self) -> bool:
        return self._address is not None

    @property
    def ping_interval_s(self) -> float | None:
        """Half the watchdog timeout (as sd_watchdog_enabled(3) advises), or None."""
        if self.watchdog_usec is None:
            return None
        return max(self.watchdog_usec / 2e6, MIN_PING_INTERVAL_S)

    def notify(self, *fields: str) -> bool:
        """Send ``fields`` as one message; True if it was handed to the socket."""
        if self._address is None:
            return False
        message = "\n".join(fields).encode("utf-8")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(message, self._address)
        except OSError as exc:
            if not self._failed:
                log.warning("cannot notify systemd (%s); will keep trying", exc)
                self._failed = True
            else:
                log.debug("cannot notify systemd: %s", exc)
            return False
        self.sent += 1
        return True

    def ready(self, status: str) -> bool:
        return self.notify("READY=1", f"STATUS={_printable(status)}")

    def status(self, status: str) -> bool:
        return self.notify(f"STATUS={_printable(status)}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str = "stopping") -> bool:
        return self.notify("STOPPING=1", f"STATUS={_printable(status)}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _watchdog_usec(env: Mapping[str, str], pid: int | None) -> int | None:
    """``$WATCHDOG_USEC`` if it is meant for this process (``$WATCHDOG_PID``), else None."""
    raw = env.get("WATCHDOG_USEC")
    if not raw:
        return None
    owner = env.get("WATCHDOG_PID")
    if owner and owner.strip() != str(os.getpid() if pid is None else pid):
        return None  # set for another process (e.g. inherited from a parent)
    try:
        usec = int(raw)
    except ValueError:
        log.warning("WATCHDOG_USEC=%r is not a number; watchdog not served", raw)
        return None
    if usec <= 0:
        log.warning("WATCHDOG_USEC=%r is not positive; watchdog not served", raw)
        return None
    return usec


def status_line(snap: GatewaySnapshot) -> str:
    """What ``systemctl status`` shows: broker, outbox and links, in one short line."""
    broker = snap.broker
    if broker.get("connected"):
        state = "broker connected"
    elif not broker.get("connects") and not broker.get("connect_failures"):
        state = "broker connecting"
    else:
        state = "broker DISCONNECTED"
    parts = [state, f"outbox {snap.outbox_depth}"]
    if snap.devices:
        up = sum(d.connected for d in snap.devices.values())
        parts.append(f"nebulizers {up}/{len(snap.devices)} connected")
    if snap.oximeters:
        up = sum(o.connected for o in snap.oximeters.values())
        parts.append(f"oximeters {up}/{len(snap.oximeters)} connected")
    return ", ".join(parts)


def _status(snapshot: Callable[[], GatewaySnapshot]) -> str:
    try:
        return status_line(snapshot())
    except Exception:  # noqa: BLE001 - a store problem is reported elsewhere; never stop pinging
        return "status unknown (store unreadable: see the log)"


async def run(snapshot: Callable[[], GatewaySnapshot], notifier: Notifier) -> None:
    """READY=1 now, then WATCHDOG=1 and STATUS= lines until cancelled (then STOPPING=1).

    Started by the gateway (last of its tasks) after the store, the audit trail and every
    other task are up, so READY means "the gateway runs" (whether or not the
    broker is reachable: dose events wait in the outbox). Real seconds, not the
    gateway clock: systemd's watchdog runs on wall time whatever a simulation's speed.
    """
    if not notifier.enabled:
        return
    last_status = _status(snapshot)
    notifier.ready(last_status)
    ping = notifier.ping_interval_s
    tick = min(ping, STATUS_INTERVAL_S) if ping is not None else STATUS_INTERVAL_S
    loop = asyncio.get_running_loop()
    next_status = loop.time() + STATUS_INTERVAL_S
    try:
        while True:
            if ping is not None:
                notifier.watchdog()
            if loop.time() >= next_status:
                next_status = loop.time() + STATUS_INTERVAL_S
                line = _status(snapshot)
                if line != last_status:
                    notifier.status(line)
                    last_status = line
            await asyncio.sleep(tick)
    finally:
        notifier.stopping()
        notifier.close()
