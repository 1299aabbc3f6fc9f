"""Probing and device decoding: the batch indexer's GPU path (torchvision decodes on the CPU here,
nvJPEG on CUDA: the gpu-marked test)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from deepfeat.models.errors import (
    CorruptImageError,
    ImageError,
    ImageTooLargeError,
    ImageTooSmallError,
    UnsupportedFormatError,
)
from deepfeat.models.images import (
    decode_jpegs,
    load_image,
    probe_image,
    thumbnail_from_tensor,
)
from tests.models.image_helpers import (
    NOT_A_SCAN,
    _encode,
    _exif_with_orientation,
    _mean_abs_diff,
    _pixels,
    _png_header_only,
    without_jpeg_segment,
)


def test_probe_agrees_with_load_without_decoding(chelsea: Image.Image, grace_bytes: bytes) -> None:
    rotated = _encode(chelsea.transpose(Image.Transpose.ROTATE_90), "JPEG", exif=_exif_with_orientation(6))
    for data in (grace_bytes, rotated, _encode(chelsea, "PNG")):
        probed = probe_image(data)
        loaded = load_image(data)
        assert probed.upright_size == loaded.upright_size == (loaded.width, loaded.height)
        assert (probed.sha256, probed.nbytes, probed.format) == (loaded.sha256, loaded.nbytes, loaded.format)
        assert probed.data == data


def test_probe_says_which_files_the_gpu_decoder_may_take(chelsea: Image.Image) -> None:
    jpeg = _encode(chelsea, "JPEG", quality=90)
    assert probe_image(jpeg).gpu_decodable
    assert probe_image(_encode(chelsea.convert("L"), "JPEG")).gpu_decodable
    assert not probe_image(
        _encode(chelsea.convert("CMYK"), "JPEG")
    ).gpu_decodable  # needs Pillow's colour maths
    assert not probe_image(jpeg[: len(jpeg) // 2]).gpu_decodable  # truncated: the CPU path fails it
    assert not probe_image(_encode(chelsea, "PNG")).gpu_decodable
    # nvJPEG decodes a file without quantisation tables; Pillow calls it corrupt: not for the GPU
    assert not probe_image(without_jpeg_segment(jpeg, 0xDB)).gpu_decodable
    assert probe_image(without_jpeg_segment(jpeg, 0xC4)).gpu_decodable  # default Huffman tables: both decode


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", CorruptImageError),
        (b"just some text, not an image", UnsupportedFormatError),
        (_png_header_only(30_000, 30_000), ImageTooLargeError),
        (_png_header_only(4, 4), ImageTooSmallError),
    ],
)
def test_probe_refuses_what_the_header_shows(data: bytes, error: type[ImageError]) -> None:
    with pytest.raises(error) as probed:
        probe_image(data)
    with pytest.raises(error) as loaded:
        load_image(data)
    assert probed.value.code == loaded.value.code


def test_decode_jpegs_gives_upright_pixels_and_isolates_a_bad_file(
    chelsea: Image.Image, coffee: Image.Image
) -> None:
    upright = _encode(coffee, "JPEG", quality=95)
    stored = coffee.transpose(Image.Transpose.ROTATE_90)  # orientation 6 turns it back
    rotated = _encode(stored, "JPEG", quality=95, exif=_exif_with_orientation(6))
    broken = NOT_A_SCAN
    out = decode_jpegs([upright, broken, rotated], "cpu")
    assert out[1] is None  # the caller hands it to load_image, which names the damage
    for data, tensor in ((upright, out[0]), (rotated, out[2])):
        assert tensor is not None and tensor.dtype == torch.uint8
        reference = _pixels(load_image(data))
        assert _mean_abs_diff(tensor.permute(1, 2, 0).numpy(), reference) < 2.0
    assert decode_jpegs([], "cpu") == []


def test_thumbnail_from_tensor_fits_the_box_and_never_enlarges(coffee: Image.Image) -> None:
    pixels = torch.from_numpy(np.asarray(coffee)).permute(2, 0, 1).contiguous()
    for size, expected in ((256, (256, 171)), (1000, coffee.size)):
        thumb = thumbnail_from_tensor(pixels, size=size)
        with Image.open(io.BytesIO(thumb)) as img:
            assert img.format == "JPEG" and img.size == expected
            assert not img.getexif()
            small = np.asarray(coffee.resize(img.size, Image.Resampling.BILINEAR))
            assert _mean_abs_diff(np.asarray(img.convert("RGB")), small) < 8.0


@pytest.mark.gpu
def test_nvjpeg_decode_matches_the_cpu_decoder(coffee: Image.Image, chelsea: Image.Image) -> None:
    datas = [_encode(img, "JPEG", quality=q) for img in (coffee, chelsea) for q in (75, 95)]
    datas.append(NOT_A_SCAN)
    out = decode_jpegs(datas, "cuda")
    assert out[-1] is None
    for data, tensor in zip(datas[:-1], out[:-1], strict=True):
        assert tensor is not None and tensor.device.type == "cuda"
        assert _mean_abs_diff(tensor.permute(1, 2, 0).cpu().numpy(), _pixels(load_image(data))) < 2.0
        thumb = thumbnail_from_tensor(tensor)
        assert Image.open(io.BytesIO(thumb)).format == "JPEG"
