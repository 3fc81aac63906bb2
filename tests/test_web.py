"""The ward dashboard's server (issue 12): /metrics, /healthz, /readyz, the JSON views.

Real parts: simulated VM-1s on ptys, the gateway with its dashboard on a free
loopback port, a private Mosquitto; the test is an HTTP client (aiohttp) and
parses /metrics with prometheus_client's own parser.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from devicegw.web.server import WebServer
from tests.e2e_harness import E2E, running
from tests.mqtt_helpers import MosquittoBroker

pytestmark = pytest.mark.e2e

HTTP = {"http": {"listen": "127.0.0.1:0"}}
PHYSICAL = ("rate", "delivered_ml", "reservoir", "battery", "fill", "residual", "alarm")


def server_of(e2e: E2E) -> WebServer:
    [server] = [r for r in e2e.gateway.extra_runners if isinstance(r, WebServer)]
    return server


async def base_url(e2e: E2E) -> str:
    server = server_of(e2e)
    await asyncio.wait_for(server.serving.wait(), 30)
    return f"http://127.0.0.1:{server.port}"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def keys_of(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [k for k, v in node.items() for k in [k, *keys_of(v)]]
    if isinstance(node, list):
        return [k for v in node for k in keys_of(v)]
    return []


async def test_metrics_health_and_views_match_what_ran(
    mosquitto: MosquittoBroker, tmp_path: Any
) -> None:
    async with running(mosquitto, tmp_path, ["complete", "corrupt_bytes"], sections=HTTP) as e2e:
        url = await base_url(e2e)
        await e2e.wait_dose_events(2)
        # The subscriber can have the events before the gateway has the broker's PUBACKs.
        stats = e2e.gateway.publisher.stats
        async with asyncio.timeout(30):
            while stats.dose_events_published < 2:  # noqa: ASYNC110 - a counter, no event
                await asyncio.sleep(0.05)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{url}/healthz") as r:
                assert r.status == 200
            async with http.get(f"{url}/readyz") as r:
                assert r.status == 200 and (await r.json())["ready"] is True
            async with http.get(f"{url}/metrics") as r:
                assert r.status == 200
                metrics = samples(await r.text())
            async with http.get(f"{url}/api/ward") as r:
                ward = await r.json()
            async with http.get(f"{url}/api/bed/B01") as r:
                bed = await r.json()
            async with http.get(f"{url}/api/bed/nope") as r:
                assert r.status == 404
            async with http.get(f"{url}/") as r:
                page = await r.text()
                assert r.headers["Content-Security-Policy"].startswith("default-src 'self'")
            async with http.get(f"{url}/static/vendor/uPlot.iife.min.js") as r:
                assert r.status == 200  # shipped in the package: no CDN

    finished = {
        labels: v
        for (name, labels), v in metrics.items()
        if name == "devicegw_sessions_finished_total"
    }
    assert sum(finished.values()) == 2
    assert metrics[("devicegw_sessions_started_total", (("device", "neb-bed01"),))] == 1
    # corrupt_bytes.toml flips bits in 45 frames; the clean device may still lose a frame
    # or two at the port's opening under load (bytes the pty held before the gateway read).
    bad = {
        device: metrics[("devicegw_device_bad_frames_total", (("device", device),))]
        for device in ("neb-bed01", "neb-bed02")
    }
    assert bad["neb-bed02"] >= 40 > bad["neb-bed01"]
    assert metrics[("devicegw_broker_connected", ())] == 1
    assert metrics[("devicegw_dose_events_published_total", ())] >= 2
    published = [
        v
        for (name, labels), v in metrics.items()
        if name == "devicegw_publish_latency_seconds_count" and ("kind", "dose") in labels
    ]
    assert published and published[0] >= 2
    assert any(name.startswith("process_") for name, _ in metrics)

    assert [b["bed"] for b in ward["beds"]] == ["B01", "B02"]
    assert ward["role"] == "viewer"
    assert {b["last_dose"]["verdict"] for b in ward["beds"]} == {"complete"}
    assert ward["beds"][0]["assignment"] == {"subject_id": "CVD-042-0001", "kit_number": "K-10001"}
    # The blinded view carries nothing physical.
    for name in keys_of(ward) + keys_of(bed):
        assert not any(word in name for word in PHYSICAL), name
    assert bed["doses"][0]["verdict"] == "complete"
    assert '<script src="/static/app.js">' in page


async def test_readyz_follows_the_broker(mosquitto: MosquittoBroker, tmp_path: Any) -> None:
    async with running(mosquitto, tmp_path, ["complete"], sections=HTTP) as e2e:
        url = await base_url(e2e)
        async with aiohttp.ClientSession() as http:

            async def ready() -> tuple[int, dict[str, Any]]:
                async with http.get(f"{url}/readyz") as r:
                    return r.status, await r.json()

            async def until(status: int) -> dict[str, Any]:
                async with asyncio.timeout(60):
                    while True:
                        got, body = await ready()
                        if got == status:
                            return body
                        await asyncio.sleep(0.1)

            await until(200)
            mosquitto.stop()
            body = await until(503)
            assert body == {"ready": False, "problems": ["broker not connected"]}
            mosquitto.start()
            await until(200)


async def test_engineer_role_sees_the_restricted_detail(
    mosquitto: MosquittoBroker, tmp_path: Any
) -> None:
    sections = {"http": {"listen": "127.0.0.1:0", "loopback_role": "engineer"}}
    async with running(mosquitto, tmp_path, ["complete"], sections=sections) as e2e:
        url = await base_url(e2e)
        await e2e.wait_dose_events(1)
        async with aiohttp.ClientSession() as http, http.get(f"{url}/api/bed/B01") as r:
            bed = await r.json()
    assert "restricted" in bed and "restricted" in bed["doses"][0]
    assert bed["doses"][0]["restricted"]["delivered_basis"] == "reservoir_drop"
    assert json.dumps(bed)  # plain JSON
