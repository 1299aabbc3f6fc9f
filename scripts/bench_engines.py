"""CPU inference engines on the embedding trunk: PyTorch eager and torch.compile against ONNX Runtime
and OpenVINO, at fp32 and, where the CPU has them, bf16 and int8, each with its agreement proven.

The unit measured is what the Embedder runs for one 224 px centre crop at one scale: the trunk up to
the model's embedding layer (its last conv block, a (n, c, h, w) map). Every engine produces that map
from the same preprocessed batch; GeM pooling and L2 normalisation then run once, in torch, the
Embedder's own ``pool``, so the vectors of all engines are comparable.

Agreement is measured, never assumed: cosine of each engine's vectors against eager fp32 PyTorch (and
against a float64 eager reference) on real photos, and a small same-source retrieval mAP on them.
Int8 is calibrated on other real photos than the ones agreement is checked on (disjoint source photos).
An engine would be adopted on this CPU class when it is at least 1.3x PyTorch as deepfeat runs it by
default (eager, channels-last, ``auto`` precision) in the same run and agrees: cosine >= 0.999 (fp32, bf16) or >= 0.99 with mAP within 0.5 points (int8).

    deepfeat bench engines --models efficientnet_lite0,resnet50 --json /tmp/engines.json
    deepfeat bench engines --engines eager,onnxruntime --precisions fp32,int8 --calib 100

Prints medians and ratios against baselines from the same run; no timing is asserted anywhere.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import importlib.metadata
import json
import logging
import os
import random
import re
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deepfeat.scripts.bench_common import COLOUR_PHOTOS, begin, command_line, echo, table, usage_error
from deepfeat.scripts.bench_machine import machine

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image

    from deepfeat.models.embedder import Embedder

__all__ = [
    "ENGINES",
    "PRECISIONS",
    "ConvMap",
    "agreement",
    "build_parser",
    "export_onnx",
    "main",
    "passes",
    "photo_sets",
    "same_source_map",
    "trunk_embedder",
    "verdict",
]

log = logging.getLogger(__name__)

ENGINES = ("eager", "compile", "onnxruntime", "openvino")
TORCH_ENGINES = ("eager", "compile")
PRECISIONS = ("fp32", "bf16", "int8")
MIN_SPEEDUP = 1.3
"""The issue's adoption rule: at least this much faster than the best PyTorch of the same run..."""
MIN_COSINE = {"fp32": 0.999, "bf16": 0.999, "int8": 0.99}
"""...and agreeing with eager fp32 PyTorch at this cosine (the minimum over the agreement photos)..."""
MAX_MAP_DROP = {"int8": 0.5}
"""...and, for int8, a retrieval mAP within this many points of eager fp32."""

PAUSE_S = 0.2
"""Pause before each engine's turn in a timing round (see :func:`interleaved_rates`)."""

GREY_PHOTOS = ("camera", "coins", "moon", "page", "text", "brick", "grass", "gravel", "clock", "cell")
"""scikit-image's greyscale photographs (converted to RGB): more distinct scenes for the two sets."""


# --------------------------------------------------------------------------------------------------
# real photos: calibration and agreement from disjoint source photos


def _crop(img: Image.Image, rng: random.Random, smallest: float = 0.5, largest: float = 1.0) -> Image.Image:
    """A random crop (``smallest`` to ``largest`` of each side), maybe mirrored, colour and
    brightness jittered."""
    from PIL import ImageEnhance, ImageOps

    w, h = img.size
    cw, ch = int(w * rng.uniform(smallest, largest)), int(h * rng.uniform(smallest, largest))
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    out = img.crop((x, y, x + cw, y + ch))
    if rng.random() < 0.5:
        out = ImageOps.mirror(out)
    out = ImageEnhance.Color(out).enhance(rng.uniform(0.7, 1.3))
    return ImageEnhance.Brightness(out).enhance(rng.uniform(0.8, 1.2))


@dataclass
class PhotoSets:
    calib: list[Image.Image]
    calib_sources: list[str]
    agree: list[Image.Image]
    agree_labels: list[int]
    """Index into ``agree_sources`` of each agreement image (the retrieval check's ground truth)."""
    agree_sources: list[str]


def photo_sets(*, calib: int, agree: int, seed: int = 0) -> PhotoSets:
    """Calibration and agreement images from real photos shipped in wheels (scikit-image, matplotlib).

    The source photos are split in two alternating halves, so no calibration image shares a source
    photo with an agreement image. Agreement holds each of its source photos whole, then random crops
    of them up to ``agree``; calibration holds ``calib`` random crops of its own sources.
    """
    from deepfeat.scripts.bench_common import real_photos

    photos = real_photos(COLOUR_PHOTOS + GREY_PHOTOS)
    calib_src, agree_src = photos[0::2], photos[1::2]
    rng = random.Random(seed)
    calib_imgs = [_crop(calib_src[i % len(calib_src)][1], rng) for i in range(calib)]
    agree_imgs = [img for _, img in agree_src][:agree]
    labels = list(range(len(agree_imgs)))
    for i in range(len(agree_imgs), agree):
        # Tighter crops than calibration's: the same-source retrieval check is then not trivially perfect.
        agree_imgs.append(_crop(agree_src[i % len(agree_src)][1], rng, 0.3, 0.8))
        labels.append(i % len(agree_src))
    return PhotoSets(
        calib=calib_imgs,
        calib_sources=[name for name, _ in calib_src],
        agree=agree_imgs,
        agree_labels=labels,
        agree_sources=[name for name, _ in agree_src],
    )


