"""Inference backends for the embedding trunk: PyTorch (everywhere) and OpenVINO (CPU), chosen by
measurement per CPU class and model.

``deepfeat bench engines`` measures every engine on the trunk with the agreement of its vectors with
fp32 PyTorch; a backend becomes the ``auto`` choice for a (CPU class, model) only where it was at least
1.3x faster than PyTorch as deepfeat runs it there (eager, channels-last, ``auto`` precision) and its
vectors agreed at cosine >= 0.999 (docs/performance.md, "Inference engines"). Everywhere else, and
whenever OpenVINO is not installed, ``auto`` is PyTorch.

The converted model is cached on disk, keyed by everything that shapes it (the model's fingerprint,
the nodes it returns, OpenVINO's and torch's versions), so a process converts once per model and
version, never per run; OpenVINO's own compiled-blob cache sits beside it.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepfeat.models.errors import InvalidOptionError

__all__ = [
    "BACKENDS",
    "ADOPTED",
    "MIXES_WITH_TORCH",
    "OpenVinoTrunk",
    "adopted",
    "cache_dir",
    "cpu_class",
    "cpu_flags",
    "isa_cap",
    "mixes_with_torch",
    "openvino_version",
    "resolve_backend",
]

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "openvino")

ADOPTED: dict[tuple[str, str], tuple[str, str]] = {
    # 224 px crop, batch 16, 2 threads, against eager PyTorch channels-last (batch norms folded) at
    # the class's ``auto`` precision (``deepfeat bench engines``, docs/performance.md "Inference
    # engines"); every adopted pair agrees with fp32 PyTorch at cosine >= 0.999 on real photos. Pairs
    # under 1.3x stay on PyTorch.
    # AMX (amx_bf16; bf16). The ResNets and VGG16 run OpenVINO bf16, whose
    # AMX kernels PyTorch's eager bf16 does not match. lite0 runs OpenVINO fp32: faster than PyTorch
    # bf16 there, and exact. lite1 (1.21x) and lite2 (1.17x) stay on PyTorch; their OpenVINO bf16
    # agrees only to cosine 0.996-0.997.
    ("amx", "efficientnet_lite0"): ("openvino", "fp32"),  # 1.35x PyTorch bf16
    ("amx", "resnet18"): ("openvino", "bf16"),  # 2.44x
    ("amx", "resnet34"): ("openvino", "bf16"),  # 1.78x
    ("amx", "resnet50"): ("openvino", "bf16"),  # 2.81x
    ("amx", "resnet101"): ("openvino", "bf16"),  # 2.19x
    ("amx", "resnet152"): ("openvino", "bf16"),  # 2.18x
    ("amx", "vgg16"): ("openvino", "bf16"),  # 2.53x
    # AVX-512 BF16 (bf16). efficientnet_lite0/1/2 stay on PyTorch: OpenVINO bf16 agrees only to
    # cosine 0.98-0.99. resnet101 (1.27x) stays on PyTorch.
    ("avx512_bf16", "resnet18"): ("openvino", "bf16"),  # 1.41x
    ("avx512_bf16", "resnet50"): ("openvino", "bf16"),  # 1.40x
    ("avx512_bf16", "vgg16"): ("openvino", "bf16"),  # 1.35x (no batch norms to fold)
    # AVX-512 without BF16 (fp32; measured with ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI).
    ("avx512", "resnet18"): ("openvino", "fp32"),  # 1.37x
    ("avx512", "resnet101"): ("openvino", "fp32"),  # 1.37x
    ("avx512", "efficientnet_lite1"): ("openvino", "fp32"),  # 1.58x
    ("avx512", "efficientnet_lite2"): ("openvino", "fp32"),  # 1.81x
    # AVX2 (fp32; measured with ONEDNN_MAX_CPU_ISA=AVX2, ATEN_CPU_CAPABILITY=avx2).
    ("avx2", "efficientnet_lite0"): ("openvino", "fp32"),  # 1.71x
    ("avx2", "resnet50"): ("openvino", "fp32"),  # 1.33x
    ("avx2", "efficientnet_lite1"): ("openvino", "fp32"),  # 1.49x
    ("avx2", "efficientnet_lite2"): ("openvino", "fp32"),  # 1.56x
}
"""(CPU class, model) -> the backend ``auto`` picks there and the precision it runs at. That is the
class's ``auto`` precision, except where an fp32 engine beat PyTorch at the class's bf16 (then
``auto`` precision is fp32 for that model). Other precisions, and absent pairs, run PyTorch."""

MIXES_WITH_TORCH: frozenset[tuple[str, str]] = frozenset(
    {
        # (model, precision) whose OpenVINO vectors agree with fp32 PyTorch at cosine >= 0.999 on real
        # photos (min over 64; bench engines): a store takes them beside PyTorch's.
        ("efficientnet_lite0", "fp32"),
        ("efficientnet_lite1", "fp32"),
        ("efficientnet_lite2", "fp32"),
        ("resnet18", "fp32"),
        ("resnet18", "bf16"),
        ("resnet34", "bf16"),
        ("resnet50", "fp32"),
        ("resnet50", "bf16"),
        ("resnet101", "fp32"),
        ("resnet101", "bf16"),
        ("resnet152", "bf16"),
        ("vgg16", "bf16"),
    }
)


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where it cannot be read), read once."""
    try:
        return frozenset(Path("/proc/cpuinfo").read_text(encoding="ascii", errors="ignore").split())
    except OSError:
        return frozenset()


