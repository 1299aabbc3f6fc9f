"""Search benchmark: FAISS index types against exact search, on the same vectors in the same run.

For each collection size and data set it builds an exact ``Flat`` index first (its results are the
ground truth and its speed the baseline), then each requested factory through the project's
:class:`index.vectors.VectorIndex` (the store's own code path: explicit ids, inner product, training on
a sample). Per factory and search setting it reports:

* build time (train + add) and memory: the serialized index size (what a snapshot weighs; FAISS keeps
  about the same in RAM) and the process RSS growth while the index was built and held;
* queries/s one query at a time (``1 / median latency`` over ``--single-queries`` calls) and batched
  (all queries in one call, median over ``--runs`` calls);
* recall@k against the exact top-k, and both speeds as a ratio to exact ``Flat`` measured in this run.

Data sets (float32, L2-normalised, queries held out from the collection):

* ``synthetic``: a mixture of 1000 Gaussian clusters around random unit centres plus a shared mean
  direction (CNN features are non-negative, so unrelated images are not orthogonal: cosine ~0.3), with noise
  whose variance decays as 1/rank over a random basis (CNN features have a fast-decaying PCA spectrum;
  uniform or isotropic noise would make every approximate index look worse than it is on real data).
* ``real``: ``efficientnet_lite0`` embeddings (1280-d) of 21 real photos shipped in scikit-image and
  matplotlib, each also as 24 random crops and flips (the 525 seeds). Vectors are seeds plus Gaussian
  noise shaped like the seeds' own crop/flip variation (their top principal directions) plus a little
  isotropic noise, in two levels: "scenes" around seeds, ~10 copies around each scene (one level of
  fixed-scale noise makes every copy of a seed equidistant from a query, so the top 10 would be
  arbitrary). With ``--dim`` below 1280 the vectors are reduced with a ``faiss.PCAMatrix`` trained on
  a sample (and renormalised): the output says so.

Threads: searches run on ``--threads`` (default 1: a one-query search is single-threaded anyway, and
on a shared 2-core machine OpenMP threads that wait on a busy core make multi-threaded timings
erratic). Building uses ``--build-threads`` (default all cores). On a shared machine also set
``OMP_WAIT_POLICY=PASSIVE`` in the environment. The load average is recorded in the JSON.

Factories are separated by ``;`` (FAISS strings contain commas). ``{nlist}`` is replaced by
:func:`index.choose.ivf_nlist` for each size and ``auto`` by :func:`index.choose.choose_factory`. A
factory may carry search settings to sweep after ``@``: ``HNSW32@efSearch=32|64|128`` or
``IVF{nlist},PQ32x4fs,RFlat@nprobe=16|32,k_factor_rf=4|8`` (every combination is measured on one
build); without ``@`` it gets :func:`index.choose.default_search_params`.

    deepfeat bench search --sizes 100000 --dim 256 --data synthetic --json /tmp/out.json
    deepfeat bench search --sizes 100000,1000000 --dim 256 --data real

Prints medians and ratios; ``--json`` writes everything. No timing is asserted anywhere.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from deepfeat.index.choose import choose_factory, default_search_params, ivf_nlist
from deepfeat.scripts.bench_common import begin, command_line, echo, usage_error
from deepfeat.scripts.bench_search_data import Dataset, real_dataset, real_seeds, synthetic_dataset
from deepfeat.scripts.bench_search_measure import (
    TARGET_RECALL,
    TARGET_SPEEDUP,
    FactorySpec,
    recall_at_k,
    run_benchmark,
)
from deepfeat.scripts.bench_search_report import format_table, machine_report

# This module is the command: what to run (``--factories`` parsed into specs) and the loop over sizes.
# Its parts live beside it: :mod:`scripts.bench_search_data` makes the vectors,
# :mod:`scripts.bench_search_measure` builds and times the indexes, :mod:`scripts.bench_search_report`
# prints the table and describes the machine. Every name public here before the split stays importable
# from here.
__all__ = [
    "DEFAULT_FACTORIES",
    "Dataset",
    "FactorySpec",
    "machine_report",
    "main",
    "parse_factories",
    "real_dataset",
    "recall_at_k",
    "run_benchmark",
    "synthetic_dataset",
]

logger = logging.getLogger(__name__)

DEFAULT_FACTORIES = (
    "HNSW32@efSearch=16|32|64|128;IVF{nlist},SQ8@nprobe=4|8|16|32|64;IVF{nlist},PQ32x4fs@nprobe=16|64;"
    "IVF{nlist}_HNSW32,PQ32x4fs@nprobe=16|64"
)


def _number(text: str) -> float:
    value = float(text)
    return int(value) if value.is_integer() else value


def parse_factories(text: str, n: int, dim: int) -> list[FactorySpec]:
    """Parse ``--factories`` for one size: ``;``-separated, ``{nlist}``/``auto`` expanded, ``@`` sweeps.

    Args:
        text: e.g. ``"HNSW32@efSearch=64|128;IVF{nlist},PQ32x4fs"``.
        n: Collection size (for ``{nlist}`` and ``auto``).
        dim: Dimension (for ``auto``).

    Returns:
        One spec per factory, in order, duplicates (after expansion) merged.

    Raises:
        ValueError: An empty factory or a malformed ``@`` part.
    """
    specs: list[FactorySpec] = []
    seen: dict[str, int] = {}
    for raw in text.split(";"):
        raw = raw.strip()
        if not raw:
            continue
        factory, _, sweep = raw.partition("@")
        factory = factory.strip()
        if factory.lower() == "auto":
            factory = choose_factory(n, dim)
        factory = factory.replace("{nlist}", str(ivf_nlist(n)))
        if not factory:
            raise ValueError(f"empty factory in {raw!r}")
        if sweep.strip():
            names: list[str] = []
            values: list[list[float]] = []
            for item in sweep.split(","):
                name, eq, vals = item.partition("=")
                if not eq or not name.strip() or not vals.strip():
                    raise ValueError(f"bad search setting {item!r} in {raw!r}; expected name=v1|v2")
                names.append(name.strip())
                values.append([_number(v) for v in vals.split("|")])
            settings = tuple(dict(zip(names, combo, strict=True)) for combo in itertools.product(*values))
        else:
            settings = (dict(default_search_params(factory)),)
        if factory in seen:
            old = specs[seen[factory]]
            merged = old.settings + tuple(s for s in settings if s not in old.settings)
            specs[seen[factory]] = FactorySpec(factory, merged)
        else:
            seen[factory] = len(specs)
            specs.append(FactorySpec(factory, settings))
    return specs


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Arguments of ``deepfeat bench search`` (pass a subparser to attach them to it)."""
    parser = parser or argparse.ArgumentParser(
        prog="deepfeat bench search",
        description=(__doc__ or "").split("\n\n")[0].replace("``", "`"),
    )
    parser.add_argument("--sizes", default="100000", help="comma-separated collection sizes (default 100000)")
    parser.add_argument(
        "--dim",
        type=int,
        default=256,
        help="vector dimension; for real data, PCA target (default 256; 0 = 1280, no PCA)",
    )
    parser.add_argument(
        "--factories",
        default=DEFAULT_FACTORIES,
        help="';'-separated FAISS factory strings, '{nlist}' and 'auto' expanded, '@name=v1|v2,...' sweeps "
        f"(default {DEFAULT_FACTORIES!r}); exact Flat always runs first",
    )
    parser.add_argument("--queries", type=int, default=1000, help="held-out queries (default 1000)")
    parser.add_argument("--k", type=int, default=10, help="neighbours per query, recall@k (default 10)")
    parser.add_argument("--data", choices=["synthetic", "real"], default="synthetic")
    parser.add_argument("--threads", type=int, default=1, help="FAISS threads while searching (default 1)")
    parser.add_argument(
        "--build-threads", type=int, default=0, help="threads while building (default: all cores)"
    )
    parser.add_argument("--runs", type=int, default=3, help="batched calls per setting; median (default 3)")
    parser.add_argument(
        "--single-queries", type=int, default=200, help="one-query calls per setting; median (default 200)"
    )
    parser.add_argument(
        "--single-budget", type=float, default=20.0, help="max seconds of one-query calls per setting"
    )
    parser.add_argument(
        "--train-size",
        type=int,
        default=100_000,
        help="IVF/PQ training sample (default 100000; 0: VectorIndex's max(100k, 40*nlist))",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the full report here")
    return parser


def _positive(name: str, value: int) -> int:
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def _checked(args: argparse.Namespace) -> tuple[list[int], int | None, dict[int, list[FactorySpec]]]:
    """(sizes, dimension or None for the embedding's, factory specs per size).

    Raises:
        ValueError: A bad size, count, dimension or factory string.
    """
    sizes = [_positive("size", int(s.replace("_", ""))) for s in args.sizes.split(",") if s.strip()]
    _positive("--queries", args.queries)
    _positive("--k", args.k)
    _positive("--threads", args.threads)
    dim = args.dim if args.dim > 0 else None
    if args.data == "synthetic" and dim is None:
        raise ValueError("--dim must be >= 1 for synthetic data")
    return sizes, dim, {n: parse_factories(args.factories, n, dim or 1280) for n in sizes}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the exit status (0, or 2 on bad arguments)."""
    parser = build_parser()
    args = begin(parser, argv, log_to_stderr=True)
    try:
        sizes, dim, specs_by_size = _checked(args)
    except ValueError as exc:
        return usage_error(parser, exc)
    report: dict[str, Any] = {
        "command": command_line("bench_search", argv),
        "machine": machine_report(),
        "target": {"recall": TARGET_RECALL, "speedup": TARGET_SPEEDUP},
        "results": [],
    }
    seeds = None
    seeds_s = 0.0
    for n in sizes:
        t0 = time.perf_counter()
        if args.data == "synthetic" and dim is not None:
            data = synthetic_dataset(n, args.queries, dim, seed=args.seed)
        else:
            if seeds is None:
                seeds = real_seeds(seed=args.seed)
                seeds_s = time.perf_counter() - t0
            data = real_dataset(n, args.queries, dim, seed=args.seed, seeds=seeds)
            data.info["embed_seeds_s"] = round(seeds_s, 2)
        logger.info(
            "generated %s n=%d dim=%d in %.1fs", data.name, n, data.base.shape[1], time.perf_counter() - t0
        )
        result = run_benchmark(
            data,
            specs_by_size[n],
            k=args.k,
            threads=args.threads,
            build_threads=args.build_threads or None,
            runs=args.runs,
            single_queries=args.single_queries,
            single_budget_s=args.single_budget,
            train_size=args.train_size or None,
        )
        result["total_s"] = round(time.perf_counter() - t0, 2)
        result["loadavg_end"] = list(os.getloadavg())
        report["results"].append(result)
        echo(format_table(result))
        echo()
        del data
        gc.collect()
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
    report["machine"]["loadavg_end"] = list(os.getloadavg())
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
        echo(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
