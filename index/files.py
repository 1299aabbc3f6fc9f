"""The fixed names of the files in a store's data directory (what each holds: :mod:`index.store`).

A name is never read from a file: the manifest may record one, but the store only ever opens these.
"""

from __future__ import annotations

__all__ = ["CATALOG_FILE", "LOCK_FILE", "MANIFEST_FILE", "SNAPSHOT_FILE"]

CATALOG_FILE = "catalog.sqlite3"
MANIFEST_FILE = "manifest.json"
SNAPSHOT_FILE = "vectors.faiss"
LOCK_FILE = ".lock"
