"""The report of ``deepfeat bench search``: the per-size table it prints and the machine it ran on."""

from __future__ import annotations

import os
import platform
from typing import Any

import faiss
import numpy as np

from deepfeat.scripts.bench_machine import machine
from deepfeat.scripts.bench_search_measure import TARGET_RECALL, TARGET_SPEEDUP

__all__ = ["format_table", "machine_report"]


def _fmt_params(params: dict[str, Any]) -> str:
    if not params:
        return "-"
    return ",".join(f"{k}={int(v) if float(v).is_integer() else v}" for k, v in params.items())


def format_table(result: dict[str, Any]) -> str:
    """The per-size table (medians; ratios against exact Flat in the same run)."""
    info = result["data_info"]
    head = (
        f"== {result['data']}  n={result['n']:,}  dim={result['dim']}  queries={result['queries']}  "
        f"k={result['k']}  search threads={result['threads']}  build threads={result['build_threads']}"
    )
    lines = [head]
    if info.get("pca"):
        lines.append(
            f"   real photos: {info['seeds']} seeds from {len(info['photos'])} photos, {info['pca']}"
        )
    lines.append(f"   auto would choose: {result['auto_factory']}")
    header = (
        f"{'factory':<26} {'search params':<34} {'build s':>8} {'index MiB':>9} {'RSS+ MiB':>8} "
        f"{'1-q q/s':>9} {'batch q/s':>10} {'recall@' + str(result['k']):>9} {'x1 vs Flat':>10} {'xB vs Flat':>10}"
    )
    lines += [header, "-" * len(header)]
    for row in result["rows"]:
        mark = " *" if row["meets_target_single"] or row["meets_target_batch"] else ""
        name = row["factory"] + (" (again, end)" if row.get("baseline") == "end" else "")
        lines.append(
            f"{name:<26} {_fmt_params(row['search_params']):<34} {row['build_s']:>8.1f} "
            f"{row['index_bytes'] / 2**20:>9.1f} {row['rss_delta_bytes'] / 2**20:>8.1f} "
            f"{row['single_qps']:>9.0f} {row['batch_qps']:>10.0f} {row['recall']:>9.3f} "
            f"{row['speedup_single']:>10.1f} {row['speedup_batch']:>10.1f}{mark}"
        )
    lines.append(
        f"   x = queries/s over exact Flat's (the faster of its two measurements in this run); "
        f"* = recall@{result['k']} >= {TARGET_RECALL} and >= {TARGET_SPEEDUP:.0f}x (one-query or batched)"
    )
    return "\n".join(lines)


def machine_report() -> dict[str, Any]:
    """:func:`bench_machine.machine` and what else decides FAISS's speed: its version and SIMD build,
    numpy's, the platform and the load average now (``loadavg_start``)."""
    return {
        **machine(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "faiss": faiss.__version__,
        "faiss_simd": faiss.get_compile_options(),
        "numpy": np.__version__,
        "loadavg_start": list(os.getloadavg()),
    }
