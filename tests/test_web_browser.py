"""The station page in a real browser: Debian's chromium (headless, via chromedriver) against the real daemon on
the synthetic camera, ONNX Runtime engines of the random-weight calibrated SKU and a real mosquitto.

One walk through what an operator does: the page loads, the live badge and counters move, an NG part shows up
in the strip and opens, a control without the token is refused, pause stops the counters, resume restarts
them, a SKU changeover from the page shows the new SKU. Then the review queue: one NG part marked a false reject,
another a confirmed defect. Then the SKU versions panel of a SKU run from the version store: activate a version,
roll back. Every wait is on a condition with a generous deadline.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from inspector.broker import LocalBroker
from inspector.config import load_config
from inspector.service import Daemon
from inspector.skustore import Provenance, SkuStore
from inspector.web.browser import CHROMEDRIVER, CHROMIUM, headless_chromium
from tests.stations import write_station
from tests.test_skustore import variant

# a test that drives the station page in Debian's chromium (the page's tests elsewhere carry it too)
needs_chromium = pytest.mark.skipif(not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()),
                                    reason="needs Debian's chromium and chromium-driver (make system-deps)")
pytestmark = [pytest.mark.integration, pytest.mark.slow, needs_chromium]

TOKEN = "browser-test-token-0123456789abcdef"
DEADLINE_S = 60.0


def write_token(path: Path, token: str) -> Path:
    """The station page's control token file at path, readable by its owner only (as the daemon requires)."""
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path


def page_text(driver: Any, element_id: str) -> str:
    """The text the page shows in the element with this id."""
    from selenium.webdriver.common.by import By

    return str(driver.find_element(By.ID, element_id).text)


def version_rows(driver: Any) -> list[tuple[str, str]]:
    """(version, state) of each row the SKU versions panel lists, read in one script call: the panel re-renders
    its rows when the status changes, and rows found first and read one by one after could be gone by then."""
    rows = driver.execute_script("return Array.from(document.querySelectorAll('#versions-list tr[data-version]'), "
                                 "(row) => [row.dataset.version, row.dataset.state]);")
    return [(str(version), str(state)) for version, state in rows]


@pytest.fixture
def daemon(tmp_path: Path, broker: LocalBroker, random_calibrated_sku: Path) -> Iterator[Daemon]:
    token = write_token(tmp_path / "web.token", TOKEN)
    path = write_station(
        tmp_path / "inspector.toml", port=broker.port, station_id="web", active="brick",
        skus={"brick": {"model_dir": random_calibrated_sku, "defect_types": ["scratch", "dent"]},
              "brick2": {"model_dir": random_calibrated_sku}},
        camera={"type": "synthetic", "width": 128, "height": 128, "fps": 8.0, "defect_rate": 0.5, "seed": 11},
        archive={"dir": "archive"}, service={"watchdog": False},
        web={"enabled": True, "port": 0, "token_file": token})
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

        text = functools.partial(page_text, driver)

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
        # a frame the camera was delivering when the pause came is still taken and inspected: count after it
        state_seq = int(body("data-state-seq"))
        wait.until(lambda _: int(body("data-state-seq")) >= state_seq + 3)  # three more state events
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


def test_operator_reviews_rejects_in_the_queue(daemon: Daemon) -> None:
    """The review queue: the operator marks one NG part a false reject and another a confirmed defect with its
    type; the queue then shows both as reviewed, and the reviews file holds both."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    assert daemon.web is not None and daemon.archive is not None
    archive = daemon.archive
    with headless_chromium() as driver:
        wait = WebDriverWait(driver, DEADLINE_S, poll_frequency=0.2)

        text = functools.partial(page_text, driver)

        def listed() -> list[tuple[str, str]]:
            """The queue's parts and their review labels, as the page shows them."""
            return [(str(item.get_attribute("data-part")), str(item.get_attribute("data-label")))
                    for item in driver.find_elements(By.CSS_SELECTOR, "#review-list .review-item")]

        def select(part: str) -> None:
            item = f'#review-list .review-item[data-part="{part}"]'
            driver.find_element(By.CSS_SELECTOR, item).click()
            wait.until(lambda _: "selected" in str(driver.find_element(By.CSS_SELECTOR, item).get_attribute("class")))

        def mark(button_id: str, part: str) -> None:
            driver.find_element(By.ID, button_id).click()
            wait.until(lambda _: "review: done (200)" in text("review-reply"))
            wait.until(lambda _: part not in dict(listed()))  # reviewed: gone from the parts to review

        driver.get(daemon.web.url)
        wait.until(lambda _: text("title") == "it / web")
        wait.until(lambda _: sum(1 for _ in archive.parts()) >= 2)  # two NG parts archived
        driver.find_element(By.ID, "review-open").click()
        wait.until(lambda _: len(listed()) >= 2)
        driver.find_element(By.ID, "review-token").send_keys(TOKEN)
        driver.find_element(By.ID, "review-operator").send_keys("anna")

        false_reject = listed()[0][0]
        select(false_reject)
        wait.until(lambda _: text("review-good") == "False reject" and text("review-defect") == "Defect confirmed")
        mark("review-good", false_reject)

        defect = listed()[0][0]
        select(defect)
        Select(driver.find_element(By.ID, "review-defect-type")).select_by_value("scratch")
        mark("review-defect", defect)

        Select(driver.find_element(By.ID, "review-show")).select_by_value("reviewed")
        wait.until(lambda _: sorted(listed()) == sorted([(false_reject, "false_reject"),
                                                          (defect, "defect_confirmed")]))
        select(defect)
        wait.until(lambda _: "defect confirmed · scratch by anna" in text("review-facts"))
        wait.until(lambda _: driver.execute_script("return document.getElementById('review-image').naturalWidth > 0"))

        errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
        assert errors == [], errors
    reviews = [json.loads(line) for line in
               (daemon.config.archive.dir / "reviews" / "reviews.jsonl").read_text().splitlines()]
    assert [(r["part"], r["label"], r["defect_type"], r["operator"]) for r in reviews] == [
        (false_reject, "false_reject", None, "anna"), (defect, "defect_confirmed", "scratch", "anna")]
    assert all(r["client"] == "web 127.0.0.1" for r in reviews)


