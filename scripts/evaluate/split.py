"""The fixed-seed tuning/validation split every evaluation runs on.

A folder is split per top-level sub-folder (a class in category mode, a group of originals or of
distractors in copy mode): within each, files are ordered by ``sha256(seed, the file's content
sha256)`` and the first half (rounded down) is the tuning part, the rest the validation part. So:

- the same file lands in the same part whatever its name, its place in a listing, or the machine;
- the validation part is never smaller than the tuning part, in every class or group;
- files with identical content always land in the same part (never one copy on each side);
- another ``seed`` gives another split.

``scripts/datasets.py`` records the same split in each prepared collection's ``MANIFEST.json``;
``deepfeat eval`` computes it from the files, so it applies as well to any folder of one's own.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "SPLIT_SEED",
    "PARTS",
    "SPLIT_RULE",
    "FolderSplit",
    "assign_parts",
    "file_sha256",
    "split_folder",
    "split_key",
    "stratum_of",
]

SPLIT_SEED = 0
"""The seed every published figure was measured with; ``deepfeat eval --split-seed`` changes it."""
PARTS = ("tune", "validation")
SPLIT_RULE = (
    "per top-level sub-folder (class or group), files ordered by sha256(seed, content sha256): the "
    "first half (rounded down) is the tuning part, the rest the validation part"
)


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def split_key(content_sha256: str, seed: int = SPLIT_SEED) -> str:
    """The sort key of one file: a hash of the seed and its content, nothing else."""
    return hashlib.sha256(f"deepfeat-split\0{seed}\0{content_sha256}".encode()).hexdigest()


def assign_parts(entries: Sequence[tuple[str, str]], *, seed: int = SPLIT_SEED) -> list[str]:
    """The part (``"tune"`` or ``"validation"``) of each ``(stratum, content sha256)`` entry, in order.

    Within a stratum of n files the ``n // 2`` with the smallest keys are the tuning part; when that
    cut would separate files of identical content, it moves down so they all go to validation.
    """
    strata: dict[str, list[int]] = {}
    for i, (stratum, _) in enumerate(entries):
        strata.setdefault(stratum, []).append(i)
    out = [""] * len(entries)
    for members in strata.values():
        keys = {i: split_key(entries[i][1], seed) for i in members}
        order = sorted(members, key=lambda i: keys[i])
        n_tune = len(order) // 2
        while 0 < n_tune < len(order) and keys[order[n_tune - 1]] == keys[order[n_tune]]:
            n_tune -= 1
        for rank, i in enumerate(order):
            out[i] = PARTS[0] if rank < n_tune else PARTS[1]
    return out


def stratum_of(path: Path, root: Path) -> str:
    """The top-level sub-folder of ``path`` under ``root`` (``""`` for a file directly in it)."""
    parts = path.relative_to(root).parts
    return parts[0] if len(parts) > 1 else ""


@dataclass(frozen=True)
class FolderSplit:
    """One folder's files, each with its content hash and its part."""

    root: Path
    paths: tuple[Path, ...]
    sha256: tuple[str, ...]
    parts: tuple[str, ...]
    seed: int

    def part(self, name: str) -> list[Path]:
        """The files of part ``name``, in listing order."""
        if name not in PARTS:
            raise ValueError(f"unknown part {name!r}; choose one of {PARTS}")
        return [p for p, q in zip(self.paths, self.parts, strict=True) if q == name]

    def sha_of(self) -> dict[Path, str]:
        """Each file's content sha256."""
        return dict(zip(self.paths, self.sha256, strict=True))

    def counts(self) -> dict[str, int]:
        return {name: self.parts.count(name) for name in PARTS}

    def counts_by_stratum(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for path, part in zip(self.paths, self.parts, strict=True):
            row = out.setdefault(stratum_of(path, self.root), dict.fromkeys(PARTS, 0))
            row[part] += 1
        return dict(sorted(out.items()))


def split_folder(root: Path, paths: Sequence[Path], *, seed: int = SPLIT_SEED) -> FolderSplit:
    """Split ``paths`` (files under ``root``) per top-level sub-folder, by content (see the module)."""
    shas = [file_sha256(p) for p in paths]
    parts = assign_parts([(stratum_of(p, root), s) for p, s in zip(paths, shas, strict=True)], seed=seed)
    return FolderSplit(root, tuple(paths), tuple(shas), tuple(parts), seed)
