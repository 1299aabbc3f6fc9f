"""``deepfeat serve --engine ray``: a local Ray cluster runs the Serve app (2 search replicas and the
writer) on published generations; one app for the whole module, the model loaded once per process."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray
from PIL import Image
from ray import serve

from deepfeat.app.ray_serve import RayServeOptions, build_application
from deepfeat.index.publish import FILES_FILE, LATEST_FILE, latest, publication_name
from deepfeat.settings import Settings
from tests.app.conftest import FAST, upload
from tests.conftest import jpeg_bytes

pytestmark = pytest.mark.slow

REFRESH_S = 0.3
VISIBLE_WITHIN_S = REFRESH_S + 15.0
"""The documented delay after a publish returns (docs/deployment.md): the refresh interval plus the
fetch, checks and opening of the new generation, with room for a busy 2-core machine."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("serve-ray")
    data_dir, generations = root / "writer" / "data", root / "published"
    port = _free_port()
    settings = Settings(data_dir=data_dir, refresh_interval_s=REFRESH_S, **FAST)  # type: ignore[arg-type]
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        options = RayServeOptions(
            settings=settings,
            generations=f"file://{generations}",
            replicas=2,
            publish_interval_s=0,
            replica_cpus=1,
        )
        serve.run(build_application(options), name="deepfeat", route_prefix="/")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            yield {"client": client, "data_dir": data_dir, "generations": generations}
    finally:
        serve.shutdown()
        ray.shutdown()


def _search(client: httpx.Client, image: Image.Image) -> httpx.Response:
    return client.post("/v1/search?k=1", files=upload(jpeg_bytes(image, scale=0.5)))


def _replica_pids(client: httpx.Client, photo: Image.Image, *, within: float = 60) -> dict[str, int]:
    """Search replicas by the name they report (``X-Deepfeat-Replica``: id@host:pid) until two answered."""
    seen: dict[str, int] = {}

    def check() -> bool:
        resp = _search(client, photo)
        if resp.status_code == 200:
            name = resp.headers["x-deepfeat-replica"]
            seen[name] = int(name.rsplit(":", 1)[1])
        return len(seen) >= 2

    _until(check, "answers from two replicas", within=within)
    return seen


def _until(check: Callable[[], bool], what: str, *, within: float) -> float:
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < within, f"{what} not seen within {within:.1f} s"
        time.sleep(0.1)
    return time.monotonic() - started


def _publish(client: httpx.Client) -> int:
    resp = client.post("/v1/admin/publish")
    assert resp.status_code == 200, resp.text
    return int(resp.json()["number"])


def _both_replicas_return(client: httpx.Client, image: Image.Image, image_id: str, *, within: float) -> float:
    """Poll searches until two distinct replicas returned ``image_id`` first."""
    seen: set[str] = set()

    def check() -> bool:
        resp = _search(client, image)
        assert resp.status_code == 200, resp.text
        hits = resp.json()["results"]
        if hits and hits[0]["id"] == image_id:
            seen.add(resp.headers["x-deepfeat-replica"])
        return len(seen) >= 2

    return _until(check, f"{image_id} on both replicas", within=within)


def test_add_then_publish_reaches_both_replicas(
    cluster: dict[str, Any], photos: dict[str, Image.Image]
) -> None:
    client = cluster["client"]
    ids = {}
    for name in ("chelsea", "coffee", "rocket"):
        resp = client.post("/v1/images", files=upload(photos[name]), data={"source": name})
        assert resp.status_code == 201, resp.text  # a replica forwarded it to the writer
        ids[name] = resp.json()["id"]
    again = client.post("/v1/images", files=upload(photos["coffee"]))
    assert again.status_code == 200 and again.json()["id"] == ids["coffee"]  # the writer's dedup answer
    unknown = client.delete("/v1/images/" + "0" * 32)
    assert unknown.status_code == 404 and unknown.json()["code"] == "not_found"  # the writer's error
    assert client.post("/v1/search").json()["code"] == "invalid_request"  # a replica's own 422

    before = int(_search(client, photos["coffee"]).headers["x-deepfeat-generation"])
    # Searches keep coming while the replicas switch: none may fail.
    answers: list[int] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=str(client.base_url), timeout=60) as other:
            while not stop.is_set():
                answers.append(_search(other, photos["rocket"]).status_code)

    loader = threading.Thread(target=load)
    loader.start()
    try:
        number = _publish(client)
        assert number > before
        took = _both_replicas_return(client, photos["coffee"], ids["coffee"], within=VISIBLE_WITHIN_S)
        time.sleep(1.0)
    finally:
        stop.set()
        loader.join(60)
    assert answers and set(answers) == {200}, answers
    stats = client.get("/v1/stats").json()
    assert stats["read_only"] is True and stats["count"] == 3
    print(f"visible on both replicas {took:.2f} s after the publish returned")


