"""The web page, driven in a real headless Chromium against the real server (uvicorn on loopback).

Chromium is Debian's (``scripts/install_chromium.sh``, which ``make test`` runs); Playwright drives it
through ``executable_path`` because Playwright's own browser download needs the network. Without a
Chromium the tests skip locally and fail when ``CI`` is set, so CI never passes by skipping them.
"""

from __future__ import annotations

import io
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from deepfeat.settings import Settings
from tests.app.live import live_server

pytestmark = pytest.mark.browser

API_KEY = "browser-test-key"
TIMEOUT_MS = 20_000
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",  # we run as root in containers
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _unavailable(reason: str) -> None:
    """A skip here; a failure under CI (tests/conftest.py), which installs Chromium."""
    pytest.skip(f"{reason} (install: scripts/install_chromium.sh)")


def _chromium() -> str:
    for candidate in (os.environ.get("DEEPFEAT_CHROMIUM"), "chromium", "chromium-browser"):
        if candidate and (path := shutil.which(candidate)):
            return path
    _unavailable("Chromium is not installed")
    raise AssertionError("unreachable")


def _jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _photos() -> dict[str, bytes]:
    """Real photos from wheels, as JPEG bytes keyed by the file name used as their source."""
    import matplotlib
    import skimage.data

    photos = {
        f"{name}.jpg": _jpeg(Image.fromarray(getattr(skimage.data, name)()))
        for name in ("chelsea", "coffee", "rocket", "astronaut")
    }
    with Image.open(os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")) as img:
        photos["grace_hopper.jpg"] = _jpeg(img)
    return photos


@pytest.fixture(scope="module")
def photo_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("browser-photos")
    files = {}
    for name, data in _photos().items():
        (root / name).write_bytes(data)
        files[name] = root / name
    return files


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, photo_files: dict[str, Path]
) -> Iterator[dict[str, Any]]:
    """The real app under uvicorn in a thread, with the photos indexed through the API."""
    settings = Settings(data_dir=tmp_path_factory.mktemp("browser") / "data", workers=0, api_key=API_KEY)
    with live_server(settings, ready_timeout=45) as base:
        ids = {}
        with httpx.Client(base_url=base, headers={"X-API-Key": API_KEY}, timeout=30) as client:
            for name, path in photo_files.items():
                resp = client.post(
                    "/v1/images",
                    files={"file": (name, path.read_bytes(), "image/jpeg")},
                    data={"source": name},
                )
                assert resp.status_code == 201, resp.text
                ids[name] = resp.json()["id"]
        yield {"base": base, "ids": ids}


@pytest.fixture(scope="module")
def browser_context(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    executable = _chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright package is not installed (pip install -e '.[test]')")
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=executable,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1280, "height": 900},
            device_scale_factor=1,
        )
        context.set_default_timeout(TIMEOUT_MS)
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def page(browser_context: Any) -> Iterator[Any]:
    """A fresh tab; uncaught JavaScript errors fail the test."""
    from playwright.sync_api import expect

    expect.set_options(timeout=TIMEOUT_MS)
    tab = browser_context.new_page()
    js_errors: list[str] = []
    tab.on("pageerror", lambda exc: js_errors.append(str(exc)))
    yield tab
    tab.close()
    assert not js_errors, f"JavaScript errors on the page: {js_errors}"


def _screenshot(page: Any, path: Path, shared: str) -> None:
    page.screenshot(path=str(path), full_page=True)
    shutil.copyfile(path, shared)


