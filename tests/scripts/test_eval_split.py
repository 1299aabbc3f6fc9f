"""The tuning/validation split of ``deepfeat eval``: deterministic, by content, disjoint, validation at
least as large as tuning in every class, independent of names and listing order."""

from __future__ import annotations

import hashlib
import random
import shutil
from pathlib import Path

import pytest

from deepfeat.scripts.evaluate.split import (
    PARTS,
    SPLIT_SEED,
    assign_parts,
    split_folder,
    split_key,
    stratum_of,
)


def _sha(i: int) -> str:
    return hashlib.sha256(f"file {i}".encode()).hexdigest()


def _entries(sizes: dict[str, int]) -> list[tuple[str, str]]:
    return [(cls, _sha(1000 * k + i)) for k, (cls, n) in enumerate(sizes.items()) for i in range(n)]


SIZES = {"birds": 35, "mammals": 62, "flowers": 25, "fruit": 39, "tiny": 1, "pair": 2, "three": 3}


def test_every_class_is_split_in_halves_validation_never_smaller() -> None:
    entries = _entries(SIZES)
    parts = assign_parts(entries)
    assert set(parts) == set(PARTS)
    for cls, n in SIZES.items():
        got = [p for (c, _), p in zip(entries, parts, strict=True) if c == cls]
        assert got.count("tune") == n // 2, cls
        assert got.count("validation") == n - n // 2 >= got.count("tune"), cls
    assert parts.count("validation") >= parts.count("tune")


def test_split_is_deterministic_and_independent_of_order() -> None:
    entries = _entries(SIZES)
    parts = dict(zip(entries, assign_parts(entries), strict=True))
    shuffled = entries[:]
    random.Random(3).shuffle(shuffled)
    again = dict(zip(shuffled, assign_parts(shuffled), strict=True))
    assert again == parts
    # a file's part depends on the seed and its content only
    assert assign_parts(entries, seed=SPLIT_SEED) == assign_parts(entries)
    other_seed = assign_parts(entries, seed=SPLIT_SEED + 1)
    assert other_seed != assign_parts(entries)
    assert split_key(_sha(1), 0) == split_key(_sha(1), 0) != split_key(_sha(1), 1)


def test_identical_content_lands_in_one_part() -> None:
    dup = _sha(7)
    for n_others in range(1, 8):
        entries = [("c", _sha(100 + i)) for i in range(n_others)] + [("c", dup), ("c", dup)]
        parts = assign_parts(entries)
        assert parts[-1] == parts[-2]
        assert parts.count("validation") >= parts.count("tune")


def _write_collection(root: Path, sizes: dict[str, int]) -> list[Path]:
    out = []
    for k, (cls, n) in enumerate(sizes.items()):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            path = root / cls / f"{cls}-{i:02d}.png"
            path.write_bytes(f"not really a png {k} {i}".encode())
            out.append(path)
    return out


def test_folder_split_is_stratified_disjoint_and_ignores_names(tmp_path: Path) -> None:
    sizes = {"a": 9, "b": 4, "c": 6}
    paths = _write_collection(tmp_path / "one", sizes)
    split = split_folder(tmp_path / "one", paths)
    tune, validation = split.part("tune"), split.part("validation")
    assert set(tune).isdisjoint(validation) and set(tune) | set(validation) == set(paths)
    assert split.counts() == {"tune": 4 + 2 + 3, "validation": 5 + 2 + 3}
    assert split.counts_by_stratum() == {
        "a": {"tune": 4, "validation": 5},
        "b": {"tune": 2, "validation": 2},
        "c": {"tune": 3, "validation": 3},
    }
    # the same files renamed and listed backwards: the same contents in the same parts
    copy = tmp_path / "two"
    renamed = []
    for path in reversed(paths):
        target = copy / path.parent.name / f"renamed-{hashlib.md5(path.name.encode()).hexdigest()}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        renamed.append(target)
    again = split_folder(copy, renamed)
    content_part = {p.read_bytes(): q for p, q in zip(split.paths, split.parts, strict=True)}
    assert {p.read_bytes(): q for p, q in zip(again.paths, again.parts, strict=True)} == content_part
    with pytest.raises(ValueError, match="unknown part"):
        split.part("test")


def test_stratum_is_the_top_level_folder(tmp_path: Path) -> None:
    assert stratum_of(tmp_path / "x.png", tmp_path) == ""
    assert stratum_of(tmp_path / "cls" / "x.png", tmp_path) == "cls"
    assert stratum_of(tmp_path / "cls" / "deep" / "x.png", tmp_path) == "cls"
