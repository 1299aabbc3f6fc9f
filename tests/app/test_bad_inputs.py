"""The bad-input matrix (issue 4): one case per row, each with its status, error code and what is stored.

Every rejected row asserts that nothing was stored (``GET /v1/stats`` count and the data dir's files are
unchanged); every accepted row asserts exactly one new image, plus what makes the row interesting (the
vector of an EXIF-rotated photo equals the upright one's, alpha is composited, a ZIP appended to a JPEG
never reaches the store...). Request bodies are built byte for byte (``tests/app/hostile.py``), so the
body-size rows are exact.
"""

from __future__ import annotations

import io
import math
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from deepfeat.app.main import create_app
from deepfeat.settings import Settings
from tests.app import hostile as h

KEY = "k3y-S3cret-0123456789"
LIMIT = 4 * 1024 * 1024  # max_upload_bytes of the app under test
AUTH = {"X-API-Key": KEY}
Photos = dict[str, Image.Image]


@dataclass
class App:
    client: TestClient
    data_dir: Path
    root: Path
    counter: list[int] = field(default_factory=lambda: [0])

    def count(self) -> int:
        resp = self.client.get("/v1/stats")
        assert resp.status_code == 200, resp.text
        return int(resp.json()["count"])

    def files(self) -> set[str]:
        """Every file under the test's root (data dir included), relative: nothing may appear."""
        return {str(p.relative_to(self.root)) for p in self.root.rglob("*") if p.is_file()}

    def post(self, body: bytes | Iterator[bytes], headers: dict[str, str], path: str = "/v1/images") -> Any:
        return self.client.post(path, content=body, headers=headers)

    def fresh(self, image: Image.Image) -> Image.Image:
        """A distinct variant of ``image`` (new content, so an add creates a row)."""
        self.counter[0] += 1
        return h.variant(image, self.counter[0])


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    root = tmp_path_factory.mktemp("bad-inputs")
    settings = Settings(data_dir=root / "data", api_key=KEY, max_upload_bytes=LIMIT)
    with TestClient(create_app(settings)) as client:
        yield App(client=client, data_dir=root / "data", root=root)


def _error(resp: Any, status: int, code: str) -> dict[str, Any]:
    assert resp.status_code == status, (resp.status_code, resp.text[:300])
    body = resp.json()
    assert body["code"] == code and body["detail"], body
    return body


@contextmanager
def nothing_stored(app: App) -> Iterator[None]:
    count, files = app.count(), app.files()
    yield
    assert app.count() == count, "a rejected request changed the store"
    new = app.files() - files
    # SQLite may create its -wal/-shm companions on first write; nothing else may appear.
    assert not {f for f in new if not f.startswith("data/catalog.sqlite3-")}, new


@contextmanager
def one_stored(app: App) -> Iterator[None]:
    count = app.count()
    yield
    assert app.count() == count + 1


def _embed(app: App, data: bytes, name: str = "x.png") -> np.ndarray:
    resp = app.post(h.file_body(data, filename=name), h.multipart_headers(), path="/v1/embed")
    assert resp.status_code == 200, resp.text[:300]
    return np.asarray(resp.json()["vector"], dtype=np.float64)


def _add(app: App, data: bytes, *, expect: int = 201, **fields: str) -> dict[str, Any]:
    with one_stored(app) if expect == 201 else nothing_stored(app):
        resp = app.post(h.file_body(data, **fields), h.multipart_headers(**AUTH))
    assert resp.status_code == expect, resp.text[:300]
    return resp.json()


def _record(app: App, image_id: str) -> dict[str, Any]:
    resp = app.client.get(f"/v1/images/{image_id}")
    assert resp.status_code == 200, resp.text
    return resp.json()


def _thumbnail(app: App, image_id: str) -> bytes:
    resp = app.client.get(f"/v1/images/{image_id}/thumbnail")
    assert resp.status_code == 200 and resp.headers["content-type"] == "image/jpeg"
    return resp.content


# ============================================================================ rejected: status, code, nothing stored

Build = Callable[[Photos], tuple[bytes | Iterator[bytes], dict[str, str]]]


def _upload(data: bytes, **fields: str) -> Build:
    return lambda photos: (h.file_body(data, **fields), h.multipart_headers(**AUTH))


