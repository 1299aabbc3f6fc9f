"""The OpenVINO backend: vectors that agree with PyTorch's, a conversion cached once, the measured
choice of ``auto``, and stores that refuse vectors that would not mix."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deepfeat.index.errors import IncompatibleIndexError
from deepfeat.index.store import ImageStore
from deepfeat.models import backends
from deepfeat.models import embedder as embedder_module
from deepfeat.models.backends import ADOPTED, cpu_class, resolve_backend
from deepfeat.models.embedder import Embedder
from deepfeat.models.errors import InvalidOptionError

pytest.importorskip("openvino")

CHEAP = {"resize_mode": "full", "max_side": 256, "scales": (1.0,)}
"""Full-image mode (sizes vary per image, so the converted model must take any size), regions and
the semantic vector on (what the store keeps; read from the head map the visual vector already
needs, so one converted trunk serves both), at a small side to stay fast."""


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("engine-cache")


@pytest.fixture(scope="module")
def torch_fp32() -> Embedder:
    return Embedder("efficientnet_lite0", device="cpu", precision="fp32", backend="torch", **CHEAP)


@pytest.fixture(scope="module")
def ov_fp32(cache: Path) -> Embedder:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DEEPFEAT_CACHE_DIR", str(cache))
        return Embedder("efficientnet_lite0", device="cpu", precision="fp32", backend="openvino", **CHEAP)


def test_openvino_vectors_agree_with_pytorch_on_real_photos(
    photos: dict[str, Image.Image], torch_fp32: Embedder, ov_fp32: Embedder
) -> None:
    assert ov_fp32.backend == "openvino" and torch_fp32.backend == "torch"
    images = list(photos.values())
    tensors = torch_fp32.preprocess(images)
    assert len({tuple(t.shape) for t in tensors}) > 1  # several sizes in one call
    ref, ref_sem = torch_fp32.embed_tensors(tensors, regions=True, semantic=True)
    got, got_sem = ov_fp32.embed_tensors(tensors, regions=True, semantic=True)
    assert got.shape == ref.shape and got_sem.shape == ref_sem.shape
    assert (got * ref).sum(-1).min() >= 0.999  # every vector of every photo: global, low-pass, regions
    assert (got_sem * ref_sem).sum(-1).min() >= 0.999
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-5)
    # Mixing is allowed for this pair (measured), so the store sees the same fingerprint.
    assert ov_fp32.fingerprint == torch_fp32.fingerprint


def test_the_conversion_is_cached_and_reused(
    cache: Path, ov_fp32: Embedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    saved = sorted(p.name for p in (cache / "openvino").iterdir() if p.name != "blobs")
    assert saved and not any(name.startswith(".") for name in saved)  # no temp folder left
    monkeypatch.setenv("DEEPFEAT_CACHE_DIR", str(cache))
    traced: list[tuple[str, ...]] = []
    build_trunk = embedder_module.build_trunk

    def counting(net: torch.nn.Module, nodes: dict[str, str]) -> torch.nn.Module:
        traced.append(tuple(nodes))
        return build_trunk(net, nodes)

    monkeypatch.setattr(embedder_module, "build_trunk", counting)
    again = Embedder("efficientnet_lite0", device="cpu", precision="fp32", backend="openvino", **CHEAP)
    assert again._pair is None  # the semantic vector reads the visual layer's map
    assert again._single is not None and again._single.converted is False  # type: ignore[union-attr]
    # Loading the converted model traces nothing: only the all-layers trunk (classify) is built.
    assert traced == [tuple(spec.node for spec in again.spec.layers)]
    # And what it loaded computes what the first conversion computed.
    batch = torch.rand(2, 3, 192, 256)
    np.testing.assert_allclose(again.embed_tensors(batch), ov_fp32.embed_tensors(batch), atol=1e-6)
    assert sorted(p.name for p in (cache / "openvino").iterdir() if p.name != "blobs") == saved


SIGNAL_AFTER_TWO_EMBEDDERS = """
import gc, os, signal
from deepfeat.models.embedder import Embedder
kw = dict(resize_mode="full", max_side=256, scales=(1.0,))
first = Embedder("efficientnet_lite0", device="cpu", precision="fp32", backend="openvino", **kw)
second = Embedder("efficientnet_lite0", device="cpu", precision="fp32", backend="openvino", **kw)
del first, second  # released in creation order, not the reverse
gc.collect()
signal.signal(signal.SIGUSR1, lambda *_: None)
os.kill(os.getpid(), signal.SIGUSR1)  # handled on the thread's signal stack
print("alive")
"""


def test_embedders_released_in_any_order_leave_signal_delivery_working(
    cache: Path, ov_fp32: Embedder
) -> None:
    """OpenVINO's CPU plugin swaps in a signal stack of its own per Core: with a Core per embedder,
    releasing them out of order left the thread on an unmapped stack and the next signal (a decode
    worker's SIGCHLD) killed the process with SIGSEGV."""
    env = {**os.environ, "DEEPFEAT_CACHE_DIR": str(cache)}
    done = subprocess.run(
        [sys.executable, "-c", SIGNAL_AFTER_TWO_EMBEDDERS],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and "alive" in done.stdout, (done.returncode, done.stderr[-2000:])


def test_vectors_that_would_not_mix_are_refused_by_the_store(
    tmp_path: Path, cache: Path, torch_fp32: Embedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OpenVINO bf16 lite0 vectors agree with fp32 PyTorch only to cosine ~0.98 (bench engines): a
    store made with PyTorch refuses them, and one made with them refuses PyTorch's."""
    monkeypatch.setenv("DEEPFEAT_CACHE_DIR", str(cache))
    ov_bf16 = Embedder("efficientnet_lite0", device="cpu", precision="bf16", backend="openvino", **CHEAP)
    assert ov_bf16.fingerprint["numerics"] == "openvino-bf16"
    ImageStore.open(tmp_path / "a", fingerprint=torch_fp32.fingerprint, dim=torch_fp32.dim).close()
    with pytest.raises(IncompatibleIndexError, match="numerics"):
        ImageStore.open(tmp_path / "a", fingerprint=ov_bf16.fingerprint, dim=ov_bf16.dim)
    ImageStore.open(tmp_path / "b", fingerprint=ov_bf16.fingerprint, dim=ov_bf16.dim).close()
    with pytest.raises(IncompatibleIndexError, match="numerics"):
        ImageStore.open(tmp_path / "b", fingerprint=torch_fp32.fingerprint, dim=torch_fp32.dim)


def test_auto_is_the_measured_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    for model in ("efficientnet_lite0", "resnet50", "vgg16"):
        expected = ADOPTED.get((cpu_class(), model), ("torch", ""))[0]
        assert resolve_backend("auto", model=model, device=cpu) == expected
    measured = {
        # (class, model): lite0 keeps PyTorch bf16 where the CPU has it (OpenVINO bf16 does not agree,
        # OpenVINO fp32 is not 1.3x); at fp32 on AVX2 OpenVINO wins, on AVX-512 it ties on lite0.
        ("avx512_bf16", "efficientnet_lite0"): "torch",
        ("avx512_bf16", "resnet50"): "openvino",
        ("avx512_bf16", "resnet34"): "torch",
        ("avx512", "efficientnet_lite0"): "torch",
        ("avx512", "efficientnet_lite1"): "openvino",
        ("avx512", "resnet50"): "torch",
        ("avx2", "efficientnet_lite0"): "openvino",
        ("avx2", "resnet50"): "openvino",
        ("avx2", "vgg16"): "torch",
        ("other", "efficientnet_lite0"): "torch",
        # AMX: OpenVINO's AMX kernels win for every ResNet and VGG16, and OpenVINO fp32 beats PyTorch
        # bf16 on lite0; lite1 and lite2 keep PyTorch.
        ("amx", "efficientnet_lite0"): "openvino",
        ("amx", "efficientnet_lite1"): "torch",
        ("amx", "resnet34"): "openvino",
        ("amx", "vgg16"): "openvino",
    }
    for (klass, model), backend in measured.items():
        monkeypatch.setattr(backends, "cpu_class", lambda klass=klass: klass)
        assert resolve_backend("auto", model=model, device=cpu) == backend, (klass, model)
    # Only at the precision it was measured at: bf16 forced on AVX2 (emulated there) stays on PyTorch.
    monkeypatch.setattr(backends, "cpu_class", lambda: "avx2")
    assert resolve_backend("auto", model="resnet50", device=cpu, precision="fp32") == "openvino"
    assert resolve_backend("auto", model="resnet50", device=cpu, precision="bf16") == "torch"
    monkeypatch.setattr(backends, "cpu_class", lambda: "avx512_bf16")
    assert resolve_backend("auto", model="resnet50", device=cpu, precision="bf16") == "openvino"
    assert resolve_backend("auto", model="resnet50", device=cpu, precision="fp32") == "torch"
    # Never on a GPU, and never without the package.
    monkeypatch.setattr(backends, "cpu_class", lambda: "avx2")
    assert resolve_backend("auto", model="efficientnet_lite0", device=torch.device("cuda")) == "torch"
    monkeypatch.setattr(backends, "openvino_version", lambda: None)
    assert resolve_backend("auto", model="efficientnet_lite0", device=cpu) == "torch"


def test_every_adopted_backend_mixes_with_pytorch_at_the_precision_auto_gives_there() -> None:
    """So ``auto`` never changes a fingerprint: stores and Ray actors on other machines agree."""
    for (cpu, model), (backend, precision) in ADOPTED.items():
        assert backend == "openvino"
        # The class's own precision, or fp32 where the engine beat the class's bf16 PyTorch.
        assert precision in ({"bf16", "fp32"} if cpu in ("amx", "avx512_bf16") else {"fp32"}), (cpu, model)
        assert backends.mixes_with_torch(model, precision), (cpu, model)


def test_auto_precision_is_the_adopted_engines_where_one_was_adopted(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setattr(backends, "cpu_class", lambda: "amx")
    # lite0 on AMX: OpenVINO fp32 was measured faster than PyTorch bf16, so auto runs fp32 there.
    assert embedder_module.auto_precision("efficientnet_lite0", cpu) == "fp32"
    assert embedder_module.auto_precision("resnet50", cpu) == "bf16"
    class_precision = "bf16" if embedder_module.cpu_has_native_bf16() else "fp32"
    assert embedder_module.auto_precision("efficientnet_lite1", cpu) == class_precision  # none adopted
    # Without the package, or off the CPU, nothing is adopted: the class's own precision.
    monkeypatch.setattr(backends, "openvino_version", lambda: None)
    assert embedder_module.auto_precision("efficientnet_lite0", cpu) == class_precision


def test_an_embedder_on_auto_runs_the_adopted_engine_at_its_precision(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Both ``auto``: the pair ADOPTED names. A forced backend or precision keeps its own rule."""
    monkeypatch.setattr(backends, "cpu_class", lambda: "amx")
    lite0 = Embedder("efficientnet_lite0", device="cpu", **CHEAP)
    assert lite0.numerics == {"backend": "openvino", "precision": "fp32", "device": "cpu"}
    assert "numerics" not in lite0.fingerprint  # mixes with PyTorch's vectors
    forced = Embedder("efficientnet_lite0", device="cpu", backend="torch", **CHEAP)
    class_precision = "bf16" if embedder_module.cpu_has_native_bf16() else "fp32"
    assert forced.numerics == {"backend": "torch", "precision": class_precision, "device": "cpu"}
    compiled = Embedder("efficientnet_lite0", device="cpu", compile=True, **CHEAP)  # compiles lazily
    assert compiled.compiled and compiled.numerics["backend"] == "torch"  # compile asks for PyTorch
    if class_precision == "bf16":  # bf16 asked for: not what was adopted, so PyTorch runs it
        asked = Embedder("efficientnet_lite0", device="cpu", precision="bf16", **CHEAP)
        assert asked.numerics["backend"] == "torch"


def test_bad_backend_requests_name_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    with pytest.raises(
        InvalidOptionError, match="unknown backend 'onnx'; choose one of: auto, torch, openvino"
    ):
        resolve_backend("onnx", model="resnet50", device=cpu)
    with pytest.raises(InvalidOptionError, match="runs on CPU"):
        resolve_backend("openvino", model="resnet50", device=torch.device("cuda"))
    with pytest.raises(
        InvalidOptionError, match="compile applies to the torch backend; use backend torch or auto"
    ):
        Embedder("efficientnet_lite0", device="cpu", backend="openvino", compile=True)
    monkeypatch.setattr(backends, "openvino_version", lambda: None)
    with pytest.raises(InvalidOptionError, match="needs the openvino package.*pip install openvino"):
        resolve_backend("openvino", model="resnet50", device=cpu)


def test_cpu_class_reads_the_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    assert cpu_class() in ("amx", "avx512_bf16", "avx512", "avx2", "other")
    flags = {"avx2", "fma", "avx512f", "avx512_bf16"}
    monkeypatch.setattr(backends, "cpu_flags", lambda: frozenset(flags))
    assert cpu_class() == "avx512_bf16"
    flags.discard("avx512_bf16")
    assert cpu_class() == "avx512"
    flags.discard("avx512f")
    assert cpu_class() == "avx2"
    flags.clear()
    assert cpu_class() == "other"


@pytest.mark.parametrize(
    ("onednn", "aten", "expected"),
    [
        ("AVX2", None, "avx2"),
        ("avx2_vnni", None, "avx2"),
        ("AVX512_CORE", None, "avx512"),
        ("AVX512_CORE_BF16", None, "avx512_bf16"),
        (None, "avx2", "avx2"),
        (None, "default", "other"),
        ("AVX512_CORE", "avx2", "avx2"),  # the lower cap wins
        ("ALL", None, "amx"),  # no cap: the hardware's class
        (None, "avx512", "amx"),  # ATen's avx512 does not cap oneDNN
        ("NOT_AN_ISA", None, "amx"),
    ],
)
def test_an_isa_cap_lowers_the_class_and_never_raises_it(
    monkeypatch: pytest.MonkeyPatch, onednn: str | None, aten: str | None, expected: str
) -> None:
    """ONEDNN_MAX_CPU_ISA / ATEN_CPU_CAPABILITY make PyTorch and OpenVINO run a lower class's kernels,
    so the measured choices must be that class's; a cap above the hardware changes nothing."""
    for name, value in (("ONEDNN_MAX_CPU_ISA", onednn), ("ATEN_CPU_CAPABILITY", aten)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    monkeypatch.setattr(
        backends, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16"})
    )
    assert cpu_class() == expected
    monkeypatch.setattr(backends, "cpu_flags", lambda: frozenset({"avx2"}))
    assert cpu_class() == ("other" if expected == "other" else "avx2")


def test_a_capped_process_runs_fp32_where_the_hardware_has_bf16() -> None:
    """``auto`` precision follows the cap: bf16 emulated on AVX2 kernels would be slower than fp32."""
    code = (
        "import torch; from deepfeat.models.embedder import _resolve_precision; "
        "from deepfeat.models.backends import cpu_class; "
        "print(cpu_class(), _resolve_precision('auto', torch.device('cpu')))"
    )
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    if "avx2" not in backends.cpu_flags():
        assert done.stdout.split()[0] == "other"
    else:
        assert done.stdout.split() == ["avx2", "None"]


def test_openvino_bf16_without_native_bf16_is_refused_up_front(monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenVINO would only fail at the first inference; the embedder says so when it is built."""
    from deepfeat.models import embedder

    monkeypatch.setattr(embedder, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(embedder, "cpu_class", lambda: "avx2")
    with pytest.raises(
        InvalidOptionError, match=r"bf16 only on CPUs with AVX-512 BF16 or AMX \(this one is avx2\)"
    ):
        Embedder("efficientnet_lite0", device="cpu", precision="bf16", backend="openvino", **CHEAP)
