"""The web page, driven in a real headless Chromium against the real server (uvicorn on loopback).

Chromium is Debian's (``scripts/install_chromium.sh``, which ``make test`` runs); Playwright drives it
through ``executable_path`` because Playwright's own browser download needs the network. Without a
Chromium the tests skip locally and fail when ``CI`` is set, so CI never passes by skipping them.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

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


def _flipped(path: Path) -> bytes:
    """The photo mirrored: new content (so a new image), still looking like the original."""
    with Image.open(path) as img:
        return _jpeg(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT))


def _filter_of(url: str) -> Any:
    """The ``filter`` query parameter of a request, parsed (None when there is none)."""
    values = parse_qs(urlsplit(url).query).get("filter")
    return None if values is None else json.loads(values[0])


def test_metadata_filter_box(
    page: Any, server: dict[str, Any], photo_files: dict[str, Path], tmp_path: Path
) -> None:
    """The Filter box: sent as ?filter= on uploaded-image searches and on "Search with this", only when
    filled; not-JSON is refused in the page without a request; the server's invalid_filter detail shows
    next to the box while the previous results stay; the active filter is a chip that clears it."""
    from playwright.sync_api import expect

    base = server["base"]
    tagged = {
        "chelsea.jpg": {"album": "2024", "year": 2024},
        "coffee.jpg": {"album": "2024", "year": 2021},
        "rocket.jpg": {"album": "2023", "year": 2023},
    }
    added: dict[str, str] = {}
    with httpx.Client(base_url=base, headers={"X-API-Key": API_KEY}, timeout=30) as http:
        for name, metadata in tagged.items():
            resp = http.post(
                "/v1/images",
                files={"file": (name, _flipped(photo_files[name]), "image/jpeg")},
                data={"source": f"flipped/{name}", "metadata": json.dumps(metadata)},
            )
            assert resp.status_code == 201, resp.text
            added[name] = resp.json()["id"]
        bad_filter = '{"year": {"$gte": 1, "$lt": "z"}}'
        refused = http.get("/v1/images", params={"filter": bad_filter})
    assert refused.status_code == 422 and refused.json()["code"] == "invalid_filter", refused.text
    server_detail = refused.json()["detail"]
    assert server_detail.startswith("filter.year:"), server_detail

    searches: list[str] = []  # every search request the page sends (upload and more-like-this)
    outside: list[str] = []

    def on_request(request: Any) -> None:
        path = urlsplit(request.url).path
        if path == "/v1/search" or path.endswith("/similar"):
            searches.append(request.url)

    def only_loopback(route: Any) -> None:
        if route.request.url.startswith(base) or route.request.url.startswith(("blob:", "data:")):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    def ids(cards: Any) -> list[str | None]:
        return [c.get_attribute("data-id") for c in cards.all()]

    try:
        page.route("**/*", only_loopback)
        page.on("request", on_request)
        page.goto(base + "/")
        box = page.get_by_role("textbox", name=re.compile(r"^Filter"))  # the label names the input
        expect(box).to_have_attribute("placeholder", '{"album": "2024"}')
        expect(page.get_by_test_id("filter-help")).to_contain_text("$gte")
        expect(page.get_by_test_id("filter-help")).to_contain_text("$prefix")
        cards = page.get_by_test_id("results-grid").get_by_test_id("result-card")
        inline = page.get_by_test_id("filter-error")
        chip = page.get_by_test_id("filter-active")
        error = page.get_by_test_id("error")

        # A filter typed before choosing the image: only the album "2024" ones come back.
        box.fill('{"album": "2024"}')
        with page.expect_response(lambda r: urlsplit(r.url).path == "/v1/search") as answer:
            page.get_by_test_id("file-input").set_input_files(str(photo_files["chelsea.jpg"]))
        assert answer.value.status == 200
        assert _filter_of(answer.value.url) == {"album": "2024"}
        expect(cards).to_have_count(2)
        expect(cards.first).to_have_attribute("data-id", added["chelsea.jpg"])
        assert sorted(ids(cards)) == sorted([added["chelsea.jpg"], added["coffee.jpg"]])
        expect(chip).to_be_visible()
        expect(chip).to_contain_text('filtered: {"album": "2024"}')
        expect(inline).to_be_hidden()
        shown = ids(cards)

        # Not JSON: said next to the box, and nothing is sent (Apply, nor a new image: that is only
        # classified). A request of our own afterwards marks the point by which one would have gone.
        sent = len(searches)
        box.fill('{"album": 2024')
        box.press("Enter")
        expect(inline).to_be_visible()
        expect(inline).to_contain_text("Not valid JSON")
        expect(box).to_have_attribute("aria-invalid", "true")
        expect(box).to_have_attribute("aria-describedby", re.compile(r"\bfilter-error\b"))
        with page.expect_response(lambda r: r.url.endswith("/v1/stats")):
            page.evaluate("() => fetch('/v1/stats')")
        with page.expect_response(lambda r: urlsplit(r.url).path == "/v1/classify"):
            page.get_by_test_id("file-input").set_input_files(str(photo_files["coffee.jpg"]))
        expect(page.get_by_test_id("classes-list")).to_contain_text(re.compile(r"espresso|cup", re.I))
        with page.expect_response(lambda r: r.url.endswith("/v1/stats")):
            page.evaluate("() => fetch('/v1/stats')")
        box.fill('["album", "2024"]')  # JSON, but not an object
        page.get_by_test_id("filter-apply").click()
        expect(inline).to_contain_text("must be a JSON object")
        with page.expect_response(lambda r: r.url.endswith("/v1/stats")):
            page.evaluate("() => fetch('/v1/stats')")
        assert searches[sent:] == []
        assert ids(cards) == shown  # the previous results stay
        expect(error).to_be_hidden()

        # JSON, but not a filter: the server's 422 detail shows next to the box, not as an error banner,
        # and the previous results (and their chip) stay.
        box.fill(bad_filter)
        with page.expect_response(lambda r: urlsplit(r.url).path == "/v1/search") as answer:
            box.press("Enter")
        assert answer.value.status == 422
        assert _filter_of(answer.value.url) == json.loads(bad_filter)
        expect(inline).to_have_text(server_detail)
        expect(box).to_have_attribute("aria-invalid", "true")
        expect(error).to_be_hidden()
        expect(cards).to_have_count(2)
        assert ids(cards) == shown
        expect(chip).to_contain_text('filtered: {"album": "2024"}')
        expect(page.get_by_test_id("results-grid")).to_have_attribute("aria-busy", "false")
        _screenshot(page, tmp_path / "page-filter.png", "/tmp/deepfeat-page-filter.png")

        # One click on the chip clears the filter and searches again (the coffee photo, chosen above)
        # without ?filter=: every image is back.
        with page.expect_response(lambda r: urlsplit(r.url).path == "/v1/search") as answer:
            page.get_by_test_id("filter-clear").click()
        assert answer.value.status == 200
        assert _filter_of(answer.value.url) is None
        expect(box).to_have_value("")
        expect(inline).to_be_hidden()
        expect(box).to_have_attribute("aria-invalid", "false")
        expect(chip).to_be_hidden()
        expect(cards).to_have_count(len(server["ids"]) + len(added))
        expect(cards.first.get_by_test_id("result-source")).to_have_text("coffee.jpg")

        # A range filter with Apply, then "Search with this" on a result: more-like-this filtered too.
        box.fill('{"year": {"$gte": 2022}}')
        with page.expect_response(lambda r: urlsplit(r.url).path == "/v1/search") as answer:
            page.get_by_test_id("filter-apply").click()
        assert _filter_of(answer.value.url) == {"year": {"$gte": 2022}}
        expect(cards).to_have_count(2)
        assert sorted(ids(cards)) == sorted([added["chelsea.jpg"], added["rocket.jpg"]])
        page.locator(f"[data-testid=result-card][data-id='{added['chelsea.jpg']}']").click()
        expect(page.get_by_test_id("detail-meta")).to_contain_text('"album": "2024"')
        with page.expect_response(lambda r: urlsplit(r.url).path.endswith("/similar")) as answer:
            page.get_by_test_id("search-with-this").click()
        assert answer.value.status == 200
        assert urlsplit(answer.value.url).path == f"/v1/images/{added['chelsea.jpg']}/similar"
        assert _filter_of(answer.value.url) == {"year": {"$gte": 2022}}
        expect(cards).to_have_count(1)  # the only other image from 2022 on
        expect(cards.first).to_have_attribute("data-id", added["rocket.jpg"])
        expect(chip).to_contain_text('filtered: {"year": {"$gte": 2022}}')

        # Clearing after more-like-this runs that again, unfiltered: every image but the one searched with.
        with page.expect_response(lambda r: urlsplit(r.url).path.endswith("/similar")) as answer:
            page.get_by_test_id("filter-clear").click()
        assert _filter_of(answer.value.url) is None
        expect(cards).to_have_count(len(server["ids"]) + len(added) - 1)
        expect(cards.first).to_have_attribute("data-id", server["ids"]["chelsea.jpg"])
        expect(error).to_be_hidden()
        assert outside == []
    finally:
        with httpx.Client(base_url=base, headers={"X-API-Key": API_KEY}, timeout=30) as http:
            for image_id in added.values():
                assert http.delete(f"/v1/images/{image_id}").status_code == 200
