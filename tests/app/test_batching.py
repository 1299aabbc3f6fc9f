"""Micro-batching: concurrent requests share forward passes, results go back to the right caller,
errors reach every caller of the failed batch, and a full queue is an explicit 503."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from deepfeat.models.batching import MicroBatcher, Overloaded
from tests.app.conftest import MakeClient, upload
from tests.conftest import jpeg_bytes


def test_batches_form_under_concurrency_and_results_are_routed() -> None:
    sizes: list[int] = []

    def double(items: list[int]) -> list[int]:
        time.sleep(0.02)  # a slow "forward pass" lets others queue up
        return [2 * i for i in items]

    batcher: MicroBatcher[int, int] = MicroBatcher(
        double, max_batch=8, max_wait_s=0.01, max_queue=100, on_batch=sizes.append
    )
    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(batcher.submit, range(64)))
    batcher.close()
    assert results == [2 * i for i in range(64)]
    assert sum(sizes) == 64 and max(sizes) > 1 and max(sizes) <= 8


def test_a_failing_batch_fails_its_callers_and_the_batcher_lives_on() -> None:
    def fn(items: list[int]) -> list[int]:
        if 13 in items:
            raise ValueError("bad item")
        return items

    batcher: MicroBatcher[int, int] = MicroBatcher(fn, max_batch=1, max_wait_s=0, max_queue=10)
    with pytest.raises(ValueError, match="bad item"):
        batcher.submit(13)
    assert batcher.submit(7) == 7
    batcher.close()


def test_full_queue_raises_overloaded() -> None:
    gate = threading.Event()

    def blocked(items: list[int]) -> list[int]:
        gate.wait(5)
        return items

    batcher: MicroBatcher[int, int] = MicroBatcher(blocked, max_batch=1, max_wait_s=0, max_queue=1)
    with ThreadPoolExecutor(max_workers=3) as pool:
        first = pool.submit(batcher.submit, 1)  # taken by the worker, blocks
        time.sleep(0.1)
        second = pool.submit(batcher.submit, 2)  # waits in the queue (size 1)
        time.sleep(0.1)
        with pytest.raises(Overloaded):
            batcher.submit(3)
        gate.set()
        assert (first.result(), second.result()) == (1, 2)
    batcher.close()


def test_batched_and_direct_results_agree(make_client: MakeClient, photos: dict[str, Image.Image]) -> None:
    batched = make_client(batching=True, batch_max_wait_ms=20)
    files = [jpeg_bytes(img) for img in photos.values()]

    def embed(client: TestClient, data: bytes) -> np.ndarray:
        return np.array(client.post("/v1/embed", files=upload(data)).json()["vector"])

    with ThreadPoolExecutor(max_workers=len(files)) as pool:
        together = list(pool.map(lambda d: embed(batched, d), files))
    classes = [
        batched.post("/v1/classify", files=upload(d)).json()["predictions"][0]["class_index"]
        for d in files[:2]
    ]
    metrics = batched.get("/metrics").text
    direct = make_client(batching=False)
    for data, vector in zip(files, together, strict=True):
        assert float(embed(direct, data) @ vector) > 0.999
    assert classes == [
        direct.post("/v1/classify", files=upload(d)).json()["predictions"][0]["class_index"]
        for d in files[:2]
    ]
    assert "deepfeat_embed_batch_size_count" in metrics


def test_overloaded_is_503_with_a_code(make_client: MakeClient, photos: dict[str, Image.Image]) -> None:
    client = make_client(batching=False, max_queue=1)
    data = jpeg_bytes(photos["astronaut"].resize((1600, 1600)))
    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(lambda _: client.post("/v1/embed", files=upload(data)), range(8)))
    codes = {r.status_code for r in responses}
    assert codes == {200, 503}
    for r in responses:
        if r.status_code == 503:
            assert r.json()["code"] == "overloaded" and r.headers["retry-after"] == "1"