@pytest.fixture
def store_daemon(tmp_path: Path, broker: LocalBroker,
                 random_calibrated_sku: Path) -> Iterator[tuple[Daemon, list[str]]]:
    """A station whose SKU "part" runs from a version store holding two versions of the random SKU, the first
    active; the daemon and the two version ids."""
    store = SkuStore(tmp_path / "store")
    ids = [store.add_version("part", variant(random_calibrated_sku, tmp_path / f"v{i}", f"version {i}"),
                             Provenance(origin="bundle", source=f"part-{i}.tar.gz", actor="installer"))
           for i in (1, 2)]
    store.activate("part", ids[0])
    token = write_token(tmp_path / "web.token", TOKEN)
    path = write_station(
        tmp_path / "inspector.toml", port=broker.port, station_id="versions", active="part",
        skus={"part": {"model_dir": "store/part/active"}},
        camera={"type": "synthetic", "width": 64, "height": 64, "fps": 8.0}, archive={"enabled": False},
        service={"watchdog": False}, web={"enabled": True, "port": 0, "token_file": token}, store={"dir": "store"})
    d = Daemon(load_config(path))
    d.start()
    try:
        yield d, ids
    finally:
        d.stop()


def test_operator_activates_a_sku_version_and_rolls_it_back(store_daemon: tuple[Daemon, list[str]]) -> None:
    """The SKU versions panel: the operator sees both versions with the one inspecting marked, activates the
    second (the reply comes once it inspects, and the header shows it), then rolls back to the first."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    daemon, (v1, v2) = store_daemon
    assert daemon.web is not None
    with headless_chromium() as driver:
        wait = WebDriverWait(driver, DEADLINE_S, poll_frequency=0.2)

        text = functools.partial(page_text, driver)
        rows = functools.partial(version_rows, driver)

        driver.get(daemon.web.url)
        wait.until(lambda _: text("title") == "it / versions" and text("sku-version") == f"v {v1[:8]}")
        driver.find_element(By.ID, "versions-open").click()
        wait.until(lambda _: rows() == [(v1, "running"), (v2, "")])
        assert "part-2.tar.gz, added by installer" in str(driver.find_element(
            By.CSS_SELECTOR, f'#versions-list tr[data-version="{v2}"] td:nth-child(3)').get_attribute("title"))
        driver.find_element(By.ID, "versions-token").send_keys(TOKEN)
        driver.find_element(By.ID, "versions-operator").send_keys("anna")
        driver.find_element(By.ID, "versions-reason").send_keys("ECO-118")

        driver.find_element(By.CSS_SELECTOR, f'#versions-list tr[data-version="{v2}"] .versions-activate').click()
        wait.until(lambda _: "activate: done (200)" in text("versions-reply"))
        assert daemon.running.sku.version == v2  # answered once the new version inspects
        wait.until(lambda _: rows() == [(v1, ""), (v2, "running")])
        wait.until(lambda _: text("sku-version") == f"v {v2[:8]}")

        driver.find_element(By.ID, "versions-rollback").click()
        wait.until(lambda _: "rollback: done (200)" in text("versions-reply"))
        wait.until(lambda _: rows() == [(v1, "running"), (v2, "")])
        wait.until(lambda _: text("sku-version") == f"v {v1[:8]}")
        assert daemon.running.sku.version == v1

        errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
        assert errors == [], errors
    history = SkuStore(daemon.config.store.dir).history("part")[3:]
    assert [(e.action, e.before, e.after, e.actor, e.reason) for e in history] == [
        ("activate", v1, v2, "web 127.0.0.1 (anna)", "ECO-118"),
        ("rollback", v2, v1, "web 127.0.0.1 (anna)", "ECO-118")]
