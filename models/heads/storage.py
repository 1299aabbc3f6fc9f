"""Saved heads on disk: ``DATA_DIR/classifiers/NAME/`` with ``head.json`` and one weight file.

``head.json`` records the classes, the embedder fingerprint the head was trained with (and which of its
keys must match the server's), metrics, training settings and checksums of the weight files. A head is
written to a temporary directory and renamed into place, so it is either complete or absent; it is
read back checksum-verified, and refused when the running embedder makes other features.

Replacing a head (``--overwrite``) swaps the new directory and the old one in one ``renameat2``
(``RENAME_EXCHANGE``), so a process killed at any moment leaves the old head or the new one under the
name, never neither. Temporary directories follow the data dir's naming rule
(``.<name>.tmp-<pid>-<random>``, hidden so listings skip them); the next save in the same folder
removes those whose process is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import io
import json
import logging
import os
import re
import secrets
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepfeat import fingerprints
from deepfeat.models.embedder import FINGERPRINT_VERSION
from deepfeat.models.heads.errors import (
    CorruptHeadError,
    HeadError,
    HeadExistsError,
    IncompatibleHeadError,
    InvalidHeadNameError,
)
from deepfeat.models.heads.linear import LinearHead

__all__ = [
    "HEAD_FORMAT_VERSION",
    "MANIFEST_FILE",
    "METHODS",
    "RESERVED_NAMES",
    "FINETUNE_COMPATIBLE_KEYS",
    "HeadManifest",
    "check_head_name",
    "check_compatible",
    "save_head",
    "read_manifest",
    "load_linear",
    "load_finetune_state",
    "linear_bytes",
    "finetune_bytes",
    "iter_head_dirs",
    "remove_stale_saves",
]

log = logging.getLogger(__name__)

HEAD_FORMAT_VERSION = 1
MANIFEST_FILE = "head.json"
LINEAR_FILE = "linear.npz"
FINETUNE_FILE = "finetune.pt"
METHODS = ("linear", "finetune")
RESERVED_NAMES = frozenset({"imagenet", "knn"})
"""Built-in classifiers the service always offers; a saved head may not take their names."""

FINETUNE_COMPATIBLE_KEYS = ("version", "model", "weights", "pretrained")
"""A fine-tuned head runs its own copy of the backbone on the classification crop, so it only needs the
same base network and weights as the server; layer, pooling and resize mode of the store do not matter."""

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_head_name(name: str) -> str:
    """A head name is a directory name: 1-64 of ``A-Z a-z 0-9 _ . -``, not starting with ``.``/``-``/``_``.

    Raises:
        InvalidHeadNameError: Anything else, or a reserved name (``imagenet``, ``knn``).
    """
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise InvalidHeadNameError(
            f"invalid classifier name {name!r}: use 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit"
        )
    if name.lower() in RESERVED_NAMES:
        raise InvalidHeadNameError(
            f"classifier name {name!r} is reserved (built-in: {', '.join(sorted(RESERVED_NAMES))})"
        )
    return name


@dataclass(frozen=True)
class HeadManifest:
    """The parsed ``head.json``."""

    name: str
    method: str
    classes: tuple[str, ...]
    fingerprint: dict[str, Any]
    compatible_on: tuple[str, ...] | None = None
    """Fingerprint keys that must match the server's (None: all of them, as for the store)."""
    metrics: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    created_at: float = 0.0
    format_version: int = HEAD_FORMAT_VERSION

    @property
    def weights_file(self) -> str:
        return LINEAR_FILE if self.method == "linear" else FINETUNE_FILE

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["classes"] = list(self.classes)
        data["compatible_on"] = None if self.compatible_on is None else list(self.compatible_on)
        return data

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "head.json") -> HeadManifest:
        """Validate a decoded manifest.

        Raises:
            CorruptHeadError: Missing or mistyped fields, or a newer format version.
        """
        if not isinstance(data, dict):
            raise CorruptHeadError(f"{where}: expected a JSON object")
        try:
            version = int(data["format_version"])
            if version > HEAD_FORMAT_VERSION:
                raise CorruptHeadError(
                    f"{where}: format_version {version} is newer than the supported {HEAD_FORMAT_VERSION}"
                )
            method = str(data["method"])
            if method not in METHODS:
                raise CorruptHeadError(f"{where}: unknown method {method!r}; expected one of {METHODS}")
            classes = data["classes"]
            if (
                not isinstance(classes, list)
                or len(classes) < 2
                or not all(isinstance(c, str) for c in classes)
            ):
                raise CorruptHeadError(f"{where}: classes must be a list of at least 2 names")
            fingerprint = data["fingerprint"]
            if not isinstance(fingerprint, dict) or fingerprint.get("version") != FINGERPRINT_VERSION:
                raise CorruptHeadError(f"{where}: fingerprint missing or of another version")
            compatible_on = data.get("compatible_on")
            files = data.get("files") or {}
            if not isinstance(files, dict):
                raise CorruptHeadError(f"{where}: files must be an object")
            return cls(
                name=str(data["name"]),
                method=method,
                classes=tuple(classes),
                fingerprint=fingerprint,
                compatible_on=None if compatible_on is None else tuple(str(k) for k in compatible_on),
                metrics=dict(data.get("metrics") or {}),
                training=dict(data.get("training") or {}),
                files={str(k): dict(v) for k, v in files.items()},
                created_at=float(data.get("created_at", 0.0)),
                format_version=version,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptHeadError(f"{where}: malformed manifest ({exc!r})") from exc


def check_compatible(manifest: HeadManifest, fingerprint: dict[str, Any]) -> None:
    """Refuse a head trained on other features than ``fingerprint`` (the running embedder's), with the
    store's definition of "other" (:mod:`deepfeat.fingerprints`), on the keys the head depends on.

    Raises:
        IncompatibleHeadError: The message names every differing key with the head's and the given value.
    """
    diffs = fingerprints.differences(manifest.fingerprint, fingerprint, keys=manifest.compatible_on)
    if diffs:
        parts = fingerprints.describe(diffs, sides=("head", "server"), max_chars=120)
        raise IncompatibleHeadError(
            f"classifier {manifest.name!r} was trained on other features than this embedder's ({parts}); "
            "retrain it with `deepfeat train-classifier` on this data dir, without flags that change the "
            "features (--model, --weights, --layer, ...)",
            differences=fingerprints.without_missing(diffs),
        )


def linear_bytes(head: LinearHead) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, weight=head.weight.astype(np.float32), bias=head.bias.astype(np.float32))
    return buf.getvalue()


