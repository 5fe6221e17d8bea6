"""Screenshots of the dashboard for the docs (`make screenshots`): a real server, the built-in model,
two real jobs, headless Chromium at 1280x800.

    python -m tests.server.ui.screenshots --out docs/ui

writes jobs.png (the table with two finished jobs and a running one), job-running.png,
job-finished.png and compare.png. Needs `shears models prepare smollm2-135m` (done by `make setup`)
and Chromium.
"""

from __future__ import annotations

import argparse
import base64
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from shears.client.client import ShearsClient
from shears.client.launch import ServerProcess
from tests.server.ui.browser import Browser, missing

MODEL = "smollm2-135m"


def request(method: str, pattern: str, sparsity: float) -> dict[str, Any]:
    return {
        "model": MODEL,
        "method": method,
        "sparsity": sparsity,
        "pattern": pattern,
        "calibration": {"source": "builtin", "samples": 8, "seqlen": 128},
        "evaluation": {"enabled": True, "seqlen": 128, "max_tokens": 2048},
    }


def wait(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise TimeoutError(f"{what} within {timeout} s")


def full_page(browser: Browser, path: Path, max_height: int = 3200) -> None:
    """The whole page at 1280 px wide, not just the window (Chromium's own full-page capture)."""
    height = min(browser.js("return document.documentElement.scrollHeight"), max_height)
    clip = {"x": 0, "y": 0, "width": 1280, "height": height, "scale": 1}
    options = {"captureBeyondViewport": True, "clip": clip}
    shot = browser.driver.execute_cdp_cmd("Page.captureScreenshot", options)
    path.write_bytes(base64.b64decode(shot["data"]))
    print(f"wrote {path}", file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/ui"))
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for each job")
    args = parser.parse_args()
    reason = missing()
    if reason:
        print(reason, file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    # A SIGTERM still stops the server and the browser (the finally below).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="shears-screens-") as data:
        flags = ["--max-concurrent-jobs", "2", "--min-free-disk-bytes", "0", "--log-level", "warning"]
        server = ServerProcess(Path(data), args=flags)
        server.start()
        browser = Browser()
        try:
            client = ShearsClient(server.url)
            # Two Wanda jobs run side by side and finish; a SparseGPT job is caught half way.
            finished = [
                client.submit(request("wanda", "2:4", 0.5)),
                client.submit(request("wanda", "unstructured", 0.5)),
            ]
            running = client.submit(request("sparsegpt", "2:4", 0.5))
            for job in finished:
                wait(
                    lambda job=job: client.job(job["id"])["status"] == "succeeded", args.timeout, "a job done"
                )

            def half_pruned() -> bool:
                job = client.job(running["id"])
                return job["phase"] == "pruning" and (job["progress"] or {}).get("fraction", 0) >= 0.4

            wait(half_pruned, args.timeout, "the third job half pruned")
            browser.get(server.url + "/ui")
            time.sleep(2.5)
            browser.screenshot(args.out / "jobs.png")
            print(f"wrote {args.out / 'jobs.png'}", file=sys.stderr)
            browser.get(f"{server.url}/ui/jobs/{running['id']}")
            time.sleep(2.5)
            full_page(browser, args.out / "job-running.png")
            browser.get(f"{server.url}/ui/jobs/{finished[0]['id']}")
            time.sleep(2.5)
            full_page(browser, args.out / "job-finished.png")
            browser.get(f"{server.url}/ui/compare?ids={finished[0]['id']},{finished[1]['id']}")
            time.sleep(2.5)
            full_page(browser, args.out / "compare.png")
            browser.get("about:blank")
            client.cancel(running["id"])
        finally:
            browser.close()
            server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
