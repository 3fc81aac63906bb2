"""The dashboard's login and bedside assignment form in a real browser (issue 12).

Headless Debian Chromium via Selenium (the ``browser`` fixture of
test_dashboard_browser.py) against the gateway with a users file, a simulated
VM-1 on a pty and a private Mosquitto (tests/e2e_harness.py). A nurse logs in
through the form (after a wrong password), assigns a bed by typing the subject
and "scanning" the kit (the scanner's Enter sends the form), sees the answer and
the ward card change, logs out; a viewer gets no form. Screenshots in the test's
temp dir. Login, role and CSRF refusals over HTTP: tests/test_web_auth.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from devicegw.web.auth import hash_password
from tests.e2e_harness import running
from tests.mqtt_helpers import MosquittoBroker
from tests.test_dashboard_browser import browser  # noqa: F401 - the pytest fixture
from tests.test_web import base_url

pytestmark = pytest.mark.e2e

USERS = {"nina": ("nurse", "nina-password"), "vera": ("viewer", "vera-password")}


def until(driver: Any, check: Callable[[Any], Any], timeout: float = 30) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, 0.1).until(check)


def log_in(d: Any, url: str, name: str, password: str) -> None:
    from selenium.webdriver.common.by import By

    d.get(url + "/")
    until(d, lambda d: d.current_url.endswith("/login"))  # no data without a login
    form = d.find_element(By.ID, "login")
    form.find_element(By.NAME, "user").send_keys(name)
    form.find_element(By.NAME, "password").send_keys(password + "\n")


def nurse_then_viewer(d: Any, url: str, shots: Path) -> None:
    """The browser's part; run in a worker thread (the gateway serves on the loop)."""
    from selenium.webdriver.common.by import By

    log_in(d, url, "nina", "not-her-password")
    message = until(d, lambda d: d.find_element(By.CSS_SELECTOR, ".message").text)
    assert message == "Wrong user name or password."
    log_in(d, url, "nina", USERS["nina"][1])
    until(d, lambda d: d.find_element(By.ID, "who").text == "nina (nurse)")

    d.get(url + "/bed/B01")
    until(d, lambda d: d.find_element(By.ID, "assign").is_displayed())
    d.find_element(By.ID, "assign-subject").send_keys("CVD-042-0005\n")  # Enter: on to the kit
    assert d.switch_to.active_element.get_attribute("id") == "assign-kit"
    d.switch_to.active_element.send_keys("K-30005\n")  # as a USB scanner types it
    result = (By.ID, "assign-result")
    until(d, lambda d: d.find_element(*result).text not in ("", "…"))
    assert d.find_element(*result).text == "bed B01: subject CVD-042-0005, kit K-30005"
    d.save_screenshot(str(shots / "assigned.png"))

    d.get(url + "/")
    card = (By.CSS_SELECTOR, 'section.bed[data-bed="B01"] .who')
    until(d, lambda d: "CVD-042-0005" in d.find_element(*card).text)
    assert "K-30005" in d.find_element(*card).text
    d.save_screenshot(str(shots / "ward.png"))
    d.find_element(By.CSS_SELECTOR, "#logout button").click()
    until(d, lambda d: d.current_url.endswith("/login"))

    log_in(d, url, "vera", USERS["vera"][1])
    until(d, lambda d: d.find_element(By.ID, "who").text == "vera (viewer)")
    d.get(url + "/bed/B01")
    until(d, lambda d: "CVD-042-0005" in d.find_element(By.ID, "bed-now").text)
    assert not d.find_element(By.ID, "assign").is_displayed()  # a viewer gets no form


async def test_a_nurse_logs_in_and_assigns_a_bed_with_a_scanned_kit(
    mosquitto: MosquittoBroker,
    tmp_path: Path,
    browser: Any,  # noqa: F811
) -> None:
    users = tmp_path / "users.toml"
    users.write_text(
        "".join(
            f'[users.{n}]\nrole = "{r}"\npassword_hash = "{hash_password(p)}"\n'
            for n, (r, p) in USERS.items()
        )
    )
    http = {"listen": "127.0.0.1:0", "users_file": str(users), "session_idle_s": 1e6}
    async with running(mosquitto, tmp_path, ["complete"], sections={"http": http}) as e2e:
        url = await base_url(e2e)
        await asyncio.to_thread(nurse_then_viewer, browser, url, tmp_path)
        rows = e2e.gateway.store.conn.execute(
            "SELECT kind, body FROM audit WHERE kind IN ('bed_assigned', 'web_login', "
            "'web_login_failed', 'web_logout') ORDER BY seq"
        ).fetchall()
    got = [(k, json.loads(b).get("user", json.loads(b).get("operator"))) for k, b in rows]
    assert got[1:] == [  # after the config's seed
        ("web_login_failed", "nina"),
        ("web_login", "nina"),
        ("bed_assigned", "nina"),
        ("web_logout", "nina"),
        ("web_login", "vera"),
    ]
    assert (tmp_path / "assigned.png").stat().st_size > 0
