"""Pooling functions against values computed by hand on tiny maps."""

from __future__ import annotations

import math

import pytest
import torch

from deepfeat.models.errors import InvalidOptionError, UnknownPoolingError
from deepfeat.models.pooling import (
    avg_pool,
    gem_pool,
    get_pooling,
    list_poolings,
    max_pool,
    rmac_pool,
    rmac_regions,
)

# One image, two channels, 2x2 maps.
X = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 8.0]]]])


def test_avg_and_max_by_hand() -> None:
    assert avg_pool(X).tolist() == [[2.5, 2.0]]
    assert max_pool(X).tolist() == [[4.0, 8.0]]


def test_gem_by_hand_and_limits() -> None:
    # channel 0: ((1 + 8 + 27 + 64) / 4) ** (1/3) = 25 ** (1/3)
    got = gem_pool(X, p=3.0)
    assert got[0, 0].item() == pytest.approx(25 ** (1 / 3), rel=1e-5)
    # channel 1: zeros are clamped to eps, so ((3 * eps^3 + 512) / 4) ** (1/3) ~= 128 ** (1/3)
    assert got[0, 1].item() == pytest.approx(128 ** (1 / 3), rel=1e-5)
    # p = 1 is the average; large p approaches the max.
    assert torch.allclose(gem_pool(X, p=1.0), avg_pool(X).clamp(min=1e-6), atol=1e-5)
    assert gem_pool(X, p=50.0)[0, 0].item() == pytest.approx(4.0, rel=0.03)


def test_gem_rejects_non_positive_power() -> None:
    with pytest.raises(InvalidOptionError, match="p must be > 0"):
        gem_pool(X, p=0.0)
    with pytest.raises(InvalidOptionError):
        get_pooling("gem", gem_p=-1)


def test_rmac_regions_square_map() -> None:
    # 3x3 map, 3 levels: the whole map, then level 1 side floor(2*3/2)=3 (1 region),
    # level 2 side floor(2*3/3)=2 (2x2 regions at 0 and 1), level 3 side floor(6/4)=1 (3x3 regions).
    regions = rmac_regions(3, 3, levels=3)
    assert regions[0] == (0, 0, 3, 3)
    assert (0, 0, 3, 3) in regions[1:2]
    assert sorted(regions[2:6]) == [(0, 0, 2, 2), (0, 1, 2, 2), (1, 0, 2, 2), (1, 1, 2, 2)]
    assert len(regions) == 1 + 1 + 4 + 9


def test_rmac_regions_cover_the_long_side() -> None:
    regions = rmac_regions(4, 10, levels=2)
    assert all(y + rh <= 4 and x + rw <= 10 for y, x, rh, rw in regions)
    # more regions along the long (width) side than along the height at level 1
    level1 = [r for r in regions[1:] if r[2] == 4]
    assert len({r[1] for r in level1}) > 1 and len({r[0] for r in level1}) == 1


def test_rmac_by_hand_on_a_constant_channel() -> None:
    # A 1-channel map: every region's MAC vector normalises to 1, so R-MAC sums to the region count.
    x = torch.rand(1, 1, 3, 3) + 0.5
    assert rmac_pool(x).item() == pytest.approx(len(rmac_regions(3, 3)), rel=1e-5)
    # Two channels: region vectors are unit-normalised before summing.
    x2 = torch.zeros(1, 2, 2, 2)
    x2[0, 0] = 3.0
    x2[0, 1] = 4.0
    n = len(rmac_regions(2, 2))
    assert rmac_pool(x2)[0].tolist() == pytest.approx([0.6 * n, 0.8 * n], rel=1e-5)


def test_registry_by_name() -> None:
    assert list_poolings() == ["avg", "max", "gem", "rmac"]
    assert get_pooling("max")(X).tolist() == [[4.0, 8.0]]
    assert get_pooling("gem", gem_p=1.0)(X)[0, 0].item() == pytest.approx(2.5, rel=1e-5)
    with pytest.raises(UnknownPoolingError, match="choose one of: avg, max, gem, rmac"):
        get_pooling("median")


def test_batch_rows_are_independent() -> None:
    batch = torch.cat([X, 2 * X])
    for name in list_poolings():
        out = get_pooling(name)(batch)
        single = get_pooling(name)(X)
        assert torch.allclose(out[0], single[0]), name
        assert not math.isnan(out.sum().item())
