"""Ray Serve benchmark: search throughput of ``deepfeat serve --engine ray`` with 1 and 2 replicas,
against plain ``deepfeat serve`` on the same machine, in one run.

Each configuration starts its server as its own process on a free loopback port (the Ray ones start
a local Ray cluster of their own), adds a few real photos, publishes (Ray: ``POST
/v1/admin/publish``, then waits until the replicas serve it), warms up, then drives the same closed
loop as ``deepfeat bench serve`` (N clients, each sending its next search when the last returns).
Every configuration gets the whole machine: plain ``serve`` uses all cores, a single Ray replica
reserves all cores and two replicas half each, so the ratios measure Ray Serve's overhead (proxy,
handle, one more hop) and what a second replica adds on one host, not a change in compute. With
``--rounds N`` the three configurations run N times, interleaved (a load that comes and goes on a
shared machine then hits all three alike), and the table shows medians over the rounds.

    deepfeat bench serve-ray --clients 8 --requests 200
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from deepfeat.scripts.bench_common import begin, deepfeat_command, echo
from deepfeat.scripts.bench_machine import machine
from deepfeat.scripts.bench_serve import _free_port, _queries, _wait_ready, drive

__all__ = ["main"]

FAST_ENV = {"DEEPFEAT_LAYER": "penultimate", "DEEPFEAT_RESIZE_MODE": "crop", "DEEPFEAT_SCALES": "[1.0]"}


def _start(args: list[str], env: dict[str, str], log: Path) -> Any:
    import subprocess

    with log.open("wb") as out:
        return subprocess.Popen(deepfeat_command(*args), env=env, stdout=subprocess.DEVNULL, stderr=out)


def _stop(proc: Any) -> None:
    import signal
    import subprocess

    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _fill(base: str, *, ray: bool) -> None:
    """Add the photos; on Ray, publish and wait until searches come from that generation."""
    import httpx

    for data in _queries():
        resp = httpx.post(
            f"{base}/v1/images", files={"file": ("p.jpg", data, "image/jpeg")}, timeout=120, trust_env=False
        )
        resp.raise_for_status()
    if not ray:
        return
    number = httpx.post(f"{base}/v1/admin/publish", timeout=120, trust_env=False).json()["number"]
    deadline = time.monotonic() + 120
    fresh = 0
    while fresh < 8:  # several answers in a row: every replica has switched
        if time.monotonic() > deadline:
            raise RuntimeError(f"generation {number} not served within 120 s")
        resp = httpx.post(
            f"{base}/v1/search?k=1",
            files={"file": ("q.jpg", _queries()[0], "image/jpeg")},
            timeout=120,
            trust_env=False,
        )
        ok = resp.status_code == 200 and resp.headers.get("x-deepfeat-generation") == str(number)
        fresh = fresh + 1 if ok else 0
        time.sleep(0.05)


def run_config(
    name: str, serve_args: list[str], *, clients: list[int], requests: int, seconds: float
) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        port = _free_port()
        env = {**os.environ, **FAST_ENV, "DEEPFEAT_REFRESH_INTERVAL_S": "0.5"}
        log = Path(tmp) / "server.log"
        args = ["serve", "--data-dir", str(Path(tmp) / "data"), "--port", str(port), *serve_args]
        proc = _start(args, env, log)
        base = f"http://127.0.0.1:{port}"
        try:
            _wait_ready(base, proc, log, timeout=300)
            _fill(base, ray="--engine" in serve_args)
            drive(base, clients=2, requests=8, seconds=30)  # warm-up: first-call costs out of the figures
            for n in clients:
                row = drive(base, clients=n, requests=requests, seconds=seconds)
                rows.append({"config": name, **row})
        finally:
            _stop(proc)
    return rows


def _median_row(name: str, clients: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    mine = [r for r in runs if r["config"] == name and r["clients"] == clients]
    errors: dict[int, int] = {}
    for r in mine:
        for status, count in r["errors"].items():
            errors[status] = errors.get(status, 0) + count
    return {
        "config": name,
        "clients": clients,
        "ok": sum(r["ok"] for r in mine),
        "req_s": round(statistics.median(r["req_s"] for r in mine), 2),
        "p50_ms": round(statistics.median(r["p50_ms"] for r in mine), 1),
        "p99_ms": round(statistics.median(r["p99_ms"] for r in mine), 1),
        "rounds": [r["req_s"] for r in mine],
        "errors": errors,
    }


def _ratio(by: dict[str, dict[str, Any]], a: str, b: str, key: str) -> float | None:
    return round(by[a][key] / by[b][key], 2) if by[b][key] else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="deepfeat bench serve-ray",
        description=(__doc__ or "").split("\n\n")[0].replace("``", "`"),
    )
    parser.add_argument("--clients", default="8", help="concurrent clients to test, e.g. 1,8 (default 8)")
    parser.add_argument("--requests", type=int, default=200, help="requests per client count (default 200)")
    parser.add_argument("--seconds", type=float, default=60, help="time limit per client count (default 60)")
    parser.add_argument(
        "--rounds", type=int, default=1, help="times each configuration runs, interleaved (default 1)"
    )
    parser.add_argument("--json", type=Path)
    args = begin(parser, argv)
    clients = [int(c) for c in args.clients.split(",") if c]
    cores = machine()["cores"] or 1
    ray_common = ["--engine", "ray", "--publish-interval", "0"]
    configs = [
        ("serve", []),
        ("ray-1", [*ray_common, "--replicas", "1", "--replica-cpus", str(cores)]),
        ("ray-2", [*ray_common, "--replicas", "2", "--replica-cpus", str(cores / 2)]),
    ]
    runs: list[dict[str, Any]] = []
    for round_ in range(args.rounds):
        for name, serve_args in configs:
            for row in run_config(
                name, serve_args, clients=clients, requests=args.requests, seconds=args.seconds
            ):
                runs.append({"round": round_, **row})
    rows = [_median_row(name, n, runs) for name, _ in configs for n in clients]
    echo(f"medians over {args.rounds} round(s), configurations interleaved")
    echo(
        f"{'config':<7} {'clients':>7} {'ok':>5} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}  req/s per round, errors"
    )
    for row in rows:
        echo(
            f"{row['config']:<7} {row['clients']:>7} {row['ok']:>5} {row['req_s']:>8} {row['p50_ms']:>8} "
            f"{row['p99_ms']:>8}  {row['rounds']} {row['errors'] or ''}"
        )
    ratios: dict[int, dict[str, float | None]] = {}
    for n in clients:
        by = {r["config"]: r for r in rows if r["clients"] == n}
        ratios[n] = {
            "ray1_vs_serve_throughput": _ratio(by, "ray-1", "serve", "req_s"),
            "ray1_vs_serve_p50": _ratio(by, "ray-1", "serve", "p50_ms"),
            "ray2_vs_ray1_throughput": _ratio(by, "ray-2", "ray-1", "req_s"),
            "ray2_vs_serve_throughput": _ratio(by, "ray-2", "serve", "req_s"),
        }
        echo(
            f"{n} clients: Ray Serve, 1 replica: {ratios[n]['ray1_vs_serve_throughput']}x the throughput of "
            f"deepfeat serve (p50 x{ratios[n]['ray1_vs_serve_p50']}); 2 replicas: "
            f"{ratios[n]['ray2_vs_ray1_throughput']}x 1 replica, {ratios[n]['ray2_vs_serve_throughput']}x "
            "deepfeat serve"
        )
    if args.json:
        report = {"machine": machine(), "rows": rows, "runs": runs, "ratios": ratios}
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
