"""Read replicas (DEEPFEAT_READ_ONLY / ``deepfeat serve --read-only``) beside one writer on one data dir:
published generations, the delta of newer images, refused writes, and the pickup delay."""

from __future__ import annotations

import concurrent.futures
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from deepfeat.index.build import build_generation, process_rss_bytes
from tests.app.conftest import MakeClient, upload
from tests.app.serve_proc import DEEPFEAT, clean_env, served
from tests.conftest import jpeg_bytes

REFRESH_S = 0.3
PICKUP_SLACK_S = 10.0  # on top of the refresh interval: a search (embedding) on a busy 2-core machine
FAST_ENV = {"DEEPFEAT_LAYER": "penultimate", "DEEPFEAT_RESIZE_MODE": "crop", "DEEPFEAT_SCALES": "[1.0]"}


def _error(resp: httpx.Response, status: int, code: str) -> None:
    assert resp.status_code == status, (resp.status_code, resp.text)
    body = resp.json()
    assert body["code"] == code and body["detail"], body


def _top_id(client: TestClient | httpx.Client, image: Image.Image, k: int = 1) -> list[str]:
    resp = client.post(f"/v1/search?k={k}", files=upload(jpeg_bytes(image, scale=0.5)))
    assert resp.status_code == 200, resp.text
    return [hit["id"] for hit in resp.json()["results"]]


def _wait_for(check: Callable[[], bool], what: str, *, within: float) -> float:
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < within, f"{what} not seen within {within:.1f} s"
        time.sleep(0.05)
    return time.monotonic() - started


def test_replica_serves_the_generation_and_newer_images_and_refuses_writes(
    make_client: MakeClient, tmp_path: Path, photos: dict[str, Image.Image]
) -> None:
    writer = make_client(refresh_interval_s=REFRESH_S)
    ids = {}
    for name in ("chelsea", "coffee", "rocket", "hopper"):
        resp = writer.post("/v1/images", files=upload(photos[name]), data={"source": name})
        assert resp.status_code == 201, resp.text
        ids[name] = resp.json()["id"]
    budget = process_rss_bytes() + 2**30  # on top of this process's torch
    build_generation(
        tmp_path / "data", factory="IVF2,Flat", max_memory_bytes=budget, search_params={"nprobe": 2}
    )

    replica = make_client(read_only=True, refresh_interval_s=REFRESH_S, api_key="k3y")
    ready = replica.get("/ready").json()
    assert ready.pop("model")["config"]["model"] == "efficientnet_lite0"
    assert ready == {"status": "ready", "detail": None, "read_only": True, "generation": 1}
    assert (
        writer.get("/ready").json()["read_only"] is False
        and writer.get("/ready").json()["generation"] is None
    )
    stats = replica.get("/v1/stats").json()
    assert stats["read_only"] is True and stats["count"] == 4 and stats["index_factory"] == "IVF2,Flat"
    assert stats["generation"] == {"number": 1, "factory": "IVF2,Flat", "count": 4, "hidden": 0, "delta": 0}
    assert _top_id(replica, photos["coffee"]) == [ids["coffee"]]

    # Writes are refused before the upload is read, with or without the right key.
    for headers in ({}, {"X-API-Key": "k3y"}):
        _error(
            replica.post("/v1/images", files=upload(photos["astronaut"]), headers=headers), 403, "read_only"
        )
        _error(replica.delete(f"/v1/images/{ids['coffee']}", headers=headers), 403, "read_only")
    assert replica.get("/v1/stats").json()["count"] == 4

    # An image added to the writer after the generation: served from the replica's delta.
    new = writer.post("/v1/images", files=upload(photos["astronaut"])).json()["id"]
    _wait_for(lambda: _top_id(replica, photos["astronaut"]) == [new], "the new image", within=REFRESH_S + 10)
    assert replica.get("/v1/stats").json()["generation"]["delta"] == 1
    # An image deleted on the writer disappears from the replica's answers at once (a hit whose catalog
    # row is gone is dropped), and the next refresh hides it in the generation.
    assert writer.delete(f"/v1/images/{ids['coffee']}").status_code == 200
    assert ids["coffee"] not in _top_id(replica, photos["coffee"], k=10)
    assert replica.get(f"/v1/images/{ids['coffee']}").status_code == 404
    _wait_for(
        lambda: replica.get("/v1/stats").json()["generation"]["hidden"] == 1,
        "the deletion",
        within=REFRESH_S + 10,
    )
    assert replica.get("/v1/stats").json()["count"] == 4
    assert ids["coffee"] not in _top_id(replica, photos["coffee"], k=10)


