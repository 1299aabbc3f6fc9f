"""deepfeat.Client against the real server (`deepfeat serve` on a loopback port): every route, typed
results, the API's error codes as exceptions, and the retry of 503 overloaded after Retry-After."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from deepfeat import Client, DeepfeatAPIError
from deepfeat.client import Hit, ImageInfo, SearchResult
from tests.app.serve_proc import served
from tests.conftest import jpeg_bytes

KEY = "client-test-key"
FAST_ENV = {
    "DEEPFEAT_LAYER": "penultimate",
    "DEEPFEAT_RESIZE_MODE": "crop",
    "DEEPFEAT_SCALES": "1",
    "DEEPFEAT_API_KEY": KEY,
}


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with served(tmp_path_factory.mktemp("client") / "data", **FAST_ENV) as (_proc, base):
        yield base


def test_every_route(base_url: str, photos: dict[str, Image.Image], tmp_path: Path) -> None:
    cat = tmp_path / "cat.jpg"
    cat.write_bytes(jpeg_bytes(photos["chelsea"]))
    with Client(base_url, api_key=KEY) as client:
        assert client.health()["status"] == "ok"
        assert client.ready()["status"] == "ready"
        # Three kinds of input: a path, bytes and an open file.
        added = client.add(cat, source="cats/chelsea.jpg", metadata={"album": "2024"})
        assert added.created and client.add(cat.read_bytes()).created is False
        ids = {"chelsea": added.id}
        for name in ("coffee", "rocket", "hopper"):
            ids[name] = client.add(
                io.BytesIO(jpeg_bytes(photos[name])), source=f"{name}.jpg", metadata={"label": name}
            ).id

        found = client.search(jpeg_bytes(photos["chelsea"], quality=60, scale=0.5), k=2)
        assert isinstance(found, SearchResult) and isinstance(found.results[0], Hit)
        assert found.results[0].id == ids["chelsea"] and found.results[0].metadata == {"album": "2024"}
        assert client.search(cat, k=3, min_score=0.999).results[0].id == ids["chelsea"]
        similar = client.similar(ids["chelsea"], k=10)
        assert ids["chelsea"] not in [h.id for h in similar.results] and len(similar.results) == 3

        info = client.get(ids["chelsea"], include_vector=True)
        assert isinstance(info, ImageInfo) and info.source == "cats/chelsea.jpg" and info.vector
        assert client.get(ids["rocket"]).vector is None
        assert client.thumbnail(ids["rocket"])[:2] == b"\xff\xd8"
        page = client.list_images(limit=2)
        assert len(page.items) == 2 and page.next_cursor
        assert [i.id for i in client.iter_images(page_size=3)] == list(ids.values())
        album = {"album": "2024"}
        assert [h.id for h in client.search(cat, k=10, filter=album).results] == [ids["chelsea"]]
        assert [h.id for h in client.similar(ids["rocket"], k=10, filter='{"album": "2024"}').results] == [
            ids["chelsea"]
        ]
        assert [i.id for i in client.list_images(filter=album).items] == [ids["chelsea"]]
        assert [i.id for i in client.iter_images(filter={"source": {"$prefix": "co"}})] == [ids["coffee"]]
        batch_hits = client.search_batch([cat], k=10, filter=album)[0].result["results"]
        assert [h["id"] for h in batch_hits] == [ids["chelsea"]]

        top = client.classify(cat, k=3)
        assert len(top) == 3 and top[0].class_index in (281, 282, 285)
        assert top.classifier == "imagenet" and top.neighbours is None
        voted = client.classify(cat, k=1, classifier="knn")
        assert voted.classifier == "knn" and voted[0].class_index == -1 and voted.neighbours
        assert {n.label for n in voted.neighbours} <= {"coffee", "rocket", "hopper"}
        assert voted[0].label in {n.label for n in voted.neighbours}
        emb = client.embed(cat)
        assert emb.dim == len(emb.vector) and emb.layer == "penultimate"
        assert client.classifiers()["default"] == "imagenet"
        assert client.stats()["count"] == 4
        assert "deepfeat_requests_total" in client.metrics()

        batch = client.search_batch([cat, b"not an image", jpeg_bytes(photos["rocket"])], k=1)
        assert [i.status for i in batch] == [200, 415, 200] and batch[1].code == "unsupported_format"
        assert batch[0].ok and batch[0].result["results"][0]["id"] == ids["chelsea"]
        assert [i.status for i in client.embed_batch([cat])] == [200]
        assert client.classify_batch([cat], k=1)[0].result["predictions"][0]["class_index"] in (281, 282, 285)
        astro = tmp_path / "astronaut.jpg"
        astro.write_bytes(jpeg_bytes(photos["astronaut"]))
        added_batch = client.add_batch([astro, cat], metadata={"album": "b"})
        assert [(i.status, i.result["created"]) for i in added_batch] == [(201, True), (200, False)]
        assert client.get(added_batch[0].result["id"]).source == "astronaut.jpg"

        client.delete(ids["hopper"])
        with pytest.raises(DeepfeatAPIError) as err:
            client.get(ids["hopper"])
        assert (err.value.status, err.value.code) == (404, "not_found")


def test_api_errors_are_exceptions_with_their_code(base_url: str, photos: dict[str, Image.Image]) -> None:
    with Client(base_url) as anonymous:  # no key: reads work, writes are refused
        with pytest.raises(DeepfeatAPIError) as err:
            anonymous.add(jpeg_bytes(photos["coffee"]))
        assert (err.value.status, err.value.code) == (401, "unauthorized")
        with pytest.raises(DeepfeatAPIError) as err:
            anonymous.search(b"not an image")
        assert (err.value.status, err.value.code) == (415, "unsupported_format")
        with pytest.raises(DeepfeatAPIError) as err:
            anonymous.search(jpeg_bytes(photos["coffee"]), k=1000)
        assert err.value.code == "k_too_large" and "100" in err.value.detail
        with pytest.raises(DeepfeatAPIError) as err:
            anonymous.list_images(cursor="nonsense")
        assert err.value.code == "invalid_cursor"
        with pytest.raises(DeepfeatAPIError) as err:
            anonymous.list_images(filter={"album": {"$regex": "x"}})
        assert (err.value.status, err.value.code) == (422, "invalid_filter") and "$regex" in err.value.detail


def test_overloaded_is_retried_after_retry_after() -> None:
    """The retry path itself, on a transport that answers as an overloaded server does."""
    answers = [
        httpx.Response(
            503, json={"detail": "queue full", "code": "overloaded"}, headers={"Retry-After": "0"}
        ),
        httpx.Response(
            503, json={"detail": "queue full", "code": "overloaded"}, headers={"Retry-After": "0"}
        ),
        httpx.Response(200, json={"status": "ok"}),
    ]
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answers[len(seen) - 1]

    with Client("http://deepfeat.test", transport=httpx.MockTransport(handler), retries=2) as client:
        assert client.health() == {"status": "ok"} and len(seen) == 3
    seen.clear()
    with Client("http://deepfeat.test", transport=httpx.MockTransport(handler), retries=1) as client:
        with pytest.raises(DeepfeatAPIError) as err:
            client.health()
        assert err.value.code == "overloaded" and len(seen) == 2
    body = json.dumps({"detail": "x", "code": "invalid_request"})
    with (
        Client(
            "http://deepfeat.test", transport=httpx.MockTransport(lambda r: httpx.Response(422, text=body))
        ) as c,
        pytest.raises(DeepfeatAPIError, match="invalid_request"),
    ):
        c.health()  # other errors are never retried
