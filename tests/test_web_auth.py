"""The dashboard's security (issue 12): TLS, login, roles, CSRF, limited and audited logins.

Real parts: the gateway with its dashboard over HTTPS (a trustme CA) on a free
loopback port, a simulated VM-1 on a pty, a private Mosquitto; the test is an
HTTP client (aiohttp). Session expiry is checked on :class:`Sessions` with
explicit times (the gateway's clock), the config's refusals on ``parse_config``.
"""

from __future__ import annotations

import io
import json
import re
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme

from devicegw.cli.main import main
from devicegw.config import ConfigError, parse_config
from devicegw.storage.audit import verify
from devicegw.web.auth import (
    LoginLimiter,
    Sessions,
    User,
    hash_password,
    load_users,
    verify_password,
)
from tests.e2e_harness import running
from tests.mqtt_helpers import MosquittoBroker
from tests.test_web import base_url

PASSWORDS = {
    "vera": ("viewer", "vera-pw-1"),
    "nina": ("nurse", "nina-pw-2"),
    "eric": ("engineer", "eric-pw-3"),
}


def users_file(path: Path) -> Path:
    lines = []
    for name, (role, password) in PASSWORDS.items():
        lines += [
            f"[users.{name}]",
            f'role = "{role}"',
            f'password_hash = "{hash_password(password)}"',
        ]
    path.write_text("\n".join(lines) + "\n")
    return path


def minimal(http: dict[str, Any]) -> dict[str, Any]:
    return {
        "gateway": {"id": "gw-test", "site": "site-042"},
        "broker": {"host": "127.0.0.1"},
        "http": http,
    }


def test_off_loopback_needs_tls_and_a_login(tmp_path: Path) -> None:
    for http in (
        {"listen": "0.0.0.0:8443"},
        {"listen": "0.0.0.0:8443", "users_file": "users.toml"},
        {"listen": "0.0.0.0:8443", "tls_cert": "c.pem", "tls_key": "k.pem"},
        {"listen": "127.0.0.1:8443", "tls_cert": "c.pem"},
    ):
        with pytest.raises(ConfigError):
            parse_config(minimal(http))
    secured = {"listen": "0.0.0.0:8443", "users_file": "u.toml", "tls_cert": "c", "tls_key": "k"}
    assert parse_config(minimal(secured)).http is not None


def test_users_file_is_checked(tmp_path: Path) -> None:
    good = load_users(users_file(tmp_path / "users.toml"))
    assert {n: u.role for n, u in good.items()} == {
        "vera": "viewer",
        "nina": "nurse",
        "eric": "engineer",
    }
    for text in (
        '[users.x]\nrole = "admin"\npassword_hash = "$argon2id$x"\n',  # no such role
        '[users.x]\nrole = "nurse"\npassword_hash = "plain"\n',  # not a hash
        '[users.x]\nrole = "nurse"\n',
        "not toml [",
    ):
        (tmp_path / "bad.toml").write_text(text)
        with pytest.raises(ValueError, match="users file"):
            load_users(tmp_path / "bad.toml")


def test_web_user_command_writes_the_users_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "users.toml"
    for name, role in (("nina", "nurse"), ("vera", "viewer")):
        monkeypatch.setattr("sys.stdin", io.StringIO(f"{name}-password\n"))
        assert (
            main(["web-user", "--users", str(path), name, "--role", role, "--password-stdin"]) == 0
        )
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert main(["web-user", "--users", str(path), "x", "--role", "nurse", "--password-stdin"]) == 2
    assert main(["web-user", "--users", str(path), "vera", "--remove"]) == 0
    users = load_users(path)
    assert list(users) == ["nina"] and users["nina"].role == "nurse"
    assert verify_password(users["nina"], "nina-password")
    assert not verify_password(users["nina"], "vera-password")
    assert not verify_password(None, "nina-password")
    assert path.stat().st_mode & 0o777 == 0o640


