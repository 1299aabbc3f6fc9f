"""Every route and every error code, through TestClient(create_app(settings)) with real photos."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.app.conftest import MakeClient, upload
from tests.app.conftest import expect_error as _error
from tests.conftest import jpeg_bytes


def _add(client: TestClient, image: Image.Image | bytes, source: str, **extra: str) -> dict:
    resp = client.post("/v1/images", files=upload(image), data={"source": source, **extra})
    assert resp.status_code in (200, 201), resp.text
    return resp.json()


@pytest.fixture(scope="module")
def indexed(client: TestClient, photos: dict[str, Image.Image]) -> dict[str, str]:
    """name -> id of each real photo, added through the API."""
    return {
        name: _add(client, img, f"{name}.jpg", metadata=json.dumps({"name": name}))["id"]
        for name, img in photos.items()
    }


# --- health ---------------------------------------------------------------------------------------


def test_health_ready_stats(client: TestClient, indexed: dict[str, str]) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json()["status"] == "ready"
    stats = client.get("/v1/stats").json()
    assert stats["count"] == len(indexed) and stats["dim"] == 1280 and stats["index_factory"] == "Flat"
    assert stats["model"]["name"] == "efficientnet_lite0" and stats["model"]["pretrained"] is True


def test_an_empty_store_reports_the_vectors_each_image_will_get(
    make_client: MakeClient, photos: dict[str, Image.Image]
) -> None:
    client = make_client(layer="head", resize_mode="crop", scales=[1.0], regions=2, lowpass=0.01)
    before = client.get("/v1/stats").json()
    assert (before["count"], before["vectors"], before["vectors_per_image"]) == (0, 0, 1 + 1 + 2**2)
    _add(client, photos["coffee"], "coffee.jpg")
    after = client.get("/v1/stats").json()
    assert (after["count"], after["vectors"], after["vectors_per_image"]) == (1, 6, 6)


def test_an_unexpected_error_is_a_500_and_its_traceback_is_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from deepfeat.app.main import create_app
    from deepfeat.index.store import ImageStore
    from deepfeat.settings import Settings
    from tests.app.conftest import FAST

    def broken(self: ImageStore) -> dict[str, object]:
        raise RuntimeError("a bug, not bad input")

    app = create_app(Settings(data_dir=tmp_path / "data", **FAST))
    with TestClient(app, raise_server_exceptions=False) as client:
        monkeypatch.setattr(ImageStore, "stats", broken)
        with caplog.at_level("ERROR", logger="deepfeat"):
            body = _error(client.get("/v1/stats"), 500, "internal_error")
    assert body["detail"] == "internal error; see the server log"  # nothing internal in the answer
    logged = [r for r in caplog.records if r.getMessage() == "unhandled error on GET /v1/stats"]
    assert logged and logged[0].exc_info is not None and "a bug, not bad input" in str(logged[0].exc_info[1])


def test_metrics_after_traffic(
    client: TestClient, indexed: dict[str, str], photos: dict[str, Image.Image]
) -> None:
    client.post("/v1/search", files=upload(photos["coffee"]))
    client.get("/v1/images/" + "0" * 32)
    text = client.get("/metrics").text
    assert 'deepfeat_requests_total{method="POST",route="/v1/search",status="200"}' in text
    assert 'route="/v1/images/{image_id}"' in text  # templates, not raw ids
    assert 'deepfeat_errors_total{code="not_found"}' in text
    assert "deepfeat_embed_batch_size_bucket" in text
    assert f"deepfeat_index_size {float(len(indexed))}" in text


def test_openapi_lists_every_route(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path in (
        "/v1/search",
        "/v1/classify",
        "/v1/embed",
        "/v1/images",
        "/v1/images/{image_id}",
        "/v1/images/{image_id}/thumbnail",
        "/health",
        "/ready",
        "/v1/stats",
        "/metrics",
    ):
        assert path in paths, path


def test_web_page_is_served(client: TestClient) -> None:
    resp = client.get("/")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")


# --- search / classify / embed --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["chelsea", "coffee", "rocket", "hopper"])
def test_search_finds_a_reencoded_copy_first(
    client: TestClient, indexed: dict[str, str], photos: dict[str, Image.Image], name: str
) -> None:
    query = jpeg_bytes(photos[name], quality=60, scale=0.5)
    body = client.post("/v1/search?k=3", files=upload(query)).json()
    results = body["results"]
    assert len(results) == 3
    assert results[0]["id"] == indexed[name] and results[0]["source"] == f"{name}.jpg"
    # Half size at JPEG quality 60: still clearly the same photo, and clearly above the runner-up.
    assert results[0]["score"] > 0.7 and results[0]["score"] > results[1]["score"] + 0.1
    assert results[0]["metadata"] == {"name": name}
    assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)
    assert results[0]["thumbnail_url"] == f"/v1/images/{indexed[name]}/thumbnail"
    assert body["model"]["layer"] == "penultimate" and body["took_ms"] > 0


def test_search_k_is_bounded(
    client: TestClient, indexed: dict[str, str], photos: dict[str, Image.Image]
) -> None:
    assert len(client.post("/v1/search?k=100", files=upload(photos["rocket"])).json()["results"]) == len(
        indexed
    )
    _error(client.post("/v1/search?k=0", files=upload(photos["rocket"])), 422, "invalid_request")
    _error(client.post("/v1/search?k=abc", files=upload(photos["rocket"])), 422, "invalid_request")


def test_classify_real_photos(client: TestClient, photos: dict[str, Image.Image]) -> None:
    body = client.post("/v1/classify?k=5", files=upload(photos["chelsea"])).json()
    assert len(body["predictions"]) == 5 and body["predictions"][0]["class_index"] in (281, 282, 285)
    coffee = client.post("/v1/classify", files=upload(photos["coffee"])).json()["predictions"][0]
    assert coffee["class_index"] in (967, 968) and 0 < coffee["probability"] <= 1


def test_embed_returns_the_features(client: TestClient, photos: dict[str, Image.Image]) -> None:
    body = client.post("/v1/embed", files=upload(photos["coffee"])).json()
    vector = np.array(body["vector"], dtype=np.float32)
    assert (
        body["dim"] == 1280 == vector.shape[0]
        and body["layer"] == "penultimate"
        and body["pooling"] == "none"
    )
    assert abs(np.linalg.norm(vector) - 1) < 1e-4
    other = client.post("/v1/embed?layer=blocks.4&pooling=gem", files=upload(photos["coffee"])).json()
    assert (
        other["dim"] == 112 == len(other["vector"])
        and other["layer"] == "blocks.4"
        and other["pooling"] == "gem(p=3)"
    )
    assert other["model"]["layer"] == "penultimate"  # the store's own layer is unchanged
    _error(client.post("/v1/embed?layer=fc99", files=upload(photos["coffee"])), 422, "unknown_layer")
    _error(
        client.post("/v1/embed?layer=head&pooling=median", files=upload(photos["coffee"])),
        422,
        "unknown_pooling",
    )


# --- images ---------------------------------------------------------------------------------------


def test_add_duplicate_get_thumbnail_delete(client: TestClient, photos: dict[str, Image.Image]) -> None:
    img = photos["astronaut"].rotate(90)
    data = jpeg_bytes(img)
    first = client.post(
        "/v1/images", files=upload(data), data={"source": "../../etc/passwd", "metadata": '{"a": [1, 2]}'}
    )
    assert first.status_code == 201 and first.json()["created"] is True
    image_id = first.json()["id"]
    again = client.post("/v1/images", files=upload(data, name="other-name.jpg"))
    assert again.status_code == 200 and again.json() == {"id": image_id, "created": False}

    info = client.get(f"/v1/images/{image_id}").json()
    assert info["source"] == "../../etc/passwd"  # stored as data, never used as a path
    assert info["metadata"] == {"a": [1, 2]} and (info["width"], info["height"]) == (img.width, img.height)
    thumb = client.get(f"/v1/images/{image_id}/thumbnail")
    assert thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) <= 256

    hits = client.post("/v1/search?k=1", files=upload(data)).json()["results"]
    assert hits[0]["id"] == image_id
    assert client.delete(f"/v1/images/{image_id}").json() == {"id": image_id, "deleted": True}
    hits = client.post("/v1/search?k=50", files=upload(data)).json()["results"]
    assert image_id not in [h["id"] for h in hits]
    _error(client.get(f"/v1/images/{image_id}"), 404, "not_found")
    _error(client.get(f"/v1/images/{image_id}/thumbnail"), 404, "not_found")
    _error(client.delete(f"/v1/images/{image_id}"), 404, "not_found")


@pytest.mark.parametrize(
    "bad_id", ["..%2F..%2Fetc%2Fpasswd", "%2e%2e%2f", "x" * 200, "a" * 300, "ABCDEF" * 6, "' OR 1=1 --"]
)
def test_hostile_ids_are_404(client: TestClient, bad_id: str) -> None:
    for method, path in (
        ("GET", f"/v1/images/{bad_id}"),
        ("GET", f"/v1/images/{bad_id}/thumbnail"),
        ("GET", f"/v1/images/{bad_id}/similar"),
        ("DELETE", f"/v1/images/{bad_id}"),
    ):
        resp = client.request(method, path)
        assert resp.status_code == 404, (method, path, resp.status_code)
        assert resp.json()["code"] in ("invalid_id", "not_found"), (method, path, resp.json())


@pytest.mark.parametrize(
    ("metadata", "fragment"),
    [
        ("not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"x": "' + "a" * 20000 + '"}', "larger than"),
        ('{"x": NaN}', "NaN is not a JSON number"),
        ('{"x": -Infinity}', "-Infinity is not a JSON number"),
        ('{"x": 1e400}', "1e400 is beyond the range of a float"),
    ],
)
def test_bad_metadata(
    client: TestClient, photos: dict[str, Image.Image], metadata: str, fragment: str
) -> None:
    body = _error(
        client.post("/v1/images", files=upload(photos["rocket"]), data={"metadata": metadata}),
        422,
        "invalid_metadata",
    )
    assert fragment in body["detail"]


# --- upload errors --------------------------------------------------------------------------------


def test_a_request_without_its_file_part_says_how_to_send_one(client: TestClient) -> None:
    body = _error(client.post("/v1/search", json={"file": "cat.jpg"}), 422, "invalid_request")
    assert body["detail"].startswith("file: Field required") and "-F file=@photo.jpg" in body["detail"]
    body = _error(client.post("/v1/search/batch", data={"source": "x"}), 422, "invalid_request")
    assert "-F files=@photo.jpg" in body["detail"]


def test_not_an_image_is_415_whatever_it_claims(client: TestClient) -> None:
    for payload in (
        b"hello world, not an image",
        b"PK\x03\x04" + b"\x00" * 100,
        b"%PDF-1.7\n" + b"0" * 100,
        b'<svg xmlns="http://www.w3.org/2000/svg"></svg>',
    ):
        for route in ("/v1/search", "/v1/classify", "/v1/embed", "/v1/images"):
            _error(
                client.post(route, files=upload(payload, "cat.jpg", "image/jpeg")), 415, "unsupported_format"
            )


def test_corrupt_small_and_huge_images_are_422(
    client: TestClient, photos: dict[str, Image.Image], make_client: MakeClient
) -> None:
    full = jpeg_bytes(photos["chelsea"])
    _error(client.post("/v1/search", files=upload(full[: len(full) // 2])), 422, "corrupt_image")
    _error(client.post("/v1/search", files=upload(b"")), 422, "corrupt_image")
    _error(
        client.post("/v1/search", files=upload(jpeg_bytes(Image.new("RGB", (1, 1))))), 422, "image_too_small"
    )
    small = make_client(max_pixels=100_000)
    _error(small.post("/v1/search", files=upload(full)), 422, "image_too_large")  # 451x300 > 100k pixels


def test_missing_or_misnamed_field_is_422(client: TestClient, photos: dict[str, Image.Image]) -> None:
    _error(client.post("/v1/search"), 422, "invalid_request")
    body = _error(
        client.post("/v1/search", files={"image": ("a.jpg", jpeg_bytes(photos["rocket"]), "image/jpeg")}),
        422,
        "invalid_request",
    )
    assert "file" in body["detail"]


def test_body_limit_with_and_without_content_length(
    make_client: MakeClient, photos: dict[str, Image.Image]
) -> None:
    client = make_client(max_upload_bytes=50_000)
    big = jpeg_bytes(photos["astronaut"], quality=95)
    assert len(big) > 50_000
    body = _error(client.post("/v1/search", files=upload(big)), 413, "payload_too_large")
    assert "50000" in body["detail"]

    # Streamed without Content-Length (chunked): counted while it arrives.
    def chunks():
        boundary = b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'
        yield boundary
        for i in range(0, len(big), 8192):
            yield big[i : i + 8192]
        yield b"\r\n--xyz--\r\n"

    resp = client.post(
        "/v1/search", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=xyz"}
    )
    _error(resp, 413, "payload_too_large")
    # The server still answers normally afterwards.
    ok = client.post("/v1/search", files=upload(jpeg_bytes(photos["rocket"], quality=50, scale=0.3)))
    assert ok.status_code == 200


def test_malformed_multipart_is_400(client: TestClient) -> None:
    resp = client.post(
        "/v1/search",
        content=b"--nope\r\ngarbage",
        headers={"Content-Type": "multipart/form-data; boundary=xyz"},
    )
    _error(resp, 400, "malformed_body")


# --- auth -----------------------------------------------------------------------------------------


def test_write_routes_need_the_key(make_client: MakeClient, photos: dict[str, Image.Image]) -> None:
    client = make_client(api_key="s3cret-key")
    data = upload(photos["coffee"])
    body = _error(client.post("/v1/images", files=data), 401, "unauthorized")
    assert "X-API-Key" in body["detail"]
    _error(client.post("/v1/images", files=data, headers={"X-API-Key": "s3cret-kez"}), 401, "unauthorized")
    _error(client.post("/v1/images", files=data, headers={"X-API-Key": "s3cret-key "}), 401, "unauthorized")
    added = client.post("/v1/images", files=data, headers={"X-API-Key": "s3cret-key"})
    assert added.status_code == 201
    image_id = added.json()["id"]
    # reads stay open
    assert client.get(f"/v1/images/{image_id}").status_code == 200
    assert client.post("/v1/search", files=data).status_code == 200
    _error(client.delete(f"/v1/images/{image_id}"), 401, "unauthorized")
    assert client.delete(f"/v1/images/{image_id}", headers={"X-API-Key": "s3cret-key"}).status_code == 200


def test_read_key_guards_reads(make_client: MakeClient, photos: dict[str, Image.Image]) -> None:
    client = make_client(api_key="writer", read_api_key="reader")
    _error(client.post("/v1/search", files=upload(photos["coffee"])), 401, "unauthorized")
    assert (
        client.post("/v1/search", files=upload(photos["coffee"]), headers={"X-API-Key": "reader"}).status_code
        == 200
    )
    assert (
        client.post("/v1/search", files=upload(photos["coffee"]), headers={"X-API-Key": "writer"}).status_code
        == 200
    )
    _error(
        client.post("/v1/images", files=upload(photos["coffee"]), headers={"X-API-Key": "reader"}),
        401,
        "unauthorized",
    )
    assert client.get("/health").status_code == 200  # probes stay open


# --- not ready ------------------------------------------------------------------------------------


def test_incompatible_store_is_503_not_a_crash(
    make_client: MakeClient, photos: dict[str, Image.Image]
) -> None:
    first = make_client(layer="head", pooling="gem")
    assert first.post("/v1/images", files=upload(photos["coffee"])).status_code == 201
    # Same data dir, another layer set explicitly: refused, the app says why.
    other = make_client(layer="logits")
    ready = other.get("/ready")
    assert ready.status_code == 503 and "incompatible_index" in ready.json()["detail"]
    assert "layer" in ready.json()["detail"]
    _error(other.post("/v1/search", files=upload(photos["coffee"])), 503, "not_ready")
    assert other.get("/health").status_code == 200


def test_existing_store_decides_the_layer(make_client: MakeClient, photos: dict[str, Image.Image]) -> None:
    first = make_client(layer="head", pooling="gem")
    assert first.post("/v1/images", files=upload(photos["coffee"])).status_code == 201
    second = make_client(fast=False)  # nothing explicit: the manifest's layer and pooling are used
    stats = second.get("/v1/stats").json()
    assert (
        stats["model"]["layer"] == "head" and stats["model"]["pooling"] == "gem(p=3)" and stats["count"] == 1
    )
