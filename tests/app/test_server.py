"""The real server over HTTP: uvicorn on a loopback port, driven with httpx."""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path

import httpx
from PIL import Image

from deepfeat.scripts.cli import main as deepfeat
from deepfeat.settings import Settings
from tests.app.live import live_server
from tests.conftest import jpeg_bytes


def _file(data: bytes, name: str = "q.jpg") -> dict:
    return {"file": (name, data, "image/jpeg")}


def test_add_search_classify_delete_over_http(tmp_path: Path, photos: dict[str, Image.Image]) -> None:
    settings = Settings(data_dir=tmp_path / "data", api_key="k3y")
    with live_server(settings) as base, httpx.Client(base_url=base, timeout=60) as http:
        ids = {}
        for name in ("chelsea", "coffee", "rocket"):
            resp = http.post(
                "/v1/images",
                files=_file(jpeg_bytes(photos[name])),
                data={"source": name},
                headers={"X-API-Key": "k3y"},
            )
            assert resp.status_code == 201, resp.text
            ids[name] = resp.json()["id"]
        hits = http.post("/v1/search?k=3", files=_file(jpeg_bytes(photos["coffee"], scale=0.5))).json()[
            "results"
        ]
        assert hits[0]["id"] == ids["coffee"] and hits[0]["source"] == "coffee"
        preds = http.post("/v1/classify", files=_file(jpeg_bytes(photos["chelsea"]))).json()["predictions"]
        assert preds[0]["class_index"] in (281, 282, 285)
        assert (
            http.delete(f"/v1/images/{ids['coffee']}", headers={"X-API-Key": "k3y"}).json()["deleted"] is True
        )
        hits = http.post("/v1/search?k=3", files=_file(jpeg_bytes(photos["coffee"]))).json()["results"]
        assert ids["coffee"] not in [h["id"] for h in hits] and len(hits) == 2
        assert http.get("/v1/stats").json()["count"] == 2


def test_images_indexed_by_the_cli_appear_without_restart(
    tmp_path: Path, photo_dir: Path, photos: dict[str, Image.Image]
) -> None:
    data = tmp_path / "data"
    settings = Settings(data_dir=data, refresh_interval_s=0.2)
    with live_server(settings) as base, httpx.Client(base_url=base, timeout=60) as http:
        assert http.get("/v1/stats").json()["count"] == 0
        # A second writer: the batch indexer, in this process but through its own store instance.
        assert (
            deepfeat(["index", str(photo_dir), "--data-dir", str(data), "--workers", "0", "--no-progress"])
            == 0
        )
        deadline = time.monotonic() + 10
        while http.get("/v1/stats").json()["count"] < len(photos):
            assert time.monotonic() < deadline, "indexed images did not appear within 10 s"
            time.sleep(0.2)
        hits = http.post("/v1/search?k=1", files=_file(jpeg_bytes(photos["hopper"], scale=0.5))).json()[
            "results"
        ]
        assert hits[0]["source"].endswith("hopper.jpg")


def test_health_answers_while_uploads_are_embedded(tmp_path: Path, photos: dict[str, Image.Image]) -> None:
    """CPU-heavy work runs in worker threads: the event loop keeps answering probes."""
    big = jpeg_bytes(photos["hopper"].resize((3000, 3500)), quality=95)
    with (
        live_server(Settings(data_dir=tmp_path / "data")) as base,
        httpx.Client(base_url=base, timeout=120) as http,
    ):
        with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
            uploads = [pool.submit(http.post, "/v1/embed", files=_file(big)) for _ in range(6)]
            time.sleep(0.2)
            probes = [http.get("/health", timeout=5) for _ in range(5)]
            in_flight = sum(not f.done() for f in uploads)
            assert all(p.status_code == 200 for p in probes)
            assert all(f.result().status_code == 200 for f in uploads)
        # The probes were answered while embeddings were still being computed.
        assert in_flight > 0
