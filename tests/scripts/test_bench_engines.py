"""`deepfeat bench engines`: the agreement checks on real exports and photos, the adoption rule, the
command line. Nothing here times anything; the measurement itself runs only under ``slow``."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from deepfeat.scripts import bench_engines as be
from deepfeat.scripts.cli import main as cli_main


@pytest.fixture(scope="module")
def emb() -> Any:
    """lite0 with its bundled weights, the trunk the benchmark measures (last conv block, GeM)."""
    return be.trunk_embedder("efficientnet_lite0")


@pytest.fixture(scope="module")
def batch(emb: Any, photos: dict[str, Any]) -> torch.Tensor:
    return torch.stack(emb.preprocess([photos["chelsea"], photos["rocket"]]))


def _ort_vectors(emb: Any, path: Path, x: torch.Tensor) -> np.ndarray:
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    conv_map = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    return emb.pool(torch.from_numpy(conv_map)).numpy()


def test_exported_module_is_the_embedders_trunk(emb: Any, batch: torch.Tensor) -> None:
    with torch.inference_mode():
        ours = emb.pool(be.ConvMap.build(emb)(batch)).numpy()
    np.testing.assert_allclose(ours, emb.embed_tensors(batch), atol=1e-5)


def test_the_pytorch_rows_run_pytorch_where_auto_would_pick_openvino(
    emb: Any, batch: torch.Tensor, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The baseline an engine must beat is PyTorch itself: on a class where ``auto`` adopted OpenVINO
    (lite0 with kernels capped at AVX2), the eager rows and the reference still run PyTorch."""
    from deepfeat.models.backends import resolve_backend

    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert resolve_backend(
        "auto", model="efficientnet_lite0", device=torch.device("cpu"), precision="fp32"
    ) == ("openvino")
    reference = be.trunk_embedder("efficientnet_lite0")
    assert reference.backend == "torch"
    ctx = be.Context(
        emb=reference, cache=tmp_path, key="k", threads=1, batch=2, example=batch, calib=batch, calib_seed=0
    )
    engine = be.build_torch(ctx, "eager", "fp32")
    assert engine.backend == "torch"


def test_onnx_export_run_by_onnxruntime_agrees_with_eager(
    emb: Any, batch: torch.Tensor, tmp_path: Path
) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    path = be.export_onnx(be.ConvMap.build(emb), batch, tmp_path / "lite0.onnx", dynamo=True)
    agree = be.agreement(_ort_vectors(emb, path, batch), emb.embed_tensors(batch))
    assert agree["cos_min"] >= 0.999
    assert be.passes("fp32", agree)


def test_agreement_check_catches_an_export_left_in_training_mode(
    emb: Any, batch: torch.Tensor, tmp_path: Path
) -> None:
    """Batch norm on batch statistics: the kind of export that gave cosine ~0.7 in the issue."""
    pytest.importorskip("onnxruntime")
    path = tmp_path / "train.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            copy.deepcopy(be.ConvMap.build(emb)).train(), (batch,), str(path), input_names=["input"],
            dynamo=False, training=torch.onnx.TrainingMode.PRESERVE,
        )  # fmt: skip
    agree = be.agreement(_ort_vectors(emb, path, batch), emb.embed_tensors(batch))
    assert agree["cos_min"] < 0.999
    assert not be.passes("fp32", agree)


def _row(engine: str, precision: str, img_s: float | None, agrees: bool | None = True) -> dict[str, Any]:
    return {"engine": engine, "precision": precision, "img_s": img_s, "agrees": agrees}


def test_verdict_adopts_the_fastest_agreeing_engine_at_1_3x_default_pytorch() -> None:
    rows = [
        _row("eager", "fp32", 10.0),
        _row("eager", "bf16", 20.0, agrees=False),  # what auto runs on a bf16 CPU: the baseline there
        _row("compile", "bf16", 24.0, agrees=False),  # opt-in: not the baseline
        _row("onnxruntime", "fp32", 27.0),  # 1.35x and agrees
        _row("openvino", "fp32", 25.0),
        _row("openvino", "int8", 80.0, agrees=False),  # fastest, but disagrees
        _row("onnxruntime", "int8", None, agrees=None),  # skipped
    ]
    v = be.verdict(rows, default_precision="bf16")
    assert (v["engine"], v["precision"], v["kept_pytorch"]) == ("onnxruntime", "fp32", False)
    assert v["speedup"] == 1.35 and v["baseline"] == "eager bf16"
    # For the record, against the fastest PyTorch (compile): 1.125x, not adopted.
    alt = v["against_best_pytorch"]
    assert alt["kept_pytorch"] and alt["baseline"] == "compile bf16"
    # On a CPU where auto is fp32 the baseline is eager fp32: 2.7x.
    fp32 = be.verdict(rows, default_precision="fp32")
    assert (fp32["adopt"], fp32["baseline"], fp32["speedup"]) == ("onnxruntime fp32", "eager fp32", 2.7)