def test_search_classify_stats_and_add(
    page: Any, server: dict[str, Any], photo_files: dict[str, Path], tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    page.goto(server["base"] + "/")
    stats = page.get_by_test_id("stats")
    expect(stats).to_contain_text("5 images indexed")
    expect(stats).to_contain_text("efficientnet_lite0")

    page.get_by_test_id("file-input").set_input_files(str(photo_files["chelsea.jpg"]))

    cards = page.get_by_test_id("results-grid").get_by_test_id("result-card")
    expect(cards).to_have_count(5)  # k=12, five indexed
    first = cards.first
    expect(first.get_by_test_id("result-source")).to_have_text("chelsea.jpg")
    assert float(first.get_by_test_id("result-score").inner_text()) > 0.9
    assert first.get_attribute("data-id") == server["ids"]["chelsea.jpg"]
    scores = [float(s) for s in page.get_by_test_id("result-score").all_inner_texts()]
    assert scores == sorted(scores, reverse=True), scores
    # The thumbnail really loaded (thumbnail_url served a JPEG the browser decoded).
    page.wait_for_function(
        "() => { const img = document.querySelector('[data-testid=result-card] img');"
        " return img && img.complete && img.naturalWidth > 0; }"
    )

    classes = page.get_by_test_id("classes-list")
    expect(classes.get_by_test_id("class-item")).to_have_count(5)
    expect(classes).to_contain_text(re.compile(r"cat", re.IGNORECASE))

    # The similarity toggle re-runs the search with ?similarity=semantic; the cat still comes first.
    with page.expect_response(lambda r: "similarity=semantic" in r.url and r.status == 200):
        page.get_by_test_id("similarity-select").select_option("semantic")
    expect(cards).to_have_count(5)
    expect(first.get_by_test_id("result-source")).to_have_text("chelsea.jpg")
    with page.expect_response(lambda r: "similarity=visual" in r.url and r.status == 200):
        page.get_by_test_id("similarity-select").select_option("visual")
    expect(cards).to_have_count(5)

    add = page.get_by_test_id("add-button")
    result = page.get_by_test_id("add-result")
    page.get_by_label("API key").fill("wrong-key")
    add.click()
    expect(result).to_contain_text("unauthorized")

    page.get_by_label("API key").fill(API_KEY)
    add.click()
    expect(result).to_contain_text("Already indexed")
    expect(result.get_by_test_id("add-id")).to_have_text(server["ids"]["chelsea.jpg"])
    expect(stats).to_contain_text("5 images indexed")
    expect(page.get_by_test_id("error")).to_be_hidden()

    _screenshot(page, tmp_path / "page.png", "/tmp/deepfeat-page.png")

    page.reload()
    expect(page.get_by_label("API key")).to_have_value(API_KEY)  # kept in localStorage


def test_api_error_is_shown_with_its_code(page: Any, server: dict[str, Any], tmp_path: Path) -> None:
    from playwright.sync_api import expect

    junk = tmp_path / "notes.txt"
    junk.write_bytes(b"this is not an image\n" * 10)
    expected = httpx.post(
        server["base"] + "/v1/search",
        files={"file": (junk.name, junk.read_bytes(), "text/plain")},
        timeout=30,
    )
    assert expected.status_code >= 400
    code = expected.json()["code"]

    page.goto(server["base"] + "/")
    page.get_by_test_id("file-input").set_input_files(str(junk))
    error = page.get_by_test_id("error")
    expect(error).to_be_visible()
    expect(error.get_by_test_id("error-code")).to_have_text(code)
    expect(error).to_contain_text(expected.json()["detail"][:40])
    expect(page.get_by_test_id("result-card")).to_have_count(0)


def test_phone_width_fits_without_horizontal_scroll(
    page: Any, server: dict[str, Any], photo_files: dict[str, Path], tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    page.set_viewport_size({"width": 390, "height": 844})
    page.goto(server["base"] + "/")
    page.get_by_test_id("file-input").set_input_files(str(photo_files["coffee.jpg"]))
    expect(page.get_by_test_id("result-card").first.get_by_test_id("result-source")).to_have_text(
        "coffee.jpg"
    )
    expect(page.get_by_test_id("class-item")).to_have_count(5)
    overflow = page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page scrolls sideways by {overflow}px at phone width"
    _screenshot(page, tmp_path / "page-phone.png", "/tmp/deepfeat-page-phone.png")


def test_api_docs_render_with_the_network_blocked(page: Any, server: dict[str, Any]) -> None:
    """/docs loads Swagger UI from the service itself: every request leaving loopback is refused, and
    the operations still render."""
    from playwright.sync_api import expect

    base = server["base"]
    outside: list[str] = []

    def only_loopback(route: Any) -> None:
        if route.request.url.startswith(base):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    page.route("**/*", only_loopback)
    page.goto(f"{base}/docs")
    expect(page.locator(".opblock-summary-path", has_text="/v1/search").first).to_be_visible()
    expect(
        page.locator(".opblock-summary-path", has_text="/v1/images/{image_id}/similar").first
    ).to_be_visible()
    assert outside == []


def test_result_details_and_search_with_this(
    page: Any, server: dict[str, Any], photo_files: dict[str, Path]
) -> None:
    """Click a result: its larger view, id and metadata; "Search with this" runs more-like-this. A long
    source keeps its file name visible, shortened in the middle."""
    from playwright.sync_api import expect

    long_source = "archive/2024/summer-holidays/camera-roll/day-03/beach/IMG_20240703_1542.jpg"
    rotated = io.BytesIO()
    with Image.open(photo_files["coffee.jpg"]) as img:
        img.transpose(Image.Transpose.ROTATE_90).save(rotated, "JPEG", quality=90)
    with httpx.Client(base_url=server["base"], headers={"X-API-Key": API_KEY}, timeout=30) as http:
        added = http.post(
            "/v1/images",
            files={"file": ("beach.jpg", rotated.getvalue(), "image/jpeg")},
            data={"source": long_source, "metadata": '{"album": "summer"}'},
        ).json()["id"]
    try:
        page.goto(server["base"] + "/")
        page.get_by_test_id("file-input").set_input_files(str(photo_files["coffee.jpg"]))
        cards = page.get_by_test_id("results-grid").get_by_test_id("result-card")
        expect(cards).to_have_count(6)
        expect(page.get_by_test_id("score-legend")).to_contain_text("0.80")
        card = page.locator(f"[data-testid=result-card][data-id='{added}']")
        source = card.get_by_test_id("result-source")
        expect(source).to_have_attribute("title", long_source)
        shown = source.inner_text()
        assert "…" in shown and shown.endswith("/IMG_20240703_1542.jpg") and len(shown) < len(long_source)

        card.click()
        dialog = page.get_by_test_id("detail")
        expect(dialog).to_be_visible()
        expect(page.get_by_test_id("detail-id")).to_have_text(added)
        expect(page.get_by_test_id("detail-source")).to_have_text(long_source)
        expect(page.get_by_test_id("detail-meta")).to_contain_text('"album": "summer"')

        with page.expect_response(lambda r: f"/v1/images/{added}/similar" in r.url and r.status == 200):
            page.get_by_test_id("search-with-this").click()
        expect(dialog).to_be_hidden()
        expect(cards).to_have_count(5)  # every other image, the one searched with left out
        assert added not in [c.get_attribute("data-id") for c in cards.all()]
        expect(cards.first).to_have_attribute("data-id", server["ids"]["coffee.jpg"])  # its original
        expect(page.get_by_test_id("error")).to_be_hidden()
    finally:
        with httpx.Client(base_url=server["base"], headers={"X-API-Key": API_KEY}, timeout=30) as http:
            assert http.delete(f"/v1/images/{added}").status_code == 200