# --------------------------------------------------------------------------------------------------
# agreement


def same_source_map(vectors: np.ndarray, labels: Sequence[int]) -> float:
    """Mean average precision (points, 0-100) of finding the other images of the same source photo,
    each image querying all the others by cosine (rows of ``vectors`` are unit length)."""
    import numpy as np

    lab = np.asarray(labels)
    sims = vectors.astype(np.float64) @ vectors.astype(np.float64).T
    aps = []
    for i in range(len(lab)):
        order = [j for j in np.argsort(-sims[i], kind="stable") if j != i]
        hits = lab[order] == lab[i]
        if not hits.any():
            continue
        ranks = np.flatnonzero(hits) + 1
        aps.append(float(np.mean(np.arange(1, len(ranks) + 1) / ranks)))
    return 100.0 * float(np.mean(aps)) if aps else float("nan")


NEIGHBOURS = 10


def neighbour_overlap(vectors: np.ndarray, reference: np.ndarray, k: int = NEIGHBOURS) -> float:
    """Points (0-100): of each image's ``k`` nearest other images under ``reference``, how many are
    still among its ``k`` nearest under ``vectors`` (what a search would show), averaged."""
    import numpy as np

    def top(v: np.ndarray) -> np.ndarray:
        sims = v.astype(np.float64) @ v.astype(np.float64).T
        np.fill_diagonal(sims, -np.inf)
        return np.argsort(-sims, axis=1, kind="stable")[:, :k]

    a, b = top(vectors), top(reference)
    return 100.0 * float(np.mean([len(set(x) & set(y)) / k for x, y in zip(a, b, strict=True)]))


def agreement(
    vectors: np.ndarray,
    reference: np.ndarray,
    *,
    reference64: np.ndarray | None = None,
    labels: Sequence[int] | None = None,
    reference_map: float | None = None,
) -> dict[str, float]:
    """Cosines of each row of ``vectors`` with the same row of ``reference`` (both unit length):
    minimum and median; the same minimum against a float64 reference; the retrieval mAP and its
    difference from ``reference_map`` (points); the overlap of nearest neighbours with ``reference``'s."""
    import numpy as np

    cos = np.sum(vectors.astype(np.float64) * reference.astype(np.float64), axis=1)
    out = {"cos_min": float(cos.min()), "cos_median": float(np.median(cos))}
    if reference64 is not None:
        out["cos_min_fp64"] = float(np.sum(vectors.astype(np.float64) * reference64, axis=1).min())
    if labels is not None:
        out["map"] = same_source_map(vectors, labels)
        if reference_map is not None:
            out["map_delta"] = out["map"] - reference_map
    if len(vectors) > NEIGHBOURS:
        out["nn_overlap"] = neighbour_overlap(vectors, reference)
    return out


def passes(precision: str, agree: dict[str, float]) -> bool:
    """The issue's agreement rule for one engine's vectors against eager fp32 PyTorch."""
    if not agree or agree.get("cos_min", float("nan")) < MIN_COSINE[precision]:
        return False
    drop = MAX_MAP_DROP.get(precision)
    return drop is None or abs(agree.get("map_delta", float("inf"))) <= drop


def verdict(rows: list[dict[str, Any]], *, default_precision: str = "fp32") -> dict[str, Any]:
    """Which engine one model would use on this CPU class, from its rows (``engine``, ``precision``,
    ``img_s`` or None when it did not run, ``agrees``).

    The baseline is PyTorch as deepfeat runs it by default: eager (channels-last) at what ``auto``
    precision is on this CPU (``default_precision``); torch.compile is opt-in, since its compile
    costs minutes per process. A non-PyTorch engine is adopted when it agrees and runs at least
    ``MIN_SPEEDUP`` x that baseline; the fastest such engine wins. Otherwise PyTorch is kept.
    ``against_best_pytorch`` gives the same decision against the fastest PyTorch row (compile
    included), for the record.
    """
    ran = [r for r in rows if r.get("img_s")]
    torch_rows = [r for r in ran if r["engine"] in TORCH_ENGINES]
    if not torch_rows:
        return {"adopt": None, "reason": "no PyTorch baseline ran"}
    default = [r for r in torch_rows if r["engine"] == "eager" and r["precision"] == default_precision]
    best = max(torch_rows, key=lambda r: r["img_s"])
    out = _decide(ran, default[0] if default else best)
    if default and best is not default[0]:
        out["against_best_pytorch"] = _decide(ran, best)
    return out


