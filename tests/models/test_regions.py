"""Regional descriptors: the grid of windows, what ``embed_tensors(regions=True)`` returns, and that a
crop of a real photo is closer to one of its original's regional vectors than to its global one."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from deepfeat.models.config import EmbedderConfig
from deepfeat.models.embedder import Embedder
from deepfeat.models.pooling import grid_windows


@pytest.fixture(scope="module")
def regional() -> Embedder:
    """lite0's last conv block on the whole image at 320 px, one scale: regions as shipped, cheaply."""
    return Embedder(
        "efficientnet_lite0",
        device="cpu",
        precision="fp32",
        max_side=320,
        scales=(1.0,),
        regions=3,
        lowpass=0,
    )


@pytest.mark.parametrize(("h", "w", "grid"), [(16, 12, 3), (7, 7, 2), (10, 23, 4), (1, 1, 3), (2, 9, 7)])
def test_grid_windows_cover_the_map_with_grid_squared_windows(h: int, w: int, grid: int) -> None:
    windows = grid_windows(h, w, grid)
    assert len(windows) == grid * grid  # always: every image of a store has as many vectors
    covered = np.zeros((h, w), dtype=bool)
    for y, x, wh, ww in windows:
        assert y >= 0 and y + wh <= h and x >= 0 and x + ww <= w and wh >= 1 and ww >= 1
        assert wh == max(1, round(2 * h / (grid + 1))) and ww == max(1, round(2 * w / (grid + 1)))
        covered[y : y + wh, x : x + ww] = True
    assert covered.all()


def test_regions_come_after_the_global_vector(regional: Embedder, photos: dict[str, Image.Image]) -> None:
    images = [photos["coffee"], photos["rocket"], photos["astronaut"]]
    tensors = regional.preprocess(images)
    plain = regional.embed_tensors(tensors)
    stored = regional.embed_tensors(tensors, regions=True)
    assert regional.vectors_per_image == 10 and stored.shape == (3, 10, regional.dim)
    np.testing.assert_allclose(stored[:, 0], plain, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(stored, axis=2), 1.0, atol=1e-4)
    regions = stored[:, 1:]
    assert (np.einsum("nrd,nd->nr", regions, plain) < 0.999).all()  # windows see other content


def test_a_vector_layer_has_no_regions(photos: dict[str, Image.Image]) -> None:
    embedder = Embedder(
        "efficientnet_lite0", device="cpu", precision="fp32", layer="penultimate", regions=3, lowpass=0
    )
    assert embedder.config.regions == 0 and embedder.vectors_per_image == 1
    assert "regions" not in embedder.fingerprint
    out = embedder.embed_tensors(embedder.preprocess([photos["coffee"]]), regions=True)
    assert out.shape == (1, 1, embedder.dim)
    # the low-pass vector needs no map: a vector layer keeps it
    assert embedder.variant(lowpass=0.01).vectors_per_image == 2


def test_a_quarter_crop_matches_a_window_over_it(regional: Embedder, photos: dict[str, Image.Image]) -> None:
    """Each quarter of six real photos finds its best regional vector among the windows that overlap
    it (3 x 3 grid, windows of half a side at quarter-side steps), not among the ones elsewhere."""
    quarters = {(0, 0): (0.0, 0.0), (0, 1): (0.5, 0.0), (1, 0): (0.0, 0.5), (1, 1): (0.5, 0.5)}
    inside, total = 0, 0
    for name in ("chelsea", "coffee", "rocket", "hopper", "astronaut", "motorcycle"):
        img = photos[name]
        w, h = img.size
        stored = regional.embed_tensors(regional.preprocess([img]), regions=True)[0]  # (10, dim)
        for x0, y0 in quarters.values():
            crop = img.crop((round(x0 * w), round(y0 * h), round((x0 + 0.5) * w), round((y0 + 0.5) * h)))
            best = int(np.argmax(stored[1:] @ regional.embed([crop])[0]))  # row-major window index
            row, col = divmod(best, 3)
            # window (row, col) spans [col/4, col/4 + 1/2] x [row/4, row/4 + 1/2] of the image
            overlaps = abs(col / 4 - x0) < 0.5 and abs(row / 4 - y0) < 0.5
            inside += int(overlaps)
            total += 1
    assert inside >= total - 4


def test_regions_are_part_of_what_a_vector_is() -> None:
    assert EmbedderConfig().regions == 3
    assert EmbedderConfig.from_manifest({"model": "efficientnet_lite0"}).regions == 0
    assert EmbedderConfig(regions=2).fingerprint()["regions"] == 2
    assert "regions" not in EmbedderConfig(regions=0).fingerprint()
    with pytest.raises(ValueError, match="grid size from 2 to 7"):
        EmbedderConfig(regions=1)


