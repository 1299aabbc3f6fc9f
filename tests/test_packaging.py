"""The distribution: one top-level package, `deepfeat`, that installs and runs on its own."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(ROOT),
        ],
        check=True,
        cwd=out,
    )
    return next(out.glob("deepfeat-*.whl"))


def test_the_wheel_holds_only_the_deepfeat_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"deepfeat"}
    for module in (
        "models/embedder.py",
        "index/store.py",
        "app/main.py",
        "scripts/cli.py",
        "app/web/index.html",
    ):
        assert f"deepfeat/{module}" in names


def test_the_wheel_installs_and_runs_in_a_fresh_venv(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True
    )
    # The dependencies (torch, faiss, ...) come from this environment's site-packages, added as a
    # plain path: its .pth files (the editable install of the checkout) are not processed there.
    site = Path(
        subprocess.check_output(
            [str(python), "-c", "import site; print(site.getsitepackages()[0])"], text=True
        ).strip()
    )
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = "import deepfeat, deepfeat.models.config as c; print(deepfeat.__file__); print(sorted(deepfeat.__all__)[:3])"
    done = subprocess.run(
        [str(python), "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env, check=True
    )
    assert str(site) in done.stdout and str(ROOT) not in done.stdout
    done = subprocess.run(
        [str(venv / "bin" / "deepfeat"), "--help"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        check=False,
    )
    assert done.returncode == 0 and "index" in done.stdout and "serve" in done.stdout