def _decide(ran: list[dict[str, Any]], best: dict[str, Any]) -> dict[str, Any]:
    base = f"{best['engine']} {best['precision']}"
    others = [r for r in ran if r["engine"] not in TORCH_ENGINES]
    faster = [r for r in others if r["img_s"] >= MIN_SPEEDUP * best["img_s"]]
    candidates = [r for r in faster if r.get("agrees")]
    if not candidates:
        why = (
            "faster but disagreeing: " + ", ".join(f"{r['engine']} {r['precision']}" for r in faster)
            if faster
            else f"no engine reaches {MIN_SPEEDUP}x"
        )
        return {
            "adopt": base,
            "engine": best["engine"],
            "precision": best["precision"],
            "kept_pytorch": True,
            "baseline": base,
            "reason": why,
        }
    win = max(candidates, key=lambda r: r["img_s"])
    return {
        "adopt": f"{win['engine']} {win['precision']}",
        "engine": win["engine"],
        "precision": win["precision"],
        "kept_pytorch": False,
        "baseline": base,
        "speedup": round(win["img_s"] / best["img_s"], 2),
        "reason": f"{win['img_s'] / best['img_s']:.2f}x {base} and agrees",
    }


# --------------------------------------------------------------------------------------------------
# engines: each maps a (n, 3, H, W) float32 NCHW batch to the (n, c, h, w) float32 conv map


Run = Callable[["torch.Tensor"], "torch.Tensor"]


@dataclass
class Engine:
    engine: str
    precision: str
    run: Run | None = None
    setup_s: float = 0.0
    cached: bool = False
    status: str = "ok"
    note: str = ""
    backend: str = ""
    """For the PyTorch engines, the Embedder's backend: ``torch`` even where ``auto`` adopted OpenVINO."""


class ConvMap:
    """The trunk up to the embedding layer as a module returning the tensor (what is exported)."""

    @staticmethod
    def build(emb: Embedder) -> torch.nn.Module:
        """A contiguous-format fp32 copy of the Embedder's trunk (the same ``build_trunk`` on the
        same loaded backbone, pruned after the embedding layer), returning the map, in eval mode."""
        import torch

        from deepfeat.models.layers import build_trunk

        class _Map(torch.nn.Module):
            def __init__(self, trunk: torch.nn.Module, node: str) -> None:
                super().__init__()
                self.trunk, self.node = trunk, node

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                out: torch.Tensor = self.trunk(x)[self.node]
                return out

        net = copy.deepcopy(emb.backbone).to(memory_format=torch.contiguous_format).float()
        return _Map(build_trunk(net, {emb.layer.node: emb.layer.node}), emb.layer.node).eval()


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def _tag(*parts: object) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", "-".join(str(p) for p in parts))


