"""``bench_search``: report structure on a tiny run, factory parsing, the data generators. No timings asserted."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from deepfeat.index.choose import choose_factory, default_search_params
from deepfeat.scripts.bench_search import (
    Dataset,
    main,
    parse_factories,
    real_dataset,
    real_seeds,
    run_benchmark,
    synthetic_dataset,
)

ROW_KEYS = {
    "factory",
    "search_params",
    "train_s",
    "add_s",
    "build_s",
    "index_bytes",
    "rss_delta_bytes",
    "single_qps",
    "single_ms_p50",
    "batch_qps",
    "recall",
    "speedup_single",
    "speedup_batch",
    "meets_target_single",
    "meets_target_batch",
}


def test_smoke_run_reports_flat_exact_and_each_setting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    code = main(
        [
            "--sizes",
            "2000",
            "--dim",
            "32",
            "--queries",
            "50",
            "--factories",
            "Flat;HNSW32@efSearch=16|64;IVF{nlist},Flat@nprobe=4",
            "--single-queries",
            "10",
            "--runs",
            "1",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "== synthetic  n=2,000  dim=32" in printed and "recall@10" in printed and "x1 vs Flat" in printed

    report = json.loads(out.read_text())
    assert report["target"] == {"recall": 0.95, "speedup": 50.0}
    assert {"cpu_count", "faiss", "loadavg_start", "loadavg_end"} <= set(report["machine"])
    (result,) = report["results"]
    assert (result["data"], result["n"], result["dim"], result["queries"], result["k"]) == (
        "synthetic",
        2000,
        32,
        50,
        10,
    )
    assert result["auto_factory"] == choose_factory(2000, 32)
    rows = result["rows"]
    # Exact Flat first (ground truth) and again at the end (the load may have changed).
    assert [r["factory"] for r in rows] == ["Flat", "HNSW32", "HNSW32", "IVF128,Flat", "Flat"]
    assert [rows[0]["baseline"], rows[-1]["baseline"]] == ["start", "end"]
    for row in rows:
        assert set(row) >= ROW_KEYS
        assert 0.0 <= row["recall"] <= 1.0
        assert row["index_bytes"] > 0 and row["single_qps"] > 0 and row["batch_qps"] > 0
    flat = [rows[0], rows[-1]]
    assert all(r["recall"] == 1.0 and r["search_params"] == {} for r in flat)
    # Ratios are against the faster exact measurement: that one is 1.0, the other at most 1.0.
    assert max(r["speedup_single"] for r in flat) == 1.0 and max(r["speedup_batch"] for r in flat) == 1.0
    assert result["baseline"]["single_qps"] == max(r["single_qps"] for r in flat)
    assert [r["search_params"] for r in rows[1:3]] == [{"efSearch": 16}, {"efSearch": 64}]
    assert rows[1]["build_s"] == rows[2]["build_s"]  # one build, two settings
    assert rows[3]["search_params"] == {"nprobe": 4} and rows[3]["train_s"] >= 0
    assert "Flat (again, end)" in printed


def test_run_benchmark_on_given_vectors_flat_is_ground_truth() -> None:
    rng = np.random.default_rng(0)
    base = rng.standard_normal((500, 8)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    data = Dataset("given", base, base[:20].copy())
    specs = parse_factories("HNSW32@efSearch=200", 500, 8)
    result = run_benchmark(data, specs, k=5, runs=1, single_queries=5)
    assert [row["recall"] for row in result["rows"]] == [1.0, pytest.approx(1.0, abs=0.05), 1.0]


def test_parse_factories_expands_and_sweeps() -> None:
    specs = parse_factories(
        "Flat; HNSW32@efSearch=16|32 ;IVF{nlist},PQ8x4fs@nprobe=4|8,k_factor_rf=2;auto;HNSW32", 300_000, 64
    )
    assert [s.factory for s in specs] == ["Flat", "HNSW32", "IVF2048,PQ8x4fs"]  # auto = HNSW32 here, merged
    assert specs[0].settings == ({},)
    assert specs[1].settings == (
        {"efSearch": 16},
        {"efSearch": 32},
        {"efSearch": default_search_params("HNSW32")["efSearch"]},
    )
    assert specs[2].settings == ({"nprobe": 4, "k_factor_rf": 2}, {"nprobe": 8, "k_factor_rf": 2})
    assert parse_factories("IVF{nlist},SQ8", 100_000, 64)[0].settings == (
        default_search_params("IVF1024,SQ8"),
    )


@pytest.mark.parametrize("bad", ["HNSW32@efSearch", "HNSW32@=3", "@nprobe=2"])
def test_parse_factories_rejects_malformed(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_factories(bad, 1000, 16)


@pytest.mark.parametrize(
    "argv",
    [["--sizes", "0"], ["--sizes", "x"], ["--queries", "0"], ["--factories", "HNSW32@ef"], ["--dim", "0"]],
)
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert "error" in capsys.readouterr().err


def test_synthetic_data_is_unit_norm_clustered_and_seeded() -> None:
    a = synthetic_dataset(3000, 40, 24, seed=3, n_clusters=30)
    b = synthetic_dataset(3000, 40, 24, seed=3, n_clusters=30)
    assert a.base.shape == (3000, 24) and a.queries.shape == (40, 24) and a.base.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a.base, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(a.base, b.base)
    # Clustered: a query's nearest neighbour is much closer than a random vector.
    sims = a.queries @ a.base.T
    assert sims.max(axis=1).mean() > sims.mean() + 0.3


def test_real_data_from_given_seeds_with_pca() -> None:
    rng = np.random.default_rng(1)
    seeds = rng.standard_normal((60, 128)).astype(np.float32)
    seeds /= np.linalg.norm(seeds, axis=1, keepdims=True)
    labels = np.repeat(np.arange(6), 10)
    data = real_dataset(2000, 30, 32, seeds=(seeds, labels, [f"p{i}" for i in range(6)]))
    assert data.base.shape == (2000, 32) and data.queries.shape == (30, 32)
    np.testing.assert_allclose(np.linalg.norm(data.base, axis=1), 1.0, atol=1e-5)
    assert data.info["pca"].startswith("faiss.PCAMatrix 128 -> 32")
    kept = real_dataset(500, 5, None, seeds=(seeds, labels, [f"p{i}" for i in range(6)]))
    assert kept.base.shape == (500, 128) and kept.info["pca"] is None


@pytest.mark.slow
def test_real_seeds_embed_real_photos() -> None:
    seeds, labels, names = real_seeds(crops_per_photo=0)
    assert seeds.shape == (len(names), 1280) and len(names) >= 20
    np.testing.assert_allclose(np.linalg.norm(seeds, axis=1), 1.0, atol=1e-4)
    assert labels.tolist() == list(range(len(names)))
