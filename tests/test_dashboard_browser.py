"""The ward dashboard in a real browser (issue 12): headless Debian Chromium via Selenium.

One bed, live: a VM-1 and a Nonin oximeter simulated on ptys (the desaturation
scenario), the gateway with its dashboard on a free loopback port, a private
Mosquitto. The browser loads the ward overview and the test watches the page
itself (the DOM the nurse sees): the session's elapsed time advances, an SpO2
alert appears and clears, and the finished dose shows its verdict. Screenshots
go to the test's temp dir. The clock runs 20x (not 100x) so a one-second page
refresh still sees a desaturation that lasts about a minute of ward time.

Needs Debian's ``chromium`` and ``chromium-driver`` (.ci/run installs them); in
CI a missing browser is a failure, elsewhere a skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devicegw.config import parse_config
from devicegw.runtime.gateway import Gateway
from devicegw.web.server import WebServer
from drivers.clock import ScaledClock
from simulators.oximeter_pty import NoninPtySimulator
from simulators.oximeter_scenario import load_pair
from simulators.vm1_pty import Vm1PtySimulator
from tests.mqtt_helpers import MosquittoBroker, cancel_and_wait, require

pytestmark = pytest.mark.e2e

SCENARIOS = Path(__file__).resolve().parent.parent / "simulators" / "scenarios" / "oximeter"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SCALE = 20.0

CARD_STATE = """
const card = document.querySelector('section.bed[data-bed="B01"]');
if (!card) return null;
return {
  alerts: card.querySelectorAll('.alerts .alert').length,
  elapsed: card.dataset.sessionElapsed,
  verdict: card.dataset.lastVerdict,
  text: card.innerText,
};
"""


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    require(
        Path(CHROMIUM).exists() and shutil.which(CHROMEDRIVER) is not None,
        "Debian's chromium and chromium-driver are not installed",
    )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    options.add_argument("--window-size=1200,900")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


async def test_a_nurse_sees_progress_an_alert_come_and_go_and_the_verdict(
    mosquitto: MosquittoBroker, tmp_path: Path, browser: Any
) -> None:
    clock = ScaledClock(SCALE)
    ox_scen, vm1_scen = load_pair(SCENARIOS / "oximeter_desat.toml")
    assert vm1_scen is not None
    async with (
        Vm1PtySimulator(vm1_scen, clock=clock, link_dir=tmp_path, name="vm1-b01") as vsim,
        NoninPtySimulator(ox_scen, clock=clock, link_dir=tmp_path, name="nonin-b01") as osim,
    ):
        config = parse_config(
            {
                "gateway": {"id": "gw-ui", "site": "s1", "data_dir": str(tmp_path / "data")},
                "broker": {"host": mosquitto.host, "port": mosquitto.port},
                "http": {"listen": "127.0.0.1:0"},
                "spo2_rules": {"observation_window_s": 120, "baseline_min_valid_s": 10},
                "devices": [
                    {
                        "id": "neb-b01",
                        "type": "vm1",
                        "bed": "B01",
                        "subject_id": ox_scen.subject_id,
                        "kit_number": "K-10234",
                        "link": {"kind": "serial", "port": str(vsim.path)},
                    }
                ],
                "oximeters": [
                    {
                        "id": "ox-b01",
                        "type": "nonin_oem3",
                        "bed": "B01",
                        "subject_id": ox_scen.subject_id,
                        "link": {"kind": "serial", "port": str(osim.path)},
                    }
                ],
            }
        )
        async with Gateway(config, clock=clock) as gateway:
            server = WebServer(gateway)
            gateway.extra_runners.append(server)
            task = asyncio.create_task(gateway.run(), name="gateway-under-test")
            try:
                await asyncio.wait_for(server.serving.wait(), 30)
                base = f"http://127.0.0.1:{server.port}"
                seen = await watch(browser, f"{base}/", tmp_path)
                marks = await bed_marks(browser, f"{base}/bed/B01", tmp_path)
            finally:
                await cancel_and_wait(task)

    elapsed = [float(s["elapsed"]) for s in seen if s and s["elapsed"]]
    assert len(elapsed) >= 3 and elapsed[-1] > elapsed[0]  # the session advanced on screen
    alert_seen = [i for i, s in enumerate(seen) if s and s["alerts"] > 0]
    assert alert_seen, "the SpO2 alert never showed"
    assert any(s and s["alerts"] == 0 for s in seen[alert_seen[-1] :]), "it never cleared"
    assert seen[-1] is not None and seen[-1]["verdict"] == "complete"
    assert "complete" in seen[-1]["text"]
    assert ox_scen.subject_id in seen[-1]["text"]
    # The bed page marks the desaturation on the session's timeline.
    assert any(m.startswith("SpO2 desaturation") for m in marks), marks


async def bed_marks(driver: Any, url: str, shots: Path) -> list[str]:
    """The bed page's list of timeline marks, once it has been filled in."""
    await asyncio.to_thread(driver.get, url)
    script = "return Array.from(document.querySelectorAll('#marks li')).map(li => li.textContent)"
    marks: list[str] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not marks:
        marks = await asyncio.to_thread(driver.execute_script, script)
        await asyncio.sleep(0.2)
    await asyncio.to_thread(driver.save_screenshot, str(shots / "bed.png"))
    return list(marks)


async def watch(driver: Any, url: str, shots: Path) -> list[dict[str, Any] | None]:
    """Load the page, then read the bed card every 0.2 s until the dose's verdict shows."""
    await asyncio.to_thread(driver.get, url)
    seen: list[dict[str, Any] | None] = []
    shot_alert = False
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        state = await asyncio.to_thread(driver.execute_script, CARD_STATE)
        seen.append(state)
        if state and state["alerts"] and not shot_alert:
            await asyncio.to_thread(driver.save_screenshot, str(shots / "alert.png"))
            shot_alert = True
        if state and state["verdict"]:
            break
        await asyncio.sleep(0.2)
    with contextlib.suppress(Exception):
        await asyncio.to_thread(driver.save_screenshot, str(shots / "done.png"))
    return seen
