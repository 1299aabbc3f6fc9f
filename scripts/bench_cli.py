"""Start-up benchmark of the ``deepfeat`` command: how long a user waits for ``--help`` and for the
commands that should answer at once, each a fresh process, the median of several runs.

The baseline in the same run is a bare ``python -c pass`` (the interpreter's own start-up), and the
report names which heavy libraries (torch, torchvision, faiss, fastapi, ray) each command imported.

    deepfeat bench cli --repeats 7
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from deepfeat.scripts.bench_machine import describe, machine

__all__ = ["main", "measure"]

HEAVY = ("torch", "torchvision", "faiss", "fastapi", "starlette", "uvicorn", "ray", "timm")
_SCRIPT = Path(sys.executable).with_name("deepfeat")
_DEEPFEAT = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "deepfeat.scripts.cli"]
"""The installed console script, as a user runs it (``python -m`` where it is not installed)."""
COMMANDS = {
    "python -c pass (baseline)": [sys.executable, "-c", "pass"],
    "deepfeat --help": [*_DEEPFEAT, "--help"],
    "deepfeat index --help": [*_DEEPFEAT, "index", "--help"],
    "deepfeat models": [*_DEEPFEAT, "models"],
    "deepfeat train-classifier --help": [*_DEEPFEAT, "train-classifier", "--help"],
}

_PROBE = (
    "import sys\nfrom deepfeat.scripts.cli import main\n"
    "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
    f"print('\\nHEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)\n"
)


def measure(argv: list[str], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        times.append(time.perf_counter() - started)
    return times


def imported(argv: list[str]) -> list[str]:
    """The heavy libraries a command line imports (none for commands other than ``deepfeat``)."""
    return imported_by(argv[len(_DEEPFEAT) :]) if argv[: len(_DEEPFEAT)] == _DEEPFEAT else []


def imported_by(args: Sequence[str], *, env: dict[str, str] | None = None) -> list[str]:
    """The heavy libraries ``deepfeat ARGS`` has imported when it finishes (a fresh process with a
    probe around the command's ``main``)."""
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, check=False, env=env
    )
    for line in done.stderr.splitlines():
        if line.startswith("HEAVY="):
            return [m for m in line[len("HEAVY=") :].split(",") if m]
    return []


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deepfeat bench cli", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="runs per command (default 7)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    print(describe(), flush=True)
    rows: list[dict[str, Any]] = []
    base: float | None = None
    for name, command in COMMANDS.items():
        measure(command, 1)  # warm the page cache (and the registry's metadata cache)
        times = measure(command, args.repeats)
        median = statistics.median(times)
        base = median if base is None else base
        heavy = imported(command)
        row: dict[str, Any] = {
            "command": name,
            "median_s": round(median, 3),
            "min_s": round(min(times), 3),
            "max_s": round(max(times), 3),
            "x_baseline": round(median / base, 1),
            "imports": heavy,
        }
        rows.append(row)
        print(
            f"{name:<34} median {row['median_s']:6.3f} s  (min {row['min_s']:.3f}, max {row['max_s']:.3f}, "
            f"{row['x_baseline']:>5}x python)  heavy imports: {', '.join(heavy) or 'none'}",
            flush=True,
        )
    if args.json:
        print(json.dumps({"machine": machine(), "repeats": args.repeats, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
