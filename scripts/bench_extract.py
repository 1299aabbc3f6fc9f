"""Feature-extraction benchmark: the project's indexer against the naive baseline, in one run.

The baseline is what most tutorials and img2vec-style libraries do: open with PIL at full resolution,
torchvision transforms, one image at a time, fp32, default memory format. Both sides run as fresh
processes on the same files, so the end-to-end figures include interpreter start, model load and
decoding. Model-only throughput is compared with this machine's measured matrix-multiply ceiling.

    deepfeat bench extract --photos 400 --models efficientnet_lite0,resnet50
    deepfeat bench extract --photos 400 --rss 1000,10000
    deepfeat bench extract --device cuda --photos 1000 --compile

Prints medians and ratios; ``--json`` writes everything. No timing is asserted anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from deepfeat.scripts.bench_common import COLOUR_PHOTOS, deepfeat_command, echo, real_photos, table
from deepfeat.scripts.bench_machine import describe, machine

__all__ = ["main", "make_photo_set", "matmul_ceiling", "model_throughput", "naive_index"]

# Camera/phone resolutions the benchmark photos are resampled to (several megapixels, mixed).
CAMERA_SIZES = [
    (4032, 3024),
    (3024, 4032),
    (4000, 3000),
    (3000, 2000),
    (1920, 1080),
    (2048, 1536),
    (1280, 960),
]
# ImageNet-like JPEGs (about 0.2 MP): decoding costs little, so the loop's rate shows how well the
# cores are shared rather than what libjpeg costs per 12 MP photo.
IMAGENET_SIZES = [(500, 375), (375, 500), (500, 333), (640, 480), (500, 400)]
PHOTO_SIZES = {"camera": CAMERA_SIZES, "imagenet": IMAGENET_SIZES}


def make_photo_set(
    dest: Path, count: int, *, seed: int = 0, sizes: list[tuple[int, int]] | None = None
) -> list[Path]:
    """Write ``count`` distinct JPEGs (quality 90) made from real photos: random crop, flip, colour
    jitter, resampled to camera resolutions. Idempotent: existing files are reused. Written by
    several processes when there are many (the same files whatever the process count)."""
    dest.mkdir(parents=True, exist_ok=True)
    sizes = sizes or CAMERA_SIZES
    paths = [dest / f"photo-{i:05d}.jpg" for i in range(count)]
    todo = [(i, p) for i, p in enumerate(paths) if not p.exists()]
    if not todo:
        return paths
    workers = min(len(todo) // 16, os.cpu_count() or 1)
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        chunks = [todo[w::workers] for w in range(workers)]
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write_photos, chunks, [seed] * workers, [sizes] * workers))
    else:
        _write_photos(todo, seed, sizes)
    return paths


def _write_photos(todo: list[tuple[int, Path]], seed: int, sizes: list[tuple[int, int]]) -> None:
    from PIL import Image, ImageEnhance, ImageOps

    seeds = [photo for _, photo in real_photos(COLOUR_PHOTOS)]
    for i, path in todo:
        rng = random.Random(seed * 1_000_003 + i)
        img = seeds[i % len(seeds)]
        w, h = img.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        out = img.crop((x, y, x + cw, y + ch))
        if rng.random() < 0.5:
            out = ImageOps.mirror(out)
        out = ImageEnhance.Color(out).enhance(rng.uniform(0.6, 1.4))
        out = ImageEnhance.Brightness(out).enhance(rng.uniform(0.8, 1.2))
        out = out.resize(sizes[i % len(sizes)], Image.Resampling.BILINEAR)
        tmp = path.with_suffix(".tmp")
        out.save(tmp, "JPEG", quality=90)
        os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------
# the naive baseline (runs in its own process via `naive` sub-command)


def naive_index(files: list[Path], model_name: str, device: str = "cpu") -> int:
    """One image at a time, PIL at full resolution, torchvision transforms, fp32, NCHW (on ``device``:
    img2vec-style code does ``model.to("cuda")`` and nothing else when a GPU is there)."""
    import numpy as np
    import torch
    from torchvision import transforms

    from deepfeat.models.registry import build_seeded, get_model

    spec = get_model(model_name)
    model = build_seeded(spec.build).eval().to(device)
    pre = spec.preprocess
    tf = transforms.Compose(
        [
            transforms.Resize(pre.resize),
            transforms.CenterCrop(pre.crop),
            transforms.ToTensor(),
            transforms.Normalize(pre.mean, pre.std),
        ]
    )
    from PIL import Image

    out = []
    with torch.no_grad():
        for path in files:
            img = Image.open(path).convert("RGB")
            vec = model(tf(img).unsqueeze(0).to(device))  # logits of the full network, as img2vec does
            out.append(torch.nn.functional.normalize(vec, dim=1).cpu().numpy())
    return int(np.concatenate(out).shape[0])


# --------------------------------------------------------------------------------------------------
# model-only measurements


def matmul_ceiling(*, device: str = "cpu", size: int | None = None, repeats: int = 5) -> dict[str, float]:
    """GFLOP/s of a large square matmul per precision on ``device`` (median of ``repeats``).

    On CUDA also ``tf32``: fp32 convolutions run on TF32 tensor cores by default
    (``torch.backends.cudnn.allow_tf32``), so that is the ceiling an fp32 model is held to there."""
    import torch

    from deepfeat.models.embedder import cpu_has_native_bf16

    cuda = device.startswith("cuda")
    size = size or (8192 if cuda else 2048)
    kinds: list[tuple[str, torch.dtype, bool]] = [("fp32", torch.float32, False)]
    # Emulated bf16 (a CPU without AVX-512 BF16 / AMX, or one capped below them) is no ceiling of
    # anything deepfeat runs, and takes minutes at this size.
    if cuda or cpu_has_native_bf16():
        kinds.append(("bf16", torch.bfloat16, False))
    if cuda:
        kinds += [("tf32", torch.float32, True), ("fp16", torch.float16, False)]
    out: dict[str, float] = {}
    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        for name, dtype, allow_tf32 in kinds:
            torch.backends.cuda.matmul.allow_tf32 = allow_tf32
            a = torch.randn(size, size, dtype=dtype, device=device)
            b = torch.randn(size, size, dtype=dtype, device=device)
            torch.mm(a, b)
            times = []
            for _ in range(repeats):
                if cuda:
                    torch.cuda.synchronize()
                started = time.perf_counter()
                torch.mm(a, b)
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - started)
            out[name] = 2 * size**3 / statistics.median(times) / 1e9
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return out


def model_flops(model_name: str) -> float:
    """Forward FLOPs for one 224x224 image (torch's FLOP counter: 2 per multiply-add)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from deepfeat.models.registry import build_seeded, get_model

    spec = get_model(model_name)
    model = build_seeded(spec.build).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(torch.randn(1, 3, spec.preprocess.crop, spec.preprocess.crop))
    return float(counter.get_total_flops())


def model_throughput(
    model_name: str,
    *,
    precision: str,
    channels_last: bool,
    device: str = "cpu",
    compile: bool = False,
    backend: str = "torch",
    batch: int = 32,
    repeats: int = 5,
) -> float:
    """Images/s of the forward pass alone (full network), median over ``repeats`` batches. The batch
    is already on the device; each call returns the vectors to the host, which synchronises."""
    import torch

    from deepfeat.models.embedder import Embedder

    # One 224 px crop at one scale: exactly the FLOPs model_flops counts (the retrieval defaults run
    # three scales, which would be ~1.75x the work per image).
    emb = Embedder(
        model_name, weights="none", layer=0, device=device, precision=precision,
        channels_last=channels_last, compile=compile, backend=backend, resize_mode="crop", scales=(1.0,),
        regions=0, lowpass=0.0, semantic_layer="none",
    )  # fmt: skip
    x = torch.randn(batch, 3, emb.spec.preprocess.crop, emb.spec.preprocess.crop, device=device)
    emb.embed_tensors(x)
    emb.embed_tensors(x)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        emb.embed_tensors(x)
        times.append(time.perf_counter() - started)
    return batch / statistics.median(times)


# --------------------------------------------------------------------------------------------------
# end-to-end runs as fresh processes


def _megapixels(path: Path) -> float:
    from PIL import Image

    with Image.open(path) as img:
        return img.width * img.height / 1e6


def _timed_process(cmd: list[str]) -> tuple[float, str]:
    """Wall seconds of a child process, start to exit, and what it printed."""
    started = time.perf_counter()
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return time.perf_counter() - started, done.stdout


_RATE = re.compile(r"\(([0-9.]+) images/s embedded\)")


def _peak_rss_kib(cmd: list[str]) -> int:
    """Peak RSS of one child, read by GNU time-style wait4 (ru_maxrss of that child alone)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{cmd[:4]} failed")
    return int(usage.ru_maxrss)


MATCHED = [
    "--layer", "1", "--resize-mode", "crop", "--scales", "1",
    "--regions", "0", "--lowpass", "0", "--semantic-layer", "none",
]  # fmt: skip
EARLIER_DEFAULTS = ["--scales", "1", "--regions", "0", "--lowpass", "0", "--semantic-layer", "none"]
"""The retrieval defaults before regional, low-pass and semantic vectors and three scales: one vector
per image from the whole image at 512 px."""
"""The baseline's own work (penultimate vector of one 224 px centre crop), so the ratio compares pipelines."""


def run_end_to_end(
    photos: Path,
    files: list[Path],
    model: str,
    *,
    configs: list[tuple[str, list[str]]],
    device: str,
    repeats: int,
) -> list[dict[str, Any]]:
    """The naive baseline and each deepfeat configuration as fresh processes on the same photos,
    interleaved per repeat (so a slow spell of the machine hits all of them); medians and ratios."""
    naive_s: list[float] = []
    ours_s: dict[str, list[float]] = {label: [] for label, _ in configs}
    # The indexer's own figure: images/s from its first file to its last commit (no process start,
    # imports or model load), to tell the steady rate from the start-up cost.
    loop_rate: dict[str, list[float]] = {label: [] for label, _ in configs}
    stored_bytes: dict[str, int] = {}  # what the store holds per image: SQLite + FAISS + manifest
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            list_file = Path(tmp) / "files.txt"
            list_file.write_text("\n".join(map(str, files)))
            naive_s.append(
                _timed_process(
                    [
                        sys.executable,
                        "-m",
                        "deepfeat.scripts.bench_extract",
                        "naive",
                        str(list_file),
                        model,
                        device,
                    ]
                )[0]
            )
            for n, (label, extra) in enumerate(configs):
                seconds, printed = _timed_process(
                    deepfeat_command(
                        # The same files as the baseline (the folder may hold more from an earlier run).
                        "index", "--from-list", str(list_file), "--data-dir", str(Path(tmp) / f"data-{n}"),
                        "--model", model,
                        "--weights", "none", "--device", device, "--no-progress", *extra,
                    )
                )  # fmt: skip
                ours_s[label].append(seconds)
                data_dir = Path(tmp) / f"data-{n}"
                stored_bytes[label] = sum(f.stat().st_size for f in data_dir.rglob("*") if f.is_file())
                rate = _RATE.search(printed)
                loop_rate[label].append(float(rate.group(1)) if rate else float("nan"))
    naive = statistics.median(naive_s)
    rows = []
    for label, _ in configs:
        ours = statistics.median(ours_s[label])
        rows.append(
            {
                "model": model,
                "deepfeat_config": label,
                "images": len(files),
                "naive_s": round(naive, 2),
                "deepfeat_s": round(ours, 2),
                "naive_img_s": round(len(files) / naive, 2),
                "deepfeat_img_s": round(len(files) / ours, 2),
                "indexing_loop_img_s": round(statistics.median(loop_rate[label]), 1),
                "stored_kib_per_image": round(stored_bytes.get(label, 0) / max(1, len(files)) / 1024, 1),
                "speedup": round(naive / ours, 2),
                "repeats": repeats,
            }
        )
    return rows


def best_model_only(model_only: list[dict[str, Any]], precisions: dict[str, str]) -> dict[str, float]:
    """Per model, the fastest engine's model-only img/s at its precision in ``precisions`` (what
    ``auto`` runs), eager only: the indexer never compiles unless asked."""
    best: dict[str, float] = {}
    for row in model_only:
        if row["precision"] == precisions.get(row["model"]) and not row["compiled"]:
            best[row["model"]] = max(best.get(row["model"], 0.0), row["img_s"])
    return best


def indexer_embedder(model: str, flags: list[str], device: str = "cpu") -> Any:
    """The embedder ``deepfeat index --model M *flags`` builds (through the CLI's own parser and
    settings), so what is profiled here is what the end-to-end runs index with."""
    from deepfeat.runtime import build_embedder
    from deepfeat.scripts.cli import build_parser
    from deepfeat.scripts.cli_common import settings_from_args

    with tempfile.TemporaryDirectory() as tmp:  # no store there: no manifest's options mix in
        argv = ["index", "-", "--data-dir", str(Path(tmp) / "none"), "--model", model]
        argv += ["--weights", "none", "--device", device, *flags]
        return build_embedder(settings_from_args(build_parser(argv).parse_args(argv)))


HOST_STAGES = ("read", "hash", "decode", "model_input", "thumbnail")
"""The CPU indexer's per-file work before the model, in order (scripts/index_images.py, prepare_file)."""


def host_stages(files: list[Path], embedder: Any, *, count: int = 50) -> dict[str, float]:
    """Median milliseconds per file of each of :data:`HOST_STAGES` on one thread, over the first
    ``count`` files, and their ``total``: the core time each photo costs besides the model, which
    bounds the indexing loop on the same cores whatever the split (docs/performance.md)."""
    import hashlib

    import torch

    from deepfeat.models.images import ImageLimits, load_image, make_thumbnail

    limits = ImageLimits()
    times: dict[str, list[float]] = {name: [] for name in (*HOST_STAGES, "total")}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a decode thread's view: torch ops there run on that thread alone
    try:
        for path in files[:count]:
            marks = [time.perf_counter()]
            data = path.read_bytes()
            marks.append(time.perf_counter())
            hashlib.sha256(data).hexdigest()
            marks.append(time.perf_counter())
            loaded = load_image(data, limits=limits, draft_size=embedder.decode_size)
            marks.append(time.perf_counter())
            embedder.transform(loaded.image)
            marks.append(time.perf_counter())
            make_thumbnail(loaded.image)
            marks.append(time.perf_counter())
            for name, start, end in zip(HOST_STAGES, marks, marks[1:], strict=False):
                times[name].append(end - start)
            times["total"].append(marks[-1] - marks[0])
    finally:
        torch.set_num_threads(threads)
    return {name: round(statistics.median(values) * 1e3, 2) for name, values in times.items()}


def host_report(
    files: list[Path],
    models: list[str],
    *,
    with_defaults: bool,
    model_only: list[dict[str, Any]],
    auto: dict[str, str],
) -> list[dict[str, Any]]:
    """:func:`host_stages` per model for the baseline's work (and the defaults), and where the
    model-only rate is known, the loop's rate if host work and model never overlapped: each photo
    costs its host milliseconds plus the model's core milliseconds at the model-only rate, every core
    busy. That bounds a loop whose model keeps every core busy; where the model leaves cycles idle,
    the idle-priority decoders use them and the loop can pass it."""
    cores = os.cpu_count() or 1
    best = best_model_only(model_only, auto)
    work = [("same work", MATCHED)] + ([("retrieval defaults", [])] if with_defaults else [])
    rows = []
    for model in models:
        for label, flags in work:
            stages = host_stages(files, indexer_embedder(model, flags))
            row: dict[str, Any] = {"model": model, "work": label, **{f"{k}_ms": v for k, v in stages.items()}}
            if label == "same work" and model in best:
                model_ms = cores * 1e3 / best[model]  # core-ms per image at the model-only rate
                serial = cores * 1e3 / (model_ms + stages["total"])
                row["model_core_ms"] = round(model_ms, 2)
                row["no_overlap_img_s"] = round(serial, 1)
                row["no_overlap_of_model_only"] = f"{serial / best[model]:.0%}"
            rows.append(row)
    return rows


def end_to_end_configs(device: str, *, with_defaults: bool, compile: bool) -> list[tuple[str, list[str]]]:
    """deepfeat's side: the baseline's own work (MATCHED) at the automatic precision; on CUDA each
    precision with nvJPEG decoding, and bf16 with the decode left to CPU workers for comparison."""
    from deepfeat.models.backends import openvino_version

    if device == "cpu":
        configs = [("same work, auto precision, auto backend", [*MATCHED])]
        if openvino_version() is not None:
            configs += [
                (f"same work, auto precision, --backend {b}", [*MATCHED, "--backend", b])
                for b in ("torch", "openvino")
            ]
        # The earlier split of the cores: one decode process, the model on the others.
        configs.append(("same work, auto, decode in 1 worker process", [*MATCHED, "--workers", "1"]))
        if compile:
            configs.append(("same work, auto precision, --compile", [*MATCHED, "--compile"]))
    else:
        configs = [
            (f"same work, {p}, GPU decode", [*MATCHED, "--precision", p]) for p in ("fp32", "bf16", "fp16")
        ]
        configs.append(("same work, bf16, CPU decode", [*MATCHED, "--precision", "bf16", "--no-gpu-decode"]))
        if compile:
            configs.append(
                ("same work, bf16, GPU decode, --compile", [*MATCHED, "--precision", "bf16", "--compile"])
            )
    if with_defaults:
        # The defaults before regional descriptors and three scales, then today's: their ratio is
        # what the richer vectors cost.
        configs.append(("1 vector, 1 scale (earlier defaults)", [*EARLIER_DEFAULTS]))
        configs.append(("retrieval defaults, auto precision", []))
        if device == "cpu" and openvino_version() is not None:
            configs += [
                (f"retrieval defaults, --backend {b}", ["--backend", b]) for b in ("torch", "openvino")
            ]
    return configs


def rss_scaling(root: Path, model: str, counts: list[int], *, device: str) -> list[dict[str, Any]]:
    """Peak RSS of `deepfeat index` at growing collection sizes (small distinct JPEGs)."""
    rows = []
    for count in counts:
        folder = root / f"rss-{count}"
        make_photo_set(folder, count, seed=7, sizes=[(480, 360), (360, 480), (640, 426)])
        with tempfile.TemporaryDirectory() as tmp:
            kib = _peak_rss_kib(
                deepfeat_command(
                    "index", str(folder), "--data-dir", str(Path(tmp) / "data"), "--model", model,
                    "--weights", "none", "--device", device, "--no-progress", *MATCHED,
                )
            )  # fmt: skip
        rows.append({"images": count, "peak_rss_mib": round(kib / 1024, 1)})
    return rows


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepfeat bench extract",
        description=(__doc__ or "").split("\n\n")[0].replace("``", "`"),
    )
    sub = parser.add_subparsers(dest="command")
    naive = sub.add_parser("naive", help=argparse.SUPPRESS)
    naive.add_argument("list_file", type=Path)
    naive.add_argument("model")
    naive.add_argument("device", nargs="?", default="cpu")
    parser.add_argument("--photos", type=int, default=400, help="number of benchmark photos (default 400)")
    parser.add_argument(
        "--photo-size",
        choices=sorted(PHOTO_SIZES),
        default="camera",
        help="camera: 1-12 MP JPEGs (default); imagenet: about 0.2 MP, where decoding is cheap",
    )
    parser.add_argument(
        "--photo-dir",
        type=Path,
        help="where the benchmark photos are made and kept (default: a folder per --photo-size in the temp dir)",
    )
    parser.add_argument("--models", default="efficientnet_lite0,resnet50")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile (slow to compile)")
    parser.add_argument("--repeats", type=int, default=1, help="end-to-end repeats (median)")
    parser.add_argument(
        "--rss", default="", help="also report peak RSS at these image counts, e.g. 1000,10000"
    )
    parser.add_argument("--skip-model-only", action="store_true")
    parser.add_argument("--skip-end-to-end", action="store_true")
    parser.add_argument(
        "--with-defaults",
        action="store_true",
        help="also time the retrieval defaults (full image, 3 scales: several times the baseline's work)",
    )
    parser.add_argument("--json", type=Path, help="write all results here")
    return parser


