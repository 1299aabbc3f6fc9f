"""Batch routes: one status per file in upload order, a bad file fails alone, the rest go through the
model together and answer exactly as the single routes do."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.app import hostile as h
from tests.app.conftest import MakeClient, upload
from tests.conftest import jpeg_bytes

NAMES = ("chelsea", "coffee", "rocket")


def _files(photos: dict[str, Image.Image], bad: bytes | None = b"not an image", at: int = 1) -> list:
    parts = [("files", (f"{n}.jpg", jpeg_bytes(photos[n]), "image/jpeg")) for n in NAMES]
    if bad is not None:
        parts.insert(at, ("files", ("bad.jpg", bad, "image/jpeg")))
    return parts


def test_add_batch_then_search_batch(client: TestClient, photos: dict[str, Image.Image]) -> None:
    truncated = jpeg_bytes(photos["hopper"])[:500]
    resp = client.post(
        "/v1/images/batch", files=_files(photos, bad=truncated), data={"metadata": '{"album": "b"}'}
    )
    assert resp.status_code == 200, resp.text
    items = resp.json()["items"]
    assert [i["status"] for i in items] == [201, 422, 201, 201]
    assert items[1]["code"] == "corrupt_image" and items[1]["detail"] and "result" not in items[1]
    ids = [items[i]["result"]["id"] for i in (0, 2, 3)]
    assert client.get(f"/v1/images/{ids[0]}").json()["metadata"] == {"album": "b"}
    assert client.get(f"/v1/images/{ids[0]}").json()["source"] == "chelsea.jpg"
    again = client.post("/v1/images/batch", files=_files(photos, bad=None)).json()["items"]
    assert [(i["status"], i["result"]["created"]) for i in again] == [(200, False)] * 3

    found = client.post("/v1/search/batch?k=2", files=_files(photos)).json()["items"]
    assert [i["status"] for i in found] == [200, 415, 200, 200]
    assert found[1]["code"] == "unsupported_format"
    for item, expected in zip([found[0], found[2], found[3]], ids, strict=True):
        assert item["result"]["results"][0]["id"] == expected
    # The same answer as the single route.
    single = client.post("/v1/search?k=2", files=upload(photos["coffee"])).json()
    assert [h["id"] for h in found[2]["result"]["results"]] == [h["id"] for h in single["results"]]
    assert [h["score"] for h in found[2]["result"]["results"]] == pytest.approx(
        [h["score"] for h in single["results"]], abs=1e-4
    )


def test_embed_and_classify_batches_match_the_single_routes(
    client: TestClient, photos: dict[str, Image.Image]
) -> None:
    items = client.post("/v1/embed/batch", files=_files(photos, at=3)).json()["items"]
    assert [i["status"] for i in items] == [200, 200, 200, 415]
    single = np.array(client.post("/v1/embed", files=upload(photos["rocket"])).json()["vector"])
    assert float(np.array(items[2]["result"]["vector"]) @ single) > 0.999
    classes = client.post("/v1/classify/batch?k=3", files=_files(photos, at=0)).json()["items"]
    assert [i["status"] for i in classes] == [415, 200, 200, 200]
    assert classes[1]["result"]["predictions"][0]["class_index"] in (281, 282, 285)  # the cat
    # The same answer as the single route (a batch may round differently on some engines).
    alone = client.post("/v1/classify?k=3", files=upload(photos["chelsea"])).json()["predictions"]
    batched = classes[1]["result"]["predictions"]
    assert [p["class_index"] for p in batched] == [p["class_index"] for p in alone]
    assert [p["probability"] for p in batched] == pytest.approx([p["probability"] for p in alone], abs=1e-3)


def test_batch_limits_and_errors(make_client: MakeClient, photos: dict[str, Image.Image]) -> None:
    client = make_client(max_batch_files=2, api_key="k")
    body = client.post("/v1/search/batch", files=_files(photos, bad=None)).json()
    assert body["code"] == "too_many_files" and "limit of 2" in body["detail"]
    assert client.post("/v1/search/batch").json()["code"] == "invalid_request"  # no files at all
    resp = client.post("/v1/images/batch", files=_files(photos, bad=None)[:1])
    assert resp.status_code == 401 and resp.json()["code"] == "unauthorized"
    resp = client.post("/v1/search/batch?k=101", files=_files(photos, bad=None)[:1])
    assert resp.status_code == 422 and resp.json()["code"] == "k_too_large"
    resp = client.post("/v1/classify/batch?classifier=nope", files=_files(photos, bad=None)[:1])
    assert resp.status_code == 404 and resp.json()["code"] == "unknown_classifier"
    resp = client.post(
        "/v1/images/batch",
        files=_files(photos, bad=None)[:1],
        data={"metadata": "[1]"},
        headers={"X-API-Key": "k"},
    )
    assert resp.status_code == 422 and resp.json()["code"] == "invalid_metadata"


BAD_FILES = {
    "text-as-jpeg": (lambda p: b"plain text, not a photo\n" * 4, 415, "unsupported_format"),
    "truncated-jpeg": (lambda p: jpeg_bytes(p["coffee"])[:400], 422, "corrupt_image"),
    "empty-file": (lambda p: b"", 422, "corrupt_image"),
    "1x1-jpeg": (lambda p: jpeg_bytes(Image.new("RGB", (1, 1), "red")), 422, "image_too_small"),
    "bomb-header": (lambda p: h.png_header_only(30_000, 30_000), 422, "image_too_large"),
}


@pytest.mark.parametrize(
    "route", ["/v1/search/batch", "/v1/embed/batch", "/v1/classify/batch", "/v1/images/batch"]
)
def test_each_bad_file_fails_alone_on_every_batch_route(
    make_client: MakeClient, photos: dict[str, Image.Image], route: str
) -> None:
    """The bad-input rows that concern one file, all in one batch between two good photos."""
    client = make_client()
    parts = [("files", ("good-0.jpg", jpeg_bytes(photos["rocket"]), "image/jpeg"))]
    for name, (build, _, _) in BAD_FILES.items():
        parts.append(("files", (f"{name}.jpg", build(photos), "image/jpeg")))
    parts.append(("files", ("good-1.jpg", jpeg_bytes(photos["chelsea"]), "image/jpeg")))
    resp = client.post(route, files=parts)
    assert resp.status_code == 200, resp.text
    items = resp.json()["items"]
    assert len(items) == len(parts)
    assert items[0]["status"] in (200, 201) and items[-1]["status"] in (200, 201)
    for item, (_, status, code) in zip(items[1:-1], BAD_FILES.values(), strict=True):
        assert (item["status"], item["code"]) == (status, code) and item["detail"], item
    assert client.get("/health").status_code == 200