def _upload_of(make: Callable[[Photos], bytes], content_type: str = "image/jpeg", **fields: str) -> Build:
    def build(photos: Photos) -> tuple[bytes, dict[str, str]]:
        return h.file_body(make(photos), content_type=content_type, **fields), h.multipart_headers(**AUTH)

    return build


def _raw(body: bytes, content_type: str | None = None) -> Build:
    def build(photos: Photos) -> tuple[bytes, dict[str, str]]:
        headers = h.multipart_headers(**AUTH)
        if content_type is not None:
            headers["Content-Type"] = content_type
        return body, headers

    return build


def _over_limit(photos: Photos) -> tuple[bytes, dict[str, str]]:
    return h.body_of_exact_size(h.encode(photos["coffee"]), LIMIT + 1), h.multipart_headers(**AUTH)


def _over_limit_chunked(photos: Photos) -> tuple[Iterator[bytes], dict[str, str]]:
    body = h.body_of_exact_size(h.encode(photos["coffee"]), LIMIT + 1)

    def chunks() -> Iterator[bytes]:  # no Content-Length: httpx sends Transfer-Encoding: chunked
        for i in range(0, len(body), 64 * 1024):
            yield body[i : i + 64 * 1024]

    return chunks(), h.multipart_headers(**AUTH)


def _huge_declared_length(photos: Photos) -> tuple[bytes, dict[str, str]]:
    return b"x" * 10, {**h.multipart_headers(**AUTH), "Content-Length": str(10**12)}


def _bad_length(value: str) -> Build:
    def build(photos: Photos) -> tuple[bytes, dict[str, str]]:
        return h.file_body(_MALFORMED_FILE), {**h.multipart_headers(**AUTH), "Content-Length": value}

    return build


def _jpeg(photos: Photos) -> bytes:
    return h.encode(photos["rocket"])


def _png(photos: Photos) -> bytes:
    return h.encode(photos["rocket"], "PNG")


def _legal_but_enormous(photos: Photos) -> bytes:
    # A real, fully decodable PNG just over the app's own 40 M pixel limit (and under Pillow's 89 M).
    side = math.isqrt(40_000_000) + 1
    return h.encode(Image.new("L", (side, side), 128), "PNG", compress_level=1)


def _text_bomb(photos: Photos) -> bytes:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "x" * (64 * 1024 * 1024), zip=True)  # 64 MB of text in ~64 kB of zTXt
    return h.encode(h.variant(photos["rocket"], 1), "PNG", pnginfo=info)


def _pillow_limit_side(factor: float) -> int:
    return math.isqrt(int(Image.MAX_IMAGE_PIXELS * factor)) + 1


_P = h.part
_MALFORMED_FILE = b"\xff\xd8\xff" + b"\0" * 64

