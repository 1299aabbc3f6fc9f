"""A store written by deepfeat 0.1.0 (tests/fixtures/store-0.1.0: four photos indexed with that
version's defaults, before manifests recorded the embedder's options) opens and searches unchanged,
and a writer records its options in the manifest, atomically."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from deepfeat.models.config import EmbedderConfig
from deepfeat.settings import Settings

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "store-0.1.0"
CHELSEA = "dced3762547c423a98b07f1fb63f7520"
ORDER = [
    CHELSEA,
    "fd011f3ac7284b4ab2189171900276c1",
    "c16d66dbe47c4d1998f8ed2b859d785d",
    "9ab1155056fb42299bb98c158cf3e5b2",
]


def _query(photos: dict[str, Image.Image]) -> Image.Image:
    buf = io.BytesIO()
    photos["chelsea"].save(buf, "JPEG", quality=85)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


@pytest.mark.parametrize("read_only", [True, False])
def test_a_0_1_store_opens_and_searches(
    tmp_path: Path, photos: dict[str, Image.Image], read_only: bool
) -> None:
    from deepfeat.runtime import build_embedder, open_store, read_manifest

    data = tmp_path / "store"
    shutil.copytree(FIXTURE, data)
    before = (data / "manifest.json").read_text()
    settings = Settings(data_dir=data, device="cpu")
    embedder = build_embedder(settings, read_manifest(settings))
    # The options come from the store, not from today's defaults (three scales).
    assert embedder.config.scales == (1.0,) and embedder.config.layer == "head"
    with open_store(settings, embedder, read_only=read_only) as store:
        hits = store.search(embedder.embed([_query(photos)]), 4)[0]
    assert [h.id for h in hits] == ORDER and hits[0].score > 0.99
    manifest = json.loads((data / "manifest.json").read_text())
    if read_only:
        assert (data / "manifest.json").read_text() == before
    else:
        assert EmbedderConfig.model_validate(manifest["embedder"]) == embedder.config
        assert manifest["fingerprint"] == json.loads(before)["fingerprint"]
        assert not [p.name for p in data.iterdir() if "tmp" in p.name]


def test_explicit_options_that_differ_from_the_store_are_refused(tmp_path: Path) -> None:
    from deepfeat.index.errors import IncompatibleIndexError
    from deepfeat.runtime import build_embedder, open_store, read_manifest

    data = tmp_path / "store"
    shutil.copytree(FIXTURE, data)
    settings = Settings(data_dir=data, device="cpu", scales="1,0.5")
    embedder = build_embedder(settings, read_manifest(settings))
    with pytest.raises(IncompatibleIndexError, match="scales"):
        open_store(settings, embedder)


def test_from_fingerprint_reads_every_option() -> None:
    fingerprint = json.loads((FIXTURE / "manifest.json").read_text())["fingerprint"]
    config = EmbedderConfig.from_fingerprint(fingerprint)
    assert config == EmbedderConfig(
        model="efficientnet_lite0",
        weights="DEFAULT",
        layer="head",
        pooling="gem",
        gem_p=3.0,
        resize_mode="full",
        max_side=512,
        scales=(1.0,),
        regions=0,  # written before regional descriptors: one vector per image
        lowpass=0.0,
        semantic_layer=None,  # and before semantic vectors
    )
