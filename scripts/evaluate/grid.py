"""The sweep: one ``Config`` per point of models x layers x pooling x whitening x scales x resize mode
x regions.

A naive baseline is always part of the grid, because a table of tuned configurations means little
without what a user gets by doing nothing.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from deepfeat.scripts.evaluate.errors import EvalError

if TYPE_CHECKING:
    from deepfeat.models.registry import ModelSpec

__all__ = ["Config", "build_grid", "parse_scales", "same_point"]


@dataclass(frozen=True)
class Config:
    """One point of the sweep."""

    model: str
    layer: str
    pooling: str  # "none" for vector layers
    whitening: str  # "none", "auto", or an output dimension
    scales: tuple[float, ...] = (1.0,)
    resize_mode: str = "crop"
    max_side: int = 512
    gem_p: float = 3.0
    baseline: bool = False
    regions: int = 0  # the database side keeps a regions x regions grid of regional vectors too
    lowpass: float = 0.0  # ... and a vector of the whole image blurred by this fraction, at half scale

    @property
    def scales_label(self) -> str:
        return "+".join(f"{s:.2g}" for s in self.scales)

    @property
    def resize_label(self) -> str:
        return "crop" if self.resize_mode == "crop" else f"full{self.max_side}"

    @property
    def pooling_label(self) -> str:
        return f"gem{self.gem_p:g}" if self.pooling == "gem" else self.pooling

    @property
    def region_scale(self) -> float:
        """The pass regional vectors are pooled from, as the Embedder does it."""
        return 1.0 if 1.0 in self.scales else max(self.scales)

    @property
    def name(self) -> str:
        regions = f"/r{self.regions}" if self.regions else ""
        lowpass = f"/lp{self.lowpass:g}" if self.lowpass else ""
        return (
            f"{self.model}/{self.layer}/{self.pooling_label}/{self.resize_label}/s{self.scales_label}"
            f"/w{self.whitening}{regions}{lowpass}"
        )

    def embed_key(self) -> tuple[str, str, str, str, int, tuple[float, ...], int, float]:
        """What the raw (unwhitened) vectors depend on."""
        return (
            self.model,
            self.layer,
            self.pooling,
            self.resize_mode,
            self.max_side,
            self.scales,
            self.regions,
            self.lowpass,
        )

    def fields(self) -> dict[str, Any]:
        """The configuration's columns of a JSON result row (scales as a list, as JSON has no tuples)."""
        out = asdict(self)
        out["scales"] = list(self.scales)
        return out


def parse_scales(text: str) -> tuple[float, ...]:
    """'1,0.7071,0.5' or '1,1/sqrt2,1/2' -> factors, each in [0.1, 2] as the Embedder accepts them."""
    try:
        values = tuple(_fraction(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise EvalError(f"bad scale set {text!r}: use comma-separated factors like 1,0.7071,0.5") from None
    if not values or any(not 0.1 <= v <= 2.0 for v in values):
        raise EvalError(f"bad scale set {text!r}: factors must be in [0.1, 2]")
    return values


def _fraction(text: str) -> float:
    """'0.7071', '1/sqrt2' or '1/2' -> float (only these simple forms, no eval())."""
    t = text.strip().lower().replace(" ", "")
    if t in ("1/sqrt2", "1/sqrt(2)", "1/√2"):
        return 1 / math.sqrt(2)
    if "/" in t:
        num, den = t.split("/", 1)
        return float(num) / float(den)
    return float(t)


def build_grid(
    *,
    models: Sequence[str],
    layers: Sequence[str] | None,
    poolings: Sequence[str],
    whitening: Sequence[str],
    scale_sets: Sequence[tuple[float, ...]],
    resize_modes: Sequence[str],
    max_side: int = 512,
    gem_p: float = 3.0,
    regions: Sequence[int] = (0,),
    lowpass: Sequence[float] = (0.0,),
) -> list[Config]:
    """Every combination (vector layers take no pooling), plus the naive baseline of each model first.

    ``layers`` None = the three conv layers nearest the top (a penultimate layer that is the
    avg-pooled top conv map, as in EfficientNet/ResNet, would repeat that layer's avg rows).
    """
    from deepfeat.models.registry import get_model

    grid: list[Config] = []
    for model in models:
        spec = get_model(model)
        baseline = _baseline(spec, max_side=max_side, gem_p=gem_p)
        grid.append(baseline)
        if layers is None:
            chosen = [s for s in spec.layers if s.kind == "conv"][:3]
        else:
            chosen = [spec.get_layer(name) for name in layers]
        for layer in chosen:
            pools = ["none"] if layer.kind == "vector" else list(poolings)
            grids = list(regions) if layer.kind == "conv" else [0]  # a vector layer has no map
            for pooling, resize, scales, white, grid_size, blur in itertools.product(
                pools, resize_modes, scale_sets, whitening, grids, lowpass
            ):
                cfg = Config(
                    model,
                    layer.name,
                    pooling,
                    white,
                    tuple(scales),
                    resize,
                    max_side,
                    gem_p,
                    regions=grid_size,
                    lowpass=blur,
                )
                if not same_point(cfg, baseline):
                    grid.append(cfg)
    return grid


def _baseline(spec: ModelSpec, *, max_side: int, gem_p: float) -> Config:
    """The penultimate vector (k=1: pool5 / fc7), centre crop, one scale, no whitening."""
    naive = spec.get_layer(1)
    pooling = "none" if naive.kind == "vector" else "avg"
    return Config(spec.name, naive.name, pooling, "none", (1.0,), "crop", max_side, gem_p, True)


def same_point(a: Config, b: Config) -> bool:
    """Whether two configurations make the same vectors (the baseline flag aside)."""
    return a.embed_key() == b.embed_key() and a.whitening == b.whitening and a.gem_p == b.gem_p
