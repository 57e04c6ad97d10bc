"""Debian's chromium, headless, driven by selenium through Debian's chromedriver: for the page's browser tests,
the bench with pages open, and the README's screenshot. Nothing is downloaded: the driver path is given to
selenium's Service, so Selenium Manager never runs. Needs the [dev] extra and `apt-get install chromium
chromium-driver`.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from foundation.errors import InspectorError

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--mute-audio",
         "--hide-scrollbars")


@contextmanager
def headless_chromium(width: int = 1366, height: int = 768) -> Iterator[Any]:
    """A selenium WebDriver on a fresh headless chromium profile with a width x height page; quit on exit."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        raise InspectorError("selenium is missing: pip install -e '.[dev]'") from None
    for path in (CHROMIUM, CHROMEDRIVER):
        if not path.is_file():
            raise InspectorError(f"{path} is missing: apt-get install chromium chromium-driver")
    profile = tempfile.mkdtemp(prefix="inspector-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:  # the page gets exactly width x height, as on a kiosk-mode panel PC (the window adds no chrome)
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                               {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def screenshot_page(url: str, out: Path, *, width: int = 1366, height: int = 768, timeout_s: float = 120.0) -> Path:
    """A PNG of the station page at width x height, taken while the live view shows an NG part.

    Waits until the stream is live, the NG strip holds a few parts and the badge says NG, then shoots and
    keeps the picture only if the same NG frame was still on screen afterwards (frames change 5 times a second).
    """
    import time

    from selenium.webdriver.support.ui import WebDriverWait

    script = """const strip = document.querySelectorAll('#strip .thumb img');
        return [document.body.dataset.stream, strip.length, document.getElementById('badge').textContent,
                document.body.dataset.frameSeq, document.getElementById('live-img').naturalWidth];"""

    def ng_on_screen(driver: Any) -> bool:
        stream, strip, badge, _, image_width = driver.execute_script(script)
        return bool(stream == "live" and strip >= 4 and badge == "NG" and image_width > 0)

    with headless_chromium(width, height) as driver:
        driver.get(url)
        deadline = time.monotonic() + timeout_s
        wait = WebDriverWait(driver, timeout_s, poll_frequency=0.05)
        while True:
            wait.until(ng_on_screen)
            before = driver.execute_script(script)
            png = driver.get_screenshot_as_png()
            if driver.execute_script(script) == before:
                break
            if time.monotonic() > deadline:
                raise InspectorError(f"{url}: no NG part stayed on screen long enough for a screenshot")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(png)
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m inspector.web.browser URL OUT.png`: the README's screenshot of a running station page."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("url", help="the station page, e.g. http://127.0.0.1:8080/ while `make demo` runs")
    parser.add_argument("out", type=Path, help="PNG to write")
    parser.add_argument("--width", type=int, default=1366)
    parser.add_argument("--height", type=int, default=768)
    args = parser.parse_args(argv)
    print(screenshot_page(args.url, args.out, width=args.width, height=args.height))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
