"""The ward dashboard, ``/metrics`` and the health endpoints, served inside ``devicegw run``.

aiohttp on the gateway's own event loop (a supervised runner like the devices):
handlers only read state the gateway keeps anyway (:class:`WardState`, the
snapshot), so a slow browser never slows a device. Every asset is in the
package (``static/``, uPlot vendored): the ward's machines need no internet.

Pages: ``/`` ward overview, ``/bed/{bed}`` one bed, ``/health`` the gateway.
Data: ``/api/ward``, ``/api/bed/{bed}``, ``/api/health`` (JSON) and ``/events``
(server-sent events: the ward JSON whenever it changed, at most once a second).
Monitoring: ``/metrics`` (Prometheus text), ``/healthz`` (alive), ``/readyz``
(200 when the broker is connected and the store writable, else 503 with why).

Device text reaches the page as JSON and is put in with ``textContent``, never as
markup; the Content-Security-Policy allows scripts from the gateway only.

Who may look (:mod:`devicegw.web.auth`): with ``[http] users_file`` every page and
data view needs a login (``/login``; roles viewer, nurse, engineer); without it
(loopback only) everyone gets ``loopback_role``. Off loopback TLS and a login are
required by the config. ``/metrics``, ``/healthz``, ``/readyz`` and the static
assets stay open for monitoring (no subject and no physical detail in them).
Every POST carries the session's CSRF token. ``POST /api/assign`` (role nurse)
goes through the gateway's one assignment entry point, audited with the user.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import logging
import ssl
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from devicegw.config import is_loopback
from devicegw.core.ports import AuditKind
from devicegw.runtime.assignment_commands import request_from
from devicegw.safe_text import printable
from devicegw.web.auth import (
    PERMISSIONS,
    LoginLimiter,
    Role,
    Session,
    Sessions,
    User,
    load_users,
    verify_password,
)
from devicegw.web.metrics import GatewayMetrics
from devicegw.web.state import WardState

if TYPE_CHECKING:
    from devicegw.runtime.gateway import Gateway

__all__ = ["WebServer"]

log = logging.getLogger(__name__)

STATIC = Path(str(resources.files("devicegw.web") / "static"))
EVENT_INTERVAL_S = 1.0
REFRESH_S = 5.0
COOKIE = "devicegw_session"
SESSION = web.RequestKey("session", Session)
#: Paths served to anyone (monitoring, the login page and the page assets).
OPEN_PATHS = ("/healthz", "/readyz", "/metrics", "/login")
#: ... and these without even an anonymous session (scrapers must not fill the table).
NO_SESSION = ("/healthz", "/readyz", "/metrics", "/static/")

_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


async def _csrf_offered(request: web.Request) -> str | None:
    header = request.headers.get("X-CSRF-Token")
    if header is not None:
        return header
    if request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
        value = (await request.post()).get("csrf")
        return value if isinstance(value, str) else None
    return None


@web.middleware
async def _headers(request: web.Request, handler: Any) -> web.StreamResponse:
    response: web.StreamResponse = await handler(request)
    for key, value in _SECURITY_HEADERS.items():
        response.headers.setdefault(key, value)
    return response


class WebServer:
    """Serves the dashboard until cancelled (a supervised gateway task)."""

    def __init__(self, gateway: Gateway) -> None:
        """Raises :class:`~devicegw.web.auth.UsersFileError` or :class:`OSError` (the
        users file, the certificate) so ``devicegw run`` refuses to start with why."""
        settings = gateway.config.http
        if settings is None:
            raise ValueError("the gateway's config has no [http] section")
        self.gateway = gateway
        self.settings = settings
        self.state = WardState(gateway)
        self.metrics = GatewayMetrics(gateway)
        self.users: dict[str, User] = (
            load_users(settings.users_file) if settings.users_file is not None else {}
        )
        self.sessions = Sessions(settings.session_idle_s, settings.session_max_s)
        self.limiter = LoginLimiter(settings.login_max_failures, settings.login_lockout_s)
        self.ssl_context: ssl.SSLContext | None = None
        if settings.tls_cert is not None and settings.tls_key is not None:
            self.ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self.ssl_context.minimum_version = ssl.TLSVersion.TLSv1_2
            self.ssl_context.load_cert_chain(settings.tls_cert, settings.tls_key)
        self._loopback = is_loopback(settings.host)
        self._hashing = asyncio.Semaphore(2)
        self.port: int | None = None  # the bound port once serving (listen port 0: any)
        self.serving = asyncio.Event()
        self.app = self._app()

    @property
    def task_name(self) -> str:
        return "http"

    def crashed(self, error: str) -> None:
        pass

    def _app(self) -> web.Application:
        app = web.Application(middlewares=[_headers, self._auth])
        r = app.router
        r.add_get("/login", self._login_page)
        r.add_post("/login", self._login)
        r.add_post("/logout", self._logout)
        r.add_get("/api/session", self._api_session)
        r.add_post("/api/assign", self._api_assign)
        r.add_get("/", self._page("index.html"))
        r.add_get("/bed/{bed}", self._page("bed.html"))
        r.add_get("/health", self._page("health.html"))
        r.add_get("/api/ward", self._api_ward)
        r.add_get("/api/bed/{bed}", self._api_bed)
        r.add_get("/api/health", self._api_health)
        r.add_get("/events", self._events)
        r.add_get("/metrics", self._metrics)
        r.add_get("/healthz", self._healthz)
        r.add_get("/readyz", self._readyz)
        r.add_static("/static/", STATIC, follow_symlinks=False)
        return app

    async def run(self) -> None:
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            site = web.TCPSite(
                runner, self.settings.host, self.settings.port, ssl_context=self.ssl_context
            )
            await site.start()
            addresses = list(runner.addresses or [])
            self.port = int(addresses[0][1]) if addresses else self.settings.port
            log.info("dashboard on %s", self.url)
            self.serving.set()
            await asyncio.Event().wait()
        finally:
            self.serving.clear()
            await runner.cleanup()

    @property
    def url(self) -> str:
        host = self.settings.host
        shown = f"[{host}]" if ":" in host else host
        return f"{'https' if self.ssl_context else 'http'}://{shown}:{self.port}/"

    # -- who is asking -----------------------------------------------------------------------

    def role_of(self, session: Session | None) -> Role | None:
        if not self.settings.login_required:
            return self.settings.loopback_role
        return None if session is None or session.user is None else session.user.role

    def _role(self, request: web.Request) -> Role:
        """The role of a request past the login check (the middleware let it through)."""
        role = self.role_of(request[SESSION])
        if role is None:
            raise web.HTTPUnauthorized(text="login required\n")
        return role

    def _cookie(self, response: web.StreamResponse, session: Session) -> None:
        response.set_cookie(
            COOKIE,
            session.token,
            httponly=True,
            samesite="Strict",
            secure=self.ssl_context is not None,
            path="/",
        )

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        path = request.path
        if path.startswith(NO_SESSION):
            response: web.StreamResponse = await handler(request)
            return response
        if self._loopback and not is_loopback(request.url.host or ""):
            # DNS rebinding: another site's name pointed at 127.0.0.1 must not read the ward.
            return web.json_response({"error": "this host name is not served"}, status=421)
        now = self.gateway.clock.monotonic()
        offered = request.cookies.get(COOKIE)
        session = self.sessions.get(offered, now) or self.sessions.new(now)
        request[SESSION] = session
        role = self.role_of(session)
        if role is None and path not in OPEN_PATHS:
            if path.startswith("/api/") or path == "/events":
                response = web.json_response({"error": "login required"}, status=401)
            else:
                response = web.Response(status=303, headers={"Location": "/login"})
        elif request.method == "POST" and not session.csrf_ok(await _csrf_offered(request)):
            if path == "/login":  # most likely a login page left open past the session's life
                response = self._login_form(request, "The page had expired: please try again.", 403)
            else:
                response = web.json_response({"error": "missing or wrong CSRF token"}, status=403)
        else:
            response = await handler(request)
        final: Session = request[SESSION]  # a login or logout replaces it
        if final.token != offered:
            self._cookie(response, final)
        if self.ssl_context is not None:
            response.headers["Strict-Transport-Security"] = "max-age=31536000"
        return response

    def _audit(self, kind: AuditKind, **body: object) -> None:
        try:
            self.gateway.audit.append(kind, body=body)
        except Exception:  # the store says why (a full disk holds it); keep serving
            log.exception("dashboard: audit record %s not written", kind.value)

    def _login_form(
        self, request: web.Request, message: str = "", status: int = 200
    ) -> web.Response:
        page = (STATIC / "login.html").read_text(encoding="utf-8")
        session: Session = request[SESSION]
        page = page.replace("{{csrf}}", html.escape(session.csrf)).replace(
            "{{message}}", html.escape(message)
        )
        return web.Response(text=page, status=status, content_type="text/html")

    async def _login_page(self, request: web.Request) -> web.StreamResponse:
        if not self.settings.login_required or self.role_of(request[SESSION]) is not None:
            return web.Response(status=303, headers={"Location": "/"})
        return self._login_form(request)

    async def _login(self, request: web.Request) -> web.StreamResponse:
        if not self.settings.login_required:
            return web.Response(status=303, headers={"Location": "/"})
        form = await request.post()
        # Names are at most 64 characters (load_users): a longer one is nobody's, and only
        # its start is counted, so junk cannot grow the limiter's table.
        name, password = str(form.get("user", ""))[:65], str(form.get("password", ""))
        client = request.remote or "?"
        keys = [f"user:{name}", f"client:{client}"]
        now = self.gateway.clock.monotonic()
        if self.limiter.locked(keys, now):
            log.debug("dashboard: login refused (locked) for %s", printable(client, limit=60))
            return self._login_form(request, "Too many failed logins: try again later.", 429)
        user = self.users.get(name)
        async with self._hashing:  # argon2 takes 64 MiB and a core: two at a time at most
            ok = await asyncio.to_thread(verify_password, user, password)
        if not ok:
            self._audit(
                AuditKind.web_login_failed,
                user=None if user is None else user.name,
                client=client,
                why="unknown user" if user is None else "wrong password",
            )
            for key in self.limiter.failed(keys, self.gateway.clock.monotonic()):
                what, _, who = key.partition(":")
                self._audit(
                    AuditKind.web_login_locked,
                    **{what: who if what == "client" or user is not None else None},
                    failures=self.settings.login_max_failures,
                    lockout_s=self.settings.login_lockout_s,
                )
            return self._login_form(request, "Wrong user name or password.", 401)
        assert user is not None
        self.limiter.succeeded(keys)
        self.sessions.drop(request[SESSION])
        request[SESSION] = self.sessions.new(self.gateway.clock.monotonic(), user)
        self._audit(AuditKind.web_login, user=user.name, role=user.role, client=client)
        return web.Response(status=303, headers={"Location": "/"})

    async def _logout(self, request: web.Request) -> web.StreamResponse:
        session: Session = request[SESSION]
        if session.user is not None:
            self._audit(AuditKind.web_logout, user=session.user.name, client=request.remote)
        self.sessions.drop(session)
        request[SESSION] = self.sessions.new(self.gateway.clock.monotonic())
        where = "/login" if self.settings.login_required else "/"
        return web.Response(status=303, headers={"Location": where})

    async def _api_session(self, request: web.Request) -> web.Response:
        session: Session = request[SESSION]
        role = self._role(request)
        return web.json_response(
            {
                "user": None if session.user is None else session.user.name,
                "role": role,
                "login": self.settings.login_required,
                "may": sorted(PERMISSIONS[role]),
                "csrf": session.csrf,
            }
        )

    async def _api_assign(self, request: web.Request) -> web.Response:
        """Assign, change or end a bed's subject and kit (role nurse), as `devicegw assign`."""
        role = self._role(request)
        if "assign" not in PERMISSIONS[role]:
            return web.json_response({"error": f"role {role} may not assign"}, status=403)
        session: Session = request[SESSION]
        desk = self.gateway.assignments
        try:
            data = await request.json()
        except ValueError:
            data = None
        if not isinstance(data, dict) or "operator" in data:
            result = desk.refuse("web", "a JSON object of the form's fields is required")
            return web.json_response({"applied": False, "message": result.message}, status=400)
        for key in ("subject_id", "kit_number"):  # a barcode scanner may add spaces or a tab
            if isinstance(data.get(key), str):
                data[key] = data[key].strip() or None
        operator = session.user.name if session.user is not None else "loopback (no login)"
        parsed = request_from({**data, "operator": operator}, "web")
        if isinstance(parsed, str):
            result = desk.refuse("web", parsed)
            return web.json_response({"applied": False, "message": result.message}, status=400)
        result = desk.apply(parsed)
        self.state.version += 1  # the cards show the new assignment at once
        return web.json_response(
            {"applied": result.applied, "message": result.message},
            status=200 if result.applied else 409,
        )

    # -- handlers ----------------------------------------------------------------------------

    def _page(self, name: str) -> Any:
        path = STATIC / name

        async def page(request: web.Request) -> web.StreamResponse:
            return web.FileResponse(path, headers={"Content-Type": "text/html; charset=utf-8"})

        return page

    async def _api_ward(self, request: web.Request) -> web.Response:
        return web.json_response(self.state.ward(self._role(request)))

    async def _api_bed(self, request: web.Request) -> web.Response:
        view = self.state.bed(request.match_info["bed"], self._role(request))
        if view is None:
            raise web.HTTPNotFound(text="no such bed\n")
        return web.json_response(view)

    async def _api_health(self, request: web.Request) -> web.Response:
        return web.json_response(self.state.health())

    async def _events(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"}
        )
        await response.prepare(request)
        session: Session = request[SESSION]
        role = self._role(request)
        sent_version = -1
        idle = 0.0
        with contextlib.suppress(ConnectionResetError):
            while True:
                now = self.gateway.clock.monotonic()
                if self.settings.login_required and not self.sessions.alive(session, now):
                    await response.write(b"event: expired\ndata: {}\n\n")
                    break  # logged out or expired: the page goes to /login
                version = self.state.version
                # What changed (a status, telemetry, a dose, an alert) at once; the SpO2
                # trend, read from the bed monitors, at least every REFRESH_S.
                if version != sent_version or idle >= REFRESH_S:
                    body = json.dumps(self.state.ward(role), separators=(",", ":"))
                    await response.write(f"event: ward\ndata: {body}\n\n".encode())
                    sent_version, idle = version, 0.0
                await asyncio.sleep(EVENT_INTERVAL_S)
                idle += EVENT_INTERVAL_S
        return response

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def _readyz(self, request: web.Request) -> web.Response:
        problems = []
        if not self.gateway.publisher.stats.connected:
            problems.append("broker not connected")
        if self.gateway.store.held.full_since is not None:
            problems.append("store not writable (disk full)")
        status = 503 if problems else 200
        return web.json_response({"ready": not problems, "problems": problems}, status=status)
