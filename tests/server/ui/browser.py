"""Headless Chromium from Debian's packages (chromium + chromium-driver), driven by Selenium.

No browser is downloaded: Selenium is pointed at /usr/bin/chromium and /usr/bin/chromedriver (or
$SHEARS_CHROMIUM / $SHEARS_CHROMEDRIVER), with a fresh profile per browser and no background
networking, so a page can only reach what it loads from the server under test.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

CHROMIUM = os.environ.get("SHEARS_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("SHEARS_CHROMEDRIVER", "/usr/bin/chromedriver")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
    "--disable-extensions",
    "--disable-default-apps",
    "--metrics-recording-only",
    "--password-store=basic",
    "--hide-scrollbars",
    "--force-color-profile=srgb",
    "--disable-breakpad",
    "--disable-crash-reporter",
]


def missing() -> str | None:
    """Why a browser cannot start here, or None."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not (Path(path).is_file() and os.access(path, os.X_OK)):
            return f"{path} is missing: apt-get install chromium chromium-driver"
    return None


class Browser:
    """One headless Chromium with its own profile and download folder."""

    def __init__(self, width: int = 1280, height: int = 800) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.profile = Path(tempfile.mkdtemp(prefix="shears-chromium-"))
        self.downloads = self.profile / "downloads"
        self.downloads.mkdir()
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={self.profile / 'profile'}")
        options.add_argument(f"--window-size={width},{height}")
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        options.add_experimental_option(
            "prefs",
            {
                "download.default_directory": str(self.downloads),
                "download.prompt_for_download": False,
                "safebrowsing.enabled": False,
            },
        )
        self.driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
        self.driver.set_window_size(width, height)
        self.driver.execute_cdp_cmd(
            "Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(self.downloads)}
        )
        self.console: list[dict[str, Any]] = []

    def get(self, url: str) -> None:
        self.driver.get(url)

    def wait(self, predicate: Callable[[Any], Any], timeout: float = 30.0, message: str = "") -> Any:
        from selenium.webdriver.support.ui import WebDriverWait

        return WebDriverWait(self.driver, timeout, poll_frequency=0.05).until(predicate, message)

    def css(self, selector: str) -> Any:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, selector)

    def all(self, selector: str) -> list[Any]:
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.CSS_SELECTOR, selector)

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def logs(self) -> list[dict[str, Any]]:
        """Console messages since the last call (CSP violations show here as errors)."""
        self.console += self.driver.get_log("browser")
        return self.console

    def clear_console(self) -> None:
        self.logs()
        self.console.clear()

    def errors(self) -> list[str]:
        return [entry["message"] for entry in self.logs() if entry["level"] == "SEVERE"]

    def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.driver.save_screenshot(str(path))

    def resources(self) -> list[str]:
        """URLs of everything the current page loaded (scripts, styles, fetches, images)."""
        script = "return JSON.stringify(performance.getEntriesByType('resource').map(e => e.name))"
        return json.loads(self.js(script))

    def close(self) -> None:
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self.profile, ignore_errors=True)
