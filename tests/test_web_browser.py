"""The station page in a real browser: Debian's chromium (headless, via chromedriver) against the real daemon on
the synthetic camera, ONNX Runtime engines of the random-weight calibrated SKU and a real mosquitto.

One walk through what an operator does: the page loads, the live badge and counters move, an NG part shows up
in the strip and opens, a control without the token is refused, pause stops the counters, resume restarts
them, a SKU changeover from the page shows the new SKU. Every wait is on a condition with a generous deadline.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from inspector.broker import LocalBroker
from inspector.config import load_config
from inspector.service import Daemon
from inspector.web.browser import CHROMEDRIVER, CHROMIUM, headless_chromium

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()),
                       reason="needs Debian's chromium and chromium-driver (make system-deps)"),
]

TOKEN = "browser-test-token-0123456789abcdef"
DEADLINE_S = 60.0


@pytest.fixture
def daemon(tmp_path: Path, broker: LocalBroker, random_calibrated_sku: Path) -> Iterator[Daemon]:
    token = tmp_path / "web.token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    path = tmp_path / "inspector.toml"
    path.write_text(f"""
active_sku = "brick"
[line]
line_id = "it"
station_id = "web"
[camera]
type = "synthetic"
width = 128
height = 128
fps = 8.0
defect_rate = 0.5
seed = 11
[mqtt]
port = {broker.port}
spool_dir = "spool"
[engine]
threads = 1
[archive]
dir = "archive"
[service]
watchdog = false
frame_timeout_ms = 60000
[web]
enabled = true
port = 0
token_file = "{token}"
[skus.brick]
model_dir = "{random_calibrated_sku}"
[skus.brick2]
model_dir = "{random_calibrated_sku}"
""")
    d = Daemon(load_config(path))
    d.start()
    try:
        yield d
    finally:
        d.stop()


def test_operator_walk_through_the_station_page(daemon: Daemon) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    assert daemon.web is not None
    with headless_chromium() as driver:
        wait = WebDriverWait(driver, DEADLINE_S, poll_frequency=0.2)

        def text(element_id: str) -> str:
            return str(driver.find_element(By.ID, element_id).text)

        def number(element_id: str) -> int:
            value = text(element_id)
            return int(value) if value.isdigit() else -1

        def body(attribute: str) -> Any:
            return driver.find_element(By.TAG_NAME, "body").get_attribute(attribute)

        driver.get(daemon.web.url)
        wait.until(lambda _: text("title") == "it / web" and body("data-stream") == "live")

        # live: the badge shows a verdict, the frame is drawn, the counters move
        wait.until(lambda _: text("badge") in ("OK", "NG") and number("frames") > 0)
        assert driver.execute_script("return document.getElementById('live-img').naturalWidth") >= 480
        seen = number("frames")
        frame_seq = int(body("data-frame-seq"))
        wait.until(lambda _: number("frames") >= seen + 3 and int(body("data-frame-seq")) > frame_seq)
        assert text("sku") == "brick" and number("sku-frames") > 0

        # an NG part appears in the strip; clicking it opens frame, heat map and verdict JSON
        wait.until(lambda _: driver.execute_script(
            "const img = document.querySelector('#strip .thumb img'); return img !== null && img.naturalWidth > 0"))
        driver.find_element(By.CSS_SELECTOR, "#strip .thumb").click()
        wait.until(lambda _: driver.find_element(By.ID, "part").get_attribute("open") is not None)
        assert '"ok": false' in text("part-json")
        wait.until(lambda _: driver.execute_script("return document.getElementById('part-heat').naturalWidth > 0"))
        driver.find_element(By.ID, "part-close").click()

        # a control without the token is refused and changes nothing
        driver.find_element(By.ID, "pause").click()
        wait.until(lambda _: "refused (401)" in text("reply"))
        assert not daemon.running.paused

        # with the token: pause, and the counters stop once the frames in flight are out
        driver.find_element(By.ID, "token").send_keys(TOKEN)
        driver.find_element(By.ID, "pause").click()
        wait.until(lambda _: "done (200)" in text("reply") and text("run-state") == "paused")
        stats = daemon.running.stats
        wait.until(lambda _: stats.snapshot()["frames"] == stats.snapshot()["acquired"])
        final = stats.snapshot()["frames"]
        wait.until(lambda _: number("frames") == final)
        state_seq = int(body("data-state-seq"))
        wait.until(lambda _: int(body("data-state-seq")) >= state_seq + 3)  # three more state events
        assert number("frames") == final and text("pause") == "Resume"

        driver.find_element(By.ID, "pause").click()
        wait.until(lambda _: text("run-state") == "running" and number("frames") > final)

        # SKU changeover from the page: the new engine loads, then the page shows the new SKU
        Select(driver.find_element(By.ID, "sku-select")).select_by_value("brick2")
        driver.find_element(By.ID, "changeover").click()
        wait.until(lambda _: text("sku") == "brick2" and "done (200)" in text("reply"))
        wait.until(lambda _: number("sku-frames") > 0)
        assert daemon.running.sku.name == "brick2"

        errors = [entry for entry in driver.get_log("browser")
                  if entry["level"] == "SEVERE" and "api/cmd" not in entry["message"]]
        assert errors == [], errors