def test_sessions_expire_when_idle_and_at_their_maximum() -> None:
    sessions = Sessions(idle_s=60, max_s=300)
    user = User("nina", "nurse", "$argon2id$")
    s = sessions.new(0.0, user)
    assert sessions.get(s.token, 50.0) is s
    assert sessions.get(s.token, 111.0) is None  # 61 s idle
    s = sessions.new(0.0, user)
    for t in range(50, 300, 50):
        assert sessions.get(s.token, float(t)) is s
    assert sessions.get(s.token, 301.0) is None  # past the maximum, however busy
    assert sessions.get("made-up", 0.0) is None


def test_failed_logins_lock_for_the_window() -> None:
    limiter = LoginLimiter(max_failures=3, window_s=100)
    keys = ["user:nina", "client:10.0.0.9"]
    assert limiter.failed(keys, 0.0) == [] and limiter.failed(keys, 1.0) == []
    assert limiter.failed(keys, 2.0) == keys  # the third: locked, reported once
    assert limiter.locked(["user:nina"], 50.0) and limiter.locked(["client:10.0.0.9"], 50.0)
    assert not limiter.locked(keys, 103.0)  # the window has passed


def csrf_of(page: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', page)
    assert match, page
    return match.group(1)


async def test_login_roles_csrf_and_audit_over_tls(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "dash.pem"))
    client_ssl = ssl.create_default_context()
    ca.configure_trust(client_ssl)
    http = {
        "listen": "127.0.0.1:0",
        "users_file": str(users_file(tmp_path / "users.toml")),
        "tls_cert": str(tmp_path / "dash.pem"),
        "tls_key": str(tmp_path / "dash.pem"),
        "login_max_failures": 3,
        # The gateway's clock runs 100x here: long enough that nothing expires mid-test.
        "session_idle_s": 1e6,
        "session_max_s": 1e6,
        "login_lockout_s": 1e6,
    }
    async with running(mosquitto, tmp_path, ["complete"], sections={"http": http}) as e2e:
        url = (await base_url(e2e)).replace("http://", "https://")
        conn = aiohttp.TCPConnector(ssl=client_ssl)
        # unsafe=True: keep cookies of an IP address host (browsers do; aiohttp does not)
        jar = aiohttp.CookieJar(unsafe=True)
        async with aiohttp.ClientSession(connector=conn, cookie_jar=jar) as web:

            async def get(path: str) -> tuple[int, Any]:
                async with web.get(url + path, allow_redirects=False) as r:
                    body = (
                        await r.json() if r.content_type == "application/json" else await r.text()
                    )
                    return r.status, (body if r.status != 303 else r.headers["Location"])

            async def login(name: str, password: str, *, csrf: str | None = None) -> int:
                _, page = await get("/login")
                form = {"user": name, "password": password, "csrf": csrf or csrf_of(page)}
                async with web.post(url + "/login", data=form, allow_redirects=False) as r:
                    return r.status

            async def assign(token: str | None, **fields: Any) -> tuple[int, Any]:
                headers = {} if token is None else {"X-CSRF-Token": token}
                async with web.post(url + "/api/assign", json=fields, headers=headers) as r:
                    return r.status, await r.json()

            async def logout() -> None:
                _, me = await get("/api/session")
                async with web.post(
                    url + "/logout", data={"csrf": me["csrf"]}, allow_redirects=False
                ) as r:
                    assert r.status == 303

            # A name that is not this machine's (DNS rebinding) gets nothing.
            async with web.get(url + "/login", headers={"Host": "evil.example"}) as r:
                assert r.status == 421

            # Nothing but monitoring and the login page without a login.
            assert await get("/api/ward") == (401, {"error": "login required"})
            assert await get("/") == (303, "/login")
            assert (await get("/healthz"))[0] == 200 and (await get("/metrics"))[0] == 200
            assert await login("nina", PASSWORDS["nina"][1], csrf="forged") == 403
            async with web.post(url + "/login", data={"user": "nina"}) as r:  # no token
                assert r.status == 403 and "please try again" in await r.text()

            # A viewer: the blinded ward, no assigning.
            assert await login("vera", PASSWORDS["vera"][1]) == 303
            cookie = next(c for c in web.cookie_jar if c.key == "devicegw_session")
            assert cookie["httponly"] and cookie["secure"] and cookie["samesite"] == "Strict"
            status, ward = await get("/api/ward")
            assert (
                status == 200 and ward["role"] == "viewer" and "restricted" not in json.dumps(ward)
            )
            _, me = await get("/api/session")
            assert (me["user"], me["may"]) == ("vera", ["view"])
            status, answer = await assign(
                me["csrf"], bed="B01", subject_id="CVD-042-0002", kit_number="K-2", reason="r"
            )
            assert status == 403
            await logout()
            assert (await get("/api/ward"))[0] == 401

            # A nurse assigns with the session's CSRF token (a scanner's trailing tab is fine).
            assert await login("nina", PASSWORDS["nina"][1]) == 303
            _, me = await get("/api/session")
            fields = {
                "bed": "B01",
                "subject_id": "CVD-042-0002",
                "kit_number": "K-20002\t",
                "reason": "enrolled",
            }
            assert (await assign(None, **fields))[0] == 403
            assert (await assign("wrong", **fields))[0] == 403
            assert await assign(me["csrf"], **fields) == (
                200,
                {"applied": True, "message": "bed B01: subject CVD-042-0002, kit K-20002"},
            )
            status, answer = await assign(me["csrf"], **{**fields, "bed": "B99"})
            assert status == 409 and not answer["applied"]
            assert (await assign(me["csrf"], **{**fields, "operator": "someone-else"}))[0] == 400
            _, ward = await get("/api/ward")
            assert ward["beds"][0]["assignment"] == {
                "subject_id": "CVD-042-0002",
                "kit_number": "K-20002",
            }
            await logout()

            # An engineer sees the restricted detail.
            assert await login("eric", PASSWORDS["eric"][1]) == 303
            status, bed = await get("/api/bed/B01")
            assert status == 200 and "restricted" in bed
            await logout()

            # Three failures lock the name and this address; the right password is refused too.
            for _ in range(3):
                assert await login("nina", "guess") == 401
            assert await login("nina", PASSWORDS["nina"][1]) == 429
            assert await login("nobody", "x") == 429  # the address is locked as well

        rows = e2e.gateway.store.conn.execute(
            "SELECT kind, body FROM audit WHERE kind LIKE 'web_%' OR kind IN "
            "('bed_assigned', 'assignment_refused') ORDER BY seq"
        ).fetchall()
        assert verify(e2e.gateway.store).ok
    seen = [(k, json.loads(b)) for k, b in rows]
    assert seen[0][0] == "bed_assigned" and seen[0][1]["channel"] == "config"  # the seed
    seen = seen[1:]
    assert [k for k, _ in seen] == [
        "web_login",
        "web_logout",
        "web_login",
        "bed_assigned",
        "assignment_refused",
        "assignment_refused",
        "web_logout",
        "web_login",
        "web_logout",
        "web_login_failed",
        "web_login_failed",
        "web_login_failed",
        "web_login_locked",
        "web_login_locked",
    ]
    assert seen[0][1] == {"user": "vera", "role": "viewer", "client": "127.0.0.1"}
    assigned = seen[3][1]
    assert (assigned["operator"], assigned["channel"], assigned["kit_number"]) == (
        "nina",
        "web",
        "K-20002",
    )
    assert seen[9][1] == {"user": "nina", "client": "127.0.0.1", "why": "wrong password"}
    assert {json.dumps(b, sort_keys=True) for _, b in seen[12:]} == {
        json.dumps({"user": "nina", "failures": 3, "lockout_s": 1e6}, sort_keys=True),
        json.dumps({"client": "127.0.0.1", "failures": 3, "lockout_s": 1e6}, sort_keys=True),
    }
