"""`deepfeat bench cli`: start-up times of real `deepfeat` processes against the interpreter alone."""

from __future__ import annotations

import json

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
    for command in ("deepfeat --help", "deepfeat models", "deepfeat index --help"):
        assert rows[command]["imports"] == [], command
    assert "torch" in rows["deepfeat train-classifier --help"]["imports"]  # the probe does see imports
    assert all(row["median_s"] > 0 for row in rows.values())
