"""The daemon's local control channel: ``devicegw assign`` and ``devicegw correct``
talk to the running gateway.

A Unix socket ``control.sock`` in ``data_dir``, mode 0660 (the daemon's user and
group: ward staff who may assign are put in the group; nobody else can connect).
One request per connection: one JSON line in, one JSON line out.

    -> {"command": "assign", "bed": "B01", "subject_id": "CVD-042-0021",
        "kit_number": "K-0101", "operator": "nurse.lee", "reason": "admission"}
    <- {"applied": true, "message": "bed B01: subject CVD-042-0021, kit K-0101"}

``end: true`` (no subject or kit) ends a bed's assignment; ``override_reason``
allows a kit already used. ``{"command": "correct", "event_id": ..., "subject_id":
..., "kit_number": ... | "void": true, "operator": ..., "reason": ...}`` corrects
a recorded dose (:mod:`devicegw.runtime.correction_commands`). The request goes to the one way in
(:class:`~devicegw.runtime.assignment_commands.AssignmentDesk`), with the
channel ``cli (uid N)``: the connecting process's user, from the kernel
(``SO_PEERCRED``), is kept beside the operator the person typed.

Anything malformed is answered ``applied: false`` with the reason; a request is
at most 16 KiB and must arrive within 5 s. Socket paths are limited to 107
bytes; a longer ``data_dir`` is reached through ``/proc/self/fd`` (Linux).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from devicegw.runtime.assignment_commands import (
    AssignmentDesk,
    AssignRequest,
    AssignResult,
    request_from,
)
from devicegw.runtime.correction_commands import (
    CorrectionDesk,
    CorrectRequest,
    correct_request_from,
)

__all__ = ["SOCKET_NAME", "ControlServer", "request", "socket_path"]

log = logging.getLogger(__name__)

SOCKET_NAME = "control.sock"
MAX_REQUEST = 16 * 1024
READ_TIMEOUT_S = 5.0
_MAX_UNIX_PATH = 107


def socket_path(data_dir: str | Path) -> Path:
    return Path(data_dir) / SOCKET_NAME


@contextlib.contextmanager
def _reachable(path: Path) -> Iterator[str]:
    """A path to ``path`` short enough for a Unix socket (via /proc/self/fd if needed)."""
    if len(os.fsencode(path)) <= _MAX_UNIX_PATH:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def _peer_uid(writer: asyncio.StreamWriter) -> int | None:
    sock = writer.get_extra_info("socket")
    if sock is None:
        return None
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def _parse(line: bytes, channel: str) -> AssignRequest | CorrectRequest | str:
    """The request, or why it is not one."""
    try:
        data = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return "not a JSON request"
    if not isinstance(data, dict):
        return "not a JSON object"
    command = data.pop("command", None)
    if command == "assign":
        return request_from(data, channel)
    if command == "correct":
        return correct_request_from(data, channel)
    return 'unknown command (expected "assign" or "correct")'


class ControlServer:
    """Serves ``control.sock`` until cancelled (a supervised gateway task)."""

    def __init__(
        self,
        data_dir: str | Path,
        desk: AssignmentDesk,
        corrections: CorrectionDesk | None = None,
    ) -> None:
        self.path = socket_path(data_dir)
        self.desk = desk
        self.corrections = corrections
        self.requests = 0

    @property
    def task_name(self) -> str:
        return "control-socket"

    def crashed(self, error: str) -> None:
        pass

    async def run(self) -> None:
        self._remove_stale()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _reachable(self.path) as where:
            server = await asyncio.start_unix_server(self._serve, path=where)
            os.chmod(where, 0o660)
        log.info("control socket ready: %s", self.path)
        try:
            async with server:
                await server.serve_forever()
        finally:
            with contextlib.suppress(OSError):
                self.path.unlink()

    def _apply(self, parsed: AssignRequest | CorrectRequest | str, channel: str) -> AssignResult:
        if isinstance(parsed, str):
            return self.desk.refuse(channel, parsed)
        if isinstance(parsed, CorrectRequest):
            if self.corrections is None:
                return AssignResult(False, "corrections are not taken by this gateway")
            return self.corrections.apply(parsed)
        return self.desk.apply(parsed)

    def _remove_stale(self) -> None:
        """A socket left by a killed daemon; anything else at that path is not ours."""
        try:
            mode = self.path.lstat().st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise OSError(f"{self.path} exists and is not a socket: not removing it")
        self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.requests += 1
        uid = _peer_uid(writer)
        channel = "cli" if uid is None else f"cli (uid {uid})"
        try:
            try:
                line = await asyncio.wait_for(reader.readline(), READ_TIMEOUT_S)
            except (TimeoutError, ValueError):  # ValueError: longer than the reader's limit
                result = AssignResult(False, "no complete request within the time or size limit")
            else:
                if len(line) > MAX_REQUEST or not line.endswith(b"\n"):
                    result = AssignResult(False, "the request must be one line of at most 16 KiB")
                else:
                    result = self._apply(_parse(line, channel), channel)
            reply = {"applied": result.applied, "message": result.message}
            writer.write(json.dumps(reply).encode("utf-8") + b"\n")
            await writer.drain()
        except (ConnectionError, OSError) as exc:
            log.info("control socket: client went away: %s", exc)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()


def request(
    data_dir: str | Path, payload: dict[str, Any], timeout_s: float = 10.0
) -> dict[str, Any]:
    """Send one request to the running daemon (blocking); OSError if it cannot be reached."""
    path = socket_path(data_dir)
    with _reachable(path) as where, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout_s)
        s.connect(where)
        s.sendall(json.dumps(payload).encode("utf-8") + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
            if len(data) > MAX_REQUEST:
                break
    try:
        reply = json.loads(data)
    except ValueError as exc:
        raise OSError(f"the daemon's answer is not JSON: {data[:80]!r}") from exc
    if not isinstance(reply, dict):
        raise OSError("the daemon's answer is not a JSON object")
    return reply
