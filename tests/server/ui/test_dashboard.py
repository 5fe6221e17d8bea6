"""The dashboard in a real headless Chromium against a real `shears serve`: submit through the form and
watch the job finish live, read its charts and numbers, download an artifact, compare two jobs,
cancel and delete from the job page, see validation errors next to their field, markup shown as text,
a strict CSP on every page, and a usable layout on a narrow window."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from shears.client.client import ShearsClient
from shears.client.launch import ServerProcess
from tests.server.conftest import job_request, wait_for
from tests.server.ui.browser import Browser
from tests.server.ui.conftest import HOSTILE_NAME

PAGES = ["/ui", "/ui/jobs/j0123456789abcdef012345", "/ui/compare", "/docs", "/redoc"]
STATIC = [
    "/ui/static/ui.css",
    "/ui/static/jobs.js",
    "/ui/static/vendor/swagger-ui-dist-5.35.0/swagger-ui-bundle.js",
]


def _close(a: float, b: float, rel: float = 1e-4) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b))


def _number(text: str) -> float:
    return float(text.split()[0].replace(",", ""))


# Injected before a page's scripts: the Last-Event-ID of each event-stream request the page makes.
RECORD_STREAMS = """
window.__streams = [];
const original = window.fetch;
window.fetch = function (input, init) {
  const headers = (init && init.headers) || {};
  if (headers.Accept === "text/event-stream") window.__streams.push(headers["Last-Event-ID"] ?? null);
  return original.apply(this, arguments);
};
"""


def _open_form(browser: Browser) -> None:
    """The form is folded once jobs exist (open on an empty server): open it as a user would."""
    if browser.css("#new-job").get_attribute("open") is None:
        browser.css("#new-job summary").click()


def _status(browser: Browser, selector: str) -> str | None:
    nodes = browser.all(selector)
    return nodes[0].get_attribute("data-status") if nodes else None


def test_every_page_and_static_file_has_a_strict_csp(ui_server: ServerProcess) -> None:
    for path in PAGES + STATIC:
        response = httpx.get(ui_server.url + path)
        assert response.status_code == 200, path
        policy = dict(
            part.strip().split(" ", 1) for part in response.headers["content-security-policy"].split(";")
        )
        assert policy["default-src"] == "'none'" and policy["script-src"] == "'self'", path
        assert "unsafe" not in policy["script-src"] + policy["style-src"], path
        assert policy["frame-ancestors"] == "'none'" and policy["object-src"] == "'none'", path
        assert response.headers["x-content-type-options"] == "nosniff", path
    assert httpx.get(ui_server.url + "/ui/jobs/..%2Fetc").status_code == 404
    assert httpx.get(ui_server.url + "/", follow_redirects=False).headers["location"] == "/ui"


def test_form_options_list_what_this_server_allows(
    ui_server: ServerProcess, model_root: Path, extra_models: Path
) -> None:
    options = httpx.get(ui_server.url + "/ui/options").json()
    assert options["builtin_models"] == ["smollm2-135m"]
    local = set(options["local_models"])
    assert {str(model_root / "tiny"), str(model_root / "medium"), str(extra_models / "tiny6")} <= local
    assert str(extra_models / HOSTILE_NAME) in local
    assert options["request_schema"]["required"] == ["model", "method"]  # sparsity: not with method none
    assert options["text_files"] == []  # no --text-dir given
    assert "javascript" in httpx.get(ui_server.url + "/ui/static/jobs.js").headers["content-type"]


def test_submit_watch_inspect_download_and_compare(
    browser: Browser, ui_server: ServerProcess, extra_models: Path
) -> None:
    client = ShearsClient(ui_server.url)
    # The job to compare with, on a model whose name is markup: it runs beside the form's job.
    partner = client.submit(
        job_request(extra_models / HOSTILE_NAME, pattern="unstructured", method="wanda", samples=2)
    )

    browser.get(ui_server.url + "/ui")
    browser.wait(lambda _: browser.all("#f-model"), message="the form was not built")
    # Record every value the table's progress bars take, and mark the page to detect a reload.
    browser.js(
        """window.__marker = 'no-reload'; window.__progress = [];
        new MutationObserver((records) => { for (const r of records) {
          if (r.target.tagName !== 'PROGRESS' || !r.target.hasAttribute('value')) continue;
          window.__progress.push([r.target.closest('tr').dataset.jobId, r.target.value]); } })
        .observe(document.querySelector('#jobs-table tbody'),
                 {subtree: true, attributes: true, attributeFilter: ['value']});"""
    )
    _open_form(browser)
    model = browser.css("#f-model")
    model.clear()
    model.send_keys(str(extra_models / "tiny6"))
    Select(browser.css("#f-method")).select_by_value("sparsegpt")
    browser.css("#f-pattern").send_keys("2:4")
    browser.css("#f-calibration-samples").send_keys("8")
    browser.css("#f-calibration-seqlen").send_keys("64")
    browser.css("#advanced summary").click()
    browser.css("#f-evaluation-seqlen").send_keys("64")
    browser.css("#f-evaluation-max_tokens").send_keys("256")
    browser.css("#submit-job").click()
    status = browser.wait(
        lambda _: (text := browser.css("#form-status").text).startswith("submitted") and text,
        message="the form did not submit",
    )
    job_id = status.split()[-1]
    request = client.job(job_id)["request"]
    assert request["model"] == str(extra_models / "tiny6") and request["pattern"] == "2:4"
    assert request["calibration"]["samples"] == 8 and request["evaluation"]["max_tokens"] == 256
    assert request["sparsegpt"]["refine_iterations"] == 4  # untouched fields keep the server's defaults

    row = f'#jobs-table tr[data-job-id="{job_id}"] td[data-status]'
    browser.wait(lambda _: _status(browser, row) == "succeeded", timeout=240, message="job did not succeed")
    assert browser.js("return window.__marker") == "no-reload"
    seen = [value for job, value in browser.js("return window.__progress") if job == job_id]
    assert any(0 < value < 1 for value in seen), seen  # the bar moved through the blocks...
    assert seen[-1] == 1  # ...and ended full, without a reload
    assert client.job(job_id)["status"] == "succeeded"

    # The job page: charts and numbers match the manifest.
    browser.css(f'#jobs-table tr[data-job-id="{job_id}"] th a').click()
    # The live result event draws the perplexity first; the manifest's view replaces it, then the
    # artifacts table appears: read once that is there.
    browser.wait(lambda _: browser.all("#artifacts tbody tr"), message="the job page did not finish")
    listing = client.artifacts(job_id)
    manifest = listing["manifest"]
    ppl = manifest["perplexity"]
    assert _close(_number(browser.css("#ppl-dense").text), ppl["dense"])
    assert _close(_number(browser.css("#ppl-pruned").text), ppl["pruned"])
    assert _number(browser.css("#ppl-seqlen").text) == ppl["seqlen"] == 64
    assert _number(browser.css("#ppl-tokens").text) == ppl["tokens"]
    blocks = manifest["model"]["num_blocks"]
    browser.wait(lambda _: browser.all(f'#error-chart figure[data-points="{blocks}"]'))
    assert len(browser.all("#error-chart .point")) == blocks == 6
    cells = browser.all("#heatmap rect.cell")
    assert len(cells) == len(manifest["layers"]) == blocks * 7
    prefix = manifest["model"]["blocks_prefix"]
    for cell in cells[:10]:
        name = f"{prefix}.{cell.get_attribute('data-column')}.{cell.get_attribute('data-row')}"
        assert float(cell.get_attribute("data-value")) == manifest["layers"][name]["sparsity"]
    phases = [node.get_attribute("data-phase") for node in browser.all("#timeline rect.phase")]
    assert phases[:3] == ["loading", "calibrating", "pruning"] and "verifying" in phases
    assert json.loads(browser.css("#request-json").text) == request
    events = client.events(job_id)["events"]
    assert len(browser.all("#event-log tbody tr")) == len(events)
    assert browser.all("#peak-rss_mb") and browser.css("#delete-job").is_displayed()
    # Every other manifest section is shown generically (structure, speed... when a job has them).
    sections = {node.get_attribute("data-section") for node in browser.all("#extra details")}
    assert {"calibration", "timings", "versions"} <= sections
    assert not browser.css("#cancel-job").is_displayed()

    # Download an artifact from the page: the file on disk has the sha256 the page and the API show.
    entry = next(f for f in listing["files"] if f["name"] == "config.json")
    shown = browser.css('#artifacts tr[data-name="config.json"] .sha').text
    browser.css('#artifacts a[aria-label="download config.json"]').click()
    saved = browser.downloads / "config.json"
    wait_for(lambda: saved.is_file() and not list(browser.downloads.glob("*.crdownload")), timeout=30)
    assert hashlib.sha256(saved.read_bytes()).hexdigest() == entry["sha256"] == shown
    assert saved.stat().st_size == entry["size"]

    # Compare the two finished jobs: one column each, both error curves on one chart.
    assert client.wait(partner["id"], timeout=120)["status"] == "succeeded"
    browser.get(ui_server.url + "/ui")
    for jid in (job_id, partner["id"]):
        box = f'#jobs-table tr[data-job-id="{jid}"] input[type=checkbox]'
        browser.wait(lambda _, box=box: browser.all(box) and browser.css(box).is_enabled())
        browser.css(box).click()
    browser.css("#compare-selected").click()
    browser.wait(lambda _: browser.all('#compare-chart figure[data-series="2"]'), message="no compare chart")
    drawn = browser.all("#compare-chart svg g.series")
    assert [len(g.find_elements(By.CSS_SELECTOR, ".point")) for g in drawn] == [blocks, 2]
    headers = [th.get_attribute("data-job-id") for th in browser.all("#compare-table thead th[data-job-id]")]
    assert headers == [job_id, partner["id"]]
    rows = {
        tr.find_element(By.TAG_NAME, "th").text: [td.text for td in tr.find_elements(By.TAG_NAME, "td")]
        for tr in browser.all("#compare-table tbody tr")
    }
    assert _close(float(rows["Perplexity after"][0]), ppl["pruned"])
    assert rows["Method"] == ["sparsegpt", "wanda"] and rows["Status"] == ["succeeded", "succeeded"]

    # The hostile model name was shown as text on every page, never parsed as markup.
    assert rows["Model"][1].endswith(HOSTILE_NAME)
    assert browser.js("return window.__pwned") is None
    browser.get(f"{ui_server.url}/ui/jobs/{partner['id']}")
    browser.wait(lambda _: HOSTILE_NAME in browser.css("#job-summary").text)
    browser.wait(lambda _: len(browser.all("#event-log tbody tr")) > 3)
    assert browser.js("return window.__pwned") is None
    assert not browser.all("main img")
    assert not [error for error in browser.errors() if "Content Security Policy" in error]


def test_cancel_and_delete_from_the_job_page(
    browser: Browser, ui_server: ServerProcess, model_root: Path
) -> None:
    client = ShearsClient(ui_server.url)
    job = client.submit(job_request(model_root / "medium", samples=64, seqlen=128))
    browser.get(f"{ui_server.url}/ui/jobs/{job['id']}")
    # Cancel once a worker runs it (the page learns that from the job's event stream).
    browser.wait(lambda _: _status(browser, "#job-status") == "running", timeout=90, message="not running")
    browser.css("#cancel-job").click()
    dialog = browser.css("#confirm-dialog")
    assert dialog.get_attribute("open") is not None
    browser.css("#confirm-yes").click()
    browser.wait(lambda _: _status(browser, "#job-status") == "cancelled", timeout=60, message="no cancel")
    assert client.job(job["id"])["status"] == "cancelled"
    assert not browser.css("#cancel-job").is_displayed()
    # Delete asks first: "Keep it" keeps it, then the real delete goes back to the list.
    browser.css("#delete-job").click()
    browser.css("#confirm-no").click()
    assert client.job(job["id"])["status"] == "cancelled"
    browser.css("#delete-job").click()
    browser.css("#confirm-yes").click()
    browser.wait(lambda _: browser.driver.current_url.endswith("/ui"), message="no redirect after delete")
    with pytest.raises(Exception, match="404"):
        client.job(job["id"])


def test_validation_errors_appear_next_to_their_field(
    browser: Browser, ui_server: ServerProcess, tmp_path: Path
) -> None:
    client = ShearsClient(ui_server.url)
    before = len(client.jobs(limit=200)["jobs"])
    browser.get(ui_server.url + "/ui")
    browser.wait(lambda _: browser.all("#f-sparsity"))
    _open_form(browser)
    sparsity = browser.css("#f-sparsity")
    sparsity.clear()
    sparsity.send_keys("1.5")
    browser.css("#submit-job").click()
    error = '.field[data-field="sparsity"] [data-error-for="sparsity"]'
    browser.wait(lambda _: browser.css(error).text, message="no error next to sparsity")
    assert "less than 1" in browser.css(error).text
    assert sparsity.get_attribute("aria-invalid") == "true"
    assert browser.css(error).get_attribute("id") in sparsity.get_attribute("aria-describedby").split()
    assert browser.driver.switch_to.active_element == sparsity  # focus moved to the field to fix
    assert not browser.css('[data-error-for="model"]').text

    # An admission error (a path outside the allowed folders) lands next to the model field.
    sparsity.clear()
    sparsity.send_keys("0.5")
    model = browser.css("#f-model")
    model.clear()
    model.send_keys("/etc/passwd-model")
    browser.css("#submit-job").click()
    browser.wait(lambda _: browser.css('[data-error-for="model"]').text, message="no error next to model")
    assert "outside the folders" in browser.css('[data-error-for="model"]').text
    assert not browser.css('[data-error-for="sparsity"]').text

    # A calibration upload the server refuses: its error sits by the file field, no job is queued.
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    model.clear()
    model.send_keys("smollm2-135m")
    browser.css("#f-upload").send_keys(str(empty))
    browser.css("#submit-job").click()
    browser.wait(lambda _: browser.css('[data-error-for="upload"]').text, message="no error by the upload")
    assert "empty" in browser.css('[data-error-for="upload"]').text
    assert not browser.css('[data-error-for="model"]').text
    assert len(client.jobs(limit=200)["jobs"]) == before  # nothing was queued


def test_labels_keyboard_and_narrow_layout(
    browser: Browser, ui_server: ServerProcess, extra_models: Path
) -> None:
    browser.get(ui_server.url + "/ui")
    browser.wait(lambda _: browser.all("#f-model"))
    unlabelled = browser.js(
        """return [...document.querySelectorAll('input, select, textarea')]
          .filter(e => e.type !== 'hidden' && !e.labels.length && !e.getAttribute('aria-label'))
          .map(e => e.id || e.outerHTML)"""
    )
    assert unlabelled == []
    # The first Tab reaches the skip link; Enter on the "New job" summary opens the form.
    body = browser.css("body")
    body.send_keys("\ue004")  # Tab
    assert browser.driver.switch_to.active_element.get_attribute("class") == "skip"
    browser.js("document.getElementById('new-job').open = false")
    browser.css("#new-job summary").send_keys("\ue007")  # Enter
    assert browser.css("#new-job").get_attribute("open") is not None
    client = ShearsClient(ui_server.url)
    finished = client.jobs(status="succeeded", limit=1)["jobs"]
    if not finished:  # run alone: make one
        finished = [client.wait(client.submit(job_request(extra_models / HOSTILE_NAME))["id"], timeout=120)]
    job_id = finished[0]["id"]
    try:
        browser.driver.set_window_size(390, 800)
        for path in ("/ui", f"/ui/jobs/{job_id}"):
            browser.get(ui_server.url + path)
            browser.wait(lambda _: browser.all("#jobs-table tbody tr, #artifacts tbody tr"))
            width = browser.js("return [document.documentElement.scrollWidth, window.innerWidth]")
            wide = browser.js(
                """return [...document.querySelectorAll('body *')]
                  .filter(e => e.getBoundingClientRect().right > innerWidth + 1)
                  .slice(0, 5).map(e => e.tagName + '#' + e.id + '.' + e.className)"""
            )
            assert width[0] <= width[1], (path, width, wide)
    finally:
        browser.driver.set_window_size(1280, 800)


def _console_errors(browser: Browser, allowed: tuple[str, ...] = ()) -> list[str]:
    return [e for e in browser.errors() if not any(text in e for text in allowed)]


def test_api_docs_render_offline(browser: Browser, ui_server: ServerProcess) -> None:
    spec = httpx.get(ui_server.url + "/openapi.json").json()
    operations = [(path, method) for path, item in spec["paths"].items() for method in item]
    browser.clear_console()
    browser.get(ui_server.url + "/docs")
    browser.wait(lambda _: len(browser.all(".opblock")) == len(operations), timeout=30, message="no ops")
    summaries = {node.text for node in browser.all(".opblock-summary-path")}
    assert {path for path, _ in operations} <= {s.replace("\u200b", "") for s in summaries}
    origin = ui_server.url
    assert all(url.startswith(origin) for url in browser.resources()), browser.resources()
    assert _console_errors(browser) == []

    browser.get(ui_server.url + "/redoc")
    browser.wait(
        lambda _: len(browser.all('[data-section-id^="operation/"]')) == len(operations),
        timeout=30,
        message="ReDoc rendered no operations",
    )
    assert "Submit a pruning job" in browser.css("#redoc").text
    # ReDoc's footer logo points at its CDN: the CSP blocks it (the only outside URL, the only error).
    logo = "https://cdn.redoc.ly/redoc/logo-mini.svg"
    assert {url for url in browser.resources() if not url.startswith(origin)} <= {logo}
    assert any(logo in error and "has been blocked" in error for error in browser.errors())
    assert _console_errors(browser, allowed=(logo,)) == []


@pytest.fixture
def token_server(tmp_path: Path, model_root: Path) -> Any:
    from tests.server.ui.conftest import serve

    token = {"SHEARS_TOKEN": "s3cret"}
    server = serve(tmp_path / "data", model_root, "--max-concurrent-jobs", "0", env=token)
    yield server
    server.stop()


def test_token_asked_once_sent_as_bearer_and_stream_resumes(
    browser: Browser, token_server: ServerProcess, model_root: Path
) -> None:
    client = ShearsClient(token_server.url, token="s3cret")
    queued = client.submit(job_request(model_root / "tiny"))
    # The pages are shells anyone may load; the data behind them needs the token.
    for path in ("/ui", f"/ui/jobs/{queued['id']}", "/ui/static/common.js"):
        assert httpx.get(token_server.url + path).status_code == 200, path
    assert httpx.get(token_server.url + "/ui/options").status_code == 401
    bearer = {"Authorization": "Bearer s3cret"}
    assert httpx.get(token_server.url + "/ui/options", headers=bearer).status_code == 200
    browser.get(token_server.url + "/ui")
    browser.wait(lambda _: browser.css("#token-dialog").get_attribute("open") is not None)
    time.sleep(0.3)
    assert browser.all("#jobs-table tbody tr") == []  # nothing shown without the token
    assert not browser.all("#f-model")
    browser.css("#token-input").send_keys("wrong\n")
    browser.wait(lambda _: "refused" in browser.css("#token-error").text)
    assert browser.css("#token-dialog").get_attribute("open") is not None
    browser.css("#token-input").clear()
    browser.css("#token-input").send_keys("s3cret\n")
    row = f'#jobs-table tr[data-job-id="{queued["id"]}"]'
    browser.wait(lambda _: browser.all(row), message="the table stayed empty with the token")
    assert browser.css("#token-dialog").get_attribute("open") is None
    browser.wait(lambda _: browser.all("#f-model"))  # the form's options load too
    assert browser.js("return sessionStorage.getItem('shears-token')") == "s3cret"
    assert browser.driver.get_cookies() == [] and browser.js("return document.cookie") == ""
    # Asked once: another page of the same tab uses the stored token without asking. Its event
    # requests are recorded, to see the stream resume after a server restart.
    recorder = browser.driver.execute_cdp_cmd(
        "Page.addScriptToEvaluateOnNewDocument", {"source": RECORD_STREAMS}
    )
    browser.get(f"{token_server.url}/ui/jobs/{queued['id']}")
    browser.driver.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", recorder)
    browser.wait(lambda _: _status(browser, "#job-status") == "queued")
    assert browser.css("#token-dialog").get_attribute("open") is None
    token_server.kill()  # the page's stream drops mid-way (the server runs no job: nothing to lose)
    token_server.start()
    client.cancel(queued["id"])
    browser.wait(lambda _: _status(browser, "#job-status") == "cancelled", timeout=60, message="no resume")
    ids = [int(cell.text) for cell in browser.all("#event-log tbody td:first-child")]
    assert ids == [event["id"] for event in client.events(queued["id"])["events"]]  # each event once
    requests = browser.js("return window.__streams")
    assert requests[0] is None and len(requests) >= 2 and set(requests[1:]) == {"1"}, requests
    browser.css("#signout").click()
    browser.wait(lambda _: browser.css("#token-dialog").get_attribute("open") is not None)
    assert browser.js("return sessionStorage.getItem('shears-token')") is None
    browser.get("about:blank")  # close the page's event stream before the server stops
