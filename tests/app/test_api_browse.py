"""More like this, listing with a stable cursor, min_score and the k limit, through the real app."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.app.conftest import MakeClient, upload
from tests.app.conftest import expect_error as _error
from tests.conftest import jpeg_bytes


@pytest.fixture(scope="module")
def indexed(client: TestClient, photos: dict[str, Image.Image]) -> dict[str, str]:
    out = {}
    for name, img in photos.items():
        resp = client.post(
            "/v1/images",
            files=upload(img, f"{name}.jpg"),
            data={"source": f"{name}.jpg", "metadata": json.dumps({"name": name})},
        )
        assert resp.status_code == 201, resp.text
        out[name] = resp.json()["id"]
    return out


def test_similar_searches_with_the_stored_vector_and_skips_the_image(
    client: TestClient, indexed: dict[str, str], photos: dict[str, Image.Image]
) -> None:
    # A second, re-encoded copy of the cat: the nearest image to the first copy.
    copy = client.post("/v1/images", files=upload(jpeg_bytes(photos["chelsea"], quality=50, scale=0.5)))
    copy_id = copy.json()["id"]
    try:
        body = client.get(f"/v1/images/{indexed['chelsea']}/similar?k=3").json()
        ids = [r["id"] for r in body["results"]]
        assert indexed["chelsea"] not in ids and ids[0] == copy_id and len(ids) == 3
        assert body["model"]["layer"] == "penultimate"
        # The same ranking as uploading the image itself, minus the image.
        uploaded = client.post("/v1/search?k=4", files=upload(photos["chelsea"])).json()["results"]
        assert [r["id"] for r in uploaded if r["id"] != indexed["chelsea"]][:3] == ids
        everything = client.get(f"/v1/images/{indexed['chelsea']}/similar?k=100").json()["results"]
        assert len(everything) == len(indexed)  # every other image, itself excluded
    finally:
        client.delete(f"/v1/images/{copy_id}")


def test_similar_errors(client: TestClient, indexed: dict[str, str]) -> None:
    _error(client.get(f"/v1/images/{'0' * 32}/similar"), 404, "not_found")
    _error(client.get("/v1/images/not-an-id/similar"), 404, "invalid_id")
    _error(client.get(f"/v1/images/{indexed['rocket']}/similar?k=0"), 422, "invalid_request")
    body = _error(client.get(f"/v1/images/{indexed['rocket']}/similar?k=101"), 422, "k_too_large")
    assert "100" in body["detail"]


def test_min_score_turns_no_match_into_an_empty_list(
    client: TestClient, indexed: dict[str, str], photos: dict[str, Image.Image]
) -> None:
    all_hits = client.post("/v1/search?k=10", files=upload(photos["coffee"])).json()["results"]
    cut = all_hits[0]["score"] - 1e-6
    kept = client.post(f"/v1/search?k=10&min_score={cut}", files=upload(photos["coffee"])).json()["results"]
    assert [r["id"] for r in kept] == [all_hits[0]["id"]]
    assert client.post("/v1/search?min_score=1", files=upload(photos["coffee"])).json()["results"] == [
        r for r in all_hits if r["score"] >= 1
    ]
    similar = client.get(f"/v1/images/{indexed['coffee']}/similar?min_score=0.999").json()["results"]
    assert all(r["score"] >= 0.999 for r in similar)
    _error(client.post("/v1/search?min_score=2", files=upload(photos["coffee"])), 422, "invalid_request")


def test_k_above_the_limit_names_it(client: TestClient, photos: dict[str, Image.Image]) -> None:
    for k in (101, 20_000, 10**30):  # however far above it
        body = _error(client.post(f"/v1/search?k={k}", files=upload(photos["rocket"])), 422, "k_too_large")
        assert "limit of 100" in body["detail"] and "DEEPFEAT_MAX_K" in body["detail"]


def test_listing_pages_through_everything_once(client: TestClient, indexed: dict[str, str]) -> None:
    seen: list[str] = []
    cursor = None
    while True:
        query = "limit=2" + (f"&cursor={cursor}" if cursor else "")
        page = client.get(f"/v1/images?{query}").json()
        assert len(page["items"]) <= 2
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(indexed.values())  # insertion order, each once
    first = client.get("/v1/images?limit=1").json()["items"][0]
    assert "vector" not in first
    assert first["metadata"] == {"name": next(iter(indexed))} and first["thumbnail_url"].endswith(
        "/thumbnail"
    )


def test_paging_while_a_writer_adds_and_deletes(
    make_client: MakeClient, photos: dict[str, Image.Image]
) -> None:
    """No id twice, and none that existed throughout is skipped."""
    client = make_client()
    names = list(photos)
    ids = {n: client.post("/v1/images", files=upload(photos[n], f"{n}.jpg")).json()["id"] for n in names[:4]}
    page = client.get("/v1/images?limit=2").json()
    seen = [item["id"] for item in page["items"]]
    # Between pages: delete one already listed and one not yet listed, add two new images.
    client.delete(f"/v1/images/{seen[0]}")
    client.delete(f"/v1/images/{ids[names[3]]}")
    added = [client.post("/v1/images", files=upload(photos[n], f"{n}.jpg")).json()["id"] for n in names[4:6]]
    cursor = page["next_cursor"]
    while cursor is not None:
        page = client.get(f"/v1/images?limit=2&cursor={cursor}").json()
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
    assert len(seen) == len(set(seen))
    throughout = [ids[names[1]], ids[names[2]]]
    assert all(i in seen for i in throughout + added) and ids[names[3]] not in seen


# "after:-1", and "after:" with a position beyond SQLite's integers (a forged cursor)
_HUGE_CURSOR = base64.urlsafe_b64encode(b"after:99999999999999999999999").decode().rstrip("=")


@pytest.mark.parametrize("cursor", ["nonsense", "YWZ0ZXI6LTE", "x" * 64, "%00", _HUGE_CURSOR])
def test_bad_cursor_and_limit_are_422(client: TestClient, cursor: str) -> None:
    _error(client.get(f"/v1/images?cursor={cursor}"), 422, "invalid_cursor")


def test_bad_limit_is_422(client: TestClient) -> None:
    _error(client.get("/v1/images?limit=0"), 422, "invalid_request")
    _error(client.get("/v1/images?limit=1001"), 422, "invalid_request")


def test_get_image_with_its_vector(
    client: TestClient, indexed: dict[str, str], photos: dict[str, Image.Image]
) -> None:
    plain = client.get(f"/v1/images/{indexed['rocket']}").json()
    assert "vector" not in plain and plain["source"] == "rocket.jpg"
    full = client.get(f"/v1/images/{indexed['rocket']}?include=vector").json()
    vector = np.array(full["vector"], dtype=np.float32)
    assert {k: v for k, v in full.items() if k != "vector"} == plain
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-4)
    # The very vector /v1/embed computes for the same upload at the store's layer.
    embedded = np.array(client.post("/v1/embed", files=upload(photos["rocket"])).json()["vector"])
    assert float(vector @ embedded) > 0.999
    _error(client.get(f"/v1/images/{indexed['rocket']}?include=thumbnail"), 422, "invalid_request")
    _error(client.get(f"/v1/images/{'0' * 32}?include=vector"), 404, "not_found")


def test_similar_by_semantic_vector(client: TestClient, indexed: dict[str, str]) -> None:
    hits = client.get(f"/v1/images/{indexed['chelsea']}/similar?k=3&similarity=semantic").json()["results"]
    assert len(hits) == 3 and indexed["chelsea"] not in [h["id"] for h in hits]
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)


def test_similar_semantic_on_a_store_without_semantic_vectors_is_409(
    make_client: MakeClient, photos: dict[str, Image.Image]
) -> None:
    client = make_client(semantic_layer="none")
    image_id = client.post("/v1/images", files=upload(photos["coffee"])).json()["id"]
    _error(client.get(f"/v1/images/{image_id}/similar?similarity=semantic"), 409, "semantic_unavailable")
    assert client.get(f"/v1/images/{image_id}/similar").json()["results"] == []  # nothing else indexed


def test_filter_on_search_similar_listing_and_batch(
    client: TestClient, indexed: dict[str, str], photos: dict[str, Image.Image]
) -> None:
    """The same filter on every route that takes one: only matching images, the best k of them."""
    names = sorted(indexed)
    wanted = {"name": {"$in": names[:3]}}
    query = "filter=" + json.dumps(wanted)
    allowed = {indexed[n] for n in names[:3]}

    found = client.post(f"/v1/search?k=10&{query}", files=upload(photos["rocket"])).json()["results"]
    assert {r["id"] for r in found} == allowed  # all three, whatever their rank without the filter
    unfiltered = client.post("/v1/search?k=10", files=upload(photos["rocket"])).json()["results"]
    assert [r["id"] for r in found] == [r["id"] for r in unfiltered if r["id"] in allowed]

    similar = client.get(f"/v1/images/{indexed[names[0]]}/similar?k=10&{query}").json()["results"]
    assert {r["id"] for r in similar} == allowed - {indexed[names[0]]}

    listed = client.get(f"/v1/images?limit=2&{query}").json()
    ids = [item["id"] for item in listed["items"]]
    rest = client.get(f"/v1/images?limit=2&cursor={listed['next_cursor']}&{query}").json()
    assert rest["next_cursor"] is None and set(ids + [i["id"] for i in rest["items"]]) == allowed

    batch = client.post(
        f"/v1/search/batch?k=10&{query}",
        files=[("files", ("a.jpg", jpeg_bytes(photos["coffee"]), "image/jpeg"))],
    ).json()
    assert {r["id"] for r in batch["items"][0]["result"]["results"]} == allowed

    too_long = json.dumps({"name": {"$in": ["x" * 60] * 70}})  # over 4096 characters
    _error(client.get("/v1/images", params={"filter": too_long}), 422, "invalid_request")

    source = json.dumps({"source": {"$prefix": "rock"}})
    assert [r["id"] for r in client.get(f"/v1/images?filter={source}").json()["items"]] == [indexed["rocket"]]
    assert client.get("/v1/images?filter=" + json.dumps({"name": "nobody"})).json()["items"] == []


@pytest.mark.parametrize(
    ("text", "detail"),
    [
        ("{", "filter is not valid JSON"),
        ('{"name": {"$regex": "x"}}', "filter.name: unknown operator '$regex'"),
        ('{"year": {"$gte": 1, "$lt": "z"}}', "filter.year: range bounds must be all numbers or all strings"),
        ('["name"]', "filter: expected a JSON object, got a list"),
    ],
)
def test_invalid_filter_is_422_on_every_route(
    client: TestClient, indexed: dict[str, str], photos: dict[str, Image.Image], text: str, detail: str
) -> None:
    for resp in (
        client.post("/v1/search", params={"filter": text}, files=upload(photos["rocket"])),
        client.get(f"/v1/images/{indexed['rocket']}/similar", params={"filter": text}),
        client.get("/v1/images", params={"filter": text}),
        client.post(
            "/v1/search/batch",
            params={"filter": text},
            files=[("files", ("a.jpg", jpeg_bytes(photos["coffee"]), "image/jpeg"))],
        ),
    ):
        body = _error(resp, 422, "invalid_filter")
        assert body["detail"].startswith(detail)
