"""Global pooling of conv feature maps into one vector per image.

Pure functions on (n, c, h, w) tensors returning (n, c), chosen by name, after cnnimageretrieval-pytorch:
- ``avg`` (SPoC): mean activation; smooth, good for category-level similarity.
- ``max`` (MAC): strongest activation per channel; favours distinctive local parts.
- ``gem`` (generalised mean, p=3 by default): between the two, the usual best for instance retrieval.
- ``rmac``: max-pooled regions on a multi-scale grid, each region L2-normalised, summed: encodes where
  things are as well as what, which helps copy detection and cropped queries.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from deepfeat.models.errors import InvalidOptionError, UnknownPoolingError

__all__ = [
    "avg_pool",
    "max_pool",
    "gem_pool",
    "rmac_pool",
    "rmac_regions",
    "grid_windows",
    "get_pooling",
    "list_poolings",
]

_EPS = 1e-6


def avg_pool(x: torch.Tensor) -> torch.Tensor:
    """SPoC: (n, c, h, w) -> (n, c) mean over the spatial grid."""
    return x.mean(dim=(2, 3))


def max_pool(x: torch.Tensor) -> torch.Tensor:
    """MAC: (n, c, h, w) -> (n, c) max over the spatial grid."""
    return x.amax(dim=(2, 3))


def gem_pool(x: torch.Tensor, p: float = 3.0) -> torch.Tensor:
    """Generalised mean: (mean(x^p))^(1/p). p=1 is avg, p->inf is max.

    Activations are clamped at a small epsilon first because p-th powers of negative values are not
    real; ReLU'd maps lose nothing, and maps with negative values (BN outputs) keep their positive part.
    """
    if p <= 0:
        raise InvalidOptionError(f"GeM power p must be > 0, got {p}")
    return x.clamp(min=_EPS).pow(p).mean(dim=(2, 3)).pow(1.0 / p)


def rmac_regions(h: int, w: int, levels: int = 3) -> list[tuple[int, int, int, int]]:
    """Regions (y, x, height, width) of the R-MAC grid (Tolias et al. 2016).

    At level l, square regions of side 2*min(h, w)/(l+1) are laid out with about 40% overlap; the level-1
    grid is the image's short side, the whole map is always included first.
    """
    regions = [(0, 0, h, w)]
    short, long_ = min(h, w), max(h, w)
    extra = 0
    if long_ != short:
        # Extra regions along the long side: the count (1..5) whose squares overlap closest to 40%.
        def overlap_error(n: int) -> float:
            step = (long_ - short) / n
            return abs((short**2 - short * step) / short**2 - 0.4)

        extra = min(range(1, 6), key=overlap_error)
    extra_h, extra_w = (extra, 0) if h > w else (0, extra)
    for level in range(1, levels + 1):
        side = math.floor(2 * short / (level + 1))
        if side < 1:
            break
        n_y, n_x = level + extra_h, level + extra_w
        ys = _starts(h, side, n_y)
        xs = _starts(w, side, n_x)
        regions.extend((y, x, side, side) for y in ys for x in xs)
    return regions


def grid_windows(h: int, w: int, grid: int) -> list[tuple[int, int, int, int]]:
    """The ``grid`` x ``grid`` overlapping windows (y, x, height, width) of an (h, w) map whose regional
    descriptors a store keeps besides the global one, row by row.

    Each window spans 2/(grid+1) of each side (half of it for grid 3) and neighbours overlap by half a
    window, so any crop keeping a quarter of the image or more lies mostly inside one of them. Unlike
    R-MAC's squares, the windows follow the map's aspect ratio: a crop keeps the image's orientation
    more often than it makes it square.
    """
    wh, ww = max(1, round(2 * h / (grid + 1))), max(1, round(2 * w / (grid + 1)))
    # Always grid x grid windows, so every image of a store has as many vectors: on a map too small
    # to place them apart, some repeat.
    ys = [round(i * (h - wh) / (grid - 1)) for i in range(grid)]
    xs = [round(i * (w - ww) / (grid - 1)) for i in range(grid)]
    return [(y, x, wh, ww) for y in ys for x in xs]


def _starts(extent: int, side: int, count: int) -> list[int]:
    if count <= 1:
        return [(extent - side) // 2]
    step = (extent - side) / (count - 1)
    return sorted({round(i * step) for i in range(count)})


def rmac_pool(x: torch.Tensor, levels: int = 3) -> torch.Tensor:
    """R-MAC: (n, c, h, w) -> (n, c), the sum of L2-normalised MAC vectors of the grid's regions."""
    _, _, h, w = x.shape
    total = torch.zeros(x.shape[:2], dtype=x.dtype, device=x.device)
    for y, x0, rh, rw in rmac_regions(h, w, levels):
        region = x[:, :, y : y + rh, x0 : x0 + rw].amax(dim=(2, 3))  # (n, c)
        total = total + F.normalize(region, dim=1, eps=_EPS)
    return total


Pooling = Callable[[torch.Tensor], torch.Tensor]

_POOLINGS: dict[str, Callable[..., torch.Tensor]] = {
    "avg": avg_pool,
    "max": max_pool,
    "gem": gem_pool,
    "rmac": rmac_pool,
}


def list_poolings() -> list[str]:
    return list(_POOLINGS)


def get_pooling(name: str, *, gem_p: float = 3.0) -> Pooling:
    """Pooling function by name; GeM is bound to ``gem_p``.

    Raises:
        UnknownPoolingError: the message lists the valid names.
    """
    if name not in _POOLINGS:
        raise UnknownPoolingError(f"unknown pooling {name!r}; choose one of: {', '.join(_POOLINGS)}")
    if name == "gem":
        if gem_p <= 0:
            raise InvalidOptionError(f"GeM power p must be > 0, got {gem_p}")
        return lambda x: gem_pool(x, gem_p)
    return _POOLINGS[name]
