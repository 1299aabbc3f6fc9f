"""How an image's vectors are named in FAISS, and how vector hits become image hits.

An image may have several vectors: its global descriptor first, then regional descriptors (so a crop
of it is found; see ``EmbedderConfig.regions``). FAISS holds each under its own 64-bit id: the image's
catalog ``seq`` in the low :data:`SEQ_BITS` bits and the vector's position ``r`` in the bits above.
The global vector (``r = 0``) is therefore named by the plain seq, exactly as in stores written
before regional vectors existed, so their snapshots and generations stay valid as they are.

Wherever vectors travel with their seqs (the catalog's reads, the replay, the builds) the seqs array
repeats an image's seq once per vector, its vectors contiguous and in order: :func:`vector_ids`
turns such an array into FAISS ids, :func:`seqs_of` turns FAISS ids back into seqs.
"""

from __future__ import annotations

import numpy as np

__all__ = ["MAX_VECTORS_PER_IMAGE", "SEQ_BITS", "aggregate", "all_vector_ids", "seqs_of", "vector_ids"]

SEQ_BITS = 48
"""2**48 (2.8e14) images: far beyond any SQLite table this store will hold."""
MAX_VECTORS_PER_IMAGE = 64
_SEQ_MASK = (1 << SEQ_BITS) - 1


def seqs_of(ids: np.ndarray) -> np.ndarray:
    """FAISS ids -> the seqs of their images (-1, FAISS's empty slot, stays -1)."""
    ids = np.asarray(ids, dtype=np.int64)
    return np.where(ids < 0, ids, ids & _SEQ_MASK)


def vector_ids(seqs: np.ndarray) -> np.ndarray:
    """Per-vector seqs (an image's seq repeated once per vector, contiguous) -> FAISS ids.

    Unique seqs map to themselves, so single-vector images cost nothing here.
    """
    seqs = np.asarray(seqs, dtype=np.int64)
    if seqs.size < 2:
        return seqs.copy()
    starts = np.flatnonzero(np.r_[True, seqs[1:] != seqs[:-1]])  # first vector of each image
    if starts.size == seqs.size:
        return seqs.copy()
    position = np.arange(seqs.size) - np.repeat(starts, np.diff(np.r_[starts, seqs.size]))
    return seqs | (position.astype(np.int64) << SEQ_BITS)


def all_vector_ids(seqs: np.ndarray, per_image: int) -> np.ndarray:
    """Every FAISS id images ``seqs`` may hold when each has at most ``per_image`` vectors."""
    seqs = np.asarray(seqs, dtype=np.int64).reshape(-1)
    per_image = max(1, min(int(per_image), MAX_VECTORS_PER_IMAGE))
    positions = np.arange(per_image, dtype=np.int64) << SEQ_BITS  # (p,)
    return (seqs[:, None] | positions[None, :]).reshape(-1)


def aggregate(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Vector hits -> image hits: each image scores its best vector; the top ``k`` images per query.

    Args:
        scores: (m, n) float32, best first per row.
        ids: (m, n) int64 FAISS ids, -1 for empty slots.
        k: Images wanted per query.

    Returns:
        ``(scores, seqs)`` of shape (m, min(k, n)), best first; -1 seqs (score -inf) pad a row that
        found fewer images.
    """
    m, n = ids.shape
    width = min(int(k), n)
    out_scores = np.full((m, width), -np.inf, dtype=np.float32)
    out_seqs = np.full((m, width), -1, dtype=np.int64)
    seqs = seqs_of(ids)
    for row in range(m):
        valid = seqs[row] >= 0
        row_seqs, row_scores = seqs[row][valid], scores[row][valid]
        order = np.argsort(-row_scores, kind="stable")
        # np.unique keeps the first occurrence's index: in score order, each image's best vector.
        _, first = np.unique(row_seqs[order], return_index=True)
        best = order[np.sort(first)][:width]
        out_scores[row, : best.size] = row_scores[best]
        out_seqs[row, : best.size] = row_seqs[best]
    return out_scores, out_seqs