def _device_report(device: str, models: list[str]) -> dict[str, Any]:
    """The device, its torch threads and what ``--precision auto`` resolves to there, per model."""
    import torch

    from deepfeat.models.embedder import auto_precision

    report: dict[str, Any] = {
        "machine": machine(),
        "device": device,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    if device.startswith("cuda"):
        report["gpu"] = torch.cuda.get_device_name(0)
    # Named as the model-only rows name precisions, so each loop is held to the rate `auto` runs at.
    report["auto_precision"] = {model: auto_precision(model, torch.device(device)) for model in models}
    return report


def _model_only(models: list[str], device: str, *, compile: bool) -> dict[str, Any]:
    """Forward-pass throughput per model, backend and precision against this machine's matmul ceiling."""
    from deepfeat.models.backends import openvino_version
    from deepfeat.models.embedder import cpu_has_native_bf16

    cuda = device.startswith("cuda")
    # bf16 without native support is emulated, slower than fp32, and never what `auto` runs.
    cpu_precisions = ("fp32", "bf16") if cpu_has_native_bf16() else ("fp32",)
    ceiling = matmul_ceiling(device=device)
    echo("matmul ceiling: " + ", ".join(f"{k} {v:,.0f} GFLOP/s" for k, v in ceiling.items()))
    echo()
    # fp32 convolutions use TF32 tensor cores on CUDA by default: hold them to that ceiling.
    ceiling_of = {"fp32": "tf32" if cuda else "fp32", "bf16": "bf16", "fp16": "fp16"}
    variants: list[tuple[str, bool, bool, str]] = (
        [(p, True, False, "torch") for p in ("fp32", "bf16", "fp16")] + [("fp32", False, False, "torch")]
        if cuda
        else [(p, cl, False, "torch") for p in cpu_precisions for cl in (False, True)]
    )
    if compile:
        variants.append(("bf16" if cuda else cpu_precisions[-1], True, True, "torch"))
    if not cuda and openvino_version() is not None:
        variants += [(p, False, False, "openvino") for p in cpu_precisions]
    batch = 256 if cuda else 32
    rows = []
    for model in models:
        flops = model_flops(model)
        for precision, channels_last, compiled, backend in variants:
            ips = model_throughput(
                model, precision=precision, channels_last=channels_last, device=device,
                compile=compiled, backend=backend, batch=batch,
            )  # fmt: skip
            achieved = flops * ips / 1e9
            rows.append(
                {
                    "model": model,
                    "backend": backend,
                    "precision": precision,
                    "channels_last": channels_last,
                    "compiled": compiled,
                    "img_s": round(ips, 1),
                    "gflops_per_img": round(flops / 1e9, 2),
                    "achieved_gflops": round(achieved, 1),
                    "of_ceiling": f"{achieved / ceiling[ceiling_of[precision]]:.0%}",
                }
            )
            echo(f"  {rows[-1]}")
    echo(f"model only (batch {batch}, forward pass, median of 5):\n" + table(rows))
    echo()
    return {"matmul_gflops": {k: round(v, 1) for k, v in ceiling.items()}, "model_only": rows}


def _end_to_end(
    args: argparse.Namespace, models: list[str], device: str, report: dict[str, Any]
) -> dict[str, Any]:
    """The naive baseline and deepfeat's configurations as fresh processes on the benchmark photos,
    after (on CPU) the host work per photo."""
    files = make_photo_set(args.photo_dir, args.photos, sizes=PHOTO_SIZES[args.photo_size])
    megapixels = statistics.median(_megapixels(f) for f in files[:50])
    out: dict[str, Any] = {}
    if device == "cpu":
        host = host_report(
            files, models, with_defaults=args.with_defaults,
            model_only=report.get("model_only", []), auto=report["auto_precision"],
        )  # fmt: skip
        echo(
            f"host work per photo before the model (ms on one thread, median of {min(50, len(files))};"
            " no overlap: the loop's rate if this work and the model never shared a moment):\n" + table(host)
        )
        echo()
        out["host_stages"] = host
    configs = end_to_end_configs(device, with_defaults=args.with_defaults, compile=args.compile)
    rows = []
    for model in models:
        rows += run_end_to_end(
            args.photo_dir, files, model, configs=configs, device=device, repeats=args.repeats
        )
    echo(
        f"end to end ({len(files)} JPEGs, median {megapixels:.1f} MP; process start, decode, model, store):\n"
        + table(rows)
    )
    echo()
    return {**out, "end_to_end": rows, "photos_median_megapixels": round(megapixels, 1)}


def loop_against_model_only(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each end-to-end configuration's indexing loop as a share of the fastest model-only rate of its
    model at the precision ``auto`` resolves to (both at batch 32): how much of the model's speed
    survives decoding, hashing, thumbnails and commits on the same cores."""
    best = best_model_only(report.get("model_only", []), report["auto_precision"])
    rows = []
    for row in report.get("end_to_end", []):
        ceiling = best.get(row["model"])
        if ceiling and row["deepfeat_config"].startswith("same work"):
            rows.append(
                {
                    "model": row["model"],
                    "deepfeat_config": row["deepfeat_config"],
                    "indexing_loop_img_s": row["indexing_loop_img_s"],
                    "best_model_only_img_s": ceiling,
                    "loop_of_model_only": f"{row['indexing_loop_img_s'] / ceiling:.0%}",
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.photo_dir is None:
        suffix = "" if args.photo_size == "camera" else f"-{args.photo_size}"
        args.photo_dir = Path(tempfile.gettempdir()) / f"deepfeat-bench-photos{suffix}"
    if args.command == "naive":  # the baseline's own process: nothing but its work is timed
        files = [Path(line) for line in args.list_file.read_text().splitlines() if line]
        naive_index(files, args.model, args.device)
        return 0
    echo(describe())

    from deepfeat.models.embedder import resolve_device

    device = str(resolve_device(args.device))
    models = [m for m in args.models.split(",") if m]
    report = _device_report(device, models)
    if not args.skip_model_only:
        report.update(_model_only(models, device, compile=args.compile))
    if not args.skip_end_to_end:
        report.update(_end_to_end(args, models, device, report))
    against = loop_against_model_only(report)
    if against:
        report["loop_against_model_only"] = against
        echo(
            "indexing loop against the fastest engine's model-only rate at the precision auto runs"
            f" ({', '.join(f'{m} {p}' for m, p in report['auto_precision'].items())}), batch 32:\n"
            + table(against)
        )
        echo()
    if args.rss:
        counts = [int(c) for c in args.rss.split(",") if c]
        rss = rss_scaling(args.photo_dir.parent, models[0], counts, device=device)
        report["peak_rss"] = rss
        echo(f"peak RSS of `deepfeat index` ({models[0]}):\n" + table(rss))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
