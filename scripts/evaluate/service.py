"""``deepfeat eval service``: retrieval quality as a user gets it, through the HTTP API.

``deepfeat eval copy|category`` measure embeddings in memory, to choose among configurations. This
mode measures what ships: it starts ``deepfeat serve`` on a fresh data directory (or talks to the
running service at ``--url``), adds the validation parts of the collections through
``POST /v1/images``, and queries ``POST /v1/search`` the way a client does:

* copy detection: every validation original, transformed by each copy transform (JPEG-encoded at
  quality 95, as an upload), must come back first; recall@1 overall and per transform;
* category retrieval: every validation image of a category collection searches the store (itself
  left out); precision@10 counts hits of its class.

The store holds the originals and every category image, so distractors outnumber the originals.
Each configuration (the shipped defaults, and the naive baseline for comparison) runs on its own
server and data directory in one run.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from deepfeat.scripts.evaluate.errors import EvalError
from deepfeat.scripts.evaluate.runner import WORKING_SIDE, content_id, list_images, load_images
from deepfeat.scripts.evaluate.split import SPLIT_SEED, split_folder, stratum_of
from deepfeat.scripts.evaluate.transforms import HARD_TRANSFORMS, TRANSFORMS, apply_transform, query_rng

__all__ = ["BASELINE_ENV", "Collections", "evaluate_service", "format_service_report", "served"]

log = logging.getLogger(__name__)

BASELINE_ENV = {
    "DEEPFEAT_LAYER": "penultimate",
    "DEEPFEAT_RESIZE_MODE": "crop",
    "DEEPFEAT_SCALES": "1",
    "DEEPFEAT_REGIONS": "0",
    "DEEPFEAT_LOWPASS": "0",
    "DEEPFEAT_SEMANTIC_LAYER": "logits",
}
"""The naive baseline as a server's settings: penultimate layer, centre crop, one scale, and the
logits as its semantic vector."""

P_AT = 10


@dataclass
class Collections:
    """The validation parts to load: copy collections (originals) and category collections."""

    copy: list[Path] = field(default_factory=list)
    category: list[Path] = field(default_factory=list)
    split_seed: int = SPLIT_SEED
    part: str = "validation"

    def originals(self) -> list[tuple[str, Path]]:
        """(collection, file) of every original in the chosen part."""
        return [(root.name, p) for root in self.copy for p in self._part(root)]

    def categories(self) -> list[tuple[str, str, Path]]:
        """(collection, class, file) of every category image in the chosen part."""
        return [(root.name, stratum_of(p, root), p) for root in self.category for p in self._part(root)]

    def _part(self, root: Path) -> list[Path]:
        paths = list_images(root)
        if not paths:
            raise EvalError(f"no images under {root}")
        return split_folder(root, paths, seed=self.split_seed).part(self.part)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def served(data_dir: Path, env: dict[str, str], *, timeout_s: float = 300.0) -> Iterator[str]:
    """``deepfeat serve`` on a free loopback port with ``env`` on top of a clean environment; yields
    its base URL once ``/ready`` answers, stops it afterwards."""
    import httpx

    port = _free_port()
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("DEEPFEAT_")}
    command = [sys.executable, "-m", "deepfeat.scripts.cli", "serve", "--data-dir", str(data_dir)]
    proc = subprocess.Popen(
        [*command, "--port", str(port), "--log-level", "warning"],
        env={**base_env, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                err = proc.stderr.read() if proc.stderr else ""
                raise EvalError(f"deepfeat serve exited ({proc.returncode}): {err.strip()[-2000:]}")
            try:
                if httpx.get(f"{base}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise EvalError(f"deepfeat serve was not ready within {timeout_s:.0f}s")
            time.sleep(0.5)
        yield base
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)


def _jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _check(resp: Any, what: str) -> dict[str, Any]:
    if resp.status_code >= 400:
        raise EvalError(f"{what}: HTTP {resp.status_code} {resp.text[:300]}")
    body: dict[str, Any] = resp.json()
    return body


def evaluate_service(
    base: str,
    collections: Collections,
    *,
    transforms: Sequence[str] = TRANSFORMS,
    seed: int = 0,
    api_key: str | None = None,
) -> dict[str, Any]:
    """Fill the service at ``base`` with the collections' chosen part and measure it.

    Returns:
        ``{"model": /v1/stats model, "copy": {...}, "category": {...}, "add_s": ..., "search_ms": ...}``.
    """
    import httpx

    headers = {"X-API-Key": api_key} if api_key else {}
    with httpx.Client(base_url=base, headers=headers, timeout=300) as client:
        stats = _check(client.get("/v1/stats"), "GET /v1/stats")
        if stats["count"]:
            raise EvalError(f"the service at {base} already holds {stats['count']} images; use an empty one")
        originals = collections.originals()
        categories = collections.categories()
        ids: dict[Path, str] = {}
        started = time.perf_counter()
        for kind, items in (
            ("original", [(c, "", p) for c, p in originals]),
            ("category", categories),
        ):
            for collection, group, path in items:
                meta = {"collection": collection, "kind": kind, "class": group}
                resp = client.post(
                    "/v1/images",
                    files={"file": (path.name, path.read_bytes(), "application/octet-stream")},
                    data={"source": str(path), "metadata": json.dumps(meta)},
                )
                ids[path] = _check(resp, f"adding {path}")["id"]
        add_s = time.perf_counter() - started
        search_times: list[float] = []

        def search(data: bytes, k: int, similarity: str = "visual") -> list[dict[str, Any]]:
            t0 = time.perf_counter()
            params: dict[str, Any] = {"k": k}
            if similarity != "visual":
                params["similarity"] = similarity
            body = _check(
                client.post("/v1/search", params=params, files={"file": ("q.jpg", data, "image/jpeg")}),
                "POST /v1/search",
            )
            search_times.append(time.perf_counter() - t0)
            return list(body["results"])

        copy_hits: dict[str, list[int]] = {t: [] for t in transforms}
        images, kept, _ = load_images([p for _, p in originals], side=WORKING_SIDE)
        from deepfeat.scripts.evaluate.split import file_sha256

        for image, path in zip(images, kept, strict=True):
            oid = content_id(file_sha256(path))
            for name in transforms:
                query = apply_transform(image, name, query_rng(seed, oid, name))
                results = search(_jpeg(query), 1)
                copy_hits[name].append(int(bool(results) and results[0]["id"] == ids[path]))
        modes = ["visual", "semantic"] if stats["model"]["config"].get("semantic_layer") else ["visual"]
        precision: dict[str, dict[str, list[float]]] = {mode: {} for mode in modes}
        for collection, group, path in categories:
            for mode in modes:
                found = search(path.read_bytes(), P_AT + 1, mode)
                results = [r for r in found if r["id"] != ids[path]][:P_AT]
                same = sum(
                    1
                    for r in results
                    if r["metadata"].get("class") == group and r["metadata"].get("kind") == "category"
                )
                precision[mode].setdefault(collection, []).append(same / P_AT)
        model = stats["model"]
    every = [h for hits in copy_hits.values() for h in hits]
    hard = [h for t in HARD_TRANSFORMS if t in copy_hits for h in copy_hits[t]]
    return {
        "model": model,
        "images": len(ids),
        "originals": len(originals),
        "category_images": len(categories),
        "copy": {
            "queries": len(every),
            "recall@1": float(np.mean(every)) if every else None,
            "hard_recall@1": float(np.mean(hard)) if hard else None,
            "per_transform": {t: float(np.mean(h)) for t, h in copy_hits.items() if h},
        },
        "category": {
            mode: {
                f"P@{P_AT}": float(np.mean([p for ps in by.values() for p in ps])) if by else None,
                "per_collection": {c: float(np.mean(ps)) for c, ps in by.items()},
            }
            for mode, by in precision.items()
        },
        "add_images_per_s": len(ids) / add_s if add_s else None,
        "search_ms_median": 1000 * float(np.median(search_times)) if search_times else None,
    }


def run_configurations(
    collections: Collections,
    configurations: dict[str, dict[str, str]],
    *,
    transforms: Sequence[str] = TRANSFORMS,
    seed: int = 0,
    work_dir: Path | None = None,
) -> dict[str, Any]:
    """Each named configuration (server settings) on its own server and empty data directory."""
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="deepfeat-eval-", dir=work_dir) as tmp:
        for name, env in configurations.items():
            log.info("configuration %s: starting deepfeat serve", name)
            with served(Path(tmp) / name, env) as base:
                results[name] = evaluate_service(base, collections, transforms=transforms, seed=seed)
            log.info("configuration %s: %s", name, results[name]["copy"])
    return results


def _number(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def format_service_report(results: dict[str, Any], transforms: Sequence[str]) -> str:
    """One row per configuration: copy recall@1 overall and per transform, category P@10."""
    head = f"{'configuration':<14} {'recall@1':>8} " + " ".join(f"{t[:16]:>16}" for t in transforms)
    head += f" {'P@10 visual':>11} {'P@10 semantic':>13} {'add/s':>6} {'search ms':>9}"
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        per = r["copy"]["per_transform"]
        row = f"{name:<14} {r['copy']['recall@1']:>8.3f} " + " ".join(
            f"{per.get(t, float('nan')):>16.3f}" for t in transforms
        )
        vis, sem = (r["category"].get(mode, {}).get(f"P@{P_AT}") for mode in ("visual", "semantic"))
        row += f" {_number(vis):>11} {_number(sem):>13}"
        row += f" {r['add_images_per_s']:>6.1f} {r['search_ms_median']:>9.0f}"
        lines.append(row)
    return "\n".join(lines)


def build_parser() -> Any:
    import argparse

    parser = argparse.ArgumentParser(
        prog="deepfeat eval service",
        description="Measure copy detection and category retrieval through the HTTP API: the shipped "
        "defaults and the naive baseline, each on its own `deepfeat serve` and empty data directory, "
        "on the validation parts of the collections.",
    )
    parser.add_argument("--copy", type=Path, nargs="+", default=[], help="collections of distinct originals")
    parser.add_argument(
        "--category", type=Path, nargs="+", default=[], help="collections with one sub-folder per class"
    )
    parser.add_argument("--part", choices=("tune", "validation"), default="validation")
    parser.add_argument("--split-seed", type=int, default=SPLIT_SEED)
    parser.add_argument("--seed", type=int, default=0, help="seed of the copy transforms")
    parser.add_argument("--transforms", default=",".join(TRANSFORMS), help="comma-separated copy transforms")
    parser.add_argument(
        "--url",
        default=None,
        help="measure this running service (it must be empty) instead of starting servers",
    )
    parser.add_argument("--api-key", default=None, help="with --url: the service's DEEPFEAT_API_KEY")
    parser.add_argument("--no-baseline", action="store_true", help="only the shipped defaults")
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: Sequence[str]) -> int:
    """``deepfeat eval service ...``: exit status 0, or 2 with one ``error [code]: message`` line."""
    args = build_parser().parse_args(list(argv))
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    transforms = [t.strip() for t in args.transforms.split(",") if t.strip()]
    try:
        for t in transforms:
            if t not in TRANSFORMS:
                raise EvalError(f"unknown transform {t!r}; choose from: {', '.join(TRANSFORMS)}")
        if not args.copy and not args.category:
            raise EvalError("give --copy and/or --category collections")
        collections = Collections(list(args.copy), list(args.category), args.split_seed, args.part)
        started = time.perf_counter()
        if args.url:
            results = {
                "service": evaluate_service(
                    args.url, collections, transforms=transforms, seed=args.seed, api_key=args.api_key
                )
            }
        else:
            configurations = (
                {"default": {}} if args.no_baseline else {"default": {}, "baseline": BASELINE_ENV}
            )
            results = run_configurations(collections, configurations, transforms=transforms, seed=args.seed)
    except EvalError as exc:
        sys.stderr.write(f"error [{exc.code}]: {exc}\n")
        return 2
    from deepfeat.scripts.bench_machine import describe

    report = {
        "part": args.part,
        "split_seed": args.split_seed,
        "seed": args.seed,
        "collections": {"copy": [str(p) for p in args.copy], "category": [str(p) for p in args.category]},
        "machine": describe(),
        "seconds": round(time.perf_counter() - started, 1),
        "results": results,
        "argv": ["eval", "service", *argv],
    }
    first = next(iter(results.values()))
    sys.stdout.write(
        f"{args.part} parts: {first['originals']} originals x {len(transforms)} transforms, "
        f"{first['category_images']} category images, {first['images']} images in each store\n"
    )
    sys.stdout.write(format_service_report(results, transforms) + "\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        sys.stdout.write(f"report: {args.json}\n")
    return 0
