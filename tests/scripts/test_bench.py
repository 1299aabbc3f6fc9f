"""Benchmark scripts: structure and correctness of what they measure (never their timings)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from deepfeat.models.backends import openvino_version
from deepfeat.scripts.bench_extract import (
    HOST_STAGES,
    IMAGENET_SIZES,
    MATCHED,
    _write_photos,
    end_to_end_configs,
    host_report,
    indexer_embedder,
    loop_against_model_only,
    make_photo_set,
    matmul_ceiling,
    model_flops,
    naive_index,
)
from deepfeat.scripts.bench_serve import drive
from deepfeat.settings import Settings
from tests.app.live import live_server


def test_photo_set_is_distinct_camera_sized_and_idempotent(tmp_path: Path) -> None:
    files = make_photo_set(tmp_path / "p", 4, sizes=[(800, 600), (600, 800)])
    assert [Image.open(f).size for f in files] == [(800, 600), (600, 800), (800, 600), (600, 800)]
    assert len({f.read_bytes() for f in files}) == 4
    mtimes = [f.stat().st_mtime_ns for f in files]
    assert make_photo_set(tmp_path / "p", 4) == files and [f.stat().st_mtime_ns for f in files] == mtimes


def test_photo_set_is_the_same_whichever_process_writes_it(tmp_path: Path) -> None:
    sizes = [(96, 64), (64, 96)]
    files = make_photo_set(tmp_path / "many", 32, sizes=sizes)  # written by a process pool
    single = tmp_path / "one"
    single.mkdir()
    _write_photos([(i, single / f.name) for i, f in enumerate(files[:3])], 0, sizes)
    assert [f.read_bytes() for f in files[:3]] == [(single / f.name).read_bytes() for f in files[:3]]


def test_loop_is_held_to_the_fastest_engine_at_the_auto_precision() -> None:
    def only(model: str, backend: str, precision: str, img_s: float, compiled: bool = False) -> dict:
        return {
            "model": model,
            "backend": backend,
            "precision": precision,
            "compiled": compiled,
            "img_s": img_s,
        }

    def e2e(model: str, label: str, loop: float) -> dict:
        return {"model": model, "deepfeat_config": label, "indexing_loop_img_s": loop}

    report = {
        "auto_precision": {"resnet50": "fp32", "vgg16": "fp32", "efficientnet_lite0": "fp32"},
        "model_only": [
            only("efficientnet_lite0", "torch", "bf16", 200.0),  # the class's bf16, not what auto runs
            only("efficientnet_lite0", "openvino", "fp32", 270.0),
            only("resnet50", "torch", "fp32", 16.0),
            only("resnet50", "openvino", "fp32", 25.0),
            only("resnet50", "openvino", "bf16", 90.0),  # not what auto runs here
            only("resnet50", "torch", "fp32", 40.0, compiled=True),  # never the indexer's path
        ],
        "end_to_end": [
            e2e("resnet50", "same work, auto precision, auto backend", 22.5),
            e2e("resnet50", "retrieval defaults, auto precision", 3.0),  # other work: not comparable
            e2e("vgg16", "same work, auto precision, auto backend", 5.0),  # no model-only row
            e2e("efficientnet_lite0", "same work, auto precision, auto backend", 81.0),
        ],
    }
    assert loop_against_model_only(report) == [
        {
            "model": "resnet50",
            "deepfeat_config": "same work, auto precision, auto backend",
            "indexing_loop_img_s": 22.5,
            "best_model_only_img_s": 25.0,
            "loop_of_model_only": "90%",
        },
        {
            "model": "efficientnet_lite0",
            "deepfeat_config": "same work, auto precision, auto backend",
            "indexing_loop_img_s": 81.0,
            "best_model_only_img_s": 270.0,
            "loop_of_model_only": "30%",
        },
    ]
    assert loop_against_model_only({"auto_precision": {}}) == []


def test_auto_precision_is_named_as_the_model_only_rows_name_it() -> None:
    from deepfeat.models.embedder import Embedder
    from deepfeat.scripts.bench_extract import _device_report

    report = _device_report("cpu", ["efficientnet_lite0"])
    assert report["auto_precision"] == {
        "efficientnet_lite0": Embedder("efficientnet_lite0", device="cpu").precision_in_use
    }


def test_host_work_is_profiled_on_the_indexers_own_embedder(tmp_path: Path) -> None:
    same = indexer_embedder("efficientnet_lite0", MATCHED)
    assert (same.layer.name, same.resize_mode, same.scales) == ("penultimate", "crop", (1.0,))
    assert same.vectors_per_image == 1 and same.semantic is None
    defaults = indexer_embedder("efficientnet_lite0", [])
    from deepfeat.models.identity import resolve

    assert defaults.config == resolve(Settings(weights="none").embedder)

    files = make_photo_set(tmp_path / "p", 3, sizes=IMAGENET_SIZES)
    only = [{"model": "efficientnet_lite0", "precision": "fp32", "compiled": False, "img_s": 100.0}]
    rows = host_report(
        files,
        ["efficientnet_lite0"],
        with_defaults=True,
        model_only=only,
        auto={"efficientnet_lite0": "fp32"},
    )
    assert [r["work"] for r in rows] == ["same work", "retrieval defaults"]
    same_row = rows[0]
    assert all(same_row[f"{stage}_ms"] > 0 for stage in HOST_STAGES)
    assert same_row["total_ms"] >= max(same_row[f"{stage}_ms"] for stage in HOST_STAGES)
    # every core doing the model's share and the host work: 100 img/s -> cores x 10 ms of model per image
    cores = os.cpu_count() or 1
    expected = cores * 1e3 / (cores * 10.0 + same_row["total_ms"])
    assert same_row["model_core_ms"] == pytest.approx(cores * 10.0)
    assert same_row["no_overlap_img_s"] == pytest.approx(expected, abs=0.06)
    assert "no_overlap_img_s" not in rows[1]  # the defaults do other work than the model-only rate


def test_imagenet_sized_photos_are_small(tmp_path: Path) -> None:
    files = make_photo_set(tmp_path / "small", 3, sizes=IMAGENET_SIZES)
    assert [Image.open(f).size for f in files] == IMAGENET_SIZES[:3]
    assert all(f.stat().st_size < 200_000 for f in files)


def test_end_to_end_configs_do_the_baselines_work() -> None:
    cpu = dict(end_to_end_configs("cpu", with_defaults=False, compile=True))
    # The naive loop's work exactly: one crop, one scale, the penultimate vector and nothing more.
    for flags in cpu.values():
        assert flags[: len(MATCHED)] == MATCHED
    assert {"--lowpass", "--regions", "--semantic-layer"} <= set(MATCHED)
    assert cpu["same work, auto precision, auto backend"] == MATCHED
    assert cpu["same work, auto, decode in 1 worker process"][-2:] == ["--workers", "1"]
    assert cpu["same work, auto precision, --compile"][-1] == "--compile"
    if openvino_version() is not None:
        assert cpu["same work, auto precision, --backend openvino"][-2:] == ["--backend", "openvino"]
    cuda = dict(end_to_end_configs("cuda", with_defaults=True, compile=False))
    assert "--no-gpu-decode" in cuda["same work, bf16, CPU decode"]
    assert all("--layer" in args for label, args in cuda.items() if label.startswith("same work"))
    assert cuda["retrieval defaults, auto precision"] == []
    # the cost of the richer defaults, in the same run: the earlier single-vector, one-scale setting
    earlier = cuda["1 vector, 1 scale (earlier defaults)"]
    assert earlier == ["--scales", "1", "--regions", "0", "--lowpass", "0", "--semantic-layer", "none"]


def test_flop_count_matches_the_published_figure() -> None:
    # ResNet-18 is 1.82 GMACs at 224x224, i.e. ~3.6 GFLOPs.
    assert model_flops("resnet18") / 1e9 == pytest.approx(3.64, rel=0.03)


def test_matmul_ceiling_reports_the_native_precisions() -> None:
    """bf16 only where the CPU runs it natively: emulated bf16 is no ceiling of anything deepfeat runs."""
    from deepfeat.models.embedder import cpu_has_native_bf16

    out = matmul_ceiling(size=256, repeats=1)
    assert set(out) == ({"fp32", "bf16"} if cpu_has_native_bf16() else {"fp32"})
    assert all(v > 0 for v in out.values())


def test_naive_baseline_embeds_every_file(tmp_path: Path) -> None:
    files = make_photo_set(tmp_path / "p", 2, sizes=[(640, 480)])
    assert naive_index(files, "resnet18") == 2


def test_serve_driver_counts_requests(tmp_path: Path) -> None:
    with live_server(Settings(data_dir=tmp_path / "data")) as base:
        row = drive(base, clients=2, requests=6, seconds=60)
    assert row["ok"] == 6 and row["errors"] == {} and row["p99_ms"] >= row["p50_ms"] > 0
