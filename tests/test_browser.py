"""The search page in headless Chromium against a real `idml-serve` process.

The server runs on 127.0.0.1 over a catalog of demo images, embedded with
models/default when that bundle exists and with the tiny random-projection
test bundle otherwise. Chromium and chromedriver come from Debian
(`scripts/install.sh --all`); nothing is downloaded. Without them the tests
skip, unless IDML_REQUIRE_TEST_TOOLS=1 (set by .ci/run) turns the skip into a
failure.

IDML_SCREENSHOT_PATH=docs/img/search-page.png saves the screenshot of a search
there (the documentation's picture) and indexes the whole demo catalog for it;
otherwise the screenshot goes to the test's temporary folder.
"""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import httpx
import pytest

from index.cli import main as index_main
from service.testing import ServerProcess
from tests.bundle_factory import make_bundle

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
DEMO_MANIFEST = ROOT / "demo" / "catalog.csv"
DEFAULT_BUNDLE = ROOT / "models" / "default"
# Classes of the demo catalog indexed for the tests; each has one image per vendor.
TEST_CLASSES = 6
RESULTS_K = 12
# Classes indexed for the server that requires an API key.
KEYED_CLASSES = 2
API_KEY = "browser-test-key-0123456789"
# Seconds to wait for the page to show a response; a search takes well under one.
PAGE_TIMEOUT_S = 30
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,900",
)


def missing_tool(reason: str) -> None:
    """Skip the test, or fail it when IDML_REQUIRE_TEST_TOOLS=1 (CI)."""
    if os.environ.get("IDML_REQUIRE_TEST_TOOLS") == "1":
        pytest.fail(f"{reason}, and IDML_REQUIRE_TEST_TOOLS=1 requires it")
    pytest.skip(reason)


def find_executable(*names: str) -> str | None:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    return None


def write_test_manifest(path: Path, classes: int | None) -> list[dict]:
    """Copy the first `classes` classes of demo/catalog.csv (all when None) into `path`, with absolute image paths."""
    with open(DEMO_MANIFEST, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames
        rows = list(reader)
    labels = list(dict.fromkeys(row["label"] for row in rows))
    chosen = set(labels if classes is None else labels[:classes])
    selected = [dict(row, path=str(DEMO_MANIFEST.parent / row["path"])) for row in rows if row["label"] in chosen]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(selected)
    return selected


@pytest.fixture(scope="module")
def chromium_driver(tmp_path_factory):
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing_tool("selenium is not installed (scripts/install.sh --all installs it)")
    chromium = find_executable("chromium", "chromium-browser")
    chromedriver = find_executable("chromedriver")
    if chromium is None or chromedriver is None:
        missing_tool("chromium or chromedriver is not installed (Debian packages chromium, chromium-driver)")

    folder = tmp_path_factory.mktemp("chromium")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={folder / 'profile'}")
    service = Service(executable_path=chromedriver, log_output=str(folder / "chromedriver.log"))
    # Selenium (4.51 checked) skips Selenium Manager when the Service names a driver.
    # SE_OFFLINE keeps Selenium Manager from downloading anything if a version runs it anyway.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SE_OFFLINE", "true")
        driver = webdriver.Chrome(service=service, options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def search_server(tmp_path_factory):
    """A running idml-serve over demo images; yields (server, rows of the indexed images)."""
    if not DEMO_MANIFEST.is_file():
        pytest.fail(f"{DEMO_MANIFEST} is missing; the browser tests index the demo catalog")
    folder = tmp_path_factory.mktemp("search-server")
    bundle = choose_bundle(folder)
    classes = None if os.environ.get("IDML_SCREENSHOT_PATH") else TEST_CLASSES
    index, rows = build_index(folder, bundle, classes)

    server = ServerProcess(bundle, index, env={"threads": 1, "log_format": "text"}, log_path=folder / "server.log")
    with server:
        yield server, rows


def build_index(folder: Path, bundle: Path, classes: int | None) -> tuple[Path, list[dict]]:
    """Index the first `classes` demo classes into folder/index; returns the index folder and its rows."""
    rows = write_test_manifest(folder / "catalog.csv", classes)
    index = folder / "index"
    status = index_main(
        ["build", "--bundle", str(bundle), "--index", str(index), "--manifest", str(folder / "catalog.csv"),
         "--threads", "1", "--no-progress"]
    )
    assert status == 0, "idml-index build failed"
    return index, rows


def choose_bundle(folder: Path) -> Path:
    """models/default when it exists, else a tiny random-projection bundle written into `folder`."""
    if (DEFAULT_BUNDLE / "model.onnx").is_file():
        return DEFAULT_BUNDLE
    return make_bundle(folder / "bundle", seed=0).path


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory):
    """A running idml-serve that requires API_KEY for reads; yields (server, indexed rows)."""
    folder = tmp_path_factory.mktemp("keyed-server")
    bundle = choose_bundle(folder)
    index, rows = build_index(folder, bundle, KEYED_CLASSES)
    env = {"threads": 1, "log_format": "text", "api_key": API_KEY, "read_key_required": "true"}
    with ServerProcess(bundle, index, env=env, log_path=folder / "server.log") as server:
        yield server, rows


@pytest.fixture()
def page(chromium_driver, search_server):
    """The search page, freshly loaded; yields (driver, server, indexed rows)."""
    server, rows = search_server
    chromium_driver.get(server.base_url + "/")
    return chromium_driver, server, rows


def wait_for(driver, condition, message: str):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, PAGE_TIMEOUT_S).until(condition)
    except TimeoutException:
        error = driver.find_element("id", "error").text
        status = driver.find_element("id", "status").text
        raise AssertionError(f"{message}; page status {status!r}, page error {error!r}") from None


