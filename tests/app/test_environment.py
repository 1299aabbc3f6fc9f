"""The service when the data dir's environment fails: a lock another process holds, a network filesystem.

Both answer 503 with the reason and never 500; a server started while a stopped process holds the
store's lock becomes ready by itself once that process lets go.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from deepfeat.app import main as app_main
from deepfeat.app.errors import install_error_handlers
from deepfeat.app.main import create_app
from deepfeat.index import _fs
from deepfeat.index.errors import NetworkFilesystemError, StoreLockedError
from deepfeat.index.store import LOCK_FILE
from deepfeat.settings import Settings
from tests.app.conftest import FAST, MakeClient, expect_error, upload
from tests.index.test_fs import held_lock, mountinfo_with


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (StoreLockedError("locked by pid 12", holder_pid=12), "store_locked"),
        (NetworkFilesystemError("/srv/data is on nfs4"), "network_filesystem"),
    ],
)
def test_a_request_that_meets_the_error_gets_503_with_its_code(error: Exception, code: str) -> None:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/boom")
    def boom() -> None:
        raise error

    with TestClient(app, raise_server_exceptions=False) as client:
        body = expect_error(client.get("/boom"), 503, code)
        assert body["detail"] == str(error)


def test_a_server_started_beside_a_stopped_lock_holder_is_not_ready_until_it_lets_go(
    tmp_path: Path, make_client: MakeClient, photos: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app_main, "OPEN_RETRY_S", 0.2)
    data_dir = tmp_path / "data"
    with held_lock(data_dir / LOCK_FILE) as holder:
        client = make_client(lock_timeout_s=0.3)
        ready = client.get("/ready")
        assert ready.status_code == 503
        detail = ready.json()["detail"]
        assert detail.startswith("store_locked: ") and f"pid {holder.pid}" in detail and "stopped" in detail
        body = expect_error(client.post("/v1/search", files=upload(photos["coffee"])), 503, "not_ready")
        assert "store_locked" in body["detail"]
        assert client.get("/health").status_code == 200
    deadline = time.monotonic() + 30
    while client.get("/ready").status_code != 200:  # the holder is gone: the retry opens the store
        assert time.monotonic() < deadline, client.get("/ready").json()
        time.sleep(0.1)
    assert client.post("/v1/images", files=upload(photos["coffee"])).status_code == 201
    assert client.get("/v1/stats").json()["count"] == 1


def test_a_writer_on_a_network_filesystem_is_not_ready_and_a_read_only_server_serves_a_copy(
    tmp_path: Path, make_client: MakeClient, photos: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    table = mountinfo_with(tmp_path, "nfs4")
    with TestClient(create_app(Settings(data_dir=tmp_path / "data", **FAST))) as writer:
        assert writer.post("/v1/images", files=upload(photos["rocket"])).status_code == 201
        # The same data dir seen over NFS: a second writer is refused; a replica is refused while the
        # writer has the store open (its newest rows are in the write-ahead log).
        monkeypatch.setattr(_fs, "read_mountinfo", lambda: table)
        refused = make_client()
        ready = refused.get("/ready")
        assert ready.status_code == 503 and ready.json()["detail"].startswith("network_filesystem: ")
        expect_error(refused.post("/v1/images", files=upload(photos["coffee"])), 503, "not_ready")
        replica = make_client(read_only=True)
        assert replica.get("/ready").json()["detail"].startswith("network_filesystem: ")
        monkeypatch.undo()
    # The writer stopped: what is left is a copy nobody writes, which a replica there may serve.
    monkeypatch.setattr(_fs, "read_mountinfo", lambda: table)
    copy = make_client(read_only=True)
    assert copy.get("/ready").status_code == 200
    hits = copy.post("/v1/search?k=1", files=upload(photos["rocket"])).json()["results"]
    assert hits and hits[0]["score"] > 0.99
