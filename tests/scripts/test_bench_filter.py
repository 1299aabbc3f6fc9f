"""``bench_filter``: a tiny run through the real store (every row, recall in [0, 1], exact Flat), the
store cache of ``--work-dir``, the ground truth and the bucket/filter construction. No timings asserted."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from deepfeat.index.choose import ivf_nlist
from deepfeat.scripts.bench_filter import bucket_of, exact_filtered, main, share_filter

FACTORIES = ["Flat", "HNSW32", f"IVF{ivf_nlist(3000)},Flat"]
FILTERS = ["none", "0.1%", "1%", "10%", "50%", "100%"]


def _run(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "bench.json"
    argv = ["--n", "3000", "--dim", "16", "--queries", "20", "--repeats", "2"]
    argv += ["--factories", "Flat;HNSW32;IVF{nlist},Flat", "--json", str(out), *extra]
    assert main(argv) == 0
    return json.loads(out.read_text())


def test_every_factory_and_share_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = _run(tmp_path)
    printed = capsys.readouterr().out
    assert printed.startswith("machine: ")
    assert "command: deepfeat bench filter --n 3000" in printed
    assert "== synthetic  n=3,000  dim=16  queries=20  k=10  repeats=2  search threads=1" in printed
    assert "recall@10 >= 0.95 with every filter, factory and setting" in printed

    assert (report["n"], report["dim"], report["queries"], report["k"], report["repeats"]) == (
        3000,
        16,
        20,
        10,
        2,
    )
    assert report["command"].startswith("deepfeat bench filter ")
    assert {"cpu", "flags", "faiss", "loadavg_end"} <= set(report["machine"])
    assert [b["factory"] for b in report["builds"]] == FACTORIES
    assert not any(b["reused"] for b in report["builds"])
    rows = report["rows"]
    assert [(r["factory"], r["filter"]) for r in rows] == [(f, s) for f in FACTORIES for s in FILTERS]
    for row in rows:
        assert 0.0 <= row["recall"] <= 1.0
        assert row["violations"] == 0
        assert 0 < row["p50_ms"] <= row["p95_ms"]
        assert row["vs_unfiltered"] > 0
    printed_rows = {tuple(line.split()[:3:2]) for line in printed.splitlines() if line.strip()}
    assert {(r["factory"], r["filter"]) for r in rows} <= printed_rows  # the tables show every row
    assert [r["matching"] for r in rows[:6]] == [3000, 3, 30, 300, 1500, 3000]
    assert report["misses"] == []
    for row in rows:
        filtered = row["filter"] != "none"
        assert (row["cold_p50_ms"] is not None) == filtered
        if filtered:  # a filter new to the store gives the same hits as a known one
            assert row["cold_recall"] == row["recall"] and 0 < row["cold_p50_ms"] <= row["cold_p95_ms"]
        if row["filter"] in ("none", "100%"):  # a filter every image matches restricts nothing
            assert row["path"] == ("index" if row["filter"] == "none" else "index (all match)")
        elif row["factory"] == "Flat":  # exact: the ID selector on the flat index
            assert row["path"] == "selector" and row["selector_searches"] == 20
        else:  # 3000 x 16-d vectors are far below EXACT_SCAN_BYTES
            assert row["path"] == "exact scan" and row["exact_scans"] == 20
        if row["factory"] == "Flat" or row["path"] == "exact scan":
            assert row["recall"] == 1.0
    assert [r["search_params"] for r in rows if r["filter"] == "none"] == [
        {},
        {"efSearch": 128},
        {"nprobe": 32},
    ]


def test_work_dir_keeps_and_reuses_the_stores(tmp_path: Path) -> None:
    work = tmp_path / "stores"
    first = _run(tmp_path, "--work-dir", str(work), "--shares", "0.01")
    second = _run(tmp_path, "--work-dir", str(work), "--shares", "0.01")
    assert not any(b["reused"] for b in first["builds"])
    assert all(b["reused"] for b in second["builds"])
    assert [b["build_s"] for b in second["builds"]] == [b["build_s"] for b in first["builds"]]
    strip = ("p50_ms", "p95_ms", "vs_unfiltered", "cold_p50_ms", "cold_p95_ms", "cold_vs_unfiltered")
    assert [{k: v for k, v in r.items() if k not in strip} for r in second["rows"]] == [
        {k: v for k, v in r.items() if k not in strip} for r in first["rows"]
    ]


def test_buckets_make_exact_shares_and_the_ground_truth_is_brute_force() -> None:
    buckets = bucket_of(5000)
    assert np.bincount(buckets, minlength=1000).tolist() == [5] * 1000
    assert share_filter(0.001) == {"bucket": {"$lt": 1}} and share_filter(0.5) == {"bucket": {"$lt": 500}}
    rng = np.random.default_rng(0)
    base = rng.standard_normal((5000, 8)).astype(np.float32)
    queries = rng.standard_normal((4, 8)).astype(np.float32)
    mask = buckets < 10
    ids, scores = exact_filtered(base, queries, mask, 7)
    for qi in range(4):
        all_scores = np.where(mask, base @ queries[qi], -np.inf)
        want = np.argsort(-all_scores)[:7]
        assert ids[qi].tolist() == want.tolist()
        np.testing.assert_allclose(scores[qi], all_scores[want], rtol=1e-5)
    ids, _ = exact_filtered(base, queries, buckets < 1, 10)
    assert ids.shape == (4, 5)  # fewer matches than k


@pytest.mark.parametrize(
    "argv",
    [
        ["--n", "0"],
        ["--shares", "0.0005"],
        ["--shares", "1.5"],
        ["--queries", "0"],
        ["--factories", "HNSW32@ef"],
    ],
)
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert "error" in capsys.readouterr().err