def results_loaded(driver) -> bool:
    """True once results are shown and every thumbnail has finished loading or failing."""
    return driver.execute_script(
        """
        const items = document.querySelectorAll('#results li');
        if (items.length === 0) { return false; }
        return Array.from(document.querySelectorAll('#results img')).every(img => img.complete);
        """
    )


def expected_percent(confidence: float) -> str:
    """The page's rendering of a confidence in [0, 1] as a whole percentage."""
    percent = confidence * 100
    if 0 < percent < 1:
        return "<1%"
    return f"{percent:.0f}%"


def search_api(server, image: Path) -> dict:
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        response = client.post(f"/search?k={RESULTS_K}", files={"image": (image.name, image.read_bytes(), "image/png")})
    assert response.status_code == 200, response.text
    return response.json()


def test_search_page_shows_results(page, tmp_path):
    driver, server, rows = page
    query = rows[1]
    image = Path(query["path"])
    expected = search_api(server, image)

    driver.find_element("id", "image-input").send_keys(str(image))
    wait_for(driver, results_loaded, "no results appeared")

    items = driver.find_elements("css selector", "#results li")
    shown_ids = [item.get_attribute("data-id") for item in items]
    assert shown_ids == [result["id"] for result in expected["results"]]
    assert shown_ids[0] == query["id"], "an indexed image must find itself first"

    widths = driver.execute_script("return Array.from(document.querySelectorAll('#results img')).map(i => i.naturalWidth)")
    assert len(widths) == len(items)
    assert all(width > 0 for width in widths), f"thumbnails that did not load: {widths}"
    alts = [image.get_attribute("alt") for image in driver.find_elements("css selector", "#results img")]
    assert all(alt.startswith("Match ") for alt in alts), alts

    for item, result in zip(items, expected["results"]):
        value = item.find_element("css selector", ".confidence-value").text
        assert value == expected_percent(result["confidence"]), result["id"]
        bar = item.find_element("css selector", ".confidence-bar")
        assert bar.get_attribute("aria-valuenow") == f"{result['confidence'] * 100:.0f}"
        fill = item.find_element("css selector", ".confidence-bar .bar-fill")
        assert fill.value_of_css_property("width") != "0px" or result["confidence"] < 0.005
        assert f"similarity {result['similarity']:.3f}" in item.find_element("css selector", ".result-scores").text
        assert result["label"] in item.find_element("css selector", ".result-label").text

    uncertainty = driver.find_element("id", "uncertainty-value").text
    threshold = expected["query"]["ambiguity_threshold"]
    assert uncertainty == f"{expected['query']['uncertainty']:.3f}"
    assert driver.find_element("id", "uncertainty-scale").text.startswith(f"Ambiguous above {threshold:.3f}")
    assert driver.find_element("id", "uncertainty-threshold").is_displayed()
    uncertainty_bar = driver.find_element("id", "uncertainty-bar")
    expected_fill = min(1.0, expected["query"]["uncertainty"] / (2 * threshold)) * 100
    assert uncertainty_bar.get_attribute("aria-valuenow") == f"{expected_fill:.0f}"
    assert driver.find_element("id", "ambiguous-flag").is_displayed() == expected["query"]["ambiguous"]
    assert driver.find_element("id", "model-id").text == expected["model_id"]
    assert "total" in driver.find_element("id", "timings").text
    assert driver.find_element("id", "error").is_displayed() is False

    screenshot = Path(os.environ.get("IDML_SCREENSHOT_PATH") or tmp_path / "search-page.png")
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    # Grow the window so that the whole page fits the viewport, window decorations included.
    height, decorations = driver.execute_script(
        "return [document.documentElement.scrollHeight, window.outerHeight - window.innerHeight]"
    )
    driver.set_window_size(1280, min(max(height, 900), 2400) + decorations)
    try:
        assert driver.save_screenshot(str(screenshot))
    finally:
        driver.set_window_size(1280, 900)
    assert screenshot.stat().st_size > 10_000