def fingerprint_key(emb: Embedder) -> str:
    """Short hash of what makes the vectors: the cache key of every exported artefact."""
    text = json.dumps(emb.fingerprint, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Exporters and quantizers warn, log and draw progress bars at length: keep them off the report
    (stdout goes to stderr meanwhile) and keep their INFO logs out of the progress log."""
    names = ("", "torch.onnx", "torch.export", "nncf", "onnxscript", "onnx_ir")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING if lg.name == "root" else logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def export_onnx(module: torch.nn.Module, example: torch.Tensor, path: Path, *, dynamo: bool = True) -> Path:
    """Export the conv-map module to ONNX with a dynamic batch dimension (input ``input``, output
    ``map``): the dynamo exporter (torch.export) by default, else the legacy TorchScript one."""
    import torch

    tmp = path.with_suffix(".tmp.onnx")
    with _quiet():
        if dynamo:
            torch.onnx.export(
                module, (example,), str(tmp), input_names=["input"], output_names=["map"], dynamo=True,
                dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=4096)}}, verbose=False,
                external_data=False,
            )  # fmt: skip
        else:
            torch.onnx.export(
                module, (example,), str(tmp), input_names=["input"], output_names=["map"], dynamo=False,
                dynamic_axes={"input": {0: "batch"}}, opset_version=17,
            )  # fmt: skip
    tmp.replace(path)
    return path


def _ort_session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _ort_run(session: Any) -> Run:
    import torch

    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: x.numpy()})[0])

    return run


class _Batches:
    """onnxruntime's CalibrationDataReader over a (n, 3, H, W) tensor, ``batch`` images at a time."""

    def __init__(self, x: torch.Tensor, batch: int, input_name: str) -> None:
        self.chunks = [{input_name: x[i : i + batch].numpy()} for i in range(0, len(x), batch)]
        self.pos = 0

    def get_next(self) -> dict[str, Any] | None:
        if self.pos >= len(self.chunks):
            return None
        self.pos += 1
        return self.chunks[self.pos - 1]

    def rewind(self) -> None:
        self.pos = 0


@dataclass
class Context:
    """What every engine builder of one model needs."""

    emb: Embedder
    cache: Path
    key: str
    threads: int
    batch: int
    example: torch.Tensor
    calib: torch.Tensor
    calib_seed: int
    onnx_fp32: Path | None = None
    ov_fp32: Any = None

    def path(self, *parts: object, suffix: str) -> Path:
        return self.cache / (_tag(self.emb.spec.name, self.key, *parts) + suffix)


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


def build_torch(ctx: Context, engine: str, precision: str) -> Engine:
    """Eager or torch.compile, fp32 or bf16 autocast: the Embedder itself (channels-last), timed
    through its ``forward_intermediates``. Compiling happens on the first call: that is setup."""
    from deepfeat.models.embedder import Embedder

    compiled = engine == "compile"
    emb, seconds = _timed(
        lambda: Embedder(  # backend torch: ``auto`` runs OpenVINO where it was adopted
            ctx.emb.config,
            device="cpu",
            precision=precision,
            channels_last=True,
            compile=compiled,
            backend="torch",
        )
    )
    name = emb.layer.name

    def run(x: torch.Tensor) -> torch.Tensor:
        return emb.forward_intermediates(x)[name]

    _, first = _timed(lambda: run(ctx.example))
    note = "channels-last" + (", autocast bf16" if precision == "bf16" else "")
    if compiled:
        note += ", inductor freezing (setup = compile)"
    return Engine(
        engine, precision, run, seconds + (first if compiled else 0.0), note=note, backend=emb.backend
    )


def build_onnxruntime(ctx: Context, precision: str) -> Engine:
    """ONNX Runtime CPU: fp32 from the dynamo export (legacy when dynamo fails); int8 by static QDQ
    quantization, per channel, calibrated on ``ctx.calib``."""
    if precision == "bf16":
        return Engine(
            "onnxruntime", precision, status="skipped: the CPU execution provider has no bf16 convolutions"
        )
    exporter = "dynamo"
    tag = ("torch", _version("torch"), "onnx", _version("onnx"))
    path = ctx.path("fp32", *tag, suffix=".onnx")
    started = time.perf_counter()
    cached = path.exists()
    if not cached:
        module = ConvMap.build(ctx.emb)
        try:
            export_onnx(module, ctx.example[:2], path, dynamo=True)
        except Exception as exc:  # the dynamo exporter fails on graphs it cannot trace; fall back
            log.warning("dynamo export failed (%s), using the legacy exporter", str(exc)[:200])
            exporter = "legacy"
            export_onnx(module, ctx.example[:2], path, dynamo=False)
    ctx.onnx_fp32 = path
    if precision == "fp32":
        session = _ort_session(path, ctx.threads)
        return Engine(
            "onnxruntime", "fp32", _ort_run(session), time.perf_counter() - started, cached,
            note=f"{exporter} export" if not cached else "cached export",
        )  # fmt: skip
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    qpath = ctx.path(
        "int8",
        "u8s8",
        *tag,
        "ort",
        _version("onnxruntime"),
        "calib",
        len(ctx.calib),
        ctx.calib_seed,
        suffix=".onnx",
    )
    qcached = qpath.exists()
    if not qcached:
        pre = qpath.with_suffix(".pre.onnx")
        with _quiet():
            quant_pre_process(str(path), str(pre), skip_symbolic_shape=True)
            quantize_static(
                str(pre), str(qpath.with_suffix(".tmp.onnx")), _Batches(ctx.calib, ctx.batch, "input"),
                quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
            )  # fmt: skip
            # No CalibMaxIntermediateOutputs: onnxruntime 1.32's MinMax calibrator drops the batches
            # collected so far when it reaches that count instead of merging their ranges (and MinMax
            # keeps only per-tensor min/max outputs anyway, so memory stays small without it).
        qpath.with_suffix(".tmp.onnx").replace(qpath)
        pre.unlink(missing_ok=True)
    session = _ort_session(qpath, ctx.threads)
    return Engine(
        "onnxruntime", "int8", _ort_run(session), time.perf_counter() - started, qcached,
        # U8S8 is the x86 VNNI kernel's format; S8S8 QDQ measured ~3x slower for resnet50 here.
        note=f"QDQ U8S8 per-channel, MinMax on {len(ctx.calib)} calibration images"
        + (" (cached)" if qcached else ""),
    )  # fmt: skip


def _ov_model(ctx: Context) -> tuple[Any, bool, str]:
    """The fp32 OpenVINO model: converted from the torch module (cached as IR)."""
    import openvino as ov

    from deepfeat.models.backends import openvino_core

    path = ctx.path("fp32", "ov", _version("openvino"), "torch", _version("torch"), "ir2", suffix=".xml")
    core = openvino_core()
    if path.exists():
        return core.read_model(str(path)), True, "cached IR"
    with _quiet():
        model = ov.convert_model(ConvMap.build(ctx.emb), example_input=ctx.example[:1])
    model.reshape({model.inputs[0]: ov.PartialShape([-1, *ctx.example.shape[1:]])})
    ov.save_model(model, str(path), compress_to_fp16=False)  # the default halves the weights to fp16
    return model, False, "converted from the torch module"


def build_openvino(ctx: Context, precision: str) -> Engine:
    """OpenVINO CPU: fp32 and bf16 (the inference-precision hint) on the converted model; int8 by
    NNCF post-training quantization calibrated on ``ctx.calib``. Static batch shape, one synchronous
    request (the same work as the other engines), the same thread count."""
    import openvino as ov
    import torch

    from deepfeat.models.backends import openvino_core

    started = time.perf_counter()
    model, cached, note = _ov_model(ctx)
    hint = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}[precision]
    if precision == "int8":
        try:
            import nncf
        except ImportError:
            return Engine("openvino", precision, status="skipped: nncf not installed")
        qpath = ctx.path(
            "int8", "ov", _version("openvino"), "nncf", _version("nncf"), "calib", len(ctx.calib),
            ctx.calib_seed, "ir2", suffix=".xml",
        )  # fmt: skip
        cached = qpath.exists()
        if cached:
            model = openvino_core().read_model(str(qpath))
        else:
            items = [ctx.calib[i : i + 1].numpy() for i in range(len(ctx.calib))]
            with _quiet():
                model = nncf.quantize(model, nncf.Dataset(items), subset_size=len(items))
            ov.save_model(model, str(qpath), compress_to_fp16=False)
        note = f"NNCF default preset on {len(ctx.calib)} calibration images" + (" (cached)" if cached else "")
    model.reshape({model.inputs[0]: ov.PartialShape(list(ctx.example.shape))})
    compiled = openvino_core().compile_model(
        model,
        "CPU",
        {
            "INFERENCE_PRECISION_HINT": hint,
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": ctx.threads,
        },
    )
    request = compiled.create_infer_request()

    def run(x: torch.Tensor) -> torch.Tensor:
        out = request.infer({0: x.numpy()})
        return torch.from_numpy(out[compiled.outputs[0]].copy())

    return Engine(
        "openvino", precision, run, time.perf_counter() - started, cached, note=f"{note}, hint {hint}"
    )


