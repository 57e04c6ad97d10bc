"""Debian's chromium, headless, driven by selenium through Debian's chromedriver: for the page's browser tests,
the bench with pages open, and the README screenshot. Nothing is downloaded: the driver path is given to
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
