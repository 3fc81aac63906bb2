"""Who is looking at the dashboard: users, login sessions, CSRF and failed-login limits.

Users live in a TOML file named by ``[http] users_file`` (never in the config
itself)::

    [users.anna]
    role = "nurse"              # viewer | nurse | engineer
    password_hash = "$argon2id$v=19$m=65536,t=3,p=4$..."   # devicegw web-user

Hashes are argon2id through argon2-cffi; checking one takes tens of milliseconds, so
it runs in a worker thread and never holds the gateway's event loop.

Sessions are kept in memory (a restart logs everyone out): a random token in an
HttpOnly, SameSite=Strict cookie (Secure under TLS), with an idle and an absolute
expiry on the gateway's clock. Every browser gets a session, logged in or not, and
every session its own CSRF token (synchronizer token): each POST must carry it
(form field ``csrf`` or header ``X-CSRF-Token``). A login replaces the session, so a
token planted before it is worthless after it.

Failed logins are counted per user name and per client address; at
``login_max_failures`` within ``login_lockout_s`` further attempts are refused
without checking the password until the window has passed.
"""

from __future__ import annotations

import functools
import hmac
import json
import secrets
import tomllib
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from devicegw.safe_text import is_plain

__all__ = [
    "PERMISSIONS",
    "LoginLimiter",
    "Role",
    "Session",
    "Sessions",
    "User",
    "UsersFileError",
    "dump_users",
    "hash_password",
    "load_users",
    "verify_password",
]

Role = Literal["viewer", "nurse", "engineer"]
#: What each role may do: every role views the blinded dashboard; a nurse assigns beds;
#: an engineer sees the restricted physical detail (and does not assign: separate duties).
PERMISSIONS: dict[Role, frozenset[str]] = {
    "viewer": frozenset({"view"}),
    "nurse": frozenset({"view", "assign"}),
    "engineer": frozenset({"view", "restricted"}),
}
#: At most this many sessions are kept: anonymous ones are dropped first, then the stalest.
MAX_SESSIONS = 2000

_hasher = PasswordHasher()


@functools.cache
def _dummy_hash() -> str:
    """Checked against when the user name is unknown, so both cases take the same time."""
    return _hasher.hash(secrets.token_urlsafe(16))


class UsersFileError(ValueError):
    """The users file is missing, unreadable or malformed (the message says where)."""


@dataclass(frozen=True, slots=True)
class User:
    name: str
    role: Role
    password_hash: str


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(user: User | None, password: str) -> bool:
    """Whether ``password`` is ``user``'s; CPU-bound (run it in a thread)."""
    try:
        return _hasher.verify(user.password_hash if user else _dummy_hash(), password) and (
            user is not None
        )
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def load_users(path: Path) -> dict[str, User]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UsersFileError(f"users file {path}: {exc}") from exc
    table = data.get("users")
    if not isinstance(table, dict) or set(data) != {"users"}:
        raise UsersFileError(f"users file {path}: one [users.NAME] table per user, nothing else")
    users: dict[str, User] = {}
    for name, entry in table.items():
        where = f"users file {path}: users.{name}"
        if not name or len(name) > 64 or not is_plain(name) or name != name.strip():
            raise UsersFileError(f"{where}: a plain name of up to 64 characters")
        if not isinstance(entry, dict) or set(entry) != {"role", "password_hash"}:
            raise UsersFileError(f"{where}: exactly role and password_hash")
        role, hashed = entry["role"], entry["password_hash"]
        if role not in get_args(Role):
            raise UsersFileError(f"{where}: role must be one of {', '.join(get_args(Role))}")
        if not isinstance(hashed, str) or not hashed.startswith("$argon2"):
            raise UsersFileError(f"{where}: password_hash must be an argon2 hash")
        users[name] = User(name, role, hashed)
    return users


def dump_users(users: dict[str, User]) -> str:
    """The users file's text (``devicegw web-user`` writes it; :func:`load_users` reads it)."""
    out = ["# Ward dashboard users (devicegw web-user). Roles: viewer, nurse, engineer.\n"]
    for user in users.values():  # names are plain text: JSON quoting is TOML quoting
        out.append(
            f"[users.{json.dumps(user.name)}]\nrole = {json.dumps(user.role)}\n"
            f"password_hash = {json.dumps(user.password_hash)}\n"
        )
    return "\n".join(out)


@dataclass
class Session:
    token: str
    csrf: str
    created: float
    seen: float
    user: User | None = None

    def csrf_ok(self, offered: str | None) -> bool:
        return offered is not None and hmac.compare_digest(offered.encode(), self.csrf.encode())


class Sessions:
    """Sessions by token, expiring ``idle_s`` after the last request, ``max_s`` after login."""

    def __init__(self, idle_s: float, max_s: float) -> None:
        self.idle_s, self.max_s = idle_s, max_s
        self._by_token: OrderedDict[str, Session] = OrderedDict()

    def new(self, now: float, user: User | None = None) -> Session:
        session = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), now, now, user)
        self._by_token[session.token] = session
        if len(self._by_token) > MAX_SESSIONS:  # anonymous ones go first, then the stalest
            stale = next((s for s in self._by_token.values() if s.user is None), None)
            self._by_token.pop(stale.token if stale else next(iter(self._by_token)))
        return session

    def get(self, token: str | None, now: float) -> Session | None:
        """The live session of ``token`` (its idle time restarts), or None."""
        session = self._by_token.get(token) if token else None
        if session is None:
            return None
        if not self.alive(session, now):
            self.drop(session)
            return None
        session.seen = now
        self._by_token.move_to_end(session.token)
        return session

    def alive(self, session: Session, now: float) -> bool:
        return (
            session.token in self._by_token
            and now - session.seen <= self.idle_s
            and now - session.created <= self.max_s
        )

    def drop(self, session: Session) -> None:
        self._by_token.pop(session.token, None)


@dataclass
class LoginLimiter:
    """Failed logins per key ("user:NAME", "client:ADDR") within a sliding window."""

    max_failures: int
    window_s: float
    _failures: dict[str, deque[float]] = field(default_factory=dict)

    def _recent(self, key: str, now: float) -> deque[float]:
        times = self._failures.setdefault(key, deque())
        while times and now - times[0] > self.window_s:
            times.popleft()
        if not times:
            del self._failures[key]
            return deque()
        return times

    def locked(self, keys: list[str], now: float) -> bool:
        return any(len(self._recent(k, now)) >= self.max_failures for k in keys)

    def failed(self, keys: list[str], now: float) -> list[str]:
        """Count a failure; returns the keys that it locked (to be audited once)."""
        newly = []
        for key in keys:
            times = self._recent(key, now)
            times.append(now)
            self._failures[key] = times
            if len(times) == self.max_failures:
                newly.append(key)
        if len(self._failures) > 10 * MAX_SESSIONS:  # bounded: forget the stalest keys
            for key in list(self._failures)[: len(self._failures) // 2]:
                del self._failures[key]
        return newly

    def succeeded(self, keys: list[str]) -> None:
        for key in keys:
            if key.startswith("user:"):
                self._failures.pop(key, None)