_CLASSES = ("other", "avx2", "avx512", "avx512_bf16", "amx")
"""CPU classes from least to most capable: what a measured choice is keyed by."""

# oneDNN's ISA names (ONEDNN_MAX_CPU_ISA, read by PyTorch's and OpenVINO's oneDNN alike) -> the class
# they cap kernels at; unlisted names (DEFAULT, ALL, the AMX ones) do not cap.
_ONEDNN_CAPS = {
    "SSE41": "other",
    "AVX": "other",
    "AVX2": "avx2",
    "AVX2_VNNI": "avx2",
    "AVX2_VNNI_2": "avx2",
    "AVX512_CORE": "avx512",
    "AVX512_CORE_VNNI": "avx512",
    "AVX512_CORE_BF16": "avx512_bf16",
    "AVX512_CORE_FP16": "avx512_bf16",
    "AVX10_1_512": "avx512_bf16",
}
# ATen's own vectorised kernels (ATEN_CPU_CAPABILITY); avx512 does not cap the oneDNN side.
_ATEN_CAPS = {"default": "other", "avx2": "avx2"}


def isa_cap() -> str | None:
    """The class the environment caps kernels at (``ONEDNN_MAX_CPU_ISA``, ``ATEN_CPU_CAPABILITY``), or
    None. A capped process runs the capped class's kernels, so its choices must be that class's: this
    is how one machine reproduces another's numerics, and how an AVX2-only CPU is measured on a
    larger one."""
    caps = [
        _ONEDNN_CAPS.get(os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()),
        _ATEN_CAPS.get(os.environ.get("ATEN_CPU_CAPABILITY", "").strip().lower()),
    ]
    found = [c for c in caps if c is not None]
    return min(found, key=_CLASSES.index) if found else None


def cpu_class() -> str:
    """The CPU class a measured choice applies to: ``amx``, ``avx512_bf16``, ``avx512``, ``avx2`` or
    ``other`` (x86 flags from /proc/cpuinfo, lowered to :func:`isa_cap` where the environment caps
    the kernels; anything else is ``other``)."""
    flags = cpu_flags()
    hardware = "other"
    for name, needs in (
        ("amx", "amx_bf16"),
        ("avx512_bf16", "avx512_bf16"),
        ("avx512", "avx512f"),
        ("avx2", "avx2"),
    ):
        if needs in flags:
            hardware = name
            break
    cap = isa_cap()
    if cap is not None and _CLASSES.index(cap) < _CLASSES.index(hardware):
        return cap
    return hardware


def openvino_version() -> str | None:
    """The installed OpenVINO's version, or None when it is not installed (no import needed)."""
    try:
        return importlib.metadata.version("openvino")
    except importlib.metadata.PackageNotFoundError:
        return None


def adopted(model: str, device: torch.device) -> tuple[str, str] | None:
    """The (backend, precision) a measurement adopted for ``model`` on this device, or None: ``auto``
    then runs PyTorch."""
    if device.type != "cpu" or openvino_version() is None:
        return None
    return ADOPTED.get((cpu_class(), model))


def resolve_backend(backend: str, *, model: str, device: torch.device, precision: str | None = None) -> str:
    """What ``backend`` means for this model on this machine: ``torch`` or ``openvino``.

    ``precision`` is the one in use (``fp32``, ``bf16``, ...): ``auto`` adopts a backend only at the
    precision it was measured at, so bf16 forced on an AVX2 CPU stays on PyTorch.

    Raises:
        InvalidOptionError: an unknown backend, or OpenVINO asked for where it cannot run (a CUDA
            device, or the package not installed).
    """
    if backend not in BACKENDS:
        raise InvalidOptionError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    if backend == "auto":
        found = adopted(model, device)
        if found is None or (precision is not None and precision != found[1]):
            return "torch"
        return found[0]
    if backend == "openvino":
        if device.type != "cpu":
            raise InvalidOptionError("the openvino backend runs on CPU; use device=cpu or backend=torch")
        if openvino_version() is None:
            raise InvalidOptionError(
                "the openvino backend needs the openvino package, one of deepfeat's dependencies: pip install openvino"
            )
    return backend


def mixes_with_torch(model: str, precision: str) -> bool:
    """Whether OpenVINO's vectors for ``model`` at ``precision`` may share a store with PyTorch's."""
    return (model, precision) in MIXES_WITH_TORCH