def test_replicas_never_open_the_writer_data_dir(cluster: dict[str, Any]) -> None:
    data_dir = cluster["data_dir"].resolve()
    generations = cluster["generations"].resolve()
    stats = cluster["client"].get("/v1/stats").json()
    assert Path(stats["data_dir"]).resolve().parent == generations
    pids = _replica_pids(cluster["client"], Image.new("RGB", (64, 64), "red"))
    assert len(pids) == 2
    for pid in pids.values():
        opened = [os.path.realpath(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        mapped = [line.split(maxsplit=5)[-1] for line in Path(f"/proc/{pid}/maps").read_text().splitlines()]
        paths = [p for p in opened + mapped if p.startswith("/")]
        assert not [p for p in paths if p.startswith(str(data_dir))], paths
        assert [p for p in paths if p.startswith(str(generations))]  # the published catalog copy


def test_a_corrupted_generation_is_refused_and_the_previous_one_served(
    cluster: dict[str, Any], photos: dict[str, Image.Image]
) -> None:
    client, generations = cluster["client"], cluster["generations"]
    good = _publish(client)
    _until(
        lambda: all(
            _search(client, photos["rocket"]).headers["x-deepfeat-generation"] == str(good) for _ in range(4)
        ),
        f"generation {good} everywhere",
        within=VISIBLE_WITHIN_S,
    )
    # A generation whose catalog copy has one flipped byte, made current by LATEST.
    bad = good + 1
    shutil.copytree(generations / publication_name(good), generations / publication_name(bad))
    catalog = generations / publication_name(bad) / "catalog.sqlite3"
    with open(catalog, "r+b") as fh:
        fh.seek(catalog.stat().st_size // 2)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0x40]))
    files_sha = hashlib.sha256((generations / publication_name(bad) / FILES_FILE).read_bytes()).hexdigest()
    (generations / LATEST_FILE).write_text(json.dumps({"number": bad, "sha256": files_sha}))
    assert latest(generations) == {"number": bad, "sha256": files_sha}
    time.sleep(REFRESH_S * 10)
    for _ in range(6):
        resp = _search(client, photos["rocket"])
        assert resp.status_code == 200 and resp.headers["x-deepfeat-generation"] == str(good)
        assert resp.json()["results"][0]["source"] == "rocket"
    # The next good publish is taken up.
    fixed = _publish(client)
    assert fixed == bad + 1
    _until(
        lambda: all(
            _search(client, photos["rocket"]).headers["x-deepfeat-generation"] == str(fixed) for _ in range(4)
        ),
        f"generation {fixed} everywhere",
        within=VISIBLE_WITHIN_S,
    )


def test_a_killed_replica_is_restarted_and_clients_retrying_on_503_see_nothing_else(
    cluster: dict[str, Any], photos: dict[str, Image.Image]
) -> None:
    client = cluster["client"]
    before = _replica_pids(client, photos["chelsea"])
    victim_name, victim = sorted(before.items())[0]
    os.kill(victim, signal.SIGKILL)
    statuses: dict[int, int] = {}
    replacement = None
    started = time.monotonic()
    while time.monotonic() - started < 120 and replacement is None:
        resp = _search(client, photos["chelsea"])
        statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
        assert resp.status_code in (200, 503), (resp.status_code, resp.text)
        if resp.status_code == 503:
            time.sleep(0.2)
            continue
        assert resp.json()["results"][0]["source"] == "chelsea"
        name = resp.headers["x-deepfeat-replica"]
        assert name != victim_name
        if name not in before:
            replacement = name
    assert replacement is not None, f"no replacement replica answered within 120 s; answers {statuses}"
    print(f"answers while a replica was replaced ({time.monotonic() - started:.1f} s): {statuses}")


def test_serve_batcher_gathers_concurrent_requests_and_bounds_the_queue(cluster: dict[str, Any]) -> None:
    """The replicas' batcher, inside a Serve replica (``@serve.batch`` needs one): items submitted
    from many threads share batches of up to ``max_batch``; a full queue answers Overloaded."""

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class BatcherCheck:
        async def run(self) -> dict[str, Any]:
            import asyncio
            import threading
            from concurrent.futures import ThreadPoolExecutor

            from deepfeat.app.ray_serve import ServeBatcher
            from deepfeat.models.errors import Overloaded

            sizes: list[int] = []
            gate = threading.Event()

            def double(items: list[int]) -> list[int]:
                gate.wait(5)
                return [2 * i for i in items]

            batcher = ServeBatcher(
                double,
                loop=asyncio.get_running_loop(),
                max_batch=4,
                max_wait_s=0.2,
                max_queue=8,
                on_batch=sizes.append,
            )
            with ThreadPoolExecutor(8) as pool:
                futures = [pool.submit(batcher.submit_many, [i]) for i in range(8)]
                await asyncio.sleep(0.5)  # all eight wait in the queue: it is full
                try:
                    await asyncio.to_thread(batcher.submit_many, [99])
                    overloaded = False
                except Overloaded:
                    overloaded = True
                gate.set()
                results = [await asyncio.wrap_future(f) for f in futures]
            more = await asyncio.to_thread(batcher.submit_many, [5, 6])
            return {"results": results, "sizes": sizes, "overloaded": overloaded, "more": more}

    handle = serve.run(BatcherCheck.bind(), name="batcher-check", route_prefix="/batcher-check")
    try:
        out = handle.run.remote().result(timeout_s=60)
    finally:
        serve.delete("batcher-check")
    assert out["results"] == [[2 * i] for i in range(8)] and out["more"] == [10, 12]
    assert out["overloaded"] is True
    assert sum(out["sizes"]) == 10 and max(out["sizes"]) == 4  # batches of up to max_batch


def _writer_pids() -> list[int]:
    """Processes Ray titled ``ray::ServeReplica:deepfeat:Writer`` (this machine is the whole cluster)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if title.startswith(b"ray::ServeReplica:deepfeat:Writer"):
            pids.append(int(entry.name))
    return pids


def test_a_killed_writer_is_restarted_and_loses_nothing_acknowledged(
    cluster: dict[str, Any], photos: dict[str, Image.Image]
) -> None:
    client = cluster["client"]
    count = client.get("/v1/stats").json()["count"]
    (writer,) = _writer_pids()
    os.kill(writer, signal.SIGKILL)
    started = time.monotonic()
    # Searches go on from the replicas' generation while the writer is down.
    for _ in range(3):
        assert _search(client, photos["rocket"]).status_code == 200
    statuses: dict[int, int] = {}
    while True:
        resp = client.post("/v1/images", files=upload(photos["hopper"]), data={"source": "hopper"})
        statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
        if resp.status_code != 503:
            break
        assert resp.json()["code"] == "writer_unavailable"
        assert time.monotonic() - started < 120, statuses
        time.sleep(0.5)
    assert resp.status_code == 201, resp.text
    assert _writer_pids() not in ([], [writer])
    number = _publish(client)
    _both_replicas_return(client, photos["hopper"], resp.json()["id"], within=VISIBLE_WITHIN_S)
    checked = 0
    for _ in range(8):
        stats = client.get("/v1/stats")
        if stats.headers["x-deepfeat-generation"] == str(number):
            assert stats.json()["count"] == count + 1
            checked += 1
    assert checked
    print(
        f"write accepted {time.monotonic() - started:.1f} s after the writer was killed; answers {statuses}"
    )
