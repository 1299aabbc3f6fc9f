"""``POST /v1/search?similarity=semantic``: the semantic vectors stored by the add route, searched with
the same response shape as visual search; bad values and stores without them are coded errors; a store
made with another semantic vector (the logits) keeps it."""

from __future__ import annotations

import json
from pathlib import Path

from fastapi.testclient import TestClient
from PIL import Image

from deepfeat.app.main import create_app
from deepfeat.settings import Settings
from tests.app.conftest import MakeClient, upload
from tests.conftest import jpeg_bytes

# The last conv block as the visual vector (the semantic one, gem-logits+penultimate by default, is
# read from the same map), on the cheap 224 px crop at one scale.
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
    assert stats["semantic_dim"] == 2280  # gem-logits+penultimate: 1000 class scores, 1280 mean
    assert stats["model"]["config"]["semantic_layer"] == "gem-logits+penultimate"
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


def test_a_store_made_with_the_logits_keeps_them(photos: dict[str, Image.Image], tmp_path: Path) -> None:
    """A store whose manifest records ``semantic_layer=logits`` (the earlier default) reopens at
    today's defaults with its 1000-d logits vectors, stores the logits for new images and searches
    them; asking it explicitly for another semantic vector is refused, never mixed."""
    data = tmp_path / "data"
    with TestClient(create_app(Settings(data_dir=data, **HEAD, semantic_layer="logits"))) as first:
        ids = _fill(first, {k: photos[k] for k in ("coffee", "rocket")})
    with TestClient(create_app(Settings(data_dir=data, **HEAD))) as reopened:  # no semantic_layer set
        stats = reopened.get("/v1/stats").json()
        assert stats["semantic_dim"] == 1000 and stats["model"]["config"]["semantic_layer"] == "logits"
        ids.update(_fill(reopened, {"chelsea": photos["chelsea"]}))
        assert reopened.get("/v1/stats").json()["semantic_count"] == 3
        query = jpeg_bytes(photos["chelsea"], quality=60, scale=0.5)
        hits = reopened.post("/v1/search?k=3&similarity=semantic", files=upload(query)).json()["results"]
        assert hits[0]["id"] == ids["chelsea"] and len(hits) == 3
    explicit = Settings(data_dir=data, **HEAD, semantic_layer="gem-logits+penultimate")
    with TestClient(create_app(explicit)) as other:
        ready = other.get("/ready")
        assert ready.status_code == 503 and "incompatible_index" in ready.json()["detail"]
        assert "semantic" in ready.json()["detail"]
