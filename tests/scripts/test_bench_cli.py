"""`deepfeat bench cli`: start-up times of real `deepfeat` processes against the interpreter alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deepfeat.scripts import bench_cli


def test_bench_cli_reports_every_command_with_its_heavy_imports(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_cli.main(["--repeats", "1", "--json"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("machine: ")
    report = json.loads(out[out.index("{") :])
    rows = {row["command"]: row for row in report["rows"]}
    assert set(rows) == set(bench_cli.COMMANDS)
    assert rows["python -c pass (baseline)"]["x_baseline"] == 1.0
    for command in rows:
        assert rows[command]["imports"] == [], command  # train-classifier's --help too
    assert all(row["median_s"] > 0 for row in rows.values())


def test_the_probe_sees_the_imports_of_a_command_that_loads_a_model(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    heavy = bench_cli.imported_by(["index", str(tmp_path / "empty"), "--data-dir", str(tmp_path / "data")])
    assert "torch" in heavy and "faiss" in heavy
