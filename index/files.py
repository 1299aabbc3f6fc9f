"""The fixed names of the files in a store's data directory (what each holds: :mod:`index.store`).

A name is never read from a file: the manifest may record one, but the store only ever opens these.
"""

from __future__ import annotations

__all__ = [
    "CATALOG_FILE",
    "LOCK_FILE",
    "MANIFEST_FILE",
    "PENDING_MARKER",
    "QUARANTINE_DIR",
    "QUARANTINE_KEEP",
    "SNAPSHOT_FILE",
]

CATALOG_FILE = "catalog.sqlite3"
MANIFEST_FILE = "manifest.json"
SNAPSHOT_FILE = "vectors.faiss"
LOCK_FILE = ".lock"
PENDING_MARKER = f"{SNAPSHOT_FILE}.pending-"
"""``vectors.faiss.pending-<sha256>``: an empty file made durable before a new snapshot replaces the
old one and removed once the manifest records it. A snapshot whose checksum the manifest does not
record, but a marker does, is a write interrupted between the two renames, not damage."""
QUARANTINE_DIR = "quarantine"
"""Where a genuinely damaged snapshot is moved for a person to inspect (``<name>.<time>-<pid>-<random>``)."""
QUARANTINE_KEEP = 3
"""Quarantined files kept; older ones are deleted when another arrives."""
