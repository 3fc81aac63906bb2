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
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from devicegw.web.metrics import GatewayMetrics
from devicegw.web.state import Role, WardState

if TYPE_CHECKING:
    from devicegw.runtime.gateway import Gateway

__all__ = ["WebServer"]

log = logging.getLogger(__name__)

STATIC = Path(str(resources.files("devicegw.web") / "static"))
EVENT_INTERVAL_S = 1.0
REFRESH_S = 5.0

_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@web.middleware
async def _headers(request: web.Request, handler: Any) -> web.StreamResponse:
    response: web.StreamResponse = await handler(request)
    for key, value in _SECURITY_HEADERS.items():
        response.headers.setdefault(key, value)
    return response


class WebServer:
    """Serves the dashboard until cancelled (a supervised gateway task)."""

    def __init__(self, gateway: Gateway) -> None:
        settings = gateway.config.http
        if settings is None:
            raise ValueError("the gateway's config has no [http] section")
        self.gateway = gateway
        self.settings = settings
        self.state = WardState(gateway)
        self.metrics = GatewayMetrics(gateway)
        self.role: Role = settings.loopback_role
        self.port: int | None = None  # the bound port once serving (listen port 0: any)
        self.serving = asyncio.Event()
        self.app = self._app()

    @property
    def task_name(self) -> str:
        return "http"

    def crashed(self, error: str) -> None:
        pass

    def _app(self) -> web.Application:
        app = web.Application(middlewares=[_headers])
        r = app.router
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
            site = web.TCPSite(runner, self.settings.host, self.settings.port)
            await site.start()
            addresses = list(runner.addresses or [])
            self.port = int(addresses[0][1]) if addresses else self.settings.port
            log.info("dashboard on http://%s:%s/", self.settings.host, self.port)
            self.serving.set()
            await asyncio.Event().wait()
        finally:
            self.serving.clear()
            await runner.cleanup()

    # -- handlers ----------------------------------------------------------------------------

    def _page(self, name: str) -> Any:
        path = STATIC / name

        async def page(request: web.Request) -> web.StreamResponse:
            return web.FileResponse(path, headers={"Content-Type": "text/html; charset=utf-8"})

        return page

    async def _api_ward(self, request: web.Request) -> web.Response:
        return web.json_response(self.state.ward(self.role))

    async def _api_bed(self, request: web.Request) -> web.Response:
        view = self.state.bed(request.match_info["bed"], self.role)
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
        sent_version = -1
        idle = 0.0
        with contextlib.suppress(ConnectionResetError):
            while True:
                version = self.state.version
                # What changed (a status, telemetry, a dose, an alert) at once; the SpO2
                # trend, read from the bed monitors, at least every REFRESH_S.
                if version != sent_version or idle >= REFRESH_S:
                    body = json.dumps(self.state.ward(self.role), separators=(",", ":"))
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