REJECTED: dict[str, tuple[Build, int, str]] = {
    # --- body size
    "over-limit-with-content-length": (_over_limit, 413, "payload_too_large"),
    "over-limit-chunked-no-content-length": (_over_limit_chunked, 413, "payload_too_large"),
    "huge-declared-content-length-tiny-body": (_huge_declared_length, 413, "payload_too_large"),
    "non-numeric-content-length": (_bad_length("12abc"), 400, "malformed_body"),
    "negative-content-length": (_bad_length("-1"), 400, "malformed_body"),
    # --- not an image, whatever it claims (declared image/jpeg, named .jpg)
    "text-as-jpeg": (_upload(b"hello, I am plain text, not a photo\n" * 4), 415, "unsupported_format"),
    "zip-as-jpeg": (_upload(h.zip_payload(b"just a zip")), 415, "unsupported_format"),
    "pdf-as-jpeg": (_upload(b"%PDF-1.7\n1 0 obj <<>> endobj\n%%EOF\n"), 415, "unsupported_format"),
    "svg-as-jpeg": (
        _upload(b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"><rect/></svg>'),
        415,
        "unsupported_format",
    ),
    "tiff-as-jpeg": (
        _upload_of(lambda p: h.encode(p["coffee"], "TIFF")),
        415,
        "unsupported_format",
    ),
    "psd-as-jpeg": (_upload(h.psd_header()), 415, "unsupported_format"),
    # --- form fields
    "missing-file-field": (_raw(h.multipart([_P("source", b"cats/1.jpg")])), 422, "invalid_request"),
    "misnamed-file-field": (
        _raw(h.multipart([_P("image", _MALFORMED_FILE, filename="a.jpg", content_type="image/jpeg")])),
        422,
        "invalid_request",
    ),
    "file-sent-as-text-field": (_raw(h.multipart([_P("file", _MALFORMED_FILE)])), 422, "invalid_request"),
    "not-multipart-at-all": (_raw(b'{"file": "x"}', "application/json"), 422, "invalid_request"),
    "source-over-4096-chars": (
        _upload_of(lambda p: h.encode(h.variant(p["coffee"], 3)), source="s" * 4097),
        422,
        "invalid_request",
    ),
    # --- malformed multipart
    "malformed-garbage-body": (_raw(b"--nope\r\ngarbage\r\n\r\n"), 400, "malformed_body"),
    "malformed-boundary-mismatch": (
        _raw(
            h.multipart([_P("file", _MALFORMED_FILE, filename="a.jpg")]),
            "multipart/form-data; boundary=not-the-one-used",
        ),
        400,
        "malformed_body",
    ),
    "malformed-no-boundary-parameter": (
        _raw(h.multipart([_P("file", _MALFORMED_FILE, filename="a.jpg")]), "multipart/form-data"),
        400,
        "malformed_body",
    ),
    "malformed-part-without-disposition": (
        _raw(
            b"--"
            + h.BOUNDARY.encode()
            + b"\r\nContent-Type: image/jpeg\r\n\r\nxx\r\n--"
            + h.BOUNDARY.encode()
            + b"--\r\n"
        ),
        400,
        "malformed_body",
    ),
    "malformed-part-header-200kB": (
        _raw(
            h.multipart(
                [
                    _P(
                        "file",
                        _MALFORMED_FILE,
                        filename="a.jpg",
                        extra_headers=b"X-Pad: " + b"p" * 200_000 + b"\r\n",
                    )
                ]
            )
        ),
        400,
        "malformed_body",
    ),
    # The body ends before the file part is closed: the part never completes, so "file" is missing.
    "malformed-truncated-before-closing-boundary": (
        _raw(h.multipart([_P("file", _MALFORMED_FILE, filename="a.jpg")], close=False)[:-10]),
        422,
        "invalid_request",
    ),
    # --- many parts
    "two-files": (
        _raw(h.multipart([_P("file", _MALFORMED_FILE, filename=f"{i}.jpg") for i in range(2)])),
        422,
        "too_many_files",
    ),
    "1000-text-fields": (_raw(h.multipart([_P(f"f{i}", b"x") for i in range(1000)])), 400, "malformed_body"),
    "text-field-over-64kB": (
        _raw(h.multipart([_P("file", _MALFORMED_FILE, filename="a.jpg"), _P("source", b"s" * 70_000)])),
        400,
        "malformed_body",
    ),
    # --- damaged or degenerate images
    "truncated-jpeg": (_upload_of(lambda p: _jpeg(p)[: len(_jpeg(p)) // 2]), 422, "corrupt_image"),
    "truncated-png": (_upload_of(lambda p: _png(p)[: len(_png(p)) // 2], "image/png"), 422, "corrupt_image"),
    "empty-file": (_upload(b""), 422, "corrupt_image"),
    "one-byte-file": (_upload(b"\xff"), 415, "unsupported_format"),
    "zero-size-png": (_upload(h.png_header_only(0, 0)), 422, "corrupt_image"),
    "zero-width-png": (_upload(h.png_header_only(0, 64)), 422, "corrupt_image"),
    "1x1-jpeg": (_upload_of(lambda p: h.encode(Image.new("RGB", (1, 1), "red"))), 422, "image_too_small"),
    # --- too large
    "bomb-2x-pillow-limit": (
        _upload(h.png_header_only(_pillow_limit_side(2.0), _pillow_limit_side(2.0))),
        422,
        "image_too_large",
    ),
    "bomb-just-over-1x-pillow-limit": (
        _upload(h.png_header_only(_pillow_limit_side(1.0), _pillow_limit_side(1.0))),
        422,
        "image_too_large",
    ),
    "legal-png-over-app-pixel-limit": (_upload_of(_legal_but_enormous, "image/png"), 422, "image_too_large"),
    "animated-gif-1001-frames": (
        _upload_of(lambda p: h.many_frame_gif(1001), "image/gif"),
        422,
        "image_too_large",
    ),
    "png-ztxt-text-bomb": (_upload_of(_text_bomb, "image/png"), 422, "corrupt_image"),
}


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("row", list(REJECTED))
def test_rejected(app: App, photos: Photos, row: str) -> None:
    build, status, code = REJECTED[row]
    body, headers = build(photos)
    before = _errors_counted(app, code)
    with nothing_stored(app):
        _error(app.post(body, headers), status, code)
    assert _errors_counted(app, code) == before + 1, "every refusal is counted in deepfeat_errors_total"


def _errors_counted(app: App, code: str) -> float:
    prefix = f'deepfeat_errors_total{{code="{code}"}} '
    lines = [line for line in app.client.get("/metrics").text.splitlines() if line.startswith(prefix)]
    return float(lines[0].split()[-1]) if lines else 0.0


def test_server_answers_after_the_rejections(app: App, photos: Photos) -> None:
    assert app.client.get("/health").status_code == 200
    resp = app.post(h.file_body(h.encode(photos["rocket"], quality=60)), h.multipart_headers(), "/v1/search")
    assert resp.status_code == 200


# ============================================================================ body size: limit exactly and limit - 1


@pytest.mark.parametrize("size", [LIMIT, LIMIT - 1], ids=["limit-exactly", "limit-minus-1"])
def test_body_at_the_limit_is_accepted(app: App, photos: Photos, size: int) -> None:
    body = h.body_of_exact_size(h.encode(app.fresh(photos["hopper"])), size, source=f"size-{size}")
    assert len(body) == size
    with one_stored(app):
        resp = app.post(body, h.multipart_headers(body, **AUTH))
    assert resp.status_code == 201, resp.text[:300]
    assert _record(app, resp.json()["id"])["nbytes"] == size - (len(h.file_body(b"", source=f"size-{size}")))


# ============================================================================ EXIF orientations


@pytest.fixture(scope="module")
def upright(photos: Photos) -> Image.Image:
    return h.crop16(photos["chelsea"])  # 448 x 288: not square, so 90-degree turns show


@pytest.fixture(scope="module")
def upright_vector(app: App, upright: Image.Image) -> np.ndarray:
    return _embed(app, h.encode(upright, quality=95), "upright.jpg")


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_gives_the_upright_vector(
    app: App, upright: Image.Image, upright_vector: np.ndarray, orientation: int
) -> None:
    data = h.exif_oriented_jpeg(upright, orientation)
    with Image.open(io.BytesIO(data)) as stored:
        turned = orientation in (5, 6, 7, 8)
        assert stored.size == ((upright.height, upright.width) if turned else upright.size)
        assert stored.getexif()[h.EXIF_ORIENTATION_TAG] == orientation
    assert h.cosine(_embed(app, data, "o.jpg"), upright_vector) >= 0.99
    added = _add(app, data)
    record = _record(app, added["id"])
    assert (record["width"], record["height"]) == upright.size  # the size people see
    with Image.open(io.BytesIO(_thumbnail(app, added["id"]))) as thumb:
        assert thumb.width > thumb.height  # landscape, like the upright photo
        assert h.EXIF_ORIENTATION_TAG not in thumb.getexif()


# ============================================================================ colour modes


def _composite_on_white(rgba: Image.Image) -> Image.Image:
    base = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(base, rgba.convert("RGBA")).convert("RGB")


def _alpha_mask(size: tuple[int, int]) -> Image.Image:
    w, hgt = size
    ramp = np.tile(np.linspace(0, 255, w, dtype=np.float64), (hgt, 1))  # transparent left, opaque right
    ramp[: hgt // 3] = 0  # and a fully transparent band on top
    return Image.fromarray(ramp.astype(np.uint8), "L")


def _rgba(photo: Image.Image, hidden: tuple[int, int, int]) -> Image.Image:
    """The photo with an alpha mask; fully transparent pixels carry ``hidden`` colour underneath."""
    mask = _alpha_mask(photo.size)
    rgb = np.asarray(photo).copy()
    rgb[np.asarray(mask) == 0] = hidden
    return Image.merge("RGBA", (*Image.fromarray(rgb).split(), mask))


def _mode_case(name: str, photo: Image.Image) -> tuple[bytes, Image.Image, float]:
    """(upload bytes, the RGB image it should embed like, minimum cosine)."""
    gray = photo.convert("L")
    if name == "CMYK":
        # Pillow's RGB->CMYK->RGB round trip is exact, so the reference is the photo itself.
        return h.encode(photo.convert("CMYK"), "JPEG", quality=95), photo, 0.99
    if name == "L":
        return h.encode(gray, "PNG"), gray.convert("RGB"), 0.999
    if name == "1":
        bilevel = photo.convert("1")
        return h.encode(bilevel, "PNG"), bilevel.convert("RGB"), 0.999
    if name == "P+transparency":
        pal = photo.quantize(64)
        pal.info["transparency"] = 0  # palette entry 0 is transparent
        data = h.encode(pal, "PNG", transparency=0)
        return data, _composite_on_white(pal.convert("RGBA")), 0.999
    if name == "LA":
        la = Image.merge("LA", (gray, _alpha_mask(gray.size)))
        return h.encode(la, "PNG"), _composite_on_white(la.convert("RGBA")), 0.999
    if name == "RGBA":
        rgba = _rgba(photo, (0, 0, 0))
        return h.encode(rgba, "PNG"), _composite_on_white(rgba), 0.999
    if name == "I;16":
        wide = Image.fromarray(np.asarray(gray).astype(np.uint16) * 257)  # 0..65535, scaled not clipped
        assert wide.mode == "I;16"
        return h.encode(wide, "PNG"), gray.convert("RGB"), 0.999
    raise AssertionError(name)


@pytest.mark.parametrize("mode", ["CMYK", "L", "1", "P+transparency", "LA", "RGBA", "I;16"])
def test_colour_modes(app: App, photos: Photos, mode: str) -> None:
    photo = app.fresh(photos["astronaut"])
    data, reference, min_cos = _mode_case(mode, photo)
    with Image.open(io.BytesIO(data)) as check:
        assert check.mode == mode.split("+")[0]
    assert h.cosine(_embed(app, data), _embed(app, h.encode(reference, "PNG"))) >= min_cos
    added = _add(app, data)
    assert _record(app, added["id"])["width"] == photo.width


def test_alpha_is_composited_on_a_fixed_background(app: App, photos: Photos) -> None:
    """What hides under fully transparent pixels never changes the vector."""
    photo = photos["coffee"]
    black, magenta = (_embed(app, h.encode(_rgba(photo, c), "PNG")) for c in ((0, 0, 0), (255, 0, 255)))
    assert h.cosine(black, magenta) >= 0.9999
    dropped = _embed(app, h.encode(_rgba(photo, (0, 0, 0)).convert("RGB"), "PNG"))  # alpha discarded
    assert h.cosine(black, dropped) < h.cosine(black, magenta)


def test_16_bit_is_scaled_not_clipped(app: App, photos: Photos) -> None:
    gray = photos["coffee"].convert("L")
    wide = h.encode(Image.fromarray(np.asarray(gray).astype(np.uint16) * 257), "PNG")
    clipped = h.encode(Image.new("RGB", gray.size, "white"), "PNG")  # what a naive convert("L") gives
    vector = _embed(app, wide)
    assert h.cosine(vector, _embed(app, h.encode(gray, "PNG"))) >= 0.999
    assert h.cosine(vector, _embed(app, clipped)) < 0.9


# ============================================================================ animations


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animation_uses_the_first_frame(app: App, photos: Photos, fmt: str) -> None:
    size = (320, 240)
    frames = [photos[n].resize(size) for n in ("chelsea", "rocket", "coffee")]
    data = h.animated(frames, fmt)
    with Image.open(io.BytesIO(data)) as anim:
        assert anim.format == fmt and anim.n_frames == 3
    # Reference: the first frame alone, in the same format (same palette quantisation for GIF).
    first = _embed(app, h.encode(frames[0], fmt, **({"lossless": True} if fmt == "WEBP" else {})))
    vector = _embed(app, data)
    assert h.cosine(vector, first) >= 0.99
    assert h.cosine(vector, _embed(app, h.encode(frames[1], "PNG"))) < 0.9
    _add(app, data)


# ============================================================================ metadata chunks and appended data


def _no_metadata_in(thumb: bytes) -> None:
    assert thumb.startswith(b"\xff\xd8") and thumb.endswith(b"\xff\xd9")
    assert b"Exif" not in thumb and b"ICC_PROFILE" not in thumb
    with Image.open(io.BytesIO(thumb)) as img:
        img.load()
        assert max(img.size) <= 256 and "icc_profile" not in img.info and "exif" not in img.info


@pytest.mark.parametrize("kind", ["exif-60kB", "icc-1MB-jpeg", "icc-1MB-png", "png-text-3MB"])
def test_huge_metadata_chunks_are_dropped(app: App, photos: Photos, kind: str) -> None:
    from PIL import PngImagePlugin

    photo = app.fresh(photos["motorcycle"])
    marker = uuid.uuid4().hex.encode()
    if kind == "exif-60kB":
        exif = Image.Exif()
        exif[0x010E] = (marker * 2000)[:60_000].decode()  # ImageDescription
        data = h.encode(photo, "JPEG", exif=exif.tobytes())
    elif kind.startswith("icc"):
        icc = (marker * 40_000)[: 1024 * 1024]
        data = h.encode(photo, "JPEG" if kind.endswith("jpeg") else "PNG", icc_profile=icc)
    else:
        info = PngImagePlugin.PngInfo()
        info.add_text("comment", (marker * 100_000)[: 3 * 1024 * 1024].decode())
        data = h.encode(photo, "PNG", pnginfo=info)
    if kind != "icc-1MB-png":  # PNG deflates its iCCP chunk
        assert marker in data
    added = _add(app, data)
    thumb = _thumbnail(app, added["id"])
    _no_metadata_in(thumb)
    assert marker not in thumb
    assert _record(app, added["id"])["nbytes"] == len(data)


def test_jpeg_with_a_zip_appended_stores_only_decoded_pixels(app: App, photos: Photos) -> None:
    marker = b"ZIP-PAYLOAD-" + uuid.uuid4().hex.encode()
    jpeg = h.encode(app.fresh(photos["rocket"]))
    polyglot = jpeg + h.zip_payload(marker)
    assert marker in polyglot
    plain = _embed(app, jpeg)
    assert h.cosine(_embed(app, polyglot), plain) >= 0.9999  # the trailing archive changes no pixel
    added = _add(app, polyglot, source="polyglot.jpg")
    thumb = _thumbnail(app, added["id"])
    _no_metadata_in(thumb)
    assert b"PK\x03\x04" not in thumb and marker not in thumb
    # Nothing of the archive reached any file of the store (catalog, its WAL, the snapshot).
    for path in app.data_dir.iterdir():
        if path.is_file():
            assert marker not in path.read_bytes(), path.name


# ============================================================================ hostile filenames and sources

_TAG = uuid.uuid4().hex[:8]
HOSTILE_FILENAMES: dict[str, bytes] = {
    "relative-traversal": f"../../../../../../tmp/deepfeat-pwned-{_TAG}.jpg".encode(),
    "absolute-path": f"/tmp/deepfeat-pwned-abs-{_TAG}.jpg".encode(),
    "windows-traversal": b"..\\..\\..\\Windows\\win.ini",
    "percent-encoded-traversal": b"%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "nul-byte": b"ok.jpg\x00../../etc/passwd",
    "device-name": b"CON",
    "unicode-and-rtl-override": "photo\u202egpj.exe 😀".encode(),
    "quote-injection": b'x.jpg\\"; name=\\"source',
    "empty": b"",
    "4000-chars": b"a" * 4000,
}


@pytest.mark.parametrize("row", list(HOSTILE_FILENAMES))
def test_hostile_filenames_are_ignored(app: App, photos: Photos, row: str) -> None:
    filename = HOSTILE_FILENAMES[row]
    before = app.files()
    with one_stored(app):
        resp = app.post(
            h.file_body(h.encode(app.fresh(photos["coffee"])), filename=filename),
            h.multipart_headers(**AUTH),
        )
    assert resp.status_code == 201, resp.text[:300]
    assert _record(app, resp.json()["id"])["source"] is None  # the filename is not even kept as text
    assert not Path(f"/tmp/deepfeat-pwned-{_TAG}.jpg").exists()
    assert not Path(f"/tmp/deepfeat-pwned-abs-{_TAG}.jpg").exists()
    assert not {f for f in app.files() - before if not f.startswith("data/catalog.sqlite3-")}


HOSTILE_SOURCES: dict[str, str] = {
    "relative-traversal": "../../../../etc/passwd",
    "absolute-path": "/etc/shadow",
    "file-url": "file:///etc/passwd",
    "windows-path": "C:\\Windows\\System32\\config\\SAM",
    "unc-path": "\\\\evil-host\\share\\x.jpg",
    "home": "~/.ssh/id_rsa",
    "nul-byte": "ok.jpg\x00/../../etc/passwd",
    "html": "<script>alert(1)</script>",
    "sql": "x'); DROP TABLE images; --",
    "rtl-override-emoji": "\u202egpj.exe 😀 ünïcödé",
    "newlines": "line1\r\nX-Injected: yes\r\n",
    "4096-chars": "s" * 4096,
}


@pytest.mark.parametrize("row", list(HOSTILE_SOURCES))
def test_hostile_sources_are_stored_as_text(app: App, photos: Photos, row: str) -> None:
    source = HOSTILE_SOURCES[row]
    before = app.files()
    data = h.encode(app.fresh(photos["hopper"]))
    added = _add(app, data, source=source)
    assert _record(app, added["id"])["source"] == source
    hits = app.post(h.file_body(data), h.multipart_headers(), "/v1/search?k=1").json()["results"]
    assert hits[0]["id"] == added["id"] and hits[0]["source"] == source
    assert not {f for f in app.files() - before if not f.startswith("data/catalog.sqlite3-")}


# ============================================================================ hostile ids on every id route

HOSTILE_IDS: dict[str, tuple[str, set[int], set[str]]] = {
    # raw path segment -> (allowed statuses, allowed codes)
    "dotdot-encoded-slashes": ("..%2F..%2F..%2Fetc%2Fpasswd", {404}, {"not_found"}),
    "percent-2e-2e-2f": ("%2e%2e%2f", {404}, {"not_found"}),
    # (TestClient decodes the path twice, so this reaches the router as "../etc/passwd": no route.)
    "double-encoded": ("%252e%252e%252fetc%252fpasswd", {404}, {"not_found", "invalid_id"}),
    "dotdot": ("..", {404}, {"not_found", "invalid_id"}),
    "nul": ("%00", {404}, {"invalid_id"}),
    "newline-after-valid-hex": ("0" * 32 + "%0A", {404}, {"invalid_id"}),
    "uppercase-hex": ("A" * 32, {404}, {"invalid_id"}),
    "31-hex": ("0" * 31, {404}, {"invalid_id"}),
    "33-hex": ("0" * 33, {404}, {"invalid_id"}),
    "unicode-digits": ("%D9%A0" * 32, {404}, {"invalid_id"}),  # ARABIC-INDIC DIGIT ZERO x32
    "sql": ("'%20OR%201=1%20--", {404}, {"invalid_id"}),
    "256-chars": ("a" * 256, {404}, {"invalid_id"}),
    "257-chars": ("a" * 257, {404}, {"invalid_id"}),
    "10000-chars": ("f" * 10_000, {404}, {"invalid_id"}),
    "well-formed-unknown": ("0123456789abcdef" * 2, {404}, {"not_found"}),
}


@pytest.fixture(scope="module")
def existing_id(app: App, photos: Photos) -> str:
    return _add(app, h.encode(app.fresh(photos["rocket"])), source="must-survive")["id"]


@pytest.mark.parametrize("route", ["GET {}", "GET {}/thumbnail", "DELETE {}"])
@pytest.mark.parametrize("row", list(HOSTILE_IDS))
def test_hostile_ids(app: App, existing_id: str, row: str, route: str) -> None:
    raw, statuses, codes = HOSTILE_IDS[row]
    method, template = route.split(" ")
    with nothing_stored(app):
        resp = app.client.request(method, "/v1/images/" + template.format(raw), headers=AUTH)
    assert resp.status_code in statuses, (resp.status_code, resp.text[:200])
    assert resp.json()["code"] in codes, resp.json()
    assert _record(app, existing_id)["source"] == "must-survive"


# ============================================================================ API keys


def _key_cases() -> dict[str, dict[str, Any]]:
    return {
        "missing": {},
        "empty": {"headers": {"X-API-Key": ""}},
        "wrong": {"headers": {"X-API-Key": "not-the-key"}},
        "one-char-off": {"headers": {"X-API-Key": KEY[:-1] + "8"}},
        "prefix": {"headers": {"X-API-Key": KEY[:-1]}},
        "extended": {"headers": {"X-API-Key": KEY + "0"}},
        "case-swapped": {"headers": {"X-API-Key": KEY.swapcase()}},
        "homoglyph-utf8": {"headers": {"X-API-Key": KEY.replace("e", "\u0435").encode("utf-8")}},
        "very-long": {"headers": {"X-API-Key": KEY * 400}},
        "in-authorization-bearer": {"headers": {"Authorization": f"Bearer {KEY}"}},
        "in-query-string": {"params": {"api_key": KEY, "X-API-Key": KEY}},
        "in-cookie": {"headers": {"Cookie": f"X-API-Key={KEY}"}},
        "underscored-header-name": {"headers": {"X_API_KEY": KEY}},
    }


@pytest.mark.parametrize("case", list(_key_cases()))
@pytest.mark.parametrize("route", ["POST /v1/images", "DELETE /v1/images/{id}"])
def test_wrong_api_keys_are_401(app: App, photos: Photos, existing_id: str, case: str, route: str) -> None:
    spec = _key_cases()[case]
    headers = dict(spec.get("headers", {}))
    with nothing_stored(app):
        if route.startswith("POST"):
            body = h.file_body(h.encode(app.fresh(photos["chelsea"])))
            resp = app.client.post(
                "/v1/images",
                content=body,
                headers={**h.multipart_headers(), **headers},
                params=spec.get("params"),
            )
        else:
            resp = app.client.delete(f"/v1/images/{existing_id}", headers=headers, params=spec.get("params"))
    body = _error(resp, 401, "unauthorized")
    assert KEY not in body["detail"] and resp.headers.get("www-authenticate") == "X-API-Key"
    assert _record(app, existing_id)["source"] == "must-survive"


def test_right_api_key_header_name_is_case_insensitive(app: App, photos: Photos) -> None:
    with one_stored(app):
        resp = app.client.post(
            "/v1/images",
            content=h.file_body(h.encode(app.fresh(photos["chelsea"]))),
            headers={**h.multipart_headers(), "x-api-key": KEY},
        )
    assert resp.status_code == 201


# ============================================================================ the batch routes: whole-request errors

BATCH_ROUTES = ("/v1/search/batch", "/v1/embed/batch", "/v1/classify/batch", "/v1/images/batch")


def _files(*datas: bytes) -> bytes:
    return h.multipart(
        [_P("files", d, filename=f"{i}.jpg", content_type="image/jpeg") for i, d in enumerate(datas)]
    )


def _batch_over_limit(photos: Photos) -> tuple[bytes, dict[str, str]]:
    jpeg = h.encode(photos["coffee"])
    copies = LIMIT // len(jpeg) + 2  # together over the body limit, each one well under it
    return _files(*[jpeg] * copies), h.multipart_headers(**AUTH)


BATCH_REJECTED: dict[str, tuple[Build, int, str]] = {
    "over-limit-in-total": (_batch_over_limit, 413, "payload_too_large"),
    "huge-declared-content-length-tiny-body": (_huge_declared_length, 413, "payload_too_large"),
    "non-numeric-content-length": (_bad_length("12abc"), 400, "malformed_body"),
    "no-files-field": (_raw(h.multipart([_P("source", b"x")])), 422, "invalid_request"),
    "file-instead-of-files": (_raw(h.file_body(_MALFORMED_FILE)), 422, "invalid_request"),
    "files-sent-as-text-fields": (
        _raw(h.multipart([_P("files", b"x"), _P("files", b"y")])),
        422,
        "invalid_request",
    ),
    "not-multipart-at-all": (_raw(b'{"files": ["x"]}', "application/json"), 422, "invalid_request"),
    "malformed-garbage-body": (_raw(b"--nope\r\ngarbage\r\n\r\n"), 400, "malformed_body"),
    "malformed-no-boundary-parameter": (
        _raw(_files(_MALFORMED_FILE), "multipart/form-data"),
        400,
        "malformed_body",
    ),
    "33-files": (_raw(_files(*[_MALFORMED_FILE] * 33)), 422, "too_many_files"),
    "257-files-past-the-parser-cap": (_raw(_files(*[b"x"] * 257)), 422, "too_many_files"),
    "1000-text-fields": (_raw(h.multipart([_P(f"f{i}", b"x") for i in range(1000)])), 400, "malformed_body"),
}


@pytest.mark.parametrize("route", BATCH_ROUTES)
@pytest.mark.parametrize("row", list(BATCH_REJECTED))
def test_batch_rejected(app: App, photos: Photos, route: str, row: str) -> None:
    """A request that is wrong as a whole is refused as a whole, on every batch route: the status and
    code of the single routes, nothing stored (per-file problems are items of a 200: test_batch)."""
    build, status, code = BATCH_REJECTED[row]
    body, headers = build(photos)
    with nothing_stored(app):
        _error(app.post(body, headers, route), status, code)
