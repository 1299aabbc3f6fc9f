"""Run the real server (uvicorn) on a free loopback port in a background thread, and wait for a server
(thread or process) to answer ``/ready``."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import uvicorn

from deepfeat.app.main import create_app
from deepfeat.settings import Settings


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(base: str, *, alive: Callable[[], None] | None = None, timeout: float = 120.0) -> None:
    """Return once ``base``/ready answers 200; ``alive`` raises when the server has died meanwhile.

    Raises:
        RuntimeError: Not ready within ``timeout`` seconds (with the last answer, or why there was none).
    """
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        if alive is not None:
            alive()
        try:
            resp = httpx.get(f"{base}/ready", timeout=2)
            if resp.status_code == 200:
                return
            last = f"{resp.status_code} {resp.text}"
        except httpx.TransportError as exc:
            last = repr(exc)
        if time.monotonic() > deadline:
            raise RuntimeError(f"server on {base} did not become ready in {timeout:.0f} s ({last})")
        time.sleep(0.1)


@contextmanager
def run_app(app: Any, *, ready_timeout: float = 60.0, **config: Any) -> Iterator[str]:
    """Run ``app`` under uvicorn in a thread on a loopback port (``config``: more ``uvicorn.Config``
    options); yields the base URL once /ready answers 200; stops the server on exit."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **config))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"

    def alive() -> None:
        if not thread.is_alive():
            raise RuntimeError(f"the server on {base} exited before it was ready")

    try:
        wait_ready(base, alive=alive, timeout=ready_timeout)
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextmanager
def live_server(settings: Settings, *, ready_timeout: float = 60.0) -> Iterator[str]:
    """The app of ``settings`` (lifespan and all) under :func:`run_app`; yields the base URL."""
    with run_app(create_app(settings), ready_timeout=ready_timeout) as base:
        yield base
