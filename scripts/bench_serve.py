"""Serving benchmark: the real server, driven from loopback by N concurrent clients, with
micro-batching on and off in the same run.

Each configuration starts ``deepfeat serve`` as its own process on a free loopback port, indexes a
few real photos, then every client sends search requests (real photos, re-encoded) back to back for
a fixed number of requests or seconds, whichever ends first. Reports throughput and p50/p99 latency
and the batched/unbatched ratios.

    deepfeat bench serve --clients 8 --requests 200
    deepfeat bench serve --clients 1,8
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from deepfeat.scripts.bench_common import begin, echo
from deepfeat.scripts.bench_machine import machine

__all__ = ["main", "drive"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _queries() -> list[bytes]:
    import skimage.data
    from PIL import Image

    out = []
    for name in ("chelsea", "coffee", "rocket", "astronaut"):
        buf = io.BytesIO()
        Image.fromarray(getattr(skimage.data, name)()).save(buf, "JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def drive(
    base: str, *, clients: int, requests: int, seconds: float, route: str = "/v1/search?k=5"
) -> dict[str, Any]:
    """Closed-loop load: ``clients`` threads, each sending its next request when the last returns."""
    import httpx

    payloads = _queries()
    latencies: list[float] = []
    errors: dict[int, int] = {}
    lock = threading.Lock()
    remaining = [requests]
    deadline = time.monotonic() + seconds

    def worker(index: int) -> None:
        # trust_env=False: loopback traffic must never go through an HTTP(S)_PROXY from the environment
        with httpx.Client(base_url=base, timeout=120, trust_env=False) as http:
            i = index
            while True:
                with lock:
                    if remaining[0] <= 0 or time.monotonic() > deadline:
                        return
                    remaining[0] -= 1
                data = payloads[i % len(payloads)]
                i += 1
                started = time.perf_counter()
                resp = http.post(route, files={"file": ("q.jpg", data, "image/jpeg")})
                elapsed = time.perf_counter() - started
                with lock:
                    if resp.status_code == 200:
                        latencies.append(elapsed)
                    else:
                        errors[resp.status_code] = errors.get(resp.status_code, 0) + 1

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    latencies.sort()

    def pct(p: float) -> float:
        return (
            latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000 if latencies else float("nan")
        )

    return {
        "clients": clients,
        "ok": len(latencies),
        "errors": errors,
        "req_s": round(len(latencies) / wall, 2),
        "p50_ms": round(pct(0.50), 1),
        "p99_ms": round(pct(0.99), 1),
        "mean_ms": round(statistics.fmean(latencies) * 1000, 1) if latencies else None,
    }


def _serve(data_dir: Path, port: int, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable,
        "-m",
        "deepfeat.scripts.cli",
        "serve",
        "--data-dir",
        str(data_dir),
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    with log.open("wb") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=out)


def _wait_ready(base: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 180) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{base}/ready", timeout=2, trust_env=False).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-3000:]
    raise RuntimeError(f"server at {base} did not become ready (exit code {proc.poll()}); its log:\n{tail}")


def run_config(
    *, batching: bool, clients: list[int], requests: int, seconds: float, extra_env: dict[str, str]
) -> list[dict[str, Any]]:
    import httpx

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        port = _free_port()
        env = {**os.environ, **extra_env, "DEEPFEAT_BATCHING": "true" if batching else "false"}
        log = Path(tmp) / "server.log"
        proc = _serve(Path(tmp) / "data", port, env, log)
        base = f"http://127.0.0.1:{port}"
        try:
            _wait_ready(base, proc, log)
            for data in _queries():
                httpx.post(
                    f"{base}/v1/images",
                    files={"file": ("p.jpg", data, "image/jpeg")},
                    timeout=60,
                    trust_env=False,
                )
            drive(base, clients=2, requests=8, seconds=30)  # warm-up: first-call costs out of the figures
            for n in clients:
                row = drive(base, clients=n, requests=requests, seconds=seconds)
                row["batching"] = batching
                rows.append(row)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="deepfeat bench serve",
        description=(__doc__ or "").split("\n\n")[0].replace("``", "`"),
    )
    parser.add_argument("--clients", default="1,8", help="concurrent clients to test, e.g. 1,8")
    parser.add_argument("--requests", type=int, default=160, help="requests per client count (default 160)")
    parser.add_argument("--seconds", type=float, default=60, help="time limit per client count (default 60)")
    parser.add_argument("--precision", default=None, help="DEEPFEAT_PRECISION for the server")
    parser.add_argument("--json", type=Path)
    args = begin(parser, argv)
    clients = [int(c) for c in args.clients.split(",") if c]
    env = {"DEEPFEAT_PRECISION": args.precision} if args.precision else {}
    rows: list[dict[str, Any]] = []
    for batching in (False, True):
        rows += run_config(
            batching=batching, clients=clients, requests=args.requests, seconds=args.seconds, extra_env=env
        )
    header = f"{'batching':<9} {'clients':>7} {'ok':>5} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}  errors"
    echo(header)
    for row in rows:
        echo(
            f"{row['batching']!s:<9} {row['clients']:>7} {row['ok']:>5} {row['req_s']:>8} {row['p50_ms']:>8} "
            f"{row['p99_ms']:>8}  {row['errors'] or ''}"
        )
    ratios = {}
    for n in clients:
        off = next(r for r in rows if r["clients"] == n and not r["batching"])
        on = next(r for r in rows if r["clients"] == n and r["batching"])
        ratios[n] = {
            "throughput_ratio": round(on["req_s"] / off["req_s"], 2) if off["req_s"] else None,
            "p99_ratio": round(on["p99_ms"] / off["p99_ms"], 2) if off["p99_ms"] else None,
        }
        echo(
            f"{n} clients: batching gives {ratios[n]['throughput_ratio']}x throughput, p99 x{ratios[n]['p99_ratio']}"
        )
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "rows": rows, "ratios": ratios}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
