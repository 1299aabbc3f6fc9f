"""``deepfeat serve`` as a real subprocess (for SIGKILL, RSS and open-file measurements), and an in-process
uvicorn runner for an app object the test has adjusted."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from tests.app.live import free_port

DEEPFEAT = str(Path(sys.executable).with_name("deepfeat"))


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any DEEPFEAT_ setting of the caller's, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEEPFEAT_")}
    env.update({"OMP_NUM_THREADS": "2", **extra})
    return env


def wait_ready(base: str, *, alive: Any = None, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if alive is not None:
            alive()
        try:
            if httpx.get(f"{base}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"server on {base} did not become ready in {timeout:.0f} s")
        time.sleep(0.1)


@contextmanager
def served(
    data_dir: Path, *, port: int | None = None, **env: str
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """``deepfeat serve`` on a loopback port; yields (process, base URL) once /ready answers 200."""
    port = port or free_port()
    proc = subprocess.Popen(
        [DEEPFEAT, "serve", "--data-dir", str(data_dir), "--port", str(port), "--log-level", "warning"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(**env),
    )
    base = f"http://127.0.0.1:{port}"

    def alive() -> None:
        if proc.poll() is not None:
            raise RuntimeError(
                f"server exited ({proc.returncode}): {proc.stderr.read() if proc.stderr else ''}"
            )

    try:
        wait_ready(base, alive=alive)
        yield proc, base
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


@contextmanager
def run_app(app: Any, **config: Any) -> Iterator[str]:
    """Run ``app`` under uvicorn in a thread on a loopback port; yields the base URL once ready."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **config))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, timeout=60)
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def proc_status(pid: int) -> tuple[int, int]:
    """(resident set size in bytes, open file descriptors) of a process, from /proc."""
    rss = 0
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
    return rss, len(os.listdir(f"/proc/{pid}/fd"))