# --------------------------------------------------------------------------------------------------
# measuring


def run_padded(run: Run, x: torch.Tensor, batch: int) -> torch.Tensor:
    """``run`` over ``x`` in batches of exactly ``batch`` (the last one padded by repeating its last
    image), so static-shape engines and compiled graphs see one shape."""
    import torch

    outs = []
    for i in range(0, len(x), batch):
        chunk = x[i : i + batch]
        n = len(chunk)
        if n < batch:
            chunk = torch.cat([chunk, chunk[-1:].expand(batch - n, *chunk.shape[1:])])
        outs.append(run(chunk.contiguous())[:n])
    return torch.cat(outs)


def trunk_flops(emb: Embedder, example: torch.Tensor) -> float:
    """Forward FLOPs of the conv-map trunk for one image (torch's counter: 2 per multiply-add)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        emb.forward_intermediates(example[:1])
    return float(counter.get_total_flops())


def interleaved_rates(engines: list[Engine], x: torch.Tensor, repeats: int) -> dict[int, float]:
    """Images/s of each engine on batch ``x``, the median of ``repeats`` rounds; each round calls
    every engine in turn (a slow spell of the machine hits all of them).

    Before each timed call: a short pause (the previous runtime's worker threads spin-wait a while
    after a call and would otherwise compete with this one for the cores) and one untimed call (this
    runtime's threads and caches are warm again, as they are in a loop of batches)."""
    runs: dict[int, Run] = {}
    for i, e in enumerate(engines):
        if e.run is not None:
            runs[i] = e.run
    times: dict[int, list[float]] = {i: [] for i in runs}
    for _ in range(repeats):
        for i, run in runs.items():
            time.sleep(PAUSE_S)
            run(x)
            started = time.perf_counter()
            run(x)
            times[i].append(time.perf_counter() - started)
    return {i: len(x) / statistics.median(t) for i, t in times.items()}


def _wanted(args: argparse.Namespace, engine: str, precision: str, caps: dict[str, bool]) -> Engine | None:
    """None when not asked for; a skipped Engine when the CPU lacks the precision's fast path."""
    if engine not in args.engines or precision not in args.precisions:
        return None
    if precision == "bf16" and not caps["bf16"]:
        return Engine(engine, precision, status="skipped: no native bf16 (AVX-512 BF16 / AMX) on this CPU")
    if precision == "int8" and engine in TORCH_ENGINES:
        return Engine(
            engine,
            precision,
            status="skipped: PyTorch int8 (PT2E) moved out of torch to torchao, not installed",
        )
    if precision == "int8" and not caps["int8"]:
        return Engine(engine, precision, status="skipped: no VNNI / AMX int8 on this CPU")
    return Engine(engine, precision, status="pending")


def trunk_embedder(name: str, weights: str | None = None) -> Embedder:
    """The Embedder whose trunk is measured, at fp32 on the CPU: the model's embedding layer (its last
    conv block; layer 0 would be the logits) with GeM, one 224 px centre crop at one scale, one vector
    per image (no regional, low-pass or semantic vectors, whose extra work is not the trunk's).
    ``weights`` None: the model's DEFAULT weights when they are on this machine, else random init."""
    from deepfeat.models.embedder import Embedder

    weights = weights or ("DEFAULT" if _weights_here(name) else "none")
    return Embedder(
        name, weights=weights, device="cpu", precision="fp32", channels_last=True, resize_mode="crop",
        scales=(1.0,), layer=None, pooling="gem", regions=0, lowpass=0.0, semantic_layer="none",
        backend="torch",
    )  # fmt: skip


def bench_model(
    name: str, args: argparse.Namespace, sets: PhotoSets, *, ceiling: dict[str, float], caps: dict[str, bool]
) -> dict[str, Any]:
    """Every requested engine x precision on one model: setup, agreement, interleaved throughput."""
    import torch

    emb = trunk_embedder(name, args.weights.get(name))
    calib = torch.stack(emb.preprocess(sets.calib)) if "int8" in args.precisions else torch.empty(0)
    agree_x = torch.stack(emb.preprocess(sets.agree))
    example = agree_x[: args.batch].contiguous()  # main() checks --agree >= --batch
    ctx = Context(
        emb=emb, cache=args.cache_dir, key=fingerprint_key(emb), threads=torch.get_num_threads(),
        batch=args.batch, example=example, calib=calib, calib_seed=args.seed,
    )  # fmt: skip
    echo(
        f"{name}: weights {emb.weights_identity}, layer {emb.layer.name} ({emb.layer.node}, "
        f"{emb.layer.kind} map) + GeM + L2, 224 px crop, one scale; key {ctx.key}"
    )

    # References: eager fp32 (the Embedder as shipped, at fp32) and float64 eager.
    ref_run = build_torch(ctx, "eager", "fp32")
    if ref_run.run is None:
        raise RuntimeError("eager fp32 did not build")
    reference = emb.pool(run_padded(ref_run.run, agree_x, args.batch)).numpy()
    ref_map = same_source_map(reference, sets.agree_labels)
    with torch.inference_mode():
        m64 = ConvMap.build(emb).double()
        reference64 = emb.pool(m64(agree_x.double())).numpy()
    del m64
    flops = trunk_flops(emb, example)

    engines: list[Engine] = []
    builders: dict[str, Callable[[str], Engine]] = {
        "eager": lambda p: ref_run if p == "fp32" else build_torch(ctx, "eager", p),
        "compile": lambda p: build_torch(ctx, "compile", p),
        "onnxruntime": lambda p: build_onnxruntime(ctx, p),
        "openvino": lambda p: build_openvino(ctx, p),
    }
    for engine in ENGINES:
        for precision in PRECISIONS:
            want = _wanted(args, engine, precision, caps)
            if want is None:
                continue
            if want.status != "pending":
                engines.append(want)
                continue
            log.info("%s: setting up %s %s", name, engine, precision)
            try:
                engines.append(builders[engine](precision))
            except ImportError as exc:
                engines.append(Engine(engine, precision, status=f"skipped: {exc.name or exc} not installed"))
            except Exception as exc:  # an engine that fails to build is a result to report, not a crash
                log.exception("%s %s %s failed", name, engine, precision)
                engines.append(
                    Engine(engine, precision, status=f"failed: {type(exc).__name__}: {str(exc)[:120]}")
                )

    agreements: dict[int, dict[str, float]] = {}
    for i, e in enumerate(engines):
        if e.run is None:
            continue
        log.info("%s: agreement of %s %s", name, e.engine, e.precision)
        try:
            vectors = emb.pool(run_padded(e.run, agree_x, args.batch)).numpy()
        except Exception as exc:  # noqa: BLE001  (reported in the row)
            e.status, e.run = f"failed at run: {type(exc).__name__}: {str(exc)[:120]}", None
            continue
        agreements[i] = agreement(
            vectors, reference, reference64=reference64, labels=sets.agree_labels, reference_map=ref_map
        )

    log.info("%s: timing %d engines, %d interleaved rounds", name, len(agreements), args.repeats)
    rates = interleaved_rates(engines, example, args.repeats)
    rows = _rows(name, engines, rates, agreements, flops=flops, ceiling=ceiling)
    exporters = exporter_check(ctx, agree_x, reference, reference64) if args.exporter_check else []
    return {
        "model": name,
        "weights": emb.weights_identity,
        "layer": emb.layer.name,
        "fingerprint_key": ctx.key,
        "gflops_per_image": round(flops / 1e9, 3),
        "fp32_vs_fp64_cos_min": float((reference * reference64).sum(axis=1).min()),
        "reference_map": ref_map,
        "pretrained": emb.pretrained,
        # How alike the vectors of different photos are: near 1, rankings turn on near-ties.
        "mean_cos_between_images": float((reference @ reference.T).sum() - len(reference))
        / (len(reference) * (len(reference) - 1)),
        "rows": rows,
        "exporter_check": exporters,
        "verdict": verdict(rows, default_precision=_auto_precision()),
    }


def _rows(
    model: str,
    engines: list[Engine],
    rates: dict[int, float],
    agreements: dict[int, dict[str, float]],
    *,
    flops: float,
    ceiling: dict[str, float],
) -> list[dict[str, Any]]:
    eager = next(
        (
            rates[i]
            for i, e in enumerate(engines)
            if (e.engine, e.precision) == ("eager", "fp32") and i in rates
        ),
        None,
    )
    torch_rates = [rates[i] for i, e in enumerate(engines) if e.engine in TORCH_ENGINES and i in rates]
    best_torch = max(torch_rates) if torch_rates else None
    rows = []
    for i, e in enumerate(engines):
        ips = rates.get(i)
        agree = agreements.get(i, {})
        cap = ceiling.get(e.precision)
        rows.append(
            {
                "model": model,
                "engine": e.engine,
                "precision": e.precision,
                "img_s": round(ips, 1) if ips else None,
                "x_eager_fp32": round(ips / eager, 2) if ips and eager else None,
                "x_best_torch": round(ips / best_torch, 2) if ips and best_torch else None,
                "of_ceiling": f"{flops * ips / 1e9 / cap:.0%}" if ips and cap else None,
                "cos_min": round(agree["cos_min"], 5) if agree else None,
                "cos_median": round(agree["cos_median"], 5) if agree else None,
                "cos_min_fp64": round(agree["cos_min_fp64"], 5) if agree else None,
                "map_delta": round(agree["map_delta"], 2) if agree else None,
                "nn10_overlap": round(agree["nn_overlap"], 1)
                if agree.get("nn_overlap") is not None
                else None,
                "agrees": passes(e.precision, agree) if agree else None,
                "setup_s": round(e.setup_s, 1) if e.run is not None or agree else None,
                "cached": e.cached,
                "status": e.status,
                "note": e.note,
            }
        )
    return rows


def exporter_check(
    ctx: Context, agree_x: torch.Tensor, reference: np.ndarray, reference64: np.ndarray
) -> list[dict[str, Any]]:
    """Both ONNX exporters, and the legacy one with the module left in training mode (batch-norm on
    batch statistics: the mistake that yields vectors at cosine ~0.7), each run by ONNX Runtime fp32
    on the agreement photos: whether the agreement check tells them apart."""
    import torch

    out = []
    module = ConvMap.build(ctx.emb)
    for label, dynamo, train in (
        ("dynamo", True, False),
        ("legacy", False, False),
        ("legacy, train mode", False, True),
    ):
        path = ctx.path("check", _tag(label), "torch", _version("torch"), suffix=".onnx")
        started = time.perf_counter()
        try:
            if train:
                with _quiet():
                    torch.onnx.export(
                        copy.deepcopy(module).train(), (ctx.example[:2],), str(path), input_names=["input"],
                        output_names=["map"], dynamo=False, dynamic_axes={"input": {0: "batch"}},
                        training=torch.onnx.TrainingMode.PRESERVE,
                    )  # fmt: skip
            else:
                export_onnx(module, ctx.example[:2], path, dynamo=dynamo)
            seconds = time.perf_counter() - started
            vectors = ctx.emb.pool(
                run_padded(_ort_run(_ort_session(path, ctx.threads)), agree_x, ctx.batch)
            ).numpy()
            agree = agreement(vectors, reference, reference64=reference64)
            out.append(
                {
                    "exporter": label,
                    "export_s": round(seconds, 1),
                    "cos_min": round(agree["cos_min"], 5),
                    "cos_median": round(agree["cos_median"], 5),
                    "cos_min_fp64": round(agree["cos_min_fp64"], 5),
                    "agrees": passes("fp32", agree),
                }
            )
        except Exception as exc:  # noqa: BLE001  (an exporter failing is the finding)
            failed = f"failed: {type(exc).__name__}: {str(exc)[:120]}"
            out.append({"exporter": label, "export_s": None, "cos_min": None, "agrees": failed})
    return out


def _weights_here(name: str) -> bool:
    from deepfeat.models.registry import get_model

    return get_model(name).weights_status("DEFAULT") is None


# --------------------------------------------------------------------------------------------------
# command line


def _csv(choices: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{','.join(bad) or text!r}: choose from {', '.join(choices)}")
        return items

    return parse


def _weights(text: str) -> dict[str, str]:
    """``model=weights,...`` (e.g. ``resnet50=none``)."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        model, sep, value = part.partition("=")
        if not sep or not model or not value:
            raise argparse.ArgumentTypeError(f"{part!r}: expected MODEL=WEIGHTS")
        out[model] = value
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepfeat bench engines", description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--models", default="efficientnet_lite0,resnet50", help="comma-separated model names")
    parser.add_argument(
        "--weights", type=_weights, default={},
        help="MODEL=WEIGHTS,... (default: each model's DEFAULT weights when on this machine, else none)",
    )  # fmt: skip
    parser.add_argument("--batch", type=int, default=16, help="images per forward pass (default 16)")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per engine, median (default 7)")
    parser.add_argument("--engines", type=_csv(ENGINES), default=list(ENGINES), help=",".join(ENGINES))
    parser.add_argument(
        "--precisions", type=_csv(PRECISIONS), default=list(PRECISIONS), help=",".join(PRECISIONS)
    )
    parser.add_argument("--calib", type=int, default=200, help="int8 calibration images (default 200)")
    parser.add_argument("--agree", type=int, default=64, help="agreement images (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the photo crops")
    parser.add_argument(
        "--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "deepfeat-engines",
        help="exported and quantized models, keyed by model fingerprint and engine versions (reused)",
    )  # fmt: skip
    parser.add_argument(
        "--no-exporter-check", dest="exporter_check", action="store_false",
        help="skip comparing the dynamo and legacy ONNX exporters",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, help="write everything here")
    return parser


def _capabilities() -> dict[str, bool]:
    from deepfeat.models.embedder import cpu_has_native_bf16

    flags = set(machine()["flags"])
    return {"bf16": cpu_has_native_bf16(), "int8": bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})}


def _versions() -> dict[str, str]:
    return {d: _version(d) for d in ("torch", "onnx", "onnxscript", "onnxruntime", "openvino", "nncf")}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the exit status (0, or 2 on bad arguments)."""
    parser = build_parser()
    args = begin(parser, argv, log_to_stderr=True)
    try:
        from deepfeat.models.registry import get_model

        args.models = [m for m in args.models.split(",") if m.strip()]
        for m in args.models:
            get_model(m)
        if args.batch < 1 or args.repeats < 1 or args.calib < 1 or args.agree < args.batch:
            raise ValueError("--batch, --repeats and --calib must be >= 1 and --agree >= --batch")
    except Exception as exc:  # UnknownModelError or ValueError: a usage error either way
        return usage_error(parser, exc)
    import torch

    from deepfeat.scripts.bench_extract import matmul_ceiling

    args.cache_dir.mkdir(parents=True, exist_ok=True)
    caps = _capabilities()
    versions = _versions()
    threads = torch.get_num_threads()
    echo(f"threads: {threads} (every engine); " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    ceiling = matmul_ceiling()
    echo("matmul ceiling: " + ", ".join(f"{k} {v:,.0f} GFLOP/s" for k, v in ceiling.items()))
    sets = photo_sets(calib=args.calib, agree=args.agree, seed=args.seed)
    echo(
        f"calibration: {len(sets.calib)} random crops of {', '.join(sets.calib_sources)}\n"
        f"agreement:   {len(sets.agree)} images (whole + random crops) of {', '.join(sets.agree_sources)}"
        " (disjoint source photos)"
    )
    echo(
        f"rule: adopt when >= {MIN_SPEEDUP}x eager PyTorch at auto precision ({_auto_precision()}) in this run "
        "and agreeing with eager fp32: "
        f"cos_min >= {MIN_COSINE['fp32']} (fp32, bf16), >= {MIN_COSINE['int8']} and |mAP delta| <= "
        f"{MAX_MAP_DROP['int8']} (int8)"
    )
    echo(f"batch {args.batch}, model only (conv map), median of {args.repeats} interleaved rounds")
    echo(
        "of_ceiling: FLOP rate (torch's counter) over torch.mm's measured rate at that precision, not "
        "the hardware peak (other runtimes' kernels can pass 100%); cos_* vs eager fp32, cos_min_fp64 "
        "vs float64 eager; map_delta, nn10_overlap: same-source retrieval on the agreement images"
    )
    echo()
    report: dict[str, Any] = {
        "command": command_line("deepfeat bench engines", argv),
        "machine": machine(),
        "threads": threads,
        "versions": versions,
        "capabilities": caps,
        "matmul_gflops": {k: round(v, 1) for k, v in ceiling.items()},
        "batch": args.batch,
        "repeats": args.repeats,
        "calibration": {"images": len(sets.calib), "sources": sets.calib_sources},
        "agreement": {"images": len(sets.agree), "sources": sets.agree_sources},
        "rule": {"min_speedup": MIN_SPEEDUP, "min_cosine": MIN_COSINE, "max_map_drop": MAX_MAP_DROP},
        "models": [],
    }
    for name in args.models:
        load_before = os.getloadavg()
        result = bench_model(name, args, sets, ceiling=ceiling, caps=caps)
        # Other work on the machine shows here (the lock keeps out only other benchmarks).
        result["loadavg_before_after"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
        report["models"].append(result)
        _print_model(result)
        if args.json:  # after each model, so a long run leaves what it has
            args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0


def _auto_precision() -> str:
    """What PyTorch runs at under ``--precision auto`` on this CPU: the baseline an engine must beat
    (the Embedder's own rule for ``--backend torch``)."""
    import torch

    from deepfeat.models.embedder import torch_auto_precision

    return torch_auto_precision(torch.device("cpu"))


def _verdict_text(v: dict[str, Any]) -> str:
    if v.get("adopt") is None:
        return f"none ({v['reason']})"
    if v.get("kept_pytorch"):
        return f"keep PyTorch ({v['adopt']}); {v['reason']}"
    return f"adopt {v['adopt']} on this CPU class ({v['reason']})"


_SHOWN = ("engine", "precision", "img_s", "x_eager_fp32", "x_best_torch", "of_ceiling", "cos_min",
          "cos_median", "cos_min_fp64", "map_delta", "nn10_overlap", "agrees", "setup_s", "status")  # fmt: skip


def _print_model(result: dict[str, Any]) -> None:
    shown = [{k: ("-" if r[k] is None else r[k]) for k in _SHOWN} for r in result["rows"]]
    echo(
        f"{result['model']} ({result['gflops_per_image']} GFLOP/image; eager fp32 vs float64 cos_min "
        f"{result['fp32_vs_fp64_cos_min']:.6f}; eager fp32 same-source mAP {result['reference_map']:.1f}; "
        f"1-min load average before/after {result['loadavg_before_after']}):"
    )
    echo(table(shown))
    if not result["pretrained"]:
        echo(
            f"  random-init weights: vectors of different photos average cosine "
            f"{result['mean_cos_between_images']:.3f}, so mAP and nn10 move on near-ties; cosine is the "
            "evidence here, the retrieval figures are not"
        )
    notes = [f"  {r['engine']} {r['precision']}: {r['note']}" for r in result["rows"] if r["note"]]
    if notes:
        echo("\n".join(notes))
    if result["exporter_check"]:
        echo("ONNX exporter check (ONNX Runtime fp32 on the agreement images vs eager fp32):")
        echo(table(result["exporter_check"]))
    v = result["verdict"]
    echo(f"verdict {result['model']}: {_verdict_text(v)}")
    if "against_best_pytorch" in v:
        alt = v["against_best_pytorch"]
        echo(f"  (against the fastest PyTorch of this run, {alt['baseline']}: {_verdict_text(alt)})")
    echo()


if __name__ == "__main__":
    sys.exit(main())