def test_verdict_keeps_pytorch_below_1_3x_or_without_agreement() -> None:
    slow = [_row("eager", "fp32", 10.0), _row("compile", "fp32", 12.0), _row("openvino", "fp32", 12.5)]
    v = be.verdict(slow)
    assert v["kept_pytorch"] and (v["engine"], v["precision"]) == ("eager", "fp32")
    assert "1.3x" in v["reason"]
    wrong = [_row("eager", "fp32", 10.0), _row("onnxruntime", "fp32", 30.0, agrees=False)]
    v = be.verdict(wrong)
    assert v["kept_pytorch"] and "disagreeing: onnxruntime fp32" in v["reason"]
    assert be.verdict([_row("openvino", "fp32", 30.0)])["adopt"] is None  # no baseline, no verdict


def test_int8_rule_needs_the_cosine_and_the_retrieval_metric() -> None:
    assert be.passes("int8", {"cos_min": 0.995, "map_delta": -0.4})
    assert not be.passes("int8", {"cos_min": 0.995, "map_delta": -0.6})
    assert not be.passes("int8", {"cos_min": 0.985, "map_delta": 0.0})
    assert not be.passes("int8", {"cos_min": 0.995})  # no retrieval figure: not proven
    assert not be.passes("fp32", {"cos_min": 0.998})


def test_same_source_map_and_neighbour_overlap_on_hand_made_vectors() -> None:
    v = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], dtype=np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    assert be.same_source_map(v, [0, 0, 1, 1]) == 100.0
    # Pairs split across the two clusters: the one positive ranks 3rd, 2nd, 3rd, 2nd of 3.
    assert be.same_source_map(v, [0, 1, 0, 1]) == pytest.approx(100 * (1 / 3 + 1 / 2) / 2)
    assert be.neighbour_overlap(v, v, k=1) == 100.0


def test_calibration_and_agreement_photos_come_from_different_sources() -> None:
    sets = be.photo_sets(calib=5, agree=12, seed=1)
    assert len(sets.calib) == 5 and len(sets.agree) == len(sets.agree_labels) == 12
    assert not set(sets.calib_sources) & set(sets.agree_sources)
    assert set(sets.agree_labels) <= set(range(len(sets.agree_sources)))


def test_parser_reads_the_options_and_refuses_unknown_engines(capsys: pytest.CaptureFixture[str]) -> None:
    args = be.build_parser().parse_args(
        ["--engines", "eager,openvino", "--precisions", "fp32,int8", "--calib", "50", "--batch", "8",
         "--weights", "resnet50=none", "--cache-dir", "/tmp/x"]
    )  # fmt: skip
    assert args.engines == ["eager", "openvino"] and args.precisions == ["fp32", "int8"]
    assert (args.calib, args.batch, args.weights, args.cache_dir) == (
        50,
        8,
        {"resnet50": "none"},
        Path("/tmp/x"),
    )
    with pytest.raises(SystemExit):
        be.build_parser().parse_args(["--engines", "tensorrt"])
    assert "choose from eager, compile" in capsys.readouterr().err


def test_deepfeat_bench_engines_is_registered_and_reports_a_bad_model(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli_main(["bench", "engines", "--models", "no_such_model"]) == 2
    captured = capsys.readouterr()
    assert captured.out.startswith("machine: ")  # the machine line comes first, as in every bench
    assert "no_such_model" in captured.err


@pytest.mark.slow
def test_full_run_on_lite0_writes_every_row_and_a_verdict(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    out = tmp_path / "engines.json"
    argv = [
        "--models", "efficientnet_lite0", "--engines", "eager,onnxruntime", "--precisions", "fp32,int8",
        "--calib", "16", "--agree", "16", "--batch", "8", "--repeats", "1", "--no-exporter-check",
        "--cache-dir", str(tmp_path / "cache"), "--json", str(out),
    ]  # fmt: skip
    assert be.main(argv) == 0
    report = json.loads(out.read_text())
    (model,) = report["models"]
    rows = {(r["engine"], r["precision"]): r for r in model["rows"]}
    assert rows["eager", "fp32"]["x_eager_fp32"] == 1.0 and rows["eager", "fp32"]["cos_min"] == 1.0
    assert rows["onnxruntime", "fp32"]["agrees"] is True
    assert rows["onnxruntime", "int8"]["img_s"] and rows["onnxruntime", "int8"]["cos_min"] > 0.5
    assert rows["eager", "int8"]["status"].startswith("skipped")
    assert model["verdict"]["adopt"]
    again = tmp_path / "again.json"
    assert be.main([*argv[:-1], str(again)]) == 0
    cached = {
        (r["engine"], r["precision"]): r["cached"] for r in json.loads(again.read_text())["models"][0]["rows"]
    }
    assert cached["onnxruntime", "fp32"] and cached["onnxruntime", "int8"]  # export and quantization reused