def test_the_low_pass_vector_comes_second_and_is_what_a_blurred_copy_matches(
    regional: Embedder, photos: dict[str, Image.Image]
) -> None:
    """Layout [global, low-pass, regions...]; at the shipped scales, a copy blurred by 1.5% of its short
    side is closer to the stored low-pass vector than to the global one, for six real photos."""
    from PIL import ImageFilter

    assert regional.variant(lowpass=0.01).vectors_per_image == 11
    embedder = regional.variant(lowpass=0.01, max_side=512, scales=(1.0, 0.7071, 0.5))
    assert embedder.fingerprint["lowpass"] == 0.01
    images = list(photos.values())
    stored = embedder.embed_tensors(embedder.preprocess(images), regions=True)  # (6, 11, d)
    np.testing.assert_allclose(stored[:, 0], embedder.embed(images), atol=1e-5)
    no_lowpass = embedder.variant(lowpass=0).embed_tensors(embedder.preprocess(images), regions=True)
    np.testing.assert_allclose(stored[:, 2:], no_lowpass[:, 1:], atol=1e-5)  # the regions follow it
    blurred = [img.filter(ImageFilter.GaussianBlur(0.015 * min(img.size))) for img in images]
    queries = embedder.embed(blurred)
    to_lowpass = np.einsum("nd,nd->n", queries, stored[:, 1])
    to_global = np.einsum("nd,nd->n", queries, stored[:, 0])
    assert (to_lowpass > to_global).all()


def test_the_low_pass_vector_blurs_at_half_scale_what_blurring_at_full_size_gives(
    regional: Embedder, photos: dict[str, Image.Image]
) -> None:
    """Halving first and blurring with half the sigma is the same vector as blurring the full-size
    image and halving it (cosine >= 0.999 on six real photos), and reusing the 0.5 scale's input
    changes nothing."""
    import math

    import torch
    from torchvision.transforms.v2.functional import gaussian_blur

    embedder = regional.variant(lowpass=0.01, max_side=512)
    batch = torch.stack(embedder.preprocess([p.resize((640, 480)) for p in photos.values()]))
    sigma = 0.01 * min(batch.shape[2:])
    kernel = 2 * math.ceil(3 * sigma) + 1
    blurred_first = gaussian_blur(batch, kernel_size=[kernel, kernel], sigma=[sigma, sigma])
    reference = embedder.pool(embedder.forward_intermediates(embedder.rescale(blurred_first, 0.5))["head"])
    vectors = embedder.lowpass_descriptors(batch)
    assert (vectors * reference).sum(dim=1).min() >= 0.999
    reused = embedder.lowpass_descriptors(batch, half=embedder.rescale(batch, 0.5))
    torch.testing.assert_close(reused, vectors)


@pytest.mark.parametrize("sigma", [0.5, 1.92, 3.84])
def test_the_blur_is_torchvisions_gaussian_blur(photos: dict[str, Image.Image], sigma: float) -> None:
    """The banded matrix products give what torchvision's 2-D kernel gives, edges included
    (reflected), whatever the memory format."""
    import math

    import torch
    from torchvision.transforms.v2.functional import gaussian_blur as tv_blur
    from torchvision.transforms.v2.functional import pil_to_tensor

    from deepfeat.models.embedder import gaussian_blur

    batch = (
        torch.stack([pil_to_tensor(p.convert("RGB").resize((256, 192))) for p in photos.values()]).float()
        / 255
    )
    kernel = 2 * math.ceil(3 * sigma) + 1
    expected = tv_blur(batch, kernel_size=[kernel, kernel], sigma=[sigma, sigma])
    torch.testing.assert_close(gaussian_blur(batch, sigma), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        gaussian_blur(batch.contiguous(memory_format=torch.channels_last), sigma),
        expected,
        atol=1e-5,
        rtol=1e-5,
    )


@pytest.mark.parametrize("size", [(1, 1), (2, 5), (3, 7), (6, 40)])
def test_the_blur_keeps_a_flat_image_flat_even_when_its_kernel_outgrows_the_image(
    size: tuple[int, int],
) -> None:
    """Sides shorter than the kernel's radius, which torchvision's reflect padding refuses, reflect
    as often as it takes: every output pixel is still a weighted mean of the image's own pixels."""
    import torch

    from deepfeat.models.embedder import gaussian_blur

    flat = torch.full((2, 3, *size), 0.25)
    torch.testing.assert_close(gaussian_blur(flat, 1.92), flat)
