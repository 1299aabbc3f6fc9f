"""One definition of the defaults: the README's configuration table, Settings, the library's
Embedder, a store made by `deepfeat index` with no options, and what /v1/stats reports all agree."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from deepfeat.models.config import POOLINGS, EmbedderConfig
from deepfeat.scripts.config_table import END, START, default_text, render
from deepfeat.settings import Settings

README = Path(__file__).resolve().parents[1] / "README.md"


def _documented() -> dict[str, str]:
    """DEEPFEAT_* name -> the default the README's configuration table shows."""
    block = README.read_text(encoding="utf-8").split(START)[1].split(END)[0]
    rows = {}
    for line in block.splitlines():
        match = re.match(r"\| `DEEPFEAT_(\w+)` \| [^|]+ \| `([^`]*)` \|", line)
        if match:
            rows[match.group(1).lower()] = match.group(2)
    return rows


@pytest.fixture(autouse=True)
def _no_deepfeat_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("DEEPFEAT_"):
            monkeypatch.delenv(name)


def test_the_readme_table_is_the_generated_one() -> None:
    block = README.read_text(encoding="utf-8").split(START)[1].split(END)[0].strip()
    assert block == render(), "run: python -m deepfeat.scripts.config_table --write README.md"


def test_every_documented_default_is_the_settings_default() -> None:
    documented = _documented()
    assert set(documented) == set(Settings.model_fields)
    settings = Settings()
    for name, text in documented.items():
        assert text == default_text(Settings.model_fields[name]), name
        value = getattr(settings, name)
        if isinstance(value, tuple):
            assert ",".join(f"{x:g}" for x in value) == text, name
    # The vector options are EmbedderConfig's own: no second declaration to drift.
    assert settings.embedder == EmbedderConfig()
    assert settings.scales == (1.0, 0.7071, 0.5) and settings.precision == "auto"


def test_pooling_choices_are_the_implemented_ones() -> None:
    from deepfeat.models.pooling import list_poolings

    assert list(POOLINGS) == list_poolings()


def test_library_cli_store_and_stats_agree_on_the_defaults(
    tmp_path: Path, photo_dir: Path, photos: dict[str, Image.Image]
) -> None:
    from deepfeat.app.main import create_app
    from deepfeat.index.store import ImageStore
    from deepfeat.models.embedder import Embedder
    from deepfeat.runtime import build_embedder
    from deepfeat.scripts.cli import main

    library = Embedder(device="cpu")
    resolved = library.config
    assert resolved == Embedder(EmbedderConfig(), device="cpu").config
    # Resolved against the model: the layer, the pooling and the semantic vector are named.
    resolved_here = {"layer", "pooling", "semantic_layer"}
    assert resolved.model_dump(exclude=resolved_here) == EmbedderConfig().model_dump(exclude=resolved_here)
    assert (resolved.layer, resolved.pooling) == ("head", "gem")
    assert (EmbedderConfig().semantic_layer, resolved.semantic_layer) == ("auto", "gem-logits+penultimate")
    assert build_embedder(Settings(data_dir=tmp_path / "none", device="cpu")).config == resolved

    data = tmp_path / "data"
    one = tmp_path / "one"
    one.mkdir()
    (one / "chelsea.jpg").write_bytes((photo_dir / "chelsea.jpg").read_bytes())
    assert main(["index", str(one), "--data-dir", str(data), "--workers", "0", "--no-progress"]) == 0
    manifest = ImageStore.read_manifest(data)
    assert manifest is not None and manifest.embedder == json.loads(resolved.model_dump_json())
    assert manifest.fingerprint == json.loads(json.dumps(library.fingerprint))
    # What computed the vectors, beside what they are: the defaults' backend and precision here.
    assert manifest.extra["written_by"] == library.numerics
    # What `auto` measured fastest for the default model on this CPU class (models/backends.py).
    from deepfeat.models.backends import ADOPTED, cpu_class
    from deepfeat.models.embedder import auto_precision

    assert library.numerics["backend"] == ADOPTED.get((cpu_class(), "efficientnet_lite0"), ("torch", ""))[0]
    assert library.numerics["precision"] == auto_precision("efficientnet_lite0", library.device)

    with TestClient(create_app(Settings(data_dir=data, device="cpu"))) as client:
        stats = client.get("/v1/stats").json()
        ready = client.get("/ready").json()
    model = stats["model"]
    assert model["config"] == json.loads(resolved.model_dump_json())
    assert model["precision"] in ("fp32", "bf16")  # what auto resolved to, never "auto"
    assert model["backend"] == library.numerics["backend"]  # likewise for the backend
    assert ready["model"] == model
    per_image = 1 + int(resolved.lowpass > 0) + resolved.regions**2  # global, low-pass, regional grid
    assert (stats["count"], stats["vectors_per_image"], stats["vectors"]) == (1, per_image, per_image)
