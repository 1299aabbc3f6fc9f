"""Load and slow clients against the real server on loopback (bounded in count and time).

* Load: ``deepfeat serve`` as a subprocess (so its memory and file descriptors can be read from /proc)
  under concurrent uploads for a fixed time. The only error allowed is 503 ``overloaded`` when more
  images wait for the model than ``max_queue`` allows; RSS and open descriptors stay flat; after an
  oversized request (with and without Content-Length, and a huge declared length with no body) the
  server still answers a small one at once.
* Slow clients: a client trickling its *body* gets 408 ``request_timeout`` once the body deadline passes
  and its connection is closed; clients trickling *headers* (which uvicorn never times out: that
  deadline belongs to the proxy in front) and idle connections do not hold up anyone else; an idle
  keep-alive connection is closed after ``timeout_keep_alive``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import random
import socket
import statistics
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from deepfeat.app.main import create_app
from deepfeat.app.middleware import BodyLimitMiddleware
from deepfeat.settings import Settings
from tests.app import hostile as h
from tests.app.live import run_app
from tests.app.serve_proc import proc_status, served

pytestmark = pytest.mark.slow

Photos = dict[str, Image.Image]
UPLOAD_LIMIT = 1024 * 1024


def _file(data: bytes, name: str = "q.jpg") -> dict[str, Any]:
    return {"file": (name, data, "image/jpeg")}


def _raw_request(base: str, head: bytes, body: bytes = b"", *, timeout: float = 10.0) -> tuple[bytes, float]:
    """Send bytes on a fresh socket; return everything the server sent until it closed, and how long."""
    host, port = base.removeprefix("http://").split(":")
    started = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(head + body)
        chunks = []
        while True:
            try:
                data = sock.recv(65536)
            except TimeoutError:
                break
            if not data:
                break
            chunks.append(data)
            if b"\r\n\r\n" in b"".join(chunks) and b"content-length" in b"".join(chunks).lower():
                head_end = b"".join(chunks).index(b"\r\n\r\n") + 4
                headers = b"".join(chunks)[:head_end].lower()
                length = int(headers.split(b"content-length:")[1].split(b"\r\n")[0])
                if len(b"".join(chunks)) >= head_end + length:
                    break
    return b"".join(chunks), time.monotonic() - started


# ====================================================================================== load


@pytest.fixture(scope="module")
def upload_images(photos: Photos) -> list[bytes]:
    return [
        h.encode(h.variant(p, i).resize((320, 240)), quality=85) for i in range(12) for p in photos.values()
    ]


def test_concurrent_uploads_for_a_fixed_time(
    tmp_path: Path, upload_images: list[bytes], photos: Photos
) -> None:
    clients, duration = 12, 15.0
    # One scale, as this test has always run: it measures leaks, not the multi-scale allocator churn.
    env = {"DEEPFEAT_MAX_QUEUE": "4", "DEEPFEAT_MAX_UPLOAD_BYTES": str(UPLOAD_LIMIT), "DEEPFEAT_SCALES": "1"}
    with served(tmp_path / "data", **env) as (proc, base):
        with httpx.Client(base_url=base, timeout=30) as http:  # warm the model and the thread pool
            for data in upload_images[:4]:
                assert http.post("/v1/search", files=_file(data)).status_code == 200
        _, fds_before = proc_status(proc.pid)

        statuses: Counter[tuple[str, int, str]] = Counter()
        failures: list[str] = []
        lock = threading.Lock()
        counter = itertools.count()
        stop_at = time.monotonic() + duration

        def client(seed: int) -> None:
            rng = random.Random(seed)
            with httpx.Client(base_url=base, timeout=60) as http:
                while time.monotonic() < stop_at:
                    data = upload_images[next(counter) % len(upload_images)]
                    route = rng.choices(
                        ["/v1/search?k=5", "/v1/images", "/v1/embed", "/v1/classify"], [5, 3, 1, 1]
                    )[0]
                    try:
                        resp = http.post(route, files=_file(data))
                    except httpx.HTTPError as exc:
                        with lock:
                            failures.append(f"{route}: {type(exc).__name__}: {exc}")
                        continue
                    code = resp.json().get("code", "") if resp.status_code >= 400 else ""
                    with lock:
                        statuses[(route.split("?")[0], resp.status_code, code)] += 1

        samples: list[tuple[float, int, int]] = []
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            futures = [pool.submit(client, i) for i in range(clients)]
            while not all(f.done() for f in futures):
                rss, fds = proc_status(proc.pid)
                samples.append((time.monotonic() - started, rss, fds))
                time.sleep(0.5)
            for f in futures:
                f.result()
        time.sleep(1.0)
        rss_after, fds_after = proc_status(proc.pid)

        assert not failures, failures[:5]
        unexpected = {
            k: v for k, v in statuses.items() if k[1] not in (200, 201) and k[1:] != (503, "overloaded")
        }
        assert not unexpected, (unexpected, statuses)
        ok = sum(v for k, v in statuses.items() if k[1] in (200, 201))
        assert ok >= 20, statuses  # it did real work, not just refuse
        # Memory: flat once warm. RSS swings by a batch's tensors from one sample to the next, so the
        # trend is the median of the last third against the median of the middle third.
        warm = [rss for t, rss, _ in samples if duration / 3 <= t <= 2 * duration / 3]
        late = [rss for t, rss, _ in samples if t > 2 * duration / 3] + [rss_after]
        assert len(warm) >= 3 and len(late) >= 3
        growth = statistics.median(late) - statistics.median(warm)
        assert growth < 64 * 2**20, (
            f"anonymous memory grew {growth / 2**20:.0f} MiB under steady load: {samples}"
        )
        assert max(rss for _, rss, _ in samples) < min(warm) + 512 * 2**20, samples  # and peaks are bounded
        # File descriptors: bounded while loaded (a socket per client, a SQLite connection of three files
        # per worker thread in use), and back to the start once the idle worker threads retire: anyio
        # stops workers idle for 10 s when the next job comes, and their connections must go with them.
        assert max(fds for _, _, fds in samples) <= fds_before + 4 * clients + 16, samples
        assert fds_after <= max(fds for _, _, fds in samples), (fds_after, samples)
        settled = _after_idle_workers_retire(base, proc.pid)
        # A second round: its worker threads are new ones (the old retired), and yet nothing accumulates.
        # (SQLite keeps a closed connection's database descriptor for reuse while other connections of
        # the process hold locks on the file, so "settled" is a plateau, not the pre-load count.)
        stop_at = time.monotonic() + 5
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            for f in [pool.submit(client, 100 + i) for i in range(clients)]:
                f.result()
        assert not failures, failures[:5]
        again = _after_idle_workers_retire(base, proc.pid)
        assert again <= settled + 3, (fds_before, settled, again)
        assert settled <= fds_before + 3 * clients + 8, (fds_before, settled)

        # The server still answers a small request right after oversized ones.
        big = h.body_of_exact_size(h.encode(photos["astronaut"]), UPLOAD_LIMIT + 1)
        with httpx.Client(base_url=base, timeout=30) as http:
            headers = h.multipart_headers(big)
            resp = http.post("/v1/search", content=big, headers=headers)
            assert resp.status_code == 413 and resp.json()["code"] == "payload_too_large"
            chunked = http.post(
                "/v1/search",
                content=iter([big[i : i + 65536] for i in range(0, len(big), 65536)]),
                headers=h.multipart_headers(),
            )
            assert chunked.status_code == 413 and chunked.json()["code"] == "payload_too_large"
        # A huge declared length and no body at all: refused before reading, at once.
        reply, took = _raw_request(
            base,
            b"POST /v1/search HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary="
            + h.BOUNDARY.encode()
            + b"\r\nContent-Length: 100000000000\r\n\r\n",
            timeout=10,
        )
        assert reply.startswith(b"HTTP/1.1 413") and b"payload_too_large" in reply and took < 5, (
            reply[:200],
            took,
        )
        with httpx.Client(base_url=base, timeout=10) as http:
            t0 = time.monotonic()
            small = http.post("/v1/search?k=1", files=_file(h.encode(photos["rocket"].resize((96, 64)))))
            assert small.status_code == 200 and time.monotonic() - t0 < 5
            assert http.get("/health").status_code == 200


def _after_idle_workers_retire(base: str, pid: int) -> int:
    """Open descriptors once the thread pool's workers have been idle for over 10 s and a job came."""
    time.sleep(11)
    with httpx.Client(base_url=base, timeout=30) as http:
        assert http.get("/v1/stats").status_code == 200
    time.sleep(0.5)
    return proc_status(pid)[1]


