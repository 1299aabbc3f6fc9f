"""``deepfeat serve`` as a real subprocess (for SIGKILL, RSS and open-file measurements). The in-process
runners (:func:`~tests.app.live.run_app`, :func:`~tests.app.live.live_server`) are in ``tests.app.live``."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.app.live import free_port, wait_ready

DEEPFEAT = str(Path(sys.executable).with_name("deepfeat"))


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any DEEPFEAT_ setting of the caller's, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEEPFEAT_")}
    env.update({"OMP_NUM_THREADS": "2", **extra})
    return env


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


def proc_status(pid: int) -> tuple[int, int]:
    """(anonymous resident memory in bytes, open file descriptors) of a process, from /proc.

    Anonymous memory (RssAnon) is what a leak grows. The file-backed part of the RSS also grows when
    a route first runs code of a shared library not touched before, and the kernel drops those pages
    under pressure: not a leak."""
    rss = 0
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                rss = int(line.split()[1]) * 1024
    return rss, len(os.listdir(f"/proc/{pid}/fd"))
