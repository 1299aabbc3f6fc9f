"""``POST /v1/search?similarity=semantic``: the semantic vectors stored by the add route, searched with
the same response shape as visual search; bad values and stores without them are coded errors."""

from __future__ import annotations

import json

from fastapi.testclient import TestClient
from PIL import Image

from tests.app.conftest import MakeClient, upload
from tests.conftest import jpeg_bytes

# The last conv block as the visual vector (so the semantic one, from the logits, differs from it),
# on the cheap 224 px crop at one scale.
HEAD = {"layer": "head", "resize_mode": "crop", "scales": [1.0], "regions": 2}


def _error(resp, status: int, code: str) -> dict:
    assert resp.status_code == status, (resp.status_code, resp.text)
    body = resp.json()
    assert body["code"] == code and body["detail"], body
    return body


def _fill(client: TestClient, photos: dict[str, Image.Image]) -> dict[str, str]:
    ids = {}
    for name, img in photos.items():
        resp = client.post("/v1/images", files=upload(img), data={"metadata": json.dumps({"name": name})})
        assert resp.status_code == 201, resp.text
        ids[name] = resp.json()["id"]
    return ids


def test_semantic_search_through_the_api(make_client: MakeClient, photos: dict[str, Image.Image]) -> None:
    client = make_client(**HEAD)
    ids = _fill(client, photos)
    stats = client.get("/v1/stats").json()
    assert stats["count"] == len(photos) and stats["semantic_count"] == len(photos)
    assert stats["semantic_dim"] == 1000  # the logits
    query = jpeg_bytes(photos["coffee"], quality=60, scale=0.5)
    visual = client.post("/v1/search?k=3", files=upload(query)).json()
    semantic = client.post("/v1/search?k=3&similarity=semantic", files=upload(query)).json()
    assert visual.keys() == semantic.keys()
    assert [r.keys() for r in visual["results"]] == [r.keys() for r in semantic["results"]]
    assert semantic["results"][0]["id"] == ids["coffee"] and semantic["results"][0]["score"] > 0.7
    assert [r["score"] for r in semantic["results"]] != [r["score"] for r in visual["results"]]
    assert (
        client.post("/v1/search?similarity=visual&k=1", files=upload(query)).json()["results"][0]["id"]
        == (ids["coffee"])
    )
    body = _error(client.post("/v1/search?similarity=colour", files=upload(query)), 422, "invalid_request")
    assert "similarity" in body["detail"]


def test_semantic_unavailable(make_client: MakeClient, photos: dict[str, Image.Image]) -> None:
    client = make_client(**HEAD, semantic_layer="none")
    _fill(client, {"rocket": photos["rocket"]})
    body = _error(
        client.post("/v1/search?similarity=semantic", files=upload(photos["rocket"])),
        409,
        "semantic_unavailable",
    )
    assert "add-semantic" in body["detail"]
    assert client.post("/v1/search", files=upload(photos["rocket"])).status_code == 200
