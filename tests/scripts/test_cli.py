"""The ``deepfeat`` command: models, index, search, classify, and its error reporting."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from deepfeat.scripts.cli import main
from tests.conftest import jpeg_bytes


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_models_lists_availability_and_layers(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    code, out, _ = run(capsys, "models")
    assert code == 0
    assert "efficientnet_lite0  [weights available]" in out
    assert "resnet50  [weights not available]" in out and "resnet50-11ad3fa6.pth" in out
    assert "vgg16  [weights not available]" in out
    assert "k=1  penultimate  dim=2048" in out
    code, out, _ = run(capsys, "models", "--json")
    rows = {row["name"]: row for row in json.loads(out)}
    assert rows["efficientnet_lite0"]["weights_available"] is True
    assert (
        rows["resnet18"]["weights_available"] is False and "not on this machine" in rows["resnet18"]["reason"]
    )
    assert [layer["dim"] for layer in rows["vgg16"]["layers"]][:3] == [1000, 4096, 4096]


def test_index_search_classify(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, photo_dir: Path, photos: dict[str, Image.Image]
) -> None:
    data = str(tmp_path / "data")
    code, out, _ = run(capsys, "index", str(photo_dir), "--data-dir", data, "--workers", "0", "--no-progress")
    assert code == 0 and f"indexed {len(photos)}, already present 0, failed 0" in out

    query = tmp_path / "query.jpg"
    query.write_bytes(jpeg_bytes(photos["rocket"], quality=70, scale=0.7))
    code, out, _ = run(capsys, "search", str(query), "-k", "2", "--data-dir", data, "--json")
    body = json.loads(out)
    assert code == 0 and len(body["results"]) == 2 and body["results"][0]["source"].endswith("rocket.jpg")
    code, out, _ = run(capsys, "search", str(query), "-k", "1", "--data-dir", data)
    assert code == 0 and "rocket.jpg" in out

    # More like this by id: the stored vector, the image itself left out.
    rocket_id = body["results"][0]["id"]
    code, out, _ = run(capsys, "search", "--id", rocket_id, "-k", "3", "--data-dir", data, "--json")
    similar = json.loads(out)
    assert code == 0 and similar["query"] == {"id": rocket_id} and len(similar["results"]) == 3
    assert rocket_id not in [r["id"] for r in similar["results"]]
    code, _, err = run(capsys, "search", "--id", "0" * 32, "--data-dir", data)
    assert code == 2 and err.startswith("error [not_found]")
    code, _, err = run(capsys, "search", str(query), "--id", rocket_id, "--data-dir", data)
    assert code == 2 and err.startswith("error [usage]")

    # Filters: the indexer records no metadata, so filter on the source (the sub-folder's photos).
    in_sub = json.dumps({"source": {"$prefix": str(photo_dir / "sub") + "/"}})
    code, out, _ = run(
        capsys, "search", str(query), "-k", "10", "--filter", in_sub, "--data-dir", data, "--json"
    )
    sources = [r["source"] for r in json.loads(out)["results"]]
    assert code == 0 and sources and all("/sub/" in s for s in sources)
    assert len(sources) == len([p for p in (photo_dir / "sub").iterdir()])
    code, out, _ = run(capsys, "search", "--id", rocket_id, "--filter", in_sub, "--data-dir", data, "--json")
    assert code == 0 and all("/sub/" in r["source"] for r in json.loads(out)["results"])
    code, out, _ = run(capsys, "search", str(query), "--filter", '{"album": "none"}', "--data-dir", data)
    assert code == 0 and out.strip() == "no results: no image matches the filter"
    code, _, err = run(capsys, "search", str(query), "--filter", '{"a": {"$regex": 1}}', "--data-dir", data)
    assert code == 2 and err.startswith("error [invalid_filter]: filter.a: unknown operator '$regex'")
    code, out, _ = run(capsys, "duplicates", "--filter", in_sub, "--data-dir", data, "--json")
    assert code == 0

    cat = tmp_path / "cat.jpg"
    cat.write_bytes(jpeg_bytes(photos["chelsea"]))
    code, out, _ = run(capsys, "classify", str(cat), "-k", "3", "--json")
    preds = json.loads(out)["predictions"]
    assert code == 0 and len(preds) == 3 and preds[0]["class_index"] in (281, 282, 285)

    # Another layer on the same store is refused with the stable code, not a traceback.
    code, _, err = run(capsys, "search", str(query), "--data-dir", data, "--layer", "logits")
    assert code == 2 and "error [incompatible_index]" in err and "layer" in err


def test_errors_are_one_line_with_a_code(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    text = tmp_path / "a.jpg"
    text.write_text("not an image")
    code, _, err = run(capsys, "classify", str(text))
    assert code == 2 and err.startswith("error [unsupported_format]")
    code, out, _ = run(capsys, "search", str(text), "--data-dir", str(tmp_path / "none"))
    assert code == 2 and "no_store" in out
    code, _, err = run(capsys, "classify", str(text), "--model", "alexnet")
    assert code == 2 and "error [unknown_model]" in err
    code, _, err = run(capsys, "index", str(tmp_path), "--data-dir", str(tmp_path / "d"), "--batch-size", "0")
    assert code == 2 and "error [invalid_setting]" in err and "batch_size" in err
    # A mistyped folder: refused before a model loads or a store is made.
    code, out, err = run(capsys, "index", str(tmp_path / "photoz"), "--data-dir", str(tmp_path / "new"))
    assert code == 2 and err == f"error [not_found]: no such file or folder: {tmp_path / 'photoz'}\n"
    assert not (tmp_path / "new").exists()
    code, _, err = run(capsys, "duplicates", "--neighbours", "0", "--data-dir", str(tmp_path / "none"))
    assert code == 2 and err == "error [invalid_option]: --neighbours must be at least 1, got 0\n"
    for command in ("search", "classify"):  # the same mistake, the same code
        code, _, err = run(capsys, command, str(text), "-k", "0", "--data-dir", str(tmp_path / "none"))
        assert code == 2 and err == "error [invalid_option]: -k must be at least 1, got 0\n"
    code, _, err = run(
        capsys, "classify", str(text), "--model", "resnet50", "--weights", str(tmp_path / "missing.pth")
    )
    assert code == 2 and "error [weights_unavailable]" in err and "missing.pth" in err


def test_console_script_is_installed(tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "deepfeat"
    assert exe.exists(), "pip install -e . provides the deepfeat command"
    result = subprocess.run(
        [str(exe), "--help"], capture_output=True, text=True, timeout=120, env={**os.environ}
    )
    assert result.returncode == 0
    for command in ("models", "index", "search", "classify", "serve", "weights"):
        assert command in result.stdout


def test_serve_on_a_port_in_use_is_one_coded_line_before_the_model_loads(tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "deepfeat"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [str(exe), "serve", "--port", str(port), "--data-dir", str(tmp_path / "d")],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"error [address_in_use]: cannot listen on 127.0.0.1:{port}: ")
    assert result.stderr.count("\n") == 1 and not (tmp_path / "d").exists()


def test_whiten_and_duplicates(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, photo_dir: Path, photos: dict[str, Image.Image]
) -> None:
    data = str(tmp_path / "data")
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "chelsea-small.jpg").write_bytes(jpeg_bytes(photos["chelsea"], quality=80, scale=0.8))
    assert (
        run(
            capsys, "index", str(photo_dir), str(extra), "--data-dir", data, "--workers", "0", "--no-progress"
        )[0]
        == 0
    )

    code, out, _ = run(capsys, "duplicates", "--data-dir", data, "--threshold", "0.9", "--json")
    groups = json.loads(out)
    assert (
        code == 0
        and len(groups) == 1
        and sorted(Path(r["source"]).name for r in groups[0]) == ["chelsea-small.jpg", "chelsea.jpg"]
    )

    code, out, _ = run(capsys, "whiten", "--data-dir", data, "--dim", "4")
    assert code == 0 and "1280 -> 4" in out
    query = tmp_path / "q.jpg"
    query.write_bytes(jpeg_bytes(photos["coffee"], scale=0.7))
    code, out, _ = run(capsys, "search", str(query), "-k", "1", "--data-dir", data, "--json")
    assert code == 0 and json.loads(out)["results"][0]["source"].endswith("coffee.jpg")
    code, out, _ = run(capsys, "whiten", "--data-dir", data, "--dim", "3", "--from", str(photo_dir))
    assert code == 0 and "1280 -> 3" in out and f"{len(photos)} images" in out
    code, out, _ = run(capsys, "whiten", "--data-dir", data, "--remove")
    assert code == 0 and "removed" in out
    code, _, err = run(capsys, "whiten", "--data-dir", data, "--dim", "5000")
    assert code == 2 and "error [invalid_argument]" in err


def _modules_after(argv: list[str], tmp_path: Path) -> set[str]:
    """The heavy libraries a real ``deepfeat`` process had imported when its command finished."""
    from deepfeat.scripts.bench_cli import imported_by

    return set(imported_by(argv, env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}))


def test_help_and_models_load_no_heavy_library(tmp_path: Path) -> None:
    # The first run on a machine reads torchvision's weights metadata once and caches it.
    assert "torchvision" in _modules_after(["models"], tmp_path)
    for argv in (["--help"], ["models"], ["train-classifier", "--help"], ["compare-classifiers", "--help"]):
        loaded = _modules_after(argv, tmp_path)
        assert not loaded & {"torch", "torchvision", "faiss", "fastapi", "starlette", "uvicorn", "ray"}, argv


def test_classify_does_not_load_the_web_stack(tmp_path: Path, photos: dict[str, Image.Image]) -> None:
    cat = tmp_path / "cat.jpg"
    cat.write_bytes(jpeg_bytes(photos["chelsea"]))
    loaded = _modules_after(["classify", str(cat), "-k", "1"], tmp_path)
    assert "torch" in loaded  # it did classify
    assert not loaded & {"fastapi", "starlette", "uvicorn"}


def test_list_settings_take_the_same_syntax_in_the_environment(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from deepfeat.settings import Settings

    monkeypatch.setenv("DEEPFEAT_SCALES", "1,0.7071")
    assert Settings().scales == (1.0, 0.7071)
    monkeypatch.setenv("DEEPFEAT_SCALES", "[1, 0.5]")
    assert Settings().scales == (1.0, 0.5)
    monkeypatch.setenv("DEEPFEAT_SCALES", "1,big")
    code, _, err = run(capsys, "search", str(tmp_path / "q.jpg"), "--data-dir", str(tmp_path))
    assert code == 2 and err.startswith("error [invalid_setting]: scales") and err.count("\n") == 1
    assert "(got 'big')" in err and err.count("scales") == 1  # the first problem, not its consequences
    monkeypatch.delenv("DEEPFEAT_SCALES")
    code, _, err = run(capsys, "search", str(tmp_path / "q.jpg"), "--scales", "5")
    assert code == 2 and err.startswith("error [invalid_setting]: scales") and "[0.1, 2]" in err


def test_add_semantic_to_an_older_store(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, photo_dir: Path, photos: dict[str, Image.Image]
) -> None:
    """A store without semantic vectors: visual search works, semantic is a coded error; add-semantic
    fills every image whose file is still there and lists the one moved away; then semantic works."""
    import shutil

    folder = tmp_path / "photos"
    shutil.copytree(photo_dir, folder)
    data = str(tmp_path / "data")
    flags = [
        "--data-dir",
        data,
        "--layer",
        "head",
        "--resize-mode",
        "crop",
        "--scales",
        "1",
        "--precision",
        "fp32",
    ]
    code, out, _ = run(
        capsys,
        "index",
        str(folder),
        *flags,
        "--regions",
        "0",
        "--semantic-layer",
        "none",
        "--workers",
        "0",
        "--no-progress",
    )
    assert code == 0 and f"indexed {len(photos)}" in out
    query = tmp_path / "query.jpg"
    query.write_bytes(jpeg_bytes(photos["coffee"], quality=70, scale=0.7))
    code, _, err = run(capsys, "search", str(query), "--data-dir", data, "--similarity", "semantic")
    assert code == 2 and err.startswith("error [semantic_unavailable]") and "add-semantic" in err
    code, out, _ = run(capsys, "search", str(query), "--data-dir", data, "-k", "1")
    assert code == 0 and "coffee.jpg" in out

    moved, edited = sorted(folder.rglob("*.jpg"))[:2]
    moved.rename(tmp_path / "elsewhere.jpg")
    edited.write_bytes(jpeg_bytes(photos["rocket"], quality=40))  # other content under the same path
    code, out, err = run(capsys, "add-semantic", "--data-dir", data, "--semantic-layer", "none")
    assert (code, out) == (
        2,
        "",
    ) and err == "error [invalid_argument]: --semantic-layer none: there is nothing to add\n"
    code, out, _ = run(capsys, "add-semantic", "--data-dir", data, "--precision", "fp32")
    assert code == 0, out
    assert f"missing  {moved}" in out and f"changed  {edited}" in out
    assert f"to {len(photos) - 2} images" in out and "2 skipped (1 missing, 1 changed" in out
    assert "deepfeat index" in out and "restart a running service" in out
    code, out, _ = run(capsys, "search", str(query), "--data-dir", data, "--similarity", "semantic", "--json")
    body = json.loads(out)
    assert code == 0 and body["results"][0]["source"].endswith("coffee.jpg")
    assert body["model"]["semantic"] == {  # today's default, adopted by the older store
        "layer": "gem-logits+penultimate",
        "dim": 2280,
        "gem_p": 3.0,
        "penultimate_weight": 1.25,
    }
    assert len(body["results"]) == len(photos) - 2  # the moved and the edited image have none
    # Nothing left to do that can be done; the visual side is unchanged.
    code, out, _ = run(capsys, "add-semantic", "--data-dir", data, "--json", "--precision", "fp32")
    summary = json.loads(out)
    assert code == 0 and summary["added"] == 0 and summary["missing"] == 1 and summary["changed"] == 1
    assert {"source": str(moved), "reason": "missing"} in summary["skipped"]
    code, out, _ = run(capsys, "add-semantic", "--data-dir", data, "--precision", "fp32")
    assert code == 0 and "to 0 images" in out and "restart" not in out  # the store had them already
    code, out, _ = run(capsys, "search", str(query), "--data-dir", data, "-k", "1")
    assert code == 0 and "coffee.jpg" in out
    manifest = json.loads((Path(data) / "manifest.json").read_text())
    assert manifest["embedder"]["semantic_layer"] == "gem-logits+penultimate"

    # Re-indexing where the moved file went gives it its semantic vector (same content, no new row).
    code, out, _ = run(
        capsys, "index", str(tmp_path / "elsewhere.jpg"), *flags, "--workers", "0", "--no-progress"
    )
    assert code == 0 and "indexed 0, already present 1" in out, out
    code, out, _ = run(capsys, "search", str(query), "--data-dir", data, "--similarity", "semantic", "--json")
    assert len(json.loads(out)["results"]) == len(photos) - 1


@pytest.mark.parametrize(("given", "expected"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_the_server_sleeps_its_openmp_threads_unless_told_otherwise(given: str | None, expected: str) -> None:
    """Set before torch loads (OpenMP reads it once), in a fresh interpreter as `deepfeat serve` is."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given is not None:
        env["OMP_WAIT_POLICY"] = given
    code = (
        "import os, sys; from deepfeat.scripts.cli import server_environment, _cap_malloc_arenas; "
        "assert _cap_malloc_arenas(2); "
        "assert 'torch' not in sys.modules; server_environment(); print(os.environ['OMP_WAIT_POLICY'])"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected


def test_a_missing_query_fails_before_the_model_loads(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    missing = str(tmp_path / "missing.jpg")
    for command in ("search", "classify"):
        code, _, err = run(capsys, command, missing, "--data-dir", str(tmp_path / "data"))
        assert (
            code == 2
            and err.startswith("error [invalid_image]: cannot read image file")
            and "missing.jpg" in err
        )
        loaded = _modules_after([command, missing, "--data-dir", str(tmp_path / "data")], tmp_path)
        assert "torch" not in loaded, command


def test_eval_and_datasets_help_is_their_own(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["eval", "--help"], ["eval", "-h"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        out = capsys.readouterr().out
        assert exit_.value.code == 0 and out.startswith("usage: deepfeat eval")
        assert "{category,copy}" in out and "deepfeat eval service --help" in out
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "service", "--help"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("usage: deepfeat eval service")
    assert main(["eval", "bogus", "folder"]) == 2
    assert capsys.readouterr().err == (
        "error [usage]: unknown eval mode 'bogus'; choose one of: category, copy, service, duplicates\n"
    )
    with pytest.raises(SystemExit) as exit_:
        main(["datasets", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and out.startswith("usage: deepfeat datasets") and "prepare-all" in out
    assert main(["datasets", "list"]) == 0 and "tuxpaint" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main(["search", "--no-such-flag", "q.jpg"])
    assert exit_.value.code == 2 and "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