def finetune_bytes(state: dict[str, torch.Tensor]) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _check_files(manifest: HeadManifest, files: dict[str, bytes]) -> None:
    """The weight file must be there, and every name must stay inside the head's directory."""
    if manifest.weights_file not in files:
        raise HeadError(f"a {manifest.method} head needs its {manifest.weights_file}")
    for fname in files:
        if fname != Path(fname).name or fname.startswith(".") or fname == MANIFEST_FILE:
            raise HeadError(f"invalid file name {fname!r} in a head")


def _write_synced(directory: Path, files: dict[str, bytes]) -> None:
    for fname, data in files.items():
        with open(directory / fname, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    _fsync_dir(directory)


def save_head(
    root: str | Path,
    manifest: HeadManifest,
    files: dict[str, bytes],
    *,
    overwrite: bool = False,
) -> Path:
    """Write ``root/NAME/`` atomically: everything goes to a hidden temporary directory in ``root``,
    is fsynced, and the directory is renamed into place (swapped with the previous one when
    overwriting). A failure at any point, or a kill, leaves the previous ``NAME/`` (or none) or the
    new one, never a partial one; a failure leaves no temporary directory, and what a kill leaves is
    removed by the next save in ``root``.

    Args:
        root: The classifiers directory (``DATA_DIR/classifiers``), created when missing.
        manifest: The head's manifest; checksums of ``files`` are added to it.
        files: File name -> bytes (the weight file, and extras such as a report or a PNG).
        overwrite: Replace an existing head of that name.

    Returns:
        The head's directory.

    Raises:
        InvalidHeadNameError: Bad name.
        HeadExistsError: The name is taken and ``overwrite`` is false.
        HeadError: Missing weight file, or a file name with a path in it.
    """
    name = check_head_name(manifest.name)
    root = Path(root)
    _check_files(manifest, files)
    target = root / name
    if target.exists() and not overwrite:
        raise HeadExistsError(
            f"a classifier named {name!r} already exists in {root}; pass --overwrite to replace it"
        )
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_saves(root)
    checksums = {
        fname: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        for fname, data in files.items()
    }
    full = replace(manifest, files=checksums, created_at=manifest.created_at or time.time())
    tmp = _aside(root, name, "tmp")
    tmp.mkdir()
    old: Path | None = None
    try:
        _write_synced(tmp, {**files, MANIFEST_FILE: _manifest_bytes(full)})
        if target.exists() and _exchange(tmp, target):
            old = tmp  # the swap put the previous head where the new one was written
        else:
            if target.exists():  # no RENAME_EXCHANGE here: move the old head aside first
                old = _aside(root, name, "old")
                os.replace(target, old)
            os.replace(tmp, target)
        _fsync_dir(root)
    except BaseException:
        if old is not None and old.exists() and not target.exists():
            os.replace(old, target)  # put the previous head back
            old = None
        if old is not tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    log.info(
        "saved %s classifier %r (%d classes) in %s", manifest.method, name, len(manifest.classes), target
    )
    return target


_SAVE_RE = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[0-9a-f]+")
_LEGACY_RE = re.compile(r"\.(?P<name>.+)\.(?:tmp|old)-[a-z0-9_]{8}")  # tempfile.mkdtemp's names
_LEGACY_STALE_S = 3600.0  # no pid in those names: one an hour old is no running save's

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _aside(root: Path, name: str, kind: str) -> Path:
    """``root/.NAME.<kind>-<pid>-<random>``: hidden (listings skip it) and owned by this process."""
    return root / f".{name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    platform or the filesystem cannot, and nothing was done.

    Raises:
        OSError: The swap was refused for another reason.
    """
    if sys.platform != "linux":
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library without it (glibc < 2.28)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _gone(pid: int) -> bool:
    """Whether process ``pid`` has exited (a zombie included); unsure means no."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :].startswith("Z")


def remove_stale_saves(root: str | Path) -> list[str]:
    """Remove what killed saves left in ``root``: their temporary directories, and a previous head
    that a save without ``RENAME_EXCHANGE`` had moved aside (put back under its name when the name is
    empty, else deleted). Directories of saves still running are left alone.

    Returns:
        The names removed or put back.
    """
    root = Path(root)
    done: list[str] = []
    try:
        entries = list(root.iterdir())
    except FileNotFoundError:
        return done
    for entry in entries:
        m = _SAVE_RE.fullmatch(entry.name)
        if m is not None:
            if not _gone(int(m.group("pid"))):
                continue
        else:
            m = _LEGACY_RE.fullmatch(entry.name)
            try:
                if m is None or time.time() - entry.stat().st_mtime < _LEGACY_STALE_S:
                    continue
            except OSError:
                continue
        head = root / m.group("name")
        kept = entry / m.group("name")  # older versions moved the old head into a folder of its own
        previous = kept if kept.is_dir() else entry
        if ".old-" in entry.name and not head.exists() and (previous / MANIFEST_FILE).exists():
            os.replace(previous, head)
            log.warning("put back classifier %r, which a killed save had moved aside", head.name)
        shutil.rmtree(entry, ignore_errors=True)
        done.append(entry.name)
    if done:
        _fsync_dir(root)
        log.info("removed %d leftover(s) of killed classifier saves in %s", len(done), root)
    return done


def _manifest_bytes(manifest: HeadManifest) -> bytes:
    return (json.dumps(manifest.to_dict(), indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")


def read_manifest(head_dir: str | Path) -> HeadManifest:
    """Parse ``head_dir/head.json`` (the name must match the directory's).

    Raises:
        CorruptHeadError: Missing, unreadable or malformed.
    """
    head_dir = Path(head_dir)
    path = head_dir / MANIFEST_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CorruptHeadError(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptHeadError(f"cannot read {path}: {exc}") from exc
    manifest = HeadManifest.from_dict(data, where=str(path))
    if manifest.name != head_dir.name:
        raise CorruptHeadError(
            f"{path}: name {manifest.name!r} does not match the directory {head_dir.name!r}"
        )
    return manifest


def _read_checked(head_dir: Path, manifest: HeadManifest, fname: str) -> bytes:
    path = head_dir / fname
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CorruptHeadError(f"cannot read {path}: {exc}") from exc
    expected = manifest.files.get(fname, {}).get("sha256")
    if expected is None or hashlib.sha256(data).hexdigest() != expected:
        raise CorruptHeadError(f"{path} does not match the checksum in {MANIFEST_FILE}")
    return data


def load_linear(head_dir: str | Path, manifest: HeadManifest) -> LinearHead:
    """The linear head's weights, checksum-verified.

    Raises:
        CorruptHeadError: Missing file, bad checksum, or weights of the wrong shape.
    """
    data = _read_checked(Path(head_dir), manifest, LINEAR_FILE)
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            weight = np.asarray(npz["weight"], dtype=np.float32)
            bias = np.asarray(npz["bias"], dtype=np.float32)
    except (OSError, ValueError, KeyError) as exc:
        raise CorruptHeadError(f"{head_dir}/{LINEAR_FILE}: {exc}") from exc
    num_classes, dim = len(manifest.classes), manifest.fingerprint.get("dim")
    if weight.shape != (num_classes, dim) or bias.shape != (num_classes,) or not np.isfinite(weight).all():
        raise CorruptHeadError(
            f"{head_dir}/{LINEAR_FILE}: weight {weight.shape} / bias {bias.shape} do not fit "
            f"{num_classes} classes of dim {dim}"
        )
    return LinearHead(manifest.classes, weight, bias)


def load_finetune_state(head_dir: str | Path, manifest: HeadManifest) -> dict[str, torch.Tensor]:
    """The fine-tuned tensors (checksum-verified, loaded without pickle code execution).

    Raises:
        CorruptHeadError: Missing file, bad checksum, not a tensor dict.
    """
    data = _read_checked(Path(head_dir), manifest, FINETUNE_FILE)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (RuntimeError, ValueError, EOFError, OSError) as exc:  # torch's unpickler errors
        raise CorruptHeadError(f"{head_dir}/{FINETUNE_FILE}: {exc}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CorruptHeadError(f"{head_dir}/{FINETUNE_FILE}: not a dict of tensors")
    return state


def iter_head_dirs(root: str | Path) -> Iterator[Path]:
    """Sub-directories of ``root`` that may be heads (hidden ones, such as temporary saves, skipped)."""
    root = Path(root)
    try:
        entries = sorted(root.iterdir())
    except FileNotFoundError:
        return
    for entry in entries:
        if not entry.name.startswith(".") and entry.is_dir():
            yield entry
