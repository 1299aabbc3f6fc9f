"""ImageStore.similar (more like this from the stored vector) and list_images (keyset paging)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deepfeat.index.errors import InvalidArgumentError, NotFoundError
from deepfeat.index.store import ImageStore
from tests.index._helpers import DIM, FINGERPRINT, new_images, unit_vectors


@pytest.fixture
def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    with ImageStore.open(tmp_path / "data", fingerprint=FINGERPRINT, dim=DIM) as s:
        yield s


def test_similar_is_brute_force_without_the_image_itself(store: ImageStore) -> None:
    vectors = unit_vectors(50)
    ids = [r.id for r in store.add(vectors, new_images(50))]
    for i in (0, 17, 49):
        expected = np.argsort(-(vectors @ vectors[i]), kind="stable")
        expected = [ids[j] for j in expected if j != i][:5]
        got = store.similar(ids[i], 5)
        assert [h.id for h in got] == expected
        assert [h.score for h in got] == pytest.approx(
            sorted((vectors @ vectors[i])[np.r_[0:i, i + 1 : 50]])[::-1][:5], abs=1e-5
        )
    assert len(store.similar(ids[0], 100)) == 49


def test_similar_errors(store: ImageStore) -> None:
    ids = [r.id for r in store.add(unit_vectors(3), new_images(3))]
    with pytest.raises(NotFoundError):
        store.similar("0" * 32, 5)
    store.delete(ids[0])
    with pytest.raises(NotFoundError):
        store.similar(ids[0], 5)
    with pytest.raises(InvalidArgumentError):
        store.similar(ids[1], 0)


def test_pages_follow_insertion_and_survive_writes(store: ImageStore) -> None:
    ids = [r.id for r in store.add(unit_vectors(7), new_images(7))]
    page, after = store.list_images(limit=3)
    assert [r.id for r in page] == ids[:3] and after is not None
    store.delete(ids[1])  # already seen
    store.delete(ids[4])  # not seen yet
    new = [r.id for r in store.add(unit_vectors(2, seed=1), new_images(2, start=100))]
    seen = [r.id for r in page]
    while after is not None:
        page, after = store.list_images(limit=3, after_seq=after)
        seen += [r.id for r in page]
    assert seen == ids[:3] + [ids[3]] + ids[5:] + new
    assert store.list_images(limit=10, after_seq=10**9) == ([], None)
    with pytest.raises(InvalidArgumentError):
        store.list_images(limit=0)