def test_burst_over_the_queue_limit_is_503_overloaded(tmp_path: Path, upload_images: list[bytes]) -> None:
    """More images waiting for the model than max_queue: the excess is refused at once, never queued
    without bound; everything else succeeds."""
    with served(tmp_path / "data", DEEPFEAT_MAX_QUEUE="1", DEEPFEAT_BATCH_MAX_SIZE="1") as (_, base):
        big = [
            h.encode(Image.open(__import__("io").BytesIO(d)).resize((1600, 1200)), quality=95)
            for d in upload_images[:6]
        ]

        def one(data: bytes) -> tuple[int, str, str | None]:
            with httpx.Client(base_url=base, timeout=120) as http:
                resp = http.post("/v1/embed", files=_file(data))
                code = resp.json().get("code", "") if resp.status_code >= 400 else ""
                return resp.status_code, code, resp.headers.get("retry-after")

        with concurrent.futures.ThreadPoolExecutor(24) as pool:
            results = list(pool.map(one, [big[i % len(big)] for i in range(48)]))
        counts = Counter((status, code) for status, code, _ in results)
        assert set(counts) <= {(200, ""), (503, "overloaded")}, counts
        assert counts[(200, "")] > 0 and counts[(503, "overloaded")] > 0, counts
        assert all(retry for status, _, retry in results if status == 503)