def test_read_only_server_on_a_missing_store_is_not_ready(make_client: MakeClient, tmp_path: Path) -> None:
    replica = make_client(read_only=True)
    resp = replica.get("/ready")
    assert resp.status_code == 503 and "no store" in resp.json()["detail"]
    assert not (tmp_path / "data").exists()  # a replica never creates the data dir
    _error(replica.post("/v1/search", files=upload(b"x")), 503, "not_ready")


@pytest.mark.slow
def test_two_replicas_and_a_writer_share_a_data_dir(tmp_path: Path, photos: dict[str, Image.Image]) -> None:
    """Real servers (three ``deepfeat serve`` processes) on one data dir: after the writer adds (and
    publishes), both replicas return the new images within the documented delay."""
    data = tmp_path / "data"
    replica_env = {**FAST_ENV, "DEEPFEAT_READ_ONLY": "1", "DEEPFEAT_REFRESH_INTERVAL_S": str(REFRESH_S)}

    def publish() -> None:
        subprocess.run(
            [DEEPFEAT, "build-index", "--data-dir", str(data), "--index", "IVF2,Flat", "--nprobe", "2"],
            env=clean_env(),
            check=True,
            capture_output=True,
            timeout=120,
        )

    with served(data, **FAST_ENV) as (_, writer_url), httpx.Client(base_url=writer_url, timeout=60) as writer:
        ids = {}
        for name in ("chelsea", "coffee", "rocket"):
            ids[name] = writer.post("/v1/images", files=upload(photos[name])).json()["id"]
        publish()
        with (
            served(data, **replica_env) as (_, url_a),
            served(data, **replica_env) as (_, url_b),
            httpx.Client(base_url=url_a, timeout=60) as replica_a,
            httpx.Client(base_url=url_b, timeout=60) as replica_b,
        ):
            replicas = (replica_a, replica_b)
            for replica in replicas:
                assert replica.get("/ready").json()["generation"] == 1
                _error(replica.post("/v1/images", files=upload(photos["hopper"])), 403, "read_only")
                _error(replica.delete(f"/v1/images/{ids['rocket']}"), 403, "read_only")

            def all_return(name: str, image_id: str) -> Callable[[], bool]:
                def check() -> bool:
                    with concurrent.futures.ThreadPoolExecutor(2) as pool:
                        tops = list(pool.map(lambda r: _top_id(r, photos[name]), replicas))
                    return all(top == [image_id] for top in tops)

                return check

            # Added to the writer: both replicas serve it (from their delta) within the delay.
            for name in ("hopper", "astronaut"):
                ids[name] = writer.post("/v1/images", files=upload(photos[name])).json()["id"]
                _wait_for(
                    all_return(name, ids[name]), f"{name} on both replicas", within=REFRESH_S + PICKUP_SLACK_S
                )
            # Published: both replicas switch to generation 2 without a restart and still serve everything.
            publish()
            _wait_for(
                lambda: all(r.get("/ready").json()["generation"] == 2 for r in replicas),
                "generation 2 on both replicas",
                within=REFRESH_S + PICKUP_SLACK_S,
            )
            for replica in replicas:
                stats = replica.get("/v1/stats").json()
                assert (
                    stats["count"] == 5
                    and stats["generation"]["delta"] == 0
                    and stats["generation"]["count"] == 5
                )
            for name in ids:
                assert all_return(name, ids[name])()
            # Deleted on the writer: gone from both replicas within the delay.
            assert writer.delete(f"/v1/images/{ids['coffee']}").status_code == 200
            _wait_for(
                lambda: all(ids["coffee"] not in _top_id(r, photos["coffee"], k=5) for r in replicas),
                "the deletion on both replicas",
                within=REFRESH_S + PICKUP_SLACK_S,
            )