def test_search_page_shows_api_error(page, tmp_path):
    driver, _, _ = page
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("these bytes are text, not an image\n")

    driver.find_element("id", "image-input").send_keys(str(not_an_image))
    error = wait_for(driver, lambda d: d.find_element("id", "error").text and d.find_element("id", "error"),
                     "no error appeared")

    assert error.is_displayed()
    assert error.get_attribute("role") == "alert"
    assert "not_an_image" in error.text
    assert driver.find_elements("css selector", "#results li") == []


def test_search_page_accepts_dropped_file(page):
    driver, server, rows = page
    query = rows[0]

    # Drops the first indexed image on the drop zone, as a DataTransfer of a real File.
    driver.execute_script(
        """
        const [url, name] = arguments;
        fetch(url).then(r => r.blob()).then(blob => {
          const transfer = new DataTransfer();
          transfer.items.add(new File([blob], name, {type: blob.type}));
          const zone = document.getElementById('drop-zone');
          zone.dispatchEvent(new DragEvent('dragover', {dataTransfer: transfer, bubbles: true, cancelable: true}));
          zone.dispatchEvent(new DragEvent('drop', {dataTransfer: transfer, bubbles: true, cancelable: true}));
        });
        """,
        f"{server.base_url}/items/{query['id']}/image",
        "dropped.png",
    )
    wait_for(driver, results_loaded, "no results appeared after the drop")

    first = driver.find_element("css selector", "#results li")
    assert first.get_attribute("data-id") == query["id"]
    assert driver.find_element("id", "preview").is_displayed()
    assert driver.find_element("id", "preview-note").text.startswith("dropped.png")


def test_file_input_reachable_by_keyboard(page):
    from selenium.webdriver.common.keys import Keys

    driver, _, _ = page
    file_input = driver.find_element("id", "image-input")
    body = driver.find_element("tag name", "body")

    body.send_keys(Keys.TAB)
    for _ in range(5):
        if driver.switch_to.active_element == file_input:
            break
        driver.switch_to.active_element.send_keys(Keys.TAB)

    assert driver.switch_to.active_element == file_input
    assert driver.execute_script("return arguments[0].labels.length", file_input) >= 1


def test_search_page_sends_api_key(chromium_driver, keyed_server):
    driver = chromium_driver
    server, rows = keyed_server
    image = Path(rows[0]["path"])
    driver.get(server.base_url + "/")
    driver.execute_script("sessionStorage.clear()")
    driver.get(server.base_url + "/")

    driver.find_element("id", "image-input").send_keys(str(image))
    error = wait_for(driver, lambda d: d.find_element("id", "error").text and d.find_element("id", "error"),
                     "no error appeared without the key")
    assert "401" in error.text
    assert driver.find_element("id", "api-key-details").get_attribute("open") is not None
    assert driver.switch_to.active_element == driver.find_element("id", "api-key-input")

    driver.switch_to.active_element.send_keys(API_KEY)
    driver.find_element("id", "search-button").click()
    wait_for(driver, results_loaded, "no results appeared with the key")

    sources = driver.execute_script("return Array.from(document.querySelectorAll('#results img')).map(i => i.src)")
    widths = driver.execute_script("return Array.from(document.querySelectorAll('#results img')).map(i => i.naturalWidth)")
    assert sources and all(source.startswith("blob:") for source in sources), sources
    assert all(width > 0 for width in widths), widths
    assert driver.find_element("id", "error").is_displayed() is False
    assert driver.execute_script("return sessionStorage.getItem('idml-search.api-key')") == API_KEY
