"""The ``auto`` index policy, memory estimates, default search parameters, and how VectorIndex applies them."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

from deepfeat.index.choose import (
    FLAT_MAX_SCAN,
    HNSW_EF_SEARCH,
    IVF_FROM,
    choose_factory,
    default_search_params,
    estimate_memory_bytes,
    ivf_nlist,
    min_train_vectors,
    resolve_factory,
)
from deepfeat.index.errors import InvalidArgumentError
from deepfeat.index.vectors import VectorIndex
from tests.index._helpers import DIM, unit_vectors

GiB = 2**30


@pytest.mark.parametrize(
    ("n", "nlist"),
    [(0, 64), (1_000, 128), (100_000, 1024), (1_000_000, 4096), (10_000_000, 16384), (10**12, 2**18)],
)
def test_ivf_nlist_is_a_power_of_two_near_4_sqrt_n(n: int, nlist: int) -> None:
    assert ivf_nlist(n) == nlist


def test_small_collections_stay_exact() -> None:
    assert choose_factory(0, 256) == "Flat"
    assert choose_factory(100_000, 256) == "Flat"
    assert choose_factory(FLAT_MAX_SCAN // 1280, 1280) == "Flat"
    assert choose_factory(FLAT_MAX_SCAN // 1280 + 1, 1280) == "HNSW32"


def test_mid_sizes_use_hnsw_when_memory_allows() -> None:
    assert choose_factory(300_000, 256) == "HNSW32"
    assert choose_factory(100_000, 1280) == "HNSW32"
    assert choose_factory(IVF_FROM - 1, 1280, memory_budget_bytes=4 * GiB) == "HNSW32"
    # HNSW32 at 400k x 1280-d needs ~2.1 GB: over a 1 GiB budget it falls back to IVF-SQ8.
    assert choose_factory(400_000, 1280, memory_budget_bytes=GiB) == "IVF2048,SQ8"


def test_large_or_tight_budget_uses_ivf_with_compressed_codes() -> None:
    # From IVF_FROM: IVF with 1-byte scalar codes when no budget forbids it.
    assert choose_factory(IVF_FROM, 256) == f"IVF{ivf_nlist(IVF_FROM)},SQ8"
    assert choose_factory(1_000_000, 256) == "IVF4096,SQ8"
    assert choose_factory(10_000_000, 1280) == "IVF16384,SQ8"
    # 1M x 256-d: HNSW needs ~1.3 GB, SQ8 ~0.27 GB.
    assert choose_factory(1_000_000, 256, memory_budget_bytes=512 * 2**20) == "IVF4096,SQ8"
    # Tighter: the largest fast-scan PQ that fits (m/2 bytes + 8 for the id).
    assert choose_factory(1_000_000, 256, memory_budget_bytes=100 * 2**20) == "IVF4096,PQ128x4fs"
    assert choose_factory(1_000_000, 256, memory_budget_bytes=20 * 2**20) == "IVF4096,PQ16x4fs"
    # A tiny collection that does not fit as Flat skips to compressed codes too.
    assert choose_factory(10_000, 256, memory_budget_bytes=4 * 2**20).startswith("IVF")


def test_huge_nlist_gets_an_hnsw_quantizer() -> None:
    factory = choose_factory(2**34, 64)
    assert factory.startswith(f"IVF{ivf_nlist(2**34)}_HNSW32,")


def test_every_auto_choice_is_a_valid_factory_for_vector_index() -> None:
    for n, dim, budget in [
        (10, 32, None),
        (10**6, 32, None),
        (10**7, 64, None),
        (10**6, 64, 16 * 2**20),
        (10**6, 96, 8 * 2**20),
    ]:
        factory = choose_factory(n, dim, memory_budget_bytes=budget)
        index = VectorIndex.create(dim, factory)
        assert index.factory == factory and index.ntotal == 0


@pytest.mark.parametrize(("n", "dim", "budget"), [(-1, 8, None), (10, 0, None), (10, 8, 0), (10, 8, True)])
def test_bad_arguments(n: int, dim: int, budget: int | None) -> None:
    with pytest.raises(ValueError):
        choose_factory(n, dim, memory_budget_bytes=budget)


def test_resolve_factory() -> None:
    assert resolve_factory(None, 10**6, 256) == "Flat"
    assert resolve_factory("auto", 10**6, 256) == "IVF4096,SQ8"
    assert resolve_factory("auto", 300_000, 256) == "HNSW32"
    assert resolve_factory(" AUTO ", 10, 256) == "Flat"
    assert resolve_factory("IVF64,Flat", 10**6, 256) == "IVF64,Flat"


def test_default_search_params_by_type() -> None:
    assert default_search_params("Flat") == {}
    assert default_search_params("PQ16") == {}
    assert default_search_params("HNSW32") == {"efSearch": HNSW_EF_SEARCH}
    assert default_search_params("HNSW32,SQ8") == {"efSearch": HNSW_EF_SEARCH}
    assert default_search_params("IVF1024,SQ8") == {"nprobe": 32}
    assert default_search_params("IVF2048,SQ8") == {"nprobe": 16}
    assert default_search_params("IVF4096,PQ32x4fs") == {"nprobe": 8}
    assert default_search_params("IVF16384,SQ8") == {"nprobe": 32}
    assert default_search_params("IVF16,Flat") == {"nprobe": 16}
    assert default_search_params("IVF4,Flat") == {"nprobe": 4}  # never more than nlist
    assert default_search_params(f"IVF{2**20},Flat")["nprobe"] == 256  # capped
    with_hnsw = default_search_params("IVF65536_HNSW32,PQ32x4fs")
    assert with_hnsw == {"nprobe": 128, "quantizer_efSearch": 256}
    refined = default_search_params("OPQ32_128,IVF1024,PQ32x4fs,RFlat")
    assert set(refined) == {"nprobe", "k_factor_rf"}


def test_min_train_vectors() -> None:
    assert min_train_vectors("Flat") == 0
    assert min_train_vectors("HNSW32") == 0
    assert min_train_vectors("IVF1024,Flat") == 1024
    assert min_train_vectors("IVF64,PQ16") == 256
    assert min_train_vectors("IVF64,PQ16x4fs") == 64


@pytest.mark.parametrize(
    "factory",
    ["Flat", "HNSW32", "HNSW16,SQ8", "IVF64,SQ8", "IVF64,PQ16x4fs", "IVF64_HNSW32,Flat", "IVF64,PQ8np"],
)
def test_memory_estimate_matches_the_serialized_index(factory: str) -> None:
    n, dim = 6000, 64
    index = VectorIndex.create(dim, factory)
    index.add(np.arange(n), unit_vectors(n, dim, seed=4))
    actual = faiss.serialize_index(index.faiss_index).nbytes
    estimate = estimate_memory_bytes(factory, n, dim)
    assert abs(estimate - actual) / actual < 0.2, (estimate, actual)


# ------------------------------------------------------------------ VectorIndex search parameters


def test_create_applies_default_search_params_and_overrides() -> None:
    assert VectorIndex.create(DIM, "Flat").search_params == {}
    assert VectorIndex.create(DIM, "HNSW32").search_params == {"efSearch": HNSW_EF_SEARCH}
    index = VectorIndex.create(DIM, "IVF64,Flat", search_params={"nprobe": 5})
    assert index.search_params == {"nprobe": 5}


def test_search_params_survive_a_snapshot(tmp_path: Path) -> None:
    index = VectorIndex.create(DIM, "IVF16_HNSW32,PQ8x4fs,RFlat")
    index.add(np.arange(2000), unit_vectors(2000, seed=5))
    index.set_search_params({"nprobe": 3, "quantizer_efSearch": 40, "k_factor_rf": 6})
    want = {"nprobe": 3, "quantizer_efSearch": 40, "k_factor_rf": 6.0}
    assert index.search_params == want
    digest = index.save(tmp_path / "v.faiss")
    loaded = VectorIndex.load(tmp_path / "v.faiss", expected_sha256=digest)
    assert loaded.search_params == want


def test_unknown_or_bad_search_param_is_refused() -> None:
    index = VectorIndex.create(DIM, "HNSW32")
    with pytest.raises(InvalidArgumentError, match=r"'nprobe'.*applicable: efSearch"):
        index.set_search_params({"nprobe": 4})
    with pytest.raises(InvalidArgumentError, match=">= 1"):
        index.set_search_params({"efSearch": 0})
    with pytest.raises(InvalidArgumentError):
        VectorIndex.create(DIM, "Flat", search_params={"efSearch": 10})


def test_ivf_with_hnsw_quantizer_keeps_explicit_ids() -> None:
    base = unit_vectors(3000, seed=6)
    ids = np.arange(5000, 8000, dtype=np.int64)[::-1].copy()
    index = VectorIndex.create(DIM, "IVF32_HNSW32,Flat", search_params={"nprobe": 32})
    index.add(ids, base)
    _, got = index.search(base[:20], 1)
    np.testing.assert_array_equal(got[:, 0], ids[:20])  # nprobe = nlist: exact
    assert index.remove(ids[:10]) == 10 and index.ntotal == 2990
    assert not np.isin(index.ids(), ids[:10]).any()


def test_training_uses_a_sample_of_a_large_batch() -> None:
    index = VectorIndex.create(DIM, "IVF16,Flat")
    assert index.default_train_size == 100_000
    index.train(unit_vectors(5000, seed=7), max_vectors=500)  # 500 >= nlist: trains on the sample
    assert index.is_trained
    assert VectorIndex.create(DIM, "IVF4096,Flat").default_train_size == 40 * 4096