# ====================================================================================== slow clients


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The app under uvicorn with a 2 s body deadline (the production default is 60 s)."""
    settings = Settings(data_dir=tmp_path_factory.mktemp("slow") / "data", max_upload_bytes=UPLOAD_LIMIT)
    if "body_timeout_s" in Settings.model_fields:
        settings = settings.model_copy(update={"body_timeout_s": 2.0})
    app = create_app(settings)
    for middleware in app.user_middleware:  # until a setting reaches it, adjust the middleware directly
        if middleware.cls is BodyLimitMiddleware:
            middleware.kwargs["body_timeout_s"] = 2.0
    with run_app(app, timeout_keep_alive=2) as base:
        yield base


def _others_are_served(base: str, photos: Photos, seconds: float) -> list[float]:
    """Normal requests during ``seconds``: each must be answered promptly; returns their latencies."""
    latencies = []
    query = h.encode(photos["coffee"].resize((160, 120)))
    end = time.monotonic() + seconds
    with httpx.Client(base_url=base, timeout=10) as http:
        while time.monotonic() < end:
            t0 = time.monotonic()
            assert http.get("/health").status_code == 200
            assert http.post("/v1/search?k=1", files=_file(query)).status_code == 200
            latencies.append(time.monotonic() - t0)
            time.sleep(0.1)
    return latencies


def test_trickled_body_gets_408_and_is_closed_without_holding_up_others(
    slow_server: str, photos: Photos
) -> None:
    host, port = slow_server.removeprefix("http://").split(":")
    body = h.file_body(h.encode(photos["chelsea"]))
    head = (
        b"POST /v1/search HTTP/1.1\r\nHost: x\r\n"
        + f"Content-Type: multipart/form-data; boundary={h.BOUNDARY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    )
    tricklers = []
    for _ in range(8):
        sock = socket.create_connection((host, int(port)), timeout=15)
        sock.sendall(head + body[:100])
        tricklers.append(sock)
    started = time.monotonic()
    stop = threading.Event()

    def trickle() -> None:
        pos = 100
        while not stop.is_set() and pos < len(body):
            for sock in tricklers:
                with contextlib.suppress(OSError):
                    sock.sendall(body[pos : pos + 1])
            pos += 1
            time.sleep(0.05)

    feeder = threading.Thread(target=trickle)
    feeder.start()
    try:
        latencies = _others_are_served(slow_server, photos, 1.5)
        assert max(latencies) < 2.0, latencies
        for sock in tricklers:
            reply = b""
            while chunk := sock.recv(65536):  # the server answers, then closes (recv -> b"")
                reply += chunk
            took = time.monotonic() - started
            assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
            assert b"request_timeout" in reply and b"connection: close" in reply.lower()
            assert 1.5 < took < 8, took
    finally:
        stop.set()
        feeder.join()
        for sock in tricklers:
            sock.close()
    assert max(_others_are_served(slow_server, photos, 0.5)) < 2.0


def test_trickled_headers_and_idle_connections_do_not_hold_up_others(
    slow_server: str, photos: Photos
) -> None:
    """uvicorn has no header-read timeout (and none before the first byte), so these connections stay
    open until the client goes: the proxy in front must cut them (nginx ``client_header_timeout``).
    What the service guarantees is that they cost a socket each and block nobody."""
    host, port = slow_server.removeprefix("http://").split(":")
    socks = []
    try:
        for i in range(40):
            sock = socket.create_connection((host, int(port)), timeout=5)
            if i % 2:
                sock.sendall(b"POST /v1/search HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            socks.append(sock)
        stop = threading.Event()

        def drip() -> None:
            while not stop.is_set():
                for sock in socks[1::2]:
                    with contextlib.suppress(OSError):
                        sock.sendall(b"a")
                time.sleep(0.1)

        dripper = threading.Thread(target=drip)
        dripper.start()
        try:
            latencies = _others_are_served(slow_server, photos, 3.0)
        finally:
            stop.set()
            dripper.join()
        assert len(latencies) >= 5 and max(latencies) < 2.0, latencies
    finally:
        for sock in socks:
            sock.close()


def test_idle_keep_alive_connection_is_closed(slow_server: str) -> None:
    host, port = slow_server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = sock.recv(65536)
        assert reply.startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        assert sock.recv(65536) == b""  # closed by the server after timeout_keep_alive (2 s here)
        assert 1.0 < time.monotonic() - started < 6.0