def cache_dir() -> Path:
    """Where converted models are kept: ``DEEPFEAT_CACHE_DIR``, else ``$XDG_CACHE_HOME/deepfeat``
    (``~/.cache/deepfeat``)."""
    explicit = os.environ.get("DEEPFEAT_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "deepfeat"


class _Outputs(torch.nn.Module):
    """A trunk returning {node: tensor} as a tuple in ``nodes`` order (what a converter can export)."""

    def __init__(self, trunk: torch.nn.Module, nodes: Sequence[str]) -> None:
        super().__init__()
        self.trunk = trunk
        self.nodes = tuple(nodes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.trunk(x)
        return tuple(out[node] for node in self.nodes)


@functools.cache
def openvino_core() -> Any:
    """The process's one OpenVINO ``Core``, never released.

    Each Core's CPU plugin swaps the calling thread's signal stack for one of its own (for AMX) and
    swaps the previous one back when it is destroyed. Cores destroyed out of creation order leave
    the thread on an unmapped signal stack, and the next signal delivered to it (a SIGCHLD from a
    decode worker, say) kills the process. One Core for the whole process never unwinds.
    """
    import openvino as ov

    return ov.Core()


class OpenVinoTrunk:
    """A trunk run by OpenVINO's CPU plugin: called like the torch trunk it replaces, with a
    (n, 3, H, W) batch, it returns {node: float32 tensor}. Batch size, height and width are dynamic,
    so full-image mode's sizes need no reconversion.

    One inference request per calling thread: a request is not safe to share, the compiled model is.
    """

    def __init__(
        self,
        build: Callable[[], torch.nn.Module],
        nodes: Sequence[str],
        *,
        key: dict[str, Any],
        precision: str,
        threads: int,
        example: torch.Tensor,
        cache: Path | None = None,
    ) -> None:
        import openvino as ov

        self.nodes = tuple(nodes)
        root = cache_dir() if cache is None else cache
        # "ir": what is saved. 2: fp32 weights (1 was save_model's default, weights compressed to
        # fp16, so a process loading the cache computed other vectors than the one that converted).
        identity = {
            **key, "nodes": self.nodes, "ir": 2, "openvino": openvino_version(), "torch": torch.__version__
        }  # fmt: skip
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:24]
        folder = root / "openvino" / digest
        xml = folder / "model.xml"
        core = openvino_core()
        if xml.exists():
            model = core.read_model(str(xml))
            self.converted = False
        else:
            model = self._convert(_Outputs(build(), self.nodes), example)
            self._save(model, folder, identity)
            self.converted = True
        model.reshape({model.inputs[0]: ov.PartialShape([-1, 3, -1, -1])})
        self._compiled = core.compile_model(
            model,
            "CPU",
            {
                "INFERENCE_PRECISION_HINT": {"fp32": "f32", "bf16": "bf16"}[precision],
                "PERFORMANCE_HINT": "LATENCY",
                "INFERENCE_NUM_THREADS": max(1, threads),
                "CACHE_DIR": str(root / "openvino" / "blobs"),
            },
        )
        self._local = threading.local()

    @staticmethod
    def _convert(trunk: torch.nn.Module, example: torch.Tensor) -> Any:
        import openvino as ov

        # A contiguous fp32 copy: the converter traces the module, and the caller's copy may be
        # channels-last or on its way to another precision.
        module = copy.deepcopy(trunk).float().to(memory_format=torch.contiguous_format).eval()
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            # The converter traces with torch.jit, which warns of its own deprecation on every call.
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            return ov.convert_model(module, example_input=example.float().contiguous())

    @staticmethod
    def _save(model: Any, folder: Path, identity: dict[str, Any]) -> None:
        """Written to a temp folder beside it and renamed, so a crash never leaves half an IR."""
        import openvino as ov

        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
        try:
            # Uncompressed: save_model's default halves the weights to fp16.
            ov.save_model(model, str(tmp / "model.xml"), compress_to_fp16=False)
            (tmp / "identity.json").write_text(json.dumps(identity, sort_keys=True, default=str))
            try:
                os.replace(tmp, folder)
            except OSError:  # another process finished first: theirs is the same model
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def __call__(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self._compiled.create_infer_request()
        x = np.ascontiguousarray(batch.float().numpy())
        request.infer({0: x})
        return {
            node: torch.from_numpy(np.array(request.get_output_tensor(i).data, copy=True))
            for i, node in enumerate(self.nodes)
        }


def openvino_trunk(
    build: Callable[[], torch.nn.Module],
    nodes: Sequence[str],
    *,
    key: dict[str, Any],
    precision: str,
    example: torch.Tensor,
    cache: Path | None = None,
) -> OpenVinoTrunk:
    """The trunk ``build()`` makes (returning {node: tensor}) converted for OpenVINO's CPU plugin, or
    read from the cache without calling ``build`` (tracing a trunk costs more than loading its IR).

    Args:
        key: what identifies the weights and the graph (the embedder's fingerprint).
        precision: ``fp32`` or ``bf16`` (OpenVINO's inference-precision hint).
        example: one input batch to trace with.
        cache: the cache root (default :func:`cache_dir`).
    """
    return OpenVinoTrunk(
        build, nodes, key=key, precision=precision,
        threads=torch.get_num_threads(), example=example, cache=cache,
    )  # fmt: skip
