"""The shared forward passes of a sweep: per-scale descriptors of image sets, computed once.

A sweep has dozens of rows that differ only in layer and pooling. For each (model, resize mode, scale)
one forward pass per batch reads every layer the sweep needs and pools it every way it needs, through
the Embedder's own ``forward_intermediates`` / ``pool`` / ``rescale``: a sweep costs about what its
dearest row does, and its vectors are the ones ``Embedder.embed`` returns (a test holds the two
together) rather than a copy of the embedder's forward pass that could drift from it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from deepfeat.scripts.evaluate.grid import Config

if TYPE_CHECKING:
    import torch

    from deepfeat.models.embedder import Embedder

__all__ = ["FeatureBank"]

log = logging.getLogger(__name__)

_Combo = tuple[str, str, float, int]
"""(layer, pooling, GeM power, regional grid): one pooled output of a pass; grid 0 is the whole map
((n, d) vectors), grid g its g x g windows as a store keeps them ((n, g*g, d))."""
_PassKey = tuple[str, str, int, float]
"""(model, resize mode, max side, scale): what one forward pass over an image set depends on."""


def _pass_key(cfg: Config, scale: float) -> _PassKey:
    return (cfg.model, cfg.resize_mode, cfg.max_side, scale)


def _combo(cfg: Config, regions: int = 0) -> _Combo:
    return (cfg.layer, cfg.pooling, cfg.gem_p, regions)


@dataclass
class _PassTime:
    images: int = 0
    seconds: float = 0.0


@dataclass
class FeatureBank:
    """Per-scale descriptors of named image sets, computed once per (model, resize, scale) pass.

    ``register(configs)`` first, so each pass reads every layer and pooling the sweep needs: the
    rows of a sweep then share their forward passes instead of repeating them.
    """

    device: str = "cpu"
    batch_size: int = 32
    embedders: dict[str, Embedder] = field(default_factory=dict)
    _needs: dict[_PassKey, set[_Combo]] = field(default_factory=dict)
    _cache: dict[tuple[str, _PassKey], dict[_Combo, np.ndarray]] = field(default_factory=dict)
    _times: dict[_PassKey, _PassTime] = field(default_factory=dict)
    _sets: dict[str, Sequence[Image.Image]] = field(default_factory=dict)
    _lowpass: dict[tuple[str, tuple[object, ...]], np.ndarray] = field(default_factory=dict)

    def register(self, configs: Iterable[Config]) -> None:
        for cfg in configs:
            for scale in cfg.scales:
                self._needs.setdefault(_pass_key(cfg, scale), set()).add(_combo(cfg))
            if cfg.regions:
                self._needs.setdefault(_pass_key(cfg, cfg.region_scale), set()).add(_combo(cfg, cfg.regions))

    def embedder(self, model: str) -> Embedder:
        if model not in self.embedders:
            from deepfeat.models.embedder import Embedder

            log.info("loading %s on %s", model, self.device)
            # fp32 on any hardware ("auto" means bf16 on some CPUs): a table must not depend on the machine
            self.embedders[model] = Embedder(model, device=self.device, precision="fp32")
        return self.embedders[model]

    def vectors(self, set_name: str, images: Sequence[Image.Image], cfg: Config) -> np.ndarray:
        """(n, d) unit vectors of ``images`` for ``cfg`` (before whitening)."""
        if self._sets.get(set_name) is not images:
            # another image list under a known name (a second evaluation on this bank): never serve
            # the first list's vectors for it
            self._sets[set_name] = images
            self._cache = {k: v for k, v in self._cache.items() if k[0] != set_name}
        per_scale = [self._per_scale(set_name, images, cfg, scale)[_combo(cfg)] for scale in cfg.scales]
        total = np.sum(per_scale, axis=0)  # (n, d): the sum of unit vectors, as Embedder sums its scales
        out = total / np.maximum(np.linalg.norm(total, axis=1, keepdims=True), 1e-12)
        return out.astype(np.float32, copy=False)

    def region_vectors(self, set_name: str, images: Sequence[Image.Image], cfg: Config) -> np.ndarray:
        """(n, regions², d) unit regional vectors of ``images`` for ``cfg`` (before whitening), pooled
        from the windows of the pass at ``cfg.region_scale`` as ``Embedder.embed_tensors(regions=True)``
        pools them."""
        self.vectors(set_name, images, cfg)  # the same bookkeeping of which list the name holds
        return self._per_scale(set_name, images, cfg, cfg.region_scale, _combo(cfg, cfg.regions))[
            _combo(cfg, cfg.regions)
        ]

    def lowpass_vectors(self, set_name: str, images: Sequence[Image.Image], cfg: Config) -> np.ndarray:
        """(n, d) low-pass vectors of ``images`` for ``cfg``: ``Embedder.lowpass_descriptors``, the
        path an indexer takes too."""
        self.vectors(set_name, images, cfg)  # the bookkeeping of which list the name holds
        key = (
            set_name,
            (cfg.model, cfg.resize_mode, cfg.max_side, cfg.layer, cfg.pooling, cfg.gem_p, cfg.lowpass),
        )
        if key not in self._lowpass:
            emb = self.embedder(cfg.model).variant(
                resize_mode=cfg.resize_mode,
                max_side=cfg.max_side,
                scales=(1.0,),
                layer=cfg.layer,
                pooling=None if cfg.pooling == "none" else cfg.pooling,
                gem_p=cfg.gem_p,
                lowpass=cfg.lowpass,
            )
            out = np.empty((len(images), emb.dim), dtype=np.float32)
            for rows, batch in self._batches(emb, images):
                out[rows] = emb.lowpass_descriptors(batch).cpu().numpy()
            self._lowpass[key] = out
        return self._lowpass[key]

    def release(self, set_name: str) -> None:
        """Forget a set's images and vectors: a run done with a set frees its memory."""
        self._sets.pop(set_name, None)
        self._cache = {k: v for k, v in self._cache.items() if k[0] != set_name}
        self._lowpass = {k: v for k, v in self._lowpass.items() if k[0] != set_name}

    def images_per_second(self, cfg: Config) -> float:
        """Throughput of the forward passes this configuration needs (decode excluded; passes shared)."""
        n = secs = 0.0
        for scale in cfg.scales:
            t = self._times.get(_pass_key(cfg, scale))
            if t is None or t.seconds <= 0:
                return float("nan")
            n = max(n, t.images)
            secs += t.seconds
        return n / secs if secs else float("nan")

    def _per_scale(
        self,
        set_name: str,
        images: Sequence[Image.Image],
        cfg: Config,
        scale: float,
        combo: _Combo | None = None,
    ) -> dict[_Combo, np.ndarray]:
        key = _pass_key(cfg, scale)
        combo = combo or _combo(cfg)
        if combo not in self._cache.get((set_name, key), {}):  # new, or registered after the pass
            needs = self._needs.get(key, set()) | {combo}
            started = time.perf_counter()
            self._cache[(set_name, key)] = self._run_pass(images, cfg, scale, needs)
            elapsed = time.perf_counter() - started
            t = self._times.setdefault(key, _PassTime())
            t.images += len(images)
            t.seconds += elapsed
            log.info(
                "%s: %s %s scale %.3g: %d images, %d layer/pooling outputs in %.1fs (%.1f img/s)",
                set_name, cfg.model, cfg.resize_label, scale, len(images), len(needs), elapsed,
                len(images) / max(elapsed, 1e-9),
            )  # fmt: skip
        return self._cache[(set_name, key)]

    def _run_pass(
        self, images: Sequence[Image.Image], cfg: Config, scale: float, needs: set[_Combo]
    ) -> dict[_Combo, np.ndarray]:
        # scales=(1.0,): this pass is one scale of a multi-scale descriptor, rescaled below
        emb = self.embedder(cfg.model).variant(
            resize_mode=cfg.resize_mode, max_side=cfg.max_side, scales=(1.0,)
        )
        from deepfeat.models.pooling import grid_windows

        layers = sorted({c[0] for c in needs})
        out = {
            c: np.empty(
                (len(images), c[3] ** 2, emb.spec.get_layer(c[0]).dim)
                if c[3]
                else (len(images), emb.spec.get_layer(c[0]).dim),
                dtype=np.float32,
            )
            for c in needs
        }
        for rows, batch in self._batches(emb, images):
            features = emb.forward_intermediates(emb.rescale(batch, scale), layers=layers)
            for combo in needs:
                layer, pooling, gem_p, grid = combo
                fmap = features[layer]
                if not grid:
                    pooled = emb.pool(fmap, layer=layer, pooling=pooling, gem_p=gem_p)  # (b, d)
                    out[combo][rows] = pooled.cpu().numpy()
                    continue
                h, w = fmap.shape[2:]
                windows = [
                    emb.pool(fmap[:, :, y : y + rh, x : x + rw], layer=layer, pooling=pooling, gem_p=gem_p)
                    for y, x, rh, rw in grid_windows(h, w, grid)
                ]
                out[combo][rows] = np.stack([t.cpu().numpy() for t in windows], axis=1)  # (b, g*g, d)
        return out

    def _batches(
        self, emb: Embedder, images: Sequence[Image.Image]
    ) -> Iterator[tuple[list[int], torch.Tensor]]:
        """(rows, (b, 3, H, W) batch) pairs: full-image mode gives each aspect ratio its own size, and
        only same-size tensors stack into one pass."""
        import torch

        for start in range(0, len(images), self.batch_size):
            tensors = emb.preprocess(list(images[start : start + self.batch_size]))
            groups: dict[tuple[int, ...], list[int]] = {}
            for i, tensor in enumerate(tensors):
                groups.setdefault(tuple(tensor.shape), []).append(i)
            for idx in groups.values():
                yield [start + i for i in idx], torch.stack([tensors[i] for i in idx])
